"""Every workflow equals the reference recipe on the same tiny weights and seed (float32)."""

import pytest

from fewstep.selftest import PARITY_TOLERANCE, cases, run_case

CASES = cases()


@pytest.fixture(scope="module")
def engines():
    return {}


@pytest.mark.parametrize("case", CASES, ids=[f"{c.family}-{c.name}" for c in CASES])
def test_matches_reference_recipe(case, tiny, engines):
    row = run_case(case, tiny, engines)
    assert row["max_diff"] <= PARITY_TOLERANCE, row
    assert row["ok"]
