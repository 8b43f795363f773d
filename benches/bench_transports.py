"""Driver over raw transport, per transport: the same pipelined work with and without the driver.

The raw side is :func:`apcrypto.bench.raw_transport_loop`: the Transport ABC used directly (fill
every accelerator queue's slots, DQAP when a status or an INTERRUPT says a reply waits).  The driver
side is the public client on the same transport.  Both run here, one after the other, on the same
adapter, and are compared like with like:

* median against median (3 rounds each);
* the same interrupt setting: both arm AQIC where the transport delivers interrupts (the driver's
  default), both poll where it does not; the label says which;
* the ``overhead`` profile (zero service times, echo math: no RSA computed), so the adapter's
  engines and gmpy2 are not the limit and the figure is the software's.  The driver runs without
  its known-answer health probe there (echo math would rightly fail it; the probe is not timed).
"""

from __future__ import annotations

import statistics
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
ROUNDS = 3


@pytest.fixture(params=["emu", "usb", "tcp"])
def target(request: pytest.FixtureRequest) -> Iterator[tuple[str, str, dict[str, Any]]]:
    if request.param == "tcp":
        yield "tcp", request.getfixturevalue("emulator_server"), {}
        return
    emu = Emulator("overhead", clock="wall")
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


def test_driver_over_raw_transport(timed, target, record_ratio) -> None:
    name, url, opts = target
    transport = open_transport(url, **opts)
    try:
        raw = statistics.median(
            _rate(lambda: raw_transport_loop(transport, N, interrupts=True)) for _ in range(ROUNDS)
        )
        irq = transport.supports_interrupts  # known once the session is up (a server may refuse them)
    finally:
        transport.close()
    with apcrypto.connect(url, health_probe=False, use_interrupts=irq, **opts) as client:
        assert client.wait_ready(10)
        ops, median = timed(driver_run, client, N, rounds=ROUNDS, warmup_rounds=1)
    assert ops == N
    driver = N / median
    setting = "interrupts on" if irq else "polling, no interrupts"
    record_ratio(
        f"driver / raw transport loop, {name}:// overhead profile, {setting}, medians"
        f"  ({driver:,.0f} vs {raw:,.0f} ops/s)",
        driver / raw,
    )
