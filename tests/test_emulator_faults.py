"""Fault injection through the control plane: machine failure (patent US 11,593,208 claims 6-7),
checkstop, deconfigure, reset in progress, busy, failing requests, slow engines, triggers, clear."""

from __future__ import annotations

import threading

import pytest

from apformats.codes import NO_PENDING_REPLY, MachineFailureState, ReplyCode, ResponseCode
from apformats.messages import parse_reply
from apformats.results import Instr, qid_of
from emulator import (
    Busy,
    Checkstop,
    Deconfigure,
    Emulator,
    FailRequest,
    MachineFailure,
    ResetInProgress,
    SlowEngines,
)
from tests._fixtures_emulator import (
    Q00,
    Q01,
    Q10,
    Q11,
    counter_increment,
    default_emu,
    drain,
    fill,
    key,
    result_int,
    small,
    small_exact,
)
from tests.test_emulator_instructions import call

__all__ = ["default_emu", "small", "small_exact"]

RC = ResponseCode
MEX_1K = 300e-6
CARD0 = (Q00, Q01)


# --- machine failure ----------------------------------------------------------------------------


def _fail_with_running_and_waiting(emu: Emulator, recovery: float = 0.05) -> None:
    """Card 0 (2 engines): psmids 0, 1 done; 2 and 10 running; 3, 4, 11, 12 waiting."""
    fill(emu, Q00, range(0, 5))
    fill(emu, Q01, range(10, 13))
    emu.clock.run_until(MEX_1K * 1.5)
    emu.control.machine_failure(0, recovery_time=recovery)


def test_machine_failure_one_stored_reply_per_held_message(small_exact: Emulator) -> None:
    emu = small_exact
    _fail_with_running_and_waiting(emu)
    t_fail = MEX_1K * 1.5
    log = {e.psmid: e for e in emu.execution_log.entries()}
    assert {p: log[p].outcome for p in log} == {
        0: "completed",
        1: "completed",
        2: "in-process-failed",
        10: "in-process-failed",
        3: "pending-failed",
        4: "pending-failed",
        11: "pending-failed",
        12: "pending-failed",
    }
    assert all(log[p].ended == pytest.approx(t_fail) for p in (2, 3, 4, 10, 11, 12))
    assert log[3].started is None and log[3].engine is None
    assert {log[2].engine, log[10].engine} == {0, 1}
    assert all(log[p].reply_code == ReplyCode.MACHINE_FAILURE for p in (2, 3, 4, 10, 11, 12))

    # During recovery: completed replies drain; the stored ones are held, not available.
    assert [r.psmid for r in drain(emu, Q00)] == [0, 1]
    r = emu.dqap(Q00)
    assert r.status.rc == NO_PENDING_REPLY and not r.status.queue_empty
    assert emu.dqap(Q01).status.rc == NO_PENDING_REPLY

    emu.clock.run_until(t_fail + 0.05)  # recovery complete
    replies = {r.psmid: parse_reply(r.reply) for q in CARD0 for r in drain(emu, q)}
    assert sorted(replies) == [2, 3, 4, 10, 11, 12]  # exactly one each
    for p, rep in replies.items():
        assert rep.kind == "error" and rep.msg_type == 0x82 and rep.reply_code == ReplyCode.MACHINE_FAILURE
        if p in (2, 10):
            assert rep.mf_state == MachineFailureState.IN_PROCESS and rep.engine == log[p].engine
        else:
            assert rep.mf_state == MachineFailureState.REQUEST_PENDING and rep.engine is None
    assert emu.tapq(Q00).status.queue_empty and emu.tapq(Q01).status.queue_empty
    assert emu.execution_log.starts(3) == 0 and emu.execution_log.starts(2) == 1


@pytest.mark.parametrize("instr", [i for i in Instr if i is not Instr.DQAP])
def test_busy_on_everything_but_dqap_during_recovery(small_exact: Emulator, instr: Instr) -> None:
    emu = small_exact
    _fail_with_running_and_waiting(emu)
    for qid in CARD0:
        r = call(emu, instr, qid)
        assert r.status.rc == RC.BUSY
    assert call(emu, instr, Q10).status.rc != RC.BUSY  # the other card is unaffected
    emu.clock.run_until_idle()
    assert len(emu.execution_log) == 8 + (instr is Instr.NQAP)  # only card 1's NQAP went in


