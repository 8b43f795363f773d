"""The emulator's clocks: VirtualClock ordering and stepping, WallClock's pump thread."""

from __future__ import annotations

import threading

import pytest

from apformats.results import qid_of
from emulator import ClockError, Emulator, VirtualClock, WallClock
from tests._fixtures_emulator import mex


def test_callbacks_run_in_time_then_scheduling_order() -> None:
    clock = VirtualClock()
    ran: list[str] = []
    clock.call_at(2.0, lambda: ran.append("c"))
    clock.call_at(1.0, lambda: ran.append("a"))
    clock.call_later(1.0, lambda: ran.append("b"))  # same time as "a", scheduled later
    clock.call_at(2.0, lambda: ran.append("d"))
    assert clock.next_deadline() == 1.0
    assert clock.run_until_idle() == 4
    assert ran == ["a", "b", "c", "d"] and clock.now() == 2.0


def test_step_moves_to_the_next_deadline() -> None:
    clock = VirtualClock()
    assert clock.step() is False and clock.next_deadline() is None
    times: list[float] = []
    clock.call_later(0.5, lambda: times.append(clock.now()))
    clock.call_later(0.25, lambda: times.append(clock.now()))
    assert clock.step() and clock.now() == 0.25
    assert clock.step() and clock.now() == 0.5
    assert times == [0.25, 0.5]


def test_never_backwards() -> None:
    clock = VirtualClock(start=10.0)
    clock.advance(1.0)
    with pytest.raises(ClockError, match="backwards"):
        clock.run_until(5.0)
    with pytest.raises(ClockError, match="backwards"):
        clock.advance(-1.0)
    with pytest.raises(ValueError):
        clock.call_later(-1.0, lambda: None)
    ran: list[float] = []
    clock.call_at(3.0, lambda: ran.append(clock.now()))  # in the past: runs now, time stays
    clock.run_until_idle()
    assert ran == [11.0] and clock.now() == 11.0


def test_run_until_and_advance() -> None:
    clock = VirtualClock()
    ran: list[int] = []
    for i in range(5):
        clock.call_at(float(i), lambda i=i: ran.append(i))
    assert clock.run_until(2.0) == 3 and ran == [0, 1, 2] and clock.now() == 2.0
    assert clock.advance(0.5) == 0 and clock.now() == 2.5
    assert clock.run_until_idle(max_time=3.5) == 1 and clock.now() == 3.5
    assert clock.run_until_idle() == 1 and clock.now() == 4.0


def test_cancel() -> None:
    clock = VirtualClock()
    ran: list[int] = []
    h = clock.call_later(1.0, lambda: ran.append(1))
    clock.call_later(2.0, lambda: ran.append(2))
    h.cancel()
    h.cancel()
    assert h.cancelled and clock.next_deadline() == 2.0
    clock.run_until_idle()
    assert ran == [2]


def test_callbacks_may_schedule_more() -> None:
    clock = VirtualClock()
    ran: list[float] = []

    def tick() -> None:
        ran.append(clock.now())
        if len(ran) < 3:
            clock.call_later(0.1, tick)

    clock.call_later(0.1, tick)
    clock.run_until_idle()
    assert ran == pytest.approx([0.1, 0.2, 0.3])


def test_runaway_loop_is_an_error_not_a_hang() -> None:
    clock = VirtualClock()

    def again() -> None:
        clock.call_later(0.0, again)

    clock.call_later(0.0, again)
    with pytest.raises(ClockError, match="still busy"):
        clock.run_until_idle(max_steps=100)


def test_wallclock_runs_callbacks_on_its_pump_thread() -> None:
    done = threading.Event()
    where: list[str] = []
    with WallClock(name="test-pump") as clock:
        assert clock.running and clock.now() >= 0.0
        clock.call_later(0.001, lambda: (where.append(threading.current_thread().name), done.set()))
        assert done.wait(5.0)
    assert where == ["test-pump"] and not clock.running
    with pytest.raises(ClockError):
        clock.call_later(0.0, lambda: None)


def test_wallclock_run_until_waits_for_the_time_running_what_falls_due_here() -> None:
    clock = WallClock()  # no pump thread: run_until runs the callbacks itself
    ran: list[tuple[str, str]] = []
    t0 = clock.now()
    clock.call_at(t0 + 0.03, lambda: ran.append(("b", threading.current_thread().name)))
    clock.call_at(t0 + 0.01, lambda: ran.append(("a", threading.current_thread().name)))
    clock.call_at(t0 + 60.0, lambda: ran.append(("late", "")))
    assert clock.run_until(t0 + 0.04) == 2
    assert clock.now() >= t0 + 0.04
    here = threading.current_thread().name
    assert ran == [("a", here), ("b", here)]  # in time order, on this thread; not the one due later
    assert clock.run_until(t0) == 0 and len(ran) == 2  # a time already passed: at once
    clock.close()
    with pytest.raises(ClockError):
        clock.run_until(clock.now() + 1.0)


