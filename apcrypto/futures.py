"""A lighter ``concurrent.futures.Future``: one GC-tracked object per request instead of eleven.

WHY. The threaded client hands back a ``concurrent.futures.Future`` per request (DESIGN §5), and a
backlog of 100,000 requests means 100,000 of them alive at once. The stdlib future builds, in its
``__init__``, a ``threading.Condition`` (which copies five bound methods of its ``RLock`` onto itself
and keeps a deque of waiters), the ``RLock``, and two lists: eleven objects the cyclic garbage
collector tracks, ~1,600 bytes, for a future that most callers never wait on one by one. Every full
collection walks all of them; with a deep backlog that was most of the gap between the throughput
with 100,000 outstanding and with 1,000 (issue 11, "Memory").

:class:`LightFuture` IS a ``concurrent.futures.Future`` (a subclass: ``isinstance`` holds, and
``concurrent.futures.wait`` / ``as_completed`` / ``asyncio.wrap_future`` accept it) with the same
states, the same results, exceptions, timeouts and callback order, and callbacks that raise logged on
the ``concurrent.futures`` logger as the stdlib does. It keeps its fields in ``__slots__`` and makes
what only some futures need when it is first needed:

* its lock, on the first ``wait()`` / ``as_completed()`` (which reach ``_condition``: they use it as a
  mutex only, and ``_waiters`` to append and remove a waiter) or blocking ``result()`` /
  ``exception()``. One object is both (:class:`_Lock`: an ``RLock`` that also holds the waiters), so
  ``wait()`` on a pending future costs one tracked object, not a lock and a list;
* the ``threading.Condition`` a blocking ``result()`` / ``exception()`` sleeps on (over that lock);
* the list of done-callbacks.

A future that is already finished when ``wait()`` reaches it (the usual case after a burst) gets no
lock at all: nothing of it changes any more, and it hands out a stand-in (:class:`_Final`).

THE MUTEX. Each future's mutable fields (state, result, exception, callbacks, waiters) are guarded by
its *mutex*: the module's ``_BIRTH`` lock for as long as the future has no lock of its own, and its own
lock from the moment it has one. A future's lock is created only while ``_BIRTH`` is held, and every
path that takes ``_BIRTH`` as the mutex checks, under ``_BIRTH``, that the future still has no lock.
So every critical section that ran under ``_BIRTH`` ended before the lock existed, and every one that
runs under the lock began after: one mutex at a time, never two. A setter that finds no lock finishes
under ``_BIRTH`` and needs none (nobody can be waiting: a waiter makes the lock first); a waiter that
arrives after it sees the future done; a waiter that made the lock first is woken by the setter,
which then finds the lock and takes the locked path. ``_BIRTH`` is a leaf: nothing else is acquired
and no caller code runs while it is held, so it cannot take part in a deadlock; it is held for a few
attribute writes.

Reads of a single field (``done()``, the fast path of ``result()``) take no lock: a state only ever
moves forward, and a result or exception is stored before the state that announces it.
"""

from __future__ import annotations

import _thread
import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, InvalidStateError
from concurrent.futures._base import (  # the stdlib's own state names: wait() compares them
    _STATE_TO_DESCRIPTION_MAP,
    CANCELLED,
    CANCELLED_AND_NOTIFIED,
    FINISHED,
    LOGGER,
    PENDING,
    RUNNING,
)
from typing import Any, TypeVar

T = TypeVar("T")

#: The mutex of every future that has no lock of its own yet (module docstring, "THE MUTEX").
_BIRTH = threading.Lock()

_DONE = frozenset((CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED))
_CANCELLED = frozenset((CANCELLED, CANCELLED_AND_NOTIFIED))
_FINAL = frozenset((CANCELLED_AND_NOTIFIED, FINISHED))  # no transition leaves these (CANCELLED can)


class _Final:
    """What a future in a final state with no lock of its own hands ``wait()`` / ``as_completed()``
    as its ``_condition`` and its ``_waiters``: nothing of it changes any more, so there is nothing
    to exclude and nobody to notify. Waiting on a set of futures that are mostly done (the usual
    ``wait(futures)`` after a burst) then makes no lock and no list for those."""

    __slots__ = ()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return True

    def release(self) -> None:
        return None

    def __enter__(self) -> bool:
        return True

    def __exit__(self, *exc: object) -> None:
        return None

    def append(self, waiter: object) -> None:
        return None  # a waiter installed on a final future would never be called

    def remove(self, waiter: object) -> None:
        return None


_FINAL_MARK = _Final()


