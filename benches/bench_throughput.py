"""Driver throughput against the raw NQAP/DQAP loop and the raw firmware, in process (``emu:``).

The issue's target: the driver at half the raw loop's rate or better.  Each ratio is measured on one
profile, both sides in this run, as medians:

* ``overhead`` -- zero service times AND echo math (``timing.compute = "echo"``): no RSA is computed,
  so the ratio is the software's own cost (driver + emulator bookkeeping vs the bare loop).  Its
  replies are not RSA results; it is never used for correctness.  The driver's known-answer health
  probe rightly refuses such a card, so the driver runs with ``health_probe=False`` there (the
  probe is one request per queue at start-up, outside the timed part either way).
* ``fast`` -- zero service times with real gmpy2 math: what a user of ``fast`` sees (the math is
  most of the raw loop there).

The raw loop and the driver both encode their requests inside the timed part (a user of either
must); "firmware alone" times only the execution of requests built beforehand.

CPU per request (``time.process_time``) is reported beside each wall-clock ratio: client, runner and
emulator share this process, and CPU moves far less than ops/s when other work shares the machine.
``test_core_alone_cpu_per_request`` times the driver core by itself against a scripted card that
answers at once (``benches/cpu_per_request.py``, which also runs standalone for A/B comparisons).

Interrupts: the raw loop busy-polls (NQAP until full, DQAP until empty, no AQIC); the driver runs as
users run it, with interrupts on.  On ``emu:`` an interrupt is a Python call on the thread that sent
the batch (no frame, no thread switch), so the two differ by that call and the driver's DQAP
decisions, not by a wire cost.  Both run on a wall clock in this process; the raw loop on one
thread, the driver on the caller's and its runner's thread under one GIL.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import pytest

import apcrypto
import apcrypto.aio
from apcrypto.bench import EXPONENT, MODULUS_2048, driver_run, firmware_loop, raw_loop, workload
from emulator import Emulator, load_profile

N = 2000


def _options(profile: str) -> dict[str, object]:
    """Client options for ``profile``: no known-answer probe on an echo-math card (it would fail)."""
    return {"health_probe": False} if load_profile(profile).timing.compute == "echo" else {}


def _median_rate(fn: Callable[[], int], rounds: int = 5, cpu: list[float] | None = None) -> float:
    """Median ops/s of ``rounds`` calls; with ``cpu``, each call's process CPU per op is appended."""
    rates = []
    for _ in range(rounds):
        t, c = time.perf_counter(), time.process_time()
        ops = fn()
        rates.append(ops / (time.perf_counter() - t))
        if cpu is not None:
            cpu.append((time.process_time() - c) / ops)
    return statistics.median(rates)


ROUNDS = 7


