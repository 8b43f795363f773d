"""The ledger: every request from submit to exactly one outcome, and every attempt on the way.

It is what lets the driver decide a request's fate when a card is too dead to say: an attempt whose
NQAP was never accepted never left the host; one that was accepted and never answered may have run.
Lookups are by request id and by psmid (both dicts), never a scan.

Memory stays flat: every undecided request is kept, and of the decided ones only the newest
``history`` (``DriverConfig.ledger_history``); counts per outcome and the counters are kept forever.
A reply for a request that has left the history is a late reply like any other (the request was
decided), never delivered.
"""

from __future__ import annotations

import itertools
from collections import Counter, deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Phase(Enum):
    QUEUED = "queued"  # on the host, waiting for a slot
    SENDING = "sending"  # NQAP issued, its status not yet seen
    ON_CARD = "on-card"  # NQAP accepted: the card holds it
    DONE = "done"  # outcome decided


class Outcome(Enum):
    COMPLETED = "completed"
    FAILED = "failed"
    INDETERMINATE = "indeterminate"
    UNAVAILABLE = "unavailable"


@dataclass(slots=True)
class Attempt:
    psmid: int
    qid: int
    fate: str = (
        "sending"  # sending, on-card, completed, error, bounced, mf-pending, mf-in-process, lost, late
    )
    #: proven never to have reached an engine (bounced before the card took it, withdrawn before it
    #: was sent, or reported request-pending by a machine failure).  An attempt the card took and
    #: then refused unexecuted is *not* cleared: it was handed to a card (DeadlineExceeded's
    #: contract), and an engine had picked it up.  A deadline's may-have-run
    #: verdict looks at every attempt of the request, not only the last one.
    cleared: bool = False


@dataclass(slots=True, eq=False)
class Record:
    rid: int
    request: Any
    idempotent: bool
    mode: str
    weight: int
    phase: Phase = Phase.QUEUED
    attempts: list[Attempt] = field(default_factory=list)
    redrives: int = 0
    avoid_qid: int | None = None
    outcome: Outcome | None = None
    has_deadline: bool = False
    parked_at: float = 0.0  # when it last went back to the host (the unavailable grace counts from it)
    target: frozenset[int] | None = None  # the APQNs it may run on (None: any of its kind); never failed over

    @property
    def current(self) -> Attempt | None:
        return self.attempts[-1] if self.attempts else None

    @property
    def resolved(self) -> bool:
        return self.outcome is not None

    def ran_somewhere(self) -> Attempt | None:
        """The latest attempt that may have run on a card (None: provably never ran anywhere)."""
        for a in reversed(self.attempts):
            if not a.cleared:
                return a
        return None


class Ledger:
    """Request records, psmid allocation and outcome counts for one client."""

    def __init__(self, psmid_base: int = 0, history: int = 1_000) -> None:
        if not 0 <= psmid_base < (1 << 64):
            raise ValueError("psmid_base must fit in 64 bits")
        if history < 0:
            raise ValueError("ledger history must be >= 0")
        self._rids = itertools.count(1)
        # psmids: base + counter, unique for the client's life (the kernel uses pid << 32 + counter).
        self._psmids = itertools.count(psmid_base + 1)
        self._psmid_limit = psmid_base + (1 << 32)
        self.records: dict[int, Record] = {}
        self.by_psmid: dict[int, int] = {}
        self._resolved: deque[int] = deque()
        self._history = history
        self.outcomes: Counter[str] = Counter()
        self.counters: Counter[str] = Counter()  # redriven, stray_replies, late_replies, bounced, ...

    def open(self, request: Any, *, idempotent: bool, mode: str, weight: int) -> Record:
        rec = Record(next(self._rids), request, idempotent, mode, weight, Phase.QUEUED, [])
        self.records[rec.rid] = rec
        self.counters["submitted"] += 1
        return rec

    def new_attempt(self, rec: Record, qid: int) -> Attempt:
        psmid = next(self._psmids)
        if psmid >= self._psmid_limit:
            raise OverflowError("psmid space of this client exhausted")
        att = Attempt(psmid, qid)
        rec.attempts.append(att)
        rec.phase = Phase.SENDING
        self.by_psmid[psmid] = rec.rid
        return att

    def new_psmid(self) -> int:
        """A psmid for an internal message (health probe) that belongs to no request."""
        return next(self._psmids)

    def record_for_psmid(self, psmid: int) -> Record | None:
        rid = self.by_psmid.get(psmid)
        return None if rid is None else self.records.get(rid)

    def close(self, rec: Record, outcome: Outcome) -> None:
        """Mark ``rec`` decided.  Keeps a bounded history of decided records (counts are forever)."""
        if rec.outcome is not None:
            raise AssertionError(f"request {rec.rid} decided twice ({rec.outcome} then {outcome})")
        rec.outcome = outcome
        rec.phase = Phase.DONE
        self.outcomes[outcome._value_] += 1  # (.value is a Python descriptor; _value_ a plain slot)
        self._resolved.append(rec.rid)
        if len(self._resolved) > self._history:
            gone = self.records.pop(self._resolved.popleft(), None)
            if gone is not None:
                for a in gone.attempts:
                    self.by_psmid.pop(a.psmid, None)

    def in_flight(self) -> list[Record]:
        """Requests not yet decided (a closed client must have none)."""
        return [r for r in self.records.values() if r.outcome is None]
