"""Liveness of the core: every request ends, whatever order the transport's answers come in.

Each test is the smallest event sequence that used to leave a request with no outcome and no timer
(or with a wrong outcome), driven by hand through :class:`tests._fixtures_driver.Script` on a core
with no clock: timers fire only when the test fires them, so "nothing is armed" is observable.
The same defects on the simulation runner are in ``tests/test_sim_scenarios.py``.
"""

from __future__ import annotations

from dataclasses import replace

from apcrypto.core.config import FAST
from apcrypto.core.queue import QState
from apcrypto.errors import DeadlineExceeded, DeviceUnavailable, Indeterminate
from apformats.codes import ResponseCode as RC
from apformats.messages import build_type80
from apformats.results import Instr, qid_of
from tests._fixtures_driver import HW_ACCEL, PROBE_REPLY, Script, expected_me, key, me_request, res

Q0 = qid_of(0, 0)
Q1 = qid_of(1, 0)
K = key(1024)


def up(*qids: int, hw=HW_ACCEL, config=FAST) -> Script:
    s = Script(config)
    for qid in qids:
        s.bring_up(qid, hw)
    return s


def lose(s: Script, cmds, *, permanent: bool, unsent=()) -> None:
    for c in cmds:
        del s.pending[c.tag]
    s._take(
        s.core.on_transport_lost(
            [c.tag for c in cmds],
            permanent=permanent,
            reason="test",
            unsent=[c.tag for c in unsent],
            now=s.now,
        )
    )


def in_flight(s: Script) -> int:
    return s.core.stats()["in_flight"]


# --- 1. no record parked without a timer ---------------------------------------------------------


def test_bounced_after_every_queue_of_its_kind_is_offline_ends_unavailable() -> None:
    """The queue goes offline while an NQAP is in flight; the permanent loss then bounces that NQAP
    back as never sent.  No queue of its kind is left: it ends DeviceUnavailable at once (it used
    to wait in the retry queue with no timer until close)."""
    s = up(Q0)
    rid = s.submit(me_request(2, K), idempotent=False)
    nq = s.one(Instr.NQAP)
    s.interrupt(Q0)
    s.answer(s.one(Instr.DQAP), res(RC.CHECKSTOPPED))
    assert s.state(Q0) is QState.OFFLINE and rid not in s.resolved
    lose(s, [nq], permanent=True, unsent=[nq])
    assert isinstance(s.resolved[rid].error, DeviceUnavailable)
    assert in_flight(s) == 0 and s.core.backlog_size == 0


def test_work_waits_at_most_the_grace_while_no_queue_of_its_kind_is_in_service() -> None:
    """Every queue of the kind is recovering (alive, not in service): the work waits for one to
    come back, but no longer than ``unavailable_grace``; then it ends DeviceUnavailable."""
    s = up(Q0, config=FAST.with_(unavailable_grace=0.7))
    s.submit(me_request(2, K))
    s.answer(s.one(Instr.NQAP), res(RC.BUSY))  # card in machine-failure recovery: bounced
    assert s.state(Q0) is QState.RECOVERY_WAIT
    rid = s.submit(me_request(3, K))
    assert s.timers[("unavailable", "accel")] == s.now + 0.7
    s.fire(("unavailable", "accel"))
    assert isinstance(s.resolved[rid].error, DeviceUnavailable)
    assert "0.7" in str(s.resolved[rid].error)
    assert in_flight(s) == 0 and s.core.backlog_size == 0


