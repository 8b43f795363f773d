"""Fault scenarios on the simulation runner: the driver core and the emulator on one virtual clock.

Every scenario is deterministic (seeded emulator, jitter off, virtual time) and checks the driver's
verdicts against the emulator's execution log -- what actually ran -- not against the driver's own
account: slots kept full under a backlog (engine utilisation measured on the virtual clock against
a naive one-request-at-a-time loop), every response code the emulator can produce reaching its
action, machine failure with running and waiting requests, checkstop and restore, failures during
recovery, every queue of a kind lost, deadlines.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from apcrypto.core.ledger import Outcome
from apcrypto.core.queue import QState
from apcrypto.errors import (
    BadRequest,
    DeadlineExceeded,
    DeviceUnavailable,
    Indeterminate,
)
from apcrypto.requests import CounterIncrement, KeyStore, RandomBytes, Request
from apcrypto.runners.sim import SimClient, SimRunner
from apformats import messages as msgs
from apformats.codes import MachineFailureState as MF
from apformats.codes import ReplyCode as RY
from apformats.codes import ResponseCode as RC
from apformats.results import qid_of, qid_str
from emulator import Emulator
from emulator.core import INSTRUCTIONS
from tests._fixtures_driver import (
    check_verdicts,
    crt_request,
    exact_profile,
    expected_crt,
    expected_me,
    key,
    make_sim,
    me_request,
    outcome_of,
)
from tests._fixtures_emulator import E

K1 = key(1024)
K2 = key(2048)
Q00, Q01, Q10, Q11 = qid_of(0, 0), qid_of(0, 1), qid_of(1, 0), qid_of(1, 1)
ACCEL_CARDS = (0, 1)
CCA_CARDS = (2, 3)


def states(sim: SimRunner) -> dict[int, QState]:
    return {q.qid: q.state for q in sim.core.queues.values()}


def run_until(sim: SimRunner, cond: Callable[[], bool], limit: float = 5.0) -> float:
    """Step the simulation until ``cond()`` holds; returns the virtual time it took."""
    t0 = sim.now()
    while not cond():
        assert sim.now() - t0 < limit, f"condition not reached within {limit} s of virtual time"
        assert sim.step(), "simulation stalled"
    return sim.now() - t0


def all_in_service(sim: SimRunner) -> bool:
    return all(s.in_service for s in states(sim).values())


def engine_busy(emu: Emulator, cards: tuple[int, ...]) -> tuple[float, int]:
    st = emu.stats()
    sel = [c for c in st.cards if c.card in cards]
    return sum(c.busy_time for c in sel), sum(c.engines for c in sel)


@pytest.fixture
def small() -> tuple[Emulator, SimRunner]:
    emu, sim = make_sim(exact_profile("small"), seed=11)
    yield emu, sim
    sim.shutdown()


@pytest.fixture
def full() -> tuple[Emulator, SimRunner]:
    """The default topology: 2 accelerators (cards 0-1) and 2 CCA coprocessors (cards 2-3)."""
    emu, sim = make_sim(exact_profile("default"), seed=12)
    yield emu, sim
    sim.shutdown()


# --- keeping the slots full -----------------------------------------------------------------------


def naive_utilisation(profile: Any, n: int, k: Any) -> float:
    """One request at a time, straight on the emulator (no driver): NQAP, wait, DQAP, next.

    The waiting is ideal (the clock jumps to the reply, no polling delay), so this is the best a
    one-at-a-time driver can do."""
    emu = Emulator(profile, seed=1)
    qid = emu.qids()[0]
    cards = ACCEL_CARDS
    busy0, engines = engine_busy(emu, cards)
    t0 = emu.clock.now()
    for i in range(n):
        r = emu.nqap(qid, i + 1, me_request(i + 2, k).message(0))
        assert r.status.rc == RC.NORMAL
        while (d := emu.dqap(qid)).status.rc != RC.NORMAL:
            assert emu.clock.step()
        assert msgs.parse_reply(d.reply).result[-k.size :] == expected_me(i + 2, k)
    busy1, _ = engine_busy(emu, cards)
    return (busy1 - busy0) / (engines * (emu.clock.now() - t0))


@pytest.mark.parametrize(("profile", "n"), [("small", 600), ("default", 1200)])
def test_slots_stay_full_under_backlog_and_engines_stay_busy(profile: str, n: int) -> None:
    """DESIGN §7: with a backlog, accelerator engines busy / available on the virtual clock, driver
    against the best possible one-request-at-a-time loop (1 / engines)."""
    prof = exact_profile(profile)
    emu, sim = make_sim(prof, seed=1)
    accel = [q for q in sim.core.queues.values() if q.mode == "accel"]
    busy0, engines = engine_busy(emu, ACCEL_CARDS)
    t0 = sim.now()
    futs = [sim.submit(me_request(i + 2, K2)) for i in range(n)]
    not_full = 0
    samples = 0
    while not all(f.done() for f in futs):
        assert sim.step()
        if sim.core.backlog_size:
            samples += 1
            not_full += sum(q.held != q.slots for q in accel)
    elapsed = sim.now() - t0
    busy1, _ = engine_busy(emu, ACCEL_CARDS)
    driver = (busy1 - busy0) / (engines * elapsed)
    assert [f.result() for f in futs] == [expected_me(i + 2, K2) for i in range(n)]
    naive = naive_utilisation(prof, 50, K2)
    print(f"{profile}: engine utilisation driver {driver:.3f}, naive one-at-a-time {naive:.3f}")
    assert samples > n / 4 and not_full == 0  # every slot of every queue taken while work waits
    assert driver >= 0.9
    assert naive == pytest.approx(1 / engines)  # one engine of the accelerators' busy at a time
    assert driver >= 3 * naive
    # the driver's own slot-occupancy integral agrees: the queues held their slots most of the time
    st = sim.core.stats()["queues"]
    assert all(st[qid_str(q.qid)]["slot_utilisation"] > 0.5 for q in accel)
    sim.shutdown()


def test_mixed_backlog_on_the_default_topology() -> None:
    """ME, CRT and CPRBs at once: each kind on its own cards, every result right, all engines busy."""
    emu, sim = make_sim(exact_profile("default"), seed=2)
    busy0, engines = engine_busy(emu, ACCEL_CARDS)
    t0 = sim.now()
    me = [sim.submit(me_request(i + 2, K1)) for i in range(300)]
    crt = [sim.submit(crt_request(i + 2, K1)) for i in range(100)]
    ci = [sim.submit(CounterIncrement(1)) for _ in range(64)]
    sim.run_until_settled(me + crt + ci)
    busy1, _ = engine_busy(emu, ACCEL_CARDS)
    assert (busy1 - busy0) / (engines * (sim.now() - t0)) > 0.5  # CCA work takes longer; accel idles after
    assert [f.result() for f in me] == [expected_me(i + 2, K1) for i in range(300)]
    assert [f.result() for f in crt] == [expected_crt(i + 2, K1) for i in range(100)]
    # every increment ran exactly once: the per-domain counters add up, values never repeat per store
    assert sum(emu.stores[(c, d)].counter for c in CCA_CARDS for d in range(4)) == 64
    by_store = Counter(
        (e.qid, v) for e, v in zip(cci_execs(emu, sim, ci), (f.result() for f in ci), strict=True)
    )
    assert max(by_store.values()) == 1
    on = Counter(e.qid >> 8 for e in emu.execution_log.entries())
    assert set(on) == {0, 1, 2, 3}
    check_verdicts(sim, emu)
    sim.shutdown()


def cci_execs(emu: Emulator, sim: SimRunner, futs: list) -> list:
    """The execution of each CounterIncrement future's (only) attempt, in submit order."""
    recs = sorted(
        (r for r in sim.core.ledger.records.values() if isinstance(r.request, CounterIncrement)),
        key=lambda r: r.rid,
    )
    assert len(recs) == len(futs)
    return [emu.execution_log.for_psmid(r.attempts[-1].psmid)[-1] for r in recs]


