"""The emulator's AP instructions: status bits and response codes per queue state, slots, engines.

All on a virtual clock: time moves only when a test steps it, so every timing here is exact.
"""

from __future__ import annotations

from itertools import pairwise

import pytest

from apformats.codes import NO_PENDING_REPLY, ResponseCode
from apformats.messages import parse_reply
from apformats.results import Instr, qid_of
from emulator import Emulator
from emulator.clock import VirtualClock
from tests._fixtures_emulator import (
    Q00,
    Q01,
    Q10,
    E,
    counter_increment,
    crt,
    default_emu,
    drain,
    fill,
    key,
    mex,
    result_int,
    small,
    small_exact,
)

__all__ = ["default_emu", "small", "small_exact"]  # fixtures used by name

RC = ResponseCode
MEX_1K = 300e-6  # small profile: 6 rating units x 50 µs


def call(emu: Emulator, instr: Instr, qid: int):
    """Issue ``instr`` on ``qid`` with harmless arguments."""
    if instr is Instr.TAPQ:
        return emu.tapq(qid)
    if instr is Instr.NQAP:
        return emu.nqap(qid, 0xDEAD, mex(5))
    if instr is Instr.DQAP:
        return emu.dqap(qid)
    if instr is Instr.RAPQ:
        return emu.rapq(qid)
    if instr is Instr.ZAPQ:
        return emu.zapq(qid)
    return emu.aqic(qid, True)


# --- TAPQ ---------------------------------------------------------------------------------------


def test_tapq_reports_accelerator_hwinfo(small: Emulator) -> None:
    r = small.tapq(Q00)
    assert r.status.rc == RC.NORMAL
    assert r.status.queue_empty and not r.status.replies_waiting and not r.status.queue_full
    hw = r.hwinfo
    assert hw is not None
    assert (hw.at, hw.nd, hw.ml, hw.qd) == (14, 85, 3, 7)
    assert hw.accel and not hw.cca and hw.mex4k and hw.crt4k and not hw.apsc
    assert hw.slots == 8 and hw.max_msg_size == 12 * 1024 and hw.mode == "accel"
    assert hw.class_ == 0x80 and hw.apxa


def test_tapq_reports_cca_hwinfo(default_emu: Emulator) -> None:
    hw = default_emu.tapq(qid_of(2, 0)).hwinfo
    assert hw is not None
    assert hw.cca and not hw.accel and hw.apsc and not hw.mex4k and hw.mode == "cca"
    assert default_emu.tapq(qid_of(0, 3)).hwinfo.accel  # type: ignore[union-attr]


def test_tapq_without_t_bit_has_no_hwinfo(small: Emulator) -> None:
    assert small.tapq(Q00, t_bit=False).hwinfo is None


def test_qids_lists_usage_queues_only(default_emu: Emulator, small: Emulator) -> None:
    assert small.qids() == [Q00, Q01, Q10, qid_of(1, 1)]
    qids = default_emu.qids()
    assert len(qids) == 16 and qid_of(0, 4) not in qids
    assert qids == sorted(qid_of(c, d) for c in range(4) for d in range(4))


@pytest.mark.parametrize("instr", list(Instr))
def test_unknown_card_and_domain(small: Emulator, instr: Instr) -> None:
    r = call(small, instr, qid_of(9, 0))
    assert r.status.rc == RC.Q_NOT_AVAIL and r.hwinfo is None
    assert not r.status.queue_empty  # nothing to report about a queue that does not exist
    r = call(small, instr, qid_of(0, 7))
    assert r.status.rc == RC.INVALID_ADDRESS and r.hwinfo is None
    assert len(small.execution_log) == 0


# --- NQAP / DQAP --------------------------------------------------------------------------------


def test_mex_and_crt_round_trip(small: Emulator) -> None:
    k = key(1024)
    assert small.nqap(Q00, 1, mex(12345, k)).status.rc == RC.NORMAL
    assert small.nqap(Q00, 2, crt(67890, k)).status.rc == RC.NORMAL
    small.clock.run_until_idle()
    got = {r.psmid: result_int(r) for r in drain(small, Q00)}
    assert got == {1: pow(12345, 65537, k.n), 2: pow(67890, k.d, k.n)}


