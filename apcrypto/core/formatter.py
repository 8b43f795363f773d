"""The reply formatter: what a failed attempt means for its request (DESIGN §4.3).

Pure decision, no state: given whether the card could have run the attempt, whether the caller
marked the request idempotent, and how many safe re-drives it has had, say re-drive or
indeterminate.  The same rule serves the firmware's machine-failure replies (in-process vs
request-pending) and the ledger's own judgement when a card dies without replying (sent and
unanswered may have run; never sent never ran).
"""

from __future__ import annotations

from enum import Enum


class Fate(Enum):
    REDRIVE = "redrive"
    INDETERMINATE = "indeterminate"
    EXHAUSTED = "exhausted"  # it never ran, but its re-drive budget is spent: unavailable


def decide(*, may_have_run: bool, idempotent: bool, redrives: int, max_redrives: int) -> Fate:
    """Re-drive work that provably never ran (or may safely run again); otherwise indeterminate.

    A state-changing request that may have run is never sent again: running it twice is worse than
    telling the caller we do not know.
    """
    if may_have_run and not idempotent:
        return Fate.INDETERMINATE
    if redrives >= max_redrives:
        return Fate.INDETERMINATE if may_have_run else Fate.EXHAUSTED
    return Fate.REDRIVE
