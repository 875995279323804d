"""Write docs/hooks.md's "TL tools" table from tests/test_tl_conformance.py (issue 24).

The table is ``render_table()`` of the conformance suite: one row per ported notebook cell, one
column per flavour and TL path, each entry the outcome the suite asserts. Run it after changing
the suite's expectations; ``test_docs_table_is_generated_from_the_suite`` fails until you do.

    python tools/tl_conformance_table.py
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

import test_tl_conformance as suite  # noqa: E402


def main() -> None:
    docs = ROOT / "docs" / "hooks.md"
    text = docs.read_text()
    table = suite.TABLE_START + suite.render_table() + suite.TABLE_END
    if suite.TABLE_START in text:
        before, rest = text.split(suite.TABLE_START, 1)
        after = rest.split(suite.TABLE_END, 1)[1]
        text = before + table + after
    else:
        text = text.rstrip("\n") + "\n\n" + table
    docs.write_text(text)
    print(f"wrote {len(suite.CELLS)} rows to {docs.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
