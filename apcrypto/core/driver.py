"""The sans-I/O driver core: dispatcher, per-queue state machines, ledger, classifier, formatter.

Events in (a submitted request, an instruction's completion, an interrupt, a timer, a lost or
restored transport), actions out (:mod:`apcrypto.core.actions`).  It never sleeps, reads a clock,
draws entropy or touches a socket; runners pass ``now`` (their clock's reading): timers are armed
at absolute deadlines on that clock and utilisation is integrated over it.  Not thread-safe: a
runner serialises calls.

**Everything that decides a queue's next state lives in this module**: the queue machine's table
(``TABLE``, whose cells are the ``_step_*`` functions, as ``ap_jumptable`` holds function
pointers), the completion handlers (one per control instruction, ``_CONTROL_HANDLERS``; NQAP and
DQAP inline on the hot path), the transitions (``_enter`` for the bounded states, ``_become``
between the in-service ones: the only two writers of ``Queue.state``) and the timers that bound
each state.  :mod:`apcrypto.core.queue` holds only the data.

How a request travels: ``submit`` records it in the ledger and appends it to its mode's backlog;
``_fill`` hands backlog heads to the in-service queue with the lowest weighted load that has a free
slot, emitting NQAP; the NQAP's status accepts it (``on_card``), bounces it back to the backlog
(Q_FULL, BUSY, reset in progress: it never left the host), or fails it (message too big); a reply
dequeued by DQAP resolves it, or, for an error reply, goes through the classifier and the reply
formatter.  Work no queue of its kind can take waits at most ``unavailable_grace``.  Every path
ends in exactly one ``Resolve``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from apcrypto.core.actions import Action
from apcrypto.core.classifier import Classifier, Row, Verdict
from apcrypto.core.config import DriverConfig
from apcrypto.core.dispatch import Dispatcher
from apcrypto.core.events import Completion, Interrupt, PeerRestored, TransportLost
from apcrypto.core.formatter import Fate, decide
from apcrypto.core.ledger import Ledger, Outcome, Phase, Record
from apcrypto.core.outbox import Outbox
from apcrypto.core.queue import STATE_LIMITS, QEvent, QState, Queue, Wait
from apcrypto.core.timers import TimerKey
from apcrypto.errors import (
    ApcryptoError,
    BadRequest,
    ClientClosed,
    CoreMisuse,
    DeadlineExceeded,
    DeviceUnavailable,
    Indeterminate,
    TargetNotHeld,
)
from apcrypto.requests import ModExpo, RandomBytes, Request
from apformats.codes import MachineFailureState, ResponseCode
from apformats.errors import FormatError
from apformats.messages import parse_reply
from apformats.results import ApResult, Instr, qid_str

log = logging.getLogger("apcrypto.core")

# Known-answer probe for accelerators: an odd 512-bit modulus and its expected ME result.
_PROBE_MOD = (1 << 511) + 0x2F
_PROBE_EXPECT = pow(2, 65537, _PROBE_MOD).to_bytes(64, "big")

#: Entering one of these states takes back the queue's NQAPs still in the unflushed batch.
_WITHDRAW_ON = frozenset({QState.RESET_START, QState.RESET_WAIT, QState.RECOVERY_WAIT, QState.OFFLINE})
#: States in which an NQAP the card accepts is thrown away by a reset we issued (or nobody collects).
_DISCARDING = frozenset({QState.RESET_START, QState.RESET_WAIT, QState.SETIRQ_WAIT, QState.OFFLINE})


def _probe_request(mode: str) -> tuple[Request, Any] | None:
    if mode == "accel":
        return ModExpo(b"\x02", 65537, _PROBE_MOD), _PROBE_EXPECT
    if mode == "cca":
        return RandomBytes(8), None  # no known answer for random bytes: length and type are checked
    return None


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


class QueueProtocolError(CoreMisuse):
    """The queue machine has no cell for what happened: a bug in the core's table, named like
    h11's LocalProtocolError -- the state, the event and the instruction that led there."""

    def __init__(self, state: QState, event: QEvent | str, instr: Instr | None = None) -> None:
        ev = event.value if isinstance(event, QEvent) else event
        what = f" (after the completion of {instr.name})" if instr is not None else ""
        super().__init__(f"queue machine: no cell for state {state.value!r}, event {ev!r}{what}")
        self.state = state
        self.event = event
        self.instr = instr


