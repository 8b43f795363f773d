"""Regressions of the driver core found by the campaign's oracle (tests/oracle.py).

Each is the smallest event sequence of the campaign seed that found it, driven by hand through
:class:`tests._fixtures_driver.Script` (a core with no clock: timers fire only when the test fires
them), and fails on the code before its fix.  The seeds themselves stay in the campaign.
"""

from __future__ import annotations

from dataclasses import replace

from apcrypto.core.queue import QState
from apcrypto.errors import DeadlineExceeded
from apformats.codes import MachineFailureState as MF
from apformats.codes import ReplyCode as RY
from apformats.codes import ResponseCode as RC
from apformats.messages import build_error_reply, build_machine_failure
from apformats.results import Instr, qid_of
from tests._fixtures_driver import HW_ACCEL, Script, key, me_request, res

Q0 = qid_of(0, 0)
K = key(1024)


def test_deadline_counts_an_attempt_the_card_refused_unexecuted() -> None:
    """Seed 144: the card took the message and refused it unexecuted ("message type"); its
    re-drive bounced (queue full) and the deadline found the request back on the host.  The first
    attempt had been handed to a card (and an engine had picked it up), so ``may_have_run`` is
    True; it used to be False because both attempts were "cleared"."""
    s = Script()
    s.bring_up(Q0, replace(HW_ACCEL, qd=0))
    rid = s.submit(me_request(2, K), deadline=0.05)
    first = s.one(Instr.NQAP)
    s.answer(first, res(irq=True))
    s.interrupt(Q0)
    refused = build_error_reply(RY.MESSAGE_TYPE)
    s.answer(s.one(Instr.DQAP, Q0), res(psmid=first.psmid, reply=refused, empty=True, irq=True))
    again = s.one(Instr.NQAP)
    assert again.psmid != first.psmid  # re-driven: the card said it never ran
    s.answer(again, res(RC.Q_FULL))  # bounced: back on the host, waiting
    assert not s.cmds(Instr.NQAP)
    (r,) = s.fire(("deadline", rid)).resolved
    assert isinstance(r.error, DeadlineExceeded)
    assert r.error.may_have_run is True
    assert r.error.psmid == first.psmid and r.error.qid == Q0


def test_a_late_machine_failure_reply_takes_the_queue_out_of_service() -> None:
    """Seed 369: the first stored reply the host read after a card's machine failure belonged to a
    request whose deadline had already decided it (a late reply).  It was dropped unread, so the
    slot it freed was filled in the same batch as the next read: work went onto the failing queue
    with no health probe.  A machine-failure reply speaks for the queue whoever's request it was."""
    s = Script()
    s.bring_up(Q0, replace(HW_ACCEL, qd=0))  # one slot
    late = s.submit(me_request(2, K), deadline=0.01)
    first = s.one(Instr.NQAP)
    s.answer(first, res(irq=True))
    waiting = s.submit(me_request(3, K))
    assert not s.cmds(Instr.NQAP)  # the slot is taken: it waits on the host
    (r,) = s.fire(("deadline", late)).resolved
    assert isinstance(r.error, DeadlineExceeded) and r.error.may_have_run
    s.interrupt(Q0)
    mf = build_machine_failure(MF.IN_PROCESS, 0)
    s.answer(s.one(Instr.DQAP, Q0), res(psmid=first.psmid, reply=mf, empty=True, irq=True))
    assert s.core.ledger.counters["late_replies"] == 1
    assert not s.cmds(Instr.NQAP), "work placed on a queue that just reported a machine failure"
    assert s.state(Q0) is QState.RESET_START  # drained: reset, then the health probe
    assert waiting not in s.resolved