def test_rsa_2048_and_4096(small: Emulator) -> None:
    for i, bits in enumerate((2048, 4096)):
        k = key(bits)
        small.nqap(Q00, 10 + i, crt(99 + i, k))
    small.clock.run_until_idle()
    got = {r.psmid: result_int(r) for r in drain(small, Q00)}
    assert got == {10: pow(99, key(2048).d, key(2048).n), 11: pow(100, key(4096).d, key(4096).n)}


def test_status_bits_follow_the_queue(small_exact: Emulator) -> None:
    emu = small_exact
    r = emu.nqap(Q00, 1, mex(3))
    assert r.status.rc == RC.NORMAL and not r.status.queue_empty and not r.status.replies_waiting
    emu.clock.run_until_idle()
    t = emu.tapq(Q00).status
    assert t.replies_waiting and not t.queue_empty
    r = emu.dqap(Q00)
    assert r.status.rc == RC.NORMAL and r.psmid == 1
    assert r.status.queue_empty and not r.status.replies_waiting  # the word after the reply left


def test_slots_fill_refuse_and_refill(small_exact: Emulator) -> None:
    emu = small_exact
    rcs = [emu.nqap(Q00, p, mex(p)).status for p in range(1, 9)]
    assert [s.rc for s in rcs] == [RC.NORMAL] * 8
    assert [s.queue_full for s in rcs] == [False] * 7 + [True]
    full = emu.nqap(Q00, 9, mex(9)).status
    assert full.rc == RC.Q_FULL and full.queue_full
    # Completed replies still hold their slots until DQAP'd.
    emu.clock.run_until_idle()
    assert emu.nqap(Q00, 9, mex(9)).status.rc == RC.Q_FULL
    assert emu.dqap(Q00).status.rc == RC.NORMAL
    assert emu.nqap(Q00, 9, mex(9)).status.rc == RC.NORMAL
    assert emu.nqap(Q00, 10, mex(10)).status.rc == RC.Q_FULL
    # The other domain of the same card has its own slots.
    assert emu.nqap(Q01, 11, mex(11)).status.rc == RC.NORMAL
    assert len(emu.execution_log) == 10


def test_dqap_no_pending_reply_queue_empty_iff_nothing_held(small_exact: Emulator) -> None:
    emu = small_exact
    r = emu.dqap(Q00)
    assert r.status.rc == NO_PENDING_REPLY and r.status.queue_empty and r.psmid == 0 and r.reply == b""
    emu.nqap(Q00, 1, mex(3))
    r = emu.dqap(Q00)  # held (running), no reply yet
    assert r.status.rc == NO_PENDING_REPLY and not r.status.queue_empty
    emu.clock.run_until_idle()
    assert emu.dqap(Q00).psmid == 1
    r = emu.dqap(Q00)
    assert r.status.rc == NO_PENDING_REPLY and r.status.queue_empty


def test_dqap_gives_oldest_available_reply_first(small_exact: Emulator) -> None:
    emu = small_exact
    big = key(2048)
    emu.nqap(Q00, 1, crt(5, big))  # CRT_2K: 2.7 ms on engine 0
    emu.nqap(Q00, 2, mex(6))  # MEX_1K: 0.3 ms on engine 1
    emu.nqap(Q00, 3, mex(7))  # waits for engine 1, done at 0.6 ms
    emu.clock.run_until_idle()
    assert [r.psmid for r in drain(emu, Q00)] == [2, 3, 1]


def test_message_too_big(small: Emulator) -> None:
    r = small.nqap(Q00, 1, bytes(12 * 1024 + 1))
    assert r.status.rc == RC.MESSAGE_TOO_BIG
    assert small.nqap(Q00, 2, bytes(12 * 1024)).status.rc == RC.NORMAL  # firmware rejects it
    small.clock.run_until_idle()
    (reply,) = drain(small, Q00)
    assert parse_reply(reply.reply).kind == "error"
    (entry,) = small.execution_log.entries()
    assert entry.psmid == 2 and entry.outcome == "error" and entry.reply_code


