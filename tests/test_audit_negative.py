"""Negative tests of the product's own audit (``apcrypto.audit``): broken ledgers and logs, one per rule.

The demo and the campaign's second opinion rely on :func:`apcrypto.audit.audit`; an audit that
always said OK would pass every positive test.  Here a ledger is filled through its public methods
(open, new attempt, close) and paired with a hand-written execution log, clean first, then broken
one way at a time; each breakage must show in the report (and in ``ok`` where it is a safety rule).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from apcrypto.audit import AuditReport, audit
from apcrypto.core.ledger import Ledger, Outcome


@dataclass(frozen=True)
class Ex:
    """An execution-log entry with only the fields the audit reads."""

    psmid: int
    started: float | None
    outcome: str
    reply_code: int | None = 0
    effect: str | None = None


def ledger_with(*cases: tuple[bool, list[str], Outcome | None]) -> tuple[Ledger, list[list[int]]]:
    """One record per case: (idempotent, fates of its attempts, outcome or None for undecided).
    Returns the ledger and each record's attempt psmids."""
    led = Ledger()
    psmids = []
    for idem, fates, outcome in cases:
        rec = led.open(object(), idempotent=idem, mode="accel", weight=1)
        ps = []
        for fate in fates:
            att = led.new_attempt(rec, 0x0001)
            att.fate = fate
            ps.append(att.psmid)
        if outcome is not None:
            led.close(rec, outcome)
        psmids.append(ps)
    return led, psmids


def clean() -> tuple[Ledger, list[Ex]]:
    """#1 completed; #2 re-driven after a request-pending failure, then completed; #3 indeterminate
    after it started on a failed card."""
    led, ps = ledger_with(
        (False, ["completed"], Outcome.COMPLETED),
        (False, ["mf-pending", "completed"], Outcome.COMPLETED),
        (False, ["mf-in-process"], Outcome.INDETERMINATE),
    )
    log = [
        Ex(ps[0][0], 1.0, "completed"),
        Ex(ps[1][0], None, "pending-failed", 0x10),
        Ex(ps[1][1], 2.0, "completed"),
        Ex(ps[2][0], 1.0, "in-process-failed", 0x10),
    ]
    return led, log


def test_clean_history_passes() -> None:
    led, log = clean()
    rep = audit(led, log)
    assert rep.ok, rep.summary()
    assert rep.requests == 3
    assert not rep.indeterminate_never_started and not rep.indeterminate_card_silent
    assert rep.outcomes == {"completed": 2, "indeterminate": 1}


def test_lost_request_is_reported() -> None:
    led, ps = ledger_with((False, ["on-card"], None))
    rep = audit(led, [Ex(ps[0][0], None, "queued", None)])
    assert not rep.ok and rep.lost == [1], rep.summary()


def test_state_changing_request_run_twice_is_reported() -> None:
    led, ps = ledger_with((False, ["mf-in-process", "completed"], Outcome.COMPLETED))
    log = [Ex(ps[0][0], 1.0, "in-process-failed", 0x10), Ex(ps[0][1], 2.0, "completed")]
    rep = audit(led, log)
    assert not rep.ok and rep.ran_twice == [1], rep.summary()


def test_idempotent_request_may_run_twice() -> None:
    """The same history for a request the caller marked idempotent is fine (the rule's boundary)."""
    led, ps = ledger_with((True, ["mf-in-process", "completed"], Outcome.COMPLETED))
    log = [Ex(ps[0][0], 1.0, "in-process-failed", 0x10), Ex(ps[0][1], 2.0, "completed")]
    assert audit(led, log).ok


def test_indeterminate_that_never_started_is_reported() -> None:
    led, ps = ledger_with((False, ["mf-pending"], Outcome.INDETERMINATE))
    rep = audit(led, [Ex(ps[0][0], None, "pending-failed", 0x10)])
    assert rep.indeterminate_never_started == [1], rep.summary()
    assert not rep.indeterminate_card_silent


def test_indeterminate_on_a_silent_card_is_told_apart() -> None:
    """A card that died holding the message cannot say: counted separately, not as a lie."""
    led, ps = ledger_with((False, ["lost"], Outcome.INDETERMINATE))
    rep = audit(led, [Ex(ps[0][0], None, "discarded", None)])
    assert rep.indeterminate_card_silent == [1] and not rep.indeterminate_never_started, rep.summary()


def test_completed_without_a_run_is_reported() -> None:
    led, ps = ledger_with((False, ["completed"], Outcome.COMPLETED))
    rep = audit(led, [Ex(ps[0][0], None, "discarded", None)])
    assert not rep.ok and rep.completed_without_run == [1], rep.summary()


def test_completed_with_no_log_entry_is_reported() -> None:
    led, _ = ledger_with((False, ["completed"], Outcome.COMPLETED))
    rep = audit(led, [])
    assert not rep.ok and rep.completed_without_run == [1], rep.summary()


@pytest.mark.parametrize("code", [0x20, 0x21])
def test_rejected_before_execution_is_no_run(code: int) -> None:
    """A message the card refused unexecuted (message type, command code) and then sent elsewhere
    ran once, not twice -- but the same codes *with* an effect did run."""
    led, ps = ledger_with((False, ["error", "completed"], Outcome.COMPLETED))
    log = [Ex(ps[0][0], 1.0, "error", code), Ex(ps[0][1], 2.0, "completed")]
    assert audit(led, log).ok
    log[0] = Ex(ps[0][0], 1.0, "error", code, effect="counter 0->1")
    assert audit(led, log).ran_twice == [1]


def test_every_safety_field_breaks_ok() -> None:
    """``ok`` is the conjunction of the safety lists: each one alone makes it False."""
    for name in ("lost", "ran_twice", "completed_without_run"):
        rep = AuditReport()
        getattr(rep, name).append(1)
        assert not rep.ok, name
    assert AuditReport().ok
