"""Seeded whole-run simulations, VOPR style (reference/style.md §3), judged by an independent oracle.

One ``random.Random(seed)`` decides everything a run does -- its *options* (profile, workload size
and mix, which fault kinds are switched on: the "swarm"), the workload, the fault plan -- through
independent sub-streams, so an extra draw in one never shifts another.  The emulator is seeded from
the same seed.  Each run has two phases:

* **safety**, faults on: the run is judged by :mod:`tests.oracle` from what the *cards* saw (the
  emulator's execution log and the NQAPs on the wire), the workload, what each caller got, and the
  fault plan -- never from the driver's ledger.  Every rule is checked on every seed: exactly one
  outcome per request, ``Indeterminate`` only where an attempt started or a planned fault silenced
  the card (the strict rule, per request), request-pending work re-driven exactly once to a queue of
  its kind and within the budget, no state-changing request run twice, ``DeviceUnavailable`` only
  when every queue of the kind had been hit, slots never over ``qd + 1`` and full while work waits
  (the emulator's occupancy), RSA results checked with ``pow``.  The product's own audit
  (``apcrypto.audit``) gives a second opinion;
* **liveness**, faults healed: every queue is back in service within a bound and serves new work.

A failing seed prints the oracle's violations, its options and the exact command that replays it.
``make test`` runs :data:`SEEDS`; ``make soak`` runs :data:`SOAK_SEEDS` with larger workloads.
"""

from __future__ import annotations

import os
import random
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import pytest

from apcrypto.audit import audit
from apcrypto.core.config import FAST
from apcrypto.requests import CounterIncrement, RandomBytes
from apcrypto.runners.sim import SimRunner
from apformats.codes import ReplyCode as RY
from emulator import Emulator
from tests._fixtures_driver import E, Key, crt_request, expected_me, key, me_request
from tests.oracle import Outcome, PlannedFault, Topology, WireTap, Work, judge, outcome_of

SEEDS = range(500)
#: Driver bugs the oracle excuses (each only in its exact shape, see ``tests/oracle.py``).  Empty:
#: the core's issue 8 §1 work fixed ``deadline-after-redrive`` and ``redrive-into-recovering-queue``
#: for these seeds.  (With the held-back "refuse" kind, seed 369 still shows the latter: new work
#: accepted by a queue in the instant its card's machine-failure replies are drained, before its
#: reset and probe.  Seed 144's failure there was the oracle's, fixed: may_have_run is judged
#: against runs, and an attempt refused unexecuted did not run.)
KNOWN_DRIVER_BUGS: frozenset[str] = frozenset()
MAX_REDRIVES = FAST.max_redrives
SOAK_SEEDS = range(10_000, 20_000)
SOAK_SCALE = 3  # soak workloads are this many times larger

#: The two profiles' topologies, read by the oracle from their TOML files.
TOPOLOGIES = {name: Topology.from_profile(name) for name in ("small", "default")}

#: RSA keys the workloads draw from (fixed primes; results are checked with plain pow).
KEYS: tuple[Key, ...] = (key(1024, 0), key(1024, 1), key(2048, 0))

FAULT_KINDS = ("machine_failure", "checkstop", "deconfigure", "busy", "reset", "fail_request", "slow")
#: Reply codes fail_request injects: malformed (fail caller), plain machine failure, card-side
#: failures that may have run / never ran, and an unknown code (safe default: offline).
FAIL_CODES = (
    RY.OPERAND_INVALID,
    RY.MALFORMED_MSG,
    RY.MACHINE_FAILURE,
    RY.TRANSPORT_FAIL,
    RY.MESSAGE_TYPE,
    0xEE,
)
#: Share of runs where a part of every queue's NQAPs is refused unexecuted ("message type"): work
#: that never runs is re-driven until its budget is spent, so the budget rule is exercised.
REFUSE_P = 0.15