def test_control_only_domain_refuses_nqap(default_emu: Emulator) -> None:
    ctl = qid_of(0, 4)
    assert default_emu.tapq(ctl).status.rc == RC.NORMAL
    assert default_emu.nqap(ctl, 1, mex(3)).status.rc == RC.INVALID_DOMAIN
    assert default_emu.dqap(ctl).status.rc == NO_PENDING_REPLY
    assert len(default_emu.execution_log) == 0


def test_special_needs_apsc(default_emu: Emulator) -> None:
    assert default_emu.nqap(qid_of(0, 0), 1, mex(3), special=True).status.rc == RC.REQ_FAC_NOT_INST
    cca = qid_of(2, 1)
    assert default_emu.nqap(cca, 2, counter_increment(1), special=True).status.rc == RC.NORMAL


def test_psmid_must_be_64_bit(small: Emulator) -> None:
    with pytest.raises(ValueError, match="psmid"):
        small.nqap(Q00, 1 << 64, mex(3))
    with pytest.raises(ValueError, match="psmid"):
        small.nqap(Q00, -1, mex(3))
    assert small.nqap(Q00, (1 << 64) - 1, mex(3)).status.rc == RC.NORMAL


def test_garbage_request_gets_error_reply(small: Emulator) -> None:
    small.nqap(Q00, 1, b"\x00\x77garbage-bytes-here")
    small.clock.run_until_idle()
    (r,) = drain(small, Q00)
    rep = parse_reply(r.reply)
    assert rep.kind == "error" and rep.msg_type == 0x82
    (e,) = small.execution_log.entries()
    assert e.outcome == "error" and e.function == "INVALID" and e.reply_code == rep.reply_code


def test_cca_card_runs_cprb_and_rejects_type50(default_emu: Emulator) -> None:
    emu = default_emu
    cca = qid_of(3, 2)
    emu.nqap(cca, 1, counter_increment(2, 5))
    emu.nqap(cca, 2, mex(3))
    emu.clock.run_until_idle()
    replies = {r.psmid: parse_reply(r.reply) for r in drain(emu, cca)}
    assert replies[1].kind == "ok" and int.from_bytes(replies[1].result, "big") == 5
    assert replies[2].kind == "error"
    assert emu.stores[(3, 2)].counter == 5 and emu.stores[(3, 1)].counter == 0


# --- engines and service times ------------------------------------------------------------------


def test_service_time_is_the_profiles(small_exact: Emulator) -> None:
    emu = small_exact
    emu.nqap(Q00, 1, mex(3))
    emu.nqap(Q10, 2, crt(3, key(2048)))
    assert emu.clock.next_deadline() == pytest.approx(MEX_1K)
    emu.clock.run_until(MEX_1K - 1e-9)
    assert emu.dqap(Q00).status.rc == NO_PENDING_REPLY
    emu.clock.run_until(MEX_1K)
    assert emu.dqap(Q00).psmid == 1
    emu.clock.run_until_idle()
    e1, e2 = emu.execution_log.entries()
    assert e1.ended - e1.started == pytest.approx(MEX_1K)
    assert e2.ended - e2.started == pytest.approx(54 * 50e-6)  # CRT_2K
    assert (e1.function, e2.function) == ("MEX_1K", "CRT_2K")


def test_jitter_stays_within_the_profiles_fraction(small: Emulator) -> None:
    for p in range(8):
        small.nqap(Q00, p, mex(p + 2))
    small.clock.run_until_idle()
    spans = [e.ended - e.started for e in small.execution_log.entries()]
    assert all(MEX_1K * 0.95 <= s <= MEX_1K * 1.05 for s in spans)
    assert len(set(spans)) == len(spans)  # really jittered


