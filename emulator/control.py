"""The control plane: fault injection, separate from the instruction API (the lewis pattern).

Tests and operators flip faults here without touching the protocol under test.  Every method
builds a frozen fault (:mod:`emulator.faults`), arms it (now, at a clock time, or after the card's
nth accepted NQAP) and returns it; ``faults()`` lists what is still pending or active and
``clear()`` heals everything.  Faults that need randomness draw from the emulator's fault stream
(``rng``), so a seeded run replays exactly.

``transport_faults`` is a plain thread-safe holder for the servers (drop/corrupt frames,
disconnect); the card model never reads it.

The seam with the card model is two small interfaces, so neither side calls the other's private
names: the control plane acts on the emulator only through :class:`FaultTarget` (which
:class:`emulator.core.Emulator` implements), and the card model tells the control plane about
accepted requests only through :class:`AcceptHooks` (which :class:`ControlPlane` implements).
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

from apformats.results import qid_card, qid_domain, qid_str
from emulator.clock import TimerHandle
from emulator.faults import (
    Busy,
    Checkstop,
    Deconfigure,
    FailRequest,
    Fault,
    MachineFailure,
    ResetInProgress,
    SlowEngines,
)
from emulator.lifecycle import CardEvent

#: Any one fault type: ``inject`` returns the very object it was given, with its type.
F = TypeVar("F", MachineFailure, Checkstop, Deconfigure, ResetInProgress, Busy, SlowEngines, FailRequest)

if TYPE_CHECKING:
    from emulator.clock import Clock
    from emulator.execution_log import Execution, ExecutionLog
    from emulator.model import Card, Message, Queue
    from emulator.profile import Profile

__all__ = ["AcceptHooks", "ControlPlane", "FaultState", "FaultTarget", "TransportFaults"]


class FaultTarget(Protocol):
    """All the control plane may do to the card model (:class:`emulator.core.Emulator` implements it).

    Every method but :meth:`flush_interrupts` is called with :attr:`lock` held.  The ``on_end``
    callbacks tell the control plane a fault is over (it marks the fault ``done``); the callables
    returned by :meth:`fault_busy` and :meth:`fault_slow_engines` end the fault early (``clear``).
    """

    @property
    def lock(self) -> AbstractContextManager[Any]: ...

    @property
    def clock(self) -> Clock: ...

    @property
    def profile(self) -> Profile: ...

    @property
    def execution_log(self) -> ExecutionLog: ...

    def find_card(self, card_id: int) -> Card | None:
        """The card with this id, or None."""
        ...

    def fault_card_event(self, card: Card, event: CardEvent, **kw: Any) -> bool:
        """Apply a card lifecycle event (machine failure, recovery done, checkstop, ...)."""
        ...

    def fault_reset_queue(self, q: Queue, duration: float, *, on_end: Callable[[], None]) -> None:
        """An externally initiated reset: discard what the queue holds, RESET_IN_PROGRESS a while."""
        ...

    def fault_end_reset(self, q: Queue) -> None: ...

    def fault_busy(self, q: Queue, duration: float, *, on_end: Callable[[], None]) -> Callable[[], None]: ...

    def fault_slow_engines(
        self, card: Card, factor: float, duration: float | None, *, on_end: Callable[[], None]
    ) -> Callable[[], None]: ...

    def flush_interrupts(self) -> None:
        """Deliver interrupts a fault made due (called without the lock)."""
        ...


class AcceptHooks(Protocol):
    """What the card model tells the control plane about each accepted NQAP (under its lock).

    ``watching`` is False while no armed fault needs to see requests, so the hot path stays a flag
    test."""

    watching: bool

    def mark_request(self, queue: Queue, msg: Message) -> None:
        """Before dispatch: a FailRequest may claim this message."""
        ...

    def after_accept(self, card: Card) -> None:
        """After dispatch: fire the card's after_requests triggers now due."""
        ...


FaultState = Literal["pending", "active", "done"]


