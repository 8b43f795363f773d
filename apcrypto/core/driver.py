"""The sans-I/O driver core: one object per client that wires the pieces together and is their face.

Events in (a submitted request, an instruction's completion, an interrupt, a timer, a lost or
restored transport), actions out (:mod:`apcrypto.core.actions`).  It never sleeps, reads a clock,
draws entropy or touches a socket; runners pass ``now`` (their clock's reading): timers are armed
at absolute deadlines on that clock and utilisation is integrated over it.  Not thread-safe: a
runner serialises calls.

``DriverCore`` is thin on purpose.  It builds the pieces by composition, each taking typed
references to the pieces below it and handing back what those above need as return values (none
refers to ``DriverCore`` or to a piece above it; ``tests/test_core_layering.py`` checks)::

    DriverCore  (entries, read-only queries)
      └─ QueueMachine   core.machine   the table, the event loop, the instruction handlers,
          │                            every decision about a queue's next state
          └─ Verdicts   core.verdicts  deliver, error reply, attempt failed, abandon on card,
              │                        deadline, grace: return a Consequence for the queue
              └─ Dispatcher core.dispatch  backlog, retry, pinned; pick, fill, send
                  └─ Ledger, Outbox, Classifier, Queue records, DriverConfig

How a request travels: ``submit`` records it in the ledger and hands it to the dispatcher's
backlog; the dispatcher places it on the in-service queue with the lowest weighted load that has a
free slot, emitting NQAP; the NQAP's status accepts it (``on_card``), bounces it back to the host
(Q_FULL, BUSY, reset in progress: it never left the host), or fails it (message too big); a reply
dequeued by DQAP resolves it, or, for an error reply, goes through the classifier and the reply
formatter.  Work no queue of its kind can take waits at most ``unavailable_grace``.  Every path
ends in exactly one ``Resolve``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from apcrypto.core.actions import Action
from apcrypto.core.classifier import Classifier
from apcrypto.core.config import DriverConfig
from apcrypto.core.dispatch import Dispatcher
from apcrypto.core.events import Completion, Interrupt, PeerRestored, TransportLost
from apcrypto.core.ledger import Ledger, Outcome
from apcrypto.core.machine import TABLE, QueueMachine, QueueProtocolError
from apcrypto.core.outbox import Outbox
from apcrypto.core.queue import QState, Queue
from apcrypto.core.timers import TimerKey
from apcrypto.core.verdicts import Verdicts
from apcrypto.errors import CoreMisuse, DeadlineExceeded, TargetNotHeld
from apcrypto.requests import Request
from apformats.results import ApResult, qid_str

__all__ = ["TABLE", "DriverCore", "QueueProtocolError", "QueueView"]

log = logging.getLogger("apcrypto.core")


@dataclass(frozen=True, slots=True)
class QueueView:
    """One queue as the core's public queries show it: a frozen snapshot, never the live record."""

    qid: int
    state: QState
    mode: str
    slots: int
    held: int
    offline_reason: str = ""

    @property
    def in_service(self) -> bool:
        return self.state.in_service


