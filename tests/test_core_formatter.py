"""The reply formatter's decision table (DESIGN §4.3), exhaustively.

Inputs: could the attempt have run on the card, did the caller mark the request idempotent, how
many safe re-drives it has had, the budget.  The rule: a state-changing request that may have run
is never sent again; work that provably never ran (or is idempotent) is re-driven until the budget
is spent, then reported unavailable (never ran) or indeterminate (may have run).
"""

from __future__ import annotations

import itertools

import pytest

from apcrypto.core.config import FAST, DriverConfig
from apcrypto.core.formatter import Fate, decide


def expected(may_have_run: bool, idempotent: bool, redrives: int, budget: int) -> Fate:
    if may_have_run and not idempotent:
        return Fate.INDETERMINATE
    if redrives < budget:
        return Fate.REDRIVE
    return Fate.INDETERMINATE if may_have_run else Fate.EXHAUSTED


CASES = [
    (m, i, r, b)
    for m, i in itertools.product([False, True], repeat=2)
    for b in range(0, 5)
    for r in range(0, b + 3)
]


@pytest.mark.parametrize(("may_have_run", "idempotent", "redrives", "budget"), CASES)
def test_decision_table(may_have_run: bool, idempotent: bool, redrives: int, budget: int) -> None:
    got = decide(may_have_run=may_have_run, idempotent=idempotent, redrives=redrives, max_redrives=budget)
    assert got is expected(may_have_run, idempotent, redrives, budget)


def test_named_cells() -> None:
    """The four cells DESIGN §2 names, at the default budget."""
    b = DriverConfig().max_redrives
    # request-pending on a failed card: re-driven
    assert decide(may_have_run=False, idempotent=False, redrives=0, max_redrives=b) is Fate.REDRIVE
    # in-process, state-changing: indeterminate, never re-driven
    assert decide(may_have_run=True, idempotent=False, redrives=0, max_redrives=b) is Fate.INDETERMINATE
    # in-process, idempotent: re-driven
    assert decide(may_have_run=True, idempotent=True, redrives=0, max_redrives=b) is Fate.REDRIVE
    # never ran, budget spent: unavailable, not indeterminate
    assert decide(may_have_run=False, idempotent=False, redrives=b, max_redrives=b) is Fate.EXHAUSTED


def test_state_changing_work_that_may_have_run_is_never_redriven_whatever_the_budget() -> None:
    for r, b in itertools.product(range(6), range(6)):
        assert decide(may_have_run=True, idempotent=False, redrives=r, max_redrives=b) is not Fate.REDRIVE


def test_budget_bounds_redrives() -> None:
    """Following REDRIVE from 0 ends after exactly ``budget`` re-drives, for every input."""
    for m, i in itertools.product([False, True], repeat=2):
        for b in range(5):
            r = 0
            while decide(may_have_run=m, idempotent=i, redrives=r, max_redrives=b) is Fate.REDRIVE:
                r += 1
                assert r <= b
            assert r == (0 if (m and not i) else b)


def test_every_fate_is_reachable() -> None:
    assert {expected(*c) for c in CASES} == set(Fate)


def test_configured_budgets_are_positive() -> None:
    assert DriverConfig().max_redrives >= 1 and FAST.max_redrives >= 1


def test_decide_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        decide(True, False, 0, 3)  # type: ignore[misc]