def replay_hint(seed: int, soak: bool = False) -> str:
    if soak:
        return (
            f"reproduce with: APCRYPTO_SIM_SCALE={SOAK_SCALE} APCRYPTO_SIM_SEED={seed} "
            "pytest tests/test_sim_campaign.py -k replay -s"
        )
    return (
        f"reproduce with: pytest 'tests/test_sim_campaign.py::test_campaign[seed_{seed}]'  "
        f"(or APCRYPTO_SIM_SEED={seed} pytest tests/test_sim_campaign.py -k replay -s)"
    )


@dataclass(frozen=True)
class Fault:
    """One planned fault: ``kind``, a card or qid, when (virtual seconds after the workload
    starts), and its parameters.  Frozen: its repr is the plan, printed with the seed."""

    kind: str
    at: float
    card: int | None = None
    qid: int | None = None
    duration: float = 0.0  # recovery time, busy/reset/slow duration, or time until restore
    code: int | None = None  # fail_request reply code
    nth: int | None = None  # fail_request: the nth matching NQAP
    factor: float = 1.0  # slow engines
    probability: float | None = None  # refuse: the share of NQAPs refused unexecuted


@dataclass(frozen=True)
class SimConfig:
    """Everything a seeded run does, drawn from the seed (printed first, swarm style)."""

    seed: int
    profile: str
    n_requests: int
    mix: tuple[tuple[str, float], ...]
    idempotent_p: float
    deadline_p: float
    kinds: tuple[str, ...]
    faults: tuple[Fault, ...] = field(repr=False)

    @classmethod
    def from_seed(cls, seed: int, *, scale: int = 1) -> SimConfig:
        rng = random.Random(f"apcrypto-sim:{seed}:options")
        profile = rng.choice(("small", "default"))
        n = rng.randint(60, 240) * scale
        kinds_of_work = ["me", "crt"] + (["ci", "rb"] if profile == "default" else [])
        mix = tuple((k, round(rng.uniform(0.1, 1.0), 2)) for k in kinds_of_work)
        kinds = tuple(k for k in FAULT_KINDS if rng.random() < 0.45)
        # drawn from its own stream (added later: the draws above stay as they were)
        if random.Random(f"apcrypto-sim:{seed}:refuse").random() < REFUSE_P:
            kinds += ("refuse",)
        idem_p = rng.choice((0.0, 0.3, 0.7, 1.0))
        deadline_p = rng.choice((0.0, 0.0, 0.1, 0.3))
        faults = _plan_faults(random.Random(f"apcrypto-sim:{seed}:faults"), profile, kinds, n)
        return cls(seed, profile, n, mix, idem_p, deadline_p, kinds, faults)

    def describe(self) -> str:
        lines = [f"SEED={self.seed} {self!r}"]
        lines += [f"  {f!r}" for f in self.faults]
        return "\n".join(lines)


def _plan_faults(rng: random.Random, profile: str, kinds: tuple[str, ...], n: int) -> tuple[Fault, ...]:
    cards = (0, 1) if profile == "small" else (0, 1, 2, 3)
    domains = (0, 1) if profile == "small" else (0, 1, 2, 3)
    horizon = 0.0004 * n  # roughly how long the workload keeps the cards busy
    out: list[Fault] = []

    def when() -> float:
        return round(rng.uniform(0.0, horizon), 6)

    def qid() -> int:
        return (rng.choice(cards) << 8) | rng.choice(domains)

    for kind in kinds:
        for _ in range(rng.randint(1, 3)):
            if kind == "machine_failure":
                out.append(Fault(kind, when(), card=rng.choice(cards), duration=rng.uniform(0.005, 0.3)))
            elif kind in ("checkstop", "deconfigure"):
                out.append(Fault(kind, when(), card=rng.choice(cards), duration=rng.uniform(0.001, 0.5)))
            elif kind in ("busy", "reset"):
                out.append(Fault(kind, when(), qid=qid(), duration=rng.uniform(0.0005, 0.1)))
            elif kind == "fail_request":
                q = qid() if rng.random() < 0.7 else None
                out.append(Fault(kind, 0.0, qid=q, code=rng.choice(FAIL_CODES), nth=rng.randint(1, 20)))
            elif kind == "refuse":  # once per run; spends re-drive budgets (the last kind: no shift)
                out.append(Fault(kind, 0.0, code=RY.MESSAGE_TYPE, probability=rng.uniform(0.3, 0.7)))
                break
            elif kind == "slow":
                out.append(
                    Fault(
                        kind,
                        when(),
                        card=rng.choice(cards),
                        duration=rng.uniform(0.001, 0.2),
                        factor=rng.uniform(2, 50),
                    )
                )
    return tuple(sorted(out, key=lambda f: (f.at, f.kind)))