# --- each response code the emulator produces reaches its action ----------------------------------


def test_busy_queue_enters_recovery_wait_and_work_goes_elsewhere(small) -> None:
    emu, sim = small
    emu.control.busy(Q00, 0.2)
    t0 = sim.now()
    futs = [sim.submit(me_request(i + 2, K1), idempotent=False) for i in range(40)]
    sim.run_until_settled(futs)
    took = sim.now() - t0
    assert [f.result() for f in futs] == [expected_me(i + 2, K1) for i in range(40)]
    assert states(sim)[Q00] is QState.RECOVERY_WAIT  # BUSY: waiting, draining, not erroring
    assert took < 0.05  # the other three queues did the work; nobody waited out the busy period
    c = sim.core.ledger.counters
    assert c["bounced"] >= 1 and c["recoveries"] == 1 and c["redriven"] == 0
    assert not any(e.qid == Q00 and e.enqueued >= t0 for e in emu.execution_log.entries())
    run_until(sim, lambda: all_in_service(sim))  # comes back once the card answers again
    assert sim.now() - t0 == pytest.approx(0.2, abs=0.05)
    check_verdicts(sim, emu)


def test_external_reset_discards_held_work_and_the_ledger_decides(small) -> None:
    emu, sim = small
    idem = [sim.submit(me_request(i + 2, K2)) for i in range(16)]
    state_changing = [sim.submit(me_request(i + 100, K2), idempotent=False) for i in range(16)]
    emu.control.reset_in_progress(Q00, 0.01, at=sim.now() + 0.0005)
    futs = idem + state_changing
    sim.run_until_settled(futs)
    assert sim.core.ledger.counters["external_resets"] == 1
    for i, f in enumerate(idem):
        assert f.result() == expected_me(i + 2, K2)  # idempotent: re-driven where needed
    lost = [f for f in state_changing if f.exception() is not None]
    assert lost, "the reset should have caught some state-changing work on the card"
    for f in lost:
        err = f.exception()
        assert isinstance(err, Indeterminate) and err.qid == Q00
    discarded = [e for e in emu.execution_log.entries() if e.outcome == "discarded"]
    assert discarded and all(e.qid == Q00 for e in discarded)
    check_verdicts(sim, emu, card_may_die=True)
    run_until(sim, lambda: all_in_service(sim))


