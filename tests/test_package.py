"""The package as a whole: lazy public names, a cheap cold start, no import cycle."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import attnres_lens

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "scipy", "matplotlib", "pandas", "transformers", "transformer_lens")
DEFERRED = ("attnres_lens.training", "attnres_lens.protocol", "attnres_lens.attribution")


def _modules_after(code: str) -> set[str]:
    script = f"import sys\n{code}\nprint('MODULES', ' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    return set(out.stdout.split("MODULES")[-1].split())


def test_import_and_help_import_nothing_heavy():
    for code in (
        "import attnres_lens",
        "from attnres_lens.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass",
        "from attnres_lens.cli import main\nmain(['probe'])",  # an argument error
    ):
        loaded = _modules_after(code)
        heavy = sorted(m for m in loaded if m.split(".")[0] in HEAVY or m in DEFERRED)
        assert not heavy, f"{code!r} imported {heavy[:10]}"


def test_every_public_name_is_importable_and_listed():
    assert len(set(attnres_lens.__all__)) == len(attnres_lens.__all__)
    assert set(attnres_lens.__all__) <= set(dir(attnres_lens))
    namespace: dict = {}
    exec(f"from attnres_lens import {', '.join(attnres_lens.__all__)}", namespace)
    assert attnres_lens.bundled.__name__ == "attnres_lens.bundled"
    assert attnres_lens.HookedAttnResTransformer.__module__ == "attnres_lens.model"
    from attnres_lens import attribution, interventions, patching  # submodules stay reachable

    assert attnres_lens.sweep_sources is patching.sweep_sources
    assert attnres_lens.mass_vs_effect is attribution.mass_vs_effect
    assert attnres_lens.Slice is interventions.Slice
    from attnres_lens.schedule import RoutingSchedule

    assert RoutingSchedule is attnres_lens.RoutingSchedule


def test_an_unknown_name_is_an_attribute_error():
    try:
        attnres_lens.no_such_name
    except AttributeError as err:
        assert "no_such_name" in str(err)
    else:
        raise AssertionError("attnres_lens.no_such_name did not raise")


def test_the_import_graph_has_no_cycle():
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "import_graph.py"), str(ROOT / "attnres_lens")],
        capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "eager cycles: none" in out.stdout
    # One deferred back-edge, an import inside one function, so at import time nothing cycles:
    # ``Intervention.to_hooks`` (a method of the value class) imports the compiler. (The sweep's
    # core no longer imports the sharded executor: issue 19 step 4.)
    lazy = out.stdout.split("cycles counting lazy imports:")[1]
    assert lazy.strip() == "none" or set(re.findall(r"attnres_lens\.[\w.]+", lazy)) <= {
        "attnres_lens.interventions.compile", "attnres_lens.interventions.spec",
        "attnres_lens.interventions.providers"}, lazy
    loading = next(line for line in out.stdout.splitlines() if line.startswith("loading "))
    assert "model" not in loading, loading


def test_no_file_in_the_package_cites_a_path_outside_the_repository():
    for path in (ROOT / "attnres_lens").rglob("*.py"):
        assert "shared/spec" not in path.read_text(), path


def test_no_hint_uses_a_typing_alias_that_beartype_deprecates():
    """PEP 585: ``typing.Sequence``/``Callable``/``List``... in a hint make beartype warn once per
    function (they were 14 of the suite's 18 warnings); ``collections.abc`` and builtins do not."""
    deprecated = {"Sequence", "Callable", "Mapping", "Iterable", "Iterator", "List", "Dict", "Tuple", "Set",
                  "FrozenSet", "Type", "Deque", "DefaultDict", "OrderedDict", "Counter", "MutableMapping"}
    found = []
    for path in sorted((ROOT / "attnres_lens").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "typing":
                found += [f"{path.relative_to(ROOT)}: typing.{a.name}" for a in node.names if a.name in deprecated]
    assert found == [], found