def _workload(cfg: SimConfig, t0: float = 0.0) -> list[tuple[Any, Work]]:
    """The requests of a run, each with what the oracle needs to know about it.  Every request's
    content is unique within the run (distinct data, counter increments and byte counts), so the
    oracle can trace each NQAP the card saw back to the request it carries."""
    rng = random.Random(f"apcrypto-sim:{cfg.seed}:workload")
    kinds = [k for k, _ in cfg.mix]
    weights = [w for _, w in cfg.mix]
    incs = iter(rng.sample(range(1, 1 << 20), cfg.n_requests))
    counts = iter(rng.sample(range(16, 4097), min(cfg.n_requests, 4081)))
    seen: set[tuple[Any, ...]] = set()
    out = []
    for _ in range(cfg.n_requests):
        kind = rng.choices(kinds, weights)[0]
        idem = rng.random() < cfg.idempotent_p
        deadline = round(rng.uniform(0.001, 0.2), 4) if rng.random() < cfg.deadline_p else None
        k = rng.choice(KEYS)
        x = rng.randrange(2, k.n)
        check: Any
        if kind == "me":
            req, content = me_request(x, k), ("me", x)
            want = expected_me(x, k)
            check = want.__eq__
        elif kind == "crt":  # checked by the public operation: cheaper than x ** d, as exact
            req, content = crt_request(x, k), ("crt", x)
            check = _crt_check(x, k)
        elif kind == "ci":
            by = next(incs)
            req, content = CounterIncrement(by), ("cprb", "CI", by)
            check = _ci_check(by)
        else:
            n = next(counts)
            req, content = RandomBytes(n), ("cprb", "RL", n)
            check = _rb_check(n)
        if content in seen:  # a repeated RSA input (never, in practice): make it a new one
            continue
        seen.add(content)
        mode = "accel" if kind in ("me", "crt") else "cca"
        out.append((req, Work(len(out), mode, content, idem, t0, deadline, check)))
    return out


def _crt_check(x: int, k: Key) -> Any:
    return lambda v: isinstance(v, bytes) and len(v) == k.size and pow(int.from_bytes(v, "big"), E, k.n) == x


def _ci_check(by: int) -> Any:
    return lambda v: isinstance(v, int) and v >= by


def _rb_check(n: int) -> Any:
    return lambda v: isinstance(v, bytes) and len(v) == n


def _plan(cfg: SimConfig, t0: float) -> list[PlannedFault]:
    """The fault plan as the oracle reads it (absolute times; a fail_request's victim is found in
    the log by its reply code)."""
    kinds = {"refuse": "fail_request"}
    return [
        PlannedFault(kinds.get(f.kind, f.kind), t0 + f.at, card=f.card, qid=f.qid, code=f.code)
        for f in cfg.faults
    ]


