"""Test configuration: every public annotation of attnres_lens is checked at runtime.

The import hook (tests/typecheck.py, jaxtyping's hook less what it states) must be installed
before anything imports ``attnres_lens``: it decorates every function and class in the package
with ``jaxtyping.jaxtyped(typechecker=beartype)``, so shape names (``batch pos source``) are
checked for consistency within a call.
"""

import os

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub

import torch
from typecheck import checked_imports

# The suite runs tiny models, for which thread start-up costs more than it saves; on a shared
# 2-core machine several threads per process make each forward up to 100x slower.
torch.set_num_threads(1)

with checked_imports():
    import importlib
    import pkgutil

    import attnres_lens

    # The package imports its modules lazily, so import every one here, inside the hook: a
    # module first imported after this block would escape the runtime checks.
    for _module in pkgutil.walk_packages(attnres_lens.__path__, "attnres_lens."):
        importlib.import_module(_module.name)


# ============================================================================ analysis-layer fixtures
# (interventions, patching, attribution): tiny random models of both flavours.
import pytest  # noqa: E402
from reference import tiny_attnres  # noqa: E402


@pytest.fixture(scope="module", params=["kimi", "cumulative"])
def model(request):
    """A 4-layer, 2-block tiny model of each flavour with randomised routers."""
    return tiny_attnres(request.param)


@pytest.fixture(scope="module")
def kimi():
    """The kimi member of ``model``."""
    return tiny_attnres("kimi")


# ============================================================================ plot fixtures
@pytest.fixture(scope="module")
def cumulative():
    """A 3-layer cumulative model, one layer per block, for the plot tests."""
    return tiny_attnres("cumulative", "block", n_layers=3, n_blocks=3, seed=1)


@pytest.fixture(scope="module")
def report(cumulative):
    """``mass_vs_effect`` of ``cumulative`` on 12 random prompts, with gradients."""
    import warnings

    from attnres_lens import mass_vs_effect

    tokens = torch.randint(1, 250, (12, 8), generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mass_vs_effect(cumulative, tokens, n_boot=40, gradient=True)


# ============================================================================ the demo, run once
@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """``attnres-lens demo`` with ``golden_numbers.DEMO_ARGS``, run once for the session:
    ``(exit code, stdout, stderr, out_dir)``; tests/test_cli.py checks its report and
    tests/test_golden.py its numbers."""
    from golden_numbers import run_demo_cli

    out = tmp_path_factory.mktemp("demo") / "report"
    return (*run_demo_cli(out), out)