def test_wallclock_keeps_going_after_a_failing_callback(caplog: pytest.LogCaptureFixture) -> None:
    done = threading.Event()
    clock = WallClock()
    clock.call_later(0.0, lambda: 1 / 0)
    clock.call_later(0.0, done.set)
    clock.start()
    clock.start()  # idempotent
    try:
        assert done.wait(5.0)
    finally:
        clock.close()
        clock.close()
    assert len(clock.errors) == 1 and isinstance(clock.errors[0], ZeroDivisionError)


def test_emulator_on_a_wall_clock() -> None:
    """The same model on real time: the pump thread completes requests and interrupts."""
    got = threading.Event()
    with Emulator("small", clock="wall") as emu:
        q = qid_of(0, 1)
        emu.aqic(q, True, lambda qid: got.set())
        assert emu.nqap(q, 1, mex(3)).status.rc == 0
        assert got.wait(5.0)
        assert emu.dqap(q).psmid == 1
    assert not emu.clock.running  # type: ignore[union-attr]


def test_emulator_leaves_a_callers_running_wall_clock_alone() -> None:
    with WallClock() as clock:
        emu = Emulator("small", clock=clock)
        emu.close()
        assert clock.running


def test_wallclock_survives_a_deadline_further_than_the_os_can_wait() -> None:
    """A timer ~1e10 s out used to raise OverflowError in the pump's wait and kill the thread: every
    later callback (every request completion) then never ran."""
    done = threading.Event()
    with WallClock() as clock:
        far = clock.call_at(1e10, lambda: None)
        clock.call_at(1e12, lambda: None)
        assert not done.wait(0.05)  # let the pump start waiting for the far deadline
        clock.call_later(0.001, done.set)
        assert done.wait(5.0), "the pump thread died"
        assert clock.running and clock.error_count == 0
        far.cancel()


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_times_are_refused_by_both_clocks(bad: float) -> None:
    virtual = VirtualClock()
    with WallClock() as wall:
        for clock in (virtual, wall):
            with pytest.raises(ValueError, match="finite"):
                clock.call_at(bad, lambda: None)
            with pytest.raises(ValueError, match="finite"):
                clock.call_later(bad, lambda: None)
        assert wall.next_deadline() is None and virtual.next_deadline() is None
    with pytest.raises(ValueError, match="finite"):
        virtual.run_until(bad)


def test_wallclock_keeps_a_bounded_record_of_failures() -> None:
    done = threading.Event()
    clock = WallClock()
    for _ in range(250):
        clock.call_later(0.0, lambda: 1 / 0)
    clock.call_later(0.0, done.set)
    with clock:
        assert done.wait(5.0)
    assert clock.error_count == 250 and len(clock.errors) == 100


class _CountingCondition:
    """A stand-in for the wall clock's condition that counts notifications (what wakes the pump)."""

    def __init__(self, inner: threading.Condition) -> None:
        self.inner = inner
        self.notified = 0

    def __enter__(self) -> bool:
        return self.inner.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.inner.__exit__(*exc)

    def notify(self, n: int = 1) -> None:
        self.notified += 1
        self.inner.notify(n)

    def notify_all(self) -> None:
        self.notified += 1
        self.inner.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        return self.inner.wait(timeout)


def _wait_until(cond, timeout: float = 5.0) -> None:
    event = threading.Event()
    deadline = 0.0
    while not cond():
        assert deadline < timeout, "condition not met"
        event.wait(0.001)
        deadline += 0.001


def test_wall_clock_wakes_its_pump_only_for_an_earlier_deadline() -> None:
    with WallClock() as clock:
        counting = _CountingCondition(clock._cond)
        clock._cond = counting  # type: ignore[assignment]
        clock.call_later(30.0, lambda: None)
        _wait_until(lambda: clock._target is not None and clock._target < 1e9)  # waits for it
        before = counting.notified
        for _ in range(20):  # later than what the pump waits for: no reason to wake it
            clock.call_later(60.0, lambda: None)
        assert counting.notified == before
        ran = threading.Event()
        clock.call_later(0.0, ran.set)  # earlier: it must wake, and run it
        assert counting.notified == before + 1
        assert ran.wait(5)


