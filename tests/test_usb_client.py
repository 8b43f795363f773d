"""The public client over ``usb://``: ``apcrypto.connect`` drives the emulated adapter through real
pyusb, with the same results and outcomes as on the other transports."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import apcrypto
from emulator import Emulator
from tests._fixtures_firmware import PUBLIC_EXPONENT, crt_args, rsa_key
from tests._fixtures_usb import UsbBus, usb_bus

__all__ = ["usb_bus"]  # fixtures used here

URL = "usb://1209:0a70"


@pytest.fixture
def emu() -> Iterator[Emulator]:
    e = Emulator("default", clock="wall")  # real service times: replies come later, interrupts matter
    yield e
    e.close()


def test_mod_expo_and_crt_through_connect(usb_bus: UsbBus, emu: Emulator) -> None:
    usb_bus.plug(emu)
    key = rsa_key(2048)
    n, d = key.public_key().public_numbers().n, key.private_numbers().d
    with apcrypto.connect(URL, backend=usb_bus.backend, config="fast") as client:
        mex = [client.mod_expo(i + 2, PUBLIC_EXPONENT, n) for i in range(64)]
        crt = [client.mod_expo_crt(i + 2, *crt_args(key)) for i in range(16)]
        for i, f in enumerate(mex):
            assert f.result(10) == pow(i + 2, PUBLIC_EXPONENT, n).to_bytes(256, "big")
        for i, f in enumerate(crt):
            assert f.result(10) == pow(i + 2, d, n).to_bytes(256, "big")
        assert client.stats()["outcomes"].get("completed") == 80
    assert usb_bus.bus.devices()[0].stats.interrupts > 0  # the driver used the interrupt endpoint


def test_unplug_and_replug_under_load_loses_nothing(usb_bus: UsbBus, emu: Emulator) -> None:
    dev = usb_bus.plug(emu)
    n = rsa_key(2048).public_key().public_numbers().n
    with apcrypto.connect(
        URL, backend=usb_bus.backend, config="fast", timeout=0.5, peer_deadline=3.0
    ) as client:
        futs = [client.mod_expo(i + 2, PUBLIC_EXPONENT, n) for i in range(300)]
        dev.unplug()
        dev.replug()
        # idempotent work: whatever the unplug caught is re-driven, every future gets its result
        for i, f in enumerate(futs):
            assert f.result(15) == pow(i + 2, PUBLIC_EXPONENT, n).to_bytes(256, "big")
        assert client.transport.counters["reconnects"] >= 1
