"""The threaded runner: one thread owns the core and the transport; callers hand it work.

Callers (any thread) put submissions in an inbox and wake the runner; the transport's notify hook wakes
it when completions or interrupts arrive. A transport with an I/O thread of its own that says so
(``lends_io_thread``: ``tcp://``, ``usb://``) has that thread take the runner's turn itself while the
runner sleeps, holding the core lock (one thread at a time still drives the core and the transport): an
answer reaches the core, and the core's next command the wire, without a switch to the runner's thread
and back. Callers' future callbacks may then run on that thread. With such a transport a caller's
submit to a sleeping runner with an empty inbox is taken the same way, on the caller's thread: the
request reaches the core and the wire without waking the runner. Timers run on the wall clock, or --
when the transport is an in-process emulator on a ``VirtualClock`` -- on that virtual clock with
*autojump*: whenever the runner has nothing to do, it steps the clock to the next deadline (trio's
MockClock idea), so a whole session with service times and recovery waits runs as fast as the CPU allows
and timings are exact on the virtual clock.
"""

from __future__ import annotations

import heapq
import itertools
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from apcrypto.core.driver import DriverCore
from apcrypto.errors import ApcryptoError
from apcrypto.runners.base import Resolver, RunnerBase, log
from apcrypto.transport.base import Transport