def test_engines_are_shared_by_the_cards_queues(small_exact: Emulator) -> None:
    """Two domains of one card compete for its two engines; the other card is unaffected."""
    emu = small_exact
    fill(emu, Q00, range(0, 4))
    fill(emu, Q01, range(10, 14))
    fill(emu, Q10, range(20, 22))
    emu.clock.run_until_idle()
    log = {e.psmid: e for e in emu.execution_log.entries()}
    card0 = [log[p] for p in (*range(0, 4), *range(10, 14))]
    # 8 requests of 0.3 ms on 2 engines: 4 rounds.  Q00's first two took both idle engines at once;
    # from then on the engines alternate between the domains while both have work.
    rounds = [
        sorted(e.qid for e in card0 if e.started == pytest.approx(round_ * MEX_1K)) for round_ in range(4)
    ]
    assert rounds == [[Q00, Q00], [Q00, Q01], [Q00, Q01], [Q01, Q01]]
    assert max(e.ended for e in card0) == pytest.approx(4 * MEX_1K)
    assert {e.engine for e in card0} == {0, 1}
    assert all(log[p].ended == pytest.approx(MEX_1K) for p in (20, 21))  # card 1: 2 engines, 2 requests


def test_engine_pick_is_fair_across_queues(small_exact: Emulator) -> None:
    """A late queue gets the next free engine; it does not wait behind a full queue's backlog."""
    emu = small_exact
    fill(emu, Q00, range(0, 8))
    fill(emu, Q01, [100])
    emu.clock.run_until_idle()
    e = emu.execution_log.for_psmid(100)[0]
    assert e.started == pytest.approx(MEX_1K)  # first engine to free up takes it
    # FIFO within the queue: Q00's requests started in psmid order.
    q00 = [x for x in emu.execution_log.entries() if x.qid == Q00]
    assert [x.psmid for x in sorted(q00, key=lambda x: (x.started, x.engine))] == list(range(8))


def test_zero_service_time_completes_inline() -> None:
    emu = Emulator("fast")
    q = qid_of(0, 0)
    r = emu.nqap(q, 1, mex(3))
    assert r.status.rc == RC.NORMAL and r.status.replies_waiting
    assert emu.clock.now() == 0.0
    assert result_int(emu.dqap(q)) == pow(3, 65537, key().n)
    assert emu.execution_log.entries()[0].outcome == "completed"


# --- RAPQ / ZAPQ --------------------------------------------------------------------------------


@pytest.mark.parametrize("reset", ["rapq", "zapq"])
def test_reset_discards_and_answers_reset_in_progress(small_exact: Emulator, reset: str) -> None:
    emu = small_exact
    fill(emu, Q00, range(0, 5))
    fill(emu, Q01, range(10, 15))
    emu.clock.advance(MEX_1K)  # 0, 1 completed; 2 and 10 running; the rest waiting
    emu.aqic(Q00, True)
    r = getattr(emu, reset)(Q00)
    assert r.status.rc == RC.NORMAL and r.status.queue_empty and not r.status.irq_enabled
    for instr in Instr:
        res = call(emu, instr, Q00)
        assert res.status.rc == RC.RESET_IN_PROGRESS, instr
    assert emu.tapq(Q00).hwinfo is not None  # GR2 is valid with RC 0x02
    log = {e.psmid: e for e in emu.execution_log.entries()}
    assert {p: log[p].outcome for p in range(5)} == dict.fromkeys(range(5), "discarded")
    assert [log[p].started for p in range(5)] == [0.0, 0.0, MEX_1K, None, None]  # fair: 10 got one
    assert log[0].reply_code == 0 and log[0].ended == pytest.approx(MEX_1K)  # its reply was lost
    assert log[2].reply_code == 0 and log[2].ended == pytest.approx(MEX_1K)  # dropped as it started
    assert log[4].reply_code is None
    # The other domain keeps working, now with both engines.
    emu.clock.advance(0.005)
    assert emu.tapq(Q00).status.rc == RC.NORMAL
    assert [r.psmid for r in drain(emu, Q01)] == list(range(10, 15))
    assert drain(emu, Q00) == []
    assert not emu.tapq(Q00).status.irq_enabled
    assert fill(emu, Q00, [50]) == [RC.NORMAL]


