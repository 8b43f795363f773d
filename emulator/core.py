"""The software adapter: cards, queues and engines on a clock, driven by AP instructions.

Sans-I/O: nothing here owns a thread or a socket.  Work moves only when an instruction is called
or a clock callback fires; the same model runs on a :class:`~emulator.clock.VirtualClock` (tests,
simulation: deterministic, instant) or a :class:`~emulator.clock.WallClock` (servers).

How a request moves (INTERNALS §3; ``reference/zcrypt.md`` §1.5, §9):

1. ``nqap`` puts it in a slot of its queue (it holds that slot until its reply is DQAP'd) and on
   the card's round-robin of queues with waiting work.
2. A free engine of the card takes the oldest message of the next queue in the round-robin (fair
   across domains, FIFO within one).  Starting it runs the firmware, which computes the real
   result and applies any state change *now*; the engine is then busy for the service time.
3. On completion the reply becomes available to DQAP, an interrupt is signalled if AQIC enabled
   one, and the engine takes the next message.  A zero service time completes inline.

Card-level events (machine failure, checkstop, ...) follow the table in :mod:`emulator.lifecycle`;
the ``_act_*`` methods below are its actions.
"""

from __future__ import annotations

import heapq
import random
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import firmware_stubs
from apformats.codes import MachineFailureState, ResponseCode
from apformats.errors import FormatError
from apformats.frames import Command
from apformats.messages import build_error_reply, request_function
from apformats.results import ApResult, Instr
from apformats.status import QueueStatus
from emulator.clock import TimerHandle, VirtualClock, WallClock
from emulator.control import ControlPlane
from emulator.engines import EngineBackend, make_engines, offloaded
from emulator.execution_log import ExecutionLog
from emulator.lifecycle import (
    CARD_GATE,
    CARD_TRANSITIONS,
    HWINFO_TRUSTED,
    QUEUE_GATE,
    CardEvent,
    CardState,
)
from emulator.model import Card, Message, Queue
from emulator.profile import Profile, load_profile
from emulator.stats import EmulatorStats, collect_stats

__all__ = ["INSTRUCTIONS", "Emulator"]

RC = ResponseCode
_MAX_PSMID = (1 << 64) - 1

#: Response codes whose status word says nothing about the queue (no bits but the RC).
_BARE_RCS = frozenset({RC.Q_NOT_AVAIL, RC.INVALID_ADDRESS, RC.CHECKSTOPPED, RC.DECONFIGURED})


def _substream(seed: int, name: str) -> random.Random:
    """An independent, reproducible stream per purpose: extra draws in one never shift another.

    String seeds are hashed with SHA-512 by ``random.seed`` (not ``hash()``), so this does not
    depend on ``PYTHONHASHSEED``.
    """
    return random.Random(f"apcrypto-emulator:{seed}:{name}")