def _inject(emu: Emulator, cfg: SimConfig, t0: float) -> list[Any]:
    """Arm the fault plan on the emulator's control plane; returns restore timers to cancel."""
    ctl = emu.control
    handles = []
    for f in cfg.faults:
        at = t0 + f.at
        if f.kind == "machine_failure":
            ctl.machine_failure(f.card, recovery_time=f.duration, at=at)
        elif f.kind in ("checkstop", "deconfigure"):
            getattr(ctl, f.kind)(f.card, at=at)
            card = f.card
            handles.append(emu.clock.call_at(at + f.duration, lambda c=card: ctl.restore(c)))
        elif f.kind == "busy":
            ctl.busy(f.qid, f.duration, at=at)
        elif f.kind == "reset":
            ctl.reset_in_progress(f.qid, f.duration, at=at)
        elif f.kind == "fail_request":
            ctl.fail_request(f.code, qid=f.qid, nth=f.nth)
        elif f.kind == "refuse":
            ctl.fail_request(f.code, probability=f.probability)
        elif f.kind == "slow":
            ctl.slow_engines(f.card, f.factor, f.duration, at=at)
    return handles


class Outcomes:
    """What each caller got, and when (the virtual time its future resolved), in submit order."""

    def __init__(self, sim: SimRunner) -> None:
        self.sim = sim
        self.got: dict[int, Outcome] = {}
        self.calls: dict[int, int] = {}

    def watch(self, index: int, fut: Future[Any]) -> None:
        def done(f: Future[Any]) -> None:
            self.calls[index] = self.calls.get(index, 0) + 1
            self.got[index] = outcome_of(f, self.sim.now(), self.calls[index])

        fut.add_done_callback(done)


def run_seed(seed: int, *, scale: int = 1, soak: bool = False) -> dict[str, Any]:
    cfg = SimConfig.from_seed(seed, scale=scale)
    print(cfg.describe())
    hint = replay_hint(seed, soak)
    emu = Emulator(cfg.profile, seed=seed)
    tap = WireTap(emu)  # before the driver's first NQAP: the bring-up probes are on the wire too
    sim = SimRunner(emu, FAST.with_(ledger_history=1_000_000))  # the audit below sees every request
    try:
        # bring-up
        t_up = sim.now()
        while not all(q.state.in_service for q in sim.core.queues.values()):
            assert sim.step() and sim.now() - t_up < 1.0, f"bring-up did not finish; {hint}"
        t0 = sim.now()
        work = _workload(cfg, t0)
        restore_timers = _inject(emu, cfg, t0)
        got = Outcomes(sim)
        futs = []
        for req, w in work:
            fut = sim.submit(req, idempotent=w.idempotent, deadline=w.deadline)
            got.watch(w.index, fut)
            futs.append(fut)
        # safety phase: run until every request has ended (bounded in virtual time)
        limit = t0 + 60.0
        while not all(f.done() for f in futs):
            assert sim.step(), f"simulation stalled with work pending; {hint}"
            assert sim.now() < limit, f"not settled after 60 s of virtual time; {hint}"
        log = emu.execution_log.entries()
        report = judge(
            TOPOLOGIES[cfg.profile],
            [w for _, w in work],
            got.got,
            log,
            tap.sent,
            _plan(cfg, t0),
            max_redrives=MAX_REDRIVES,
            counters={(c, d): s.counter for (c, d), s in emu.stores.items()},
            known=KNOWN_DRIVER_BUGS,
        )
        assert report.ok, f"{report}\n{cfg.describe()}\n{hint}"
        # second opinion: the product's own audit of its ledger against the same log
        second = audit(sim.core.ledger, log)
        assert second.requests == sim.core.ledger.counters["submitted"], f"ledger forgot requests; {hint}"
        assert second.ok and not second.indeterminate_never_started, f"audit: {second.summary()}; {hint}"
        # liveness phase: heal everything; every queue back in service, and serving
        for h in restore_timers:
            h.cancel()
        emu.control.clear()
        t_heal = sim.now()
        while not all(q.state.in_service for q in sim.core.queues.values()):
            assert sim.step(), f"stalled while healing; {hint}"
            bad = {hex(q.qid): q.state.value for q in sim.core.queues.values() if not q.state.in_service}
            assert sim.now() - t_heal < 3.0, f"queues not back in service 3 s after healing: {bad}; {hint}"
        k = KEYS[0]
        after = [sim.submit(me_request(x, k)) for x in range(2, 18)]
        if cfg.profile == "default":
            after.append(sim.submit(CounterIncrement(1)))
        sim.run_until_settled(after, max_time=5.0)
        for x, f in zip(range(2, 18), after, strict=False):
            assert f.result() == expected_me(x, k), f"after healing: {f.exception()!r}; {hint}"
        if cfg.profile == "default":
            assert isinstance(after[-1].result(), int), hint
        return {"outcomes": report.counts, "entries": len(log)}
    finally:
        sim.shutdown()