class TransportFaults:
    """Faults for the transports to apply to their own frames; consumed by the servers.

    Counters are decremented by the ``take_*`` methods, one frame at a time, from any thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._drop = 0
        self._corrupt = 0
        self._disconnect = 0

    def __repr__(self) -> str:
        return f"TransportFaults(drop={self._drop}, corrupt={self._corrupt}, disconnect={self._disconnect})"

    def drop_frames(self, n: int = 1) -> None:
        """The next ``n`` frames (either direction, the server chooses) are silently dropped."""
        with self._lock:
            self._drop += _count(n)

    def corrupt_frames(self, n: int = 1) -> None:
        """The next ``n`` frames are corrupted in flight."""
        with self._lock:
            self._corrupt += _count(n)

    def disconnect(self) -> None:
        """The server drops its peer(s) once, as a lost connection would."""
        with self._lock:
            self._disconnect += 1

    def take_drop(self) -> bool:
        """True (and one fewer pending) if this frame must be dropped."""
        with self._lock:
            if self._drop:
                self._drop -= 1
                return True
            return False

    def take_corrupt(self) -> bool:
        with self._lock:
            if self._corrupt:
                self._corrupt -= 1
                return True
            return False

    def take_disconnect(self) -> bool:
        with self._lock:
            if self._disconnect:
                self._disconnect -= 1
                return True
            return False

    def pending(self) -> dict[str, int]:
        with self._lock:
            return {"drop": self._drop, "corrupt": self._corrupt, "disconnect": self._disconnect}

    def clear(self) -> None:
        with self._lock:
            self._drop = self._corrupt = self._disconnect = 0


#: Most frames one drop_frames / corrupt_frames call may ask for.
MAX_FRAMES = 1_000_000


def _count(n: int) -> int:
    if type(n) is not int or not 0 <= n <= MAX_FRAMES:
        raise ValueError(f"frame count must be an int in [0, {MAX_FRAMES}], got {n!r}")
    return n


@dataclass(eq=False)
class _Armed:
    """Book-keeping for one armed fault (mutable; the fault itself is frozen)."""

    fault: Fault
    state: FaultState = "pending"
    timer: TimerHandle | None = None  # the `at=` trigger, or the end of a timed fault
    target: int = 0  # card's accepted-count at which an after_requests trigger fires
    seen: int = 0  # FailRequest: matching NQAPs seen so far
    end: Callable[[], None] | None = field(default=None, repr=False)  # heals an active fault


class ControlPlane:
    """Fault injection for one :class:`~emulator.core.Emulator` (``emu.control``)."""

    def __init__(self, emu: FaultTarget, rng: random.Random) -> None:
        self._emu = emu
        self.rng = rng
        self.transport_faults = TransportFaults()
        self._armed: list[_Armed] = []
        self._count_triggers: dict[int, list[_Armed]] = {}  # card → armed after_requests faults
        self._request_faults: list[_Armed] = []
        #: True while anything must look at each accepted NQAP (keeps the hot path a flag test).
        self.watching = False

    def __repr__(self) -> str:
        return f"<ControlPlane faults={self.faults()!r} transport={self.transport_faults!r}>"

    # --- card-level faults ---------------------------------------------------------------------

    def machine_failure(
        self,
        card: int,
        recovery_time: float | None = None,
        *,
        at: float | None = None,
        after_requests: int | None = None,
    ) -> MachineFailure:
        """Non-recoverable failure of ``card``; recovery takes ``recovery_time`` (profile default)."""
        return self.inject(
            MachineFailure(card=card, recovery_time=recovery_time, at=at, after_requests=after_requests)
        )

    def checkstop(
        self, card: int, *, at: float | None = None, after_requests: int | None = None
    ) -> Checkstop:
        return self.inject(Checkstop(card=card, at=at, after_requests=after_requests))

    def deconfigure(
        self, card: int, *, at: float | None = None, after_requests: int | None = None
    ) -> Deconfigure:
        return self.inject(Deconfigure(card=card, at=at, after_requests=after_requests))

    def restore(self, card: int) -> None:
        """End a checkstop or deconfiguration now: the card's queues come back empty and reset."""
        with self._emu.lock:
            self._emu.fault_card_event(self._card(card), CardEvent.RESTORE)

    def slow_engines(
        self,
        card: int,
        factor: float,
        duration: float | None = None,
        *,
        at: float | None = None,
        after_requests: int | None = None,
    ) -> SlowEngines:
        return self.inject(
            SlowEngines(card=card, factor=factor, duration=duration, at=at, after_requests=after_requests)
        )

    # --- queue-level faults --------------------------------------------------------------------

    def reset_in_progress(
        self, qid: int, duration: float, *, at: float | None = None, after_requests: int | None = None
    ) -> ResetInProgress:
        return self.inject(ResetInProgress(qid=qid, duration=duration, at=at, after_requests=after_requests))

    def busy(
        self, qid: int, duration: float, *, at: float | None = None, after_requests: int | None = None
    ) -> Busy:
        return self.inject(Busy(qid=qid, duration=duration, at=at, after_requests=after_requests))

    def fail_request(
        self,
        reply_code: int,
        qid: int | None = None,
        nth: int | None = None,
        *,
        probability: float | None = None,
    ) -> FailRequest:
        return self.inject(FailRequest(reply_code=reply_code, qid=qid, nth=nth, probability=probability))

    # --- transport faults and reads: the same names as a server's control plane ------------------

    def drop_frames(self, n: int = 1) -> dict[str, int]:
        """Drop the next ``n`` frames the wire owner serving this emulator sends (a ``tcp://`` server,
        the ``usb://`` device); returns the transport faults pending.  An ``emu:`` client has no
        wire: it never meets these."""
        self.transport_faults.drop_frames(n)
        return self.transport_faults.pending()

    def corrupt_frames(self, n: int = 1) -> dict[str, int]:
        """Corrupt the next ``n`` frames sent (see :meth:`drop_frames`); returns what is pending."""
        self.transport_faults.corrupt_frames(n)
        return self.transport_faults.pending()

    def disconnect(self) -> dict[str, int]:
        """Drop the link once: a server serving this emulator disconnects every client at its next
        turn, the USB device falls off the bus and re-enumerates; returns what is pending.  (A
        server's control plane can also drop one client: ``disconnect(client=...)`` there.)"""
        self.transport_faults.disconnect()
        return self.transport_faults.pending()

    def execution_log(self, psmid: int | None = None) -> list[Execution]:
        """What actually ran: every entry held, or one psmid's (``emu.execution_log`` has the rest)."""
        log_ = self._emu.execution_log
        return log_.entries() if psmid is None else log_.for_psmid(psmid)

    def now(self) -> float:
        """The emulator's clock, in seconds (virtual or wall)."""
        return float(self._emu.clock.now())

    # --- generic -------------------------------------------------------------------------------

    def inject(self, fault: F) -> F:
        """Arm any fault object (the named methods above all come here)."""
        with self._emu.lock:
            self._validate(fault)
            armed = _Armed(fault)
            self._armed.append(armed)
            if isinstance(fault, FailRequest):
                self._request_faults.append(armed)
                self.watching = True
            elif fault.at is not None:
                armed.timer = self._emu.clock.call_at(fault.at, lambda: self._fire_locked(armed))
            elif fault.after_requests is not None:
                card = self._card(fault.trigger_card)
                armed.target = card.accepted + fault.after_requests
                self._count_triggers.setdefault(card.id, []).append(armed)
                self.watching = True
            else:
                self._fire(armed)
            return fault

    def faults(self) -> list[Fault]:
        """Faults still pending or active, in the order they were armed."""
        with self._emu.lock:
            return [a.fault for a in self._armed if a.state != "done"]

    def state(self, fault: Fault) -> FaultState:
        """``pending``, ``active`` or ``done`` for a fault this control plane armed."""
        with self._emu.lock:
            for a in self._armed:
                if a.fault is fault:
                    return a.state
        raise KeyError(fault)

    def clear(self) -> None:
        """Heal everything: pending faults are cancelled; active ones end now (a card in
        machine-failure recovery finishes it, a checkstopped or deconfigured card is restored, busy
        and resetting queues resume, slow engines speed up); transport faults are dropped."""
        with self._emu.lock:
            for a in list(self._armed):
                if a.state == "pending" and a.timer is not None:
                    a.timer.cancel()
                if a.state == "active" and a.end is not None:
                    a.end()
                self._done(a)
            self._armed.clear()
            self._count_triggers.clear()
            self._request_faults.clear()
            self.watching = False
        self.transport_faults.clear()

    # --- hooks for the card model (called under the emulator lock) ------------------------------

    def mark_request(self, queue: Queue, msg: Message) -> None:
        """An NQAP was accepted: does a FailRequest claim this message?"""
        for a in self._request_faults:
            f = a.fault
            assert isinstance(f, FailRequest)
            if a.state != "pending" or (f.qid is not None and f.qid != queue.qid):
                continue
            if f.probability is not None:
                if self.rng.random() < f.probability:
                    msg.fail_code = f.reply_code
                    break
                continue
            a.seen += 1
            if a.seen >= (f.nth or 1):
                msg.fail_code = f.reply_code
                self._done(a)
                break
        self._refresh_watching()

    def after_accept(self, card: Card) -> None:
        """An NQAP was accepted and dispatched: fire the card's after_requests triggers now due."""
        triggers = self._count_triggers.get(card.id)
        if triggers:
            due = [a for a in triggers if card.accepted >= a.target]
            if due:
                self._count_triggers[card.id] = [a for a in triggers if a not in due]
                for a in due:
                    if a.state == "pending":
                        self._fire(a)
        self._refresh_watching()

    # --- internals -----------------------------------------------------------------------------

    def _card(self, card_id: int) -> Card:
        card = self._emu.find_card(card_id)
        if card is None:
            raise ValueError(f"no card {card_id} in profile {self._emu.profile.name!r}")
        return card

    def _queue(self, qid: int) -> Queue:
        q = self._card(qid_card(qid)).queues.get(qid_domain(qid))
        if q is None:
            raise ValueError(f"no queue {qid_str(qid)} in profile {self._emu.profile.name!r}")
        return q

    def _validate(self, fault: Fault) -> None:
        if isinstance(fault, FailRequest):
            if fault.qid is not None:
                self._queue(fault.qid)
        elif isinstance(fault, ResetInProgress | Busy):
            self._queue(fault.qid)
        else:
            self._card(fault.card)

    def _refresh_watching(self) -> None:
        self._request_faults = [a for a in self._request_faults if a.state == "pending"]
        self.watching = bool(self._request_faults) or any(self._count_triggers.values())

    def _done(self, a: _Armed) -> None:
        a.state = "done"
        a.end = None

    def _fire_locked(self, a: _Armed) -> None:
        with self._emu.lock:
            if a.state == "pending":
                self._fire(a)
        self._emu.flush_interrupts()

    def _fire(self, a: _Armed) -> None:
        """Apply a fault to the card model; ``a.end`` heals it, ``_done`` runs when it is over."""
        emu, f = self._emu, a.fault
        a.state = "active"
        a.timer = None

        def finished() -> None:
            self._done(a)

        if isinstance(f, MachineFailure):
            card = self._card(f.card)
            rt = emu.profile.timing.recovery_time if f.recovery_time is None else f.recovery_time
            if emu.fault_card_event(card, CardEvent.MACHINE_FAILURE, recovery_time=rt, on_end=finished):

                def end_recovery() -> None:
                    emu.fault_card_event(card, CardEvent.RECOVERY_DONE)

                a.end = end_recovery
            else:
                finished()
        elif isinstance(f, Checkstop | Deconfigure):
            card = self._card(f.card)
            event = CardEvent.CHECKSTOP if isinstance(f, Checkstop) else CardEvent.DECONFIGURE
            emu.fault_card_event(card, event)
            card.on_revive.append(finished)

            def restore() -> None:
                emu.fault_card_event(card, CardEvent.RESTORE)

            a.end = restore
        elif isinstance(f, ResetInProgress):
            q = self._queue(f.qid)
            emu.fault_reset_queue(q, f.duration, on_end=finished)
            a.end = lambda: emu.fault_end_reset(q)
        elif isinstance(f, Busy):
            q = self._queue(f.qid)
            a.end = emu.fault_busy(q, f.duration, on_end=finished)
        elif isinstance(f, SlowEngines):
            a.end = emu.fault_slow_engines(self._card(f.card), f.factor, f.duration, on_end=finished)
        else:  # FailRequest is consumed in mark_request, never fired
            raise AssertionError(f"cannot fire {f!r}")
