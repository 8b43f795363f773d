"""Regressions of the driver core found by the campaign's oracle (tests/oracle.py).

Each is the smallest event sequence of the campaign seed that found it, driven by hand through
:class:`tests._fixtures_driver.Script` (a core with no clock: timers fire only when the test fires
them), and fails on the code before its fix.  The seeds themselves stay in the campaign.
"""

from __future__ import annotations

from dataclasses import replace

from apcrypto.errors import DeadlineExceeded
from apformats.codes import ReplyCode as RY
from apformats.codes import ResponseCode as RC
from apformats.messages import build_error_reply
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
