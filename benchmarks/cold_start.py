"""Cold start of the command line and the package, side by side with a bare interpreter.

Each contestant is a fresh ``python`` process, timed round by round interleaved so machine noise
hits all alike. Prints the median and minimum wall time of each and the ratio to a bare
``python -c pass`` (the goal: ``attnres-lens --help`` and argument errors well under 1 s), and
which heavy modules each imported.

    python benchmarks/cold_start.py --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "scipy", "matplotlib", "pandas", "transformers", "transformer_lens")
CONTESTANTS = {
    "python -c pass": "pass",
    "import attnres_lens": "import attnres_lens",
    "attnres-lens --help": "from attnres_lens.cli import main; main(['--help'])",
    "attnres-lens probe (argument error)": "from attnres_lens.cli import main; main(['probe'])",
    "attnres_lens.HookedAttnResTransformer": "import attnres_lens; attnres_lens.HookedAttnResTransformer",
}


def run(code: str) -> tuple[float, list[str]]:
    report = "import sys; print('HEAVY', *sorted({m.split('.')[0] for m in sys.modules} & set(%r)))" % (HEAVY,)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", f"{code}\n{report}"], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    return wall, out.stdout.rsplit("HEAVY", 1)[-1].split()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in CONTESTANTS}
    heavy: dict[str, list[str]] = {}
    for _ in range(args.rounds):
        for name, code in CONTESTANTS.items():
            wall, heavy[name] = run(code)
            times[name].append(wall)
    base = min(times["python -c pass"])
    print(f"{'':40} {'median':>8} {'min':>8} {'min / bare':>11}  heavy modules imported")
    for name, walls in times.items():
        print(f"{name:40} {statistics.median(walls):7.2f}s {min(walls):7.2f}s {min(walls) / base:10.1f}x  "
              f"{', '.join(heavy[name]) or '-'}")


if __name__ == "__main__":
    main()