# typeshed marks _thread.RLock final; CPython's type is a base type (Py_TPFLAGS_BASETYPE, 3.11 on)
class _Lock(_thread.RLock):  # type: ignore[misc]
    """A future's own lock, which also holds its ``wait()`` / ``as_completed()`` waiters (the stdlib
    functions only ``append`` and ``remove`` them, with the lock held): one object where a lock and a
    list were two. Usually there is one waiter, kept as is; a list only from the second on."""

    __slots__ = ("_w",)

    def __init__(self) -> None:
        super().__init__()
        self._w: Any = None  # None, one waiter, or a list of them

    def append(self, waiter: object) -> None:
        w = self._w
        if w is None:
            self._w = waiter
        elif type(w) is list:
            w.append(waiter)
        else:
            self._w = [w, waiter]

    def remove(self, waiter: object) -> None:
        w = self._w
        if type(w) is list:
            w.remove(waiter)
        elif w is waiter:
            self._w = None
        else:
            raise ValueError("waiter not installed")

    def waiters(self) -> Any:
        """The waiters, to iterate (with the lock held)."""
        w = self._w
        return () if w is None else w if type(w) is list else (w,)


class LightFuture(Future[T]):
    """A ``concurrent.futures.Future`` that is one object until someone waits on it (module doc).

    Also its own resolver: ``fut(value, error)`` sets the exception when ``error`` is not None, else
    the result (the runner's ``Resolver`` signature), so a request needs no closure to resolve it.
    """

    __slots__ = ("_cbs", "_cv", "_exception", "_lock", "_result", "_state")
    _state: str
    _result: Any
    _exception: BaseException | None

    def __init__(self, *, running: bool = False) -> None:
        # not Future.__init__: it builds the Condition, RLock and lists this class makes lazily.
        # running=True: born RUNNING (what set_running_or_notify_cancel() would make it), for a
        # future nobody else can see yet
        self._state = RUNNING if running else PENDING
        self._result = None
        self._exception = None
        self._lock: _Lock | None = None  # also holds the wait() / as_completed() waiters
        self._cv: threading.Condition | None = None
        self._cbs: list[Callable[[Future[T]], object]] | None = None

    # ------------------------------------------------------------------ the mutex
    def _enter(self) -> Any:
        """Acquire this future's mutex and return it (``_BIRTH`` or the future's own lock)."""
        lock = self._lock
        if lock is None:
            _BIRTH.acquire()
            if self._lock is None:
                return _BIRTH
            _BIRTH.release()  # a lock was made meanwhile: it is the mutex from now on
            lock = self._lock
        lock.acquire()
        return lock

    @property
    def _condition(self) -> Any:  # type: ignore[override]
        """The future's own lock, made on first use (or, in a final state, :class:`_Final`). The
        stdlib's ``wait()`` and ``as_completed()`` acquire and release it (a mutex, nothing more);
        so do the methods here once it exists."""
        lock = self._lock
        if lock is None:
            if self._state in _FINAL:  # final: stays so, and nothing of it changes (see _Final)
                return _FINAL_MARK
            with _BIRTH:
                lock = self._lock
                if lock is None:
                    # checked again under the mutex: a setter may have made it final since the check
                    # above, and a final future must never get a lock. wait() and as_completed()
                    # acquire what _condition hands them on the way in and release what it hands them
                    # on the way out: a _Final in and a new lock out is a release of a lock nobody
                    # holds, which raises halfway through their release loop and leaves every later
                    # future's lock held for good.
                    if self._state in _FINAL:
                        return _FINAL_MARK
                    lock = self._lock = _Lock()
        return lock

    @property
    def _waiters(self) -> Any:  # type: ignore[override]
        """The ``wait()`` / ``as_completed()`` waiters: the same object as ``_condition`` (a
        :class:`_Lock` holds them; :class:`_Final` has none to keep). The stdlib's functions reach it
        only with ``_condition`` held."""
        return self._condition

    def _waitable(self) -> threading.Condition:
        """The condition a blocking ``result()`` / ``exception()`` sleeps on; call with the lock held."""
        cv = self._cv
        if cv is None:
            cv = self._cv = threading.Condition(self._lock)
        return cv

    # ------------------------------------------------------------------ reads
    def __repr__(self) -> str:
        state = self._state  # read once: once FINISHED, result and exception no longer change
        name, desc = self.__class__.__name__, _STATE_TO_DESCRIPTION_MAP[state]
        if state == FINISHED:
            if self._exception:
                return f"<{name} at {id(self):#x} state={desc} raised {self._exception.__class__.__name__}>"
            return f"<{name} at {id(self):#x} state={desc} returned {self._result.__class__.__name__}>"
        return f"<{name} at {id(self):#x} state={desc}>"

    def cancelled(self) -> bool:
        return self._state in _CANCELLED

    def running(self) -> bool:
        return self._state == RUNNING

    def done(self) -> bool:
        return self._state in _DONE

    def result(self, timeout: float | None = None) -> T:
        try:
            if self._state == FINISHED:  # the common case: no lock at all
                if self._exception:
                    raise self._exception
                return self._result
            with self._condition:
                self._wait_finished(timeout)
                if self._exception:
                    raise self._exception
                return self._result
        finally:
            self = None  # type: ignore[assignment]  # break the cycle through the exception's traceback

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._state == FINISHED:
            return self._exception
        with self._condition:
            self._wait_finished(timeout)
            return self._exception

    def _wait_finished(self, timeout: float | None) -> None:
        """With the future's lock held: wait (at most ``timeout``) until it is FINISHED; raise
        ``CancelledError`` or ``TimeoutError`` as the stdlib's ``result()`` and ``exception()`` do."""
        if self._state in _CANCELLED:
            raise CancelledError()
        if self._state != FINISHED:
            self._waitable().wait(timeout)
            if self._state in _CANCELLED:
                raise CancelledError()
            if self._state != FINISHED:
                raise TimeoutError()

    # ------------------------------------------------------------------ callbacks
    def add_done_callback(self, fn: Callable[[Future[T]], object]) -> None:
        mutex = self._enter()
        try:
            if self._state not in _DONE:
                cbs = self._cbs
                if cbs is None:
                    self._cbs = [fn]
                else:
                    cbs.append(fn)
                return
        finally:
            mutex.release()
        try:
            fn(self)
        except Exception:
            LOGGER.exception("exception calling callback for %r", self)

    def _invoke(self, callbacks: list[Callable[[Future[T]], object]]) -> None:
        for callback in callbacks:
            try:
                callback(self)
            except Exception:
                LOGGER.exception("exception calling callback for %r", self)

    # ------------------------------------------------------------------ transitions
    def cancel(self) -> bool:
        mutex = self._enter()
        try:
            state = self._state
            if state in (RUNNING, FINISHED):
                return False
            if state in _CANCELLED:
                return True
            self._state = CANCELLED
            if mutex is not _BIRTH and self._cv is not None:
                self._cv.notify_all()
            callbacks, self._cbs = self._cbs, None
        finally:
            mutex.release()
        if callbacks:
            self._invoke(callbacks)
        return True

    def set_running_or_notify_cancel(self) -> bool:
        mutex = self._enter()
        try:
            state = self._state
            if state == CANCELLED:
                self._state = CANCELLED_AND_NOTIFIED
                if mutex is not _BIRTH:
                    for waiter in mutex.waiters():
                        waiter.add_cancelled(self)
                # no notify: cancel() woke the result() waiters already (as in the stdlib)
                return False
            if state == PENDING:
                self._state = RUNNING
                return True
        finally:
            mutex.release()
        LOGGER.critical("Future %s in unexpected state: %s", id(self), state)
        raise RuntimeError("Future in unexpected state")

    def set_result(self, result: T) -> None:
        self._finish(result, None, False)

    def set_exception(self, exception: BaseException | None) -> None:
        self._finish(None, exception, True)

    def _finish(self, result: Any, exception: BaseException | None, failed: bool) -> None:
        """FINISHED with ``result`` or (``failed``) ``exception``: tell the ``wait()`` waiters, wake
        the blocked ``result()`` callers, then run the done-callbacks outside the mutex."""
        mutex = self._enter()
        try:
            if self._state in _DONE:
                raise InvalidStateError(f"{self._state}: {self!r}")
            self._result = result
            self._exception = exception
            self._state = FINISHED
            if mutex is not _BIRTH:  # someone may be waiting: only then is there a lock
                for waiter in mutex.waiters():
                    if failed:
                        waiter.add_exception(self)
                    else:
                        waiter.add_result(self)
                if self._cv is not None:
                    self._cv.notify_all()
            callbacks, self._cbs = self._cbs, None
        finally:
            mutex.release()
        if callbacks:
            self._invoke(callbacks)

    def __call__(self, value: Any, error: BaseException | None) -> None:
        """Resolve: the runner's ``Resolver`` call (the future is its own resolver: no closure)."""
        if error is not None:
            self.set_exception(error)
        else:
            self.set_result(value)


def finished(value: Any = None, error: BaseException | None = None) -> LightFuture[Any]:
    """A future already finished with ``value`` (or failed with ``error``): nobody can see it yet,
    so it is made done directly, with no lock taken."""
    fut: LightFuture[Any] = LightFuture(running=True)
    if error is not None:
        fut._exception = error
    else:
        fut._result = value
    fut._state = FINISHED
    return fut