class OverstatedDepth:
    """The emulator behind a TAPQ that claims twice the slots the queues have (a lying card, or
    another user of the same queue): the card answers Q_FULL long before the driver expects."""

    def __init__(self, emu: Emulator) -> None:
        self._emu = emu

    def __getattr__(self, name: str) -> Any:
        return getattr(self._emu, name)

    def execute(self, command: Any, notify: Any = None) -> Any:
        """The emulator's one instruction entry, dispatched on this wrapper (so TAPQ is the lie)."""
        return INSTRUCTIONS[command.instr](self, command, notify)  # type: ignore[arg-type]

    def tapq(self, qid: int, t_bit: bool = True) -> Any:
        r = self._emu.tapq(qid, t_bit)
        if r.hwinfo is None:
            return r
        return replace(r, hwinfo=replace(r.hwinfo, qd=2 * r.hwinfo.qd + 1))


def test_q_full_from_the_card_is_backpressure() -> None:
    emu = Emulator(exact_profile("small"), seed=3)
    sim = SimRunner(OverstatedDepth(emu))
    run_until(sim, lambda: all_in_service(sim))
    assert all(q.slots == 16 for q in sim.core.queues.values())
    futs = [sim.submit(me_request(i + 2, K1), idempotent=False) for i in range(200)]
    sim.run_until_settled(futs)
    assert [f.result() for f in futs] == [expected_me(i + 2, K1) for i in range(200)]
    c = sim.core.ledger.counters
    assert c["bounced"] >= 4 * 8  # the card refused the second half of every first batch
    assert c["redriven"] == 0 and c.get("offlined", 0) == 0
    assert all(e.outcome == "completed" for e in emu.execution_log.entries())
    assert len(emu.execution_log.entries()) == 200 + 4  # + the bring-up probes; nothing twice
    assert all_in_service(sim)
    check_verdicts(sim, emu)
    sim.shutdown()


def test_message_too_big_fails_the_caller(full) -> None:
    emu, sim = full
    fut = sim.submit(KeyStore(1, bytes(13 * 1024)))
    ok = sim.submit(KeyStore(2, b"k" * 32))
    sim.run_until_settled([fut, ok])
    err = fut.exception()
    assert isinstance(err, BadRequest) and err.response_code == RC.MESSAGE_TOO_BIG
    assert ok.result() is None
    assert sim.core.ledger.records[1].outcome is Outcome.FAILED
    assert all_in_service(sim)
    assert [e.function for e in emu.execution_log.entries()].count("CPRB:KS") == 1  # never reached a card


class WrongDomainCprb(CounterIncrement):
    """A CPRB that names a domain other than the queue it is sent to."""

    def message(self, domain: int) -> bytes:
        return super().message((domain + 1) % 4)


def test_wrong_domain_reply_fails_the_caller(full) -> None:
    emu, sim = full
    fut = sim.submit(WrongDomainCprb(1))
    sim.run_until_settled([fut])
    err = fut.exception()
    assert isinstance(err, BadRequest) and err.reply_code == RY.INVALID_DOMAIN_PENDING
    assert sum(s.counter for s in emu.stores.values()) == 0
    assert all_in_service(sim)


class ControlDomainToo:
    """The emulator with a control-only domain listed among the usage queues: NQAP there answers
    INVALID_DOMAIN (0x42)."""

    def __init__(self, emu: Emulator, extra: list[int]) -> None:
        self._emu, self._extra = emu, extra

    def __getattr__(self, name: str) -> Any:
        return getattr(self._emu, name)

    def qids(self) -> list[int]:
        return sorted(self._emu.qids() + self._extra)


def test_unusable_apqns_are_taken_offline_and_the_rest_serve() -> None:
    """A control-only domain (NQAP → 0x42), a missing domain (0x06) and a missing card (0x01)."""
    emu = Emulator(exact_profile("default"), seed=4)
    ctl, missing_dom, missing_card = qid_of(0, 4), qid_of(1, 9), qid_of(7, 0)
    sim = SimRunner(ControlDomainToo(emu, [ctl, missing_dom, missing_card]))
    bad = (ctl, missing_dom, missing_card)
    run_until(sim, lambda: all(s is QState.OFFLINE for q, s in states(sim).items() if q in bad), 10.0)
    assert all(s.in_service for q, s in states(sim).items() if q not in bad)
    futs = [sim.submit(me_request(i + 2, K1)) for i in range(100)]
    sim.run_until_settled(futs)
    assert [f.result() for f in futs] == [expected_me(i + 2, K1) for i in range(100)]
    assert not [e for e in emu.execution_log.entries() if e.qid in bad]
    sim.shutdown()


def test_checkstop_with_work_outstanding_and_restore(small) -> None:
    emu, sim = small
    idem = [sim.submit(me_request(i + 2, K2)) for i in range(24)]
    state_changing = [sim.submit(me_request(i + 100, K2), idempotent=False) for i in range(24)]
    emu.control.checkstop(0, at=sim.now() + 0.0005)
    sim.run_until_settled(idem + state_changing)
    assert states(sim)[Q00] is QState.OFFLINE and states(sim)[Q01] is QState.OFFLINE
    assert "CHECKSTOPPED" in sim.core.queues[Q00].offline_reason
    for i, f in enumerate(idem):
        assert f.result() == expected_me(i + 2, K2)  # re-driven to card 1
    on_card0 = {e.psmid for e in emu.execution_log.entries() if e.qid >> 8 == 0}
    for f in state_changing:
        err = f.exception()
        if err is None:
            continue
        # sent and unanswered: it may have run
        assert isinstance(err, Indeterminate) and err.qid >> 8 == 0 and err.psmid in on_card0
    assert sum(isinstance(f.exception(), Indeterminate) for f in state_changing) >= 1
    assert sum(f.exception() is None for f in state_changing) >= 1
    seen = check_verdicts(sim, emu, card_may_die=True)
    assert seen["discarded"] >= 1
    # restore: the queues come back by themselves (offline re-probe), and serve again
    sim.run(sim.now() + 0.3)
    assert states(sim)[Q00] is QState.OFFLINE
    emu.control.restore(0)
    took = run_until(sim, lambda: all_in_service(sim))
    assert took <= sim.core.cfg.offline_probe_max + 0.1
    t_on = sim.now()
    more = [sim.submit(me_request(i + 2, K1)) for i in range(64)]
    sim.run_until_settled(more)
    used = {e.qid for e in emu.execution_log.entries() if e.enqueued >= t_on}
    assert {Q00, Q01} <= used


