"""``apcrypto.futures.LightFuture`` behaves as ``concurrent.futures.Future`` does, and weighs less.

The oracle is the stdlib's own future: every sequence of operations hypothesis can build (cancel,
set_running_or_notify_cancel, set_result, set_exception, callbacks that return or raise, result and
exception with timeout 0, wait and as_completed with timeout 0, done/running/cancelled, repr) is run
on a stdlib ``Future`` and on a ``LightFuture``, and everything observable must agree: return values,
exception types, callback calls and their order, what the ``concurrent.futures`` logger says.

Threads: the lazy lock is the part that can go wrong (module docstring of apcrypto.futures: a setter
finishing under ``_BIRTH`` while a waiter makes the lock). Seeded stress runs put many threads on
``result`` / ``exception`` / callbacks / ``wait`` / ``as_completed`` while another resolves, with a
tiny switch interval so threads interleave inside the critical paths; every wait carries a timeout,
so a lost wake-up fails as ``TimeoutError`` instead of hanging. One test forces the exact
interleaving the re-check under ``_BIRTH`` exists for. Weight: one GC-tracked object per future, none
more for ``wait()`` over finished ones, and the client's futures keep no closure and no client.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import gc
import logging
import random
import re
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, Future, InvalidStateError
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import apcrypto
import apcrypto.futures as futures_mod
from apcrypto.bench import EXPONENT, MODULUS_2048
from apcrypto.futures import LightFuture, finished
from apcrypto.operations import failed_future
from emulator import Emulator

# ---------------------------------------------------------------------------------------------------
# the differential test: the stdlib Future is the oracle

Op = tuple[Any, ...]
OPS: st.SearchStrategy[Op] = st.one_of(
    st.sampled_from(
        [
            ("cancel",),
            ("set_running",),
            ("callback",),
            ("callback_raises",),
            ("result0",),
            ("exception0",),
            ("wait0",),
            ("wait_first0",),
            ("as_completed0",),
            ("flags",),
            ("repr",),
        ]
    ),
    st.tuples(st.just("set_result"), st.sampled_from([0, 1, "x", None, b""])),
    st.tuples(st.just("set_exception"), st.sampled_from(["ValueError", "KeyError", "none"])),
)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append((record.levelname, _norm(record.getMessage())))


@pytest.fixture
def futures_log() -> Iterator[_Records]:
    """What the ``concurrent.futures`` logger says (callbacks that raise, bad transitions)."""
    handler = _Records()
    logger = logging.getLogger("concurrent.futures")
    logger.addHandler(handler)
    was = logger.propagate
    logger.propagate = False  # keep the deliberate callback failures out of the test output
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.propagate = was


def _norm(text: str) -> str:
    """A repr with the class name and address taken out (they differ, by design)."""
    return re.sub(r"<\w+ at 0x[0-9a-f]+ ", "<F ", re.sub(r"Future \d+ in", "Future N in", text))


def _outcome(fn: Callable[[], Any]) -> tuple[str, Any]:
    try:
        value = fn()
    except BaseException as exc:  # every exception is an observable to compare
        return ("raised", type(exc).__name__)
    if isinstance(value, BaseException):
        return ("exception", type(value).__name__, value.args)
    return ("value", value)


def _run(fut: Future[Any], ops: list[Op], log: list[Any], records: _Records) -> list[Any]:
    seen: list[Any] = []
    for n, op in enumerate(ops):
        name = op[0]
        if name == "cancel":
            seen.append(_outcome(fut.cancel))
        elif name == "set_running":
            seen.append(_outcome(fut.set_running_or_notify_cancel))
        elif name == "set_result":
            seen.append(_outcome(lambda value=op[1]: fut.set_result(value)))
        elif name == "set_exception":
            exc = None if op[1] == "none" else {"ValueError": ValueError, "KeyError": KeyError}[op[1]](n)
            seen.append(_outcome(lambda exc=exc: fut.set_exception(exc)))
        elif name in ("callback", "callback_raises"):

            def cb(f: Future[Any], n: int = n, raises: bool = name == "callback_raises") -> None:
                log.append((n, f is fut, f.done(), f.cancelled(), f.running()))
                if raises:
                    raise RuntimeError(f"callback {n}")

            seen.append(_outcome(lambda: fut.add_done_callback(cb)))
        elif name == "result0":
            seen.append(_outcome(lambda: fut.result(timeout=0)))
        elif name == "exception0":
            seen.append(_outcome(lambda: fut.exception(timeout=0)))
        elif name == "wait0":
            done, not_done = cf.wait([fut], timeout=0)
            seen.append((len(done), len(not_done)))
        elif name == "wait_first0":
            done, not_done = cf.wait([fut], timeout=0, return_when=cf.FIRST_EXCEPTION)
            seen.append((len(done), len(not_done)))
        elif name == "as_completed0":
            seen.append(_outcome(lambda: [f is fut for f in cf.as_completed([fut], timeout=0)]))
        elif name == "flags":
            seen.append((fut.done(), fut.running(), fut.cancelled()))
        elif name == "repr":
            seen.append(_norm(repr(fut)))
        seen.append(list(log))
        seen.append(list(records.seen))
    return seen


@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(ops=st.lists(OPS, max_size=12), born_running=st.booleans())
def test_light_future_behaves_as_the_stdlib_future(ops: list[Op], born_running: bool) -> None:
    def observe(fut: Future[Any]) -> list[Any]:
        handler = _Records()
        logger = logging.getLogger("concurrent.futures")
        logger.addHandler(handler)
        was, logger.propagate = logger.propagate, False
        try:
            return _run(fut, ops, [], handler)
        finally:
            logger.removeHandler(handler)
            logger.propagate = was

    oracle: Future[Any] = Future()
    if born_running:
        oracle.set_running_or_notify_cancel()
    assert observe(LightFuture(running=born_running)) == observe(oracle)


def test_the_differential_test_sees_a_difference() -> None:
    """The comparison above is not vacuous: a future that forgets to log a raising callback differs."""

    class Quiet(LightFuture[Any]):
        __slots__ = ()

        def _invoke(self, callbacks: list[Callable[[Future[Any]], object]]) -> None:
            for cb in callbacks:
                with contextlib.suppress(Exception):
                    cb(self)

    ops: list[Op] = [("callback_raises",), ("set_result", 1)]
    a, b = _Records(), _Records()
    logger = logging.getLogger("concurrent.futures")
    for handler, fut in ((a, Quiet()), (b, Future())):
        logger.addHandler(handler)
        was, logger.propagate = logger.propagate, False
        try:
            _run(fut, ops, [], handler)
        finally:
            logger.removeHandler(handler)
            logger.propagate = was
    assert a.seen == [] and len(b.seen) == 1


def test_it_is_a_concurrent_future_with_the_stdlib_states(futures_log: _Records) -> None:
    fut: LightFuture[int] = LightFuture()
    assert isinstance(fut, Future) and not fut.running() and not fut.done()
    assert LightFuture[int] is not None  # subscriptable like Future (typing in callers' code)
    for name in ("PENDING", "RUNNING", "CANCELLED", "CANCELLED_AND_NOTIFIED", "FINISHED"):
        assert getattr(futures_mod, name) is getattr(cf._base, name)
    fut.set_result(5)
    with pytest.raises(InvalidStateError):
        fut.set_exception(ValueError())
    assert fut.result() == 5 and repr(fut).endswith("state=finished returned int>")
    failed = failed_future(KeyError("k"))
    assert isinstance(failed, Future) and failed.done() and not failed.cancel()
    assert isinstance(failed.exception(), KeyError)
    with pytest.raises(KeyError):
        failed.result(0)
    assert finished(7).result(0) == 7
    assert futures_log.seen == []


def test_a_running_future_refuses_cancel_and_its_resolver_sets_it() -> None:
    fut: LightFuture[Any] = LightFuture(running=True)
    assert fut.running() and not fut.cancel() and not fut.cancelled()
    fut(None, ValueError("bad"))  # the Resolver call: (value, error)
    assert isinstance(fut.exception(0), ValueError) and not fut.cancel()
    ok: LightFuture[Any] = LightFuture(running=True)
    ok(b"r", None)
    assert ok.result(0) == b"r"
    with pytest.raises(InvalidStateError):
        ok(b"again", None)


def test_result_with_a_timeout_waits_that_long_and_then_raises() -> None:
    fut: LightFuture[int] = LightFuture(running=True)
    t = time.monotonic()
    with pytest.raises(TimeoutError):
        fut.result(timeout=0.05)
    with pytest.raises(TimeoutError):
        fut.exception(timeout=0.05)
    assert time.monotonic() - t >= 0.09
    done, not_done = cf.wait([fut], timeout=0.02)
    assert not done and not_done == {fut}
    with pytest.raises(TimeoutError):
        list(cf.as_completed([fut], timeout=0.02))
    fut.set_result(1)  # and after all that waiting, a result still reaches everyone
    assert fut.result(0) == 1 and cf.wait([fut], timeout=0).done == {fut}


def test_cancel_wakes_result_waiters_and_notify_cancel_wakes_wait() -> None:
    """The stdlib's split, kept: cancel() wakes result()/exception(); wait() learns of it only from
    set_running_or_notify_cancel() (an executor's call)."""
    fut: LightFuture[int] = LightFuture()
    got: list[str] = []

    def waiter() -> None:
        try:
            fut.result(timeout=10)
        except CancelledError:
            got.append("cancelled")

    t = threading.Thread(target=waiter)
    t.start()
    _until(lambda: fut._cv is not None)
    waited: list[Any] = []
    w = threading.Thread(target=lambda: waited.append(cf.wait([fut], timeout=10)))
    w.start()
    _until(lambda: fut._lock is not None and fut._lock._w is not None)
    assert fut.cancel()
    t.join(10)
    assert got == ["cancelled"] and w.is_alive()  # wait() is still waiting, as with the stdlib
    assert not fut.set_running_or_notify_cancel()
    w.join(10)
    assert waited and waited[0].done == {fut}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["wait", "as_completed"])
