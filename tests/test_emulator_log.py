"""The execution log (ground truth for the driver's verdicts), seeded replay, stats, lifecycle tables."""

from __future__ import annotations

import pytest

from apformats.messages import build_cprb, parse_reply
from apformats.results import Instr, qid_of
from emulator import Emulator, Execution
from emulator.execution_log import OUTCOMES
from emulator.lifecycle import CARD_GATE, CARD_TRANSITIONS, QUEUE_GATE, CardEvent, CardState, QueueState
from tests._fixtures_emulator import Q00, Q01, Q10, Q11, counter_increment, drain, fill, small_exact

__all__ = ["small_exact"]

MEX_1K = 300e-6


def test_entry_follows_the_message(small_exact: Emulator) -> None:
    emu = small_exact
    log = emu.execution_log
    fill(emu, Q00, [1, 2, 3])
    assert [e.outcome for e in log.entries()] == ["running", "running", "queued"]
    assert not log.started(3) and log.started(1)
    emu.clock.run_until_idle()
    drain(emu, Q00)
    e1, e2, e3 = log.entries()
    assert e3 == Execution(
        psmid=3,
        qid=Q00,
        engine=0,
        function="MEX_1K",
        enqueued=0.0,
        started=pytest.approx(MEX_1K),
        ended=pytest.approx(2 * MEX_1K),
        outcome="completed",
        reply_code=0,
        effect=None,
        dequeued=pytest.approx(2 * MEX_1K),
        seq=2,
    )
    assert e3.ran and (e1.engine, e2.engine) == (0, 1)


def test_a_psmid_sent_twice_has_two_entries(small_exact: Emulator) -> None:
    emu = small_exact
    fill(emu, Q00, [7])
    fill(emu, Q11, [7])
    emu.clock.run_until_idle()
    entries = emu.execution_log.for_psmid(7)
    assert [e.qid for e in entries] == [Q00, Q11]
    assert emu.execution_log.starts(7) == 2
    assert emu.execution_log.executions_started([7, 8]) == 2
    assert emu.execution_log.for_psmid(8) == [] and not emu.execution_log.started(8)


def test_effects_are_logged() -> None:
    emu = Emulator("default")
    q = qid_of(2, 3)
    emu.nqap(q, 1, counter_increment(3, 4))
    emu.clock.run_until_idle()
    (e,) = emu.execution_log.entries()
    assert e.function == "CPRB:CI" and e.outcome == "completed" and e.effect == "counter 0->4"
    assert e.ended - e.started == pytest.approx(4e-3, rel=0.06)


def test_by_outcome_counts_every_outcome(small_exact: Emulator) -> None:
    emu = small_exact
    fill(emu, Q00, [1, 2, 3, 4])
    emu.nqap(Q01, 5, b"\x00\x50junk")
    emu.clock.run_until(MEX_1K * 1.5)
    emu.control.machine_failure(0, 0.1)
    counts = emu.execution_log.by_outcome()
    assert list(counts) == list(OUTCOMES)
    assert counts["completed"] + counts["error"] == 2
    assert counts["in-process-failed"] == 2 and counts["pending-failed"] == 1


# --- seeded replay ------------------------------------------------------------------------------


def _scenario(seed: int) -> tuple[list[Execution], list[tuple[int, bytes]]]:
    """Jittered service times, random bytes, a probabilistic fault and a machine failure."""
    emu = Emulator("default", seed=seed)
    a, c = qid_of(0, 1), qid_of(2, 2)
    emu.control.fail_request(0x90, qid=a, probability=0.3)
    emu.control.machine_failure(1, recovery_time=0.05, after_requests=6)
    replies: list[tuple[int, bytes]] = []
    for rnd in range(4):
        for i in range(6):
            psmid = rnd * 100 + i
            emu.nqap(a, psmid, _mex(psmid))
            emu.nqap(qid_of(1, i % 4), psmid + 50, _mex(psmid))
            emu.nqap(c, psmid + 70, build_cprb("RL", 2, (16).to_bytes(2, "big")))
        emu.clock.advance(0.002)
        for q in (a, c, *(qid_of(1, d) for d in range(4))):
            replies.extend((r.psmid, r.reply) for r in drain(emu, q))
    emu.clock.run_until_idle()
    for q in emu.qids():
        replies.extend((r.psmid, r.reply) for r in drain(emu, q))
    return emu.execution_log.entries(), replies