def test_work_parked_during_recovery_is_served_when_the_queue_comes_back() -> None:
    s = up(Q0)
    first = s.submit(me_request(2, K))
    s.answer(s.one(Instr.NQAP), res(RC.BUSY))
    assert ("unavailable", "accel") in s.timers
    # the card recovers: the drain finds nothing stored, the queue is reset, probed, in service
    s.fire(("poll", Q0))
    for c in s.cmds():
        s.answer(c, res(RC.Q_FULL, empty=True) if c.instr is Instr.DQAP else res(hw=HW_ACCEL, empty=True))
    assert s.state(Q0) is QState.RESET_START
    s.answer(s.one(Instr.RAPQ), res())
    s.fire(("poll", Q0))
    s.answer(s.one(Instr.TAPQ), res(hw=HW_ACCEL, empty=True))
    s.answer(s.one(Instr.AQIC), res(empty=True))
    s.fire(("poll", Q0))
    s.answer(s.one(Instr.TAPQ), res(hw=HW_ACCEL, empty=True, irq=True))
    probe = s.one(Instr.NQAP)
    s.answer(probe, res(irq=True))
    s.interrupt(Q0)
    s.answer(s.one(Instr.DQAP), res(psmid=probe.psmid, reply=PROBE_REPLY, empty=True, irq=True))
    assert s.state(Q0) is QState.WORKING
    assert ("unavailable", "accel") not in s.timers  # in service again: the grace timer is gone
    nq = s.one(Instr.NQAP)
    assert s.core.ledger.record_for_psmid(nq.psmid).rid == first


# --- 3. an offline queue whose re-probe was skipped ----------------------------------------------


def test_offline_reprobe_skipped_for_an_unanswered_instruction_is_paid_later() -> None:
    """Bring-up's RAPQ is never answered; the reset limit takes the queue offline with the RAPQ
    still out.  The re-probe timer finds a control instruction in flight: it must keep a timer
    armed, and when the RAPQ is declared lost the queue must re-probe (it used to stay offline
    forever with nothing armed)."""
    s = Script(FAST.with_(max_reset_attempts=1))
    s.add_queue(Q0)
    rapq = s.one(Instr.RAPQ)
    s.fire(("limit", Q0))
    assert s.state(Q0) is QState.OFFLINE
    s.fire(("poll", Q0))
    assert not s.cmds(Instr.TAPQ)  # one control instruction at a time
    assert ("poll", Q0) in s.timers, "the skipped re-probe is rescheduled"
    lose(s, [rapq], permanent=False)
    tapq = s.one(Instr.TAPQ)  # the loss settles the RAPQ, and the owed re-probe goes out at once
    s.answer(tapq, res(hw=HW_ACCEL, empty=True))
    assert s.state(Q0) is QState.RESET_START


def test_offline_reprobe_skipped_is_paid_when_the_instruction_completes() -> None:
    s = Script(FAST.with_(max_reset_attempts=1))
    s.add_queue(Q0)
    rapq = s.one(Instr.RAPQ)
    s.fire(("limit", Q0))
    s.fire(("poll", Q0))
    s.answer(rapq, res())  # late answer to the reset of a queue already given up on
    assert s.one(Instr.TAPQ).qid == Q0


# --- 4. a send the transport gave up on is decided ------------------------------------------------


def test_maybe_sent_to_a_queue_already_offline_is_decided_now() -> None:
    """The transport gives up on an NQAP (maybe sent) of a queue already offline: nobody will
    collect it, so the ledger decides at once (it used to be filed as on the card with no timer,
    and stats() kept counting it in flight)."""
    s = up(Q0)
    sc = s.submit(me_request(2, K), idempotent=False)
    nq = s.one(Instr.NQAP)
    s.interrupt(Q0)
    s.answer(s.one(Instr.DQAP), res(RC.CHECKSTOPPED))
    assert s.state(Q0) is QState.OFFLINE
    lose(s, [nq], permanent=False)
    err = s.resolved[sc].error
    assert isinstance(err, Indeterminate) and err.psmid == nq.psmid
    assert in_flight(s) == 0


def test_maybe_sent_idempotent_work_lost_for_good_is_redriven_elsewhere() -> None:
    s = up(Q0, Q1)
    rid = s.submit(me_request(2, K))
    nq = s.one(Instr.NQAP)
    other = Q1 if nq.qid == Q0 else Q0
    lose(s, [nq], permanent=True)
    assert s.state(nq.qid) is QState.OFFLINE
    again = s.one(Instr.NQAP)
    assert again.qid == other and s.core.ledger.record_for_psmid(again.psmid).rid == rid
    s.answer(again, res(irq=True))
    s.interrupt(other)
    s.answer(
        s.one(Instr.DQAP, other),
        res(psmid=again.psmid, reply=build_type80(expected_me(2, K)), empty=True, irq=True),
    )
    assert s.resolved[rid].value == expected_me(2, K)
    assert in_flight(s) == 0