def test_deconfigure_is_a_dead_card_too(small) -> None:
    emu, sim = small
    futs = [sim.submit(me_request(i + 2, K2), idempotent=False) for i in range(32)]
    emu.control.deconfigure(1, at=sim.now() + 0.0005)
    sim.run_until_settled(futs)
    assert states(sim)[Q10] is QState.OFFLINE and "DECONFIGURED" in sim.core.queues[Q10].offline_reason
    assert any(isinstance(f.exception(), Indeterminate) for f in futs)
    check_verdicts(sim, emu, card_may_die=True)
    emu.control.restore(1)
    run_until(sim, lambda: all_in_service(sim))


@pytest.mark.parametrize(
    "code",
    [RY.OPERAND_INVALID, RY.MALFORMED_MSG, RY.INVALID_MSG_LEN, RY.KEY_TYPE, RY.EVEN_MOD_IN_OPND],
)
def test_fail_request_malformed_fails_the_caller(small, code: int) -> None:
    emu, sim = small
    emu.control.fail_request(code, qid=Q01, nth=2)
    futs = [sim.submit(me_request(i + 2, K1)) for i in range(40)]
    sim.run_until_settled(futs)
    failed = [f for f in futs if f.exception() is not None]
    assert len(failed) == 1
    err = failed[0].exception()
    assert isinstance(err, BadRequest) and err.reply_code == code and err.qid == Q01
    assert sim.core.ledger.outcomes["failed"] == 1 and sim.core.ledger.counters["redriven"] == 0
    assert all_in_service(sim)
    check_verdicts(sim, emu)


@pytest.mark.parametrize("idempotent", [True, False])
def test_fail_request_machine_failure_reply(small, idempotent: bool) -> None:
    """A plain (Linux-style) machine-failure reply has no state byte: assume it may have run."""
    emu, sim = small
    emu.control.fail_request(RY.MACHINE_FAILURE, qid=Q10, nth=1)
    futs = [sim.submit(me_request(i + 2, K1), idempotent=idempotent) for i in range(20)]
    sim.run_until_settled(futs)
    bad = [f for f in futs if f.exception() is not None]
    if idempotent:
        assert not bad and sim.core.ledger.counters["redriven"] == 1
    else:
        assert len(bad) == 1
        err = bad[0].exception()
        assert isinstance(err, Indeterminate) and err.mf_state == MF.UNKNOWN and err.reply_code == 0x10
    assert sim.core.ledger.counters["recoveries"] == 1
    run_until(sim, lambda: all_in_service(sim))
    check_verdicts(sim, emu)


@pytest.mark.parametrize("code", [RY.TRANSPORT_FAIL, RY.PREEMPT_FAILURE])
def test_fail_request_retry_elsewhere_codes(small, code: int) -> None:
    """Card-side failures that may have run: idempotent work re-driven, state-changing indeterminate."""
    emu, sim = small
    emu.control.fail_request(code, qid=Q00, nth=1)
    emu.control.fail_request(code, qid=Q01, nth=1)
    b = [sim.submit(me_request(i + 2, K1), idempotent=False) for i in range(8)]
    a = [sim.submit(me_request(i + 2, K1)) for i in range(4)]
    sim.run_until_settled(a + b)
    assert all(f.exception() is None for f in a)
    assert sum(isinstance(f.exception(), Indeterminate) for f in b) >= 1
    assert all(s.in_service for s in states(sim).values())
    check_verdicts(sim, emu)


def test_fail_request_unknown_reply_code_is_safe_default(small) -> None:
    emu, sim = small
    emu.control.fail_request(0xEE, qid=Q11, nth=1)
    futs = [sim.submit(me_request(i + 2, K1)) for i in range(40)]
    sim.run_until_settled(futs)
    assert [f.result() for f in futs] == [expected_me(i + 2, K1) for i in range(40)]  # idempotent
    assert sim.core.ledger.counters["offlined"] == 1
    assert states(sim)[Q11] is QState.OFFLINE
    run_until(sim, lambda: all_in_service(sim))  # re-probed, back by itself
    check_verdicts(sim, emu)