@pytest.mark.parametrize("seed", SEEDS, ids=[f"seed_{s}" for s in SEEDS])
def test_campaign(seed: int) -> None:
    run_seed(seed)


#: Soak seeds run in chunks: 100 test items instead of 10,000 keeps ``make test``'s collection cheap.
SOAK_CHUNK = 100
SOAK_CHUNKS = range(SOAK_SEEDS.start, SOAK_SEEDS.stop, SOAK_CHUNK)


@pytest.mark.soak
@pytest.mark.parametrize("first", SOAK_CHUNKS, ids=[f"seeds_{s}-{s + SOAK_CHUNK - 1}" for s in SOAK_CHUNKS])
def test_soak(first: int, capsys: pytest.CaptureFixture[str]) -> None:
    """A chunk of soak seeds; every failing seed is reported with its replay command."""
    failures = []
    for seed in range(first, min(first + SOAK_CHUNK, SOAK_SEEDS.stop)):
        try:
            run_seed(seed, scale=SOAK_SCALE, soak=True)
        except AssertionError as exc:
            failures.append(f"seed {seed}: {exc}")
        capsys.readouterr()  # each seed prints its options; keep only the failures
    assert not failures, "\n\n".join(failures)


if os.environ.get("APCRYPTO_SIM_SEED") is not None:  # collected only when asked for: never a skip

    def test_replay() -> None:
        """Replay one seed from the environment: ``APCRYPTO_SIM_SEED=N pytest ... -k replay -s``
        (``APCRYPTO_SIM_SCALE=3`` for a soak seed)."""
        seed = int(os.environ["APCRYPTO_SIM_SEED"])
        print(run_seed(seed, scale=int(os.environ.get("APCRYPTO_SIM_SCALE", "1"))))


def test_same_seed_same_run() -> None:
    """Determinism: a seed replays exactly (the execution logs are equal entry for entry)."""
    logs = []
    for _ in range(2):
        cfg = SimConfig.from_seed(7)
        emu = Emulator(cfg.profile, seed=7)
        sim = SimRunner(emu)
        sim.run(sim.now() + 0.05)
        futs = [sim.submit(r, idempotent=w.idempotent, deadline=w.deadline) for r, w in _workload(cfg)]
        _inject(emu, cfg, sim.now())
        sim.run_until_settled(futs)
        logs.append(emu.execution_log.entries())
        sim.shutdown()
    assert logs[0] == logs[1]


def test_options_cover_the_swarm() -> None:
    """Over the campaign's seeds every fault kind, both profiles and every fail code come up."""
    cfgs = [SimConfig.from_seed(s) for s in SEEDS]
    assert {k for c in cfgs for k in c.kinds} == {*FAULT_KINDS, "refuse"}
    assert {c.profile for c in cfgs} == {"small", "default"}
    assert {f.code for c in cfgs for f in c.faults if f.kind == "fail_request"} == set(FAIL_CODES)
    assert sum(not c.kinds for c in cfgs) >= 1  # and some fault-free runs
    assert SimConfig.from_seed(3) == SimConfig.from_seed(3)


def test_campaign_budget() -> None:
    """The campaign stays cheap enough for make test (which must stay under 5 minutes on 2 cores):
    a sample of seeds, in CPU time (other processes on the machine do not count against it)."""
    t = time.process_time()
    for s in range(5):
        run_seed(s)
    per_seed = (time.process_time() - t) / 5
    assert per_seed * len(SEEDS) < 100, f"{per_seed:.3f} s of CPU per seed"