def test_a_cancelled_future_nobody_waited_on_still_tells_a_later_wait(how: str) -> None:
    """Cancelled is not final (set_running_or_notify_cancel still moves it, and tells wait()): a
    wait() that arrives between the two must get a real lock and list, not the final-state stand-in."""
    fut: LightFuture[int] = LightFuture()
    assert fut.cancel() and fut._lock is None  # nobody had waited: no lock yet
    other: LightFuture[int] = LightFuture(running=True)
    got: list[Any] = []

    def waiter() -> None:
        t = time.monotonic()
        if how == "wait":
            got.append(cf.wait([fut, other], timeout=WAIT, return_when=cf.FIRST_COMPLETED).done)
        else:
            got.append({next(cf.as_completed([fut, other], timeout=WAIT))})
        got.append(time.monotonic() - t)

    w = threading.Thread(target=waiter)
    w.start()
    _until(lambda: fut._lock is not None and fut._lock._w is not None)
    assert not fut.set_running_or_notify_cancel()
    w.join(WAIT + 5)
    assert got[0] == {fut} and got[1] < WAIT / 2


@pytest.mark.timeout(60)
def test_several_waits_on_one_future_are_all_told_and_all_uninstalled() -> None:
    """The future's lock keeps one waiter as is and a list from the second on: three wait() /
    as_completed() callers at once are each told, and each takes its waiter out again."""
    fut: LightFuture[int] = LightFuture(running=True)
    other: LightFuture[int] = LightFuture(running=True)
    got: list[Any] = []

    def waiting(kind: int) -> None:
        t = time.monotonic()
        if kind == 2:
            done = {next(cf.as_completed([fut, other], timeout=WAIT))}
        else:
            done = cf.wait([fut, other], timeout=WAIT, return_when=cf.FIRST_COMPLETED).done
        got.append((done, time.monotonic() - t))

    threads = [threading.Thread(target=waiting, args=(k,)) for k in range(3)]
    for i, t in enumerate(threads):
        t.start()
        _until(lambda i=i: fut._lock is not None and len(fut._lock.waiters()) == i + 1)
    fut.set_result(1)
    for t in threads:
        t.join(WAIT + 5)
    assert len(got) == 3 and all(done == {fut} and took < WAIT / 2 for done, took in got)
    assert fut._lock is not None and fut._lock.waiters() == []  # every waiter taken out again
    with pytest.raises(ValueError):
        fut._lock.remove(object())  # as list.remove says of a stranger


