"""The queue machine: **everything that decides a queue's next state lives in this module.**

* ``TABLE[state][event]``: the cells are the step functions themselves (``QueueMachine._step_*``,
  as ``ap_jumptable`` holds function pointers); mypy checks each cell against :data:`Step`, and the
  table is checked complete at import.  ``_run`` is the kernel's ``ap_sm_event_loop``: it runs the
  cell again while it says ``AGAIN``, and the hints (:class:`~apcrypto.core.queue.Wait`, ordered by
  urgency) combine with ``min()``.
* ``HANDLERS[instr]``: one handler per instruction's completion (TAPQ, NQAP, DQAP, AQIC, RAPQ and
  ZAPQ), typed :data:`Handler`.
* The transitions: ``_enter`` (the bounded states: arms their limit) and ``_become`` (between the
  in-service states) are the only writers of ``Queue.state``; the timers that bound each state.
* What a verdict asks of a queue (:class:`~apcrypto.core.verdicts.Consequence`) is carried out here,
  by ``_apply`` through ``NEXT[QueueNext]``: the queue's transition first, then the re-driven work
  goes back to the host and is placed, so a re-drive never lands on the queue being taken down.

A missing cell or handler raises :class:`QueueProtocolError` naming the state, the event and the
instruction (h11's ``LocalProtocolError``).

References only the pieces below it -- configuration, ledger, outbox, dispatcher, verdicts,
classifier and the queue records -- never :class:`apcrypto.core.driver.DriverCore`, which owns
it.  The flush (``flush``) is the loop that runs every kicked queue, places waiting work, looks for
work parked without a timer and hands the outbox's actions back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from apcrypto.core.actions import Action
from apcrypto.core.classifier import Classifier, Verdict
from apcrypto.core.config import DriverConfig
from apcrypto.core.dispatch import Dispatcher
from apcrypto.core.ledger import Ledger, Outcome, Phase, Record
from apcrypto.core.outbox import Outbox
from apcrypto.core.queue import STATE_LIMITS, QEvent, QState, Queue, Wait
from apcrypto.core.timers import TimerKey
from apcrypto.core.verdicts import NOTHING, Consequence, QueueNext, Verdicts, probe_request
from apcrypto.errors import BadRequest, CoreMisuse
from apformats.codes import ResponseCode
from apformats.results import ApResult, Instr, qid_str

log = logging.getLogger("apcrypto.core")

#: Entering one of these states takes back the queue's NQAPs still in the unflushed batch.
_WITHDRAW_ON = frozenset({QState.RESET_START, QState.RESET_WAIT, QState.RECOVERY_WAIT, QState.OFFLINE})
#: States in which an NQAP the card accepts is thrown away by a reset we issued (or nobody collects).
_DISCARDING = frozenset({QState.RESET_START, QState.RESET_WAIT, QState.SETIRQ_WAIT, QState.OFFLINE})
#: The same states by ``QState.idx``, for the NQAP completion (an Enum's hash is a Python function).
_DISCARDING_IDX = frozenset(s.idx for s in _DISCARDING)


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


class QueueMachine:
    """Every queue's state machine, for one client.  Entry points leave their actions in the outbox;
    :meth:`flush` runs what they set in motion and returns them."""

    def __init__(
        self,
        cfg: DriverConfig,
        ledger: Ledger,
        out: Outbox,
        dispatch: Dispatcher,
        verdicts: Verdicts,
        clf: Classifier,
        queues: dict[int, Queue],
        *,
        irq_ok: bool,
    ) -> None:
        self.cfg = cfg
        self.ledger = ledger
        self.out = out
        self.dispatch = dispatch
        self.verdicts = verdicts
        self.clf = clf
        self.queues = queues
        self.irq_ok = irq_ok
        self.instr: Instr | None = None  # the instruction whose completion is being handled
        self._kicked: set[int] = set()
        self._refill: set[str] = set()  # modes whose waiting work may be placed at the next flush
        # queues whose link is suspect: a TransportLost came for their peer and no answer from it
        # since (see _on_reply_timer); per peer, so that one server of a pool answering does not
        # vouch for another's link.  _peer_of: each queue's peer (a lost scope), when events say.
        self._suspect: set[int] = set()
        self._peer_of: dict[int, frozenset[int]] = {}

    # ---------------------------------------------------------------- entries (from DriverCore)
    def add(self, qid: int) -> None:
        """Start bringing up ``qid``: reset, interrupts, probe, then service."""
        q = Queue(qid, irq_wanted=self.irq_ok, occ_t=self.out.now, t0=self.out.now)
        self.queues[qid] = q
        self._enter(q, QState.RESET_START)
        self._run(q, QEvent.KICK)

    def completion(self, tag: int, result: ApResult) -> None:
        """The transport answered the command submitted under ``tag``: its instruction's handler."""
        entry = self.out.in_flight.pop(tag, None)
        if entry is None:
            log.warning("completion for unknown tag %d ignored", tag)
            self.ledger.counters["unknown_tags"] += 1
            return
        qid, instr, psmid = entry
        if self._suspect and qid in self._suspect:  # an answer came: this peer's link works
            self._suspect -= self._peer_of.get(qid, self._suspect)
        q = self.queues[qid]
        self.instr = instr
        handler = _BY_OPCODE[instr] if instr < len(_BY_OPCODE) else None
        if handler is None:
            raise QueueProtocolError(q.state, "completion", instr)
        if handler(self, q, tag, psmid, result):
            self._kicked.add(qid)

    def interrupt(self, qid: int) -> None:
        """An adapter interrupt for ``qid``: a reply may be waiting."""
        q = self.queues.get(qid)
        if q is not None:
            self._want_read(q)
            self._kicked.add(qid)

    def on_timer(self, key: tuple[Any, ...]) -> None:
        """The timer ``key`` fired: its kind's handler (:data:`TIMERS`)."""
        handler = TIMERS.get(key[0]) if key else None
        if handler is None or len(key) != 2:
            raise CoreMisuse(f"unknown timer key {key!r}")
        self.out.fired(key)
        handler(self, key[1])

    def fill(self, mode: str) -> None:
        """Place ``mode``'s waiting work on free slots (after a submit, a bounce, a re-drive)."""
        self.dispatch.fill(mode)
        self._after_dispatch()

    def flush(self) -> list[Action]:
        """Run what the entry point set in motion: every kicked queue's KICK cell, the placing of
        waiting work, the check that nothing waits with no timer; then the actions, batch first."""
        while self._kicked or self._refill:
            for qid in list(self._kicked):
                self._kicked.discard(qid)
                self._run(self.queues[qid], QEvent.KICK)
            while self._refill:
                self.fill(self._refill.pop())
        if self.dispatch.dirty:
            self.verdicts.check_parked()
        return self.out.take()

    def advance(self, now: float) -> None:
        """Time moves to ``now`` (every entry point, first).

        Each queue's occupancy integral is brought up to date lazily, by :meth:`Queue.occ_to` just
        before its ``held`` changes (the dispatcher's send, a reply delivered, a probe, a loss, a
        withdrawal or an abandon) and before it is read (``stats``): exact, and O(1) per entry
        instead of a walk over every queue on every entry (it was the core's hottest loop with 16
        queues).  ``tests/test_core_occupancy.py`` holds it against that walk."""
        self.out.now = now

    def occ(self, q: Queue) -> None:
        q.occ_to(self.out.now)

    # ---------------------------------------------------------------- the transport's news
    def transport_lost(
        self,
        tags: Iterable[int],
        *,
        permanent: bool,
        reason: str,
        unsent: Iterable[int],
        resumable: bool = False,
        scope: Iterable[int] | None = None,
    ) -> None:
        """Commands under ``tags`` will never be answered (see ``DriverCore.on_transport_lost``);
        ``scope``: the lost peer's queues (None: every queue)."""
        keep = permanent and resumable  # the peer keeps our session: its cards may answer later
        # until the peer's next answer its cards' silence says nothing
        if scope is None:
            self._suspect.update(self.queues)
        else:
            peer = frozenset(scope)
            self._suspect |= peer
            self._peer_of.update(dict.fromkeys(peer, peer))
        never_sent = set(unsent)
        touched: dict[int, Queue] = {}
        lost_now: list[tuple[Queue, Record]] = []
        for tag in tags:
            entry = self.out.in_flight.pop(tag, None)
            if entry is None:
                continue
            qid, instr, psmid = entry
            q = self.queues[qid]
            q.occ_to(self.out.now)  # before its held changes (below)
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
                    self.dispatch.unload(q, rec)
                    if not rec.resolved:
                        if rec.current is not None:
                            rec.current.fate = "bounced"
                            rec.current.cleared = True
                        self.ledger.counters["bounced"] += 1
                        self.dispatch.requeue_front(rec)
                elif (permanent and not keep) or q.state in _DISCARDING:
                    # maybe sent, and nobody will ever collect it (the peer is gone, or the queue is
                    # already out of service): the ledger decides now
                    self.dispatch.unload(q, rec)
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
            why = f"transport lost: {reason}"
            self._apply(q, self.verdicts.attempt_failed(rec, q, may_have_run=True, why=why))
        for q in going:
            self._take_offline(q, f"transport lost: {reason}", keep_on_card=keep)
        if permanent and not keep:
            # the link is gone for good (closed, given up): a session kept for us will never be resumed
            mine = None if scope is None else frozenset(scope)
            for q in self.queues.values():
                if q.session_held and (mine is None or q.qid in mine):
                    self._abandon(q, f"transport lost: {reason}")
        for q in touched.values():
            if not permanent:
                log.info("queue %s: commands lost in transit (%s)", qid_str(q.qid), reason)
            self._kicked.add(q.qid)
        for mode in {q.mode for q in touched.values()}:
            self._refill.add(mode)

    def peer_restored(
        self, reason: str, *, resumed: bool = False, scope: Iterable[int] | None = None
    ) -> None:
        """The peer is back: re-probe every offline queue now instead of after its back-off.

        A queue that went offline holding work for a session the peer kept (``session_held``) is
        drained first when the session was resumed: its replies are still on the card, and the
        reset that brings a queue back would wipe them.  A new session holds none of them: the
        ledger decides them now.  ``scope``: the queues of the peer that is back (None: every
        queue); another peer's are left alone (it may still be gone)."""
        self.ledger.counters["peer_restored"] += 1
        log.info("transport peer restored (%s, resumed=%s): re-probing offline queues", reason, resumed)
        mine = None if scope is None else frozenset(scope)
        for q in self.queues.values():
            if mine is not None and q.qid not in mine:
                continue
            if q.state is QState.OFFLINE and q.session_held:
                if resumed:
                    self.ledger.counters["session_drains"] += 1
                    q.session_held = False
                    self.out.disarm(TimerKey.grace(q.qid))
                    q.offline_backoff = 0.0
                    q.offline_reason = ""
                    self._enter_recovery(q, card_recovered=True)
                    continue
                self._abandon(q, "the peer did not resume our session")
            if q.state is QState.OFFLINE:
                q.offline_backoff = 0.0
                self._run(q, QEvent.TIMEOUT)

    # ---------------------------------------------------------------- timers (the cells of TIMERS)
    def _on_poll_timer(self, qid: Any) -> None:
        q = self.queues[qid]
        self.occ(q)
        self._run(q, QEvent.TIMEOUT)

    def _on_limit_timer(self, qid: Any) -> None:
        q = self.queues[qid]
        if q.limit_gen != q.gen:
            return  # the state it was armed for has been left since
        st = q.state
        if st is QState.SETIRQ_WAIT:
            log.info("queue %s: interrupts not confirmed; polling instead", qid_str(q.qid))
            q.irq_wanted = False
            self._enter(q, QState.PROBE)
            self._kicked.add(q.qid)
        elif st is QState.RECOVERY_WAIT:
            self._take_offline(q, "card recovery did not finish in time")
        elif st in (QState.RESET_START, QState.RESET_WAIT, QState.PROBE):
            self._reset_failed(q, f"{st.value} timed out")

    def _on_reply_timer(self, qid: Any) -> None:
        q = self.queues[qid]
        if not q.state.in_service:
            return
        if q.held and q.progress == q.progress_seen:
            if q.qid in self._suspect:
                # The link is down (lost, nothing answered since): no reply proves nothing about the
                # card, and a reset now would throw away the replies a resumed session still holds
                # for us (the server keeps them for its grace).  Wait another period; the
                # transport's peer_deadline bounds this (it then reports the loss as permanent).
                self.ledger.counters["reply_timeouts_deferred"] += 1
                self.out.arm_after(q.reply_key, self.cfg.reply_timeout, force=True)
                return
            log.warning("queue %s: no reply for %.3gs; resetting", qid_str(q.qid), self.cfg.reply_timeout)
            self.ledger.counters["reply_timeouts"] += 1
            self._start_reset(q, "reply timeout")
            return
        q.progress_seen = q.progress
        if q.held:
            self.out.arm_after(q.reply_key, self.cfg.reply_timeout, force=True)

    def _on_grace_timer(self, qid: Any) -> None:
        """The peer's session grace is over and it did not come back: what its card held is gone."""
        q = self.queues[qid]
        if q.session_held:
            self._abandon(q, "the peer's session grace ended before it came back")
            if q.state is QState.OFFLINE:
                self._run(q, QEvent.TIMEOUT)  # re-probes were held off while the session was kept

    def _on_deadline_timer(self, rid: Any) -> None:
        self.verdicts.on_deadline(rid)

    def _on_unavailable_timer(self, mode: Any) -> None:
        self.verdicts.on_unavailable_timer(mode)

    def _on_target_timer(self, rid: Any) -> None:
        self.verdicts.on_target_timer(rid)

    # ---------------------------------------------------------------- the event loop
    def _run(self, q: Queue, event: QEvent) -> None:
        """The kernel's ``ap_sm_event_loop``: run the cell, again while it says AGAIN."""
        idx = 0 if event is QEvent.KICK else 1  # JUMP[state.idx] is TABLE[state] in event order
        while True:
            try:
                step = JUMP[q.state.idx][idx]
            except IndexError:
                raise QueueProtocolError(q.state, event, self.instr) from None
            wait = step(self, q)
            if wait is not Wait.AGAIN:
                break
            idx = 0
        self._apply_wait(q, wait)

    def _apply_wait(self, q: Queue, wait: Wait) -> None:
        if wait is Wait.NONE:
            return
        out = self.out  # (the hot path: ``arm`` at ``now + delay`` directly, one call fewer)
        if wait is Wait.HIGH:
            out.arm(q.poll_key, out.now + self.cfg.poll_high)
        elif wait is Wait.LOW:
            out.arm(q.poll_key, out.now + self.cfg.poll_low)
        elif wait is Wait.INTERRUPT:
            out.arm(q.poll_key, out.now + (self.cfg.irq_safety_poll if q.irq else self.cfg.poll_high))

    # ---------------------------------------------------------------- the two writers of Queue.state
    def _enter(self, q: Queue, state: QState) -> None:
        if q.state is not state:
            log.debug("queue %s: %s -> %s", qid_str(q.qid), q.state.value, state.value)
            if q.state.in_service != state.in_service:
                self.dispatch.service_changed(q.mode, state.in_service)
            if q.mf_recovery and state is not QState.RECOVERY_WAIT:
                q.mf_recovery = False
                self.dispatch.mf_leave(q.card)
                self._refill.add(q.mode)  # its card's other queues may take work again
        if state in _WITHDRAW_ON:
            self._withdraw(q)
        q.state = state
        q.gen += 1
        limit = STATE_LIMITS.get(state)
        if limit is not None:
            q.limit_gen = q.gen
            self.out.arm_after(q.limit_key, getattr(self.cfg, limit), force=True)
        if state.in_service and q.held:
            self.out.arm_after(q.reply_key, self.cfg.reply_timeout)

    def _become(self, q: Queue, state: QState) -> None:
        """Move between the in-service states (IDLE / WORKING / QUEUE_FULL): no limit, no withdraw."""
        q.state = state
        q.gen += 1

    def _settle(self, q: Queue) -> None:
        """Pick IDLE / WORKING / QUEUE_FULL from the counts while in service."""
        state = q.state
        if not state.in_service:
            return
        # Queue.held and has_free_slot written out: this runs several times per request
        held = len(q.on_card) + len(q.sending) + q.probe_sent
        if held == 0:
            new = QState.IDLE
        elif not q.full_hold and held < q.slots:
            new = QState.WORKING
        else:
            new = QState.QUEUE_FULL
        if new is not state:
            self._become(q, new)

    # ---------------------------------------------------------------- steps (the cells of TABLE)
    def _step_nop(self, q: Queue) -> Wait:
        return Wait.NONE

    def _step_reset(self, q: Queue) -> Wait:
        if not q.ctl_inflight:
            self._abandon(q, "queue reset")
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
            probe = probe_request(q.mode)
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
        d = self.dispatch
        d.fill_queue(q)
        if d.touched or d.rejected:
            given = q in d.touched
            self._after_dispatch()  # settles every queue given work
            if not given:
                self._settle(q)
        else:
            self._settle(q)
        return Wait.INTERRUPT if q.on_card or q.sending or q.probe_sent else Wait.NONE  # q.held

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
        self.out.arm_after(q.poll_key, max(q.offline_backoff, self.cfg.offline_probe_interval), force=True)
        return Wait.NONE

    def _step_reprobe_if_due(self, q: Queue) -> Wait:
        if q.reprobe_due and not q.ctl_inflight:
            return self._step_reprobe(q)
        return Wait.NONE

    def _want_read(self, q: Queue) -> None:
        if (q.on_card or q.sending or q.probe_sent) and not q.dqap_inflight and q.state is not QState.OFFLINE:
            q.dqap_inflight = True
            self.out.emit(q.qid, Instr.DQAP)

    # ---------------------------------------------------------------- transitions
    def _to_service(self, q: Queue) -> None:
        q.reset_attempts = 0
        q.offline_backoff = 0.0
        q.offline_reason = ""
        q.probe_psmid = None
        q.occ_to(self.out.now)
        q.probe_sent = False
        self.out.disarm(q.limit_key)
        self._enter(q, QState.IDLE)
        self._settle(q)
        log.info("queue %s (%s, %d slots) in service", qid_str(q.qid), q.mode, q.slots)
        self.fill(q.mode)

    def _start_reset(self, q: Queue, why: str) -> None:
        log.info("queue %s: reset (%s)", qid_str(q.qid), why)
        q.probe_psmid = None
        q.occ_to(self.out.now)
        q.probe_sent = False
        q.full_hold = False
        q.card_recovered = False
        self._enter(q, QState.RESET_START)
        self._kicked.add(q.qid)

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
            self._kicked.add(q.qid)
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
        q.occ_to(self.out.now)
        q.probe_sent = False
        q.full_hold = False
        self._enter(q, QState.OFFLINE)
        self.out.disarm(q.limit_key)
        if keep_on_card and q.on_card:
            # the peer keeps our session for its grace: what the card holds may still come back
            # (PeerRestored resumed=True drains it); the grace timer bounds the wait
            q.session_held = True
            q.probe_psmid = None
            self.out.arm_after(TimerKey.grace(q.qid), self.cfg.session_grace, force=True)
        else:
            self._abandon(q, why)
        q.offline_backoff = min(
            max(q.offline_backoff * 2, self.cfg.offline_probe_interval), self.cfg.offline_probe_max
        )
        self.out.arm_after(q.poll_key, q.offline_backoff, force=True)
        if q.mode == "unknown":  # lost during bring-up: requests of every kind counted on it
            self.verdicts.fail_dead_kinds()
        else:
            # every queue of its kind offline or not: waiting work waits its grace for one to come
            # back (a re-probe or PeerRestored), never less (issue 8 §1; check_parked arms it)
            self.dispatch.dirty = True
            self.fill(q.mode)

    def _external_reset(self, q: Queue) -> None:
        """Somebody else reset the queue: everything it held is gone, fate unknown."""
        self.ledger.counters["external_resets"] += 1
        self._abandon(q, "queue reset by someone else")
        q.probe_psmid = None
        q.occ_to(self.out.now)
        q.probe_sent = False
        self._enter(q, QState.RESET_WAIT)
        self._kicked.add(q.qid)

    def _recovery_drained(self, q: Queue) -> None:
        if q.sending:
            # an NQAP sent before the failure is still in flight: the card may take it after this
            # status was read; resetting now would throw it away after it started.  The next
            # drain poll looks again once its status is in.
            return
        self.ledger.counters["recoveries_drained"] += 1
        self._abandon(q, "not among the card's stored replies")
        if q.offline_after_drain:
            why, q.offline_after_drain = q.offline_after_drain, ""
            self._take_offline(q, why)
        else:
            self._start_reset(q, "stored replies drained after machine failure")

    def _abandon(self, q: Queue, why: str) -> None:
        """The card will never answer what it holds for us (nor the probe): the verdicts decide
        each held request from the ledger, and the re-drives come back here to be placed."""
        if q.session_held:
            q.session_held = False
            self.out.disarm(TimerKey.grace(q.qid))
        q.occ_to(self.out.now)
        q.probe_sent = False
        q.probe_psmid = None
        if q.on_card:
            self._apply(q, self.verdicts.abandon_on_card(q, why))

    # ---------------------------------------------------------------- a verdict's consequence
    def _apply(self, q: Queue, c: Consequence) -> None:
        """Carry out what a verdict asks of ``q``: its transition first (out of service), then the
        re-driven work back to the host and placed elsewhere."""
        if c is NOTHING:
            return
        NEXT[c.queue](self, q, c.why)
        if c.redrive:
            for rec in c.redrive:
                self.dispatch.requeue_front(rec)  # (waits its grace if no queue of its kind serves)
            for mode in dict.fromkeys(rec.mode for rec in c.redrive):
                self.fill(mode)

    def _next_nothing(self, q: Queue, why: str) -> None:
        pass

    def _next_recover_mf(self, q: Queue, why: str) -> None:
        self._enter_recovery(q, card_recovered=True, mf=True)

    def _next_drain_then_offline(self, q: Queue, why: str) -> None:
        # the card still answers: collect what it holds for us first (no new work meanwhile),
        # then take the queue out of service
        q.offline_after_drain = why
        self._enter_recovery(q, card_recovered=True)

    def _next_service(self, q: Queue, why: str) -> None:
        self._to_service(q)

    # ---------------------------------------------------------------- dispatch results
    def _after_dispatch(self) -> None:
        """What the dispatcher hands back: queues it gave work to (their state and reply timer are
        settled here) and requests it could not encode (failed by the verdicts)."""
        d = self.dispatch
        if d.touched:
            out = self.out
            armed = out.armed
            last = None
            for q in d.touched:
                if q is last:
                    continue  # several requests placed on one queue in a row: settled once
                last = q
                if q.reply_key not in armed:
                    out.arm(q.reply_key, out.now + self.cfg.reply_timeout)
                self._settle(q)
            d.touched.clear()
        if d.rejected:
            rejected, d.rejected = d.rejected, []
            for rec, err in rejected:
                self.verdicts.resolve(rec, Outcome.FAILED, error=err)

    def _withdraw(self, q: Queue) -> None:
        """Take back the NQAPs for ``q`` that are still in this flush's batch: they have not left the
        host, and the queue is leaving service (a reset or recovery in the same batch would throw
        them away after they started).  Requests go back to the host as never sent."""
        q.occ_to(self.out.now)
        for c in self.out.withdraw(q.qid, Instr.NQAP):
            rid = q.sending.pop(c.tag, None)
            if rid is None:  # the health probe: it will be issued again in its own state
                if c.psmid == q.probe_psmid:
                    q.probe_psmid = None
                continue
            rec = self.ledger.records.get(rid)
            if rec is None:
                continue
            self.dispatch.unload(q, rec)
            att = rec.current
            if att is not None and att.psmid == c.psmid:
                att.fate = "bounced"
                att.cleared = True
            if not rec.resolved:
                self.ledger.counters["withdrawn"] += 1
                self.dispatch.requeue_front(rec)
                self._refill.add(rec.mode)

    # ---------------------------------------------------------------- completions (the cells of HANDLERS)
    # Each returns whether the queue is to be kicked (its KICK cell run at the flush).
    def _on_tapq(self, q: Queue, tag: int, psmid: int, res: ApResult) -> bool:
        q.ctl_inflight = False
        st = res.status
        v = self.clf.rc("TAPQ", st.response_code).verdict
        if q.state is QState.OFFLINE:
            if v is Verdict.PROCEED:
                log.info("queue %s answers again; bringing it back", qid_str(q.qid))
                q.reset_attempts = 0
                self._start_reset(q, "re-probe after offline")
            else:
                q.offline_backoff = min(
                    max(q.offline_backoff * 2, self.cfg.offline_probe_interval), self.cfg.offline_probe_max
                )
                self.out.arm_after(q.poll_key, q.offline_backoff, force=True)
            return True
        if v is Verdict.TAKE_OFFLINE:
            self._take_offline(q, f"TAPQ answered {st.rc_name()}")
            return True
        if q.state is QState.RECOVERY_WAIT:
            if v is Verdict.PROCEED:
                q.card_recovered = True
                if st.replies_waiting:
                    self._want_read(q)
                elif st.queue_empty:
                    self._recovery_drained(q)
            return True
        if v is not Verdict.PROCEED:
            return True  # reset or SE change in progress, or busy: keep polling (state limit bounds it)
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
        return True

    def _learn(self, q: Queue, res: ApResult) -> None:
        hw = res.hwinfo
        assert hw is not None
        q.hw = hw
        q.slots = hw.slots
        q.max_msg = hw.max_msg_size
        if q.mode != hw.mode:
            self.dispatch.learn_mode(q, hw.mode)
            self.verdicts.fail_dead_kinds()  # work of a kind this queue was counted for may have none left

    def _on_reset(self, q: Queue, tag: int, psmid: int, res: ApResult) -> bool:
        q.ctl_inflight = False
        row = self.clf.rc("RESET", res.status.response_code)
        if q.state is QState.OFFLINE:
            return True
        if row.verdict is Verdict.PROCEED:
            q.irq = False
            if q.state is QState.RESET_START:
                self._enter(q, QState.RESET_WAIT)
        elif row.verdict is Verdict.TAKE_OFFLINE:
            self._take_offline(q, f"reset answered {res.status.rc_name()}")
        # retry-same (busy): the LOW poll issues the reset again
        return True

    def _on_aqic(self, q: Queue, tag: int, psmid: int, res: ApResult) -> bool:
        q.ctl_inflight = False
        row = self.clf.rc("AQIC", res.status.response_code)
        if q.state.in_service:  # a re-enable (see _check_irq and transport_lost)
            if res.status.response_code in (ResponseCode.NORMAL, ResponseCode.OTHERWISE_CHANGED):
                q.irq = True
                return True
            if row.verdict is not Verdict.TAKE_OFFLINE:
                q.irq = False
                if row.verdict is Verdict.PROCEED:
                    q.irq_wanted = False  # this path will not give us interrupts: poll from now on
                return True
        if row.verdict is Verdict.TAKE_OFFLINE:
            self._take_offline(q, f"AQIC answered {res.status.rc_name()}")
        elif row.verdict is not Verdict.PROCEED and q.state is QState.SETIRQ_WAIT:
            self._enter(q, QState.RESET_WAIT)  # reset still running: AQIC again after TAPQ
        elif res.status.response_code != ResponseCode.NORMAL and q.state is QState.SETIRQ_WAIT:
            q.irq_wanted = False  # no interrupts on this path: poll
            self._enter(q, QState.PROBE)
        return True

    def _on_nqap(self, q: Queue, tag: int, psmid: int, res: ApResult) -> bool:
        """An NQAP's status.  Simply accepted with no state change (the common case), the queue
        needs no kick: only a poll in case the interrupt never comes (an IDLE queue has none)."""
        gen = q.gen
        st = res.status
        v = self.clf.rc("NQAP", st.response_code).verdict
        if tag not in q.sending:
            if psmid != q.probe_psmid:
                # its reply was delivered before this status arrived: nothing is left to do
                self.ledger.counters["status_after_reply"] += 1
                return True
            # the health probe
            if v is Verdict.PROCEED:
                q.occ_to(self.out.now)
                q.probe_sent = True
                if st.replies_waiting:
                    self._want_read(q)
            elif v is Verdict.TAKE_OFFLINE:
                self._take_offline(q, f"probe NQAP answered {st.rc_name()}")
            elif q.state is QState.PROBE:
                q.probe_psmid = None  # busy / reset in progress: try the probe again
                if v is Verdict.RETRY_SAME and st.response_code == ResponseCode.BUSY:
                    self._enter_recovery(q, card_recovered=False)
            return True
        if v is not Verdict.PROCEED:
            q.occ_to(self.out.now)  # it leaves the queue (accepted, it only moves to on_card)
        rec = self.ledger.records[q.sending.pop(tag)]
        if v is Verdict.PROCEED:
            att = rec.attempts[-1]  # rec.current: the NQAP being answered made one
            if rec.outcome is not None:  # rec.resolved
                # decided while its NQAP was in flight (deadline): it is on the card now; keep the slot
                att.fate = "late"
                q.on_card[att.psmid] = rec.rid
            elif q.state.idx in _DISCARDING_IDX:
                # accepted by a queue we already gave up on (or are resetting, which throws it
                # away): it may run; nobody will collect it
                q.on_card[att.psmid] = rec.rid
                self._abandon(q, "accepted by a queue taken out of service")
                return True
            else:
                att.fate = "on-card"
                rec.phase = Phase.ON_CARD
                q.on_card[att.psmid] = rec.rid
            q.requests_total += 1
            if st.replies_waiting:
                self._want_read(q)
            self._settle(q)
            if gen != q.gen:
                return True
            if q.poll_key not in self.out.armed:
                self._apply_wait(q, Wait.INTERRUPT)
            return False
        # the card did not take it: it never left the host
        self.dispatch.unload(q, rec)
        bounced = rec.current
        if bounced is not None:
            bounced.fate = "bounced"
            bounced.cleared = True
        if v is Verdict.FAIL_CALLER:
            self.verdicts.resolve(
                rec,
                Outcome.FAILED,
                error=BadRequest(
                    f"the card refused the request ({st.rc_name()})",
                    qid=q.qid,
                    psmid=bounced.psmid if bounced else None,
                    response_code=st.response_code,
                ),
            )
            return True
        self.ledger.counters["bounced"] += 1
        self.dispatch.requeue_front(rec)
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
        self.fill(rec.mode)
        return True

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

    def _on_dqap(self, q: Queue, tag: int, psmid: int, res: ApResult) -> bool:
        q.dqap_inflight = False
        st = res.status
        v = self.clf.rc("DQAP", st.response_code).verdict
        if q.irq is not st.irq_enabled and q.state.in_service and v is not Verdict.TAKE_OFFLINE:
            self._check_irq(q, st.irq_enabled)
        if v is Verdict.PROCEED:
            q.progress += 1
            if q.full_hold:
                q.full_hold = False
            if res.psmid == q.probe_psmid:  # (its NQAP status may not be in yet: the reply proves it ran)
                self._probe_reply(q, res.reply)
            else:
                c = self.verdicts.deliver(q, res.psmid, res.reply)
                if c is not NOTHING:
                    self._apply(q, c)
            if st.replies_waiting:
                self._want_read(q)
            elif q.state is QState.RECOVERY_WAIT and st.queue_empty and q.card_recovered:
                self._recovery_drained(q)
            self._settle(q)
            return True
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
                        self._abandon(q, "card reports the queue empty")
                        self._settle(q)
            return True
        if q.state is QState.OFFLINE:
            return True
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
        return True

    def _probe_reply(self, q: Queue, data: bytes) -> None:
        q.occ_to(self.out.now)
        q.probe_sent = False
        q.probe_psmid = None
        if q.state is QState.PROBE:
            self._apply(q, self.verdicts.probe_says(q.mode, data))


