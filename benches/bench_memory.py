"""Memory per outstanding request, and throughput with a deep backlog (issue 11, "Memory").

* bytes per outstanding request: ``tracemalloc``'s traced bytes, over N requests submitted through
  the client's operations (``SimClient``: the same futures and request objects as the threaded
  client, no runner thread) on the ``default`` profile with the virtual clock standing still (so
  none is decided: a few hold the cards' slots, the rest wait on the host), divided by N.  It
  includes the request's encoded message (the 2048-bit ME request is 817 bytes), the future and
  the ledger record.
* throughput with 100,000 requests submitted at once over the same with 1,000, the threaded client
  on ``emu:overhead`` (zero service times, echo math: the driver and its garbage collector are what
  is measured), medians; the same ratio with the cyclic GC off says how much of the gap is GC.
"""

from __future__ import annotations

import concurrent.futures
import gc
import statistics
import time
import tracemalloc
from typing import Any

import apcrypto
from apcrypto.bench import EXPONENT, MODULUS_2048
from apcrypto.core.config import FAST
from apcrypto.runners.sim import SimClient, SimRunner
from emulator import Emulator

SIZE = (MODULUS_2048.bit_length() + 7) // 8
BIG = 100_000
SMALL = 1_000


def _submit_all(client: Any, n: int) -> list[concurrent.futures.Future[Any]]:
    return [client.mod_expo((i % 5000 + 2).to_bytes(SIZE, "big"), EXPONENT, MODULUS_2048) for i in range(n)]


def _bytes_per_outstanding(n: int) -> float:
    emu = Emulator("default", seed=1)
    client = SimClient(SimRunner(emu, FAST))
    client.runner.run(client.runner.now() + 0.05)  # bring-up; from here on the clock stands still
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        futs = _submit_all(client, n)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert client.core.undecided() == n and not any(f.done() for f in futs)
    client.close()
    emu.close()
    return held / n


def test_bytes_per_outstanding_request(benchmark, record_ratio) -> None:
    # run through pytest-benchmark (one round of three samples) so `make bench`, which passes
    # --benchmark-only, runs it rather than skipping it as a non-benchmark
    samples = benchmark.pedantic(lambda: [_bytes_per_outstanding(10_000) for _ in range(3)], rounds=1)
    per = statistics.median(samples)
    assert 800 < per < 64 * 1024  # at least the message itself; a sanity bound, not the figure
    record_ratio("bytes per outstanding request (ME-2048, 817-byte message), tracemalloc", per)


def _rate(client: Any, n: int) -> float:
    t = time.perf_counter()
    futs = _submit_all(client, n)
    concurrent.futures.wait(futs, timeout=600)
    rate = n / (time.perf_counter() - t)
    assert all(f.done() and f.exception() is None for f in futs)
    return rate


def _backlog_ratio(gc_on: bool) -> tuple[float, float]:
    emu = Emulator("overhead", clock="wall")
    was = gc.isenabled()
    try:
        with apcrypto.connect("emu:", emulator=emu, health_probe=False, backlog_limit=BIG) as client:
            assert client.wait_ready(10)
            _rate(client, 2 * SMALL)  # warm-up
            if not gc_on:
                gc.disable()
            small = statistics.median(_rate(client, SMALL) for _ in range(7))
            big = statistics.median(_rate(client, BIG) for _ in range(2))
    finally:
        if was:
            gc.enable()
        emu.close()
    return big / small, small


def test_deep_backlog_throughput(benchmark, record_ratio) -> None:
    # one pedantic round: the ratios are the figures; the fixture makes --benchmark-only run it
    (ratio, small), (ratio_nogc, _) = benchmark.pedantic(
        lambda: (_backlog_ratio(gc_on=True), _backlog_ratio(gc_on=False)), rounds=1
    )
    label = "emu:overhead (echo math), threaded client, medians"
    record_ratio(f"throughput, {BIG:,} submitted at once / {SMALL:,}, {label}", ratio)
    record_ratio(f"  ... the same with the cyclic GC off, {label}", ratio_nogc)
    record_ratio(f"  ... ops/s with {SMALL:,} at once, {label}", small)
