"""The per-queue state machine table (DESIGN §4.4, reference §3.2): every cell names a real step.

``queue.TABLE[state][event]`` is data; ``DriverCore._step_<name>`` is the code.  A typo in either
would only show up when that (state, event) pair happens at run time, perhaps in a failure path
nobody exercised, so check every cell here, and check that each step returns a ``Wait``.
"""

from __future__ import annotations

import inspect

import pytest

from apcrypto.core.config import FAST, DriverConfig
from apcrypto.core.driver import DriverCore
from apcrypto.core.queue import STATE_LIMITS, TABLE, QEvent, QState, Queue, Wait
from apformats.results import qid_of

CELLS = [(s, e) for s in QState for e in QEvent]


def test_every_state_has_a_row_and_every_row_every_event() -> None:
    assert set(TABLE) == set(QState)
    for state, row in TABLE.items():
        assert set(row) == set(QEvent), state


@pytest.mark.parametrize(("state", "event"), CELLS, ids=[f"{s.value}-{e.value}" for s, e in CELLS])
def test_cell_names_an_existing_step(state: QState, event: QEvent) -> None:
    name = TABLE[state][event]
    step = getattr(DriverCore, "_step_" + name, None)
    assert step is not None, f"TABLE[{state}][{event}] = {name!r}: no DriverCore._step_{name}"
    params = list(inspect.signature(step).parameters)
    assert params == ["self", "q"], (name, params)
    # the hot path reads the step names precomputed on the state: they must agree with the table
    steps = getattr(state, "steps", None)
    if steps is not None:
        assert steps[[QEvent.KICK, QEvent.TIMEOUT].index(event)] == "_step_" + name


@pytest.mark.parametrize(("state", "event"), CELLS, ids=[f"{s.value}-{e.value}" for s, e in CELLS])
def test_every_cell_runs_and_returns_a_wait(state: QState, event: QEvent) -> None:
    """Run each step on a queue put in that state: it returns a Wait and does not raise."""
    core = DriverCore(FAST, supports_interrupts=True)
    qid = qid_of(0, 0)
    q = Queue(qid, state=state, mode="accel", slots=8)
    core.queues[qid] = q
    wait = getattr(core, "_step_" + TABLE[state][event])(q)
    assert isinstance(wait, Wait)
    core._flush()


def test_no_step_is_unused() -> None:
    """Every ``_step_*`` method is reachable from the table (directly or as a helper of a step)."""
    named = {v for row in TABLE.values() for v in row.values()}
    steps = {n[len("_step_") :] for n in dir(DriverCore) if n.startswith("_step_")}
    helpers = {"reset", "probe", "read", "drain", "await"}  # called by other steps
    assert steps - named <= helpers, steps - named
    assert named <= steps


def test_kernel_shape_of_the_table() -> None:
    """Where our states are the kernel's, the cells do the kernel's step (reference §3.2)."""
    assert TABLE[QState.RESET_START][QEvent.TIMEOUT] == "reset"
    assert TABLE[QState.RESET_WAIT][QEvent.TIMEOUT] == "tapq"
    assert TABLE[QState.SETIRQ_WAIT][QEvent.TIMEOUT] == "tapq"
    assert TABLE[QState.IDLE][QEvent.KICK] == "write"
    assert TABLE[QState.IDLE][QEvent.TIMEOUT] == "nop"
    assert TABLE[QState.WORKING][QEvent.TIMEOUT] == "read_write"
    assert TABLE[QState.QUEUE_FULL][QEvent.TIMEOUT] == "read"
    # our additions: recovery-wait drains (never resets: that would drop the stored replies) and
    # an offline queue is re-probed by its timer, never by new work; a kick (the end of a control
    # instruction that made the timer skip its TAPQ) only pays the re-probe the timer owed
    assert "reset" not in TABLE[QState.RECOVERY_WAIT][QEvent.KICK]
    assert "reset" not in TABLE[QState.RECOVERY_WAIT][QEvent.TIMEOUT]
    assert TABLE[QState.OFFLINE][QEvent.KICK] == "reprobe_if_due"
    assert TABLE[QState.OFFLINE][QEvent.TIMEOUT] == "reprobe"


def test_queue_full_never_writes() -> None:
    for event in QEvent:
        assert "write" not in TABLE[QState.QUEUE_FULL][event]


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