def test_reply_timeout_resets_and_the_ledger_decides(small) -> None:
    """A card that stops answering without saying so (engines slowed past the reply timeout): the
    queue is reset; idempotent work is re-driven, state-changing work that had started is
    indeterminate, nothing is lost, and the queue comes back."""
    emu, sim = small
    emu.control.slow_engines(0, 20_000.0, duration=10.0)  # ME 2K: 8 s, past FAST's 2 s reply timeout
    idem = [sim.submit(me_request(i + 2, K2)) for i in range(16)]
    sc = [sim.submit(me_request(i + 50, K2), idempotent=False) for i in range(16)]
    sim.run_until_settled(idem + sc, max_time=30.0)
    assert sim.core.ledger.counters["reply_timeouts"] >= 1
    assert [f.result() for f in idem] == [expected_me(i + 2, K2) for i in range(16)]
    for f in sc:
        err = f.exception()
        assert err is None or (isinstance(err, Indeterminate) and err.qid >> 8 == 0), err
    assert any(isinstance(f.exception(), Indeterminate) for f in sc)
    check_verdicts(sim, emu, card_may_die=True)
    emu.control.clear()
    run_until(sim, lambda: all_in_service(sim))


# --- machine failure ----------------------------------------------------------------------------


def mf_workload(sim: SimRunner) -> tuple[list, list, list]:
    """Interleaved CCA work: state-changing increments, idempotent random bytes, increments the
    caller marked idempotent -- through the client's methods and their ``idempotent=`` keyword
    (the public surface), and through ``submit``, half each."""
    client = SimClient(sim)
    sc, rb, ci_idem = [], [], []
    for i in range(12):  # in pairs: dispatch alternates cards, so each card gets both kinds
        if i % 2:
            sc.extend(sim.submit(CounterIncrement(1)) for _ in range(2))
            ci_idem.extend(sim.submit(CounterIncrement(1), idempotent=True) for _ in range(2))
        else:
            sc.extend(client.counter_increment(1) for _ in range(2))
            ci_idem.extend(client.counter_increment(1, idempotent=True) for _ in range(2))
    for i in range(8):
        rb.append(client.random_bytes(16) if i % 2 else sim.submit(RandomBytes(16)))
    return sc, rb, ci_idem


def test_every_request_method_takes_idempotent(full) -> None:
    """The ``idempotent=`` keyword of every request method (a kept name of the public surface)
    reaches the ledger; without it, each request kind keeps its own default."""
    _emu, sim = full
    client = SimClient(sim)
    k = K2
    calls: dict[str, tuple[Callable[..., Any], bool]] = {
        "mod_expo": (lambda **kw: client.mod_expo(b"\x02", E, k.n, **kw), True),
        "mod_expo_crt": (lambda **kw: client.mod_expo_crt(b"\x02", k.p, k.q, k.dp, k.dq, k.qinv, **kw), True),
        "random_bytes": (lambda **kw: client.random_bytes(16, **kw), True),
        "counter_increment": (lambda **kw: client.counter_increment(1, **kw), False),
        "key_store": (lambda **kw: client.key_store(1, b"k" * 16, apqn=(2, 0), **kw), False),
        "key_read": (lambda **kw: client.key_read(1, apqn=(2, 0), **kw), True),  # what was stored
    }
    futures = []
    for name, (call, default) in calls.items():
        for kw, want in (({}, default), ({"idempotent": True}, True), ({"idempotent": False}, False)):
            futures.append(call(**kw))
            rec = sim.core.ledger.records[max(sim.core.ledger.records)]
            assert rec.idempotent is want, (name, kw)
    sim.run_until_settled(futures)
    assert all(f.exception() is None for f in futures)


def test_machine_failure_with_running_and_waiting_requests(full) -> None:
    emu, sim = full
    t0 = sim.now()
    sc, rb, ci_idem = mf_workload(sim)
    emu.control.machine_failure(2, recovery_time=0.05, at=t0 + 0.006)
    sim.run_until_settled(sc + rb + ci_idem)
    log = emu.execution_log
    recs = sim.core.ledger.records
    by_outcome = Counter(e.outcome for e in log.entries())
    assert by_outcome["in-process-failed"] == 4  # 4 engines were running
    # the other slots of card 2 were waiting (or held finished replies, which stay available)
    assert 20 <= by_outcome["pending-failed"] <= 4 * 8 - 4
    n_in_sc = n_in_idem = n_pending = 0
    for rec in recs.values():
        failed = [(a, log.for_psmid(a.psmid)) for a in rec.attempts]
        mf = [(a, e[0].outcome) for a, e in failed if e and e[0].outcome.endswith("-failed")]
        if not mf:
            assert rec.outcome is Outcome.COMPLETED
            continue
        ((att, what),) = mf
        assert att.qid >> 8 == 2
        if what == "in-process-failed" and not rec.idempotent:
            n_in_sc += 1
            assert rec.outcome is Outcome.INDETERMINATE and rec.attempts[-1] is att
            assert log.starts(att.psmid) == 1
        elif what == "in-process-failed":
            n_in_idem += 1
            assert rec.outcome is Outcome.COMPLETED and rec.redrives == 1
        else:
            n_pending += 1
            # re-driven exactly once, to the other CCA card, and it ran exactly once in all
            assert rec.outcome is Outcome.COMPLETED and rec.redrives == 1
            sent = [a for a in rec.attempts if a.fate != "bounced"]
            assert len(sent) == 2 and sent[1].qid >> 8 == 3
            assert sum(log.starts(a.psmid) for a in rec.attempts) == 1
    assert n_in_sc >= 1 and n_in_idem >= 1 and n_pending >= 20
    for f in sc:
        assert f.exception() is None or isinstance(f.exception(), Indeterminate)
    for f in sc:
        if isinstance(f.exception(), Indeterminate):
            err = f.exception()
            assert err.mf_state == MF.IN_PROCESS and err.reply_code == RY.MACHINE_FAILURE
            assert err.qid >> 8 == 2 and "machine failure" in str(err)
    assert all(len(f.result()) == 16 for f in rb)
    # the counters moved once per started increment: nothing ran twice behind the ledger's back
    starts = sum(1 for e in log.entries() if e.function == "CPRB:CI" and e.started is not None)
    assert sum(emu.stores[(c, d)].counter for c in CCA_CARDS for d in range(4)) == starts
    check_verdicts(sim, emu)
    # the failed card's queues drained the stored replies, reset and came back
    run_until(sim, lambda: all_in_service(sim))
    assert sim.core.ledger.counters["recoveries_drained"] == 4


