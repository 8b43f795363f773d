"""Driver over raw transport, per transport: the same pipelined work with and without the driver.

The raw side is :func:`apcrypto.bench.raw_transport_loop`: the Transport ABC used directly (fill
every accelerator queue's slots, DQAP when a status says a reply waits).  The driver side is the
public client on the same transport.  Both run here, one after the other, on the same adapter.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import apcrypto
from apcrypto.bench import driver_run, raw_transport_loop
from apcrypto.transport import open_transport
from emulator import Emulator
from emulator.usb_backend import EmulatorUsbBackend, VirtualBus

N = 1500


@pytest.fixture(params=["emu", "usb", "tcp"])
def target(request: pytest.FixtureRequest) -> Iterator[tuple[str, str, dict[str, Any]]]:
    if request.param == "tcp":
        yield "tcp", request.getfixturevalue("emulator_server"), {}
        return
    emu = Emulator("fast", clock="wall")
    if request.param == "emu":
        yield "emu", "emu:", {"emulator": emu}
    else:
        bus = VirtualBus()
        bus.plug(emu)
        yield "usb", "usb://1209:0a70", {"backend": EmulatorUsbBackend(bus)}
        bus.clear()
    emu.close()


def _rate(fn: Callable[[], int]) -> float:
    t = time.perf_counter()
    ops = fn()
    return ops / (time.perf_counter() - t)


def test_driver_over_raw_transport(benchmark, target, record_ratio) -> None:
    name, url, opts = target
    transport = open_transport(url, **opts)
    try:
        raw = max(_rate(lambda: raw_transport_loop(transport, N)) for _ in range(3))
    finally:
        transport.close()
    with apcrypto.connect(url, **opts) as client:
        assert client.wait_ready(10)
        ops = benchmark.pedantic(driver_run, args=(client, N), rounds=3, warmup_rounds=1)
    assert ops == N
    driver = N / benchmark.stats.stats.median
    benchmark.extra_info.update(transport=name, raw_ops_s=raw, driver_ops_s=driver)
    record_ratio(f"driver / raw transport loop, {name}://  ({driver:,.0f} vs {raw:,.0f} ops/s)", driver / raw)
