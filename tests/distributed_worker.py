"""The workload of the sharding and resumption tests (``tests/test_scale.py``).

Run as a script (under ``torchrun`` or alone) it computes :func:`results` on a tiny seeded
model and rank 0 writes them as JSON to the path given; imported, the tests call
:func:`results` in process for the single-process reference.

    python tests/distributed_worker.py OUT.json [--checkpoint DIR] [--probe PROBE ARGUMENTS...]
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reference import tiny_attnres  # noqa: E402


def workload() -> tuple[torch.nn.Module, list[torch.Tensor]]:
    """A tiny kimi model and three token batches (two sizes), all seeded."""
    model = tiny_attnres("kimi", n_layers=4, n_blocks=2)
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 300, (n, 10), generator=generator) for n in (3, 3, 2)]
    return model, batches


def results(checkpoint_dir: str | None = None) -> dict[str, list]:
    """The numbers compared across world sizes and interruptions: the mass-vs-effect table
    (sweep, bootstrap, routing statistics) and a family sweep's per-prompt effects."""
    from attnres_lens.attribution import mass_vs_effect
    from attnres_lens.patching import sweep_sources

    model, batches = workload()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="bootstrap CIs over only")  # 8 prompts: rough, and fine here
        report = mass_vs_effect(model, batches, groups="slice", n_boot=60, gradient=False,
                                checkpoint_dir=None if checkpoint_dir is None else Path(checkpoint_dir) / "slice")
        family = sweep_sources(model, batches[0], groups="family", progress=False,
                               checkpoint_dir=None if checkpoint_dir is None else Path(checkpoint_dir) / "family")
    table = report.table
    out = {column: table[column].to_numpy(dtype=float).tolist()
           for column in ("mass", "effect", "effect_low", "effect_high", "mass_low", "mass_high", "content_dependence")}
    out["names"] = table["name"].tolist()
    out["spearman"] = [report.rank_correlation["spearman"][k] for k in ("estimate", "low", "high")]
    out["routing_mass_std"] = report.routing.slices["mass_std"].to_numpy(dtype=float).tolist()
    out["family_effect_per_prompt"] = np.vstack(family["effect_per_prompt"].to_list()).tolist()
    return out


def main() -> None:
    from attnres_lens import distributed

    torch.set_num_threads(1)
    distributed.init_from_env()
    checkpoint = sys.argv[sys.argv.index("--checkpoint") + 1] if "--checkpoint" in sys.argv else None
    values = results(checkpoint)
    if "--probe" in sys.argv:  # then the command line, under the same process group
        from attnres_lens.cli import main as cli

        assert cli(["probe", *sys.argv[sys.argv.index("--probe") + 1 :]]) == 0
    if distributed.is_writer():
        Path(sys.argv[1]).write_text(json.dumps({"world_size": distributed.ranks().world_size, **values}))
        print("done", flush=True)


if __name__ == "__main__":
    main()