def test_machine_failure_recovery_time_is_waited_out_not_reset(full) -> None:
    """The driver never resets a recovering card's queue (that would drop the stored replies)."""
    emu, sim = full
    sc, rb, ci_idem = mf_workload(sim)
    t_fail = sim.now() + 0.006
    emu.control.machine_failure(2, recovery_time=0.3, at=t_fail)
    sim.run_until_settled(sc + rb + ci_idem)
    assert sim.now() >= t_fail + 0.3  # the in-process ones were decided by the card's replies
    discarded = [e for e in emu.execution_log.entries() if e.outcome == "discarded"]
    assert not discarded
    check_verdicts(sim, emu)


def test_machine_failure_of_every_accelerator_waits_then_serves(small) -> None:
    """Recovering queues still count as alive: work waits for them rather than failing."""
    emu, sim = small
    futs = [sim.submit(me_request(i + 2, K2)) for i in range(64)]
    t = sim.now() + 0.001
    emu.control.machine_failure(0, recovery_time=0.1, at=t)
    emu.control.machine_failure(1, recovery_time=0.1, at=t)
    sim.run_until_settled(futs)
    assert [f.result() for f in futs] == [expected_me(i + 2, K2) for i in range(64)]
    assert sim.now() >= t + 0.1
    check_verdicts(sim, emu)


# --- failures during recovery -----------------------------------------------------------------


def test_second_machine_failure_during_recovery(full) -> None:
    emu, sim = full
    t0 = sim.now()
    sc, rb, ci_idem = mf_workload(sim)
    emu.control.machine_failure(2, recovery_time=0.05, at=t0 + 0.006)
    emu.control.machine_failure(2, recovery_time=0.05, at=t0 + 0.03)  # while recovering: no-op
    emu.control.machine_failure(3, recovery_time=0.05, at=t0 + 0.03)  # the other card, meanwhile
    sim.run_until_settled(sc + rb + ci_idem)
    check_verdicts(sim, emu)
    assert all(f.exception() is None or isinstance(f.exception(), Indeterminate) for f in sc)
    assert all(f.exception() is None for f in rb + ci_idem)
    run_until(sim, lambda: all_in_service(sim))


def test_machine_failure_after_the_queue_came_back(full) -> None:
    emu, sim = full
    sc, rb, ci_idem = mf_workload(sim)
    t0 = sim.now()
    emu.control.machine_failure(2, recovery_time=0.02, at=t0 + 0.006)
    sim.run_until_settled(sc[:4])
    run_until(sim, lambda: all_in_service(sim))
    more = [sim.submit(CounterIncrement(1)) for _ in range(48)]
    emu.control.machine_failure(3, recovery_time=0.02, at=sim.now() + 0.006)
    sim.run_until_settled(sc + rb + ci_idem + more)
    check_verdicts(sim, emu)
    run_until(sim, lambda: all_in_service(sim))


def test_checkstop_while_recovering_loses_the_stored_replies(full) -> None:
    emu, sim = full
    t0 = sim.now()
    sc, rb, ci_idem = mf_workload(sim)
    emu.control.machine_failure(2, recovery_time=0.2, at=t0 + 0.006)
    emu.control.checkstop(2, at=t0 + 0.05)
    sim.run_until_settled(sc + rb + ci_idem)
    assert all(states(sim)[qid_of(2, d)] is QState.OFFLINE for d in range(4))
    check_verdicts(sim, emu, card_may_die=True)  # pending ones the card can no longer vouch for
    assert all(f.exception() is None for f in rb + ci_idem)  # idempotent: re-driven to card 3
    bad = [f.exception() for f in sc if f.exception() is not None]
    assert bad and all(isinstance(e, Indeterminate) for e in bad)
    emu.control.restore(2)
    run_until(sim, lambda: all_in_service(sim))


def test_reset_in_progress_during_recovery(full) -> None:
    emu, sim = full
    t0 = sim.now()
    sc, rb, ci_idem = mf_workload(sim)
    emu.control.machine_failure(2, recovery_time=0.05, at=t0 + 0.006)
    emu.control.reset_in_progress(qid_of(2, 1), 0.02, at=t0 + 0.03)
    sim.run_until_settled(sc + rb + ci_idem)
    check_verdicts(sim, emu, card_may_die=True)
    run_until(sim, lambda: all_in_service(sim))


# --- every queue of a kind lost -------------------------------------------------------------------