def test_an_assisting_thread_runs_what_falls_due_without_waking_the_pump() -> None:
    with WallClock() as clock:
        counting = _CountingCondition(clock._cond)
        clock._cond = counting  # type: ignore[assignment]
        _wait_until(lambda: clock._target is not None)  # the pump sleeps (nothing scheduled)
        order: list[tuple[str, int]] = []
        me = threading.get_ident()
        before = counting.notified
        with clock.assisting():
            for i in range(3):
                clock.call_later(0.0, lambda i=i: order.append(("assisted", i)))
            assert order == []  # not yet: when the assisting thread leaves
        assert counting.notified == before
        assert [x for x, _ in order] == ["assisted"] * 3 and [i for _, i in order] == [0, 1, 2]
        # ... on the assisting thread itself
        threads: list[int] = []
        with clock.assisting():
            clock.call_later(0.0, lambda: threads.append(threading.get_ident()))
        assert threads == [me]
        # a later deadline scheduled while assisting still goes to the pump, in time
        ran = threading.Event()
        with clock.assisting():
            clock.call_later(0.01, ran.set)
        assert ran.wait(5)


def test_assisting_nests_and_leaves_on_an_error_running_what_fell_due() -> None:
    """The assisting context is one object per clock (not a generator per use): nested and
    sequential uses count in and out, and leaving on an exception still runs what fell due and
    stops counting the thread in (a count left behind would keep the pump from ever being woken
    for work due now)."""
    clock = WallClock()  # not started: only the assisting thread runs anything
    try:
        ran: list[str] = []
        with clock.assisting():
            with clock.assisting():
                assert clock._assist == 2
                clock.call_later(0.0, lambda: ran.append("inner"))
            assert ran == ["inner"] and clock._assist == 1
            clock.call_later(0.0, lambda: ran.append("outer"))
        assert ran == ["inner", "outer"] and clock._assist == 0
        with pytest.raises(KeyError), clock.assisting():
            clock.call_later(0.0, lambda: ran.append("after error"))
            raise KeyError("body failed")
        assert ran[-1] == "after error" and clock._assist == 0
    finally:
        clock.close()


def test_run_due_runs_only_what_is_due_in_order_and_survives_errors() -> None:
    clock = WallClock()  # not started: only run_due runs anything
    try:
        seen: list[int] = []

        def boom() -> None:
            raise RuntimeError("callback bug")

        clock.call_at(0.0, lambda: seen.append(1))
        clock.call_at(0.0, boom)
        clock.call_at(0.0, lambda: seen.append(2))
        clock.call_later(60.0, lambda: seen.append(99))
        assert clock.run_due() == 3
        assert seen == [1, 2] and clock.error_count == 1
        assert clock.run_due() == 0 and clock.next_deadline() is not None
    finally:
        clock.close()


def test_the_pump_runs_nothing_while_a_thread_assists_and_is_woken_when_it_leaves() -> None:
    """While a thread is inside ``assisting()`` (a server handling a batch, the in-process transport
    executing one) the pump stands down, even for a callback that falls due meanwhile: the
    assisting thread runs it (``run_due`` as it goes, and on leaving), so the two never fight over
    the emulator's lock and the GIL.  A callback still to come when the thread leaves goes back to
    the pump, which runs it in time."""
    with WallClock() as clock:
        _wait_until(lambda: clock._target is not None)  # the pump sleeps (nothing scheduled)
        me = threading.get_ident()
        ran: list[int] = []
        due = threading.Event()
        clock.call_later(0.05, lambda: ran.append(threading.get_ident()))
        _wait_until(lambda: clock._target is not None and clock._target < 1e9)  # the pump waits for it
        with clock.assisting():
            clock.call_later(0.001, due.set)  # falls due while assisting too
            _wait_until(lambda: clock.now() > 0.06)  # both long past due: the pump woke for the first
            assert ran == [] and not due.is_set()  # ... and left both to this thread
            assert clock.run_due() == 2  # the batch looks at the clock as it goes
        assert ran == [me] and due.is_set()
        with clock.assisting():
            clock.call_later(0.01, lambda: ran.append(threading.get_ident()))
        assert len(ran) == 1  # not due when the thread left: the pump takes it
        _wait_until(lambda: len(ran) == 2)
        assert ran[1] != me


class _Abort(BaseException):
    """Not an Exception: what a KeyboardInterrupt in a callback looks like to the clock."""


def test_leaving_an_assist_counts_the_thread_out_even_when_a_callback_aborts() -> None:
    """The pump stands down while any thread assists, so a count left behind by a callback that
    escaped ``run_due`` on leaving would keep it down for good."""
    clock = WallClock()  # not started: only the assisting thread runs anything

    def abort() -> None:
        raise _Abort

    try:
        with pytest.raises(_Abort), clock.assisting():
            clock.call_later(0.0, abort)
        assert clock._assist == 0
    finally:
        clock.close()
