"""The public numbers pinned by ``tests/test_golden.py`` (issue 19: "every public API gives the
same numbers as before"), and how to record them again.

Two golden files live in ``tests/golden/``:

- ``demo_summary.json``: the ``summary.json`` of ``attnres-lens demo`` with the arguments of
  :data:`DEMO_ARGS` (the run ``tests/test_cli.py`` checks too: one run serves both);
- ``bundled_tables.json``: the tables of the public sweeps on the bundled trained model, four
  prompts of 24 tokens (:func:`bundled_tables`).

Comparison (:func:`assert_matches`): strings, booleans, integers and ``None`` exactly; floats
to :data:`RTOL` relative and :data:`ATOL` absolute; every golden key, list entry and column must
be there. New keys and new table columns are allowed (a later column, such as issue Q's
``structural`` flag, changes no number). Keys that are not numbers of the analysis (the
timestamp, the timings) are left out when recording.

Record again (only for a change of numbers that is intended and explained in its commit)::

    PYTHONPATH=$PWD python tests/golden_numbers.py
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

GOLDEN = Path(__file__).resolve().parent / "golden"
DEMO_ARGS = ("--prompts", "6", "--seq-len", "32", "--n-boot", "40", "--quiet")
#: Relative and absolute tolerance for floats. The models run in float32 and torch's CPU kernels
#: sum in a different order on different CPUs (AVX2 or AVX-512): an effect is the difference of
#: two losses near 5.5, whose float32 spacing is 4.8e-7, so a few of those spacings (ATOL), and
#: gradient products to 5e-5 relative, are the rounding of the machine, not a change of numbers.
#: Measured across two machines: effects differ by up to 2.7e-7, gradient estimates by 1.7e-5 rel.
RTOL, ATOL = 5e-5, 2e-6
#: A bootstrap bound of a rank correlation moves by a whole rank swap when two effects closer than
#: float32 rounding trade places in a resample (measured: Kendall's upper bound 0.4295 vs 0.4378
#: across machines); bounds under ``rank_correlation`` are compared to this absolute tolerance.
RANK_BOUND_ATOL = 0.02
#: Float32 rounding noise itself (a deviation from the schedule of order 1e-7): only its bound is pinned.
NOISE_KEYS = {"verify_schedule_max_abs_dev": 1e-6}
#: Keys that are not results: left out when recording, ignored when comparing.
VOLATILE_KEYS = {"created", "timings", "wall_s", "attnres_lens_version"}


def run_demo_cli(out_dir: Path) -> tuple[int, str, str]:
    """``attnres-lens demo --out out_dir`` with :data:`DEMO_ARGS`: exit code, stdout, stderr."""
    from attnres_lens.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["demo", "--out", str(out_dir), *DEMO_ARGS])
    return code, out.getvalue(), err.getvalue()


def strip_volatile(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: strip_volatile(v) for k, v in value.items() if k not in VOLATILE_KEYS}
    if isinstance(value, list):
        return [strip_volatile(v) for v in value]
    return value


def _cell(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return [_cell(v) for v in value.tolist()]
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    return str(value) if not isinstance(value, (list, tuple)) else [_cell(v) for v in value]


def table_record(table: pd.DataFrame) -> dict:
    """A table as ``{"columns": [...], "rows": [{column: value}]}`` (arrays as lists, NA as None)."""
    return {"columns": [str(c) for c in table.columns],
            "rows": [{str(c): _cell(v) for c, v in row.items()} for _, row in table.iterrows()]}


def bundled_tables() -> dict[str, dict]:
    """The public sweeps of the bundled trained model on four 24-token prompts."""
    import torch

    from attnres_lens import bundled, gradient_attribution, mass_vs_effect, sweep_sources
    from attnres_lens.attribution import estimate_effects

    torch.manual_seed(0)
    model = bundled.load_attnres()
    tokens = bundled.eval_tokens(model, n_prompts=4, seq_len=24)
    out: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, kwargs in {
            "sweep_slice_zero": {},
            "sweep_slice_mask_copies": dict(mode="mask", merge_duplicates=False),
            "sweep_family_mean_contribution": dict(groups="family", mode="mean", target="contribution"),
            "sweep_family_band_kl": dict(groups="family_band", metric="kl"),
        }.items():
            out[name] = table_record(sweep_sources(model, tokens, progress=False, **kwargs))
        for name, kwargs in {
            "mass_vs_effect_slice": dict(),
            "mass_vs_effect_family_band_screen": dict(groups="family_band", engine="screen"),
        }.items():
            report = mass_vs_effect(model, tokens, n_boot=40, **kwargs)
            out[name] = table_record(report.table)
            out[name + "_statistics"] = json.loads(json.dumps(
                {"largest": report.largest, "rank_correlation": report.rank_correlation}, default=_cell))
        # the gradient table's ``mass`` is left out: issue 19 step 3 defines mass once, and the
        # gradient table's differs from the sweep's today (by up to 0.0154 on this model)
        out["gradient_attribution"] = table_record(gradient_attribution(model, tokens).drop(columns=["mass"]))
        out["estimate_effects_slice_zero"] = table_record(estimate_effects(model, tokens))
    return out


_NUMBER = re.compile(r"[-+]?\d+(?:\.(\d+))?(?:e[-+]?\d+)?")


def _same_text(got: str, want: str) -> bool:
    """The same words, and the same printed numbers up to one unit in their last printed digit
    (a float at the edge of a rounding step prints either way: ``-0.0001543`` or ``-0.0001544``)."""
    if _NUMBER.sub("#", got) != _NUMBER.sub("#", want):
        return False
    pairs = zip(_NUMBER.finditer(got), _NUMBER.finditer(want))
    return all(g.group() == w.group() or _one_last_digit_apart(g, w) for g, w in pairs)


def _one_last_digit_apart(got: re.Match, want: re.Match) -> bool:
    if got.group(1) is None or "e" in want.group().lower():
        return False  # integers and exponent forms are compared exactly
    step = 10.0 ** -len(want.group(1))
    return abs(float(got.group()) - float(want.group())) <= step * 1.5


def _is_rank_bound(where: str) -> bool:
    """Whether ``where`` names a bootstrap bound (``low``/``high``) of a rank correlation."""
    return "/rank_correlation/" in where and where.rsplit("/", 1)[-1] in ("low", "high")


def assert_matches(got: Any, want: Any, where: str = "") -> None:
    """``got`` holds every key, entry and column of ``want`` with the same values (floats to
    :data:`RTOL`/:data:`ATOL`); the message names the first place that differs."""
    if isinstance(want, dict):
        assert isinstance(got, dict), f"{where}: expected a mapping, got {got!r:.200}"
        for key, value in want.items():
            if key in VOLATILE_KEYS:
                continue
            assert key in got, f"{where}: key {key!r} is missing"
            if key in NOISE_KEYS and value is not None:
                assert isinstance(got[key], float) and abs(got[key]) <= NOISE_KEYS[key], f"{where}/{key}: {got[key]!r} > {NOISE_KEYS[key]}"
                continue
            assert_matches(got[key], value, f"{where}/{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), (
            f"{where}: expected a list of {len(want)}, got {got!r:.300}")
        for i, (g, w) in enumerate(zip(got, want)):
            assert_matches(g, w, f"{where}[{i}]")
    elif isinstance(want, float) and not isinstance(want, bool):
        assert isinstance(got, (int, float)) and not isinstance(got, bool), f"{where}: expected {want!r}, got {got!r}"
        if math.isnan(want):
            assert math.isnan(got), f"{where}: expected NaN, got {got!r}"
        else:
            atol = RANK_BOUND_ATOL if _is_rank_bound(where) else ATOL
            assert math.isclose(got, want, rel_tol=RTOL, abs_tol=atol), f"{where}: expected {want!r}, got {got!r}"
    elif isinstance(want, str):
        assert isinstance(got, str) and _same_text(got, want), f"{where}: expected {want!r}, got {got!r}"
    elif isinstance(want, bool) or want is None:
        assert got == want and type(got) is type(want), f"{where}: expected {want!r}, got {got!r}"
    elif isinstance(want, int):
        assert got == want and isinstance(got, int) and not isinstance(got, bool), f"{where}: expected {want!r}, got {got!r}"
    else:
        raise TypeError(f"{where}: unexpected golden value {want!r}")


def table_matches(got: dict, want: dict, where: str) -> None:
    """A table record against its golden one: every golden column (new ones allowed), row by row."""
    missing = [c for c in want["columns"] if c not in got["columns"]]
    assert not missing, f"{where}: columns {missing} are missing"
    assert len(got["rows"]) == len(want["rows"]), f"{where}: {len(got['rows'])} rows, expected {len(want['rows'])}"
    assert_matches(got["rows"], want["rows"], where)


def write_golden() -> None:
    import tempfile

    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        code, _, err = run_demo_cli(Path(tmp) / "report")
        assert code == 0, err
        summary = json.loads((Path(tmp) / "report" / "summary.json").read_text())
    GOLDEN.mkdir(exist_ok=True)
    (GOLDEN / "demo_summary.json").write_text(json.dumps(strip_volatile(summary), indent=1) + "\n")
    (GOLDEN / "bundled_tables.json").write_text(json.dumps(bundled_tables(), indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(write_golden())