def test_stored_replies_are_unavailable_until_recovery_completes(small_exact: Emulator) -> None:
    emu = small_exact
    _fail_with_running_and_waiting(emu, recovery=1.0)
    drain(emu, Q00)
    emu.clock.run_until(1.0)  # just short of MEX_1K * 1.5 + 1.0
    assert emu.dqap(Q00).status.rc == NO_PENDING_REPLY
    assert emu.tapq(Q00).status.rc == RC.BUSY
    emu.clock.run_until_idle()
    assert emu.tapq(Q00).status.rc == RC.NORMAL
    assert emu.tapq(Q00).status.replies_waiting
    assert [r.psmid for r in drain(emu, Q00)] == [2, 3, 4]  # oldest first


def test_card_works_normally_after_recovery(small_exact: Emulator) -> None:
    emu = small_exact
    _fail_with_running_and_waiting(emu)
    emu.clock.run_until_idle()
    for q in CARD0:
        drain(emu, q)
    assert emu.card_state(0).value == "normal"
    assert fill(emu, Q00, [99]) == [RC.NORMAL]
    emu.clock.run_until_idle()
    assert result_int(emu.dqap(Q00)) == pow(101, 65537, key().n)
    assert emu.control.faults() == []


def test_recovery_completion_interrupts(small_exact: Emulator) -> None:
    emu = small_exact
    seen: list[tuple[int, float]] = []
    emu.aqic(Q01, True, lambda q: seen.append((q, emu.clock.now())))
    _fail_with_running_and_waiting(emu, recovery=0.5)
    emu.clock.run_until_idle()
    assert seen == [(Q01, pytest.approx(MEX_1K * 1.5 + 0.5))]


def test_machine_failure_with_nothing_held(small: Emulator) -> None:
    small.control.machine_failure(1, recovery_time=0.1)
    assert small.tapq(Q10).status.rc == RC.BUSY
    r = small.dqap(Q10)
    assert r.status.rc == NO_PENDING_REPLY and r.status.queue_empty
    small.clock.run_until_idle()
    assert small.tapq(Q10).status.rc == RC.NORMAL


def test_machine_failure_default_recovery_time_from_profile(small: Emulator) -> None:
    f = small.control.machine_failure(0)
    assert f == MachineFailure(card=0)
    assert small.clock.next_deadline() == pytest.approx(small.profile.timing.recovery_time)


def test_machine_failure_after_requests(small_exact: Emulator) -> None:
    emu = small_exact
    fill(emu, Q00, [1])
    f = emu.control.machine_failure(0, recovery_time=0.1, after_requests=3)
    assert emu.control.state(f) == "pending"
    assert fill(emu, Q01, [2, 3]) == [RC.NORMAL] * 2
    assert emu.control.state(f) == "pending"
    assert fill(emu, Q00, [4, 5]) == [RC.NORMAL, RC.BUSY]  # 4 was the 3rd: the card failed with it
    assert emu.control.state(f) == "active"
    outcomes = {e.psmid: e.outcome for e in emu.execution_log.entries()}
    assert outcomes == {
        1: "in-process-failed",
        2: "in-process-failed",
        3: "pending-failed",
        4: "pending-failed",
    }
    emu.clock.run_until_idle()
    assert emu.control.state(f) == "done"


def test_machine_failure_at_time(small_exact: Emulator) -> None:
    emu = small_exact
    emu.control.machine_failure(0, recovery_time=0.1, at=MEX_1K / 2)
    fill(emu, Q00, [1, 2, 3])
    emu.clock.run_until_idle()
    outcomes = [e.outcome for e in emu.execution_log.entries()]
    assert outcomes == ["in-process-failed", "in-process-failed", "pending-failed"]
    assert len(drain(emu, Q00)) == 3