def test_zapq_zeroizes_key_slots(default_emu: Emulator) -> None:
    from apformats.messages import build_cprb

    emu = default_emu
    cca = qid_of(2, 0)
    emu.nqap(cca, 1, build_cprb("KS", 0, b"\x03secret"))
    emu.nqap(cca, 2, counter_increment(0))
    emu.clock.run_until_idle()
    drain(emu, cca)
    store = emu.stores[(2, 0)]
    assert store.key_slots == {3: b"secret"} and store.counter == 1
    emu.rapq(cca)
    assert store.key_slots == {3: b"secret"}
    emu.clock.run_until_idle()
    emu.zapq(cca)
    assert store.key_slots == {} and store.counter == 1  # the counter is monotonic hardware state


def test_zeroize_takes_an_apqn_back_whatever_the_card_state(default_emu: Emulator) -> None:
    """What the server does when a session's grace ends: held work and replies (stored machine-
    failure replies too) discarded, key slots cleared, other domains untouched."""
    from apformats.messages import build_cprb

    emu = default_emu
    cca, other = qid_of(2, 0), qid_of(2, 1)
    emu.nqap(cca, 1, build_cprb("KS", 0, b"\x03secret"))
    emu.nqap(other, 9, build_cprb("KS", 1, b"\x03theirs"))
    emu.clock.run_until_idle()
    drain(emu, cca)
    drain(emu, other)
    emu.nqap(cca, 2, counter_increment(0))
    emu.control.machine_failure(2, recovery_time=1.0)  # psmid 2 now a stored machine-failure reply
    assert emu.dqap(cca).status.rc == NO_PENDING_REPLY  # held until recovery completes
    emu.zeroize(cca)
    assert emu.stores[(2, 0)].key_slots == {} and emu.stores[(2, 1)].key_slots == {3: b"theirs"}
    assert [e.outcome for e in emu.execution_log.for_psmid(2)] == ["discarded"]
    emu.clock.run_until_idle()  # the card's recovery ends; nothing of the old holder is left
    assert emu.tapq(cca).status.rc == RC.NORMAL and drain(emu, cca) == []
    emu.zeroize(qid_of(0, 0))
    assert emu.tapq(qid_of(0, 0)).status.rc == RC.NORMAL  # handed over clean at once, not resetting
    emu.zeroize(qid_of(9, 0))  # an APQN the emulator lacks: nothing to take back


def test_execute_is_the_one_instruction_entry(small_exact: Emulator) -> None:
    from apformats.frames import Command

    emu = small_exact
    seen: list[int] = []
    tapq = emu.execute(Command(1, Instr.TAPQ, Q00, flag=True))
    assert tapq == emu.tapq(Q00, t_bit=True) and tapq.hwinfo is not None
    assert emu.execute(Command(2, Instr.TAPQ, Q00)).hwinfo is None  # T bit off
    assert emu.execute(Command(3, Instr.AQIC, Q00, flag=True), seen.append).status.irq_enabled
    assert emu.execute(Command(4, Instr.NQAP, Q00, 0x77, mex(5))).status.rc == RC.NORMAL
    emu.clock.run_until_idle()
    assert seen == [Q00]  # the notify an enabling AQIC registered
    res = emu.execute(Command(5, Instr.DQAP, Q00))
    assert res.psmid == 0x77 and result_int(res) == pow(5, 65537, key().n)
    assert emu.execute(Command(6, Instr.NQAP, Q00, 1, mex(5), special=True)).status.rc == RC.REQ_FAC_NOT_INST
    assert not emu.execute(Command(7, Instr.AQIC, Q00, flag=False), seen.append).status.irq_enabled
    assert emu.execute(Command(8, Instr.RAPQ, Q00)).status.rc == RC.NORMAL
    assert emu.execute(Command(9, Instr.ZAPQ, Q00)).status.rc == RC.RESET_IN_PROGRESS


# --- AQIC ---------------------------------------------------------------------------------------


def test_aqic_interrupts_on_reply(small_exact: Emulator) -> None:
    emu = small_exact
    seen: list[tuple[int, float]] = []
    r = emu.aqic(Q00, True, lambda qid: seen.append((qid, emu.clock.now())))
    assert r.status.rc == RC.NORMAL and r.status.irq_enabled
    assert emu.tapq(Q00).status.irq_enabled
    fill(emu, Q00, [1])
    fill(emu, Q01, [2])  # no interrupts for Q01
    emu.clock.run_until_idle()
    assert seen == [(Q00, pytest.approx(MEX_1K))]
    assert emu.aqic(Q00, False).status.irq_enabled is False
    fill(emu, Q00, [3])
    emu.clock.run_until_idle()
    assert len(seen) == 1


