"""Hand-built fault scenarios, each aimed at one promise, judged by the independent oracle.

The seeded campaign finds bugs by volume; these find them on purpose: a budget spent on work that
never runs, a wrong answer to the health probe, request-pending work of each kind, a card that dies
silently holding state-changing work, a backlog that must keep every slot busy, and a reply nobody
asked for.  Each run is judged by :func:`tests.oracle.judge` (never by the driver's own ledger), and
each test also states the one fact it is about, read from the execution log.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import pytest

from apcrypto.core.config import FAST, DriverConfig
from apcrypto.requests import CounterIncrement, RandomBytes
from apcrypto.runners.sim import SimRunner
from emulator import Emulator
from tests._fixtures_driver import E, crt_request, exact_profile, expected_me, key, me_request
from tests.oracle import (
    LogEntry,
    Outcome,
    PlannedFault,
    Report,
    Topology,
    WireTap,
    Work,
    judge,
    outcome_of,
)

K1 = key(1024, 0)
OPERAND_INVALID, MESSAGE_TYPE = 0x82, 0x20


@dataclass
class Run:
    emu: Emulator
    sim: SimRunner
    tap: WireTap
    work: list[Work]
    futs: list[Future[Any]]
    got: dict[int, Outcome]
    t0: float


def start(profile: str, config: DriverConfig = FAST) -> tuple[Emulator, SimRunner, WireTap]:
    emu = Emulator(exact_profile(profile), seed=1)
    tap = WireTap(emu)
    sim = SimRunner(emu, config)
    sim.run(sim.now() + 0.05)
    assert all(q.state.in_service for q in sim.core.queues.values())
    return emu, sim, tap


def submit(
    emu: Emulator,
    sim: SimRunner,
    tap: WireTap,
    kinds: list[str],
    *,
    idempotent: bool = False,
    into: Run | None = None,
) -> Run:
    """Submit one request per entry of ``kinds`` (``me``, ``crt``, ``ci``, ``rb``), each unique;
    ``into`` adds them to an earlier batch's run."""
    t0 = sim.now()
    run = into or Run(emu, sim, tap, [], [], {}, t0)
    work, futs, got = run.work, run.futs, run.got
    for kind in kinds:
        n = len(work)
        req: Any
        content: tuple[Any, ...]
        if kind in ("me", "crt"):
            x = 1000 + n
            req = me_request(x, K1) if kind == "me" else crt_request(x, K1)
            content, mode, check = (kind, x), "accel", _rsa_check(x)
        elif kind == "ci":
            req, content, mode = CounterIncrement(100 + n), ("cprb", "CI", 100 + n), "cca"
            check = _is_int  # the oracle checks the value against what ran
        else:
            req, content, mode = RandomBytes(16 + n), ("cprb", "RL", 16 + n), "cca"
            check = _length(16 + n)
        w = Work(len(work), mode, content, idempotent, t0, None, check)
        fut = sim.submit(req, idempotent=idempotent)
        fut.add_done_callback(_recorder(got, w.index, sim))
        work.append(w)
        futs.append(fut)
    return run


def _rsa_check(x: int) -> Callable[[Any], bool]:
    """Right for ME (x^e) and CRT (x^d) alike: the result raised to e gives x back, or is x^e."""
    want = expected_me(x, K1)
    return lambda v: v == want or pow(int.from_bytes(v, "big"), E, K1.n) == x


def _recorder(got: dict[int, Outcome], index: int, sim: SimRunner) -> Callable[[Future[Any]], None]:
    def done(f: Future[Any]) -> None:
        got[index] = outcome_of(f, sim.now(), calls=got[index].calls + 1 if index in got else 1)

    return done


def _is_int(v: Any) -> bool:
    return isinstance(v, int)


def _length(n: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, bytes) and len(v) == n


def settle_and_judge(run: Run, profile: str, faults: list[PlannedFault], **kw: Any) -> Report:
    run.sim.run_until_settled(run.futs, max_time=30.0)
    run.sim.run(run.sim.now() + 0.05)  # and a little longer: late replies, re-probes
    rep = judge(
        Topology.from_profile(profile),
        run.work,
        run.got,
        run.emu.execution_log.entries(),
        run.tap.sent,
        faults,
        max_redrives=kw.pop("max_redrives", FAST.max_redrives),
        counters={(c, d): s.counter for (c, d), s in run.emu.stores.items()},
        **kw,
    )
    run.sim.shutdown()
    return rep