class DriverCore:
    """All queues of one client.  Public entry points return the actions to carry out."""

    def __init__(
        self,
        config: DriverConfig | None = None,
        *,
        psmid_base: int = 0,
        supports_interrupts: bool = False,
    ) -> None:
        self.cfg = config or DriverConfig()
        self.ledger = Ledger(psmid_base)
        self._clf = Classifier()
        self.queues: dict[int, Queue] = {}
        self.irq_ok = supports_interrupts and self.cfg.use_interrupts
        self.out = Outbox()  # the one writer of actions; what is in flight, by tag
        self._kicked: set[int] = set()
        self._instr: Instr | None = None  # the instruction whose completion is being handled
        self._refill: set[str] = set()  # modes whose waiting work may be placed at the next flush
        self._park_dirty = False  # something changed that may leave work waiting with no timer
        self._unplaced: dict[str, float] = {}  # mode -> since when no queue of it is in service
        self._now = 0.0
        self._closed = False
        self.dispatch = Dispatcher(self.ledger, self.out, self.queues)
        self._link_suspect = False  # a TransportLost came and no completion since (see _on_reply_timer)

    # ---------------------------------------------------------------- public entry points
    def add_queue(self, qid: int, now: float = 0.0) -> list[Action]:
        """Start bringing up ``qid``: reset, interrupts, probe, then service."""
        self._at(now)
        if qid in self.queues:
            raise CoreMisuse(f"queue {qid_str(qid)} added twice")
        q = Queue(qid, irq_wanted=self.irq_ok, occ_t=now, t0=now)
        self.queues[qid] = q
        self._enter(q, QState.RESET_START)
        self._run(q, QEvent.KICK)
        return self._flush()

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
        self._at(now)
        idem = request.idempotent_default if idempotent is None else bool(idempotent)
        rec = self.ledger.open(request, idempotent=idem, mode=request.mode, weight=request.weight)
        if target is not None:
            unknown = sorted(set(target) - self.queues.keys())
            if unknown or not target:  # the client checks this at submit; a core caller gets the same
                err = TargetNotHeld(
                    "target is not one of this client's queues", qid=unknown[0] if unknown else None
                )
                self._resolve(rec, Outcome.FAILED, error=err)
                return rec.rid, self._flush()
            rec.target = frozenset(target)
        if not self.dispatch.serving.get(rec.mode) and not self.dispatch.mode_exists(rec.mode):
            self._fail_unavailable(rec, f"no queue of kind {rec.mode!r}")
            return rec.rid, self._flush()
        if deadline is not None:
            if deadline <= 0:
                self._resolve(rec, Outcome.UNAVAILABLE, error=DeadlineExceeded("deadline already passed"))
                return rec.rid, self._flush()
            rec.has_deadline = True
            self._arm(TimerKey.deadline(rec.rid), deadline, force=True)
        # Work waits on the host only while every serving queue of its kind is full (every flush
        # leaves it so), so a request behind waiting work need not look for a slot.
        waiting = self.dispatch.waiting_ahead(rec.mode)
        self._enqueue(rec)
        if not waiting or rec.target is not None:  # pinned work may find its queue free
            self._fill(rec.mode)
        return rec.rid, self._flush()

    def on_completion(self, tag: int, result: ApResult, now: float = 0.0) -> list[Action]:
        """The transport answered the command submitted under ``tag``."""
        self._at(now)
        self._completion(tag, result)
        return self._flush()

    def on_events(self, events: Iterable[Any], now: float = 0.0) -> list[Action]:
        """A batch of transport events (completions, interrupts, losses), with one flush at the end.

        Transports deliver completions in batches; handling them together lets every queue they
        touched run its state step once instead of once per completion.
        """
        self._at(now)
        for ev in events:
            t = type(ev)
            if t is Completion:
                self._completion(ev.tag, ev.result)
            elif t is Interrupt:
                q = self.queues.get(ev.qid)
                if q is not None:
                    self._want_read(q)
                    self._kick(q)
            elif t is TransportLost:
                self._transport_lost(
                    ev.tags,
                    permanent=ev.permanent,
                    reason=ev.reason,
                    unsent=ev.unsent,
                    resumable=ev.resumable,
                )
            elif t is PeerRestored:
                self._peer_restored(ev.reason, resumed=ev.resumed)
            else:
                raise CoreMisuse(f"unknown transport event {ev!r}")
        return self._flush()

    def _peer_restored(self, reason: str, *, resumed: bool = False) -> None:
        """The peer is back: re-probe every offline queue now instead of after its back-off.

        A queue that went offline holding work for a session the peer kept (``session_held``) is
        drained first when the session was resumed: its replies are still on the card, and the
        reset that brings a queue back would wipe them.  A new session holds none of them: the
        ledger decides them now."""
        self.ledger.counters["peer_restored"] += 1
        log.info("transport peer restored (%s, resumed=%s): re-probing offline queues", reason, resumed)
        for q in self.queues.values():
            if q.state is QState.OFFLINE and q.session_held:
                if resumed:
                    self.ledger.counters["session_drains"] += 1
                    q.session_held = False
                    self._disarm(TimerKey.grace(q.qid))
                    q.offline_backoff = 0.0
                    q.offline_reason = ""
                    self._enter_recovery(q, card_recovered=True)
                    continue
                self._abandon_on_card(q, "the peer did not resume our session")
            if q.state is QState.OFFLINE:
                q.offline_backoff = 0.0
                self._run(q, QEvent.TIMEOUT)

    def _completion(self, tag: int, result: ApResult) -> None:
        self._link_suspect = False  # an answer came: the link works
        entry = self.out.in_flight.pop(tag, None)
        if entry is None:
            log.warning("completion for unknown tag %d ignored", tag)
            self.ledger.counters["unknown_tags"] += 1
            return
        qid, instr, psmid = entry
        q = self.queues[qid]
        self._occ(q)
        self._instr = instr
        if instr is Instr.NQAP:
            gen = q.gen
            if self._on_nqap(q, tag, psmid, result) and gen == q.gen:
                # accepted, nothing changed state: no slot freed, nothing to do but make sure a
                # poll will come if the interrupt never does (an IDLE queue has no timer armed)
                if q.poll_key not in self.out.armed:
                    self._apply_wait(q, Wait.INTERRUPT)
                return
        elif instr is Instr.DQAP:
            q.dqap_inflight = False
            self._on_dqap(q, result)
        else:
            q.ctl_inflight = False
            handler = _CONTROL_HANDLERS.get(instr)
            if handler is None:
                raise QueueProtocolError(q.state, "completion", instr)
            handler(self, q, result)
        self._kick(q)

    def on_interrupt(self, qid: int, now: float = 0.0) -> list[Action]:
        """An adapter interrupt for ``qid``: a reply may be waiting."""
        self._at(now)
        q = self.queues.get(qid)
        if q is not None:
            self._want_read(q)
            self._kick(q)
        return self._flush()

    def on_timer(self, key: tuple[Any, ...], now: float = 0.0) -> list[Action]:
        """The timer ``key`` (a :class:`TimerKey` from an earlier ``ArmTimer``) fired."""
        self._at(now)
        handler = self._TIMER_HANDLERS.get(key[0]) if key else None
        if handler is None or len(key) != 2:
            raise CoreMisuse(f"unknown timer key {key!r}")
        self.out.fired(key)
        handler(self, key[1])
        return self._flush()

    def _on_poll_timer(self, qid: Any) -> None:
        q = self.queues[qid]
        self._occ(q)
        self._run(q, QEvent.TIMEOUT)

    def _on_limit_timer(self, qid: Any) -> None:
        self._on_limit(self.queues[qid])

    def _on_reply_timeout(self, qid: Any) -> None:
        self._on_reply_timer(self.queues[qid])

    def _on_deadline_timer(self, rid: Any) -> None:
        self._on_deadline(rid)

    #: one handler per timer kind (:data:`apcrypto.core.timers.KINDS`)
    _TIMER_HANDLERS: dict[str, Callable[[DriverCore, Any], None]] = {
        "poll": _on_poll_timer,
        "limit": _on_limit_timer,
        "reply": _on_reply_timeout,
        "deadline": _on_deadline_timer,
        "unavailable": lambda core, mode: core._on_unavailable_timer(mode),
        "target": lambda core, rid: core._on_target_timer(rid),
        "grace": lambda core, qid: core._on_grace_timer(qid),
    }

    def _on_grace_timer(self, qid: Any) -> None:
        """The peer's session grace is over and it did not come back: what its card held is gone."""
        q = self.queues[qid]
        if q.session_held:
            self._abandon_on_card(q, "the peer's session grace ended before it came back")
            if q.state is QState.OFFLINE:
                self._run(q, QEvent.TIMEOUT)  # re-probes were held off while the session was kept

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
        self._at(now)
        self._transport_lost(tags, permanent=permanent, reason=reason, unsent=unsent, resumable=resumable)
        return self._flush()

    def _transport_lost(
        self,
        tags: Iterable[int],
        *,
        permanent: bool,
        reason: str,
        unsent: Iterable[int],
        resumable: bool = False,
    ) -> None:
        keep = permanent and resumable  # the peer keeps our session: its cards may answer later
        self._link_suspect = True  # until the next answer: the card's silence says nothing
        never_sent = set(unsent)
        touched: dict[int, Queue] = {}
        lost_now: list[tuple[Queue, Record]] = []
        for tag in tags:
            entry = self.out.in_flight.pop(tag, None)
            if entry is None:
                continue
            qid, instr, psmid = entry
            q = self.queues[qid]
            touched[qid] = q
            if instr is Instr.NQAP:
                rid = q.sending.pop(tag, None)
                if rid is None:
                    if psmid == q.probe_psmid:  # the health probe
                        if tag in never_sent:
                            q.probe_psmid = None
                        else:
                            q.probe_sent = True
                    # else: its reply came before its status; nothing is left to settle
                    continue
                rec = self.ledger.records.get(rid)
                if rec is None:
                    continue
                if tag in never_sent:
                    self._unload(q, rec)
                    if not rec.resolved:
                        if rec.current is not None:
                            rec.current.fate = "bounced"
                            rec.current.cleared = True
                        self.ledger.counters["bounced"] += 1
                        self._requeue_front(rec)
                elif (permanent and not keep) or q.state in _DISCARDING:
                    # maybe sent, and nobody will ever collect it (the peer is gone, or the queue is
                    # already out of service): the ledger decides now
                    self._unload(q, rec)
                    if rec.current is not None and rec.current.psmid == psmid and not rec.resolved:
                        rec.current.fate = "lost"
                        lost_now.append((q, rec))
                else:
                    # maybe on the card: keep accepting its reply until the queue's checks decide
                    if rec.current is not None and not rec.resolved:
                        rec.current.fate = "on-card"
                        rec.phase = Phase.ON_CARD
                    q.on_card[psmid] = rid
            elif instr is Instr.DQAP:
                q.dqap_inflight = False
            else:
                q.ctl_inflight = False
        if not permanent:
            # the link may have been re-established as a new session, which holds none of the old
            # one's interrupt registrations: register again (held by the transport until it is up)
            for q in self.queues.values():
                if q.state.in_service and q.irq_wanted and not q.ctl_inflight:
                    q.ctl_inflight = True
                    q.irq = False  # poll until the AQIC is confirmed
                    self.ledger.counters["irq_reenabled"] += 1
                    self.out.emit(q.qid, Instr.AQIC, flag=True)
        going = [q for q in touched.values() if permanent and q.state is not QState.OFFLINE]
        for q in going:
            # every touched queue leaves service before any work is decided, so that a re-drive
            # never lands on a queue the same loss is about to take down
            log.warning("queue %s offline: transport lost: %s", qid_str(q.qid), reason)
            self.ledger.counters["offlined"] += 1
            self._enter(q, QState.OFFLINE)
        for q, rec in lost_now:
            self._attempt_failed(rec, q, may_have_run=True, why=f"transport lost: {reason}")
        for q in going:
            self._take_offline(q, f"transport lost: {reason}", keep_on_card=keep)
        if permanent and not keep:
            # the link is gone for good (closed, given up): a session kept for us will never be resumed
            for q in self.queues.values():
                if q.session_held:
                    self._abandon_on_card(q, f"transport lost: {reason}")
        for q in touched.values():
            if not permanent:
                log.info("queue %s: commands lost in transit (%s)", qid_str(q.qid), reason)
            self._kick(q)
        for mode in {q.mode for q in touched.values()}:
            self._refill.add(mode)

    def shutdown(self, now: float = 0.0) -> list[Action]:
        """Close: every undecided request is resolved (``ClientClosed``; may-have-run if sent)."""
        self._at(now)
        self._closed = True
        for rec in list(self.ledger.in_flight()):
            sent = rec.phase in (Phase.SENDING, Phase.ON_CARD)
            err = ClientClosed(
                "client closed before the request was decided" + (" (it may have run)" if sent else ""),
                qid=rec.current.qid if rec.current else None,
                psmid=rec.current.psmid if rec.current else None,
            )
            self._resolve(rec, Outcome.UNAVAILABLE, error=err)
        self.out.cancel_all()
        return self._flush()

    # ---------------------------------------------------------------- queries
    def stats(self) -> dict[str, Any]:
        """Counts per outcome, per queue state, and slot utilisation per queue (runner's clock)."""
        per_state: dict[str, int] = {}
        queues: dict[str, Any] = {}
        for q in self.queues.values():
            self._occ(q)
            per_state[q.state.value] = per_state.get(q.state.value, 0) + 1
            elapsed = self._now - q.t0
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
            "in_flight": self.ledger.counters["submitted"] - sum(self.ledger.outcomes.values()),
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

    def handle(self, events: Iterable[Any], now: float = 0.0) -> list[Action]:
        """The one entry for transport events (same as :meth:`on_events`)."""
        return self.on_events(events, now)

    # ---------------------------------------------------------------- plumbing
    def _flush(self) -> list[Action]:
        while self._kicked or self._refill:
            for qid in list(self._kicked):
                self._kicked.discard(qid)
                self._run(self.queues[qid], QEvent.KICK)
            while self._refill:
                self._fill(self._refill.pop())
        if self._park_dirty:
            self._check_parked()
        return self.out.take()

    def _kick(self, q: Queue) -> None:
        self._kicked.add(q.qid)

    def _arm(self, key: TimerKey, delay: float, *, force: bool = False) -> None:
        """Arm ``key`` to fire ``delay`` seconds from now, as an absolute deadline on the runner's
        clock.  Without ``force`` an earlier-or-equal pending deadline is kept."""
        self.out.arm(key, self._now + delay, force=force)

    def _disarm(self, key: TimerKey) -> None:
        self.out.disarm(key)

    def _at(self, now: float) -> None:
        """Time moves to ``now`` (every entry point): each queue's occupancy is integrated up to it
        first, with the ``held`` it had since the last entry.  ``held`` changes only inside entry
        points, so the integral is exact; integrating after a change (as it used to, on the next
        completion) counted the idle gap before a submit as occupied."""
        self._now = now
        for q in self.queues.values():
            self._occ(q)

    def _occ(self, q: Queue) -> None:
        dt = self._now - q.occ_t
        if dt > 0:
            q.occ_integral += q.held * dt
            q.occ_t = self._now

    # ---------------------------------------------------------------- the state machine
    def _enter(self, q: Queue, state: QState) -> None:
        if q.state is not state:
            log.debug("queue %s: %s -> %s", qid_str(q.qid), q.state.value, state.value)
            if q.state.in_service != state.in_service:
                self.dispatch.service_changed(q.mode, state.in_service)
                self._park_dirty = True
            if q.mf_recovery and state is not QState.RECOVERY_WAIT:
                q.mf_recovery = False
                self.dispatch.mf_leave(q.card)
                self._park_dirty = True
                self._refill.add(q.mode)  # its card's other queues may take work again
        if state in _WITHDRAW_ON:
            self._withdraw(q)
        q.state = state
        q.gen += 1
        limit = STATE_LIMITS.get(state)
        if limit is not None:
            q.limit_gen = q.gen
            self._arm(q.limit_key, getattr(self.cfg, limit), force=True)
        if state.in_service and q.held:
            self._arm(q.reply_key, self.cfg.reply_timeout)

    def _run(self, q: Queue, event: QEvent) -> None:
        """The kernel's ``ap_sm_event_loop``: run the cell, again while it says AGAIN."""
        idx = 0 if event is QEvent.KICK else 1  # TABLE[state][event], precomputed per state
        while True:
            try:
                step = q.state.jump[idx]
            except (AttributeError, IndexError):
                raise QueueProtocolError(q.state, event, self._instr) from None
            wait = step(self, q)
            if wait is not Wait.AGAIN:
                break
            idx = 0
        self._apply_wait(q, wait)

    def _apply_wait(self, q: Queue, wait: Wait) -> None:
        key = q.poll_key
        if wait is Wait.NONE:
            return
        if wait is Wait.HIGH:
            self._arm(key, self.cfg.poll_high)
        elif wait is Wait.LOW:
            self._arm(key, self.cfg.poll_low)
        elif wait is Wait.INTERRUPT:
            self._arm(key, self.cfg.irq_safety_poll if q.irq else self.cfg.poll_high)

    def _settle(self, q: Queue) -> None:
        """Pick IDLE / WORKING / QUEUE_FULL from the counts while in service."""
        if not q.state.in_service:
            return
        if q.held == 0:
            new = QState.IDLE
        elif q.has_free_slot():
            new = QState.WORKING
        else:
            new = QState.QUEUE_FULL
        if new is not q.state:
            self._become(q, new)

    def _become(self, q: Queue, state: QState) -> None:
        """Move between the in-service states (IDLE / WORKING / QUEUE_FULL): no limit, no withdraw."""
        q.state = state
        q.gen += 1

    # -- steps (the cells of TABLE, below the class) --
    def _step_nop(self, q: Queue) -> Wait:
        return Wait.NONE

    def _step_reset(self, q: Queue) -> Wait:
        if not q.ctl_inflight:
            self._abandon_on_card(q, "queue reset")
            q.ctl_inflight = True
            zap = q.reset_attempts >= 2  # RAPQ twice, then ZAPQ (DESIGN §4.4)
            self.out.emit(q.qid, Instr.ZAPQ if zap else Instr.RAPQ)
        return Wait.LOW

    def _step_reset_once(self, q: Queue) -> Wait:
        if q.issued_gen == q.gen:
            return Wait.LOW
        q.issued_gen = q.gen
        return self._step_reset(q)

    def _step_wait_low(self, q: Queue) -> Wait:
        return Wait.LOW

    def _step_tapq(self, q: Queue) -> Wait:
        if not q.ctl_inflight:
            q.ctl_inflight = True
            self.out.emit(q.qid, Instr.TAPQ, flag=True)
        return Wait.LOW

    def _step_probe_once(self, q: Queue) -> Wait:
        if q.issued_gen == q.gen:
            return self._step_await(q) if q.held else Wait.HIGH
        q.issued_gen = q.gen
        return self._step_probe(q)

    def _step_probe(self, q: Queue) -> Wait:
        if not self.cfg.health_probe:
            self._to_service(q)
            return Wait.AGAIN
        if not q.probe_sent and q.probe_psmid is None:
            probe = _probe_request(q.mode)
            if probe is None:
                self._to_service(q)
                return Wait.AGAIN
            q.probe_psmid = self.ledger.new_psmid()
            self.out.emit(q.qid, Instr.NQAP, psmid=q.probe_psmid, message=probe[0].message(q.domain))
            return Wait.HIGH
        if q.probe_sent:
            return self._step_read(q)
        return Wait.HIGH  # probe NQAP still in flight

    def _step_await(self, q: Queue) -> Wait:
        return Wait.INTERRUPT if q.held else Wait.NONE

    def _step_write(self, q: Queue) -> Wait:
        self._fill_queue(q)
        self._settle(q)
        return Wait.INTERRUPT if q.held else Wait.NONE

    def _step_read(self, q: Queue) -> Wait:
        if q.held == 0:
            return Wait.NONE
        if not q.dqap_inflight:
            q.dqap_inflight = True
            self.out.emit(q.qid, Instr.DQAP)
        return Wait.INTERRUPT

    def _step_read_write(self, q: Queue) -> Wait:
        w = self._step_write(q)
        return min(w, self._step_read(q)) if q.state.in_service else w

    def _step_drain_once(self, q: Queue) -> Wait:
        if q.issued_gen == q.gen:
            return Wait.LOW
        q.issued_gen = q.gen
        return self._step_drain(q)

    def _step_drain(self, q: Queue) -> Wait:
        if not q.dqap_inflight:
            q.dqap_inflight = True
            self.out.emit(q.qid, Instr.DQAP)
        return Wait.LOW

    def _step_drain_probe(self, q: Queue) -> Wait:
        if not q.card_recovered and not q.ctl_inflight:
            q.ctl_inflight = True
            self.out.emit(q.qid, Instr.TAPQ, flag=True)
        return self._step_drain(q)

    def _step_reprobe(self, q: Queue) -> Wait:
        if q.session_held:
            # a re-probe that succeeds resets the queue, wiping the replies the peer keeps for us:
            # wait for PeerRestored or the session grace (both re-probe after deciding)
            return Wait.NONE
        if not q.ctl_inflight:
            q.reprobe_due = False
            q.ctl_inflight = True
            self.out.emit(q.qid, Instr.TAPQ, flag=True)
            return Wait.NONE  # the TAPQ's completion re-arms the next probe
        # a control instruction is still unanswered: owe the re-probe.  Its completion (or its
        # loss) kicks the queue, which pays it; the timer is a backstop in case neither comes soon.
        q.reprobe_due = True
        self._arm(q.poll_key, max(q.offline_backoff, self.cfg.offline_probe_interval), force=True)
        return Wait.NONE

    def _step_reprobe_if_due(self, q: Queue) -> Wait:
        if q.reprobe_due and not q.ctl_inflight:
            return self._step_reprobe(q)
        return Wait.NONE

    def _want_read(self, q: Queue) -> None:
        if q.held and not q.dqap_inflight and q.state is not QState.OFFLINE:
            q.dqap_inflight = True
            self.out.emit(q.qid, Instr.DQAP)

    # -- transitions --
    def _to_service(self, q: Queue) -> None:
        q.reset_attempts = 0
        q.offline_backoff = 0.0
        q.offline_reason = ""
        q.probe_psmid = None
        q.probe_sent = False
        self._disarm(q.limit_key)
        self._enter(q, QState.IDLE)
        self._settle(q)
        log.info("queue %s (%s, %d slots) in service", qid_str(q.qid), q.mode, q.slots)
        self._fill(q.mode)

    def _start_reset(self, q: Queue, why: str) -> None:
        log.info("queue %s: reset (%s)", qid_str(q.qid), why)
        q.probe_psmid = None
        q.probe_sent = False
        q.full_hold = False
        q.card_recovered = False
        self._enter(q, QState.RESET_START)
        self._kick(q)

    def _reset_failed(self, q: Queue, why: str) -> None:
        q.reset_attempts += 1
        if q.reset_attempts >= self.cfg.max_reset_attempts:
            self._take_offline(q, f"{why}; {q.reset_attempts} reset attempts failed")
        else:
            self._start_reset(q, why)

    def _enter_recovery(self, q: Queue, *, card_recovered: bool, mf: bool = False) -> None:
        if q.state is not QState.RECOVERY_WAIT:
            log.info("queue %s: card in machine-failure recovery; draining stored replies", qid_str(q.qid))
            q.card_recovered = card_recovered
            self.ledger.counters["recoveries"] += 1
            self._enter(q, QState.RECOVERY_WAIT)
            self._kick(q)
        else:
            q.card_recovered = q.card_recovered or card_recovered
        if mf and not q.mf_recovery:
            q.mf_recovery = True
            self.dispatch.mf_enter(q.card)

    def _take_offline(self, q: Queue, why: str, *, keep_on_card: bool = False) -> None:
        if q.state is not QState.OFFLINE:
            log.warning("queue %s offline: %s", qid_str(q.qid), why)
            self.ledger.counters["offlined"] += 1
        q.offline_reason = why
        q.offline_after_drain = ""
        q.probe_psmid = None
        q.probe_sent = False
        q.full_hold = False
        self._enter(q, QState.OFFLINE)
        self._disarm(q.limit_key)
        if keep_on_card and q.on_card:
            # the peer keeps our session for its grace: what the card holds may still come back
            # (PeerRestored resumed=True drains it); the grace timer bounds the wait
            q.session_held = True
            q.probe_psmid = None
            self._arm(TimerKey.grace(q.qid), self.cfg.session_grace, force=True)
        else:
            self._abandon_on_card(q, why)
        q.offline_backoff = min(
            max(q.offline_backoff * 2, self.cfg.offline_probe_interval), self.cfg.offline_probe_max
        )
        self._arm(q.poll_key, q.offline_backoff, force=True)
        if q.mode == "unknown":  # lost during bring-up: requests of every kind counted on it
            self._fail_dead_kinds()
        else:
            # every queue of its kind offline or not: waiting work waits its grace for one to come
            # back (a re-probe or PeerRestored), never less (issue 8 §1; _check_parked arms it)
            self._park_dirty = True
            self._fill(q.mode)

    def _fail_dead_kinds(self) -> None:
        """Fail the waiting work of every kind that no queue can serve any more."""
        for mode in sorted(self.dispatch.modes()):
            if mode != "unknown" and not self.dispatch.mode_exists(mode):
                self._fail_backlog(mode, f"no queue of kind {mode!r}")
        self._park_dirty = True  # kinds whose queues are all offline wait their grace

    def _on_limit(self, q: Queue) -> None:
        if q.limit_gen != q.gen:
            return  # the state it was armed for has been left since
        st = q.state
        if st is QState.SETIRQ_WAIT:
            log.info("queue %s: interrupts not confirmed; polling instead", qid_str(q.qid))
            q.irq_wanted = False
            self._enter(q, QState.PROBE)
            self._kick(q)
        elif st is QState.RECOVERY_WAIT:
            self._take_offline(q, "card recovery did not finish in time")
        elif st in (QState.RESET_START, QState.RESET_WAIT, QState.PROBE):
            self._reset_failed(q, f"{st.value} timed out")

    def _on_reply_timer(self, q: Queue) -> None:
        if not q.state.in_service:
            return
        if q.held and q.progress == q.progress_seen:
            if self._link_suspect:
                # The link is down (lost, nothing answered since): no reply proves nothing about the
                # card, and a reset now would throw away the replies a resumed session still holds
                # for us (the server keeps them for its grace).  Wait another period; the
                # transport's peer_deadline bounds this (it then reports the loss as permanent).
                self.ledger.counters["reply_timeouts_deferred"] += 1
                self._arm(q.reply_key, self.cfg.reply_timeout, force=True)
                return
            log.warning("queue %s: no reply for %.3gs; resetting", qid_str(q.qid), self.cfg.reply_timeout)
            self.ledger.counters["reply_timeouts"] += 1
            self._start_reset(q, "reply timeout")
            return
        q.progress_seen = q.progress
        if q.held:
            self._arm(q.reply_key, self.cfg.reply_timeout, force=True)

    # ---------------------------------------------------------------- completions
    def _on_tapq(self, q: Queue, res: ApResult) -> None:
        st = res.status
        row = self._clf.rc("TAPQ", st.response_code)
        v = row.verdict
        if q.state is QState.OFFLINE:
            if v is Verdict.PROCEED:
                log.info("queue %s answers again; bringing it back", qid_str(q.qid))
                q.reset_attempts = 0
                self._start_reset(q, "re-probe after offline")
            else:
                q.offline_backoff = min(
                    max(q.offline_backoff * 2, self.cfg.offline_probe_interval), self.cfg.offline_probe_max
                )
                self._arm(q.poll_key, q.offline_backoff, force=True)
            return
        if v is Verdict.TAKE_OFFLINE:
            self._take_offline(q, f"TAPQ answered {st.rc_name()}")
            return
        if q.state is QState.RECOVERY_WAIT:
            if v is Verdict.PROCEED:
                q.card_recovered = True
                if st.replies_waiting:
                    self._want_read(q)
                elif st.queue_empty:
                    self._recovery_drained(q)
            return
        if v is not Verdict.PROCEED:
            return  # reset or SE change in progress, or busy: keep polling (state limit bounds it)
        if q.state is QState.RESET_WAIT:
            if res.hwinfo is not None:
                self._learn(q, res)
            if q.irq_wanted:
                q.ctl_inflight = True
                self.out.emit(q.qid, Instr.AQIC, flag=True)
                self._enter(q, QState.SETIRQ_WAIT)
            else:
                self._enter(q, QState.PROBE)
        elif q.state is QState.SETIRQ_WAIT:
            q.irq = st.irq_enabled
            if st.irq_enabled:
                self._enter(q, QState.PROBE)

    def _learn(self, q: Queue, res: ApResult) -> None:
        hw = res.hwinfo
        assert hw is not None
        q.hw = hw
        q.slots = hw.slots
        q.max_msg = hw.max_msg_size
        if q.mode != hw.mode:
            self.dispatch.learn_mode(q, hw.mode)
            self._fail_dead_kinds()  # work of a kind this queue was counted for may have none left

    def _on_reset(self, q: Queue, res: ApResult) -> None:
        row = self._clf.rc("RESET", res.status.response_code)
        if q.state is QState.OFFLINE:
            return
        if row.verdict is Verdict.PROCEED:
            q.irq = False
            if q.state is QState.RESET_START:
                self._enter(q, QState.RESET_WAIT)
        elif row.verdict is Verdict.TAKE_OFFLINE:
            self._take_offline(q, f"reset answered {res.status.rc_name()}")
        # retry-same (busy): the LOW poll issues the reset again

    def _on_aqic(self, q: Queue, res: ApResult) -> None:
        row = self._clf.rc("AQIC", res.status.response_code)
        if q.state.in_service:  # a re-enable (see _check_irq and _transport_lost)
            if res.status.response_code in (ResponseCode.NORMAL, ResponseCode.OTHERWISE_CHANGED):
                q.irq = True
                return
            if row.verdict is not Verdict.TAKE_OFFLINE:
                q.irq = False
                if row.verdict is Verdict.PROCEED:
                    q.irq_wanted = False  # this path will not give us interrupts: poll from now on
                return
        if row.verdict is Verdict.TAKE_OFFLINE:
            self._take_offline(q, f"AQIC answered {res.status.rc_name()}")
        elif row.verdict is not Verdict.PROCEED and q.state is QState.SETIRQ_WAIT:
            self._enter(q, QState.RESET_WAIT)  # reset still running: AQIC again after TAPQ
        elif res.status.response_code != ResponseCode.NORMAL and q.state is QState.SETIRQ_WAIT:
            q.irq_wanted = False  # no interrupts on this path: poll
            self._enter(q, QState.PROBE)

    def _on_nqap(self, q: Queue, tag: int, psmid: int, res: ApResult) -> bool:
        """Handle an NQAP's status; True when it was simply accepted (the common case)."""
        st = res.status
        row = self._clf.rc("NQAP", st.response_code)
        v = row.verdict
        if tag not in q.sending:
            if psmid != q.probe_psmid:
                # its reply was delivered before this status arrived: nothing is left to do
                self.ledger.counters["status_after_reply"] += 1
                return False
            # the health probe
            if v is Verdict.PROCEED:
                q.probe_sent = True
                if st.replies_waiting:
                    self._want_read(q)
            elif v is Verdict.TAKE_OFFLINE:
                self._take_offline(q, f"probe NQAP answered {st.rc_name()}")
            elif q.state is QState.PROBE:
                q.probe_psmid = None  # busy / reset in progress: try the probe again
                if v is Verdict.RETRY_SAME and st.response_code == ResponseCode.BUSY:
                    self._enter_recovery(q, card_recovered=False)
            return False
        rec = self.ledger.records[q.sending.pop(tag)]
        if v is Verdict.PROCEED:
            att = rec.current
            assert att is not None
            if rec.resolved:
                # decided while its NQAP was in flight (deadline): it is on the card now; keep the slot
                att.fate = "late"
                q.on_card[att.psmid] = rec.rid
            elif q.state in _DISCARDING:
                # accepted by a queue we already gave up on (or are resetting, which throws it
                # away): it may run; nobody will collect it
                q.on_card[att.psmid] = rec.rid
                self._abandon_on_card(q, "accepted by a queue taken out of service")
                return False
            else:
                att.fate = "on-card"
                rec.phase = Phase.ON_CARD
                q.on_card[att.psmid] = rec.rid
            q.requests_total += 1
            if st.replies_waiting:
                self._want_read(q)
            self._settle(q)
            return True
        # the card did not take it: it never left the host
        self._unload(q, rec)
        att = rec.current
        if att is not None:
            att.fate = "bounced"
            att.cleared = True
        if v is Verdict.FAIL_CALLER:
            self._resolve(
                rec,
                Outcome.FAILED,
                error=BadRequest(
                    f"the card refused the request ({st.rc_name()})",
                    qid=q.qid,
                    psmid=att.psmid if att else None,
                    response_code=st.response_code,
                ),
            )
            return False
        self.ledger.counters["bounced"] += 1
        self._requeue_front(rec)
        if v is Verdict.BACKPRESSURE:
            q.full_hold = True
            self._settle(q)
            self._want_read(q)
        elif v is Verdict.RETRY_SAME:
            if st.response_code == ResponseCode.BUSY:
                self._enter_recovery(q, card_recovered=False)
            elif st.response_code == ResponseCode.RESET_IN_PROGRESS:
                if q.state.in_service:
                    self._external_reset(q)
            elif q.state.in_service:
                # another transient state (SE state change in progress): back off as for BUSY;
                # an immediate re-NQAP to the same queue would spin without time passing
                self._enter_recovery(q, card_recovered=False)
        elif v is Verdict.RESET_QUEUE:
            self._start_reset(q, f"NQAP answered {st.rc_name()}")
        else:
            self._take_offline(q, f"NQAP answered {st.rc_name()}")
        # it never left the host: another queue of its kind with a free slot may take it now
        self._fill(rec.mode)
        return False

    def _external_reset(self, q: Queue) -> None:
        """Somebody else reset the queue: everything it held is gone, fate unknown."""
        self.ledger.counters["external_resets"] += 1
        self._abandon_on_card(q, "queue reset by someone else")
        q.probe_psmid = None
        q.probe_sent = False
        self._enter(q, QState.RESET_WAIT)
        self._kick(q)

    def _check_irq(self, q: Queue, irq_enabled: bool) -> None:
        """Every status word says whether interrupts are on; if they went off behind our back (a
        reconnected session, an external reset), turn them on again, as the kernel does when a read
        finds them off.  Until then the queue polls (its waits follow ``q.irq``)."""
        q.irq = irq_enabled
        if irq_enabled:
            q.irq_reissued = False
        elif q.irq_wanted and not q.ctl_inflight:
            if q.irq_reissued:  # AQIC said yes, the card still says no: stop asking, poll
                q.irq_wanted = False
                return
            q.irq_reissued = True
            q.ctl_inflight = True
            self.ledger.counters["irq_reenabled"] += 1
            self.out.emit(q.qid, Instr.AQIC, flag=True)

    def _on_dqap(self, q: Queue, res: ApResult) -> None:
        st = res.status
        row = self._clf.rc("DQAP", st.response_code)
        v = row.verdict
        if q.irq is not st.irq_enabled and q.state.in_service and v is not Verdict.TAKE_OFFLINE:
            self._check_irq(q, st.irq_enabled)
        if v is Verdict.PROCEED:
            q.progress += 1
            if q.full_hold:
                q.full_hold = False
            self._deliver(q, res.psmid, res.reply)
            if st.replies_waiting:
                self._want_read(q)
            elif q.state is QState.RECOVERY_WAIT and st.queue_empty and q.card_recovered:
                self._recovery_drained(q)
            self._settle(q)
            return
        if v is Verdict.BACKPRESSURE:  # no reply pending
            if st.queue_empty:
                q.full_hold = False
                if q.state is QState.RECOVERY_WAIT:
                    if q.card_recovered:
                        self._recovery_drained(q)
                elif q.on_card or q.probe_sent:
                    self.ledger.counters["card_forgot"] += 1
                    if q.state is QState.PROBE:
                        self._reset_failed(q, "probe lost by the card")
                    else:
                        self._abandon_on_card(q, "card reports the queue empty")
                        self._settle(q)
            return
        if q.state is QState.OFFLINE:
            return
        if v is Verdict.RETRY_SAME:
            if st.response_code == ResponseCode.BUSY:
                self._enter_recovery(q, card_recovered=False)
            elif st.response_code == ResponseCode.RESET_IN_PROGRESS and q.state not in (
                QState.RESET_START,
                QState.RESET_WAIT,
            ):
                self._external_reset(q)
        elif v is Verdict.RESET_QUEUE:
            self._start_reset(q, f"DQAP answered {st.rc_name()}")
        else:
            self._take_offline(q, f"DQAP answered {st.rc_name()}")

    def _recovery_drained(self, q: Queue) -> None:
        if q.sending:
            # an NQAP sent before the failure is still in flight: the card may take it after this
            # status was read; resetting now would throw it away after it started.  The next
            # drain poll looks again once its status is in.
            return
        self.ledger.counters["recoveries_drained"] += 1
        self._abandon_on_card(q, "not among the card's stored replies")
        if q.offline_after_drain:
            why, q.offline_after_drain = q.offline_after_drain, ""
            self._take_offline(q, why)
        else:
            self._start_reset(q, "stored replies drained after machine failure")

    # ---------------------------------------------------------------- replies
    def _deliver(self, q: Queue, psmid: int, data: bytes) -> None:
        if psmid == q.probe_psmid:  # (its NQAP status may not be in yet: the reply proves it ran)
            self._probe_reply(q, data)
            return
        rid = q.on_card.pop(psmid, None)
        if rid is None:
            rid = self._reply_before_status(q, psmid)
        if rid is None:
            self.ledger.counters["stray_replies"] += 1
            log.warning("queue %s: reply for unknown psmid %#x dropped", qid_str(q.qid), psmid)
            return
        rec = self.ledger.records.get(rid)
        if rec is None:
            self.ledger.counters["late_replies"] += 1
            self._late_reply_says(q, data)
            return
        self._unload(q, rec)
        if rec.resolved:
            self.ledger.counters["late_replies"] += 1
            log.info("queue %s: late reply for decided request %d dropped", qid_str(q.qid), rid)
            self._late_reply_says(q, data)
            return
        att = rec.current
        assert att is not None and att.psmid == psmid
        try:
            reply = parse_reply(data)
        except FormatError as exc:
            self._protocol_anomaly(q, rec, f"malformed reply: {exc}")
            return
        if reply.kind == "ok":
            try:
                value = rec.request.decode(reply)
            except ValueError as exc:
                self._protocol_anomaly(q, rec, f"reply does not fit the request: {exc}")
                return
            att.fate = "completed"
            self._resolve(rec, Outcome.COMPLETED, value=value)
            return
        if reply.msg_type == 0x86 and reply.reply_code == 0:
            row = self._clf.cca(reply.rtcode or 0)
        else:
            row = self._clf.reply(reply.reply_code, reply.mf_state)
        self._error_reply(q, rec, row, reply)

    def _error_reply(self, q: Queue, rec: Record, row: Row, reply: Any) -> None:
        att = rec.current
        assert att is not None
        codes = {
            "qid": q.qid,
            "psmid": att.psmid,
            "reply_code": reply.reply_code,
            "mf_state": int(reply.mf_state) if reply.mf_state is not None else None,
        }
        v = row.verdict
        if v is Verdict.FAIL_CALLER:
            att.fate = "error"
            extra = f" (CCA rc {reply.rtcode}/rs {reply.rscode})" if reply.msg_type == 0x86 else ""
            self._resolve(
                rec,
                Outcome.FAILED,
                error=BadRequest(f"card rejected the request: {row.note}{extra}", **codes),
            )
            return
        if v is Verdict.MACHINE_FAILURE:
            att.fate = (
                "mf-pending" if reply.mf_state == MachineFailureState.REQUEST_PENDING else "mf-in-process"
            )
            att.cleared = not row.may_have_run
            self.ledger.counters["mf_replies"] += 1
            # out of service first (and its card with it): the re-drive must find a queue that is
            # really in service, never this one nor its card's others, which are failing too
            self._enter_recovery(q, card_recovered=True, mf=True)
            self._attempt_failed(rec, q, may_have_run=row.may_have_run, why="machine failure", codes=codes)
            return
        att.fate = "error"
        # not cleared, even when the card says it refused the message unexecuted: the card took it
        # and an engine picked it up, so a later deadline says may_have_run=True (the contract of
        # DeadlineExceeded: "handed to a card"); only never-sent and request-pending attempts clear.
        # The queue's consequence first, so that a re-drive never picks the queue it failed on
        if v is Verdict.RESET_QUEUE:
            self._start_reset(q, row.note)
        elif v is Verdict.TAKE_OFFLINE:
            # the card still answers: collect what it holds for us first (no new work meanwhile),
            # then take the queue out of service; only the unreadable reply's request is in doubt
            q.offline_after_drain = row.note
            self._enter_recovery(q, card_recovered=True)
        self._attempt_failed(
            rec, q, may_have_run=row.may_have_run, why=f"error reply: {row.note}", codes=codes
        )

    def _late_reply_says(self, q: Queue, data: bytes) -> None:
        """A reply for a request already decided (its deadline came first) is not delivered, but
        what it says about the queue still counts: a machine-failure reply means the card failed
        and holds more such replies; the queue must not take new work until it has recovered (campaign
        seeds 369 and 10008).  A queue already out of service is being handled by its own machine."""
        if not q.state.in_service:
            return
        try:
            reply = parse_reply(data)
        except FormatError:
            return
        if reply.kind == "ok" or (reply.msg_type == 0x86 and reply.reply_code == 0):
            return
        v = self._clf.reply(reply.reply_code, reply.mf_state).verdict
        if v is Verdict.MACHINE_FAILURE:
            self.ledger.counters["mf_replies"] += 1
            self._enter_recovery(q, card_recovered=True, mf=True)
        elif v is Verdict.RESET_QUEUE:
            self._start_reset(q, "late error reply")
        elif v is Verdict.TAKE_OFFLINE:
            q.offline_after_drain = "late error reply: safe default"
            self._enter_recovery(q, card_recovered=True)

    def _reply_before_status(self, q: Queue, psmid: int) -> int | None:
        """A reply for one of our requests whose NQAP status has not come (yet, or ever: the status
        frame was lost): the card took it, so it is ours to deliver.  Returns its request id."""
        rec = self.ledger.record_for_psmid(psmid)
        att = rec.current if rec is not None else None
        if rec is None or att is None or att.psmid != psmid or att.qid != q.qid:
            return None
        for tag, rid in q.sending.items():
            if rid == rec.rid:
                del q.sending[tag]
                self.ledger.counters["reply_before_status"] += 1
                q.requests_total += 1
                if not rec.resolved:
                    att.fate = "on-card"
                    rec.phase = Phase.ON_CARD
                return rid
        return None

    def _protocol_anomaly(self, q: Queue, rec: Record, why: str) -> None:
        """The card answered something we cannot read: it ran the request, the result is lost."""
        self.ledger.counters["protocol_anomalies"] += 1
        att = rec.current
        if att is not None:
            att.fate = "error"
        self._attempt_failed(rec, q, may_have_run=True, why=why)
        self._start_reset(q, why)

    def _probe_reply(self, q: Queue, data: bytes) -> None:
        q.probe_sent = False
        q.probe_psmid = None
        if q.state is not QState.PROBE:
            return
        probe = _probe_request(q.mode)
        ok = False
        try:
            reply = parse_reply(data)
            if reply.kind == "ok" and probe is not None:
                value = probe[0].decode(reply)
                ok = probe[1] is None or value == probe[1]
            elif reply.kind != "ok" and reply.reply_code == 0x10:
                self._enter_recovery(q, card_recovered=True, mf=True)
                return
        except (FormatError, ValueError):
            ok = False
        if ok:
            self._to_service(q)
        else:
            self._reset_failed(q, "health probe answered wrong")

    # ---------------------------------------------------------------- ledger decisions
    def _attempt_failed(
        self,
        rec: Record,
        q: Queue,
        *,
        may_have_run: bool,
        why: str,
        codes: dict[str, Any] | None = None,
    ) -> None:
        if rec.resolved:
            return
        fate = decide(
            may_have_run=may_have_run,
            idempotent=rec.idempotent,
            redrives=rec.redrives,
            max_redrives=self.cfg.max_redrives,
        )
        codes = codes or {"qid": q.qid, "psmid": rec.current.psmid if rec.current else None}
        if fate is Fate.REDRIVE:
            rec.redrives += 1
            rec.avoid_qid = q.qid
            self.ledger.counters["redriven"] += 1
            self._requeue_front(rec)  # (waits its grace if no queue of its kind is in service)
            self._fill(rec.mode)
        elif fate is Fate.INDETERMINATE:
            self._resolve(
                rec,
                Outcome.INDETERMINATE,
                error=Indeterminate(f"request may have run on a failed card ({why})", reason=why, **codes),
            )
        else:
            self._resolve(
                rec,
                Outcome.UNAVAILABLE,
                error=DeviceUnavailable(f"re-drive budget spent ({why})", **codes),
            )

    def _abandon_on_card(self, q: Queue, why: str) -> None:
        """The card will never answer what it holds for us: decide each from the ledger."""
        if q.session_held:
            q.session_held = False
            self._disarm(TimerKey.grace(q.qid))
        q.probe_sent = False
        q.probe_psmid = None
        if not q.on_card:
            return
        held = list(q.on_card.items())
        q.on_card.clear()
        for psmid, rid in held:
            rec = self.ledger.records.get(rid)
            if rec is None:
                continue
            self._unload(q, rec)
            att = rec.current
            if att is not None and att.psmid == psmid and not rec.resolved:
                att.fate = "lost"
                self._attempt_failed(rec, q, may_have_run=True, why=why)

    # ---------------------------------------------------------------- dispatch
    def _enqueue(self, rec: Record) -> None:
        self.dispatch.enqueue(rec, self._now)
        if rec.target is not None:
            self._arm(TimerKey.target(rec.rid), self.cfg.unavailable_grace, force=True)
        if not self.dispatch.serving.get(rec.mode):
            self._park_dirty = True

    def _requeue_front(self, rec: Record) -> None:
        """Back to the host, ahead of new work (it has waited already), in the order it bounced."""
        self.dispatch.requeue_front(rec, self._now)
        self._park_dirty = True
        if rec.target is not None:  # re-driven or bounced: back to its own APQN only, within the grace
            self._arm(TimerKey.target(rec.rid), self.cfg.unavailable_grace, force=True)

    def _on_target_timer(self, rid: int) -> None:
        """A targeted request has waited ``unavailable_grace`` on the host: if none of its APQNs is
        in service it ends ``DeviceUnavailable`` (never failed over); if one is, it is only busy, so
        the request waits another grace (its deadline, if any, still bounds it)."""
        rec = self.ledger.records.get(rid)
        if rec is None or rec.resolved or rec.phase is not Phase.QUEUED or rec.target is None:
            return  # placed meanwhile (a later bounce re-arms) or decided
        if self.dispatch.target_in_service(rec):
            self._arm(TimerKey.target(rid), self.cfg.unavailable_grace, force=True)
            return
        self.dispatch.size -= 1  # it stays in its deque, skipped lazily, but waits no more
        grace = self.cfg.unavailable_grace
        names = ", ".join(qid_str(t) for t in sorted(rec.target))
        self._resolve(
            rec,
            Outcome.UNAVAILABLE,
            error=DeviceUnavailable(
                f"targeted APQN {names} did not come into service within {grace:g} s (no failover)",
                qid=min(rec.target),
            ),
        )

    def _withdraw(self, q: Queue) -> None:
        """Take back the NQAPs for ``q`` that are still in this flush's batch: they have not left the
        host, and the queue is leaving service (a reset or recovery in the same batch would throw
        them away after they started).  Requests go back to the host as never sent."""
        for c in self.out.withdraw(q.qid, Instr.NQAP):
            rid = q.sending.pop(c.tag, None)
            if rid is None:  # the health probe: it will be issued again in its own state
                if c.psmid == q.probe_psmid:
                    q.probe_psmid = None
                continue
            rec = self.ledger.records.get(rid)
            if rec is None:
                continue
            self._unload(q, rec)
            att = rec.current
            if att is not None and att.psmid == c.psmid:
                att.fate = "bounced"
                att.cleared = True
            if not rec.resolved:
                self.ledger.counters["withdrawn"] += 1
                self._requeue_front(rec)
                self._refill.add(rec.mode)

    def _check_parked(self) -> None:
        """No record waits on the host without a timer.  Work of a kind no queue serves right now
        waits for one to come (back) into service, at most ``unavailable_grace``, also when every
        queue that could serve it is offline (it may come back: a re-probe, PeerRestored); only a
        kind no queue has at all ends at once."""
        self._park_dirty = False
        dispatch = self.dispatch
        for mode in dispatch.modes():
            if dispatch.serving.get(mode) or not dispatch.has_waiting(mode):
                if self._unplaced.pop(mode, None) is not None:
                    self._disarm(TimerKey.unavailable(mode))
                continue
            if not dispatch.mode_exists(mode):
                if self._unplaced.pop(mode, None) is not None:
                    self._disarm(TimerKey.unavailable(mode))
                self._fail_backlog(mode, f"no queue of kind {mode!r}")
            elif mode not in self._unplaced:
                self._unplaced[mode] = self._now
                self._arm(TimerKey.unavailable(mode), self.cfg.unavailable_grace, force=True)

    def _on_unavailable_timer(self, mode: str) -> None:
        """The grace of waiting work whose kind has no queue in service: end what has waited it out."""
        since = self._unplaced.get(mode)
        if since is None or self.dispatch.serving.get(mode):
            self._unplaced.pop(mode, None)
            return
        grace = self.cfg.unavailable_grace
        expired, nxt = self.dispatch.expire(mode, since, grace, self._now)
        for rec in expired:
            self._fail_unavailable(
                rec, f"no queue of kind {mode!r} came back into service within {grace:g} s"
            )
        if nxt is None:
            del self._unplaced[mode]
        else:
            self._arm(TimerKey.unavailable(mode), nxt - self._now, force=True)

    def _fill(self, mode: str) -> None:
        self.dispatch.fill(mode)
        self._after_dispatch()

    def _fill_queue(self, q: Queue) -> None:
        self.dispatch.fill_queue(q)
        self._after_dispatch()

    def _after_dispatch(self) -> None:
        """What the dispatcher hands back: queues it gave work to (their state and reply timer are
        the machine's to settle) and requests it could not encode (failed)."""
        d = self.dispatch
        if d.touched:
            armed = self.out.armed
            for q in d.touched:
                if q.reply_key not in armed:
                    self._arm(q.reply_key, self.cfg.reply_timeout)
                self._settle(q)
            d.touched.clear()
        if d.rejected:
            rejected, d.rejected = d.rejected, []
            for rec, err in rejected:
                self._resolve(rec, Outcome.FAILED, error=err)

    def _unload(self, q: Queue, rec: Record) -> None:
        self.dispatch.unload(q, rec)

    # ---------------------------------------------------------------- outcomes
    def _resolve(
        self, rec: Record, outcome: Outcome, *, value: Any = None, error: ApcryptoError | None = None
    ) -> None:
        self.ledger.close(rec, outcome)
        if rec.has_deadline:
            self._disarm(TimerKey.deadline(rec.rid))
        if rec.target is not None:
            self._disarm(TimerKey.target(rec.rid))
        self.out.resolve(rec.rid, value, error)

    def _fail_unavailable(self, rec: Record, why: str) -> None:
        self._resolve(rec, Outcome.UNAVAILABLE, error=DeviceUnavailable(why))

    def _fail_backlog(self, mode: str, why: str) -> None:
        for rec in self.dispatch.take_all(mode):
            self._fail_unavailable(rec, why)

    def _on_deadline(self, rid: int) -> None:
        rec = self.ledger.records.get(rid)
        if rec is None or rec.resolved:
            return
        rec.has_deadline = False
        sent = rec.phase in (Phase.SENDING, Phase.ON_CARD)
        if rec.phase is Phase.QUEUED:
            self.dispatch.size -= 1  # it stays in its deque, skipped lazily, but waits no more
        # every attempt counts, not only the current one: a request re-driven after an attempt that
        # may have run (idempotent work on a card that died) may have run, even if it waits now
        ran = rec.ran_somewhere()
        where = " after the request was handed to a card" if sent else " while queued"
        if ran is not None and not sent:
            where += " (an earlier attempt may have run)"
        self._resolve(
            rec,
            Outcome.UNAVAILABLE,
            error=DeadlineExceeded(
                "deadline expired" + where,
                may_have_run=ran is not None,
                qid=ran.qid if ran is not None else None,
                psmid=ran.psmid if ran is not None else None,
            ),
        )
        # a queued record stays in the backlog deque and is skipped lazily by _fill