# --- checkstop / deconfigure --------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "rc"), [("checkstop", RC.CHECKSTOPPED), ("deconfigure", RC.DECONFIGURED)])
def test_dead_card_answers_every_instruction_and_never_replies(
    small_exact: Emulator, kind: str, rc: int
) -> None:
    emu = small_exact
    fill(emu, Q00, range(0, 4))
    fill(emu, Q01, [10])
    emu.clock.run_until(MEX_1K)
    getattr(emu.control, kind)(0)
    for qid in CARD0:
        for instr in Instr:
            assert call(emu, instr, qid).status.rc == rc, (qid, instr)
    assert emu.tapq(Q00).hwinfo is not None
    assert call(emu, Instr.NQAP, Q10).status.rc == RC.NORMAL
    emu.clock.advance(10.0)
    assert emu.dqap(Q00).status.rc == rc
    outcomes = {
        e.psmid: (e.outcome, e.started is not None) for e in emu.execution_log.entries() if e.qid != Q10
    }
    assert outcomes == {
        0: ("discarded", True),
        1: ("discarded", True),
        2: ("discarded", True),
        10: ("discarded", True),
        3: ("discarded", False),
    }

    emu.control.restore(0)
    for qid in CARD0:
        t = emu.tapq(qid).status
        assert t.rc == RC.NORMAL and t.queue_empty and not t.irq_enabled
        assert emu.dqap(qid).status.rc == NO_PENDING_REPLY
    assert fill(emu, Q00, [20]) == [RC.NORMAL]
    emu.clock.run_until_idle()
    assert [r.psmid for r in drain(emu, Q00)] == [20]
    assert emu.control.faults() == []


def test_checkstop_during_recovery_loses_stored_replies(small_exact: Emulator) -> None:
    emu = small_exact
    _fail_with_running_and_waiting(emu)
    mf, cs = emu.control.faults()[0], emu.control.checkstop(0)
    assert emu.control.state(mf) == "done" and emu.control.state(cs) == "active"
    emu.clock.run_until_idle()
    emu.control.restore(0)
    assert drain(emu, Q00) == [] and drain(emu, Q01) == []
    outcomes = {e.outcome for e in emu.execution_log.entries() if e.psmid not in (0, 1)}
    assert outcomes == {"discarded"}


def test_restore_of_a_healthy_card_is_harmless(small: Emulator) -> None:
    fill(small, Q00, [1])
    small.control.restore(0)
    small.clock.run_until_idle()
    assert [r.psmid for r in drain(small, Q00)] == [1]


def test_checkstop_after_requests(small: Emulator) -> None:
    small.control.checkstop(1, after_requests=2)
    assert fill(small, Q10, [1, 2, 3]) == [RC.NORMAL, RC.NORMAL, RC.CHECKSTOPPED]


# --- reset in progress / busy -------------------------------------------------------------------


def test_external_reset_in_progress(small_exact: Emulator) -> None:
    emu = small_exact
    seen: list[int] = []
    emu.aqic(Q00, True, seen.append)
    fill(emu, Q00, [1, 2, 3])
    f = emu.control.reset_in_progress(Q00, 0.01)
    assert f == ResetInProgress(qid=Q00, duration=0.01)
    for instr in Instr:
        assert call(emu, instr, Q00).status.rc == RC.RESET_IN_PROGRESS
    assert call(emu, Instr.TAPQ, Q01).status.rc == RC.NORMAL
    assert {e.outcome for e in emu.execution_log.entries()} == {"discarded"}
    emu.clock.run_until(0.01)
    assert emu.control.state(f) == "done"
    t = emu.tapq(Q00).status
    assert t.rc == RC.NORMAL and t.queue_empty and not t.irq_enabled
    assert seen == []


def test_busy_answers_busy_while_work_continues(small_exact: Emulator) -> None:
    emu = small_exact
    fill(emu, Q00, [1, 2, 3])
    f = emu.control.busy(Q00, 0.002)
    for instr in (Instr.NQAP, Instr.DQAP, Instr.TAPQ):
        assert call(emu, instr, Q00).status.rc == RC.BUSY
    assert call(emu, Instr.TAPQ, Q01).status.rc == RC.NORMAL
    assert emu.aqic(Q00, True).status.rc == RC.NORMAL
    emu.clock.run_until(0.0019)
    assert emu.dqap(Q00).status.rc == RC.BUSY
    assert {e.outcome for e in emu.execution_log.entries()} == {"completed"}  # the engines kept going
    emu.clock.run_until(0.002)
    assert emu.control.state(f) == "done"
    assert [r.psmid for r in drain(emu, Q00)] == [1, 2, 3]


