"""The sans-I/O driver core, scripted by hand: no emulator, no clock, no threads.

Each test feeds :class:`~apcrypto.core.driver.DriverCore` hand-made ``ApResult`` values through
:class:`tests._fixtures_driver.Script` and checks the instructions it emits and the outcomes it
decides: bring-up order, slots learned from TAPQ's ``qd + 1``, never more outstanding than slots,
Q_FULL as back-pressure, DQAP until no reply is pending, stray and late replies counted and never
delivered, error replies and machine failure, deadlines, and the ledger's decisions when the
transport is lost.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest

from apcrypto.core.config import FAST
from apcrypto.core.ledger import Outcome
from apcrypto.core.queue import QState
from apcrypto.errors import (
    BadRequest,
    ClientClosed,
    CoreMisuse,
    DeadlineExceeded,
    DeviceUnavailable,
    Indeterminate,
)
from apcrypto.requests import CounterIncrement, RandomBytes
from apformats.codes import NO_PENDING_REPLY
from apformats.codes import MachineFailureState as MF
from apformats.codes import ReplyCode as RY
from apformats.codes import ResponseCode as RC
from apformats.messages import build_cprb_reply, build_error_reply, build_machine_failure, build_type80
from apformats.results import Instr, qid_of
from tests._fixtures_driver import (
    HW_ACCEL,
    HW_CCA,
    Script,
    expected_me,
    key,
    me_request,
    res,
)

Q0 = qid_of(0, 0)
Q1 = qid_of(1, 0)
C2 = qid_of(2, 0)
K = key(1024)


def up(*qids: int, hw=HW_ACCEL, irq: bool = True, **kw) -> Script:
    s = Script(interrupts=irq, **kw)
    for qid in qids:
        s.bring_up(qid, hw, irq=irq)
    return s


def accept_all(s: Script, qid: int | None = None) -> int:
    """Answer every pending NQAP (of ``qid``) with NORMAL; returns how many."""
    n = 0
    while True:
        nq = s.cmds(Instr.NQAP, qid)
        if not nq:
            return n
        for c in nq:
            s.answer(c, res(irq=True))
            n += 1


def reply_to(
    s: Script,
    dq,
    nqap,
    *,
    more: bool = False,
    empty: bool = False,
    data: bytes | None = None,
    x: int | None = None,
):
    """Answer DQAP ``dq`` with the reply to ``nqap``: ``data``, or the type 80 of ``x ** e mod n``."""
    if data is None:
        data = build_type80(expected_me(x, K))
    return s.answer(dq, res(psmid=nqap.psmid, reply=data, replies=more, empty=empty, irq=True))


# --- bring-up ---------------------------------------------------------------------------------


def test_bring_up_order_with_interrupts() -> None:
    s = Script()
    seen = s.bring_up(Q0)
    assert seen == [Instr.RAPQ, Instr.TAPQ, Instr.AQIC, Instr.TAPQ, Instr.NQAP, Instr.DQAP]
    by = {c.instr: c for c in s.history}
    assert by[Instr.TAPQ].flag is True  # T bit: ask for the GR2 hardware info
    assert by[Instr.AQIC].flag is True  # enable
    assert s.core.queues[Q0].irq is True
    # the probe is a known-answer ME, not counted as a request
    assert s.core.ledger.counters["submitted"] == 0
    assert s.resolved == {}


def test_bring_up_order_without_interrupts() -> None:
    s = Script(interrupts=False)
    assert s.bring_up(Q0, irq=False) == [Instr.RAPQ, Instr.TAPQ, Instr.NQAP, Instr.DQAP]
    assert all(c.instr is not Instr.AQIC for c in s.history)


def test_bring_up_of_a_coprocessor_probes_with_random_bytes() -> None:
    s = Script()
    s.bring_up(C2, HW_CCA)
    q = s.core.queues[C2]
    assert q.mode == "cca"
    probe = next(c for c in s.history if c.instr is Instr.NQAP)
    assert probe.message == RandomBytes(8).message(0)


def test_bring_up_waits_out_a_reset_in_progress() -> None:
    s = Script()
    s.add_queue(Q0)
    s.answer(s.one(Instr.RAPQ), res())
    for _ in range(3):
        s.fire(("poll", Q0))
        s.answer(s.one(Instr.TAPQ), res(RC.RESET_IN_PROGRESS))
        assert s.state(Q0) is QState.RESET_WAIT
        assert not s.cmds(Instr.AQIC)
    s.fire(("poll", Q0))
    s.answer(s.one(Instr.TAPQ), res(hw=HW_ACCEL, empty=True))
    assert s.state(Q0) is QState.SETIRQ_WAIT


def test_wrong_probe_answer_resets_then_takes_offline() -> None:
    """A card that computes wrong is not put in service (DESIGN §4.4: probe health)."""
    s = Script(FAST.with_(max_reset_attempts=2))
    s.add_queue(Q0)
    for _attempt in range(2):
        s.answer(s.one(Instr.RAPQ), res())
        s.fire(("poll", Q0))
        s.answer(s.one(Instr.TAPQ), res(hw=HW_ACCEL, empty=True))
        s.answer(s.one(Instr.AQIC), res())
        s.fire(("poll", Q0))
        s.answer(s.one(Instr.TAPQ), res(hw=HW_ACCEL, empty=True, irq=True))
        probe = s.one(Instr.NQAP)
        s.answer(probe, res(irq=True))
        s.interrupt(Q0)
        s.answer(s.one(Instr.DQAP), res(psmid=probe.psmid, reply=build_type80(bytes(64)), irq=True))
    assert s.state(Q0) is QState.OFFLINE
    assert "probe" in s.core.queues[Q0].offline_reason


def test_bring_up_timeout_is_bounded() -> None:
    """A reset that never finishes ends offline after max_reset_attempts, RAPQ then ZAPQ."""
    cfg = FAST.with_(max_reset_attempts=3)
    s = Script(cfg)
    s.add_queue(Q0)
    resets = []
    while s.state(Q0) is not QState.OFFLINE:
        for c in s.cmds(qid=Q0):
            if c.instr in (Instr.RAPQ, Instr.ZAPQ):
                resets.append(c.instr)
                s.answer(c, res())
            else:
                s.answer(c, res(RC.RESET_IN_PROGRESS))
        s.advance()
        assert s.now < 10 * cfg.reset_timeout * cfg.max_reset_attempts
    assert resets[:2] == [Instr.RAPQ, Instr.RAPQ]
    assert Instr.ZAPQ in resets
    assert ("poll", Q0) in s.timers  # an offline queue is probed again later


# --- slots ------------------------------------------------------------------------------------


@pytest.mark.parametrize("qd", [0, 1, 3, 7, 15])
def test_slot_count_is_qd_plus_one(qd: int) -> None:
    s = up(Q0, hw=replace(HW_ACCEL, qd=qd))
    assert s.core.queues[Q0].slots == qd + 1
    for i in range(qd + 10):
        s.submit(me_request(i + 2, K))
    assert len(s.cmds(Instr.NQAP, Q0)) == qd + 1  # all slots used at once (pipelined)...
    accept_all(s, Q0)
    assert s.outstanding(Q0) == qd + 1  # ...and no more
    assert not s.cmds(Instr.NQAP)
    assert s.core.backlog_size == 9
    assert s.state(Q0) is QState.QUEUE_FULL


def test_never_more_outstanding_than_slots_and_refill_on_every_reply() -> None:
    s = up(Q0, hw=replace(HW_ACCEL, qd=3))
    xs = {}
    rids = []
    for i in range(40):
        rids.append(s.submit(me_request(i + 2, K)))
    sent = []
    while len(s.resolved) < 40:
        for c in s.cmds(Instr.NQAP, Q0):
            rec = s.core.ledger.record_for_psmid(c.psmid)
            xs[c.psmid] = rids.index(rec.rid) + 2
            sent.append(c)
            s.answer(c, res(irq=True))
            assert s.outstanding(Q0) <= 4
        # one reply at a time, with more waiting: the core DQAPs again and refills in the same call
        s.interrupt(Q0)
        dq = s.one(Instr.DQAP, Q0)
        on_card = sorted(s.core.queues[Q0].on_card)
        oldest = next(c for c in sent if c.psmid == on_card[0])
        em = reply_to(s, dq, oldest, x=xs[oldest.psmid], more=len(on_card) > 1)
        remaining = 40 - len(s.resolved)
        if remaining >= 4:
            assert [c.instr for c in em.commands].count(Instr.NQAP) == 1, em.commands  # refilled
        assert s.outstanding(Q0) <= 4
    for i, rid in enumerate(rids):
        assert s.resolved[rid].value == expected_me(i + 2, K)
    assert s.core.ledger.outcomes["completed"] == 40
    psmids = [c.psmid for c in s.history if c.instr is Instr.NQAP]
    assert len(psmids) == len(set(psmids))  # psmids unique for the client's life


def test_dqap_until_no_pending_reply() -> None:
    s = up(Q0)
    for i in range(3):
        s.submit(me_request(i + 2, K))
    nqaps = s.cmds(Instr.NQAP)
    accept_all(s)
    s.interrupt(Q0)
    for i, c in enumerate(nqaps):
        dq = s.one(Instr.DQAP)
        reply_to(s, dq, c, x=i + 2, more=i < 2)
    assert not s.cmds(Instr.DQAP)  # the last reply said nothing more is waiting
    assert s.state(Q0) is QState.IDLE
    assert len(s.resolved) == 3


def test_load_balancing_spreads_work_over_queues() -> None:
    s = up(Q0, Q1)
    for i in range(8):
        s.submit(me_request(i + 2, K))
    per = {q: len(s.cmds(Instr.NQAP, q)) for q in (Q0, Q1)}
    assert per == {Q0: 4, Q1: 4}


def test_requests_go_to_a_queue_of_their_kind() -> None:
    s = up(Q0)
    s.bring_up(C2, HW_CCA)
    s.submit(CounterIncrement(1))
    s.submit(me_request(5, K))
    assert [c.qid for c in s.cmds(Instr.NQAP)] == [C2, Q0]


def test_a_lost_interrupt_is_caught_by_the_safety_poll() -> None:
    """Interrupts on, but none comes: a slow poll still collects the reply (no reply-timeout reset)."""
    s = up(Q0)
    while ("poll", Q0) in s.timers:  # let the idle queue's leftover poll run out
        s.fire(("poll", Q0))
    assert s.state(Q0) is QState.IDLE and not s.timers
    rid = s.submit(me_request(2, K), idempotent=False)
    nq = s.one(Instr.NQAP)
    s.answer(nq, res(irq=True))
    assert ("poll", Q0) in s.timers
    assert s.timers[("poll", Q0)] - s.now == pytest.approx(FAST.irq_safety_poll)
    key = s.advance()  # no interrupt: the next thing that happens is the safety poll
    assert key == ("poll", Q0)
    reply_to(s, s.one(Instr.DQAP), nq, x=2)
    assert s.resolved[rid].value == expected_me(2, K)
    assert s.core.ledger.counters["reply_timeouts"] == 0


# --- back-pressure ------------------------------------------------------------------------------


def test_q_full_is_backpressure_the_request_stays_on_the_host() -> None:
    s = up(Q0)  # TAPQ says 8 slots; the card will say Q_FULL after 2
    rids = [s.submit(me_request(i + 2, K)) for i in range(4)]
    nq = s.cmds(Instr.NQAP, Q0)
    assert len(nq) == 4
    s.answer(nq[0], res(irq=True))
    s.answer(nq[1], res(irq=True, full=True))
    em = s.answer(nq[2], res(RC.Q_FULL, full=True, irq=True))
    assert not em.resolved  # not an error
    s.answer(nq[3], res(RC.Q_FULL, full=True, irq=True))
    assert s.core.backlog_size == 2  # both back on the host, in order
    assert s.core.ledger.counters["bounced"] == 2
    assert s.state(Q0) is QState.QUEUE_FULL
    assert not s.cmds(Instr.NQAP)  # no NQAP until a reply frees a slot
    dq = s.one(Instr.DQAP)  # it asks for replies instead
    em = reply_to(s, dq, nq[0], x=2)
    retried = [c for c in em.commands if c.instr is Instr.NQAP]
    assert len(retried) == 2 and {c.psmid for c in retried}.isdisjoint({c.psmid for c in nq})
    # back on the host in the order they bounced, ahead of newer work
    assert [s.core.ledger.record_for_psmid(c.psmid).rid for c in retried] == [rids[2], rids[3]]
    x_of = {c.psmid: rids.index(s.core.ledger.record_for_psmid(c.psmid).rid) + 2 for c in retried}
    accept_all(s)
    s.interrupt(Q0)
    for c, x in [(nq[1], 3), (retried[0], x_of[retried[0].psmid]), (retried[1], x_of[retried[1].psmid])]:
        reply_to(s, s.one(Instr.DQAP), c, x=x, more=True)
    assert [s.resolved[r].value for r in rids] == [expected_me(x, K) for x in (2, 3, 4, 5)]
    assert s.core.ledger.counters["redriven"] == 0  # a bounce is not a re-drive


def test_q_full_on_one_queue_sends_the_request_to_another() -> None:
    s = up(Q0, Q1)
    rid = s.submit(me_request(9, K))
    first = s.one(Instr.NQAP)
    s.answer(first, res(RC.Q_FULL, full=True, irq=True))
    other = s.one(Instr.NQAP)
    assert other.qid != first.qid
    s.answer(other, res(irq=True))
    s.interrupt(other.qid)
    reply_to(s, s.one(Instr.DQAP, other.qid), other, x=9)
    assert s.resolved[rid].value == expected_me(9, K)


# --- replies that must not be delivered -------------------------------------------------------


def test_unknown_psmid_is_counted_and_never_delivered(caplog: pytest.LogCaptureFixture) -> None:
    s = up(Q0)
    rid = s.submit(me_request(2, K))
    nq = s.one(Instr.NQAP)
    s.answer(nq, res(irq=True))
    s.interrupt(Q0)
    caplog.set_level(logging.WARNING, logger="apcrypto.core")
    em = s.answer(s.one(Instr.DQAP), res(psmid=0xDEAD, reply=build_type80(b"\x01" * 128), replies=True))
    assert not em.resolved
    assert s.core.ledger.counters["stray_replies"] == 1
    assert any("unknown psmid" in r.getMessage() for r in caplog.records)
    reply_to(s, s.one(Instr.DQAP), nq, x=2)
    assert s.resolved[rid].value == expected_me(2, K)
    # the card sends the same reply again: counted, not delivered twice (Script asserts that)
    s.submit(me_request(3, K))
    nq2 = s.one(Instr.NQAP)
    s.answer(nq2, res(irq=True))
    s.interrupt(Q0)
    em = reply_to(s, s.one(Instr.DQAP), nq, x=2, more=True)
    assert not em.resolved
    assert s.core.ledger.counters["stray_replies"] == 2


def test_reply_after_deadline_is_late_counted_and_never_delivered() -> None:
    s = up(Q0)
    rid = s.submit(me_request(2, K), deadline=0.01)
    nq = s.one(Instr.NQAP)
    s.answer(nq, res(irq=True))
    em = s.fire(("deadline", rid))
    (r,) = em.resolved
    assert isinstance(r.error, DeadlineExceeded) and r.error.may_have_run is True
    assert r.error.psmid == nq.psmid and r.error.qid == Q0
    assert s.outstanding(Q0) == 1  # the card still holds it: the slot stays taken
    s.interrupt(Q0)
    em = reply_to(s, s.one(Instr.DQAP), nq, x=2)
    assert not em.resolved
    assert s.core.ledger.counters["late_replies"] == 1
    assert s.outstanding(Q0) == 0
    assert s.core.ledger.records[rid].outcome is Outcome.UNAVAILABLE


def test_deadline_while_queued_never_runs() -> None:
    s = up(Q0, hw=replace(HW_ACCEL, qd=0))
    first = s.submit(me_request(2, K))
    rid = s.submit(me_request(3, K), deadline=0.01)
    assert len(s.cmds(Instr.NQAP)) == 1  # one slot: the second waits on the host
    (r,) = s.fire(("deadline", rid)).resolved
    assert isinstance(r.error, DeadlineExceeded) and r.error.may_have_run is False
    assert r.error.qid is None and r.error.psmid is None
    nq = s.one(Instr.NQAP)
    s.answer(nq, res(irq=True))
    s.interrupt(Q0)
    em = reply_to(s, s.one(Instr.DQAP), nq, x=2)
    assert not [c for c in em.commands if c.instr is Instr.NQAP]  # the expired one is never sent
    assert s.resolved[first].value == expected_me(2, K)
    assert s.core.backlog_size == 0


def test_expired_requests_stop_counting_against_the_host_bound() -> None:
    s = up(Q0, hw=replace(HW_ACCEL, qd=0))
    s.submit(me_request(2, K))  # takes the only slot, and keeps it
    rids = [s.submit(me_request(3 + i, K), deadline=0.01) for i in range(10)]
    later = s.submit(me_request(20, K))
    assert s.core.backlog_size == 11
    for r in rids:
        s.fire(("deadline", r))
    assert s.core.backlog_size == 1  # only `later` still waits
    assert s.core.stats()["backlog"] == 1
    nq = s.one(Instr.NQAP)
    s.answer(nq, res(irq=True))
    s.interrupt(Q0)
    reply_to(s, s.one(Instr.DQAP), nq, x=2)
    assert s.core.backlog_size == 0  # the expired ones were skipped, `later` went out
    assert s.core.ledger.record_for_psmid(s.one(Instr.NQAP).psmid).rid == later


def test_deadline_cancelled_when_resolved() -> None:
    s = up(Q0)
    rid = s.submit(me_request(2, K), deadline=5.0)
    assert ("deadline", rid) in s.timers
    nq = s.one(Instr.NQAP)
    s.answer(nq, res(irq=True))
    s.interrupt(Q0)
    em = reply_to(s, s.one(Instr.DQAP), nq, x=2)
    assert ("deadline", rid) in em.cancelled and ("deadline", rid) not in s.timers


def test_deadline_already_passed() -> None:
    s = up(Q0)
    rid = s.submit(me_request(2, K), deadline=0.0)
    assert isinstance(s.resolved[rid].error, DeadlineExceeded)
    assert not s.cmds(Instr.NQAP)


# --- error replies ------------------------------------------------------------------------------


def test_nqap_message_too_big_fails_the_caller() -> None:
    s = up(Q0)
    rid = s.submit(me_request(2, K))
    em = s.answer(s.one(Instr.NQAP), res(RC.MESSAGE_TOO_BIG))
    (r,) = em.resolved
    assert r.rid == rid and isinstance(r.error, BadRequest)
    assert r.error.response_code == RC.MESSAGE_TOO_BIG and r.error.qid == Q0
    assert s.state(Q0).in_service


def test_error_reply_operand_invalid_fails_the_caller() -> None:
    s = up(Q0)
    rid = s.submit(me_request(2, K))
    nq = s.one(Instr.NQAP)
    s.answer(nq, res(irq=True))
    s.interrupt(Q0)
    em = reply_to(s, s.one(Instr.DQAP), nq, data=build_error_reply(RY.OPERAND_INVALID))
    (r,) = em.resolved
    assert isinstance(r.error, BadRequest) and r.error.reply_code == RY.OPERAND_INVALID
    assert r.error.psmid == nq.psmid
    assert s.core.ledger.records[rid].outcome is Outcome.FAILED
    assert s.state(Q0).in_service


def test_cca_application_error_fails_the_caller() -> None:
    s = up(C2, hw=HW_CCA)
    rid = s.submit(CounterIncrement(1))
    nq = s.one(Instr.NQAP)
    s.answer(nq, res(irq=True))
    s.interrupt(C2)
    em = reply_to(s, s.one(Instr.DQAP), nq, data=build_cprb_reply("CI", b"", rtcode=8, rscode=33))
    (r,) = em.resolved
    assert isinstance(r.error, BadRequest) and "rc 8/rs 33" in str(r.error)
    assert s.core.ledger.records[rid].outcome is Outcome.FAILED


def test_unknown_reply_code_drains_the_queue_then_takes_it_offline() -> None:
    """An unknown reply code: the card still answers, so what it holds is collected first (a
    sibling request completes normally), then the queue leaves service.  Only the request whose
    reply could not be read is in doubt: idempotent, so it is re-driven elsewhere."""
    s = up(Q0, Q1)
    rids = [s.submit(me_request(x, K), idempotent=(x == 2)) for x in (2, 3, 4)]
    nq = {s.core.ledger.record_for_psmid(c.psmid).rid: c for c in s.cmds(Instr.NQAP)}
    accept_all(s)
    a = nq[rids[0]]
    sib = next(nq[r] for r in rids[1:] if nq[r].qid == a.qid)  # the dispatcher alternates queues
    other = Q1 if a.qid == Q0 else Q0
    s.interrupt(a.qid)
    em = reply_to(s, s.one(Instr.DQAP, a.qid), a, data=build_error_reply(0xEE))
    assert s.state(a.qid) is QState.RECOVERY_WAIT  # draining, not yet offline
    assert not em.resolved  # the idempotent request is re-driven, not failed
    assert s.core.ledger.records[rids[0]].redrives == 1
    assert s.one(Instr.NQAP).qid == other  # ... on the other queue; nothing new for this one
    done = reply_to(s, s.one(Instr.DQAP, a.qid), sib, x=int.from_bytes(sib.message[-128:], "big"), empty=True)
    (r,) = done.resolved
    assert r.error is None and r.value == expected_me(int.from_bytes(sib.message[-128:], "big"), K)
    assert s.state(a.qid) is QState.OFFLINE


def test_protocol_anomaly_resets_the_queue() -> None:
    s = up(Q0)
    rid = s.submit(me_request(2, K), idempotent=False)
    nq = s.one(Instr.NQAP)
    s.answer(nq, res(irq=True))
    s.interrupt(Q0)
    em = reply_to(s, s.one(Instr.DQAP), nq, data=b"\x00\x80garbage")
    (r,) = em.resolved
    assert r.rid == rid and isinstance(r.error, Indeterminate)
    assert s.core.ledger.counters["protocol_anomalies"] == 1
    assert s.state(Q0) in (QState.RESET_START, QState.RESET_WAIT)


# --- machine failure ----------------------------------------------------------------------------


def _mf_setup() -> tuple[Script, list[int], list]:
    """Q0 and Q1 up; 3 requests on Q0's card: [in-process state-changing, in-process idempotent,
    pending state-changing]."""
    s = up(Q0, Q1)
    q1 = s.core.queues[Q1]
    q1.state = QState.OFFLINE  # keep everything on Q0 for now
    rids = [
        s.submit(me_request(2, K), idempotent=False),
        s.submit(me_request(3, K)),
        s.submit(me_request(4, K), idempotent=False),
    ]
    nq = s.cmds(Instr.NQAP, Q0)
    assert len(nq) == 3
    accept_all(s)
    q1.state = QState.IDLE
    return s, rids, nq


def test_machine_failure_replies_decide_each_request() -> None:
    s, rids, nq = _mf_setup()
    # the card fails: BUSY on NQAP/TAPQ, DQAP gives nothing until recovery completes
    s.interrupt(Q0)
    s.answer(s.one(Instr.DQAP, Q0), res(RC.BUSY))
    assert s.state(Q0) is QState.RECOVERY_WAIT
    s.fire(("poll", Q0))
    for c in s.cmds(qid=Q0):
        s.answer(c, res(RC.BUSY) if c.instr is Instr.TAPQ else res(NO_PENDING_REPLY))
    assert s.state(Q0) is QState.RECOVERY_WAIT
    assert not s.cmds(Instr.RAPQ) and not s.cmds(Instr.ZAPQ)  # a reset would drop the stored replies
    # recovery done: the stored replies
    s.fire(("poll", Q0))
    for c in s.cmds(Instr.TAPQ, Q0):
        s.answer(c, res(replies=True))
    mf = [
        build_machine_failure(MF.IN_PROCESS, 0),
        build_machine_failure(MF.IN_PROCESS, 1),
        build_machine_failure(MF.REQUEST_PENDING, None),
    ]
    for i, (c, data) in enumerate(zip(nq, mf, strict=True)):
        reply_to(s, s.one(Instr.DQAP, Q0), c, data=data, more=i < 2, empty=i == 2)
    err = s.resolved[rids[0]].error
    assert isinstance(err, Indeterminate)
    assert (err.qid, err.psmid, err.reply_code, err.mf_state) == (Q0, nq[0].psmid, 0x10, MF.IN_PROCESS)
    assert rids[1] not in s.resolved and rids[2] not in s.resolved
    redo = s.cmds(Instr.NQAP)
    assert {c.qid for c in redo} == {Q1}  # re-driven to a healthy queue of the same kind
    assert {s.core.ledger.record_for_psmid(c.psmid).rid for c in redo} == {rids[1], rids[2]}
    assert s.core.ledger.counters["mf_replies"] == 3
    # the last stored reply left the queue empty: drained, so now (and only now) reset
    assert s.state(Q0) in (QState.RESET_START, QState.RESET_WAIT)
    assert s.one(Instr.RAPQ, Q0)


def test_busy_on_nqap_bounces_and_enters_recovery() -> None:
    s = up(Q0, Q1)
    rid = s.submit(me_request(2, K), idempotent=False)
    first = s.one(Instr.NQAP)
    em = s.answer(first, res(RC.BUSY))
    assert not em.resolved
    assert s.state(first.qid) is QState.RECOVERY_WAIT
    again = s.one(Instr.NQAP)  # never left the host: safe to send, and elsewhere
    assert again.qid != first.qid
    assert s.core.ledger.records[rid].redrives == 0


def test_state_change_in_progress_on_nqap_backs_off() -> None:
    """retry-same means after a back-off: no immediate re-NQAP to the queue that refused."""
    s = up(Q0)
    rid = s.submit(me_request(2, K))
    em = s.answer(s.one(Instr.NQAP), res(RC.STATE_CHANGE_IN_PROGRESS))
    assert not [c for c in em.commands if c.instr is Instr.NQAP]
    assert s.state(Q0) is QState.RECOVERY_WAIT and rid not in s.resolved
    # the queue answers again: drained, reset, probed, and the request goes out then
    s.fire(("poll", Q0))
    for c in s.cmds(qid=Q0):
        s.answer(c, res(NO_PENDING_REPLY, empty=True) if c.instr is Instr.DQAP else res(empty=True))
    assert s.state(Q0) in (QState.RESET_START, QState.RESET_WAIT)


def test_recovery_wait_is_bounded() -> None:
    s = up(Q0)
    s.submit(me_request(2, K))
    s.answer(s.one(Instr.NQAP), res(RC.BUSY))
    assert s.state(Q0) is QState.RECOVERY_WAIT
    s.fire(("limit", Q0))
    assert s.state(Q0) is QState.OFFLINE
    assert "recovery" in s.core.queues[Q0].offline_reason


# --- transport lost: the ledger decides ---------------------------------------------------------


def test_transport_lost_ledger_decisions() -> None:
    s = up(Q0, hw=replace(HW_ACCEL, qd=1))
    on_card_idem = s.submit(me_request(2, K))
    sending_sc = s.submit(me_request(3, K), idempotent=False)
    queued_sc = s.submit(me_request(4, K), idempotent=False)
    nq = s.cmds(Instr.NQAP)
    s.answer(nq[0], res(irq=True))  # accepted; nq[1] still in flight; the third never left
    s.interrupt(Q0)  # a DQAP goes out too
    assert s.cmds(Instr.DQAP)
    em = s.lose_transport()
    assert s.state(Q0) is QState.OFFLINE
    out = {r.rid: r.error for r in em.resolved}
    # sent, unanswered, state-changing: may have run
    assert isinstance(out[sending_sc], Indeterminate) and "transport lost" in str(out[sending_sc])
    # never sent, and idempotent work re-driven off the card: no queue in service of their kind,
    # so they wait the unavailable grace (the queue may come back) and then end unavailable
    assert set(out) == {sending_sc}
    rec = s.core.ledger.records[on_card_idem]
    assert rec.redrives == 1 and rec.attempts[0].fate == "lost"
    out = {r.rid: r.error for r in s.fire(("unavailable", "accel")).resolved}
    assert isinstance(out[queued_sc], DeviceUnavailable)
    assert isinstance(out[on_card_idem], DeviceUnavailable)
    assert set(out) == {on_card_idem, queued_sc}


def test_transport_lost_redrives_idempotent_work_elsewhere() -> None:
    s = up(Q0, Q1)
    s.core.queues[Q1].state = QState.OFFLINE
    idem = s.submit(me_request(2, K))
    sc = s.submit(me_request(3, K), idempotent=False)
    accept_all(s)
    s.core.queues[Q1].state = QState.IDLE
    s.interrupt(Q0)
    dq = s.one(Instr.DQAP, Q0)
    em = s._take(s.core.on_transport_lost([dq.tag], permanent=True, reason="peer gone", now=s.now))
    del s.pending[dq.tag]
    assert s.state(Q0) is QState.OFFLINE
    assert isinstance(s.resolved[sc].error, Indeterminate)
    (redo,) = [c for c in em.commands if c.instr is Instr.NQAP]
    assert redo.qid == Q1 and s.core.ledger.record_for_psmid(redo.psmid).rid == idem


def test_transient_loss_keeps_a_maybe_sent_request_on_the_card() -> None:
    """An NQAP lost in transit may have reached the card: its reply, if one comes, resolves it."""
    s = up(Q0)
    rid = s.submit(me_request(2, K), idempotent=False)
    nq = s.one(Instr.NQAP)
    em = s.lose_transport(permanent=False)
    assert not em.resolved
    assert s.state(Q0).in_service and s.outstanding(Q0) == 1
    s.interrupt(Q0)
    reply_to(s, s.one(Instr.DQAP), nq, x=2)
    assert s.resolved[rid].value == expected_me(2, K)


def test_transient_loss_of_a_maybe_sent_request_the_card_never_got() -> None:
    """...and if the card says it holds nothing, the ledger decides: it may have run."""
    s = up(Q0)
    rid = s.submit(me_request(2, K), idempotent=False)
    s.lose_transport(permanent=False)
    s.interrupt(Q0)
    s.answer(s.one(Instr.DQAP), res(NO_PENDING_REPLY, empty=True, irq=True))
    assert isinstance(s.resolved[rid].error, Indeterminate)
    assert s.core.ledger.counters["card_forgot"] == 1


def test_unsent_commands_bounce_back_to_the_host() -> None:
    s = up(Q0)
    rid = s.submit(me_request(2, K), idempotent=False)
    nq = s.one(Instr.NQAP)
    s.pending.clear()
    s._take(s.core.on_transport_lost([nq.tag], permanent=False, reason="t", unsent=[nq.tag], now=s.now))
    again = s.one(Instr.NQAP)
    assert again.psmid != nq.psmid and s.core.ledger.record_for_psmid(again.psmid).rid == rid
    assert s.core.ledger.records[rid].redrives == 0  # never left the host: not a re-drive
    s.answer(again, res(irq=True))
    s.interrupt(Q0)
    reply_to(s, s.one(Instr.DQAP), again, x=2)
    assert s.resolved[rid].value == expected_me(2, K)


# --- availability, shutdown, misuse -------------------------------------------------------------


def test_submit_with_no_queue_of_the_kind_is_unavailable() -> None:
    s = up(Q0)
    rid = s.submit(CounterIncrement(1))
    assert isinstance(s.resolved[rid].error, DeviceUnavailable)


def test_work_of_a_kind_no_queue_serves_fails_once_bring_up_tells() -> None:
    """Submitted during bring-up (mode unknown): waits; when TAPQ shows no queue of its kind, fails."""
    s = Script()
    s.add_queue(Q0)
    ci_rid = s.submit(CounterIncrement(1))
    me_rid = s.submit(me_request(2, K))
    assert not s.resolved  # the queue might have been a coprocessor
    s.answer(s.one(Instr.RAPQ), res())
    s.fire(("poll", Q0))
    s.answer(s.one(Instr.TAPQ), res(hw=HW_ACCEL, empty=True))
    assert isinstance(s.resolved[ci_rid].error, DeviceUnavailable)
    assert me_rid not in s.resolved


def test_queues_lost_during_bring_up_fail_the_waiting_work() -> None:
    """Every accelerator dies before TAPQ named its mode, a coprocessor comes up: the accel work
    waiting since connect ends DeviceUnavailable after the unavailable grace instead of waiting
    forever (the dead queue may come back within it: it is re-probed)."""
    s = Script()
    s.add_queue(Q0)
    s.add_queue(C2)
    rid = s.submit(me_request(2, K))
    s.answer(s.one(Instr.RAPQ, Q0), res(RC.CHECKSTOPPED))
    assert s.state(Q0) is QState.OFFLINE
    assert rid not in s.resolved  # C2's kind is not known yet
    s.answer(s.one(Instr.RAPQ, C2), res())
    s.fire(("poll", C2))
    s.answer(s.one(Instr.TAPQ, C2), res(hw=HW_CCA, empty=True))
    assert rid not in s.resolved
    s.fire(("unavailable", "accel"))
    assert isinstance(s.resolved[rid].error, DeviceUnavailable)
    # with a single queue too
    s = Script()
    s.add_queue(Q0)
    rid = s.submit(me_request(2, K))
    s.answer(s.one(Instr.RAPQ), res(RC.CHECKSTOPPED))
    assert rid not in s.resolved
    s.fire(("unavailable", "accel"))
    assert isinstance(s.resolved[rid].error, DeviceUnavailable)


def test_last_queue_offline_fails_the_backlog() -> None:
    s = up(Q0, hw=replace(HW_ACCEL, qd=0))
    s.submit(me_request(2, K))
    waiting = [s.submit(me_request(x, K)) for x in (3, 4)]
    s.answer(s.one(Instr.NQAP), res(RC.CHECKSTOPPED))
    assert s.state(Q0) is QState.OFFLINE
    assert not set(waiting) & set(s.resolved)  # they wait the unavailable grace first
    assert s.timers[("unavailable", "accel")] == s.now + FAST.unavailable_grace
    s.fire(("unavailable", "accel"))
    for rid in waiting:
        assert isinstance(s.resolved[rid].error, DeviceUnavailable)
    assert s.core.backlog_size == 0


def test_shutdown_resolves_everything() -> None:
    s = up(Q0, hw=replace(HW_ACCEL, qd=0))
    sent = s.submit(me_request(2, K))
    queued = s.submit(me_request(3, K))
    accept_all(s)
    em = s._take(s.core.shutdown(s.now))
    errs = {r.rid: r.error for r in em.resolved}
    assert isinstance(errs[sent], ClientClosed) and "may have run" in str(errs[sent])
    assert isinstance(errs[queued], ClientClosed) and "may have run" not in str(errs[queued])
    assert not s.timers
    with pytest.raises(CoreMisuse):
        s.submit(me_request(4, K))


def test_core_misuse_is_loud() -> None:
    s = up(Q0)
    with pytest.raises(CoreMisuse):
        s.add_queue(Q0)
    with pytest.raises(CoreMisuse):
        s.core.on_timer(("bogus",), 0.0)


def test_completion_for_unknown_tag_is_counted() -> None:
    s = up(Q0)
    s._take(s.core.on_completion(99999, res(), 0.0))
    assert s.core.ledger.counters["unknown_tags"] == 1


def test_stats_reports_queues_and_outcomes() -> None:
    s = up(Q0, Q1)
    s.submit(me_request(2, K))
    st = s.core.stats()
    assert st["states"] == {"working": 1, "idle": 1}
    assert st["in_flight"] == 1
    q = st["queues"]["00.0000"]
    assert q["slots"] == 8 and q["mode"] == "accel"


def test_peer_restored_reprobes_offline_queues_at_once() -> None:
    """After a permanent loss the queues are offline with a re-probe back-off; ``PeerRestored``
    re-probes each at once (no waiting out the back-off) and the queue comes back into service."""
    from apcrypto.core.events import PeerRestored

    s = up(Q0, Q1)
    for x in (2, 3):
        s.submit(me_request(x, K))
    assert {c.qid for c in s.cmds(Instr.NQAP)} == {Q0, Q1}
    s.lose_transport(permanent=True)
    assert s.state(Q0) is QState.OFFLINE and s.state(Q1) is QState.OFFLINE
    assert not s.cmds(Instr.TAPQ)
    s._take(s.core.on_events([PeerRestored("back")], s.now))
    probes = s.cmds(Instr.TAPQ)
    assert sorted(c.qid for c in probes) == [Q0, Q1]
    s.answer(s.one(Instr.TAPQ, Q0), res(hw=HW_ACCEL, empty=True))
    assert s.state(Q0) is QState.RESET_START  # back through reset, irq and probe into service
    s.answer(s.one(Instr.TAPQ, Q1), res(RC.Q_NOT_AVAIL))
    assert s.state(Q1) is QState.OFFLINE
    assert s.timers[("poll", Q1)] > s.now  # still unreachable: the back-off resumes, no spin


def test_peer_restored_with_a_scope_reprobes_only_that_peers_queues() -> None:
    """A pool of servers says which peer is back (``scope``): only its offline queues are re-probed
    at once; another peer's stay on their back-off (that server may still be gone)."""
    from apcrypto.core.events import PeerRestored

    s = up(Q0, Q1)
    for x in (2, 3):
        s.submit(me_request(x, K))
    s.lose_transport(permanent=True)
    assert s.state(Q0) is QState.OFFLINE and s.state(Q1) is QState.OFFLINE
    assert not s.cmds(Instr.TAPQ)  # nothing probed yet (the back-off runs)
    s._take(s.core.on_events([PeerRestored("back", scope=(Q1,))], s.now))
    assert [c.qid for c in s.cmds(Instr.TAPQ)] == [Q1]
    assert s.state(Q0) is QState.OFFLINE