# ---------------------------------------------------------------- the tables
#: A cell of the queue machine: a step function of the core, run on one queue, returning its wait.
Step = Callable[[DriverCore, Queue], Wait]
_D = DriverCore

#: state x event -> step function (the cells are the functions themselves, as ``ap_jumptable``
#: holds function pointers; mypy checks each one).  Every cell is filled.  A KICK issues a state's
#: instruction at most once per state entry (``*_once`` steps); repeating it is the poll timer's
#: job, or a synchronous transport answering "still resetting" at once would spin the machine.
TABLE: dict[QState, dict[QEvent, Step]] = {
    QState.RESET_START: {QEvent.KICK: _D._step_reset_once, QEvent.TIMEOUT: _D._step_reset},
    QState.RESET_WAIT: {QEvent.KICK: _D._step_wait_low, QEvent.TIMEOUT: _D._step_tapq},
    QState.SETIRQ_WAIT: {QEvent.KICK: _D._step_wait_low, QEvent.TIMEOUT: _D._step_tapq},
    QState.PROBE: {QEvent.KICK: _D._step_probe_once, QEvent.TIMEOUT: _D._step_probe},
    QState.IDLE: {QEvent.KICK: _D._step_write, QEvent.TIMEOUT: _D._step_nop},
    QState.WORKING: {QEvent.KICK: _D._step_write, QEvent.TIMEOUT: _D._step_read_write},
    QState.QUEUE_FULL: {QEvent.KICK: _D._step_await, QEvent.TIMEOUT: _D._step_read},
    QState.RECOVERY_WAIT: {QEvent.KICK: _D._step_drain_once, QEvent.TIMEOUT: _D._step_drain_probe},
    QState.OFFLINE: {QEvent.KICK: _D._step_reprobe_if_due, QEvent.TIMEOUT: _D._step_reprobe},
}

#: One handler per control instruction's completion (NQAP and DQAP, the hot path, are inline).
_CONTROL_HANDLERS: dict[Instr, Callable[[DriverCore, Queue, ApResult], None]] = {
    Instr.TAPQ: _D._on_tapq,
    Instr.AQIC: _D._on_aqic,
    Instr.RAPQ: _D._on_reset,
    Instr.ZAPQ: _D._on_reset,
}


def _install(table: dict[QState, dict[QEvent, Step]]) -> None:
    """Check every cell exists and store each row on its state, in event order, for the hot path
    (an Enum's hash is a Python function: the loop reads a plain attribute instead)."""
    for state in QState:
        row = table.get(state, {})
        missing = [e for e in QEvent if e not in row]
        if missing:
            raise QueueProtocolError(state, missing[0])
        state.jump = (row[QEvent.KICK], row[QEvent.TIMEOUT])


_install(TABLE)
