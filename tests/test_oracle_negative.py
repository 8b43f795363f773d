"""Negative tests of the oracle: a checker that never fails proves nothing.

A small, hand-written history that keeps every promise is judged clean; then, one rule at a time, a
broken copy of it (an execution log, a wire record or an outcome the way a buggy driver or
emulator would leave it) must be reported under that rule.  The histories are built from plain
records here, independently of the emulator and the driver, and the messages are laid out by the
small builders below from ``reference/zcrypt.md`` (not by ``apformats``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from tests.oracle import (
    RULES,
    LogEntry,
    Outcome,
    PlannedFault,
    QueueInfo,
    Report,
    Sent,
    Topology,
    Work,
    content_id,
    judge,
)

A0, A1, C0 = 0x0000, 0x0100, 0x0200  # two accelerator queues (cards 0, 1), one CCA queue (card 2)
TOPO = Topology(
    {
        A0: QueueInfo(A0, 0, "accel", 2),
        A1: QueueInfo(A1, 1, "accel", 2),
        C0: QueueInfo(C0, 2, "cca", 2),
    }
)
MAX_REDRIVES = 3
MF = 0x10


def t50(x: int, op: str = "me") -> bytes:
    """A type 50 message of the 1K variant (MEB1 400 bytes / CRB1 464) carrying data ``x``."""
    total = 400 if op == "me" else 464
    head = (
        bytes([0, 0x50])
        + total.to_bytes(2, "big")
        + bytes(4)
        + (1 if op == "me" else 0x11).to_bytes(2, "big")
    )
    body = bytes(total - 16 - 128) + x.to_bytes(128, "big")
    return head + bytes(6) + body


def cprb(fc: str, value: int, domain: int, size: int = 8) -> bytes:
    payload = value.to_bytes(size, "big")
    return (
        bytes([0, 0x06])
        + (16 + len(payload)).to_bytes(2, "big")
        + bytes(4)
        + fc.encode()
        + domain.to_bytes(2, "big")
        + len(payload).to_bytes(4, "big")
        + payload
    )


def test_message_builders_match_content_id() -> None:
    """The test's builders and the oracle's reader agree (else every test below is moot)."""
    assert content_id(t50(12345)) == ("me", 12345)
    assert content_id(t50(7, "crt")) == ("crt", 7)
    assert content_id(cprb("CI", 5, domain=3)) == ("cprb", "CI", 5)
    assert content_id(cprb("CI", 5, domain=0)) == content_id(cprb("CI", 5, domain=3))
    assert content_id(b"\x00\x82" + bytes(14)) is None


@dataclass
class History:
    """Everything the oracle judges, mutable so a test can break one piece."""

    work: list[Work]
    outcomes: dict[int, Outcome]
    log: list[LogEntry]
    sent: list[Sent]
    faults: list[PlannedFault] = field(default_factory=list)
    counters: dict[tuple[int, int], int] | None = None

    def judge(self, **kw: Any) -> Report:
        return judge(
            TOPO,
            self.work,
            self.outcomes,
            self.log,
            self.sent,
            self.faults,
            max_redrives=kw.pop("max_redrives", MAX_REDRIVES),
            counters=self.counters,
            **kw,
        )

    def entry(self, psmid: int) -> LogEntry:
        return next(e for e in self.log if e.psmid == psmid)

    def put(self, psmid: int, **changes: Any) -> None:
        self.log = [replace(e, **changes) if e.psmid == psmid else e for e in self.log]

    def drop(self, *psmids: int) -> None:
        """Remove entries, renumbering the rest as a log that never had them."""
        kept = [e for e in self.log if e.psmid not in psmids]
        self.log = [replace(e, seq=i) for i, e in enumerate(sorted(kept, key=lambda e: e.seq))]

    def add(self, e: LogEntry, message: bytes) -> None:
        self.log.append(replace(e, seq=max(x.seq for x in self.log) + 1))
        self.sent.append(Sent(e.enqueued, e.qid, e.psmid, message, 0))


def good() -> History:
    """A clean run.  Time 0: bring-up probes done on every queue.  Then
    #0 ME (state-changing) completes on A0;  #1 ME (idempotent) is request-pending in a machine
    failure of card 1 and re-driven once to A0 (after A1's probe) where it completes;  #2 counter
    increment (by 5) completes on C0;  #3 CRT is rejected as malformed (BadRequest)."""
    work = [
        Work(0, "accel", ("me", 1001), False, 1.0, check=lambda v: v == b"r0"),
        Work(1, "accel", ("me", 1002), True, 1.0, check=lambda v: v == b"r1"),
        Work(2, "cca", ("cprb", "CI", 5), False, 1.0, check=lambda v: isinstance(v, int)),
        Work(3, "accel", ("crt", 1003), False, 1.0, deadline=5.0),
    ]
    msgs = {
        1: t50(2),  # probes
        2: t50(2),
        3: cprb("RL", 8, 0, 2),
        10: t50(1001),
        11: t50(1002),
        12: cprb("CI", 5, 0),
        13: t50(1003, "crt"),
        14: t50(1002),
        15: t50(2),  # A1's probe after the machine failure
    }
    log = [
        LogEntry(1, A0, 0.0, "completed", 0.0, 0.5, 0, None, 0.5, seq=0),
        LogEntry(2, A1, 0.0, "completed", 0.0, 0.5, 0, None, 0.5, seq=1),
        LogEntry(3, C0, 0.0, "completed", 0.0, 0.5, 0, None, 0.5, seq=2),
        LogEntry(10, A0, 1.0, "completed", 1.0, 2.0, 0, None, 2.0, seq=3),
        LogEntry(11, A1, 1.0, "pending-failed", None, 1.5, MF, None, 3.0, seq=4),
        LogEntry(12, C0, 1.0, "completed", 1.0, 2.0, 0, "counter 0->5", 2.0, seq=5),
        LogEntry(13, A0, 1.0, "error", 1.0, 1.2, 0x82, None, 1.2, seq=6),
        LogEntry(14, A0, 3.0, "completed", 3.0, 3.5, 0, None, 3.5, seq=7),
        LogEntry(15, A1, 4.0, "completed", 4.0, 4.1, 0, None, 4.1, seq=8),
    ]
    sent = [Sent(e.enqueued, e.qid, e.psmid, msgs[e.psmid], 0) for e in log]
    outcomes = {
        0: Outcome("completed", 2.0, b"r0"),
        1: Outcome("completed", 3.5, b"r1"),
        2: Outcome("completed", 2.0, 5),
        3: Outcome("BadRequest", 1.2, qid=A0, psmid=13, reply_code=0x82),
    }
    faults = [PlannedFault("machine_failure", 1.5, card=1)]
    return History(work, outcomes, log, sent, faults, counters={(2, 0): 5})


def test_the_clean_history_is_clean() -> None:
    rep = good().judge()
    assert rep.ok, str(rep)
    assert rep.counts == {"completed": 3, "BadRequest": 1}


# --- one broken history per rule ------------------------------------------------------------------


def lost(h: History) -> None:
    del h.outcomes[2]


def decided_twice(h: History) -> None:
    h.outcomes[2] = replace(h.outcomes[2], calls=2)


def unknown_psmid(h: History) -> None:
    h.sent = [s for s in h.sent if s.psmid != 12]  # the card ran something nobody sent


def log_incomplete(h: History) -> None:
    h.log = h.log[2:]  # a ring that dropped its oldest entries: the oracle cannot judge from it


def psmid_reused(h: History) -> None:
    h.sent.append(Sent(4.0, A0, 10, t50(9999), 0))


def pending_but_started(h: History) -> None:
    h.put(11, started=1.2)  # an emulator that marks every held message request-pending


def wrong_kind(h: History) -> None:
    h.sent = [replace(s, qid=C0) if s.psmid == 14 else s for s in h.sent]
    h.put(14, qid=C0)  # re-driven to a CCA queue


def redrive_before_reply(h: History) -> None:
    h.put(14, enqueued=1.6, started=1.6)  # re-sent before the card's verdict was read


def redriven_twice(h: History) -> None:
    h.add(LogEntry(16, A0, 3.0, "completed", 3.1, 3.4, 0, None, 3.4), t50(1002))


def not_redriven(h: History) -> None:
    h.drop(14)
    h.outcomes[1] = Outcome("Indeterminate", 3.0, qid=A1, psmid=11)


def sent_again_after_completion(h: History) -> None:
    h.add(LogEntry(16, A1, 2.5, "completed", 2.5, 2.7, 0, None, 2.7), t50(1001))


def over_budget(h: History) -> None:
    for i in range(4):  # four more request-pending attempts: five in all, four re-drives
        t = 5.0 + i
        h.add(LogEntry(20 + i, A1, t, "pending-failed", None, t + 0.5, MF, None, t + 0.6), t50(1002))
    h.put(14, enqueued=9.0, started=9.0, ended=9.5, dequeued=9.5)
    h.log.sort(key=lambda e: e.enqueued)
    h.log = [replace(e, seq=i) for i, e in enumerate(h.log)]
    h.outcomes[1] = Outcome("completed", 9.5, b"r1")


def ran_twice(h: History) -> None:
    h.put(10, outcome="in-process-failed", ended=1.5, dequeued=1.6, reply_code=MF)
    h.add(LogEntry(16, A1, 4.5, "completed", 4.5, 4.8, 0, None, 4.8), t50(1001))
    h.outcomes[0] = Outcome("completed", 4.8, b"r0")


def counter_moved_twice(h: History) -> None:
    h.counters = {(2, 0): 10}  # the firmware ran the increment twice; the log shows one run


def resent_after_silence(h: History) -> None:
    h.faults.append(PlannedFault("checkstop", 1.5, card=0))
    h.put(10, outcome="discarded", ended=1.5, dequeued=None)  # the card died holding it...
    h.add(LogEntry(16, A1, 4.5, "completed", 4.5, 4.8, 0, None, 4.8), t50(1001))  # ...sent again
    h.outcomes[0] = Outcome("completed", 4.8, b"r0")


def indeterminate_never_started(h: History) -> None:
    h.put(10, outcome="pending-failed", started=None, ended=1.5, reply_code=MF, dequeued=1.6)
    h.outcomes[0] = Outcome("Indeterminate", 1.6, qid=A0, psmid=10)


def indeterminate_idempotent_early(h: History) -> None:
    h.put(14, outcome="in-process-failed", ended=3.2, reply_code=MF, dequeued=3.3)
    h.outcomes[1] = Outcome("Indeterminate", 3.3, qid=A0, psmid=14)


def reset_before_drain(h: History) -> None:
    h.put(11, outcome="discarded", dequeued=None)  # the stored verdict thrown away by a reset
    h.put(14, enqueued=3.0)
    h.outcomes[1] = Outcome("completed", 3.5, b"r1")


def unavailable_with_healthy_queue(h: History) -> None:
    h.drop(14)
    h.outcomes[1] = Outcome("DeviceUnavailable", 3.0)  # A0 was never touched by a fault


def deadline_without_deadline(h: History) -> None:
    h.outcomes[0] = Outcome("DeadlineExceeded", 2.0, may_have_run=True)


def deadline_early(h: History) -> None:
    h.outcomes[3] = Outcome("DeadlineExceeded", 3.0, may_have_run=True)  # deadline 5 s after 1.0


def deadline_may_have_run_wrong(h: History) -> None:
    h.outcomes[3] = Outcome("DeadlineExceeded", 6.5, may_have_run=False)  # psmid 13 started


def bad_request_not_from_card(h: History) -> None:
    h.outcomes[0] = Outcome("BadRequest", 2.0, qid=A0, psmid=10, reply_code=0x82)


def wrong_result(h: History) -> None:
    h.outcomes[0] = Outcome("completed", 2.0, b"r1")  # another request's reply delivered here


def completed_without_run(h: History) -> None:
    h.put(10, outcome="discarded", dequeued=None)
    h.faults.append(PlannedFault("reset", 1.9, qid=A0))


def completed_before_read(h: History) -> None:
    h.outcomes[0] = Outcome("completed", 1.5, b"r0")


def counter_value_wrong(h: History) -> None:
    h.outcomes[2] = Outcome("completed", 2.0, 10)  # as if it had run on top of itself


def over_slots(h: History) -> None:
    # a third message on A0 (2 slots) while #0 and #3 are held: an emulator one slot over
    h.add(LogEntry(16, A0, 1.1, "completed", 1.3, 1.4, 0, None, 1.4), t50(1004))
    h.work.append(Work(4, "accel", ("me", 1004), True, 1.0))
    h.outcomes[4] = Outcome("completed", 1.4, b"")


def refused_full(h: History) -> None:
    h.sent.append(Sent(1.0, A0, 99, t50(1004), 0x10))  # the driver overfilled an untouched queue


def slots_idle_while_waiting(h: History) -> None:
    # #4 waits on the host from 1.0 to 2.0 although A1 had a free slot until 1.5 (qd slots used)
    h.work.append(Work(4, "accel", ("me", 1004), True, 1.0))
    h.add(LogEntry(16, A0, 2.0, "completed", 2.0, 2.2, 0, None, 2.2), t50(1004))
    h.outcomes[4] = Outcome("completed", 2.2, b"")
    h.faults = []  # no fault at all: nothing excuses the idle slots
    h.put(11, outcome="completed", started=1.0, ended=1.4, reply_code=0, dequeued=1.4)
    h.put(14, enqueued=2.5, started=2.5)  # (its own second attempt aside)
    h.drop(14, 15)
    h.outcomes[1] = Outcome("completed", 1.4, b"r1")


def no_probe_after_failure(h: History) -> None:
    h.put(15, outcome="error", reply_code=0x82)  # A1's probe answered wrong...
    h.add(LogEntry(16, A1, 4.5, "completed", 4.5, 4.8, 0, None, 4.8), t50(1004))  # ...work anyway
    h.work.append(Work(4, "accel", ("me", 1004), True, 4.4))
    h.outcomes[4] = Outcome("completed", 4.8, b"")


BROKEN: list[tuple[str, Callable[[History], None]]] = [
    ("one-outcome", lost),
    ("one-outcome", decided_twice),
    ("attribution", unknown_psmid),
    ("attribution", psmid_reused),
    ("attribution", log_incomplete),
    ("log-consistency", pending_but_started),
    ("same-kind", wrong_kind),
    ("redrive-once", redrive_before_reply),
    ("redrive-once", redriven_twice),
    ("redrive-once", not_redriven),
    ("redrive-once", sent_again_after_completion),
    ("redrive-once", resent_after_silence),
    ("redrive-budget", over_budget),
    ("ran-twice", ran_twice),
    ("ran-twice", counter_moved_twice),
    ("indeterminate", indeterminate_never_started),
    ("indeterminate", indeterminate_idempotent_early),
    ("discard", reset_before_drain),
    ("unavailable", unavailable_with_healthy_queue),
    ("deadline", deadline_without_deadline),
    ("deadline", deadline_early),
    ("deadline", deadline_may_have_run_wrong),
    ("failed", bad_request_not_from_card),
    ("completed", wrong_result),
    ("completed", completed_without_run),
    ("completed", completed_before_read),
    ("completed", counter_value_wrong),
    ("slots", over_slots),
    ("slots", refused_full),
    ("full", slots_idle_while_waiting),
    ("probe", no_probe_after_failure),
]


@pytest.mark.parametrize(("rule", "breakage"), BROKEN, ids=[f"{r}-{f.__name__}" for r, f in BROKEN])
def test_each_broken_history_is_reported(rule: str, breakage: Callable[[History], None]) -> None:
    h = good()
    breakage(h)
    rep = h.judge()
    assert rule in rep.rules(), f"{breakage.__name__}: expected [{rule}], got:\n{rep}"


def test_every_rule_has_a_negative_test() -> None:
    assert {r for r, _ in BROKEN} == set(RULES)


def test_probe_rule_is_off_without_probes() -> None:
    """A driver configured without health probes is not held to the probe rule (and only that)."""
    h = good()
    no_probe_after_failure(h)
    assert h.judge(probes=False).ok


def test_silent_card_excuses_indeterminate_for_unstarted_work() -> None:
    """The other side of the strict rule: a card that died holding a message cannot say whether it
    ran, so ``Indeterminate`` is right there -- but only with the death in the fault plan."""
    h = good()
    h.put(10, outcome="discarded", started=None, ended=1.5, dequeued=None)
    h.outcomes[0] = Outcome("Indeterminate", 1.6, qid=A0, psmid=10)
    rep = h.judge()
    assert {"indeterminate", "discard"} <= rep.rules()  # no fault explains the silence
    h.faults.append(PlannedFault("checkstop", 1.4, card=0))
    assert h.judge().ok, str(h.judge())


def test_unavailable_once_every_queue_of_the_kind_is_hit() -> None:
    h = good()
    unavailable_with_healthy_queue(h)
    h.faults.append(PlannedFault("deconfigure", 2.5, card=0))
    assert h.judge().ok, str(h.judge())


def test_unavailable_when_the_redrive_budget_is_spent() -> None:
    h = good()
    over_budget(h)
    h.drop(23, 14)  # four attempts: three re-drives, all pending
    h.outcomes[1] = Outcome("DeviceUnavailable", 8.6)
    rep = h.judge()
    assert "unavailable" not in rep.rules() and "redrive-budget" not in rep.rules(), str(rep)


def test_a_known_bug_is_excused_only_in_its_shape() -> None:
    """``deadline-after-redrive`` excuses a wrong ``may_have_run=False`` only for a request that was
    back on the host when its deadline came; the same lie about a request still on a card is not."""
    h = good()
    h.put(13, outcome="discarded", dequeued=None, ended=1.1)  # ran, then lost in a reset...
    h.faults.append(PlannedFault("reset", 1.1, qid=A0))
    h.outcomes[3] = Outcome("DeadlineExceeded", 6.0, may_have_run=False)  # ...deadline while queued
    assert "deadline" in h.judge().rules()
    assert h.judge(known=frozenset({"deadline-after-redrive"})).ok, str(h.judge())
    h.put(13, outcome="running", ended=None)  # still on the card at the deadline: no excuse
    assert "deadline" in h.judge(known=frozenset({"deadline-after-redrive"})).rules()
    with pytest.raises(ValueError):
        h.judge(known=frozenset({"anything-goes"}))


def test_redrive_into_a_recovering_queue_is_excused_only_in_its_shape() -> None:
    """``redrive-into-recovering-queue`` excuses work a queue accepted in the very instant the host
    read its card's machine-failure replies -- not work sent there any later without a probe."""
    h = good()
    h.work.append(Work(4, "accel", ("me", 1004), True, 1.0))
    h.outcomes[4] = Outcome("completed", 3.3, b"")
    h.add(LogEntry(16, A1, 3.0, "completed", 3.0, 3.3, 0, None, 3.3), t50(1004))  # drained at 3.0
    assert "probe" in h.judge().rules()
    assert h.judge(known=frozenset({"redrive-into-recovering-queue"})).ok, str(h.judge())
    h.put(16, enqueued=3.1, started=3.1)  # a moment later: no excuse
    assert "probe" in h.judge(known=frozenset({"redrive-into-recovering-queue"})).rules()


def test_the_oracle_restatements_agree_with_the_product() -> None:
    """The oracle restates codes, layouts and the slot rule from the reference instead of importing
    them; two independent writings of one fact must agree, or one of them is wrong.  (A wrong
    queue-full code once hid a driver that overfilled its queues from the whole campaign.)"""
    from apcrypto.requests import CounterIncrement, ModExpo, ModExpoCrt, RandomBytes
    from apformats.codes import ReplyCode, ResponseCode
    from emulator import load_profile
    from tests import oracle
    from tests._fixtures_driver import crt_request, key

    assert oracle.RC_Q_FULL == ResponseCode.Q_FULL
    assert oracle.MACHINE_FAILURE == ReplyCode.MACHINE_FAILURE
    assert {ReplyCode.MESSAGE_TYPE, ReplyCode.INVALID_COMM_CD} == oracle.REJECTED_UNRUN
    assert {ReplyCode.OPERAND_INVALID, ReplyCode.MALFORMED_MSG} <= oracle.CALLER_FAULT
    for name in ("small", "default"):
        prof = load_profile(name)
        topo = Topology.from_profile(name)
        assert {q.slots for q in topo.queues.values()} == {c.slots for c in prof.card_types.values()}
    for bits in (1024, 2048):
        k = key(bits, 0)
        x = k.n - 12345
        me = ModExpo(x.to_bytes(k.size, "big"), 65537, k.n)
        assert content_id(me.message(0)) == ("me", x)
        assert content_id(crt_request(x, k).message(0)) == ("crt", x)
        assert isinstance(crt_request(x, k), ModExpoCrt)
    assert content_id(CounterIncrement(77).message(3)) == ("cprb", "CI", 77)
    assert content_id(RandomBytes(300).message(1)) == ("cprb", "RL", 300)


def test_may_have_run_false_is_true_for_work_refused_unexecuted() -> None:
    """An attempt an engine picked up only to refuse it unexecuted (message type) did not run:
    ``DeadlineExceeded(may_have_run=False)`` after it is the truth, not a lie."""
    h = good()
    h.put(13, reply_code=0x20)
    h.outcomes[3] = Outcome("DeadlineExceeded", 6.5, may_have_run=False)
    assert h.judge().ok, str(h.judge())
