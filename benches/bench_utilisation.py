"""The patent's benefit: the driver against a naive one-at-a-time client, on the default profile.

The naive baseline sends one request, waits for its reply, sends the next: engines idle while the
host thinks.  The driver keeps every slot full.  Two figures:

* engine utilisation with a backlog on the virtual clock (exact and repeatable):
  engine busy time / (engines x time);
* wall-clock throughput, ``emu:default`` with real math and the default service times (MEX_2K
  0.4 ms, 8 accelerator engines): driver ops/s over naive ops/s, medians of 3 in this run.
"""

from __future__ import annotations

import statistics
import time

import apcrypto
from apcrypto.bench import MODULUS_2048, driver_run, naive_run
from apcrypto.requests import ModExpo
from apcrypto.runners.sim import SimRunner
from emulator import Emulator

N = 600


def _utilisation(emu: Emulator, t0: float, busy0: dict[int, float]) -> float:
    st = emu.stats()
    accel = [c for c in st.cards if c.mode == "accel"]
    elapsed = emu.clock.now() - t0
    return sum(c.busy_time - busy0[c.card] for c in accel) / (sum(c.engines for c in accel) * elapsed)


def driver_utilisation() -> float:
    emu = Emulator("default", seed=1)
    sim = SimRunner(emu)
    sim.run(0.05)
    t0, busy0 = emu.clock.now(), {c.card: c.busy_time for c in emu.stats().cards}
    futs = [sim.submit(ModExpo((i + 2).to_bytes(256, "big"), 65537, MODULUS_2048)) for i in range(N)]
    sim.run_until_settled(futs)
    u = _utilisation(emu, t0, busy0)
    sim.shutdown()
    return u


def naive_utilisation() -> float:
    emu = Emulator("default", seed=1)
    sim = SimRunner(emu)
    sim.run(0.05)
    t0, busy0 = emu.clock.now(), {c.card: c.busy_time for c in emu.stats().cards}
    for i in range(N // 10):
        f = sim.submit(ModExpo((i + 2).to_bytes(256, "big"), 65537, MODULUS_2048))
        sim.run_until_settled([f])
    u = _utilisation(emu, t0, busy0)
    sim.shutdown()
    return u


def test_utilisation_driver_vs_naive(timed, record_ratio) -> None:
    drv, _ = timed(driver_utilisation, rounds=1)
    naive = naive_utilisation()
    record_ratio("engine utilisation with backlog, driver (virtual clock)", drv)
    record_ratio("engine utilisation, naive one-at-a-time baseline", naive)
    assert drv > naive


def test_wall_clock_throughput_driver_vs_naive(timed, record_ratio) -> None:
    emu = Emulator("default", clock="wall")
    with apcrypto.connect("emu:", emulator=emu) as client:
        assert client.wait_ready(10)
        ops, median = timed(driver_run, client, 1000, rounds=3, warmup_rounds=1)
        assert ops == 1000
        naive = []
        for _ in range(3):
            t = time.perf_counter()
            assert naive_run(client, 100) == 100
            naive.append(100 / (time.perf_counter() - t))
    emu.close()
    drv, nv = 1000 / median, statistics.median(naive)
    record_ratio("throughput, driver / naive one-at-a-time (wall clock, emu:default, ME-2048)", drv / nv)
    record_ratio(f"  ... driver ops/s (naive {nv:,.0f} ops/s; 8 engines x 0.4 ms = 20,000 ceiling)", drv)
    assert drv > nv