class ThreadedRunner(RunnerBase):
    """Drive the core from a dedicated thread."""

    def __init__(self, core: DriverCore, transport: Transport, *, name: str = "apcrypto-runner") -> None:
        super().__init__(core, transport)
        self._cv = threading.Condition(threading.Lock())
        self._inbox: deque[Callable[[], object] | tuple[Any, ...]] = deque()  # calls, submissions
        self._wake = False
        self._stop = False
        self._sleeping = False  # the runner is (about to be) waiting on the condition
        self._sleep_until = math.inf  # when its wait ends by itself (its clock)
        self._here = 0  # the thread taking a turn for it (see wake), 0: none
        self.core_lock = threading.RLock()  # held while the core runs; stats() takes it too
        vclock = getattr(transport, "virtual_clock", None)
        self._vclock = vclock
        # a transport whose own thread may take the runner's turn (see wake), on the wall clock
        self._borrow = vclock is None and bool(getattr(transport, "lends_io_thread", False))
        self._emu_lock = transport.emulator.lock if vclock is not None else None  # type: ignore[attr-defined]
        # an in-process emulator on a wall clock: each turn assists its clock (InprocTransport.clock_assist)
        self._assist: Any = getattr(transport, "clock_assist", None) or _NULL
        # wall-clock timers: heap of (due, seq, key); _due[key] = seq of the live entry
        self._heap: list[tuple[float, int, tuple[Any, ...]]] = []
        self._due: dict[tuple[Any, ...], int] = {}
        self._vtimers: dict[tuple[Any, ...], Any] = {}
        self._seq = itertools.count()
        self._t0 = time.monotonic()
        self.error: BaseException | None = None
        self._watchers: list[Callable[[], bool]] = []  # checked after every turn; True: done
        transport.set_notify(self.wake)
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    # -- clock --
    def now(self) -> float:
        if self._vclock is not None:
            return float(self._vclock.now())
        return time.monotonic() - self._t0

    def arm(self, key: tuple[Any, ...], at: float) -> None:
        if self._vclock is not None:
            old = self._vtimers.pop(key, None)
            if old is not None:
                old.cancel()
            self._vtimers[key] = self._vclock.call_at(at, lambda: self._vfired(key))
            return
        seq = next(self._seq)
        self._due[key] = seq
        heapq.heappush(self._heap, (at, seq, key))
        if self._sleeping and at < self._sleep_until:  # armed in a turn taken for a sleeping runner
            with self._cv:
                self._cv.notify()

    def cancel(self, key: tuple[Any, ...]) -> None:
        if self._vclock is not None:
            h = self._vtimers.pop(key, None)
            if h is not None:
                h.cancel()
            return
        self._due.pop(key, None)

    def _vfired(self, key: tuple[Any, ...]) -> None:
        self._vtimers.pop(key, None)
        self.fire(key)

    # -- callers' side (any thread) --
    def wake(self) -> None:
        """The transport has events (called from its thread).  While the runner sleeps, its turn is
        taken right here (:meth:`_turn_here`) instead of waking it: the events reach the core without
        a thread switch, and what the core sends goes out with the transport's next write."""
        self._wake = True  # read by the runner before it sleeps (under the condition's lock)
        if self._sleeping:
            if self._borrow and self._turn_here():
                return
            with self._cv:
                self._cv.notify()

    def _turn_here(self, fn: Callable[[], object] | tuple[Any, ...] | None = None) -> bool:
        """A runner's turn (``fn`` first if given, then transport events, due timers, watchers) on
        the calling thread, holding the core lock; False when the runner holds it (it will look
        itself), is stopping, or -- with ``fn`` -- is awake or has work in its inbox (which must run
        before ``fn``: the caller then queues ``fn`` behind it)."""
        me = threading.get_ident()
        if self._here == me:
            # called back from inside our own turn: its pump loop polls again; a call() queues
            return fn is None
        if self._stop or not self.core_lock.acquire(blocking=False):
            return False
        if fn is not None and (not self._sleeping or self._inbox or self.resolvers):
            # the runner is about to take its inbox (fn goes behind it), or a request was submitted
            # since the caller saw none undecided: its answer would be pumped in this turn and its
            # callbacks run inside this caller's submit, under whatever locks the caller holds
            self.core_lock.release()
            return False
        self._here = me
        try:
            self._wake = False
            if fn is not None:
                self.grouped()
                try:
                    self._run_item(fn)
                finally:
                    self.release()
            self.pump()
            self._run_due_timers()
            if self._watchers:
                self._check_watchers()
            return True
        except BaseException as exc:  # the runner's own turn would die of it: stop it the same way
            self.error = exc
            self._stop = True
            return fn is not None  # fn was taken (it ran, or failed): never queue it again
        finally:
            self._here = 0
            self.core_lock.release()

    def in_turn(self) -> bool:
        """Whether the calling thread is taking a turn of this runner: the runner's own thread, or
        one lent to it (a transport's I/O thread, a submitting caller) -- where callers' future
        callbacks run.  Such a thread must not wait for the runner: it *is* the runner."""
        me = threading.get_ident()
        return me == self._here or me == self._thread.ident

    def call(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` with the core lock held: on the runner thread, or right here (see :meth:`_post`)."""
        self._post(fn)

    def _post(self, item: Callable[[], object] | tuple[Any, ...]) -> None:
        """Hand ``item`` (a call, or a submission's arguments) to the runner.  While the runner sleeps
        with an empty inbox and no request undecided, and the transport lends threads
        (``lends_io_thread``), it is taken right here as the runner's turn: a submit then reaches the
        core and the wire with no switch to the runner thread (what one request at a time waits for)."""
        if self._stop:
            raise RuntimeError("runner stopped")
        # only with nothing undecided: a burst of submits is better served by the runner, which takes
        # them as one batch (and the transport sends them together) while this thread goes on
        idle = self._borrow and self._sleeping and not self.resolvers and not self._inbox
        if idle and self._turn_here(item):
            if self._stop:  # it or the turn failed: the runner stops as it would have on its thread
                with self._cv:
                    self._cv.notify()
            return
        with self._cv:  # against the runner's exit (see _main): an item is run, or refused here
            if self._stop:
                raise RuntimeError("runner stopped")
            self._inbox.append(item)
            if self._sleeping:
                self._wake = True
                self._cv.notify()

    def submit(
        self,
        request: Any,
        idempotent: bool | None,
        deadline: float | None,
        resolver: Resolver,
        target: frozenset[int] | None = None,
    ) -> None:
        # a tuple of submit_now's arguments, not a closure: one object per request in the inbox
        # (a lambda with its cells was seven, each tracked by the garbage collector)
        self._post((request, idempotent, deadline, resolver, target))

    def watch(self, condition: Callable[[], bool]) -> None:
        """Run ``condition`` on the runner thread after every turn until it returns True (how a
        caller waits for a state of the core without polling it from outside)."""
        self.call(lambda: self._watchers.append(condition))

    def _check_watchers(self) -> None:
        self._watchers = [w for w in self._watchers if not w()]

    @property
    def inbox_size(self) -> int:
        """Work handed to the runner and not yet taken in (counts toward the host-side bound)."""
        return len(self._inbox)

    def start(self) -> None:
        self._thread.start()
        self.call(self.start_queues)

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- the runner thread --
    def _main(self) -> None:
        batch: list[Callable[[], object] | tuple[Any, ...]] = []  # taken from the inbox, not yet run
        try:
            while True:
                if self._stop:
                    with self._cv:  # _post appends under this lock: nothing lands after we leave
                        if not self._inbox:
                            break
                inbox = self._inbox
                batch = [inbox.popleft() for _ in range(len(inbox))]
                batch.reverse()  # run from the end (oldest first): what is left was never run
                self._wake = False
                with self.core_lock, self._locked_emu(), self._assist:
                    self.grouped()  # with a journal: the turn's submissions, one commit, one send
                    try:
                        while batch:
                            self._run_item(batch.pop())
                    finally:
                        self.release()
                    did = self.pump() + len(batch)
                    did += self._run_due_timers()
                    if self._watchers:
                        self._check_watchers()
                    if did:
                        continue
                    if self._vclock is not None and self._vclock.next_deadline() is not None:
                        self._vclock.step()  # autojump: nothing to do now, move time to the next event
                        self.pump()
                        continue
                    if self.journal is not None:
                        self.journal.commit()  # outcomes of this turn, before the runner sleeps
                    due = self._next_due()  # read under the core lock: turns taken while it sleeps
                self._idle_wait(due)  # arm and pop timers on the same heap
        except BaseException as exc:  # a bug in the core or a transport: surface it, don't hang callers
            self.error = exc
            with self._cv:
                self._stop = True  # callers now get "runner stopped" instead of a place in the inbox
                left = list(self._inbox)
                self._inbox.clear()
            self._orphaned(batch, exc)
            self._orphaned(left, exc)
            self._fail_undecided()
            raise
        if self.error is not None:  # a turn taken on a lent thread died (see _turn_here)
            self._fail_undecided()

    def _fail_undecided(self) -> None:
        """The runner is dead: the requests in the core have no one to decide them any more, so they
        end now (``ApcryptoError`` naming the failure) instead of when someone calls ``close``."""
        err = ApcryptoError(f"runner failed: {self.error!r}")
        if self.core_lock.acquire(timeout=5.0):
            try:
                self.fail_undecided(err)
            finally:
                self.core_lock.release()

    def unplaced(self, resolver: Resolver, error: BaseException) -> None:
        """A submission the core raised on: its caller already holds the future, so it is failed now."""
        self._orphaned([(None, None, None, resolver)], error)

    def _orphaned(self, items: list[Any], error: BaseException) -> None:
        """Fail every submission among ``items`` (taken for a turn that died, or left in the inbox of
        a runner that did): none reached the core, so no Resolve would ever end it."""
        err = ApcryptoError(f"runner failed before the request reached the driver core: {error!r}")
        for item in items:
            if isinstance(item, tuple):
                try:
                    item[3](None, err)
                except Exception:  # one resolver failing must not keep the others from running
                    log.exception("resolver failed")

    def _run_item(self, item: Callable[[], object] | tuple[Any, ...]) -> None:
        """Carry out one inbox item in a turn: a submission's arguments (see :meth:`submit`), or a call."""
        if isinstance(item, tuple):
            self.submit_now(*item)
        else:
            item()

    def _locked_emu(self) -> Any:
        return self._emu_lock if self._emu_lock is not None else _NULL

    def _run_due_timers(self) -> int:
        if self._vclock is not None or not self._heap:
            return 0
        n = 0
        now = self.now()
        heap = self._heap
        while heap and heap[0][0] <= now:
            _due, seq, key = heapq.heappop(heap)
            if self._due.get(key) == seq:
                del self._due[key]
                self.fire(key)
                n += 1
        return n

    def _next_due(self) -> float:
        """When the earliest live wall-clock timer is due (inf: none).  Call with the core lock held:
        the heap is only ever read or changed under it, since while the runner sleeps other threads
        take its turns (:meth:`_turn_here`) and arm and fire timers on the same heap."""
        heap, due = self._heap, self._due
        while heap and due.get(heap[0][2]) != heap[0][1]:
            heapq.heappop(heap)  # drop cancelled / replaced entries
        return heap[0][0] if heap else math.inf

    def _idle_wait(self, due: float = math.inf) -> None:
        """Sleep until woken, or until ``due`` (the next timer, read under the core lock before the
        lock was let go; a timer armed earlier than it since then wakes the runner, see :meth:`arm`),
        or at most 0.5 s."""
        with self._cv:
            self._sleeping = True
            if self._wake or self._inbox or self._stop:
                self._sleeping = False
                return
            timeout = 0.5
            if self._vclock is None and due < math.inf:
                timeout = max(0.0, min(timeout, due - self.now()))
            if timeout > 0:
                self._sleep_until = self.now() + timeout
                self._cv.wait(timeout)
                self._sleep_until = math.inf
            self._sleeping = False


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NULL = _Null()
