"""Driver throughput against the raw NQAP/DQAP loop and the raw firmware, in process.

The issue's target: the driver at half the raw loop's rate or better.  Both run in this test on
the same emulator profile (zero service times: the measured cost is the software's alone).
"""

from __future__ import annotations

import statistics
import time

import pytest

import apcrypto
import apcrypto.aio
from apcrypto.bench import driver_run, firmware_loop, raw_loop, workload
from emulator import Emulator

N = 2000


def _median_rate(fn, rounds: int = 5) -> float:
    rates = []
    for _ in range(rounds):
        t = time.perf_counter()
        ops = fn()
        rates.append(ops / (time.perf_counter() - t))
    return statistics.median(rates)


@pytest.fixture
def fast_client():
    emu = Emulator("fast", clock="wall")
    client = apcrypto.connect("emu:", emulator=emu)
    client.wait_ready()
    yield client
    client.close()
    emu.close()


def test_driver_over_raw_loop(benchmark, fast_client, record_ratio) -> None:
    ops = benchmark.pedantic(driver_run, args=(fast_client, N), rounds=5, warmup_rounds=1)
    assert ops == N
    driver_rate = N / benchmark.stats.stats.median
    with Emulator("fast", clock="wall") as emu:
        raw_rate = _median_rate(lambda: raw_loop(emu, N))
    fw_rate = _median_rate(lambda: firmware_loop(workload(N)))
    benchmark.extra_info.update(driver_ops_s=driver_rate, raw_ops_s=raw_rate, firmware_ops_s=fw_rate)
    record_ratio("driver / raw NQAP-DQAP loop (in process, ME-2048)", driver_rate / raw_rate)
    record_ratio("driver / firmware alone (ME-2048)", driver_rate / fw_rate)


def test_raw_loop(benchmark) -> None:
    with Emulator("fast", clock="wall") as emu:
        assert benchmark.pedantic(raw_loop, args=(emu, N), rounds=5, warmup_rounds=1) == N


def test_asyncio_client(benchmark, record_ratio) -> None:
    import asyncio

    async def run() -> int:
        emu = Emulator("fast", clock="wall")
        async with apcrypto.aio.connect("emu:", emulator=emu) as c:
            res = await asyncio.gather(*[c.mod_expo((i + 2).to_bytes(256, "big"), 65537, (1 << 2047) | 0x1D7)
                                         for i in range(N)])  # fmt: skip
        emu.close()
        return len(res)

    loop = asyncio.new_event_loop()
    try:
        assert benchmark.pedantic(lambda: loop.run_until_complete(run()), rounds=3) == N
    finally:
        loop.close()
