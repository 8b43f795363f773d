"""What every runner does the same way: carry out the core's actions and feed it transport events."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from apcrypto.core.actions import Action, ArmTimer, CancelTimer, Execute, Resolve
from apcrypto.core.driver import DriverCore
from apcrypto.errors import ClientClosed
from apcrypto.transport.base import Transport

log = logging.getLogger("apcrypto.runner")

#: Called with ``(value, error)`` when a request is decided; set by the client per request.
Resolver = Callable[[Any, BaseException | None], None]


class RunnerBase(ABC):
    """Shared action handling.  Subclasses supply the clock (``now``, ``arm``, ``cancel``).

    ``journal`` (an :class:`apcrypto.journal.Journal`, or None): every submitted request is journalled,
    and each batch of actions is handed to it *before* it is carried out, so the psmids of a batch's
    NQAPs are committed before the transport sends them (one commit per batch: a group commit).
    Inside :meth:`grouped` (a burst of submissions in one turn) the sends are held back and go out
    together after one commit, instead of one commit per submission.
    """

    journal: Any = None
    _defer = False  # inside grouped(): hold the sends
    _held: list[Any] | None = None  # commands held back, in order

    def __init__(self, core: DriverCore, transport: Transport) -> None:
        self.core = core
        self.transport = transport
        self.resolvers: dict[int, Resolver] = {}
        self._timers: dict[tuple[Any, ...], Any] = {}  # key -> clock handle with .cancel()

    # -- the clock, per runner --
    @abstractmethod
    def now(self) -> float: ...

    @abstractmethod
    def arm(self, key: tuple[Any, ...], at: float) -> None:
        """Arm ``key`` to fire at ``at`` on this runner's clock (the core's deadlines are absolute)."""

    def cancel(self, key: tuple[Any, ...]) -> None:
        """Cancel the timer ``key`` (for runners whose clock hands out cancellable handles)."""
        h = self._timers.pop(key, None)
        if h is not None:
            h.cancel()

    def _fired(self, key: tuple[Any, ...]) -> None:
        self._timers.pop(key, None)
        self.fire(key)

    # -- shared --
    def apply(self, actions: list[Action]) -> None:
        defer = self._defer
        if self.journal is not None and actions:
            # commit before send (held sends: the commit comes with release())
            self.journal.carry(actions, self.core.ledger.by_psmid.get, commit=not defer)
        for a in actions:
            t = type(a)
            if t is Execute:
                if defer:
                    self._held.extend(a.commands)  # type: ignore[union-attr]
                else:
                    self.transport.submit(a.commands)  # type: ignore[union-attr]
            elif t is Resolve:
                journal = self.journal
                if journal is not None and a.error is not None and self._never_ran(a.rid):  # type: ignore[union-attr]
                    # the caller is about to be told it did not run (and may run it again itself):
                    # the end is in the file first, or a crash now would have the restart re-drive it
                    journal.ended(a.rid)  # type: ignore[union-attr]
                    journal.commit()
                    journal = None
                cb = self.resolvers.pop(a.rid, None)  # type: ignore[union-attr]
                if cb is not None:
                    cb(a.value, a.error)  # type: ignore[union-attr]
                if journal is not None:
                    journal.ended(a.rid)  # type: ignore[union-attr]  # after the caller has it
            elif t is ArmTimer:
                self.arm(a.key, a.at)  # type: ignore[union-attr]
            elif t is CancelTimer:
                self.cancel(a.key)  # type: ignore[union-attr]

    def _never_ran(self, rid: int) -> bool:
        """Whether request ``rid`` provably never ran anywhere (its ledger record says so)."""
        rec = self.core.ledger.records.get(rid)
        return rec is not None and rec.ran_somewhere() is None

    def grouped(self) -> None:
        """From now until :meth:`release`, hold back what would be sent (only with a journal: it
        turns a burst of submissions into one commit and one send)."""
        if self.journal is not None and not self._defer:
            self._defer = True
            self._held = []

    def release(self) -> None:
        """Commit the journal once and send everything held since :meth:`grouped`, in order."""
        if not self._defer:
            return
        self._defer = False
        held, self._held = self._held, None
        if held:
            self.journal.commit()
            self.transport.submit(held)

    def pump(self) -> int:
        """Feed every transport event to the core (a batch at a time) until the transport is quiet."""
        n = 0
        core = self.core
        poll = self.transport.poll
        while True:
            events = poll(0.0)
            if not events:
                return n
            n += len(events)
            if self.journal is not None:
                self.journal.observe(events)  # NQAPs the card refused: journalled as never run
            self.apply(core.on_events(events, self.now()))

    def fire(self, key: tuple[Any, ...]) -> None:
        self.apply(self.core.on_timer(key, self.now()))

    def start_queues(self) -> None:
        for qid in self.transport.qids():
            self.apply(self.core.add_queue(qid, self.now()))

    def fail_undecided(self, error: BaseException) -> int:
        """End every request the core holds with ``error`` (the runner died: nothing will decide
        them any more); returns how many."""
        resolvers, self.resolvers = list(self.resolvers.values()), {}
        for cb in resolvers:
            try:
                cb(None, error)
            except Exception:  # one resolver failing must not keep the others from running
                log.exception("resolver failed")
        return len(resolvers)

    def unplaced(self, resolver: Resolver, error: BaseException) -> None:
        """The core raised on a submission (a bug), so nothing will ever resolve it.  Here the caller
        of :meth:`submit_now` gets the exception itself (asyncio: the submitting coroutine); a runner
        whose callers already hold their futures when the core sees the request fails it instead."""
        return None

    def submit_now(
        self,
        request: Any,
        idempotent: bool | None,
        deadline: float | None,
        resolver: Resolver,
        target: frozenset[int] | None = None,
    ) -> int:
        if self.core.closed:  # close() got here first: the request was never accepted
            resolver(None, ClientClosed("client closed before the request reached the driver core"))
            return 0
        try:
            rid, actions = self.core.submit(
                request, idempotent=idempotent, deadline=deadline, now=self.now(), target=target
            )
        except BaseException as exc:  # a core bug: the request has no rid, so no Resolve will come
            self.unplaced(resolver, exc)
            raise
        self.resolvers[rid] = resolver
        if self.journal is not None:
            # under the id the caller was given for this submission (a future's journal_id)
            self.journal.submitted(rid, request, idempotent, target, getattr(resolver, "journal_id", None))
        self.apply(actions)
        return rid