def test_all_queues_of_a_kind_lost_is_device_unavailable(full) -> None:
    emu, sim = full
    me = [sim.submit(me_request(i + 2, K2)) for i in range(200)]
    ci = [sim.submit(CounterIncrement(1)) for _ in range(8)]
    t = sim.now() + 0.001
    emu.control.checkstop(0, at=t)
    emu.control.checkstop(1, at=t)
    sim.run_until_settled(me + ci)
    outs = Counter(type(outcome_of(f)).__name__ for f in me)
    assert outs["DeviceUnavailable"] >= 100  # the backlog
    assert set(outs) <= {"bytes", "DeviceUnavailable"}  # idempotent: never indeterminate
    for f in me:
        err = f.exception()
        if isinstance(err, DeviceUnavailable):
            assert "accel" in str(err)
    assert all(isinstance(f.result(), int) for f in ci)  # the CCA cards are untouched
    t_late = sim.now()
    late = sim.submit(me_request(5, K2))
    assert not late.done()  # every accel queue is offline: it waits the grace for one to come back
    sim.run_until_settled([late])
    assert isinstance(late.exception(), DeviceUnavailable)
    assert sim.now() - t_late >= sim.core.cfg.unavailable_grace - 1e-9
    still = sim.submit(CounterIncrement(1))
    sim.run_until_settled([still])
    assert isinstance(still.result(), int)
    check_verdicts(sim, emu, card_may_die=True)
    # one card back: the kind is available again
    emu.control.restore(1)
    run_until(sim, lambda: states(sim)[qid_of(1, 0)].in_service)
    again = sim.submit(me_request(5, K2))
    sim.run_until_settled([again])
    assert again.result() == expected_me(5, K2)


def test_every_queue_of_a_kind_offline_and_back_within_the_grace_serves_the_waiting_work(full) -> None:
    """Issue 8 §1: work that cannot be placed waits ``unavailable_grace`` even when every queue of
    its kind is offline; a card back (re-probed) within the grace serves it.  It used to end
    DeviceUnavailable at once, when the last queue of its kind went offline."""
    emu, sim = full
    grace = sim.core.cfg.unavailable_grace
    me = [sim.submit(me_request(i + 2, K2)) for i in range(200)]
    t = sim.now() + 0.001
    emu.control.checkstop(0, at=t)
    emu.control.checkstop(1, at=t)
    run_until(sim, lambda: all(s is QState.OFFLINE for q, s in states(sim).items() if q >> 8 in ACCEL_CARDS))
    waiting = [f for f in me if not f.done()]
    assert len(waiting) >= 100  # the backlog, still waiting although no accel queue is left
    t_off = sim.now()
    emu.clock.call_at(t_off + grace / 4, lambda: emu.control.restore(1))
    sim.run_until_settled(me)
    assert sim.now() - t_off < grace  # served, not timed out
    for i, f in enumerate(me):
        if f in waiting:
            assert f.result() == expected_me(i + 2, K2)
    check_verdicts(sim, emu, card_may_die=True)


def test_redrive_budget_is_bounded_by_a_card_that_never_runs_it() -> None:
    """A request the card bounces with "message type" each time (CPRB on accelerators, by a request
    lying about its mode) is re-driven at most max_redrives times, then unavailable."""

    class LyingMode(Request):
        mode = "accel"
        idempotent_default = False
        function = "CPRB:CI"

        def message(self, domain: int) -> bytes:
            return msgs.build_cprb("CI", domain, (1).to_bytes(8, "big"))

        def decode(self, reply: Any) -> Any:
            return reply.result

    emu, sim = make_sim(exact_profile("small"), seed=5)
    fut = sim.submit(LyingMode())
    sim.run_until_settled([fut])
    err = fut.exception()
    assert isinstance(err, DeviceUnavailable) and "budget" in str(err)
    rec = sim.core.ledger.records[1]
    assert rec.redrives == sim.core.cfg.max_redrives
    assert len(emu.execution_log.entries()) - 4 == sim.core.cfg.max_redrives + 1
    assert all(e.reply_code == RY.MESSAGE_TYPE for e in emu.execution_log.entries()[4:])
    sim.shutdown()


# --- deadlines --------------------------------------------------------------------------------


def test_deadline_while_queued_never_runs(small) -> None:
    _, sim = small
    backlog = [sim.submit(me_request(i + 2, K2)) for i in range(200)]
    late = sim.submit(me_request(7, K2), deadline=0.001)
    sim.run_until_settled([*backlog, late])
    err = late.exception()
    assert isinstance(err, DeadlineExceeded) and err.may_have_run is False
    rec = sim.core.ledger.records[len(backlog) + 1]
    assert rec.attempts == []  # never sent
    assert all(f.exception() is None for f in backlog)


def test_deadline_on_the_card_late_reply_counted_not_delivered(small) -> None:
    emu, sim = small
    emu.control.slow_engines(0, 100.0)
    emu.control.slow_engines(1, 100.0)
    futs = [sim.submit(me_request(i + 2, K1), deadline=0.01) for i in range(4)]
    sim.run_until_settled(futs)
    for f in futs:
        err = f.exception()
        assert isinstance(err, DeadlineExceeded) and err.may_have_run is True
        assert err.psmid is not None and err.qid is not None
    # the replies come later: counted, dropped, never delivered (a future resolves once)
    run_until(sim, lambda: sim.core.ledger.counters["late_replies"] == 4, limit=1.0)
    assert all(q.held == 0 for q in sim.core.queues.values())
    assert all(isinstance(f.exception(), DeadlineExceeded) for f in futs)
    assert sum(1 for e in emu.execution_log.entries() if e.outcome == "completed") == 4 + 4
    check_verdicts(sim, emu)