def test_busy_reset_wins_over_busy(small: Emulator) -> None:
    small.control.busy(Q00, 1.0)
    assert small.rapq(Q00).status.rc == RC.NORMAL
    assert small.tapq(Q00).status.rc == RC.RESET_IN_PROGRESS
    small.clock.advance(0.1)
    assert small.tapq(Q00).status.rc == RC.BUSY


# --- failing requests ---------------------------------------------------------------------------


def test_fail_request_nth_on_a_queue_has_no_effect(default_emu: Emulator) -> None:
    emu = default_emu
    cca = qid_of(2, 1)
    f = emu.control.fail_request(ReplyCode.OPERAND_INVALID, qid=cca, nth=2)
    for p in range(1, 4):
        emu.nqap(cca, p, counter_increment(1))
    emu.nqap(qid_of(2, 0), 9, counter_increment(0))  # another queue: not counted
    emu.clock.run_until_idle()
    replies = {r.psmid: parse_reply(r.reply) for r in drain(emu, cca)}
    assert replies[2].kind == "error" and replies[2].reply_code == ReplyCode.OPERAND_INVALID
    assert replies[1].kind == replies[3].kind == "ok"
    assert emu.stores[(2, 1)].counter == 2  # the failed one changed nothing
    (e,) = emu.execution_log.for_psmid(2)
    assert e.outcome == "error" and e.reply_code == 0x82 and e.effect is None and e.started is not None
    assert emu.control.state(f) == "done" and emu.control.faults() == []


def test_fail_request_next_on_any_queue(small: Emulator) -> None:
    small.control.fail_request(0x90)
    fill(small, Q11, [5])
    fill(small, Q00, [6])
    small.clock.run_until_idle()
    assert parse_reply(small.dqap(Q11).reply).reply_code == 0x90
    assert small.execution_log.for_psmid(6)[0].outcome == "completed"


def test_fail_request_probability_until_cleared(small: Emulator) -> None:
    small.control.fail_request(0x90, qid=Q00, probability=1.0)
    fill(small, Q00, [1, 2])
    small.control.clear()
    fill(small, Q00, [3])
    small.clock.run_until_idle()
    assert [e.outcome for e in small.execution_log.entries()] == ["error", "error", "completed"]


# --- slow engines -------------------------------------------------------------------------------


def test_slow_engines_for_a_while(small_exact: Emulator) -> None:
    emu = small_exact
    f = emu.control.slow_engines(0, 4.0, duration=0.002)
    fill(emu, Q00, [1])
    fill(emu, Q10, [2])
    emu.clock.run_until(0.002)
    fill(emu, Q00, [3])
    emu.clock.run_until_idle()
    span = {e.psmid: e.ended - e.started for e in emu.execution_log.entries()}
    assert span == {1: pytest.approx(4 * MEX_1K), 2: pytest.approx(MEX_1K), 3: pytest.approx(MEX_1K)}
    assert emu.control.state(f) == "done"


def test_slow_engines_until_cleared(small_exact: Emulator) -> None:
    emu = small_exact
    emu.control.slow_engines(1, 2.0)
    fill(emu, Q10, [1])
    emu.clock.run_until_idle()
    assert len(emu.control.faults()) == 1
    emu.control.clear()
    fill(emu, Q10, [2])
    emu.clock.run_until_idle()
    span = [e.ended - e.started for e in emu.execution_log.entries()]
    assert span == [pytest.approx(2 * MEX_1K), pytest.approx(MEX_1K)]


# --- the control plane itself -------------------------------------------------------------------


