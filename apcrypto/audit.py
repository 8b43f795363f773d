"""Check every verdict of the driver's ledger against what actually ran (an execution log).

The emulator records, per psmid, whether an engine started a message and how it ended.  This
module holds the driver's promises up against that truth: nothing lost, no state-changing request
run twice, no request reported indeterminate that provably never started (when the card could tell),
every completed request backed by a completed execution.  It takes any iterable of objects with
``psmid``, ``started`` and ``outcome`` attributes, so it never imports the emulator.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from apcrypto.core.ledger import Ledger, Outcome


class ExecutionLike(Protocol):
    psmid: int
    started: float | None
    outcome: str


@dataclass
class AuditReport:
    requests: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    lost: list[int] = field(default_factory=list)  # rids without an outcome
    ran_twice: list[int] = field(default_factory=list)  # non-idempotent rids started more than once
    indeterminate_never_started: list[int] = field(default_factory=list)
    indeterminate_card_silent: list[int] = field(default_factory=list)  # never started; card gave no reply
    completed_without_run: list[int] = field(default_factory=list)
    redriven: int = 0

    @property
    def ok(self) -> bool:
        """The safety properties: nothing lost, nothing run twice, every completion real."""
        return not (self.lost or self.ran_twice or self.completed_without_run)

    def summary(self) -> str:
        return (
            f"requests {self.requests}: lost {len(self.lost)}, ran twice {len(self.ran_twice)}, "
            f"indeterminate that never started {len(self.indeterminate_never_started)}"
            + (
                f" (+{len(self.indeterminate_card_silent)} where the card died silently)"
                if self.indeterminate_card_silent
                else ""
            )
            + f", completed without running {len(self.completed_without_run)}, re-driven {self.redriven}"
        )


#: Error replies by which a card refuses a message before executing it (reference/zcrypt.md §4.3,
#: §5.1: message type, command code); the driver may send such a request again.
_REJECTED_BEFORE_EXECUTION = frozenset({0x20, 0x21})


def _rejected_unrun(e: Any) -> bool:
    """An engine picked the message up only to reject it unexecuted: no run, and no effect."""
    return (
        getattr(e, "outcome", None) == "error"
        and getattr(e, "reply_code", None) in _REJECTED_BEFORE_EXECUTION
        and getattr(e, "effect", None) is None
    )


def audit(ledger: Ledger, executions: Iterable[Any]) -> AuditReport:
    """Compare every record still in ``ledger`` with ``executions``."""
    by_psmid: dict[int, list[ExecutionLike]] = defaultdict(list)
    for e in executions:
        by_psmid[e.psmid].append(e)
    rep = AuditReport()
    for rid, rec in ledger.records.items():
        rep.requests += 1
        rep.redriven += rec.redrives
        oc = rec.outcome.value if rec.outcome else "none"
        rep.outcomes[oc] = rep.outcomes.get(oc, 0) + 1
        entries = [e for a in rec.attempts for e in by_psmid.get(a.psmid, ())]
        starts = sum(1 for e in entries if e.started is not None and not _rejected_unrun(e))
        if rec.outcome is None:
            rep.lost.append(rid)
            continue
        if starts > 1 and not rec.idempotent:
            rep.ran_twice.append(rid)
        if rec.outcome is Outcome.INDETERMINATE and starts == 0:
            # The card's machine-failure replies say exactly what ran; a card that died silently
            # (checkstop, reset, lost transport) cannot, and the ledger must assume the worst.
            if any(a.fate == "lost" for a in rec.attempts):
                rep.indeterminate_card_silent.append(rid)
            else:
                rep.indeterminate_never_started.append(rid)
        if rec.outcome is Outcome.COMPLETED and not any(e.outcome == "completed" for e in entries):
            rep.completed_without_run.append(rid)
    return rep
