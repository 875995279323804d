"""Golden numbers (issue 19): the demo's ``summary.json`` and the public sweep tables of the
bundled model are what they were when recorded (``tests/golden_numbers.py`` says how, what is
compared and how to record them again)."""

from __future__ import annotations

import json

import pytest

from golden_numbers import GOLDEN, assert_matches, bundled_tables, table_matches


@pytest.mark.xdist_group("demo")  # one demo run (conftest.demo_run) per session
def test_demo_summary_matches_golden(demo_run):
    code, _, err, out = demo_run
    assert code == 0, err
    got = json.loads((out / "summary.json").read_text())
    assert_matches(got, json.loads((GOLDEN / "demo_summary.json").read_text()), "summary.json")


@pytest.fixture(scope="module")
def tables():
    return bundled_tables()


@pytest.mark.parametrize("name", sorted(json.loads((GOLDEN / "bundled_tables.json").read_text())))
def test_bundled_tables_match_golden(tables, name):
    want = json.loads((GOLDEN / "bundled_tables.json").read_text())[name]
    if "columns" in want:
        table_matches(tables[name], want, name)
    else:
        assert_matches(tables[name], want, name)


def test_the_comparison_catches_a_changed_number():
    """The comparison is not vacuous: a float off by 1e-4 relative, a changed string, a missing
    key or row, and an int that became a float all fail; a new key does not."""
    want = {"a": 1.0, "b": "x", "c": [1, 2], "d": 3}
    assert_matches({**want, "new": 0}, want)
    for got in ({**want, "a": 1.0001}, {**want, "b": "y"}, {"b": "x", "c": [1, 2], "d": 3},
                {**want, "c": [1]}, {**want, "d": 3.0}):
        with pytest.raises(AssertionError):
            assert_matches(got, want)