def test_faults_lists_pending_and_active_with_python_reprs(small: Emulator) -> None:
    c = small.control
    faults = [
        c.machine_failure(0, 0.5, at=1.0),
        c.checkstop(1, after_requests=5),
        c.busy(Q01, 0.2),
        c.slow_engines(0, 2.0, 1.0),
        c.fail_request(0x82, qid=Q00, nth=3),
        c.deconfigure(1, at=2.0),
        c.reset_in_progress(Q11, 0.1, at=0.5),
    ]
    assert c.faults() == faults
    for f in faults:
        assert eval(repr(f)) == f  # frozen dataclasses: the repr is a valid constructor call
    assert [c.state(f) for f in faults] == [
        "pending",
        "pending",
        "active",
        "active",
        "pending",
        "pending",
        "pending",
    ]
    with pytest.raises(AttributeError):
        faults[0].card = 1  # type: ignore[misc]


def test_clear_heals_everything(small_exact: Emulator) -> None:
    emu = small_exact
    c = emu.control
    _fail_with_running_and_waiting(emu, recovery=100.0)
    c.checkstop(1)
    c.machine_failure(0, at=50.0)
    c.busy(Q01, 100.0)
    c.transport_faults.drop_frames(3)
    c.clear()
    assert c.faults() == [] and c.transport_faults.pending() == {"drop": 0, "corrupt": 0, "disconnect": 0}
    assert emu.card_state(0).value == "normal" and emu.card_state(1).value == "normal"
    assert len(drain(emu, Q00)) == 5  # the stored replies were released
    assert emu.tapq(Q01).status.rc == RC.NORMAL
    emu.clock.run_until_idle()
    assert emu.card_state(0).value == "normal"  # the cancelled at=50 failure never fired
    assert emu.clock.now() < 50


def test_bad_faults_are_refused(small: Emulator) -> None:
    c = small.control
    with pytest.raises(ValueError, match="no card 7"):
        c.machine_failure(7)
    with pytest.raises(ValueError, match=r"no queue 00\.0009"):
        c.busy(qid_of(0, 9), 1.0)
    with pytest.raises(ValueError, match="not both"):
        c.checkstop(0, at=1.0, after_requests=2)
    with pytest.raises(ValueError, match="after_requests"):
        c.checkstop(0, after_requests=0)
    with pytest.raises(ValueError, match="factor"):
        c.slow_engines(0, 0.0)
    with pytest.raises(ValueError, match="duration"):
        c.busy(Q00, -1.0)
    with pytest.raises(ValueError, match="reply_code"):
        c.fail_request(0x100)
    assert c.faults() == []


#: The inputs of issue 9 that used to stop the emulator for good (a timer ~1e10 s out killed the wall
#: clock's pump thread), and their neighbours: each is refused, naming the field.
OVERFLOWS = [
    ("busy", (Q00,), {"duration": 1e10}, "duration"),
    ("busy", (Q00, 1.0), {"at": 1e10}, "at"),
    ("machine_failure", (0,), {"recovery_time": 1e10}, "recovery_time"),
    ("slow_engines", (0,), {"factor": 1e15}, "factor"),
    ("checkstop", (0,), {"at": float("inf")}, "at"),
    ("checkstop", (0,), {"at": float("nan")}, "at"),
    ("checkstop", (0,), {"at": -1.0}, "at"),
    ("reset_in_progress", (Q00,), {"duration": float("inf")}, "duration"),
    ("slow_engines", (0, 2.0), {"duration": float("nan")}, "duration"),
    ("slow_engines", (0,), {"factor": float("inf")}, "factor"),
    ("checkstop", (0,), {"after_requests": 10**12}, "after_requests"),
    ("checkstop", (True,), {}, "card"),
    ("checkstop", (1.0,), {}, "card"),
    ("busy", (Q00, "1"), {}, "duration"),
    ("fail_request", (0x82,), {"nth": 10**12}, "nth"),
    ("fail_request", (0x82,), {"probability": float("nan")}, "probability"),
    ("fail_request", (0x82, -1), {}, "qid"),
]