def test_asyncio_can_await_it() -> None:
    fut: LightFuture[bytes] = LightFuture(running=True)

    async def main() -> bytes:
        threading.Timer(0.01, fut.set_result, (b"ok",)).start()
        return await asyncio.wrap_future(fut)

    assert asyncio.run(asyncio.wait_for(main(), 10)) == b"ok"


# ---------------------------------------------------------------------------------------------------
# threads


def _until(cond: Callable[[], bool], limit: float = 5.0) -> None:
    end = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.0005)


@pytest.fixture
def tiny_switch_interval() -> Iterator[None]:
    """Threads switch every 10 µs instead of 5 ms: they interleave inside the short critical paths."""
    was = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        yield
    finally:
        sys.setswitchinterval(was)


WAIT = 10.0  # a lost wake-up ends in TimeoutError after this, never in a hang


def _expected(fut: Future[Any]) -> tuple[Any, ...]:
    if fut.cancelled():
        return ("cancelled",)
    exc = fut.exception(0)
    return ("err", exc.args[0]) if exc is not None else ("ok", fut.result(0))


def _observe(fut: Future[Any], how: str) -> tuple[Any, ...]:
    """What ``result`` / ``exception`` (with a timeout) say. A wake-up that is lost shows as a wait
    that lasted until its timeout (the state is checked again then, so the value itself is right):
    that is a failure here, since every future in these tests ends within milliseconds."""
    t = time.monotonic()
    try:
        if how == "exception":
            exc = fut.exception(timeout=WAIT)
            return ("err", exc.args[0]) if exc is not None else ("ok", fut.result(0))
        return ("ok", fut.result(timeout=WAIT))
    except CancelledError:
        return ("cancelled",)
    except ValueError as exc:
        return ("err", exc.args[0])
    finally:
        assert time.monotonic() - t < WAIT / 2, "woken only by its own timeout: a lost wake-up"


