"""The per-queue state machine table (DESIGN §4.4, reference §3.2): every cell is a real step.

``machine.TABLE[state][event]`` holds the step functions themselves (as ``ap_jumptable`` holds
function pointers), so mypy checks each cell; a missing cell fails at import, and a state with no
row raises :class:`QueueProtocolError` naming the state, the event and the instruction.  Every cell
is run here once, and must return a ``Wait``.  ``machine.HANDLERS`` holds one handler per
instruction's completion, the same way.
"""

from __future__ import annotations

import inspect

import pytest

from apcrypto.core import machine
from apcrypto.core.config import FAST, DriverConfig
from apcrypto.core.driver import TABLE, DriverCore, QueueProtocolError
from apcrypto.core.machine import HANDLERS, JUMP, NEXT, TIMERS, QueueMachine
from apcrypto.core.queue import STATE_LIMITS, QEvent, QState, Queue, Wait
from apcrypto.core.timers import KINDS
from apcrypto.core.verdicts import QueueNext
from apformats.results import Instr, qid_of
from tests._fixtures_driver import res

CELLS = [(s, e) for s in QState for e in QEvent]


def name(state: QState, event: QEvent) -> str:
    return TABLE[state][event].__name__.removeprefix("_step_")


def test_a_missing_cell_names_state_event_and_instruction(monkeypatch: pytest.MonkeyPatch) -> None:
    """Like h11's LocalProtocolError: what the machine was asked to do that it has no cell for."""
    core = DriverCore(FAST, supports_interrupts=True)
    qid = qid_of(0, 0)
    q = Queue(qid, state=QState.IDLE, mode="accel", slots=8)
    core.queues[qid] = q
    jump = list(JUMP)
    jump[QState.IDLE.idx] = ()
    monkeypatch.setattr(machine, "JUMP", jump)
    core.machine.instr = Instr.DQAP
    with pytest.raises(QueueProtocolError, match=r"'idle', event 'kick'.*DQAP") as err:
        core.machine._run(q, QEvent.KICK)
    assert err.value.state is QState.IDLE and err.value.event is QEvent.KICK
    assert err.value.instr is Instr.DQAP


def test_a_missing_handler_names_state_and_instruction(monkeypatch: pytest.MonkeyPatch) -> None:
    """A completion of an instruction with no handler: the queue's state and the instruction."""
    core = DriverCore(FAST, supports_interrupts=True)
    qid = qid_of(0, 0)
    core.add_queue(qid)  # RAPQ in flight under tag 1
    by_opcode = list(machine._BY_OPCODE)
    by_opcode[Instr.RAPQ] = None
    monkeypatch.setattr(machine, "_BY_OPCODE", by_opcode)
    with pytest.raises(QueueProtocolError, match=r"'reset-start', event 'completion'.*RAPQ") as err:
        core.on_completion(1, res())
    assert err.value.state is QState.RESET_START and err.value.instr is Instr.RAPQ


def test_one_handler_per_instruction_each_a_method_of_the_machine() -> None:
    assert set(HANDLERS) == set(Instr)
    for instr, handler in HANDLERS.items():
        assert getattr(QueueMachine, handler.__name__) is handler, instr
        assert list(inspect.signature(handler).parameters) == ["self", "q", "tag", "psmid", "res"]
        assert machine._BY_OPCODE[instr] is handler  # the hot path's copy is the table's


def test_every_timer_kind_and_every_consequence_has_its_cell() -> None:
    assert set(TIMERS) == set(KINDS)
    assert set(NEXT) == set(QueueNext)
    for cell in [*TIMERS.values(), *NEXT.values()]:
        assert callable(cell) and getattr(QueueMachine, cell.__name__) is cell


def test_every_state_has_a_row_and_every_row_every_event() -> None:
    assert set(TABLE) == set(QState)
    for state, row in TABLE.items():
        assert set(row) == set(QEvent), state


@pytest.mark.parametrize(("state", "event"), CELLS, ids=[f"{s.value}-{e.value}" for s, e in CELLS])
def test_cell_is_a_step_function_of_the_machine(state: QState, event: QEvent) -> None:
    step = TABLE[state][event]
    assert getattr(QueueMachine, step.__name__) is step, step
    params = list(inspect.signature(step).parameters)
    assert params == ["self", "q"], (step.__name__, params)
    # the hot path reads the row installed for the state: it must be the table's
    assert JUMP[state.idx][[QEvent.KICK, QEvent.TIMEOUT].index(event)] is step


@pytest.mark.parametrize(("state", "event"), CELLS, ids=[f"{s.value}-{e.value}" for s, e in CELLS])
def test_every_cell_runs_and_returns_a_wait(state: QState, event: QEvent) -> None:
    """Run each step on a queue put in that state: it returns a Wait and does not raise."""
    core = DriverCore(FAST, supports_interrupts=True)
    qid = qid_of(0, 0)
    q = Queue(qid, state=state, mode="accel", slots=8)
    core.queues[qid] = q
    wait = TABLE[state][event](core.machine, q)
    assert isinstance(wait, Wait)
    core.machine.flush()