@pytest.mark.parametrize(("op", "args", "kw", "field"), OVERFLOWS, ids=[f"{o[0]}-{o[3]}" for o in OVERFLOWS])
def test_out_of_range_inputs_are_refused_and_the_clock_lives_on(
    op: str, args: tuple, kw: dict, field: str
) -> None:
    with Emulator("small", clock="wall", seed=1) as emu:
        with pytest.raises(ValueError, match=field):
            getattr(emu.control, op)(*args, **kw)
        assert emu.control.faults() == []
        done = threading.Event()
        emu.aqic(Q01, True, lambda qid: done.set())
        assert fill(emu, Q01, [5]) == [RC.NORMAL]
        assert done.wait(5.0), "no request completes any more"
        assert emu.dqap(Q01).psmid == 5
        assert emu.clock.running  # type: ignore[union-attr]


def test_the_largest_accepted_values_arm_and_clear() -> None:
    """The documented maxima are accepted, and a wall clock holding such a timer keeps serving."""
    from emulator.faults import MAX_AT, MAX_DURATION, MAX_FACTOR

    with Emulator("small", clock="wall", seed=1) as emu:
        emu.control.busy(Q00, MAX_DURATION, at=MAX_AT)
        emu.control.slow_engines(1, MAX_FACTOR, MAX_DURATION, at=MAX_AT)
        emu.control.machine_failure(1, recovery_time=MAX_DURATION, at=MAX_AT)
        assert len(emu.control.faults()) == 3
        done = threading.Event()
        emu.aqic(Q01, True, lambda qid: done.set())
        fill(emu, Q01, [6])
        assert done.wait(5.0)
        emu.control.clear()
        assert emu.control.faults() == []


def test_inject_takes_fault_objects(small: Emulator) -> None:
    for f in (
        Busy(qid=Q00, duration=0.1),
        Checkstop(card=1, at=5.0),
        Deconfigure(card=1, at=6.0),
        SlowEngines(card=0, factor=1.5),
        FailRequest(reply_code=0x82),
    ):
        assert small.control.inject(f) is f
    assert len(small.control.faults()) == 5


#: The control plane's kept names (fault injection and reads), the same in process and on a server.
CONTROL_NAMES = (
    "machine_failure", "checkstop", "deconfigure", "restore", "busy", "reset_in_progress",
    "fail_request", "slow_engines", "drop_frames", "corrupt_frames", "disconnect",
    "execution_log", "now", "clear", "faults", "inject", "state",
)  # fmt: skip


def test_the_control_plane_names_are_the_same_in_process_and_on_a_server(small: Emulator) -> None:
    from emulator.control_client import ControlClient

    for name in CONTROL_NAMES:
        assert callable(getattr(small.control, name)), name
        assert callable(getattr(ControlClient, name)), name
    c = small.control
    assert c.drop_frames(2) == {"drop": 2, "corrupt": 0, "disconnect": 0}
    assert c.corrupt_frames() == {"drop": 2, "corrupt": 1, "disconnect": 0}
    assert c.disconnect() == {"drop": 2, "corrupt": 1, "disconnect": 1}
    assert c.transport_faults.pending() == {"drop": 2, "corrupt": 1, "disconnect": 1}  # the same holder
    with pytest.raises(ValueError):
        c.drop_frames(-1)
    c.clear()
    assert c.transport_faults.pending() == {"drop": 0, "corrupt": 0, "disconnect": 0}
    fill(small, Q00, [1, 2])
    small.clock.run_until(0.5)
    assert c.now() == small.clock.now() == 0.5
    assert c.execution_log() == small.execution_log.entries() and len(c.execution_log()) == 2
    assert c.execution_log(2) == small.execution_log.for_psmid(2) and c.execution_log(2)[0].psmid == 2


def test_transport_faults_are_a_plain_holder(small: Emulator) -> None:
    tf = small.control.transport_faults
    tf.drop_frames(2)
    tf.corrupt_frames(1)
    tf.disconnect()
    assert tf.pending() == {"drop": 2, "corrupt": 1, "disconnect": 1}
    assert [tf.take_drop() for _ in range(3)] == [True, True, False]
    assert tf.take_corrupt() and not tf.take_corrupt()
    assert tf.take_disconnect() and not tf.take_disconnect()
    for bad in (-1, 10**7, 1.0, True):
        with pytest.raises(ValueError):
            tf.drop_frames(bad)  # type: ignore[arg-type]
    fill(small, Q00, [1])  # the card model ignores them
    small.clock.run_until_idle()
    assert len(drain(small, Q00)) == 1
