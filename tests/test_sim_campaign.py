"""Seeded whole-run simulations, VOPR style (reference/style.md §3).

One ``random.Random(seed)`` decides everything a run does -- its *options* (profile, workload size
and mix, which fault kinds are switched on: the "swarm"), the workload, the fault plan -- through
independent sub-streams, so an extra draw in one never shifts another.  The emulator is seeded from
the same seed.  Each run has two phases:

* **safety**, faults on: every request ends in exactly one outcome, nothing is lost, no
  state-changing request runs twice, no completion without a run, every verdict agrees with the
  emulator's execution log, every RSA result is right (checked with ``pow``), no queue ever holds more
  than its slots;
* **liveness**, faults healed: every queue is back in service within a bound and serves new work.

A failing seed prints its options and the exact command that replays it.  ``make test`` runs
:data:`SEEDS`; ``make soak`` runs :data:`SOAK_SEEDS` with larger workloads.
"""

from __future__ import annotations

import os
import random
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import pytest

from apcrypto.core.config import FAST
from apcrypto.errors import (
    ApcryptoError,
    BadRequest,
    DeadlineExceeded,
    DeviceUnavailable,
    Indeterminate,
)
from apcrypto.requests import CounterIncrement, ModExpo, ModExpoCrt, RandomBytes
from apcrypto.runners.sim import SimRunner
from apformats.codes import ReplyCode as RY
from apformats.results import qid_card
from emulator import Emulator
from tests._fixtures_driver import (
    E,
    Key,
    check_verdicts,
    crt_request,
    expected_crt,
    expected_me,
    key,
    me_request,
)

SEEDS = range(200)
MAX_REDRIVES = FAST.max_redrives
SOAK_SEEDS = range(10_000, 12_000)
SOAK_SCALE = 3  # soak workloads are this many times larger

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
BAD_REQUEST_CODES = {int(RY.OPERAND_INVALID), int(RY.MALFORMED_MSG)}


