"""Engine utilisation with a backlog, on the virtual clock (exact and repeatable): driver vs naive.

The naive baseline sends one request, waits for its reply, sends the next: engines idle while the
host thinks.  The driver keeps every slot full.  Utilisation = engine busy time / (engines × time).
"""

from __future__ import annotations

from apcrypto.bench import MODULUS_2048
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


def test_utilisation_driver_vs_naive(benchmark, record_ratio) -> None:
    drv = benchmark.pedantic(driver_utilisation, rounds=1)
    naive = naive_utilisation()
    benchmark.extra_info.update(driver_utilisation=drv, naive_utilisation=naive)
    record_ratio("engine utilisation with backlog, driver (virtual clock)", drv)
    record_ratio("engine utilisation, naive one-at-a-time baseline", naive)
    assert drv > naive
