"""The threaded runner's hand-off with a transport that lends its I/O thread (``lends_io_thread``):
while the runner sleeps, the transport's thread takes the runner's turn itself, under the core lock,
and so does a caller's thread that submits (never ahead of work already in the inbox).

A fake core and a fake transport make every step observable: which thread fed the core, that a timer
armed in such a turn wakes the sleeping runner in time (not at the end of its old wait), that a turn
is never taken twice at once, that a transport which does not lend its thread still wakes the runner,
and that a core bug in a borrowed turn stops the runner as it would have on its own thread.  End to
end, over a real server: results stay right when the I/O thread delivers them.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import apcrypto
from apcrypto.core.actions import Action, ArmTimer
from apcrypto.errors import ApcryptoError
from apcrypto.runners import threaded
from apcrypto.runners.threaded import ThreadedRunner
from apcrypto.transport.base import Command, Interrupt, Transport, TransportEvent
from tests._fixtures_zmq import ServerProcess, zmq_server

__all__ = ["zmq_server"]  # fixture, imported for pytest


class _Core:
    """Records what it is fed, and on which thread; arms one timer per event batch if told to."""

    closed = False  # not shut down: submissions are taken

    def __init__(self) -> None:
        self.batches: list[tuple[str, list[TransportEvent]]] = []
        self.fired: list[tuple[tuple[Any, ...], float]] = []
        self.arm_in: float | None = None
        self.explode = False
        self.inside = 0
        self.overlap = False

    def on_events(self, events: list[TransportEvent], now: float) -> list[Action]:
        self.inside += 1
        self.overlap |= self.inside > 1
        try:
            if self.explode:
                raise RuntimeError("core bug")
            self.batches.append((threading.current_thread().name, list(events)))
            if self.arm_in is not None:
                return [ArmTimer(("poll", 1), now + self.arm_in)]  # type: ignore[arg-type]
            return []
        finally:
            self.inside -= 1

    def on_timer(self, key: tuple[Any, ...], now: float) -> list[Action]:
        self.fired.append((key, time.monotonic()))
        return []


class _Lending(Transport):
    """Events are put in by :meth:`deliver`, from the calling thread, as an I/O thread would."""

    lends_io_thread = True

    def __init__(self) -> None:
        super().__init__()
        self._events: list[TransportEvent] = []
        self._mu = threading.Lock()

    def deliver(self, *events: TransportEvent) -> None:
        with self._mu:
            self._events.extend(events)
        self._notify_ready()

    def qids(self) -> list[int]:
        return []

    def _send(self, commands: list[Command]) -> None:  # type: ignore[override]
        pass

    def _recv(self, timeout: float) -> list[TransportEvent]:
        with self._mu:
            out, self._events = self._events, []
        return out

    def _close(self) -> None:
        pass


class _NotLending(_Lending):
    lends_io_thread = False


def _until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.001)


@pytest.fixture
def rig() -> Iterator[tuple[ThreadedRunner, _Core, _Lending]]:
    core, transport = _Core(), _Lending()
    runner = ThreadedRunner(core, transport)  # type: ignore[arg-type]
    runner.start()
    _until(lambda: runner._sleeping)
    try:
        yield runner, core, transport
    finally:
        runner.stop()
        transport.close()


def _io_thread(fn: Callable[[], None], name: str = "fake-io") -> None:
    t = threading.Thread(target=fn, name=name)
    t.start()
    t.join(10)
    assert not t.is_alive()


def test_a_sleeping_runner_s_turn_is_taken_on_the_transport_s_thread(rig) -> None:
    runner, core, transport = rig
    _io_thread(lambda: transport.deliver(Interrupt(1)))
    assert core.batches == [("fake-io", [Interrupt(1)])]  # done before deliver() returned
    assert runner.alive and runner.error is None


def test_a_timer_armed_in_a_borrowed_turn_wakes_the_sleeping_runner(rig) -> None:
    runner, core, transport = rig
    core.arm_in = 0.05  # the runner sleeps up to 0.5 s: it must be woken to fire this in time
    turned = threading.Event()
    runner.call(turned.set)  # a turn now, so its next sleep starts now and lasts its full 0.5 s
    assert turned.wait(5)
    _until(lambda: runner._sleeping)
    t0 = time.monotonic()
    _io_thread(lambda: transport.deliver(Interrupt(2)))
    _until(lambda: bool(core.fired), timeout=5.0)
    (key, when), *_ = core.fired
    assert key == ("poll", 1)
    assert when - t0 < 0.3, f"fired after {when - t0:.3f} s: the sleeping runner was not woken"


def test_turns_never_overlap(rig) -> None:
    _, core, transport = rig
    threads = [
        threading.Thread(target=lambda i=i: [transport.deliver(Interrupt(i)) for _ in range(200)])
        for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    _until(lambda: sum(len(evs) for _, evs in core.batches) == 800)
    assert not core.overlap


def test_a_transport_that_does_not_lend_its_thread_wakes_the_runner() -> None:
    core, transport = _Core(), _NotLending()
    runner = ThreadedRunner(core, transport)  # type: ignore[arg-type]
    runner.start()
    try:
        _until(lambda: runner._sleeping)
        _io_thread(lambda: transport.deliver(Interrupt(3)))
        _until(lambda: bool(core.batches))
        assert core.batches == [("apcrypto-runner", [Interrupt(3)])]
    finally:
        runner.stop()


def test_a_core_bug_in_a_borrowed_turn_stops_the_runner(rig) -> None:
    runner, core, transport = rig
    core.explode = True
    _io_thread(lambda: transport.deliver(Interrupt(4)))  # the transport's thread survives it
    _until(lambda: not runner.alive)
    assert isinstance(runner.error, RuntimeError)
    with pytest.raises(RuntimeError, match="stopped"):
        runner.call(lambda: None)


def test_a_call_to_a_sleeping_runner_runs_on_the_caller_s_thread(rig) -> None:
    runner, _, _ = rig
    ran: list[str] = []
    _io_thread(lambda: runner.call(lambda: ran.append(threading.current_thread().name)), name="caller")
    assert ran == ["caller"]  # done before call() returned: no switch to the runner thread
    assert runner.alive and runner.error is None


def test_a_call_to_a_runner_that_does_not_borrow_goes_through_its_inbox() -> None:
    core, transport = _Core(), _NotLending()
    runner = ThreadedRunner(core, transport)  # type: ignore[arg-type]
    runner.start()
    try:
        _until(lambda: runner._sleeping)
        ran: list[str] = []
        runner.call(lambda: ran.append(threading.current_thread().name))
        _until(lambda: bool(ran))
        assert ran == ["apcrypto-runner"]
    finally:
        runner.stop()


def test_a_call_never_overtakes_work_already_in_the_inbox(rig) -> None:
    runner, _, _ = rig
    order: list[int] = []
    # the runner was told of work but has not taken its inbox yet: it still looks asleep
    runner._inbox.append(lambda: order.append(1))
    assert runner._sleeping
    runner.call(lambda: order.append(2))
    _until(lambda: len(order) == 2)
    assert order == [1, 2]


def test_a_call_while_another_thread_holds_the_turn_is_queued_behind_it(rig) -> None:
    runner, _, _ = rig
    order: list[str] = []
    held, done = threading.Event(), threading.Event()

    def turn_elsewhere() -> None:  # a borrowed turn in progress on another thread
        with runner.core_lock:
            held.set()
            done.wait(10)

    other = threading.Thread(target=turn_elsewhere)
    other.start()
    try:
        assert held.wait(10)
        runner.call(lambda: order.append(threading.current_thread().name))
        assert order == []  # neither run here nor beside the turn in progress
    finally:
        done.set()
        other.join(10)
    _until(lambda: bool(order))
    assert order == ["apcrypto-runner"]


def test_a_failing_call_on_the_caller_s_thread_stops_the_runner_once(rig) -> None:
    runner, _, _ = rig
    runs: list[int] = []

    def bad() -> None:
        runs.append(1)
        raise RuntimeError("core bug in a submit")

    runner.call(bad)
    _until(lambda: not runner.alive)
    assert runs == [1]  # taken once: never queued again for the runner thread
    assert isinstance(runner.error, RuntimeError)
    with pytest.raises(RuntimeError, match="stopped"):
        runner.call(lambda: None)


def test_the_timer_heap_is_only_touched_under_the_core_lock(rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """While the runner sleeps, other threads take its turns and arm and fire timers on its heap; the
    runner dropping stale entries (armed, then cancelled) from that heap without the core lock lost
    live timers and could die of an IndexError.  Every heap operation must hold the core lock."""
    runner, core, transport = rig
    unlocked: list[str] = []

    def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
        def op(*args: Any) -> Any:
            if not runner.core_lock._is_owned():  # type: ignore[attr-defined]
                unlocked.append(f"{fn.__name__} on {threading.current_thread().name}")
            return fn(*args)

        return op

    monkeypatch.setattr(
        threaded.heapq,
        "heappush",
        guarded(heapq.heappush),  # type: ignore[attr-defined]
    )
    monkeypatch.setattr(threaded.heapq, "heappop", guarded(heapq.heappop))  # type: ignore[attr-defined]

    def stale_then_live(i: int) -> None:
        runner.arm(("stale", i), runner.now() + 30.0)
        runner.cancel(("stale", i))  # the entry stays on the heap, at its head: the runner drops it
        runner.arm(("live", i), runner.now() + 0.01)

    for i in range(5):
        runner.call(lambda i=i: stale_then_live(i))  # a turn on this thread: the runner sleeps
        _io_thread(lambda i=i: transport.deliver(Interrupt(i)))  # and one on an I/O thread
    _until(lambda: sum(k[0] == "live" for k, _ in core.fired) == 5)
    assert unlocked == []
    assert runner.alive and runner.error is None


def test_a_caller_does_not_take_a_turn_once_another_request_is_undecided(rig) -> None:
    """A caller judges the runner idle (asleep, inbox empty, nothing undecided) before it holds the
    core lock; if another thread submits in between, a turn taken anyway would pump that request's
    answer and run the other caller's callbacks inside this caller's submit, under this caller's own
    locks.  Checked again under the lock, the caller hands its submission to the runner instead."""
    runner, _, _ = rig
    submitted_on: dict[str, str] = {}
    a_judged, b_submitted = threading.Event(), threading.Event()
    real_turn = runner._turn_here

    def late_turn(fn: Any = None) -> bool:
        if threading.current_thread().name == "A" and fn is not None:
            a_judged.set()  # A saw nothing undecided and now stands before the core lock
            assert b_submitted.wait(5)
        return real_turn(fn)

    def submit(request: str, **_: Any) -> tuple[int, list[Action]]:
        submitted_on[request] = threading.current_thread().name
        return len(submitted_on), []

    runner._turn_here = late_turn  # type: ignore[method-assign]
    runner.core.submit = submit  # type: ignore[method-assign]
    ta = threading.Thread(target=lambda: runner.submit("X", True, None, lambda v, e: None), name="A")
    ta.start()
    assert a_judged.wait(5)
    tb = threading.Thread(target=lambda: runner.submit("Y", True, None, lambda v, e: None), name="B")
    tb.start()
    tb.join(5)
    b_submitted.set()
    ta.join(5)
    assert not ta.is_alive() and not tb.is_alive()
    _until(lambda: "X" in submitted_on)
    assert submitted_on == {"Y": "B", "X": "apcrypto-runner"}  # B's turn; X went through the inbox


def _core_failing_on(bad: str) -> Callable[..., tuple[int, list[Action]]]:
    rids = iter(range(1, 1000))

    def submit(request: str, **_: Any) -> tuple[int, list[Action]]:
        if request == bad:
            raise RuntimeError(f"core bug on {request}")
        return next(rids), []

    return submit


def test_a_submission_the_core_raises_on_in_a_caller_s_turn_ends_with_an_error(rig) -> None:
    """The core raising on a submit (a bug) leaves the request without a rid: no Resolve would ever
    come, and the caller already holds its future.  It ends now, with the error, and the runner stops."""
    runner, _, _ = rig
    runner.core.submit = _core_failing_on("boom")  # type: ignore[method-assign]
    got: list[BaseException | None] = []
    runner.submit("boom", True, None, lambda value, error: got.append(error))
    assert len(got) == 1 and isinstance(got[0], ApcryptoError) and "core bug on boom" in str(got[0])
    _until(lambda: not runner.alive)
    with pytest.raises(RuntimeError, match="stopped"):
        runner.submit("late", True, None, lambda value, error: None)


# the runner thread dies of the core bug by design (it re-raises after recording it in .error)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_when_the_runner_dies_on_a_batch_every_submission_it_had_taken_or_held_ends(rig) -> None:
    """Submissions queued while the core lock was busy are run by the runner thread as one batch; the
    core raising on the first must not strand the ones behind it, nor what is still in the inbox."""
    runner, _, _ = rig
    runner.core.submit = _core_failing_on("a")  # type: ignore[method-assign]
    ended: dict[str, BaseException | None] = {}
    held, go = threading.Event(), threading.Event()

    def busy() -> None:  # a turn in progress elsewhere: the submissions below queue in the inbox
        with runner.core_lock:
            held.set()
            assert go.wait(10)

    other = threading.Thread(target=busy)
    other.start()
    assert held.wait(10)
    for name in "abc":
        runner.submit(name, True, None, lambda value, error, name=name: ended.__setitem__(name, error))
    go.set()
    other.join(10)
    _until(lambda: not runner.alive)
    assert sorted(ended) == ["a", "b", "c"]  # each exactly once (a dict entry per call)
    assert all(isinstance(e, ApcryptoError) for e in ended.values())
    assert isinstance(runner.error, RuntimeError)


def test_results_stay_right_when_the_io_thread_delivers_them(zmq_server: ServerProcess) -> None:
    from tests._fixtures_zmq import E, rsa_key

    k = rsa_key(1024)
    threads: set[str] = set()
    with apcrypto.connect(zmq_server.data, domains=[0]) as client:
        assert client.wait_ready(10)
        for i in range(30):  # one at a time: the runner sleeps while each answer is on its way
            fut = client.mod_expo(i + 2, E, k.n)
            fut.add_done_callback(lambda f: threads.add(threading.current_thread().name))
            assert int.from_bytes(fut.result(10), "big") == pow(i + 2, E, k.n)
    assert any(name.startswith("apcrypto-zmq") for name in threads), threads
    # and the submits themselves went out on the caller's thread, straight onto the socket
    assert client.transport.counters["direct_sends"] > 0  # type: ignore[attr-defined]