def replay_hint(seed: int, soak: bool = False) -> str:
    name = "test_soak" if soak else "test_campaign"
    scale = f"APCRYPTO_SIM_SCALE={SOAK_SCALE} " if soak else ""
    return (
        f"reproduce with: pytest 'tests/test_sim_campaign.py::{name}[seed_{seed}]'  "
        f"(or {scale}APCRYPTO_SIM_SEED={seed} pytest tests/test_sim_campaign.py -k replay -s)"
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


@dataclass
class Expect:
    """What a request may end in."""

    kind: str
    value: Any  # the exact result (RSA), or the length (random bytes), or None (counter)
    idempotent: bool
    deadline: float | None


def _workload(cfg: SimConfig) -> list[tuple[Any, Expect]]:
    rng = random.Random(f"apcrypto-sim:{cfg.seed}:workload")
    kinds = [k for k, _ in cfg.mix]
    weights = [w for _, w in cfg.mix]
    out = []
    for _ in range(cfg.n_requests):
        kind = rng.choices(kinds, weights)[0]
        idem = rng.random() < cfg.idempotent_p
        deadline = round(rng.uniform(0.001, 0.2), 4) if rng.random() < cfg.deadline_p else None
        k = rng.choice(KEYS)
        x = rng.randrange(2, k.n)
        if kind == "me":
            req, exp = me_request(x, k), Expect(kind, expected_me(x, k), idem, deadline)
        elif kind == "crt":  # checked by the public operation: cheaper than x ** d, as exact
            req, exp = crt_request(x, k), Expect(kind, (x, k), idem, deadline)
        elif kind == "ci":
            req, exp = CounterIncrement(rng.randint(1, 3)), Expect(kind, None, idem, deadline)
        else:
            n = rng.randint(1, 64)
            req, exp = RandomBytes(n), Expect(kind, n, idem, deadline)
        out.append((req, exp))
    return out


def _inject(emu: Emulator, sim: SimRunner, cfg: SimConfig, t0: float) -> list[Any]:
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
        elif f.kind == "slow":
            ctl.slow_engines(f.card, f.factor, f.duration, at=at)
    return handles


def _check_outcome(i: int, req: Any, exp: Expect, fut: Future[Any], cfg: SimConfig, rec: Any) -> None:
    where = (
        f"request #{i} {type(req).__name__} (rid {rec.rid}, idempotent={exp.idempotent}, "
        f"deadline={exp.deadline})"
    )
    assert rec.request is req, where
    assert fut.done(), f"{where}: never resolved"
    err = fut.exception()
    if err is None:
        val = fut.result()
        if exp.kind == "me":
            assert val == exp.value, f"{where}: wrong RSA result"
        elif exp.kind == "crt":
            x, k = exp.value
            assert len(val) == k.size and pow(int.from_bytes(val, "big"), E, k.n) == x, where
        elif exp.kind == "rb":
            assert isinstance(val, bytes) and len(val) == exp.value, where
        else:
            assert isinstance(val, int) and val > 0, where
        return
    assert isinstance(err, ApcryptoError), f"{where}: unexpected {err!r}"
    if isinstance(err, Indeterminate):
        # idempotent work is re-driven instead, until its re-drive budget is spent
        assert not exp.idempotent or rec.redrives >= MAX_REDRIVES, f"{where}: idempotent but {err!r}"
        assert err.qid is not None and err.psmid is not None, where
    elif isinstance(err, DeadlineExceeded):
        assert exp.deadline is not None, f"{where}: no deadline but {err!r}"
    elif isinstance(err, BadRequest):
        injected = {f.code for f in cfg.faults if f.kind == "fail_request"}
        assert err.reply_code in injected & BAD_REQUEST_CODES, f"{where}: {err!r} not injected"
    elif isinstance(err, DeviceUnavailable):
        assert cfg.kinds, f"{where}: unavailable without faults: {err!r}"
    else:
        raise AssertionError(f"{where}: unexpected {err!r}")


def run_seed(seed: int, *, scale: int = 1, soak: bool = False) -> dict[str, Any]:
    cfg = SimConfig.from_seed(seed, scale=scale)
    print(cfg.describe())
    hint = replay_hint(seed, soak)
    emu = Emulator(cfg.profile, seed=seed)
    sim = SimRunner(emu)
    try:
        # bring-up
        t_up = sim.now()
        while not all(q.state.in_service for q in sim.core.queues.values()):
            assert sim.step() and sim.now() - t_up < 1.0, f"bring-up did not finish; {hint}"
        work = _workload(cfg)
        t0 = sim.now()
        restore_timers = _inject(emu, sim, cfg, t0)
        futs = [sim.submit(req, idempotent=exp.idempotent, deadline=exp.deadline) for req, exp in work]
        # safety phase: step to the end, checking the slot bound at every event
        limit = t0 + 60.0
        while not all(f.done() for f in futs):
            assert sim.step(), f"simulation stalled with work pending; {hint}"
            assert sim.now() < limit, f"not settled after 60 s of virtual time; {hint}"
            for q in sim.core.queues.values():
                assert len(q.on_card) + len(q.sending) <= q.slots, f"{q.qid:#x} over its slots; {hint}"
        try:
            for i, ((req, exp), fut) in enumerate(zip(work, futs, strict=True)):
                _check_outcome(i, req, exp, fut, cfg, sim.core.ledger.records[i + 1])
            # a card can go silent on the driver: killed, reset under it, too slow for the reply
            # timeout, or taken out of service for an unknown code; then the ledger decides
            dies = any(k in cfg.kinds for k in ("checkstop", "deconfigure", "reset")) or any(
                f.code == 0xEE for f in cfg.faults
            )
            dies = dies or sim.core.ledger.counters["reply_timeouts"] > 0
            check_verdicts(sim, emu, card_may_die=dies)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{cfg.describe()}\n{hint}") from None
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
        return {"outcomes": dict(sim.core.ledger.outcomes), "counters": dict(sim.core.ledger.counters)}
    finally:
        sim.shutdown()


@pytest.mark.parametrize("seed", SEEDS, ids=[f"seed_{s}" for s in SEEDS])
def test_campaign(seed: int) -> None:
    run_seed(seed)


@pytest.mark.soak
@pytest.mark.parametrize("seed", SOAK_SEEDS, ids=[f"seed_{s}" for s in SOAK_SEEDS])
def test_soak(seed: int) -> None:
    run_seed(seed, scale=SOAK_SCALE, soak=True)


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
        futs = [sim.submit(r, idempotent=e.idempotent, deadline=e.deadline) for r, e in _workload(cfg)]
        _inject(emu, sim, cfg, sim.now())
        sim.run_until_settled(futs)
        logs.append(emu.execution_log.entries())
        sim.shutdown()
    assert logs[0] == logs[1]


def test_options_cover_the_swarm() -> None:
    """Over the campaign's seeds every fault kind, both profiles and every fail code come up."""
    cfgs = [SimConfig.from_seed(s) for s in SEEDS]
    assert {k for c in cfgs for k in c.kinds} == set(FAULT_KINDS)
    assert {c.profile for c in cfgs} == {"small", "default"}
    assert {f.code for c in cfgs for f in c.faults if f.kind == "fail_request"} == set(FAIL_CODES)
    assert sum(not c.kinds for c in cfgs) >= 1  # and some fault-free runs
    assert SimConfig.from_seed(3) == SimConfig.from_seed(3)


def test_campaign_budget() -> None:
    """The campaign stays cheap enough for make test: a sample of seeds, timed."""
    t = time.perf_counter()
    for s in range(5):
        run_seed(s)
    per_seed = (time.perf_counter() - t) / 5
    assert per_seed * len(SEEDS) < 60, f"{per_seed:.3f} s per seed"