# ---------------------------------------------------------------- the tables
#: A cell of the queue machine: a step function run on one queue, returning its wait.
Step = Callable[[QueueMachine, Queue], Wait]
#: One instruction's completion: (queue, tag, psmid, result) -> kick the queue afterwards?
Handler = Callable[[QueueMachine, Queue, int, int, ApResult], bool]
_M = QueueMachine

#: state x event -> step function (the cells are the functions themselves, as ``ap_jumptable``
#: holds function pointers; mypy checks each one).  Every cell is filled.  A KICK issues a state's
#: instruction at most once per state entry (``*_once`` steps); repeating it is the poll timer's
#: job, or a synchronous transport answering "still resetting" at once would spin the machine.
TABLE: dict[QState, dict[QEvent, Step]] = {
    QState.RESET_START: {QEvent.KICK: _M._step_reset_once, QEvent.TIMEOUT: _M._step_reset},
    QState.RESET_WAIT: {QEvent.KICK: _M._step_wait_low, QEvent.TIMEOUT: _M._step_tapq},
    QState.SETIRQ_WAIT: {QEvent.KICK: _M._step_wait_low, QEvent.TIMEOUT: _M._step_tapq},
    QState.PROBE: {QEvent.KICK: _M._step_probe_once, QEvent.TIMEOUT: _M._step_probe},
    QState.IDLE: {QEvent.KICK: _M._step_write, QEvent.TIMEOUT: _M._step_nop},
    QState.WORKING: {QEvent.KICK: _M._step_write, QEvent.TIMEOUT: _M._step_read_write},
    QState.QUEUE_FULL: {QEvent.KICK: _M._step_await, QEvent.TIMEOUT: _M._step_read},
    QState.RECOVERY_WAIT: {QEvent.KICK: _M._step_drain_once, QEvent.TIMEOUT: _M._step_drain_probe},
    QState.OFFLINE: {QEvent.KICK: _M._step_reprobe_if_due, QEvent.TIMEOUT: _M._step_reprobe},
}