def test_aqic_notify_can_dequeue(small_exact: Emulator) -> None:
    emu = small_exact
    got: list[int] = []
    emu.aqic(Q00, True, lambda qid: got.extend(r.psmid for r in drain(emu, qid)))
    fill(emu, Q00, range(1, 5))
    emu.clock.run_until_idle()
    assert sorted(got) == [1, 2, 3, 4]


def test_aqic_inline_completion_interrupts_from_the_clock() -> None:
    emu = Emulator("fast")
    q = qid_of(1, 2)
    seen: list[int] = []
    emu.aqic(q, True, seen.append)
    emu.nqap(q, 1, mex(3))
    assert seen == []  # never from inside the NQAP call
    emu.clock.run_until_idle()
    assert seen == [q]


def test_one_interruption_stands_for_every_reply_until_the_queue_is_read(small_exact: Emulator) -> None:
    """The queue's notification indicator: set by the first reply, cleared by the host's next DQAP
    of the queue (whatever it finds).  Replies that arrive meanwhile raise nothing more; the read
    finds them (its status says more wait)."""
    emu = small_exact
    seen: list[int] = []
    emu.aqic(Q00, True, seen.append)
    fill(emu, Q00, [1])
    emu.clock.run_until_idle()
    assert seen == [Q00]
    fill(emu, Q00, [2, 3])
    emu.clock.run_until_idle()
    assert seen == [Q00]  # not read since: still pending
    first = emu.dqap(Q00)
    assert first.psmid == 1 and first.status.replies_waiting  # the read sees the rest wait
    assert [r.psmid for r in drain(emu, Q00)] == [2, 3]
    fill(emu, Q00, [4])
    emu.clock.run_until_idle()
    assert seen == [Q00, Q00]  # read since: raised again
    assert emu.dqap(Q00).psmid == 4
    # a DQAP that finds the queue dry clears it too
    fill(emu, Q00, [5])
    emu.clock.run_until_idle()
    assert len(seen) == 3
    assert [r.psmid for r in drain(emu, Q00)] == [5]
    assert emu.dqap(Q00).status.rc == NO_PENDING_REPLY
    fill(emu, Q00, [6])
    emu.clock.run_until_idle()
    assert len(seen) == 4


def test_an_interruption_read_before_it_is_delivered_is_dropped() -> None:
    emu = Emulator("fast")  # zero service time: the reply is ready when the NQAP returns
    q = qid_of(1, 2)
    seen: list[int] = []
    emu.aqic(q, True, seen.append)
    emu.nqap(q, 1, mex(3))
    assert emu.dqap(q).psmid == 1  # read before the interrupt is delivered (from the clock)
    emu.clock.run_until_idle()
    assert seen == []
    emu.nqap(q, 2, mex(4))  # not read: delivered
    emu.clock.run_until_idle()
    assert seen == [q]


def test_aqic_and_reset_clear_a_pending_interruption(small_exact: Emulator) -> None:
    emu = small_exact
    seen: list[int] = []
    emu.aqic(Q00, True, seen.append)
    fill(emu, Q00, [1])
    emu.clock.run_until_idle()
    assert seen == [Q00]
    emu.aqic(Q00, True, seen.append)  # registered again (a host whose link came back): cleared
    fill(emu, Q00, [2])
    emu.clock.run_until_idle()
    assert seen == [Q00, Q00]
    emu.rapq(Q00)  # the reset discards the replies and the pending interruption with them
    emu.clock.run_until_idle()
    emu.aqic(Q00, True, seen.append)
    fill(emu, Q00, [3])
    emu.clock.run_until_idle()
    assert seen == [Q00, Q00, Q00]


