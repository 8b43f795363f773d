"""Memory per outstanding request, and throughput with a deep backlog (issue 11, "Memory").

* bytes per outstanding request: ``tracemalloc``'s traced bytes, over N requests submitted through
  the client's operations (``SimClient``: the same futures and request objects as the threaded
  client, no runner thread) on the ``default`` profile with the virtual clock standing still (so
  none is decided: a few hold the cards' slots, the rest wait on the host), divided by N.  It
  includes the request's encoded message (the 2048-bit ME request is 817 bytes), the future and
  the ledger record.
  Beside it, the objects the cyclic garbage collector tracks per outstanding request (what a full
  collection walks: the stdlib future alone was eleven, :mod:`apcrypto.futures` makes it one).
* throughput with 100,000 requests submitted at once over the same with 1,000, the threaded client
  on ``emu:overhead`` (zero service times, echo math: the driver and its garbage collector are what
  is measured; the emulator's execution log is kept short, see ``_backlog_ratio``), medians; the
  same ratio with the cyclic GC off says how much of the gap is GC.
  Beside them, the CPU time of the whole process (caller, runner and emulator threads) per request
  at each depth, and the ratio again from those: on a shared machine, where other processes take
  the cores away at random, CPU time moves much less than a wall-clock rate.
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


def _per_outstanding(n: int) -> tuple[float, float]:
    """(bytes, GC-tracked objects) per outstanding request, over ``n`` held outstanding."""
    emu = Emulator("default", seed=1)
    client = SimClient(SimRunner(emu, FAST))
    client.runner.run(client.runner.now() + 0.05)  # bring-up; from here on the clock stands still
    gc.collect()
    tracked = len(gc.get_objects())
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        futs = _submit_all(client, n)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    tracked = len(gc.get_objects()) - tracked - 1  # less the list of futures itself
    assert client.core.undecided() == n and not any(f.done() for f in futs)
    client.close()
    emu.close()
    return held / n, tracked / n


def test_bytes_per_outstanding_request(benchmark, record_ratio) -> None:
    # run through pytest-benchmark (one round of three samples) so `make bench`, which passes
    # --benchmark-only, runs it rather than skipping it as a non-benchmark
    samples = benchmark.pedantic(lambda: [_per_outstanding(10_000) for _ in range(3)], rounds=1)
    per = statistics.median(s[0] for s in samples)
    objects = statistics.median(s[1] for s in samples)
    assert 800 < per < 64 * 1024  # at least the message itself; a sanity bound, not the figure
    assert 1 <= objects < 100  # at least the future; a sanity bound, not the figure
    record_ratio("bytes per outstanding request (ME-2048, 817-byte message), tracemalloc", per)
    record_ratio("  ... objects tracked by the cyclic GC per outstanding request", objects)


def _rate(client: Any, n: int) -> tuple[float, float]:
    """(requests per second, CPU microseconds of the whole process per request) for ``n`` at once."""
    t, cpu = time.perf_counter(), time.process_time()
    futs = _submit_all(client, n)
    concurrent.futures.wait(futs, timeout=600)
    rate = n / (time.perf_counter() - t)
    cpu_us = (time.process_time() - cpu) / n * 1e6
    assert all(f.done() and f.exception() is None for f in futs)
    return rate, cpu_us


def _backlog_ratio(gc_on: bool) -> dict[str, float]:
    emu = Emulator("overhead", clock="wall")
    # The in-process emulator is the rig, not the driver: its execution log (the tests' oracle, a
    # ring of up to 1,000,000 entries the GC tracks) would grow by one entry per request through the
    # whole bench, so every full collection in the 100,000-request runs would walk up to 200,000 more
    # of them than in the 1,000-request runs before (measured: ~6 us per request at 100,000 deep),
    # charging the rig's history to the driver's deep backlog. A server in its own process (tcp://)
    # keeps it out of the client's heap altogether; here a short ring does.
    emu.execution_log.configure(capacity=SMALL)
    was = gc.isenabled()
    try:
        with apcrypto.connect("emu:", emulator=emu, health_probe=False, backlog_limit=BIG) as client:
            assert client.wait_ready(10)
            _rate(client, 2 * SMALL)  # warm-up
            if not gc_on:
                gc.disable()
            small = [_rate(client, SMALL) for _ in range(7)]
            big = [_rate(client, BIG) for _ in range(2)]
    finally:
        if was:
            gc.enable()
        emu.close()
    small_rate = statistics.median(r for r, _ in small)
    return {
        "ratio": statistics.median(r for r, _ in big) / small_rate,
        "small": small_rate,
        "cpu_small": statistics.median(c for _, c in small),
        "cpu_big": statistics.median(c for _, c in big),
    }


def test_deep_backlog_throughput(benchmark, record_ratio) -> None:
    # one pedantic round: the ratios are the figures; the fixture makes --benchmark-only run it
    on, off = benchmark.pedantic(lambda: (_backlog_ratio(gc_on=True), _backlog_ratio(gc_on=False)), rounds=1)
    label = "emu:overhead (echo math), threaded client, medians"
    record_ratio(f"throughput, {BIG:,} submitted at once / {SMALL:,}, {label}", on["ratio"])
    cpu_label = f"  ... the same from CPU time per request ({SMALL:,} / {BIG:,}; moves less with load)"
    record_ratio(cpu_label, on["cpu_small"] / on["cpu_big"])
    record_ratio(f"  ... the same with the cyclic GC off, {label}", off["ratio"])
    record_ratio(f"  ... ops/s with {SMALL:,} at once, {label}", on["small"])
    record_ratio(f"  ... CPU us per request (whole process) with {SMALL:,} at once", on["cpu_small"])
    record_ratio(f"  ... CPU us per request (whole process) with {BIG:,} at once", on["cpu_big"])
    record_ratio(f"  ... the same with the cyclic GC off, {BIG:,} at once", off["cpu_big"])