def _near_order(rng: random.Random, n: int) -> list[int]:
    """0..n-1 shuffled only within windows of 8: consumers and the resolver move along the futures
    together, so most waits meet a future that is about to end (where the races are)."""
    order = list(range(n))
    for start in range(0, n, 8):
        window = order[start : start + 8]
        rng.shuffle(window)
        order[start : start + 8] = window
    return order


def _consumer(
    rng: random.Random, futs: list[Future[Any]], seen: dict[tuple[int, int], tuple[Any, ...]], me: int
) -> None:
    order = _near_order(rng, len(futs))
    index = {id(f): i for i, f in enumerate(futs)}
    while order:
        size = rng.randint(1, 12)
        chunk, order = order[:size], order[size:]
        group = [futs[i] for i in chunk]
        how = rng.choice(["result", "exception", "callback", "wait", "wait_first", "as_completed"])
        if how in ("result", "exception"):
            for i, f in zip(chunk, group, strict=True):
                seen[me, i] = _observe(f, how)
        elif how == "callback":
            calls: list[Future[Any]] = []
            all_in = threading.Event()

            def cb(
                f: Future[Any],
                calls: list[Future[Any]] = calls,
                n: int = len(group),
                all_in: threading.Event = all_in,
            ) -> None:
                calls.append(f)
                if len(calls) == n:
                    all_in.set()

            for f in group:
                f.add_done_callback(cb)
            assert all_in.wait(WAIT), "a done-callback was never called"
            assert sorted(map(id, calls)) == sorted(map(id, group))  # each exactly once
            for f in group:
                seen[me, index[id(f)]] = _observe(f, "result")
        elif how == "wait":
            done, not_done = cf.wait(group, timeout=WAIT)
            assert not not_done, "wait() missed a completion"
            for f in done:
                seen[me, index[id(f)]] = _observe(f, "result")
        elif how == "wait_first":
            pending = set(group)
            while pending:
                done, pending = cf.wait(pending, timeout=WAIT, return_when=cf.FIRST_COMPLETED)
                assert done, "wait(FIRST_COMPLETED) missed a completion"
                for f in done:
                    seen[me, index[id(f)]] = _observe(f, "result")
        else:
            for f in cf.as_completed(group, timeout=WAIT):  # raises TimeoutError on a lost one
                seen[me, index[id(f)]] = _observe(f, "result")


