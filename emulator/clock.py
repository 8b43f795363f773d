"""The emulator's clocks: one event model, virtual or wall time (the SimPy ``Environment`` pair).

The card model never sleeps and never reads ``time``: it asks its clock for ``now()`` and schedules
callbacks with ``call_at``/``call_later``.  :class:`VirtualClock` runs those callbacks when a test or
the simulation runner steps it, so a whole fault scenario is deterministic and takes milliseconds;
:class:`WallClock` runs them on one pump thread at their monotonic due time, for servers.

Both order callbacks by ``(time, seq)``: equal times run in the order they were scheduled, so a run
never depends on how the heap breaks ties.

Times are checked at the door: a NaN or infinite time or delay is a ``ValueError``, so no caller can
schedule a callback no clock could ever reach.  The wall clock's pump never waits longer than
:data:`MAX_WAIT` at a stretch (a far-off deadline is waited for in slices), so no deadline, however
far, can overflow the OS wait (``OverflowError: timeout value is too large`` used to kill the pump
thread and with it every request in flight).
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Protocol

__all__ = ["Clock", "ClockError", "TimerHandle", "VirtualClock", "WallClock"]

log = logging.getLogger(__name__)

Callback = Callable[[], object]

#: Longest single wait of the wall clock's pump, seconds (a far deadline is waited for in slices).
MAX_WAIT = 60.0
#: Callback exceptions a :class:`WallClock` keeps in ``errors`` (the count goes on in ``error_count``).
MAX_ERRORS_KEPT = 100


class ClockError(RuntimeError):
    """Misuse of a clock: moving it backwards, a runaway callback loop, use after close."""


class TimerHandle:
    """A scheduled callback; ``cancel()`` makes sure it never runs (cancelling twice is harmless)."""

    __slots__ = ("_callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callback) -> None:
        self.when = when
        self._callback: Callback | None = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        self._callback = None  # drop references early: cancelled entries linger in the heap

    def _take(self) -> Callback | None:
        cb, self._callback = self._callback, None
        return cb

    def __repr__(self) -> str:
        state = " cancelled" if self.cancelled else ""
        return f"<TimerHandle when={self.when:.9f}{state}>"


class Clock(Protocol):
    """What the card model needs from a clock."""

    def now(self) -> float: ...

    def call_at(self, when: float, callback: Callback) -> TimerHandle: ...

    def call_later(self, delay: float, callback: Callback) -> TimerHandle: ...


def _check_time(value: float, what: str) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value!r}")
    return value


class _TimerHeap:
    """A heap of ``(when, seq, handle)``; ``seq`` makes ties resolve in scheduling order."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, TimerHandle]] = []
        self._seq = itertools.count()

    def push(self, when: float, callback: Callback) -> TimerHandle:
        handle = TimerHandle(when, callback)
        heapq.heappush(self._heap, (when, next(self._seq), handle))
        return handle

    def peek(self) -> float | None:
        heap = self._heap
        while heap and heap[0][2].cancelled:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def pop(self) -> TimerHandle:
        return heapq.heappop(self._heap)[2]

    def __len__(self) -> int:
        return len(self._heap)