class Emulator:
    """A software AP adapter complex built from a :class:`~emulator.profile.Profile`.

    ``profile``: a Profile, a bundled profile name, or a path to a TOML file (default
    ``"default"``).  ``clock``: a clock object, or ``"virtual"`` / ``"wall"``; default a new
    :class:`VirtualClock`.  A :class:`WallClock` that is not running yet is started here and closed
    by :meth:`close`.  ``seed`` derives the independent random streams for service-time jitter, the
    firmware's RNG and fault probabilities: the same seed and the same instruction sequence give
    the same execution log.

    Every instruction takes :attr:`lock` (an ``RLock``) and returns an
    :class:`~apformats.results.ApResult`.
    """

    def __init__(
        self,
        profile: Profile | str | Path | None = None,
        *,
        clock: VirtualClock | WallClock | str | None = None,
        seed: int = 0,
    ) -> None:
        if profile is None:
            profile = "default"
        self.profile: Profile = profile if isinstance(profile, Profile) else load_profile(profile)
        self._owns_clock = False
        if clock is None or clock == "virtual":
            clock = VirtualClock()
        elif clock == "wall":
            clock = WallClock()
        if isinstance(clock, str):
            raise ValueError(f"clock must be a clock object, 'virtual' or 'wall', got {clock!r}")
        self.clock = clock
        self.seed = seed
        self.lock = threading.RLock()
        self.execution_log = ExecutionLog(self.lock)
        self._jitter_rng = _substream(seed, "jitter")
        self._firmware_rng = _substream(seed, "firmware")
        self.control = ControlPlane(self, _substream(seed, "faults"))
        self._jitter = self.profile.timing.jitter
        self._seq = 0
        self._t0 = clock.now()
        self._closed = False
        self._irq_due: dict[int, Queue] = {}  # queues whose interruption waits for the next flush
        self._irq_flush: TimerHandle | None = None
        self._service_cache: dict[tuple[str, str], float] = {}

        self._cards: dict[int, Card] = {spec.id: Card(spec) for spec in self.profile.cards}
        self.stores: dict[tuple[int, int], Any] = {}
        for card in self._cards.values():
            for q in card.queues.values():
                if not q.usage:
                    continue
                store = firmware_stubs.DomainStore()
                self.stores[(card.id, q.domain)] = store
                q.fw_ctx = firmware_stubs.FirmwareContext(
                    domain=q.domain,
                    store=store,
                    rng=self._firmware_rng,
                    max_mod_bytes=card.type.max_mod_bytes,
                    mode=card.type.mode,
                    compute=self.profile.timing.compute,
                    arithmetic=self.profile.execution.arithmetic,
                )
        self._qids = sorted(q.qid for c in self._cards.values() for q in c.queues.values() if q.usage)
        # Where engines compute (profile ``execution``): on a virtual clock always inline, so a
        # simulation never depends on another thread's or process's timing.
        execution = self.profile.execution
        self.engines: EngineBackend | None = None
        if not isinstance(clock, VirtualClock):
            self.engines = make_engines(
                execution.backend, execution.workers, self._on_computed, self._on_engines_lost
            )

        if isinstance(clock, WallClock) and not clock.running:
            clock.start()
            self._owns_clock = True

    def __repr__(self) -> str:
        return f"<Emulator profile={self.profile.name!r} seed={self.seed} t={self.clock.now():.6f}>"

    def __enter__(self) -> Emulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the engine workers and a WallClock this emulator started (idempotent).  Pending work
        is left as it is."""
        self._closed = True
        if self.engines is not None:
            self.engines.close()
        if self._owns_clock and isinstance(self.clock, WallClock):
            self.clock.close()

    # --- topology ------------------------------------------------------------------------------

    def qids(self) -> list[int]:
        """Configured usage APQNs, sorted (control-only domains are not listed)."""
        return list(self._qids)

    def cards(self) -> list[int]:
        return list(self._cards)

    def card_state(self, card: int) -> CardState:
        return self._cards[card].state

    # --- instructions --------------------------------------------------------------------------

    def execute(self, command: Command, notify: Callable[[int], object] | None = None) -> ApResult:
        """Run one AP instruction: the entry every way in uses (the in-process transport, the frame
        server for ZeroMQ and USB), so an opcode meets an instruction method in one table only
        (:data:`INSTRUCTIONS`).  ``notify`` is what an AQIC that enables interrupts registers; the
        other instructions ignore it."""
        return INSTRUCTIONS[command.instr](self, command, notify)

    def tapq(self, qid: int, t_bit: bool = True) -> ApResult:
        """Test AP queue: the status word, plus GR2 hardware info when ``t_bit`` and the RC allow."""
        with self.lock:
            card, q, rc = self._gate(qid, Instr.TAPQ)
            if rc is None:
                rc = RC.NORMAL
            status = self._status(q, rc)
            hw = card.hwinfo if (t_bit and card is not None and rc in HWINFO_TRUSTED) else None
            return ApResult(status, hwinfo=hw)

    def nqap(self, qid: int, psmid: int, message: bytes, special: bool = False) -> ApResult:
        """Enqueue ``message`` under ``psmid``; it holds a slot until its reply is DQAP'd."""
        if not 0 <= psmid <= _MAX_PSMID:
            raise ValueError(f"psmid {psmid!r} is not a 64-bit value")
        with self.lock:
            card, q, rc = self._gate(qid, Instr.NQAP)
            if rc is not None:
                return ApResult(self._status(q, rc))
            assert card is not None and q is not None
            if not q.usage:
                return ApResult(self._status(q, RC.INVALID_DOMAIN))
            if special and not card.type.apsc:
                return ApResult(self._status(q, RC.REQ_FAC_NOT_INST))
            if len(message) > card.type.max_msg_size:
                return ApResult(self._status(q, RC.MESSAGE_TOO_BIG))
            if q.held >= q.slots:
                return ApResult(self._status(q, RC.Q_FULL))
            self._accept(card, q, psmid, bytes(message), special)
            status = self._status(q, RC.NORMAL)
        if self._irq_due:
            self._schedule_irq_flush()
        return ApResult(status)

    def dqap(self, qid: int) -> ApResult:
        """Take the oldest available reply; ``NO_PENDING_REPLY`` (queue_empty iff nothing held)."""
        with self.lock:
            _card, q, rc = self._gate(qid, Instr.DQAP)
            if rc is not None:
                return ApResult(self._status(q, rc))
            assert q is not None
            if not q.replies:
                q.irq_pending = False
                return ApResult(self._status(q, RC.Q_FULL))  # NO_PENDING_REPLY, same number
            q.irq_pending = False  # the host reads: the next reply raises an interruption again
            msg = q.replies.popleft()
            msg.entry.dequeued = self.clock.now()
            reply = msg.reply
            assert reply is not None
            return ApResult(self._status(q, RC.NORMAL), psmid=msg.psmid, reply=reply)

    def rapq(self, qid: int, fbit: bool = False) -> ApResult:
        """Reset the queue: held requests and replies are discarded, interrupts end disabled, and
        every instruction answers RESET_IN_PROGRESS for the profile's reset time."""
        return self._reset_instr(qid, Instr.RAPQ, zeroize=False)

    def zapq(self, qid: int, fbit: bool = False) -> ApResult:
        """Reset and zeroize: as :meth:`rapq`, and the domain's key slots are cleared."""
        return self._reset_instr(qid, Instr.ZAPQ, zeroize=True)

    def aqic(self, qid: int, enable: bool, notify: Callable[[int], object] | None = None) -> ApResult:
        """Enable or disable interrupts; while enabled, ``notify(qid)`` is called (in clock-callback
        context, without the emulator lock held) each time replies become available.  Replies
        already waiting when interrupts are enabled do not raise one: DQAP after enabling."""
        with self.lock:
            _card, q, rc = self._gate(qid, Instr.AQIC)
            if rc is not None:
                return ApResult(self._status(q, rc))
            assert q is not None
            q.irq = bool(enable)
            q.notify = notify if enable else None
            q.irq_pending = False
            if not enable:
                self._irq_due.pop(q.qid, None)
            return ApResult(self._status(q, RC.NORMAL))

    def zeroize(self, qid: int) -> None:
        """Take an APQN back from a session that is gone (not an instruction: the server's APQN
        assignment calls it).  ZAPQ semantics whatever state the card is in, so the next session
        assigned the APQN finds nothing of the last one: held requests and replies (stored
        machine-failure replies too) discarded, interrupts off, the domain's key slots cleared.  The
        reset completes at once: the next session is handed a clean queue, not one still resetting.
        An APQN this emulator lacks is ignored."""
        with self.lock:
            card = self._cards.get((qid >> 8) & 0xFF) if 0 <= qid <= 0xFFFF else None
            q = None if card is None else card.queues.get(qid & 0xFF)
            if q is not None:
                self._reset_queue(q, 0.0, zeroize=True)

    def put_back(self, qid: int, replies: Sequence[tuple[int, bytes]]) -> int:
        """Return replies the host took (DQAP) but never received to the *front* of ``qid``'s
        replies, in the order given, so its next DQAPs take them again.  Not an instruction: the
        frame server calls it for a resumed session's REOFFER (the answer that carried them was lost
        with the link).  Not a new run either: each ``(psmid, reply)`` goes back to the execution-log
        entry it came from (the latest of ``qid`` taken under that psmid), whose ``dequeued`` is
        cleared, since the host does not have it; one with no such entry is not put back.  A queue
        that does not take a DQAP now (resetting, card failed or gone) takes none back: its card
        would have discarded them.  Returns how many went back."""
        with self.lock:
            _card, q, rc = self._gate(qid, Instr.DQAP)
            if rc is not None or q is None:
                return 0
            back = []
            for psmid, reply in replies:
                taken = [e for e in self.execution_log._of(psmid) if e.qid == qid and e.dequeued is not None]
                if not taken or taken[-1].outcome not in ("completed", "error"):
                    continue
                entry = taken[-1]
                msg = Message(0, q, psmid, b"", entry.function, entry)  # seq 0: older than all it holds
                msg.reply, msg.ok = reply, entry.outcome == "completed"
                entry.dequeued = None
                back.append(msg)
            q.replies.extendleft(reversed(back))
            return len(back)

    # --- statistics ----------------------------------------------------------------------------

    def stats(self) -> EmulatorStats:
        """Per card and per queue counts, held messages and engine utilisation on the clock."""
        with self.lock:
            return collect_stats(self, self._cards.values(), self.clock.now(), self._t0)

    # --- instruction helpers -------------------------------------------------------------------

    def _gate(self, qid: int, instr: Any) -> tuple[Card | None, Queue | None, int | None]:
        """Find the queue and the RC its card's and its own state impose (None: go ahead)."""
        card = self._cards.get((qid >> 8) & 0xFF) if 0 <= qid <= 0xFFFF else None
        if card is None:
            return None, None, RC.Q_NOT_AVAIL
        q = card.queues.get(qid & 0xFF)
        if q is None:
            return card, None, RC.INVALID_ADDRESS
        rc = CARD_GATE[card.state][instr]
        if rc is None:
            rc = QUEUE_GATE[q.state][instr]
        return card, q, rc

    def _status(self, q: Queue | None, rc: int) -> QueueStatus:
        if q is None or rc in _BARE_RCS:
            return QueueStatus(rc)
        held = q.held
        return QueueStatus(
            rc,
            queue_empty=held == 0,
            replies_waiting=bool(q.replies),
            queue_full=held >= q.slots,
            irq_enabled=q.irq,
        )

    def _reset_instr(self, qid: int, instr: Any, *, zeroize: bool) -> ApResult:
        with self.lock:
            _card, q, rc = self._gate(qid, instr)
            if rc is not None:
                return ApResult(self._status(q, rc))
            assert q is not None
            self._reset_queue(q, self.profile.timing.reset_time, zeroize=zeroize)
            return ApResult(self._status(q, RC.NORMAL))

    # --- the engine model ----------------------------------------------------------------------

    def _accept(self, card: Card, q: Queue, psmid: int, message: bytes, special: bool) -> None:
        try:
            function = request_function(message)
        except FormatError:
            function = firmware_stubs.INVALID_FUNCTION
        now = self.clock.now()
        entry = self.execution_log._add(psmid, q.qid, function, now)
        self._seq += 1
        msg = Message(self._seq, q, psmid, message, function, entry)
        msg.special = special
        q.accepted += 1
        card.accepted += 1
        q.waiting.append(msg)
        if not q.in_ready:
            q.in_ready = True
            card.ready.append(q)
        if self.control.watching:
            # A FailRequest marks the message before an engine can start it; after_requests triggers
            # fire after the dispatch, so a failure "after n requests" finds the nth one held.
            self.control.mark_request(q, msg)
            self._dispatch(card)
            self.control.after_accept(card)
        else:
            self._dispatch(card)

    def _dispatch(self, card: Card, at: float | None = None) -> None:
        """Give free engines work: round-robin over the card's queues, FIFO within each queue.

        ``at``: the card's time the engines came free, when that was earlier than now -- an engine
        whose service time ended at ``at`` takes its next message then (or when it was enqueued, if
        later), not when this thread got round to it (see :meth:`_on_complete`).  The choice of
        message is made now: one that arrived on another queue since ``at`` may take its round-robin
        turn before an older one, which a card that was never late would have started first."""
        if card.state is not CardState.NORMAL:
            return
        ready, idle = card.ready, card.idle
        while idle and ready:
            q = ready.popleft()
            msg = q.waiting.popleft()
            if q.waiting:
                ready.append(q)
            else:
                q.in_ready = False
            engine = card.engines[heapq.heappop(idle)]
            self._start(card, engine.index, msg, at)

    def _start(self, card: Card, index: int, msg: Message, at: float | None = None) -> None:
        entry = msg.entry
        now = self.clock.now() if at is None else max(at, entry.enqueued)
        engine = card.engines[index]
        q = msg.queue
        engine.message = msg
        engine.busy_since = now
        msg.engine = index
        entry.engine = index
        entry.started = now
        entry.outcome = "running"
        q.running.append(msg)
        if msg.fail_code is not None:  # an injected failure: no firmware, no effect
            msg.reply = build_error_reply(msg.fail_code)
            entry.reply_code = msg.fail_code
            msg.ok = False
        elif self.engines is not None and offloaded(msg.function) and self._offload(card, msg):
            pass  # computed elsewhere: see _offload
        else:
            result = firmware_stubs.execute(msg.request, q.fw_ctx)
            msg.reply = result.reply
            msg.ok = result.ok
            entry.reply_code = result.reply_code
            entry.effect = result.effect
        delay = self._service_time(card, msg.function)
        engine.due = now + delay
        if msg.computing:
            if delay > 0.0:
                engine.timer = self.clock.call_at(engine.due, lambda: self._on_complete(card, engine, msg))
        elif delay <= 0.0:  # no service time: the engine was busy while the firmware computed
            self._finish(card, engine, msg)
        else:
            engine.timer = self.clock.call_at(engine.due, lambda: self._on_complete(card, engine, msg))

    def _offload(self, card: Card, msg: Message) -> bool:
        """Hand the message's firmware run to the engine backend.  It ends when both its answer is
        back (:meth:`_on_computed`) and its service time is over (:meth:`_on_complete`), whichever
        is later.  False (the backend refused: closed, or no worker could start): compute inline."""
        assert self.engines is not None
        msg.computing = True
        if not self.engines.submit(card.id, msg, msg.request, msg.queue.fw_ctx):
            msg.computing = False
        return msg.computing

    def _service_time(self, card: Card, function: str) -> float:
        key = (card.type.name, function)
        base = self._service_cache.get(key)
        if base is None:
            base = self._service_cache[key] = card.type.base_service_time(function)
        if card.slow:
            base *= card.slow_factor
        if self._jitter and base > 0.0:
            base *= 1.0 + self._jitter * (2.0 * self._jitter_rng.random() - 1.0)
        return base

    def _finish(self, card: Card, engine: Any, msg: Message, end: float | None = None) -> None:
        """The engine is done (at ``end`` on the card's time, else now): the reply becomes available
        and the engine free."""
        now = self.clock.now() if end is None else end
        self._free_engine(card, engine, now)
        q = msg.queue
        q.running.remove(msg)
        entry = msg.entry
        entry.ended = now
        entry.outcome = "completed" if msg.ok else "error"
        q.replies.append(msg)
        self._raise_irq(q)

    def _free_engine(self, card: Card, engine: Any, now: float) -> None:
        if engine.timer is not None:
            engine.timer.cancel()
            engine.timer = None
        engine.busy_time += now - engine.busy_since
        engine.message = None
        heapq.heappush(card.idle, engine.index)

    def _on_complete(self, card: Card, engine: Any, msg: Message) -> None:
        with self.lock:
            if engine.message is not msg:  # superseded by a reset or a failure
                return
            engine.timer = None
            if msg.computing:  # service time over, answer not back yet: _on_computed finishes it
                return
            # On the card's time the engine finished when its service time was over, however late
            # this callback runs (a wall clock's thread busy elsewhere): the next message starts
            # then, so the host's lateness does not stretch the card's service times.
            end = min(engine.due, self.clock.now())
            self._finish(card, engine, msg, end)
            self._dispatch(card, end)
        self._flush_interrupts()

    def _on_computed(self, done: list[tuple[Message, firmware_stubs.FirmwareResult]]) -> None:
        """Answers from the engine backend (its thread, no lock held).  An answer is dropped when its
        message left the engine meanwhile (reset, machine failure, checkstop: that verdict stands)."""
        with self.lock:
            cards: list[Card] = []
            for msg, result in done:
                if not msg.computing:
                    continue
                msg.computing = False
                card = msg.queue.card
                if msg.engine is None:
                    continue
                engine = card.engines[msg.engine]
                if engine.message is not msg:
                    continue
                msg.reply = result.reply
                msg.ok = result.ok
                msg.entry.reply_code = result.reply_code
                msg.entry.effect = result.effect
                if engine.timer is not None:  # the service time is not over yet: _on_complete finishes
                    continue
                self._finish(card, engine, msg)
                if card not in cards:
                    cards.append(card)
            for card in cards:
                self._dispatch(card)
        self._flush_interrupts()

    def _on_engines_lost(self, card_id: int) -> None:
        """A worker process of the card died (or a worker thread's computation raised): the card
        suffers a machine failure, so everything it held is answered by the firmware's
        machine-failure handler instead of waiting forever."""
        with self.lock:
            card = self._cards.get(card_id)
            if card is None or self._closed:
                return
            self._card_event(card, CardEvent.MACHINE_FAILURE, recovery_time=self.profile.timing.recovery_time)
        self._flush_interrupts()

    # --- interrupts ----------------------------------------------------------------------------

    def _raise_irq(self, q: Queue) -> None:
        """A reply became available on ``q`` (lock held): make its interruption pending, unless it
        already is.  As on the machine, where the adapter sets the queue's notification indicator
        and the host clears it and then reads the queue until it is empty, one interruption stands
        for every reply that arrives before the host next reads: a DQAP of the queue (any outcome)
        clears it, as do AQIC and a reset.  Every reply is still found -- a DQAP's status says
        whether more wait, and one arriving after it raises a new interruption -- but a host that
        reads slower than the engines finish gets one interrupt per read, not one per reply."""
        if q.irq and q.notify is not None and not q.irq_pending:
            q.irq_pending = True
            self._irq_due[q.qid] = q

    def _schedule_irq_flush(self) -> None:
        """Called outside the lock after an instruction made replies available inline: deliver the
        interrupt from clock-callback context, as a real adapter interrupt arrives asynchronously.
        A flush already scheduled delivers every interrupt due until it runs (it takes ``_irq_due``
        under the lock), so only the first NQAP of a batch needs the lock here: the unlocked look is
        checked again under it."""
        if self._irq_flush is not None:
            return
        with self.lock:
            if self._irq_flush is None and self._irq_due:
                self._irq_flush = self.clock.call_later(0.0, self._flush_interrupts)

    def _flush_interrupts(self) -> None:
        with self.lock:
            if self._irq_flush is not None:
                self._irq_flush.cancel()
                self._irq_flush = None
            if not self._irq_due:
                return
            # a queue read since its interruption was raised has none pending any more: the read
            # took the reply (or saw it waiting), so the interrupt would only send the host to an
            # empty queue
            due = [(q.qid, q.notify) for q in self._irq_due.values() if q.irq_pending and q.notify]
            self._irq_due.clear()
        for qid, notify in due:
            notify(qid)

    # --- queue resets and busy periods ---------------------------------------------------------

    def _discard(self, q: Queue, now: float) -> None:
        """Drop every message the queue holds (reset, checkstop, deconfigure): logged ``discarded``."""
        card = q.card
        for msg in list(q.running):
            engine = card.engines[msg.engine] if msg.engine is not None else None
            if engine is not None and engine.message is msg:
                self._free_engine(card, engine, now)
        victims = [*q.waiting, *q.running, *q.replies, *q.stored]
        for msg in victims:
            entry = msg.entry
            if entry.outcome in ("queued", "running"):
                entry.outcome = "discarded"
                entry.ended = now
            else:
                entry.outcome = "discarded"  # its reply is lost; ended keeps when it was produced
        q.waiting.clear()
        q.running.clear()
        q.replies.clear()
        q.stored.clear()
        if q.in_ready:
            q.in_ready = False
            card.ready.remove(q)
        q.irq_pending = False
        self._irq_due.pop(q.qid, None)

    def _reset_queue(
        self, q: Queue, duration: float, *, zeroize: bool, on_end: Callable[[], None] | None = None
    ) -> None:
        """Discard what the queue holds, interrupts off; RESET_IN_PROGRESS for ``duration``.  A reset
        during a reset restarts the period; every waiter's ``on_end`` runs when the last one ends."""
        now = self.clock.now()
        self._discard(q, now)
        q.irq = False
        q.notify = None
        if zeroize:
            store = self.stores.get((q.card.id, q.domain))
            if store is not None:
                store.zeroize()
        if on_end is not None:
            q.on_reset_done.append(on_end)
        if q.reset_timer is not None:
            q.reset_timer.cancel()
            q.reset_timer = None
        if duration > 0:
            q.resetting = True
            q.reset_timer = self.clock.call_later(duration, lambda: self._reset_timer_fired(q))
        else:
            self._end_reset(q)
        self._dispatch(q.card)  # engines freed by the discard may take other queues' work

    def _reset_timer_fired(self, q: Queue) -> None:
        with self.lock:
            q.reset_timer = None
            self._end_reset(q)

    def _end_reset(self, q: Queue) -> None:
        if q.reset_timer is not None:
            q.reset_timer.cancel()
            q.reset_timer = None
        q.resetting = False
        self._run_callbacks(q.on_reset_done)

    def _start_busy(self, q: Queue, duration: float, *, on_end: Callable[[], None]) -> Callable[[], None]:
        q.busy += 1
        state = {"over": False}

        def end() -> None:
            with self.lock:
                if state["over"]:
                    return
                state["over"] = True
                timer.cancel()
                q.busy -= 1
                on_end()

        timer = self.clock.call_later(duration, end)
        return end

    def _slow_engines(
        self, card: Card, factor: float, duration: float | None, *, on_end: Callable[[], None]
    ) -> Callable[[], None]:
        card.slow.append(factor)
        state: dict[str, Any] = {"over": False, "timer": None}

        def end() -> None:
            with self.lock:
                if state["over"]:
                    return
                state["over"] = True
                if state["timer"] is not None:
                    state["timer"].cancel()
                card.slow.remove(factor)
                on_end()

        if duration is not None:
            state["timer"] = self.clock.call_later(duration, end)
        return end

    # --- what the control plane may do (emulator.control.FaultTarget) ---------------------------

    def find_card(self, card_id: int) -> Card | None:
        return self._cards.get(card_id)

    def fault_card_event(self, card: Card, event: CardEvent, **kw: Any) -> bool:
        return self._card_event(card, event, **kw)

    def fault_reset_queue(self, q: Queue, duration: float, *, on_end: Callable[[], None]) -> None:
        self._reset_queue(q, duration, zeroize=False, on_end=on_end)

    def fault_end_reset(self, q: Queue) -> None:
        self._end_reset(q)

    def fault_busy(self, q: Queue, duration: float, *, on_end: Callable[[], None]) -> Callable[[], None]:
        return self._start_busy(q, duration, on_end=on_end)

    def fault_slow_engines(
        self, card: Card, factor: float, duration: float | None, *, on_end: Callable[[], None]
    ) -> Callable[[], None]:
        return self._slow_engines(card, factor, duration, on_end=on_end)

    def flush_interrupts(self) -> None:
        self._flush_interrupts()

    # --- card lifecycle (table-driven) -----------------------------------------------------------

    def _card_event(self, card: Card, event: CardEvent, **kw: Any) -> bool:
        """Apply ``event`` per :data:`~emulator.lifecycle.CARD_TRANSITIONS`; True if an action ran."""
        next_state, action = CARD_TRANSITIONS[card.state][event]
        card.state = next_state
        if action is None:
            return False
        getattr(self, f"_act_{action}")(card, **kw)
        return True

    def _act_fail(
        self, card: Card, *, recovery_time: float, on_end: Callable[[], None] | None = None
    ) -> None:
        """Machine failure: one stored reply per held message that has no reply yet, marked
        in-process (with its engine) or request-pending; replies already completed stay available."""
        now = self.clock.now()
        victims: list[Message] = []
        for q in card.queues.values():
            victims.extend(q.running)
            victims.extend(q.waiting)
        victims.sort(key=lambda m: m.seq)
        held = [
            firmware_stubs.HeldMessage(
                m.psmid,
                MachineFailureState.IN_PROCESS
                if m in m.queue.running
                else MachineFailureState.REQUEST_PENDING,
                m.engine if m in m.queue.running else None,
            )
            for m in victims
        ]
        replies = firmware_stubs.format_machine_failure(held) if held else []
        for engine in card.engines:
            if engine.message is not None:
                self._free_engine(card, engine, now)
        for m, h, (_psmid, data) in zip(victims, held, replies, strict=True):
            entry = m.entry
            entry.ended = now
            entry.reply_code = data[4] if len(data) > 4 else None
            if h.state is MachineFailureState.IN_PROCESS:
                entry.outcome = "in-process-failed"
            else:
                entry.outcome = "pending-failed"
                m.engine = None
            m.reply = data
            m.queue.stored.append(m)
        for q in card.queues.values():
            q.running.clear()
            q.waiting.clear()
            q.in_ready = False
        card.ready.clear()
        if on_end is not None:
            card.on_recovered.append(on_end)
        card.recovery_timer = self.clock.call_later(recovery_time, lambda: self._recovery_done(card))

    def _recovery_done(self, card: Card) -> None:
        with self.lock:
            card.recovery_timer = None
            self._card_event(card, CardEvent.RECOVERY_DONE)
        self._flush_interrupts()

    def _act_recover(self, card: Card) -> None:
        """Recovery complete: the stored replies become available (oldest first), interrupts fire."""
        if card.recovery_timer is not None:
            card.recovery_timer.cancel()
            card.recovery_timer = None
        for q in card.queues.values():
            if q.stored:
                q.replies.extend(q.stored)
                q.stored.clear()
                self._raise_irq(q)
        self._run_callbacks(card.on_recovered)
        self._dispatch(card)
        if self._irq_due and self._irq_flush is None:
            self._irq_flush = self.clock.call_later(0.0, self._flush_interrupts)

    def _act_kill(self, card: Card) -> None:
        """Checkstop / deconfigure: everything held is lost, no replies ever."""
        now = self.clock.now()
        if card.recovery_timer is not None:
            card.recovery_timer.cancel()
            card.recovery_timer = None
        for q in card.queues.values():
            self._discard(q, now)
            q.irq = False
            q.notify = None
            self._end_reset(q)
        self._run_callbacks(card.on_recovered)

    def _act_revive(self, card: Card) -> None:
        """Back from checkstop / deconfigure: empty queues, reset, interrupts off."""
        for q in card.queues.values():
            self._discard(q, self.clock.now())
            q.irq = False
            q.notify = None
            self._end_reset(q)
        self._run_callbacks(card.on_revive)

    @staticmethod
    def _run_callbacks(callbacks: list[Callable[[], None]]) -> None:
        pending = list(callbacks)
        callbacks.clear()
        for cb in pending:
            cb()


_Notify = Callable[[int], object] | None

#: opcode -> how :meth:`Emulator.execute` runs it.  The one place an ``Instr`` meets an emulator method.
INSTRUCTIONS: dict[Instr, Callable[[Emulator, Command, _Notify], ApResult]] = {
    Instr.TAPQ: lambda emu, c, irq: emu.tapq(c.qid, t_bit=c.flag),
    Instr.NQAP: lambda emu, c, irq: emu.nqap(c.qid, c.psmid, c.message, special=c.special),
    Instr.DQAP: lambda emu, c, irq: emu.dqap(c.qid),
    Instr.RAPQ: lambda emu, c, irq: emu.rapq(c.qid, fbit=c.flag),
    Instr.ZAPQ: lambda emu, c, irq: emu.zapq(c.qid, fbit=c.flag),
    Instr.AQIC: lambda emu, c, irq: emu.aqic(c.qid, c.flag, notify=irq if c.flag else None),
}