def test_deadline_met_is_no_error(small) -> None:
    _, sim = small
    futs = [sim.submit(me_request(i + 2, K1), deadline=1.0) for i in range(50)]
    sim.run_until_settled(futs)
    assert [f.result() for f in futs] == [expected_me(i + 2, K1) for i in range(50)]
    assert not [k for k in sim._timers if k[0] == "deadline"]  # every deadline timer cancelled


# --- bookkeeping -------------------------------------------------------------------------------


def test_psmids_unique_for_the_clients_life(full) -> None:
    emu, sim = full
    sc, rb, ci_idem = mf_workload(sim)
    emu.control.machine_failure(2, recovery_time=0.02, at=sim.now() + 0.006)
    sim.run_until_settled(sc + rb + ci_idem)
    psmids = [e.psmid for e in emu.execution_log.entries()]
    assert len(psmids) == len(set(psmids))


def test_shutdown_resolves_what_is_left(small) -> None:
    _, sim = small
    futs = [sim.submit(me_request(i + 2, K2)) for i in range(100)]
    sim.run(sim.now() + 0.001)
    sim.shutdown()
    assert all(f.done() for f in futs)
    assert sim.core.ledger.in_flight() == []


# --- liveness: every request ends, and the first promise (defects of issue 8 §1) ------------------


def one_cca_card_one_engine(seed: int = 5) -> tuple[Emulator, SimRunner]:
    """One CCA card with a single engine and two usage domains: the issue's small case."""
    p = exact_profile("default")
    ct = replace(p.card_types["CEX8C"], engines=1)
    card = replace(p.card(2), type=ct, usage_domains=(0, 1), control_domains=())
    return make_sim(replace(p, cards=(card,)), seed=seed)


@pytest.mark.parametrize("n_before", [2, 3])
def test_machine_failure_pending_work_is_redriven_into_a_queue_really_in_service(n_before: int) -> None:
    """A machine failure after ``n_before`` requests on one single-engine CCA card with two domains:
    the request-pending increments are re-driven exactly once, never into the failing card's other
    domain while it is going down, never into the batch that resets a queue; they complete, and
    ran exactly once.  (They used to be re-driven before the queue was marked recovering, land on
    the other domain, start, and be thrown away by a reset: Indeterminate for work that never ran.)"""
    emu, sim = one_cca_card_one_engine()
    emu.control.machine_failure(2, recovery_time=0.02, after_requests=n_before)
    futs = [sim.submit(CounterIncrement(1)) for _ in range(n_before)]
    sim.run_until_settled(futs, max_time=10.0)
    futs += [sim.submit(CounterIncrement(1)) for _ in range(4)]  # and the card serves again
    sim.run_until_settled(futs, max_time=10.0)
    log = emu.execution_log
    recs = sim.core.ledger.records
    pending = [
        r
        for r in recs.values()
        if any(e.outcome == "pending-failed" for a in r.attempts for e in log.for_psmid(a.psmid))
    ]
    assert pending, "the scenario must have request-pending work"
    for rec in pending:
        assert rec.outcome is Outcome.COMPLETED, (rec, [log.for_psmid(a.psmid) for a in rec.attempts])
        assert rec.redrives == 1
        assert sum(log.starts(a.psmid) for a in rec.attempts) == 1  # ran exactly once
    for f in futs:  # in-process ones are indeterminate (state-changing); nothing else fails
        assert f.exception() is None or isinstance(f.exception(), Indeterminate), f.exception()
    assert not [e for e in log.entries() if e.outcome == "discarded" and e.started is not None]
    check_verdicts(sim, emu)
    run_until(sim, lambda: all_in_service(sim))
    sim.shutdown()


def test_work_waits_at_most_the_grace_while_every_queue_of_its_kind_recovers(small) -> None:
    """Both accelerators in a machine-failure recovery longer than the grace: work submitted then
    ends DeviceUnavailable when the grace is up (not when the recovery limit takes the queues
    offline), and new work is served once the cards are back."""
    emu, sim = small
    grace = sim.core.cfg.unavailable_grace
    emu.control.machine_failure(0, recovery_time=1.8)
    emu.control.machine_failure(1, recovery_time=1.8)
    # every NQAP is answered BUSY: each queue in turn enters recovery-wait, the work goes back
    futs = [sim.submit(me_request(i + 2, K2)) for i in range(8)]
    assert not any(s.in_service for s in states(sim).values())
    assert not any(f.done() for f in futs)
    t_parked = sim.now()
    late = sim.submit(me_request(9, K2))
    sim.run_until_settled([late], max_time=5.0)
    err = late.exception()
    assert isinstance(err, DeviceUnavailable) and "came back into service" in str(err), err
    assert sim.now() == pytest.approx(t_parked + grace)
    sim.run_until_settled(futs, max_time=5.0)
    run_until(sim, lambda: all_in_service(sim))
    again = sim.submit(me_request(9, K2))
    sim.run_until_settled([again])
    assert again.result() == expected_me(9, K2)
    assert sim.core.stats()["in_flight"] == 0
    check_verdicts(sim, emu)