class VirtualClock:
    """Simulated time that moves only when stepped, jumping straight to the next deadline.

    Thread-safe for scheduling (a runner thread and the emulator may both schedule); callbacks run in
    the thread that steps the clock, never with the clock's own lock held, so a callback may schedule
    more callbacks.
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = _check_time(start, "start")
        self._timers = _TimerHeap()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<VirtualClock now={self._now:.9f} pending={len(self._timers)}>"

    def now(self) -> float:
        return self._now

    def call_at(self, when: float, callback: Callback) -> TimerHandle:
        """Schedule ``callback`` at ``when``; a time in the past means "as soon as stepped"."""
        when = _check_time(when, "when")
        with self._lock:
            return self._timers.push(max(when, self._now), callback)

    def call_later(self, delay: float, callback: Callback) -> TimerHandle:
        delay = _check_time(delay, "delay")
        if delay < 0:
            raise ValueError(f"delay must be >= 0, got {delay}")
        with self._lock:
            return self._timers.push(self._now + delay, callback)

    def next_deadline(self) -> float | None:
        """Time of the next live callback, or None when nothing is scheduled."""
        with self._lock:
            return self._timers.peek()

    def step(self) -> bool:
        """Run the next callback (moving time forward to it).  False when nothing was scheduled."""
        with self._lock:
            when = self._timers.peek()
            if when is None:
                return False
            handle = self._timers.pop()
            self._now = max(self._now, when)
            cb = handle._take()
        if cb is not None:
            cb()
        return True

    def run_until(self, t: float) -> int:
        """Run every callback due at or before ``t``, then set the time to ``t``.  Returns the count."""
        t = _check_time(t, "t")
        if t < self._now:
            raise ClockError(f"time can't go backwards: now={self._now}, asked for {t}")
        count = 0
        while True:
            with self._lock:
                when = self._timers.peek()
                if when is None or when > t:
                    self._now = max(self._now, t)
                    return count
            self.step()
            count += 1

    def advance(self, dt: float) -> int:
        """Move time forward by ``dt`` seconds, running what falls due."""
        dt = _check_time(dt, "dt")
        if dt < 0:
            raise ClockError(f"time can't go backwards: advance({dt})")
        return self.run_until(self._now + dt)

    def run_until_idle(self, max_time: float | None = None, *, max_steps: int = 10_000_000) -> int:
        """Step until nothing is scheduled (or the next callback is after ``max_time``).

        ``max_steps`` guards against a callback that reschedules itself forever; exceeding it is a
        :class:`ClockError`, not a hang.  Returns the number of callbacks run.
        """
        count = 0
        while True:
            when = self.next_deadline()
            if when is None or (max_time is not None and when > max_time):
                if max_time is not None and when is not None:
                    self._now = max(self._now, max_time)
                return count
            if count >= max_steps:
                raise ClockError(f"run_until_idle: still busy after {max_steps} callbacks")
            self.step()
            count += 1


class WallClock:
    """Monotonic time from 0 at construction; due callbacks run on one pump thread.

    ``start()`` launches the pump thread (callbacks scheduled before that wait); ``close()`` stops and
    joins it, so a test that closes its clock leaks no thread.  A callback that raises is logged,
    counted in ``error_count`` and kept in ``errors`` (the last :data:`MAX_ERRORS_KEPT`); the pump
    carries on.  The pump itself is supervised the same way: an unexpected error in its own loop is
    logged and counted, and the loop goes on.

    The wake-up path is kept cheap, because a server schedules a callback or two per request: a new
    callback wakes the pump only when it is due before the time the pump already waits for (under a
    backlog it rarely is), and a thread that runs callbacks itself can spare the pump altogether:
    inside :meth:`assisting` a callback due now does not wake it, and :meth:`run_due` runs what is
    due on the calling thread (a server does both around each batch of frames, so an answer and the
    interrupt it causes leave together, with no thread switch between).  Callbacks still run one at
    a time, in ``(time, seq)`` order, whichever thread runs them.
    """

    def __init__(self, *, name: str = "emulator-wallclock") -> None:
        self._t0 = time.monotonic()
        self._timers = _TimerHeap()
        self._cond = threading.Condition(threading.Lock())
        self._run_lock = threading.Lock()  # held while a callback runs: one at a time, in order
        self._thread: threading.Thread | None = None
        self._closed = False
        self._name = name
        self._target: float | None = None  # when the waiting pump wakes by itself (None: not waiting)
        self._assist = 0  # threads inside assisting(): they run what falls due themselves
        self._assisting = _Assisting(self)
        self.errors: collections.deque[BaseException] = collections.deque(maxlen=MAX_ERRORS_KEPT)
        self.error_count = 0

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("running" if self.running else "not started")
        return f"<WallClock now={self.now():.6f} {state}>"

    def __enter__(self) -> WallClock:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def now(self) -> float:
        return time.monotonic() - self._t0

    def call_at(self, when: float, callback: Callback) -> TimerHandle:
        when = _check_time(when, "when")
        with self._cond:
            if self._closed:
                raise ClockError("WallClock is closed")
            handle = self._timers.push(when, callback)
            target = self._target
            # the pump must see it only if it waits past it (running callbacks, it will look anyway),
            # and not at all while a thread assists: that thread runs it, or wakes the pump on leaving
            if target is not None and when < target and not self._assist:
                self._cond.notify()
        return handle

    def call_later(self, delay: float, callback: Callback) -> TimerHandle:
        delay = _check_time(delay, "delay")
        if delay < 0:
            raise ValueError(f"delay must be >= 0, got {delay}")
        return self.call_at(self.now() + delay, callback)

    def next_deadline(self) -> float | None:
        with self._cond:
            return self._timers.peek()

    def assisting(self) -> _Assisting:
        """While a thread is inside, the pump runs no callback: the thread runs what falls due
        itself, with :meth:`run_due` -- this context calls it on leaving, and a long batch calls it
        as it goes -- so the work a batch of instructions causes (a reply ready at once, the
        interrupt saying so, an engine finishing meanwhile) is done on the thread that holds the
        emulator anyway, with no switch to the pump and no fight with it for the emulator's lock
        and the GIL.  On leaving, the last thread out wakes the pump if callbacks are still to come.
        One context object per clock, a plain class (re-entrant and usable from many threads at once:
        its state is the clock's counter): the in-process transport enters it for every batch, and a
        generator context manager's per-use objects and frames cost about as much as the
        bookkeeping it guards."""
        return self._assisting

    def _assist_enter(self) -> None:
        with self._cond:
            self._assist += 1

    def _assist_exit(self) -> None:
        try:
            self.run_due()  # still inside: what falls due meanwhile is run here too
        finally:  # counted out whatever happens, or the pump would stand down for good
            with self._cond:
                self._assist -= 1
                if not self._assist:  # the last one out: wake the pump if it waits past what is to come
                    when, target = self._timers.peek(), self._target
                    if when is not None and target is not None and when < target:
                        self._cond.notify()

    def run_due(self, limit: int = 10_000) -> int:
        """Run the callbacks due now on the calling thread (at most ``limit``); returns how many.
        Errors are handled as the pump handles them."""
        n = 0
        while n < limit:
            with self._run_lock:
                with self._cond:
                    when = self._timers.peek()
                    if self._closed or when is None or when > self.now():
                        return n
                    cb = self._timers.pop()._take()
                if cb is not None:
                    self._call(cb)
            n += 1
        return n

    def run_until(self, t: float) -> int:
        """Let wall time pass until the clock reads ``t`` (return at once if it already does), running
        what falls due meanwhile on this thread, in order, as :meth:`run_due` does; returns how many
        ran here.  A virtual clock's ``run_until`` moves time; a wall clock can only wait for it: the
        same call, so a test written against one clock runs on the other.  Another thread's callback
        due before ``t`` is run within 10 ms of its time even with no pump thread."""
        t = _check_time(t, "t")
        count = 0
        while True:
            if self._closed:
                raise ClockError("WallClock is closed")
            count += self.run_due()
            now = self.now()
            if now >= t:
                return count
            with self._cond:
                when = self._timers.peek()
            until = t if when is None else min(t, when)
            time.sleep(min(max(0.0, until - now), 0.01))

    def start(self) -> None:
        """Start the pump thread (idempotent)."""
        with self._cond:
            if self._closed:
                raise ClockError("WallClock is closed")
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._pump, name=self._name, daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the pump thread and join it (idempotent); callbacks not yet due never run."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _pump(self) -> None:
        while True:
            try:
                if not self._wait_due():
                    return
                with self._run_lock:
                    with self._cond:  # an assisting thread may have run it meanwhile
                        when = self._timers.peek()
                        due = when is not None and when <= self.now() and not self._closed
                        cb = self._timers.pop()._take() if due else None
                    if cb is not None:
                        self._call(cb)
            except Exception as exc:  # the pump must outlive any bug in its own bookkeeping
                log.exception("WallClock pump error")
                self._record(exc)

    def _call(self, cb: Callback) -> None:
        try:
            cb()
        except Exception as exc:  # a failing callback must not kill the adapter's clock
            log.exception("WallClock callback %r failed", cb)
            self._record(exc)

    def _wait_due(self) -> bool:
        """Wait (in slices of at most MAX_WAIT) until a callback is due; False once closed."""
        with self._cond:
            try:
                while True:
                    if self._closed:
                        return False
                    if self._assist:  # a thread runs what falls due; the last one out wakes us
                        self._target = math.inf
                        self._cond.wait(MAX_WAIT)
                        continue
                    when = self._timers.peek()
                    if when is None:
                        self._target = math.inf
                        self._cond.wait(MAX_WAIT)
                        continue
                    delay = when - self.now()
                    if delay <= 0:
                        return True
                    self._target = when
                    self._cond.wait(min(delay, MAX_WAIT))
            finally:
                self._target = None

    def _record(self, exc: BaseException) -> None:
        self.errors.append(exc)
        self.error_count += 1


class _Assisting:
    """:meth:`WallClock.assisting`'s context: enter and leave count on the clock (see there)."""

    __slots__ = ("_enter", "_exit")

    def __init__(self, clock: WallClock) -> None:
        self._enter = clock._assist_enter
        self._exit = clock._assist_exit

    def __enter__(self) -> None:
        self._enter()

    def __exit__(self, *exc: object) -> None:
        self._exit()