def _mex(x: int) -> bytes:
    from tests._fixtures_emulator import mex

    return mex(x + 2)


def test_same_seed_same_execution_log() -> None:
    log1, replies1 = _scenario(42)
    log2, replies2 = _scenario(42)
    assert log1 == log2 and replies1 == replies2
    outcomes = {e.outcome for e in log1}
    assert {"completed", "error", "in-process-failed", "pending-failed"} <= outcomes


def test_different_seed_different_run() -> None:
    log1, replies1 = _scenario(1)
    log2, replies2 = _scenario(2)
    assert [(e.started, e.ended) for e in log1] != [(e.started, e.ended) for e in log2]
    rng1 = [r for p, r in replies1 if p % 100 >= 70 and parse_reply(r).kind == "ok"]
    rng2 = [r for p, r in replies2 if p % 100 >= 70 and parse_reply(r).kind == "ok"]
    assert rng1 and rng1 != rng2


# --- stats --------------------------------------------------------------------------------------


def test_stats_utilisation_on_the_virtual_clock(small_exact: Emulator) -> None:
    emu = small_exact
    fill(emu, Q00, range(8))
    fill(emu, Q01, range(10, 14))
    emu.clock.advance(MEX_1K)
    s = emu.stats()
    c0, c1 = s.card(0), s.card(1)
    assert (c0.type, c0.mode, c0.state, c0.engines, c0.engines_busy) == ("CEX8A", "accel", "normal", 2, 2)
    assert c0.requests == 12 and c0.held == 12 and c0.utilisation == pytest.approx(1.0)
    assert c1.utilisation == 0.0 and s.utilisation == pytest.approx(0.5)
    q = s.queue(Q00)
    assert (q.name, q.requests, q.held, q.slots, q.waiting, q.running, q.replies) == (
        "00.0000",
        8,
        8,
        8,
        5,
        1,
        2,
    )
    emu.clock.run_until_idle()  # 12 x 0.3 ms on 2 engines: busy the whole 1.8 ms
    assert emu.stats().card(0).utilisation == pytest.approx(1.0)
    emu.clock.advance(1.8e-3)
    assert emu.stats().card(0).utilisation == pytest.approx(0.5)
    assert emu.stats().queue(Q10).state == "operating"


def test_stats_show_recovery_and_stored_replies(small_exact: Emulator) -> None:
    emu = small_exact
    fill(emu, Q10, range(4))
    emu.control.machine_failure(1, 0.1)
    s = emu.stats()
    assert s.card(1).state == "recovering" and s.queue(Q10).stored == 4 and s.queue(Q10).held == 4


# --- the lifecycle tables -----------------------------------------------------------------------


def test_card_table_has_every_cell() -> None:
    assert set(CARD_TRANSITIONS) == set(CardState)
    for state, row in CARD_TRANSITIONS.items():
        assert set(row) == set(CardEvent), state
        for next_state, action in row.values():
            assert isinstance(next_state, CardState)
            assert action is None or callable(getattr(Emulator, f"_act_{action}"))


def test_gates_cover_every_instruction() -> None:
    assert set(CARD_GATE) == set(CardState) and set(QUEUE_GATE) == set(QueueState)
    for row in (*CARD_GATE.values(), *QUEUE_GATE.values()):
        assert set(row) == set(Instr)
    assert [i for i, rc in CARD_GATE[CardState.RECOVERING].items() if rc is None] == [Instr.DQAP]


def test_lszcrypt_listing(small_exact: Emulator) -> None:
    emu = small_exact
    fill(emu, Q10, range(3))
    emu.control.machine_failure(0, 0.1)
    emu.rapq(Q11)
    lines = emu.stats().lszcrypt().splitlines()
    assert lines[0].split() == ["CARD.DOM", "TYPE", "MODE", "STATUS", "REQUESTS", "PENDING", "QDEPTH"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert rows["00"] == ["CEX8A", "Accelerator", "recovering", "0", "0", "8"]
    assert rows["01"] == ["CEX8A", "Accelerator", "online", "3", "3", "8"]
    assert rows["01.0000"][2:] == ["online", "3", "3", "8"]
    assert rows["01.0001"][2] == "resetting"