def _resolver(rng: random.Random, futs: list[Future[Any]]) -> None:
    order = _near_order(rng, len(futs))
    for i in order:
        f = futs[i]
        r = rng.random()
        if not f.running() and r < 0.15:  # as an executor cancels a pending one
            f.cancel()
            f.set_running_or_notify_cancel()
            continue
        if not f.running():
            f.set_running_or_notify_cancel()
        if r < 0.55:
            f.set_result(i)
        else:
            f.set_exception(ValueError(i))
        if rng.random() < 0.5:
            time.sleep(rng.choice([0, 0.0002, 0.0005]))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_threads_waiting_every_way_never_miss_a_completion(seed: int, tiny_switch_interval: None) -> None:
    rng = random.Random(seed)
    futs: list[Future[Any]] = [LightFuture(running=rng.random() < 0.5) for _ in range(300)]
    seen: dict[tuple[int, int], tuple[Any, ...]] = {}
    errors: list[BaseException] = []
    consumers = 5
    start = threading.Barrier(consumers + 1)

    def guard(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                start.wait(WAIT)
                fn()
            except BaseException as exc:
                errors.append(exc)

        return run

    threads = [
        threading.Thread(
            target=guard(lambda c=c: _consumer(random.Random(seed * 100 + c), futs, seen, c)), daemon=True
        )
        for c in range(consumers)
    ]
    threads.append(threading.Thread(target=guard(lambda: _resolver(random.Random(seed), futs)), daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert len(seen) == consumers * len(futs)  # everyone saw every future end
    for (_, i), got in seen.items():
        assert got == _expected(futs[i])
    # the run raced where it should: many futures got their lock while still pending (a finished
    # one never gets one), i.e. a waiter and the setter met at the lazy lock
    assert sum(f._lock is not None for f in futs) >= len(futs) // 4  # type: ignore[attr-defined]


def _gate_birth(monkeypatch: pytest.MonkeyPatch, thread: str) -> tuple[threading.Event, threading.Event]:
    """Stop the thread named ``thread`` just before it takes ``_BIRTH`` (every other thread passes):
    returns (it stands at the gate, open the gate), to force an interleaving at the lazy lock."""
    real = futures_mod._BIRTH
    at_gate, open_gate = threading.Event(), threading.Event()

    class Gate:
        def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
            if threading.current_thread().name == thread:
                at_gate.set()
                assert open_gate.wait(WAIT)
            return real.acquire(blocking, timeout)

        def release(self) -> None:
            real.release()

        def __enter__(self) -> bool:
            return self.acquire()

        def __exit__(self, *exc: object) -> None:
            self.release()

    monkeypatch.setattr(futures_mod, "_BIRTH", Gate())
    return at_gate, open_gate


@pytest.mark.timeout(60)
def test_a_setter_that_found_no_lock_rechecks_before_finishing_without_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The interleaving the re-check under ``_BIRTH`` is for, forced: the setter reads "no lock",
    then (before it takes ``_BIRTH``) a waiter makes the lock and goes to sleep on it. The setter
    must see the lock and wake the waiter, not finish silently under ``_BIRTH``."""
    setter_at_gate, open_gate = _gate_birth(monkeypatch, "setter")
    fut: LightFuture[int] = LightFuture(running=True)
    setter = threading.Thread(target=fut.set_result, args=(42,), name="setter")
    setter.start()
    assert setter_at_gate.wait(WAIT)  # it read "no lock" and now stands before _BIRTH
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(_observe(fut, "result")))
    waiter.start()
    _until(lambda: fut._cv is not None and bool(fut._cv._waiters))  # type: ignore[attr-defined]
    open_gate.set()
    setter.join(WAIT)
    waiter.join(WAIT + 5)
    assert got == [("ok", 42)]


@pytest.mark.timeout(60)
def test_a_future_that_became_final_while_its_lock_was_being_made_gets_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The other interleaving at the lazy lock, forced: a waiter reads "no lock, not final" and,
    before it takes ``_BIRTH`` to make the lock, the setter finishes the future without one. The
    waiter must then get the final stand-in, not a new lock: ``wait()`` that entered with the stand-in
    would otherwise release the new lock on its way out (a lock it never acquired), raise halfway
    through its release loop, and leave the locks of the futures after it held forever -- a deadlock
    the stress test above found."""
    maker_at_gate, open_gate = _gate_birth(monkeypatch, "maker")
    fut: LightFuture[int] = LightFuture(running=True)
    entered = cf._base._AcquireFutures([fut])  # type: ignore[attr-defined]
    got: list[Any] = []
    maker = threading.Thread(target=lambda: got.append(fut._condition), name="maker")
    maker.start()
    assert maker_at_gate.wait(WAIT)  # it saw RUNNING and stands before _BIRTH
    fut.set_result(7)  # this thread is not gated: it finishes under _BIRTH, no lock
    entered.__enter__()  # as wait() would now: final, no lock, so the stand-in (nothing acquired)
    open_gate.set()
    maker.join(WAIT)
    assert got and got[0] is futures_mod._FINAL_MARK
    assert fut._lock is None  # type: ignore[attr-defined]
    entered.__exit__(None, None, None)  # releases what it acquired: nothing (raised before the fix)
    assert cf.wait([fut], timeout=0).done == {fut}


@pytest.mark.timeout(60)
def test_a_waiter_that_came_first_is_woken_by_every_kind_of_ending() -> None:
    for end in ("result", "exception", "cancel"):
        fut: LightFuture[int] = LightFuture(running=end != "cancel")
        got: list[Any] = []
        t = threading.Thread(target=lambda fut=fut, got=got: got.append(_observe(fut, "result")))
        t.start()
        _until(lambda fut=fut: fut._cv is not None and bool(fut._cv._waiters))  # type: ignore[attr-defined]
        if end == "result":
            fut.set_result(3)
        elif end == "exception":
            fut.set_exception(ValueError(4))
        else:
            assert fut.cancel()
        t.join(WAIT + 5)
        assert got == [{"result": ("ok", 3), "exception": ("err", 4), "cancel": ("cancelled",)}[end]]


# ---------------------------------------------------------------------------------------------------
# weight


def _tracked_per(n: int, make: Callable[[int], Any]) -> float:
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        before = len(gc.get_objects())
        kept = [make(i) for i in range(n)]
        after = len(gc.get_objects())
    finally:
        if was:
            gc.enable()
    assert len(kept) == n
    return (after - before - 1) / n  # less the list itself


def test_a_future_is_one_tracked_object_resolved_or_not() -> None:
    def resolved(i: int) -> LightFuture[int]:
        fut: LightFuture[int] = LightFuture(running=True)
        fut(i, None)
        fut.add_done_callback(lambda f: None)  # on a done future: called at once, nothing kept
        return fut

    assert _tracked_per(2000, lambda i: LightFuture()) == 1.0
    assert _tracked_per(2000, resolved) == 1.0
    assert _tracked_per(2000, lambda i: Future()) >= 8  # the stdlib one, for scale


def test_waiting_on_finished_futures_makes_nothing() -> None:
    futs = [finished(i) for i in range(2000)]
    assert _tracked_per(1, lambda i: cf.wait(futs, timeout=0)) < 20  # the result sets, not 2,000 locks
    assert all(f._lock is None for f in futs)
    assert sorted(f.result() for f in cf.as_completed(futs, timeout=0)) == list(range(2000))
    assert all(f._lock is None for f in futs)


def test_the_clients_futures_are_light_and_do_not_keep_the_client() -> None:
    emu = Emulator("fast", clock="virtual")
    try:
        client = apcrypto.connect("emu:", emulator=emu, health_probe=False)
        assert client.wait_ready(10)
        size = (MODULUS_2048.bit_length() + 7) // 8
        futs = [client.mod_expo((i + 2).to_bytes(size, "big"), EXPONENT, MODULUS_2048) for i in range(50)]
        assert all(isinstance(f, Future) and isinstance(f, LightFuture) for f in futs)
        assert not futs[0].cancel()  # submitted: it runs to an outcome
        want = [pow(i + 2, EXPONENT, MODULUS_2048).to_bytes(size, "big") for i in range(50)]
        assert [f.result(10) for f in futs] == want
        client.close()
        ref = weakref.ref(client)
        del client
        gc.collect()
        assert ref() is None  # the futures the caller still holds do not keep the client alive
        assert len(futs) == 50
    finally:
        emu.close()