class DriverCore:
    """All queues of one client.  Public entry points return the actions to carry out."""

    def __init__(
        self,
        config: DriverConfig | None = None,
        *,
        psmid_base: int = 0,
        supports_interrupts: bool = False,
    ) -> None:
        self.cfg = cfg = config or DriverConfig()
        self.ledger = Ledger(psmid_base, cfg.ledger_history)
        self.queues: dict[int, Queue] = {}
        self.irq_ok = supports_interrupts and cfg.use_interrupts
        self.out = Outbox()  # the one writer of actions; what is in flight, by tag
        self.dispatch = Dispatcher(self.ledger, self.out, self.queues, cfg.unavailable_grace)
        clf = Classifier()
        self.verdicts = Verdicts(cfg, self.ledger, self.dispatch, self.out, clf)
        self.machine = QueueMachine(
            cfg, self.ledger, self.out, self.dispatch, self.verdicts, clf, self.queues, irq_ok=self.irq_ok
        )
        self._closed = False

    # ---------------------------------------------------------------- entry points
    def add_queue(self, qid: int, now: float = 0.0) -> list[Action]:
        """Start bringing up ``qid``: reset, interrupts, probe, then service."""
        self.machine.advance(now)
        if qid in self.queues:
            raise CoreMisuse(f"queue {qid_str(qid)} added twice")
        self.machine.add(qid)
        return self.machine.flush()

    def submit(
        self,
        request: Request,
        *,
        idempotent: bool | None = None,
        deadline: float | None = None,
        now: float = 0.0,
        target: frozenset[int] | None = None,
    ) -> tuple[int, list[Action]]:
        """Accept ``request``; returns its request id and the actions to carry out.

        ``deadline`` is relative (seconds from now).  The outcome arrives as a ``Resolve(rid, ...)``.
        ``target`` (qids) pins it: it is placed only on those queues, never failed over; if none of
        them is in service it waits at most ``unavailable_grace``, then ends ``DeviceUnavailable``.
        """
        if self._closed:
            raise CoreMisuse("submit after shutdown")
        machine = self.machine
        machine.advance(now)
        idem = request.idempotent_default if idempotent is None else bool(idempotent)
        rec = self.ledger.open(request, idempotent=idem, mode=request.mode, weight=request.weight)
        if target is not None:
            unknown = sorted(set(target) - self.queues.keys())
            if unknown or not target:  # the client checks this at submit; a core caller gets the same
                err = TargetNotHeld(
                    "target is not one of this client's queues", qid=unknown[0] if unknown else None
                )
                self.verdicts.resolve(rec, Outcome.FAILED, error=err)
                return rec.rid, machine.flush()
            rec.target = frozenset(target)
        dispatch = self.dispatch
        if not dispatch.serving.get(rec.mode) and not dispatch.mode_exists(rec.mode):
            self.verdicts.fail_unavailable(rec, f"no queue of kind {rec.mode!r}")
            return rec.rid, machine.flush()
        if deadline is not None:
            if deadline <= 0:
                err2 = DeadlineExceeded("deadline already passed")
                self.verdicts.resolve(rec, Outcome.UNAVAILABLE, error=err2)
                return rec.rid, machine.flush()
            rec.has_deadline = True
            self.out.arm_after(TimerKey.deadline(rec.rid), deadline, force=True)
        # Work waits on the host only while every serving queue of its kind is full (every flush
        # leaves it so), so a request behind waiting work need not look for a slot.
        waiting = dispatch.waiting_ahead(rec.mode)
        dispatch.enqueue(rec)
        if not waiting or rec.target is not None:  # pinned work may find its queue free
            machine.fill(rec.mode)
        return rec.rid, machine.flush()

    def handle(self, events: Iterable[Any], now: float = 0.0) -> list[Action]:
        """The one entry for transport events: a batch of completions, interrupts, losses and
        restorations, with one flush at the end.

        Transports deliver completions in batches; handling them together lets every queue they
        touched run its state step once instead of once per completion.
        """
        machine = self.machine
        machine.advance(now)
        for ev in events:
            t = type(ev)
            if t is Completion:
                machine.completion(ev.tag, ev.result)
            elif t is Interrupt:
                machine.interrupt(ev.qid)
            elif t is TransportLost:
                machine.transport_lost(
                    ev.tags,
                    permanent=ev.permanent,
                    reason=ev.reason,
                    unsent=ev.unsent,
                    resumable=ev.resumable,
                    scope=ev.scope,
                )
            elif t is PeerRestored:
                machine.peer_restored(ev.reason, resumed=ev.resumed, scope=ev.scope)
            else:
                raise CoreMisuse(f"unknown transport event {ev!r}")
        return machine.flush()

    def on_events(self, events: Iterable[Any], now: float = 0.0) -> list[Action]:
        """Same as :meth:`handle` (the name runners used first)."""
        return self.handle(events, now)

    def on_timer(self, key: tuple[Any, ...], now: float = 0.0) -> list[Action]:
        """The timer ``key`` (a :class:`TimerKey` from an earlier ``ArmTimer``) fired."""
        self.machine.advance(now)
        self.machine.on_timer(key)
        return self.machine.flush()

    @property
    def closed(self) -> bool:
        """After :meth:`shutdown`: :meth:`submit` is refused."""
        return self._closed

    def shutdown(self, now: float = 0.0) -> list[Action]:
        """Close: every undecided request is resolved (``ClientClosed``; may-have-run if sent)."""
        self.machine.advance(now)
        self._closed = True
        self.verdicts.close_all()
        self.out.cancel_all()
        return self.machine.flush()

    # thin entries for one event each (tests and simple runners)
    def on_completion(self, tag: int, result: ApResult, now: float = 0.0) -> list[Action]:
        """The transport answered the command submitted under ``tag``."""
        self.machine.advance(now)
        self.machine.completion(tag, result)
        return self.machine.flush()

    def on_interrupt(self, qid: int, now: float = 0.0) -> list[Action]:
        """An adapter interrupt for ``qid``: a reply may be waiting."""
        self.machine.advance(now)
        self.machine.interrupt(qid)
        return self.machine.flush()

    def on_transport_lost(
        self,
        tags: Iterable[int],
        *,
        permanent: bool,
        reason: str,
        now: float = 0.0,
        unsent: Iterable[int] = (),
        resumable: bool = False,
    ) -> list[Action]:
        """Commands under ``tags`` will never be answered.

        Each is settled now.  An NQAP that provably never left the host (``unsent``) bounces back to
        the backlog.  Any other lost NQAP may have reached the card: it is kept as on the card,
        unconfirmed, so its reply still resolves it if one comes, and the queue's empty-queue and
        reply-timeout checks decide it from the ledger if none does.  A lost DQAP may have taken a
        reply with it: the same checks catch that.  ``permanent`` takes the queues out of service;
        with ``resumable`` what they hold stays undecided for ``cfg.session_grace`` (see
        :class:`apcrypto.core.events.TransportLost`).
        """
        self.machine.advance(now)
        self.machine.transport_lost(
            tags, permanent=permanent, reason=reason, unsent=unsent, resumable=resumable
        )
        return self.machine.flush()

    # ---------------------------------------------------------------- read-only queries
    def stats(self) -> dict[str, Any]:
        """Counts per outcome, per queue state, and slot utilisation per queue (runner's clock)."""
        per_state: dict[str, int] = {}
        queues: dict[str, Any] = {}
        now = self.out.now
        for q in self.queues.values():
            self.machine.occ(q)
            per_state[q.state.value] = per_state.get(q.state.value, 0) + 1
            elapsed = now - q.t0
            queues[qid_str(q.qid)] = {
                "state": q.state.value,
                "mode": q.mode,
                "slots": q.slots,
                "held": q.held,
                "requests": q.requests_total,
                "load": q.load,
                "slot_seconds": q.occ_integral,  # integral of messages held over the runner's clock
                "slot_utilisation": (q.occ_integral / (elapsed * q.slots)) if elapsed > 0 else 0.0,
                "offline_reason": q.offline_reason,
            }
        return {
            "outcomes": dict(self.ledger.outcomes),
            "counters": dict(self.ledger.counters),
            "states": per_state,
            "queues": queues,
            "backlog": self.dispatch.size,
            "in_flight": self.undecided(),
        }

    @property
    def backlog_size(self) -> int:
        """Requests waiting on the host for a slot (the bound callers' submit is checked against)."""
        return self.dispatch.size

    def ready(self) -> bool:
        """Every queue has left bring-up: in service, or offline (what ``wait_ready`` waits for)."""
        return all(q.state.in_service or q.state is QState.OFFLINE for q in self.queues.values())

    def bringing_up(self) -> bool:
        """Some queue is between reset and service (a runner lets virtual time run for it)."""
        return any(not q.state.in_service and q.state is not QState.OFFLINE for q in self.queues.values())

    def undecided(self) -> int:
        """Requests submitted and not yet decided (0: nothing left for a closing client to wait on)."""
        return self.ledger.counters["submitted"] - sum(self.ledger.outcomes.values())

    def queue_states(self) -> dict[int, QueueView]:
        """A read-only snapshot of every queue, by APQN (callers never touch the live records)."""
        return {
            q.qid: QueueView(q.qid, q.state, q.mode, q.slots, q.held, q.offline_reason)
            for q in self.queues.values()
        }