@pytest.mark.parametrize("profile", ["overhead", "fast"])
def test_driver_over_raw_loop(benchmark, record_ratio, profile: str) -> None:
    """Driver and raw loop rounds *alternate* (driver, raw, driver, raw, ...; medians of each), so
    whatever else the machine does at some moment weighs on both sides alike instead of on whichever
    ran then.  Also reports CPU per request (``time.process_time``: client, runner and emulator share
    this process), which moves far less than wall-clock rates when other work shares the machine."""
    math = "echo math" if load_profile(profile).timing.compute == "echo" else "real math"
    emu = Emulator(profile, clock="wall")
    raw_emu = Emulator(profile, clock="wall")
    rates: dict[str, list[float]] = {"driver": [], "raw": []}
    cpus: dict[str, list[float]] = {"driver": [], "raw": []}

    def one(side: str, fn: Callable[[], int]) -> None:
        t, c = time.perf_counter(), time.process_time()
        ops = fn()
        rates[side].append(ops / (time.perf_counter() - t))
        cpus[side].append((time.process_time() - c) / ops)
        assert ops == N

    try:
        with apcrypto.connect("emu:", emulator=emu, **_options(profile)) as client:
            assert client.wait_ready(10)
            driver_run(client, N)  # warm-up, both sides
            raw_loop(raw_emu, N)

            def alternate() -> None:
                for _ in range(ROUNDS):
                    one("driver", lambda: driver_run(client, N))
                    one("raw", lambda: raw_loop(raw_emu, N))

            benchmark.pedantic(alternate, rounds=1, iterations=1)
    finally:
        emu.close()
        raw_emu.close()
    driver_rate = statistics.median(rates["driver"])
    raw_rate = statistics.median(rates["raw"])
    requests = workload(N)  # built outside the timed part: "firmware alone" is execution only
    fw_rate = _median_rate(lambda: firmware_loop(requests, load_profile(profile).timing.compute))
    label = f"emu:{profile} ({math}), ME-2048, medians of {ROUNDS} alternating rounds"
    record_ratio(f"driver / raw NQAP-DQAP loop, {label}", driver_rate / raw_rate)
    record_ratio(f"  ... driver ops/s, {label}", driver_rate)
    record_ratio(f"  ... raw loop ops/s, {label}", raw_rate)
    cpu_us = {side: statistics.median(values) * 1e6 for side, values in cpus.items()}
    record_ratio(f"  ... CPU us per request, driver (process), {label}", cpu_us["driver"])
    record_ratio(f"  ... CPU us per request, raw loop, {label}", cpu_us["raw"])
    record_ratio(f"driver / firmware alone (execution only), {label}", driver_rate / fw_rate)


def test_core_alone_cpu_per_request(benchmark, record_ratio) -> None:
    """The driver core alone (``benches/cpu_per_request.py``): 20,000 ME requests submitted at once
    to 16 queues of a scripted card that answers every instruction at once; no runner, no
    transport, no emulator, requests built beforehand.  CPU us per request: the core's own
    bookkeeping (ledger, dispatcher, queue machine, outbox) on the per-request path."""
    from cpu_per_request import core_round

    cpu: list[float] = []

    def one_round() -> int:
        seconds, done = core_round(20_000)
        cpu.append(seconds / done)
        return done

    assert benchmark.pedantic(one_round, rounds=5, warmup_rounds=1) == 20_000
    record_ratio(
        "driver core alone (scripted instant card, 16 queues), CPU us per request",
        statistics.median(cpu) * 1e6,
    )


def test_raw_loop(benchmark) -> None:
    with Emulator("overhead", clock="wall") as emu:
        assert benchmark.pedantic(raw_loop, args=(emu, N), rounds=5, warmup_rounds=1) == N


def test_asyncio_client(timed, record_ratio) -> None:
    """The asyncio client on ``emu:overhead``: only the gather of N requests is timed; the emulator,
    the connection and its readiness are set up once, outside."""
    import asyncio

    emu = Emulator("overhead", clock="wall")
    loop = asyncio.new_event_loop()
    size = (MODULUS_2048.bit_length() + 7) // 8
    try:
        client = loop.run_until_complete(apcrypto.aio.connect("emu:", emulator=emu, **_options("overhead")))
        assert loop.run_until_complete(client.wait_ready(10))

        async def work() -> int:
            res = await asyncio.gather(
                *[client.mod_expo((i + 2).to_bytes(size, "big"), EXPONENT, MODULUS_2048) for i in range(N)]
            )
            return len(res)

        ops, median = timed(lambda: loop.run_until_complete(work()), rounds=3, warmup_rounds=1)
        assert ops == N
        aio_rate = N / median
        loop.run_until_complete(client.aclose())
    finally:
        loop.close()
        emu.close()
    emu2 = Emulator("overhead", clock="wall")
    with emu2, apcrypto.connect("emu:", emulator=emu2, **_options("overhead")) as sync:
        assert sync.wait_ready(10)
        sync_rate = _median_rate(lambda: driver_run(sync, N), rounds=3)
    record_ratio("asyncio client / threaded client, emu:overhead (echo math), medians", aio_rate / sync_rate)