#: One handler per instruction's completion.
HANDLERS: dict[Instr, Handler] = {
    Instr.TAPQ: _M._on_tapq,
    Instr.NQAP: _M._on_nqap,
    Instr.DQAP: _M._on_dqap,
    Instr.AQIC: _M._on_aqic,
    Instr.RAPQ: _M._on_reset,
    Instr.ZAPQ: _M._on_reset,
}

#: One handler per timer kind (:data:`apcrypto.core.timers.KINDS`), called with the key's ident.
TIMERS: dict[str, Callable[[QueueMachine, Any], None]] = {
    "poll": _M._on_poll_timer,
    "limit": _M._on_limit_timer,
    "reply": _M._on_reply_timer,
    "grace": _M._on_grace_timer,
    "deadline": _M._on_deadline_timer,
    "unavailable": _M._on_unavailable_timer,
    "target": _M._on_target_timer,
}

#: What a verdict asks of a queue -> the transition that does it (with the verdict's ``why``).
NEXT: dict[QueueNext, Callable[[QueueMachine, Queue, str], None]] = {
    QueueNext.NOTHING: _M._next_nothing,
    QueueNext.RECOVER_MF: _M._next_recover_mf,
    QueueNext.DRAIN_THEN_OFFLINE: _M._next_drain_then_offline,
    QueueNext.RESET: _M._start_reset,
    QueueNext.SERVICE: _M._next_service,
    QueueNext.PROBE_FAILED: _M._reset_failed,
}

#: The hot path's copies, read by plain index (an Enum's hash is a Python function): ``JUMP`` holds
#: each state's row in event order at ``state.idx``, ``_BY_OPCODE`` the handlers by opcode.
JUMP: list[tuple[Step, ...]] = []
_BY_OPCODE: list[Handler | None] = []


def _install() -> None:
    """Check every cell, handler and consequence exists, and build the hot path's copies."""
    for state in QState:
        row = TABLE.get(state, {})
        missing = [e for e in QEvent if e not in row]
        if missing:
            raise QueueProtocolError(state, missing[0])
    JUMP[:] = [(TABLE[s][QEvent.KICK], TABLE[s][QEvent.TIMEOUT]) for s in sorted(QState, key=lambda s: s.idx)]
    for instr in Instr:
        if instr not in HANDLERS:
            raise QueueProtocolError(QState.IDLE, "completion", instr)
    _BY_OPCODE[:] = [None] * (max(Instr) + 1)
    for instr, handler in HANDLERS.items():
        _BY_OPCODE[instr] = handler
    missing_next = set(QueueNext) - NEXT.keys()
    if missing_next:
        raise CoreMisuse(f"queue machine: no transition for {sorted(n.value for n in missing_next)}")


_install()