def test_budget_spent_on_work_that_never_runs() -> None:
    """Every NQAP is refused unexecuted (message type): each request is re-driven exactly
    ``max_redrives`` times, then ends ``DeviceUnavailable`` -- never a fifth attempt."""
    emu, sim, tap = start("small")
    emu.control.fail_request(MESSAGE_TYPE, probability=1.0)
    run = submit(emu, sim, tap, ["me"] * 6)
    rep = settle_and_judge(run, "small", [PlannedFault("fail_request", run.t0, code=MESSAGE_TYPE)])
    assert rep.ok, str(rep)
    assert rep.counts == {"DeviceUnavailable": 6}
    assert all(len(rep.attempts[w.index]) == FAST.max_redrives + 1 for w in run.work), rep.attempts


def test_budget_of_one_redrive_is_one() -> None:
    """The same with a budget of 1: two attempts each, whatever the budget is."""
    cfg = FAST.with_(max_redrives=1)
    emu, sim, tap = start("small", cfg)
    emu.control.fail_request(MESSAGE_TYPE, probability=1.0)
    run = submit(emu, sim, tap, ["me", "crt"])
    rep = settle_and_judge(
        run, "small", [PlannedFault("fail_request", run.t0, code=MESSAGE_TYPE)], max_redrives=1
    )
    assert rep.ok, str(rep)
    assert [len(rep.attempts[w.index]) for w in run.work] == [2, 2]


@pytest.mark.parametrize(
    ("card", "kinds", "n"), [(0, ["me", "crt"], 100), (2, ["ci", "rb"], 20)], ids=["accel", "cca"]
)
def test_a_wrong_probe_answer_keeps_the_queue_out_of_service(card: int, kinds: list[str], n: int) -> None:
    """A card is deconfigured for a while; when it is back, the first known-answer probe of each
    of its queues gets an error reply.  No queue may take work until a later probe answers right."""
    emu, sim, tap = start("default")
    t_dead = sim.now() + 0.002
    qids = [q for q in emu.qids() if q >> 8 == card]
    emu.control.deconfigure(card, at=t_dead)
    emu.clock.call_at(t_dead + 0.1, lambda: emu.control.restore(card))

    def arm() -> None:  # refused until the restore: the next accepted NQAP on each queue is its probe
        for q in qids:
            emu.control.fail_request(OPERAND_INVALID, qid=q, nth=1)

    emu.clock.call_at(t_dead + 1e-6, arm)
    run = submit(emu, sim, tap, kinds * n, idempotent=True)  # the card holds work when it dies
    sim.run_until_settled(run.futs, max_time=5.0)
    sim.run(t_dead + 1.0)  # the card is back, re-probed; then more work, for every queue
    submit(emu, sim, tap, kinds * 40, idempotent=True, into=run)
    faults = [PlannedFault("deconfigure", t_dead, card=card)]
    faults += [PlannedFault("fail_request", t_dead, qid=q, code=OPERAND_INVALID) for q in qids]
    rep = settle_and_judge(run, "default", faults)
    assert rep.ok, str(rep)
    for q in qids:
        after = [e for e in rep.others.get(q, []) if e.enqueued > t_dead]
        assert [e.reply_code for e in after[:2]] == [OPERAND_INVALID, 0], (hex(q), after)
        served = [e for es in rep.attempts.values() for e in es if e.qid == q and e.enqueued > t_dead]
        good_at = after[1].dequeued
        assert served and good_at is not None and min(e.enqueued for e in served) >= good_at, hex(q)


@pytest.mark.parametrize(("card", "kinds"), [(0, ["me", "crt"]), (2, ["ci", "rb"])], ids=["accel", "cca"])
def test_request_pending_work_is_drained_then_redriven_once_to_its_kind(card: int, kinds: list[str]) -> None:
    """A machine failure with a backlog on the card: every stored reply is read back before any
    reset (nothing discarded), and each request-pending message is re-driven exactly once, to the
    other card of its kind."""
    emu, sim, tap = start("default")
    t_mf = sim.now() + 0.0005
    emu.control.machine_failure(card, recovery_time=0.02, at=t_mf)
    run = submit(emu, sim, tap, kinds * 40)
    rep = settle_and_judge(run, "default", [PlannedFault("machine_failure", t_mf, card=card)])
    assert rep.ok, str(rep)
    log = run.emu.execution_log.entries()
    assert not [e for e in log if e.outcome == "discarded"]
    pending = [(i, es) for i, es in rep.attempts.items() if es[0].outcome == "pending-failed"]
    assert pending, "the scenario must catch work request-pending"
    for i, es in pending:
        assert es[0].dequeued is not None, es
        assert len(es) == 2 and es[1].qid >> 8 == card + 1, (i, es)  # the other card of the kind