def test_permanent_loss_never_redrives_onto_a_queue_the_same_loss_takes_down() -> None:
    s = up(Q0, Q1)
    for x in (2, 3):
        s.submit(me_request(x, K))
    assert {c.qid for c in s.cmds(Instr.NQAP)} == {Q0, Q1}
    s.lose_transport(permanent=True)
    assert s.state(Q0) is QState.OFFLINE and s.state(Q1) is QState.OFFLINE
    assert not s.cmds(), "nothing is sent to a transport that was just lost for good"
    assert all(isinstance(r.error, DeviceUnavailable) for r in s.resolved.values())
    assert in_flight(s) == 0


# --- 5. a deadline looks at every attempt --------------------------------------------------------


def test_deadline_after_a_redrive_remembers_the_attempt_that_may_have_run() -> None:
    """Idempotent work on a card that died silently is re-driven; it waits for a slot elsewhere and
    its deadline expires there.  An earlier attempt may have run: may_have_run must say so."""
    s = up(Q0, Q1, hw=replace(HW_ACCEL, qd=0))  # one slot per queue
    rid = s.submit(me_request(2, K), deadline=1.0)
    first = s.one(Instr.NQAP)
    other = Q1 if first.qid == Q0 else Q0
    s.answer(first, res(irq=True))
    blocker = s.submit(me_request(3, K))
    s.answer(s.one(Instr.NQAP, other), res(irq=True))
    # the first card dies: the request may have run there; idempotent, so re-driven -- but the
    # other queue's only slot is taken, so it waits on the host
    s.interrupt(first.qid)
    s.answer(s.one(Instr.DQAP, first.qid), res(RC.CHECKSTOPPED))
    assert rid not in s.resolved and s.core.ledger.records[rid].redrives == 1
    assert not s.cmds(Instr.NQAP)
    s.fire(("deadline", rid))
    err = s.resolved[rid].error
    assert isinstance(err, DeadlineExceeded)
    assert err.may_have_run is True and err.psmid == first.psmid and err.qid == first.qid
    assert blocker not in s.resolved


def test_deadline_after_bounces_only_says_it_never_ran() -> None:
    s = up(Q0, hw=replace(HW_ACCEL, qd=0))
    s.submit(me_request(3, K))
    s.answer(s.one(Instr.NQAP), res(irq=True))
    rid = s.submit(me_request(2, K), deadline=1.0)
    s.fire(("deadline", rid))
    err = s.resolved[rid].error
    assert isinstance(err, DeadlineExceeded) and err.may_have_run is False and err.psmid is None


# --- 6. a reply before its NQAP status -----------------------------------------------------------


def test_reply_before_its_nqap_status_is_delivered() -> None:
    """Pipelined transports may answer a DQAP before the NQAP's status frame is in (or that frame is
    lost): the reply is the request's, not a stray."""
    s = up(Q0)
    rid = s.submit(me_request(2, K), idempotent=False)
    nq = s.one(Instr.NQAP)
    s.interrupt(Q0)  # the card already signals a reply
    s.answer(
        s.one(Instr.DQAP), res(psmid=nq.psmid, reply=build_type80(expected_me(2, K)), empty=True, irq=True)
    )
    assert s.resolved[rid].value == expected_me(2, K)
    assert s.core.ledger.counters["stray_replies"] == 0
    s.answer(nq, res(irq=True))  # the status, late: nothing more happens
    assert s.outstanding(Q0) == 0 and s.state(Q0) is QState.IDLE
    assert in_flight(s) == 0 and len(s.resolved) == 1


def test_reply_after_its_nqap_status_was_lost_is_delivered() -> None:
    s = up(Q0)
    rid = s.submit(me_request(2, K), idempotent=False)
    nq = s.one(Instr.NQAP)
    s.interrupt(Q0)
    dq = s.one(Instr.DQAP)
    s.answer(dq, res(psmid=nq.psmid, reply=build_type80(expected_me(2, K)), empty=True, irq=True))
    lose(s, [nq], permanent=False)  # the status frame never comes
    assert s.resolved[rid].value == expected_me(2, K)
    assert s.outstanding(Q0) == 0 and s.core.queues[Q0].held == 0