def test_one_peers_answers_do_not_vouch_for_another_peers_link() -> None:
    """Link suspicion is per peer (a pool of servers): after peer B's link drops (``scope``: its
    queues), an answer from peer A clears A's suspicion only, so B's silent queue keeps deferring its
    reply timeout (its resumed session still holds the replies) instead of being reset."""
    from apcrypto.core.events import TransportLost

    s = up(Q0, Q1)
    on_b = s.submit(me_request(2, K), target=frozenset({Q1}))
    on_a = s.submit(me_request(3, K), target=frozenset({Q0}))
    nq_b, nq_a = s.one(Instr.NQAP, Q1), s.one(Instr.NQAP, Q0)
    s.answer(nq_b, res(irq=True))
    s.answer(nq_a, res(irq=True))  # both on their cards
    s._take(s.core.on_events([TransportLost("b dropped", (), False, (Q1,), scope=(Q1,))], s.now))
    s.interrupt(Q0)  # peer A answers: its link works
    s.answer(
        s.one(Instr.DQAP, Q0),
        res(psmid=nq_a.psmid, reply=build_type80(expected_me(3, K)), empty=True, irq=True),
    )
    assert on_a in s.resolved and on_b not in s.resolved
    for _ in range(3):
        s.fire(("reply", Q1))
    assert not s.cmds(Instr.RAPQ, Q1) and not s.cmds(Instr.ZAPQ, Q1) and on_b not in s.resolved
    assert s.core.ledger.counters["reply_timeouts_deferred"] >= 2 and s.state(Q1).in_service


