"""Memory stays flat however many requests a client runs (issue 11, "Memory").

The ledger keeps every undecided request and only the newest ``DriverConfig.ledger_history``
decided ones; counts per outcome are kept forever.  Checked on the ledger alone, then on the
simulation path (driver core + runner + in-process emulator on a virtual clock): batch after batch,
the ledger's size stays at its bound and the memory the process holds (traced with ``tracemalloc``;
the emulator's execution log is cut to a ring of 1,000 entries, so all of it is bounded) does not
grow.
``make test`` runs a bounded count; the 10,000,000-request run is under the ``soak`` marker.
"""

from __future__ import annotations

import gc
import os
import resource
import time
import tracemalloc
from typing import Any

import pytest

from apcrypto.core.config import FAST, DriverConfig
from apcrypto.core.ledger import Ledger, Outcome
from apcrypto.requests import ModExpo
from apcrypto.runners.sim import SimRunner
from emulator import Emulator

MOD = (1 << 2047) | 0x1D7
SIZE = 256


def test_config_default_history_is_small() -> None:
    assert DriverConfig().ledger_history == 1_000
    with pytest.raises(ValueError, match="history"):
        Ledger(history=-1)


def test_ledger_keeps_undecided_and_a_bounded_history() -> None:
    led = Ledger(history=3)
    recs = [led.open(object(), idempotent=True, mode="accel", weight=1) for _ in range(10)]
    psmids = {r.rid: led.new_attempt(r, 0x100).psmid for r in recs}
    for r in recs[:8]:
        led.close(r, Outcome.COMPLETED)
    # the two undecided are kept, and the three newest decided ones; nothing else
    assert sorted(led.records) == [6, 7, 8, 9, 10]
    assert {led.record_for_psmid(psmids[rid]).rid for rid in (6, 7, 8, 9, 10)} == {6, 7, 8, 9, 10}
    assert all(led.record_for_psmid(psmids[rid]) is None for rid in range(1, 6))  # forgotten psmids too
    assert led.outcomes["completed"] == 8 and led.counters["submitted"] == 10  # counts are forever
    assert [r.rid for r in led.in_flight()] == [9, 10]
    led.close(recs[8], Outcome.FAILED)
    assert sorted(led.records) == [7, 8, 9, 10]


def test_no_history_keeps_only_the_undecided() -> None:
    led = Ledger(history=0)
    a = led.open(object(), idempotent=True, mode="accel", weight=1)
    b = led.open(object(), idempotent=True, mode="accel", weight=1)
    led.close(a, Outcome.COMPLETED)
    assert list(led.records) == [b.rid]


def _sim(history: int) -> tuple[Emulator, SimRunner]:
    emu = Emulator("fast", seed=3)  # zero service times: the run is bookkeeping and gmpy2
    emu.execution_log.configure(capacity=1_000)  # the emulator's own record: bounded too
    sim = SimRunner(emu, FAST.with_(ledger_history=history))
    sim.run(sim.now() + 0.05)
    assert all(q.in_service for q in sim.core.queue_states().values())
    return emu, sim


def _batch(sim: SimRunner, n: int, start: int) -> None:
    futs = [sim.submit(ModExpo((start + i + 2).to_bytes(SIZE, "big"), 65537, MOD)) for i in range(n)]
    sim.run_until_settled(futs)
    assert all(f.exception() is None for f in futs)
    assert int.from_bytes(futs[-1].result(), "big") == pow(start + n + 1, 65537, MOD)
    del futs  # the caller drops its futures: nothing of the request may stay behind


def _flat_run(
    history: int, batch: int, warmup: int, batches: int, time_limit: float, *, trace: bool = True
) -> dict[str, Any]:
    """Warm up (the ledger fills to its bound, dicts reach their size), then batch after batch record
    the ledger's size, the traced bytes (``trace``: tracemalloc halves the speed, so the long soak
    counts the collector's live objects instead) and the peak RSS."""
    emu, sim = _sim(history)
    led = sim.core.ledger
    done = 0
    for _ in range(warmup):
        _batch(sim, batch, done)
        done += batch
    sizes: list[int] = []
    held: list[int] = []
    rss: list[int] = []  # the process's peak resident set (KiB), after each traced batch
    t0 = time.monotonic()
    if trace:
        tracemalloc.start()
    try:
        for _ in range(batches):
            _batch(sim, batch, done)
            done += batch
            gc.collect()
            sizes.append(len(led.records))
            held.append(tracemalloc.get_traced_memory()[0] if trace else len(gc.get_objects()))
            rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
            if time.monotonic() - t0 > time_limit:
                break
    finally:
        if trace:
            tracemalloc.stop()
    assert sim.core.undecided() == 0
    assert led.outcomes["completed"] == done  # every request counted, though few are remembered
    sim.shutdown()
    emu.close()
    return {"done": done, "sizes": sizes, "held": held, "rss": rss}


def test_ledger_and_client_memory_stay_flat() -> None:
    """12,000 requests in batches of 1,000 with a history of 500: after warm-up the ledger holds
    exactly its history and the traced bytes do not grow from batch to batch."""
    r = _flat_run(history=500, batch=1_000, warmup=4, batches=8, time_limit=60)
    assert r["done"] == 12_000
    assert set(r["sizes"]) == {500}, r["sizes"]
    growth = max(r["held"]) - r["held"][0]
    # a leak of one small object per request would be >= 8 * 1,000 * 50 bytes = 400 KB
    assert growth < 64 * 1024, r["held"]


@pytest.mark.soak
@pytest.mark.timeout(2700)  # the run stops itself at APCRYPTO_SOAK_SECONDS (2400 s)
def test_ten_million_requests_keep_memory_flat() -> None:
    """The soak: 10,000,000 requests (or as many as ``APCRYPTO_SOAK_SECONDS``, default 2400 s,
    allows) through the simulation path with the default history: the ledger's size, the number of
    objects the collector tracks and the peak RSS stay flat."""
    limit = float(os.environ.get("APCRYPTO_SOAK_SECONDS", "2400"))
    batch = 10_000
    r = _flat_run(
        history=1_000, batch=batch, warmup=3, batches=10_000_000 // batch - 3, time_limit=limit, trace=False
    )
    objs, rss = f"{r['held'][0]}..{max(r['held'])}", f"{r['rss'][0]}..{r['rss'][-1]} KiB"
    print(f"soak: {r['done']:,} requests; live objects {objs}, peak RSS {rss}")
    assert r["done"] >= 300_000, "the soak ran too few requests to say anything"
    assert set(r["sizes"]) == {1_000}
    growth = max(r["held"]) - r["held"][0]
    assert growth < 1_000, ("live objects grew", r["done"], r["held"][:5], r["held"][-5:])
    assert r["rss"][-1] - r["rss"][0] < 32 * 1024, ("peak RSS grew (KiB)", r["rss"][0], r["rss"][-1])