def test_no_step_is_unused() -> None:
    """Every ``_step_*`` method is reachable from the table (directly or as a helper of a step)."""
    named = {v.__name__[len("_step_") :] for row in TABLE.values() for v in row.values()}
    steps = {n[len("_step_") :] for n in dir(QueueMachine) if n.startswith("_step_")}
    helpers = {"reset", "probe", "read", "drain", "await"}  # called by other steps
    assert steps - named <= helpers, steps - named
    assert named <= steps


def test_kernel_shape_of_the_table() -> None:
    """Where our states are the kernel's, the cells do the kernel's step (reference §3.2)."""
    assert name(QState.RESET_START, QEvent.TIMEOUT) == "reset"
    assert name(QState.RESET_WAIT, QEvent.TIMEOUT) == "tapq"
    assert name(QState.SETIRQ_WAIT, QEvent.TIMEOUT) == "tapq"
    assert name(QState.IDLE, QEvent.KICK) == "write"
    assert name(QState.IDLE, QEvent.TIMEOUT) == "nop"
    assert name(QState.WORKING, QEvent.TIMEOUT) == "read_write"
    assert name(QState.QUEUE_FULL, QEvent.TIMEOUT) == "read"
    # our additions: recovery-wait drains (never resets: that would drop the stored replies) and
    # an offline queue is re-probed by its timer, never by new work; a kick (the end of a control
    # instruction that made the timer skip its TAPQ) only pays the re-probe the timer owed
    assert "reset" not in name(QState.RECOVERY_WAIT, QEvent.KICK)
    assert "reset" not in name(QState.RECOVERY_WAIT, QEvent.TIMEOUT)
    assert name(QState.OFFLINE, QEvent.KICK) == "reprobe_if_due"
    assert name(QState.OFFLINE, QEvent.TIMEOUT) == "reprobe"


def test_queue_full_never_writes() -> None:
    for event in QEvent:
        assert "write" not in name(QState.QUEUE_FULL, event)


def test_state_limits_name_config_fields_and_bound_every_transient_state() -> None:
    fields = set(DriverConfig.__dataclass_fields__)
    for state, attr in STATE_LIMITS.items():
        assert attr in fields, (state, attr)
        assert getattr(FAST, attr) > 0 and getattr(DriverConfig(), attr) > 0
    transient = {
        QState.RESET_START,
        QState.RESET_WAIT,
        QState.SETIRQ_WAIT,
        QState.PROBE,
        QState.RECOVERY_WAIT,
    }
    assert set(STATE_LIMITS) == transient  # nothing waits forever (DESIGN §4.4)


def test_in_service_states() -> None:
    assert {s for s in QState if s.in_service} == {QState.IDLE, QState.WORKING, QState.QUEUE_FULL}


def test_wait_order_is_the_kernels() -> None:
    assert Wait.AGAIN < Wait.HIGH < Wait.LOW < Wait.INTERRUPT < Wait.NONE


def test_queue_slot_accounting() -> None:
    q = Queue(qid_of(1, 2), slots=2)
    assert (q.card, q.domain) == (1, 2)
    assert q.has_free_slot() and q.held == 0
    q.on_card[1] = 1
    q.sending[7] = 2
    assert q.held == 2 and not q.has_free_slot()
    q.on_card.clear()
    q.probe_sent = True
    assert q.held == 2 and not q.has_free_slot()
    q.sending.clear()
    assert q.has_free_slot()
    q.full_hold = True
    assert not q.has_free_slot()


def test_outbox_is_the_one_writer_of_actions() -> None:
    """The batch goes out first as one Execute; timers keep the earlier deadline unless forced;
    withdraw takes back one queue's NQAPs not yet sent and forgets their tags."""
    from apcrypto.core.actions import ArmTimer, CancelTimer, Execute, Resolve
    from apcrypto.core.outbox import Outbox

    out = Outbox()
    t1 = out.emit(1, Instr.NQAP, psmid=11)
    t2 = out.emit(2, Instr.NQAP, psmid=12)
    t3 = out.emit(1, Instr.DQAP)
    out.arm(("poll", 1), 5.0)
    out.arm(("poll", 1), 6.0)  # later: the pending 5.0 stays
    out.resolve(7, b"x", None)
    assert [c.tag for c in out.withdraw(1)] == [t1]
    assert out.settle(t1) is None and out.settle(t2) == (2, Instr.NQAP, 12)
    actions = out.take()
    assert isinstance(actions[0], Execute) and [c.tag for c in actions[0].commands] == [t2, t3]
    assert actions[1:] == [ArmTimer(("poll", 1), 5.0), Resolve(7, b"x", None)]
    out.arm(("poll", 1), 6.0, force=True)
    out.cancel_all()
    assert out.take() == [ArmTimer(("poll", 1), 6.0), CancelTimer(("poll", 1))] and not out.armed