@pytest.mark.parametrize("seed", range(12))
def test_a_host_that_reads_only_on_interrupts_gets_every_reply(seed: int) -> None:
    """The liveness the indicator must keep, judged by the host's own count: a host that reads only
    when interrupted (DQAP until a status says nothing waits), after a random delay, with requests
    arriving in random bursts, is left with no reply unread and no request unanswered."""
    import random

    from emulator import load_profile

    rng = random.Random(seed)
    emu = Emulator(load_profile("small"), seed=seed)
    got: list[int] = []
    interrupts = 0
    reads = 0

    def read() -> None:
        nonlocal reads
        reads += 1
        while True:
            r = emu.dqap(Q00)
            if r.status.rc != RC.NORMAL:
                return
            got.append(r.psmid)
            if not r.status.replies_waiting:
                return

    def on_interrupt(qid: int) -> None:
        nonlocal interrupts
        interrupts += 1
        emu.clock.call_later(rng.choice([0.0, 50e-6, 400e-6, 2e-3]), read)

    emu.aqic(Q00, True, on_interrupt)
    sent = 0
    for _ in range(60):
        for _ in range(rng.randint(1, 4)):
            if emu.nqap(Q00, sent + 1, mex(sent + 3)).status.rc == RC.NORMAL:
                sent += 1
        emu.clock.advance(rng.choice([0.0, 100e-6, 300e-6, 1e-3]))
    emu.clock.run_until_idle()
    assert sorted(got) == list(range(1, sent + 1))  # each once, none left behind
    assert emu.dqap(Q00).status.rc == NO_PENDING_REPLY
    assert interrupts <= reads and interrupts < sent  # coalesced: fewer interrupts than replies


class _LateClock(VirtualClock):
    """A virtual clock whose callbacks each run ``LATE`` after their time, as a wall clock's do when
    the thread that runs them is busy elsewhere -- but deterministically."""

    LATE = 1e-3

    def step(self) -> bool:
        when = self.next_deadline()
        if when is not None:
            self._now = max(self._now, when + self.LATE)
        return super().step()


def test_an_engine_keeps_its_service_times_when_its_completions_run_late() -> None:
    """On the card's time an engine finishes when its service time is over and takes its next
    message then (or when that message came, if later) -- however late the emulator's thread gets
    to it -- so the host's lateness never stretches the card's service times."""
    from dataclasses import replace

    from emulator import load_profile

    p = load_profile("small")
    clock = _LateClock()
    emu = Emulator(replace(p, timing=replace(p.timing, jitter=0.0)), clock=clock, seed=7)
    assert fill(emu, Q00, range(1, 7)) == [RC.NORMAL] * 6  # 2 engines: 3 each, back to back
    late: list[int] = []
    clock.call_at(0.5e-3, lambda: late.append(emu.nqap(Q00, 7, mex(9)).status.rc))  # runs at 1.5 ms
    clock.run_until_idle()
    assert late == [RC.NORMAL]
    log = {e.psmid: e for e in emu.execution_log.entries()}
    for e in log.values():
        assert e.outcome == "completed" and e.started >= e.enqueued
        assert e.ended - e.started == pytest.approx(MEX_1K)
    for engine in (0, 1):
        runs = sorted((e.started, e.ended) for e in log.values() if e.engine == engine)
        assert all(a[1] <= b[0] for a, b in pairwise(runs))  # one message at a time
    ends = sorted(log[p].ended for p in range(1, 7))
    assert ends == pytest.approx([MEX_1K] * 2 + [2 * MEX_1K] * 2 + [3 * MEX_1K] * 2)  # not 1.3, 2.6, ...
    assert log[7].started == pytest.approx(1.5e-3)  # came after the engines were free: starts then
    assert clock.now() > 3 * (MEX_1K + _LateClock.LATE)  # the callbacks did run late
    replies = {r.psmid: r for r in drain(emu, Q00)}
    assert sorted(replies) == [1, 2, 3, 4, 5, 6, 7]
    assert result_int(replies[7]) == pow(9, E, key().n)


def test_rapq_disables_interrupts(small: Emulator) -> None:
    seen: list[int] = []
    small.aqic(Q00, True, seen.append)
    small.rapq(Q00)
    small.clock.run_until_idle()
    fill(small, Q00, [1])
    small.clock.run_until_idle()
    assert seen == [] and not small.tapq(Q00).status.irq_enabled