def test_transport_package_reexports_the_core_events() -> None:
    """The core owns its event types; the transport package re-exports the very same classes."""
    from apcrypto.core import events
    from apcrypto.transport import base

    for name in ("Command", "Completion", "Interrupt", "TransportLost", "PeerRestored"):
        assert getattr(base, name) is getattr(events, name)


def test_public_queries_report_readiness_backlog_and_queue_snapshots() -> None:
    """What the client and runners ask the core, without reaching into its records."""
    s = Script()
    s.add_queue(Q0)
    assert not s.core.ready() and s.core.bringing_up()
    s = up(Q0, hw=replace(HW_ACCEL, qd=0))
    assert s.core.ready() and not s.core.bringing_up()
    s.submit(me_request(2, K))
    s.submit(me_request(3, K))
    assert s.core.backlog_size == 1 and s.core.undecided() == 2
    view = s.core.queue_states()[Q0]
    assert view.state is QState.QUEUE_FULL and view.held == 1 and view.slots == 1 and view.mode == "accel"
    with pytest.raises(AttributeError):
        view.held = 0  # type: ignore[misc]  # a frozen snapshot

    assert s.core.handle([], s.now) == []


def test_timers_are_typed_keys_at_absolute_deadlines() -> None:
    """ArmTimer carries an absolute deadline on the runner's clock and a TimerKey that still equals
    the plain tuple; re-arming keeps an earlier pending deadline however late it is asked."""
    from apcrypto.core.actions import ArmTimer
    from apcrypto.core.timers import TimerKey

    s = up(Q0)
    s.now = 10.0
    rid, actions = s.core.submit(me_request(2, K), deadline=0.5, now=s.now)
    arms = [a for a in actions if isinstance(a, ArmTimer)]
    dl = next(a for a in arms if a.key[0] == "deadline")
    assert isinstance(dl.key, TimerKey) and dl.key == ("deadline", rid) and dl.at == 10.5
    reply = next(a for a in arms if a.key[0] == "reply")
    assert reply.at == 10.0 + FAST.reply_timeout
    s._take(actions)
    # a second request a moment later must not push the pending reply timer back
    s.now = 10.2
    s.submit(me_request(3, K))
    assert s.timers[("reply", Q0)] == 10.0 + FAST.reply_timeout
