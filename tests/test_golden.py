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


def test_printed_numbers_may_differ_only_in_their_last_digit():
    """A flag's text may print a number one unit apart in its last digit; a different word, a
    number two units apart, an integer or a missing number fails."""
    want = {"reason": "mass 0.361 >= 0.2; effect +0.001798 [-0.0001543, +0.004912]: 3 rows"}
    assert_matches({"reason": want["reason"].replace("0.0001543", "0.0001544")}, want)
    for bad in ("0.0001545", "0.001543"):
        with pytest.raises(AssertionError):
            assert_matches({"reason": want["reason"].replace("0.0001543", bad)}, want)
    for old, new in (("mass", "Mass"), ("3 rows", "4 rows"), (": 3 rows", "")):
        with pytest.raises(AssertionError):
            assert_matches({"reason": want["reason"].replace(old, new)}, want)


def test_only_rank_correlation_bounds_get_the_rank_tolerance():
    """A rank-correlation bound may move by 0.01 (a rank swap); its point estimate and any other
    key named ``high`` may not."""
    want = {"rank_correlation": {"kendall": {"estimate": 0.4, "low": 0.2, "high": 0.43}}, "high": 0.43}
    assert_matches({**want, "rank_correlation": {"kendall": {"estimate": 0.4, "low": 0.21, "high": 0.44}}}, want, "s")
    for bad in ({**want, "rank_correlation": {"kendall": {"estimate": 0.41, "low": 0.2, "high": 0.43}}},
                {**want, "high": 0.44}):
        with pytest.raises(AssertionError):
            assert_matches(bad, want, "s")
