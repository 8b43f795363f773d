"""What actually ran on the emulated cards: the ground truth the driver's verdicts are checked against.

One :class:`Execution` per accepted NQAP (a psmid sent twice, to one queue or two, has two entries).
The card model owns the mutable ``_Entry`` records and updates them in place as a message moves on
(queued → running → completed/error/…); readers get frozen snapshots.  Lookups by psmid are a dict
hit, so the NQAP/DQAP hot paths never scan the log.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal

__all__ = ["OUTCOMES", "Execution", "ExecutionLog", "Outcome"]

Outcome = Literal[
    "queued", "running", "completed", "error", "in-process-failed", "pending-failed", "discarded"
]

#: Every outcome, in lifecycle order.  ``queued`` and ``running`` are the two not-yet-final ones.
OUTCOMES: Final = (
    "queued",
    "running",
    "completed",
    "error",
    "in-process-failed",
    "pending-failed",
    "discarded",
)
FINAL_OUTCOMES: Final = frozenset(OUTCOMES[2:])


@dataclass(frozen=True, slots=True)
class Execution:
    """A snapshot of one message's life on a card.

    ``engine`` and ``started`` are set once an engine picked it up (a ``discarded`` entry with
    ``started`` set *had run*: its effect, if any, happened).  ``ended`` is when it reached its final
    outcome (reply formatted, or dropped).  ``reply_code`` is the type 82 reply code of an error or
    machine-failure reply, 0 for a normal reply, None while none exists.  ``effect`` is the state
    change the firmware applied (``"CI"``, ``"KS"``, …) or None.  ``dequeued`` is when the host took
    the reply with DQAP.
    """

    psmid: int
    qid: int
    engine: int | None
    function: str
    enqueued: float
    started: float | None
    ended: float | None
    outcome: Outcome
    reply_code: int | None
    effect: str | None = None
    dequeued: float | None = None
    seq: int = 0

    @property
    def ran(self) -> bool:
        """True if an engine started it (its effect may have happened)."""
        return self.started is not None


class _Entry:
    """The mutable record behind an :class:`Execution` (owned by the card model)."""

    __slots__ = (
        "dequeued",
        "effect",
        "ended",
        "engine",
        "enqueued",
        "function",
        "outcome",
        "psmid",
        "qid",
        "reply_code",
        "seq",
        "started",
    )

    def __init__(self, seq: int, psmid: int, qid: int, function: str, enqueued: float) -> None:
        self.seq = seq
        self.psmid = psmid
        self.qid = qid
        self.function = function
        self.enqueued = enqueued
        self.engine: int | None = None
        self.started: float | None = None
        self.ended: float | None = None
        self.outcome: Outcome = "queued"
        self.reply_code: int | None = None
        self.effect: str | None = None
        self.dequeued: float | None = None

    def snapshot(self) -> Execution:
        return Execution(
            psmid=self.psmid,
            qid=self.qid,
            engine=self.engine,
            function=self.function,
            enqueued=self.enqueued,
            started=self.started,
            ended=self.ended,
            outcome=self.outcome,
            reply_code=self.reply_code,
            effect=self.effect,
            dequeued=self.dequeued,
            seq=self.seq,
        )


class ExecutionLog:
    """The emulator's record of every accepted request, in NQAP order.

    Reads take the emulator's lock, so a test may read while a :class:`~emulator.clock.WallClock`
    pump thread completes requests.
    """

    def __init__(self, lock: threading.RLock | None = None) -> None:
        self._lock = lock if lock is not None else threading.RLock()
        self._entries: list[_Entry] = []
        self._by_psmid: dict[int, list[_Entry]] = {}

    # --- written by the card model (under the emulator lock) -----------------------------------

    def _add(self, psmid: int, qid: int, function: str, enqueued: float) -> _Entry:
        entry = _Entry(len(self._entries), psmid, qid, function, enqueued)
        self._entries.append(entry)
        bucket = self._by_psmid.get(psmid)
        if bucket is None:
            self._by_psmid[psmid] = [entry]
        else:
            bucket.append(entry)
        return entry

    # --- read API ----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[Execution]:
        """Every execution, in the order the cards accepted them."""
        with self._lock:
            return [e.snapshot() for e in self._entries]

    def for_psmid(self, psmid: int) -> list[Execution]:
        """Every execution of ``psmid`` (more than one if it was sent more than once)."""
        with self._lock:
            return [e.snapshot() for e in self._by_psmid.get(psmid, ())]

    def started(self, psmid: int) -> bool:
        """True if any execution of ``psmid`` was started by an engine."""
        with self._lock:
            return any(e.started is not None for e in self._by_psmid.get(psmid, ()))

    def starts(self, psmid: int) -> int:
        """How many times an engine started ``psmid``: more than 1 means it ran twice."""
        with self._lock:
            return sum(e.started is not None for e in self._by_psmid.get(psmid, ()))

    def executions_started(self, psmids: Iterable[int]) -> int:
        """Total engine starts over ``psmids`` (each psmid counted as often as it ran)."""
        with self._lock:
            return sum(e.started is not None for p in psmids for e in self._by_psmid.get(p, ()))

    def by_outcome(self) -> dict[str, int]:
        """Counts per outcome (every outcome present, zeros included)."""
        counts = dict.fromkeys(OUTCOMES, 0)
        with self._lock:
            for e in self._entries:
                counts[e.outcome] += 1
        return counts