@pytest.mark.parametrize("death", ["checkstop", "deconfigure"])
def test_a_silent_card_death_leaves_state_changing_work_indeterminate(death: str) -> None:
    """A CCA card dies holding counter increments, some never started: the card cannot say which,
    so none is sent again; each one it held ends ``Indeterminate``."""
    emu, sim, tap = start("default")
    t_dead = sim.now() + 0.002
    getattr(emu.control, death)(2, at=t_dead)
    run = submit(emu, sim, tap, ["ci"] * 60)
    rep = settle_and_judge(run, "default", [PlannedFault(death, t_dead, card=2)])
    assert rep.ok, str(rep)
    held = [i for i, es in rep.attempts.items() if es[0].qid >> 8 == 2 and es[0].outcome == "discarded"]
    assert any(rep.attempts[i][0].started is None for i in held), "some held work never started"
    for i in held:
        assert len(rep.attempts[i]) == 1 and run.got[i].kind == "Indeterminate", rep.attempts[i]


@pytest.mark.parametrize("profile", ["small", "default"])
def test_a_backlog_keeps_every_slot_busy(profile: str) -> None:
    """No faults, more work than slots: the emulator's own record shows every queue holding
    exactly ``qd + 1`` messages while work waits (the oracle's ``full`` and ``slots`` rules), and
    the driver never hit a full queue."""
    emu, sim, tap = start(profile)
    run = submit(emu, sim, tap, ["me", "crt"] * 100)
    rep = settle_and_judge(run, profile, [])
    assert rep.ok, str(rep)
    topo = Topology.from_profile(profile)
    for q in topo.of_mode("accel"):
        assert _peak(run.emu.execution_log.entries(), q.qid) == q.slots == 8
    assert not [s for s in run.tap.sent if s.rc != 0]


def _peak(log: list[Any], qid: int) -> int:
    evs = []
    for e in log:
        if e.qid == qid:
            evs.append((e.enqueued, 1))
            if e.dequeued is not None:
                evs.append((e.dequeued, -1))
    held = peak = 0
    for _, d in sorted(evs):
        held += d
        peak = max(peak, held)
    return peak


@pytest.mark.parametrize("qid", [0x0001, 0x0100])
def test_a_reply_nobody_asked_for_is_never_delivered(qid: int) -> None:
    """Another program puts a message on a queue the driver uses, just before the driver's work;
    its reply comes back to the driver's DQAP among the driver's own.  It must be dropped -- not
    handed to one of the driver's requests."""
    emu, sim, tap = start("small")
    stranger = me_request(3, key(1024, 1))  # not in the workload: the oracle files it as not ours
    t_in = sim.now()
    assert emu.nqap(qid, 0x0BAD_0000_0000_0001, stranger.message(qid & 0xFF)).status.rc == 0
    run = submit(emu, sim, tap, ["me"] * 100, idempotent=True)
    rep = settle_and_judge(run, "small", [PlannedFault("intruder", t_in, qid=qid)])
    assert rep.ok, str(rep)
    strays = [e for e in run.emu.execution_log.entries() if e.psmid == 0x0BAD_0000_0000_0001]
    assert strays and strays[0].dequeued is not None  # the driver did read it...
    assert rep.counts == {"completed": 100}  # ...and every request got its own result


def test_oracle_logs_are_what_the_emulator_logged() -> None:
    """The oracle's copy of an entry is field for field the emulator's snapshot."""
    emu, sim, tap = start("small")
    run = submit(emu, sim, tap, ["me"])
    sim.run_until_settled(run.futs)
    e = emu.execution_log.entries()[-1]
    c = LogEntry.read(e)
    assert (c.psmid, c.qid, c.enqueued, c.started, c.ended, c.outcome, c.dequeued, c.seq) == (
        e.psmid,
        e.qid,
        e.enqueued,
        e.started,
        e.ended,
        e.outcome,
        e.dequeued,
        e.seq,
    )
    sim.shutdown()
