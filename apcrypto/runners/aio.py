"""The asyncio runner: the same core, driven from an event loop.

Transport notifications (from an I/O thread or the emulator's clock thread) reach the loop through
``call_soon_threadsafe``; timers are ``loop.call_later`` on the wall clock, or the emulator's
virtual clock with autojump (stepped from the loop whenever the runner has nothing else to do).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from apcrypto.core.driver import DriverCore
from apcrypto.runners.base import RunnerBase
from apcrypto.transport.base import Transport


class AsyncioRunner(RunnerBase):
    def __init__(self, core: DriverCore, transport: Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(core, transport)
        self.loop = loop
        self._vclock = getattr(transport, "virtual_clock", None)
        self._scheduled = False
        self._closed = False
        self.ready_waiters: list[asyncio.Future[bool]] = []
        self._t0 = time.monotonic()
        transport.set_notify(self._notify)

    def now(self) -> float:
        if self._vclock is not None:
            return float(self._vclock.now())
        return time.monotonic() - self._t0

    def arm(self, key: tuple[Any, ...], at: float) -> None:
        self.cancel(key)
        if self._vclock is not None:
            self._timers[key] = self._vclock.call_at(at, lambda: self._fired(key))
        else:
            delay = max(0.0, at - self.now())
            self._timers[key] = self.loop.call_later(delay, self._fired_and_process, key)

    def _fired_and_process(self, key: tuple[Any, ...]) -> None:
        if self._closed:
            return
        self._fired(key)
        self.process()

    def _notify(self) -> None:
        if not self._closed:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                self.loop.call_soon_threadsafe(self.schedule)

    def schedule(self) -> None:
        if not self._scheduled and not self._closed:
            self._scheduled = True
            self.loop.call_soon(self.process)

    def submit_now(self, *args: Any, **kwargs: Any) -> int:
        """As the base's, but with a journal the send waits for :meth:`process` (scheduled by the
        client right after): the submissions of one loop iteration share one commit and one send."""
        self.grouped()
        return super().submit_now(*args, **kwargs)

    def process(self) -> None:
        """Pump the transport; with a virtual clock, step time when there is nothing else to do."""
        self._scheduled = False
        self.release()  # the held submissions: one commit, then the send
        if self._closed:
            return
        lock = getattr(self.transport, "emulator", None)
        ctx = lock.lock if (self._vclock is not None and lock is not None) else None
        if ctx is not None:
            ctx.acquire()
        try:
            did = self.pump()
            if (
                not did
                and self._vclock is not None
                and (self.resolvers or self._bringing_up())
                and self._vclock.next_deadline() is not None
            ):
                self._vclock.step()
                self.pump()
                did = 1
        finally:
            if ctx is not None:
                ctx.release()
        if self.ready_waiters and not self._bringing_up():
            for w in self.ready_waiters:
                if not w.done():
                    w.set_result(True)
            self.ready_waiters.clear()
        if did and self._vclock is not None:
            self.schedule()  # keep time moving while requests wait; other tasks run in between
        elif self.journal is not None:
            self.journal.commit()  # outcomes of this turn, before the loop goes elsewhere

    def _bringing_up(self) -> bool:
        """A queue is still between reset and service: let virtual time run for it too."""
        return self.core.bringing_up()

    def close(self) -> None:
        self.release()
        self._closed = True
        for h in self._timers.values():
            h.cancel()
        self._timers.clear()
