"""usb:// against awkward devices and buses, each found by a review that drove it into a dead link
or a hang: a second opener, stalls spread over time, a device that is not what it says during a
reconnect, a full bus.  Each test fails with its fix taken out."""

from __future__ import annotations

import copy
import time
import tomllib
from collections.abc import Iterator
from typing import Any

import pytest
import usb.core

from apcrypto.transport import Command, Completion, TransportLost, open_transport
from apformats.results import Instr, qid_of
from emulator import Emulator
from emulator.usb.descriptors import PROFILES_DIR
from emulator.usb_backend import EmulatorUsbBackend, VirtualBus, codec_frame_size

URL = "usb://1209:0a70"
QID = qid_of(0, 1)
EP_IRQ = 0x82


@pytest.fixture
def rig() -> Iterator[tuple[VirtualBus, EmulatorUsbBackend, Emulator]]:
    bus = VirtualBus()
    emu = Emulator("fast", clock="wall")
    try:
        yield bus, EmulatorUsbBackend(bus, max_block_ms=2000), emu
    finally:
        emu.close()


def _tapq(t: Any, tag: int, timeout: float = 3.0) -> Any:
    """Submit a TAPQ and return the event that ends it."""
    t.submit([Command(tag, Instr.TAPQ, QID)])
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for ev in t.poll(0.05):
            if isinstance(ev, Completion) and ev.tag == tag:
                return ev
            if isinstance(ev, TransportLost) and tag in ev.tags:
                return ev
    raise AssertionError(f"TAPQ {tag} never ended")


def test_a_second_opener_is_refused_and_the_first_session_lives_on(rig) -> None:
    bus, backend, emu = rig
    dev = bus.plug(emu)
    a = open_transport(URL, backend=backend, timeout=0.5, peer_deadline=5.0)
    try:
        with pytest.raises(ConnectionError, match="busy"):
            open_transport(URL, backend=backend, timeout=0.5)
        assert dev.stats.sessions == 1  # the refused opener did not reset the adapter's session
        assert isinstance(_tapq(a, 1), Completion)
        assert a.counters["links_lost"] == 0
    finally:
        a.close()


def test_stalls_spread_over_time_are_cleared_without_breaking_the_link(rig) -> None:
    """MAX_STALLS counts stalls in a row: a read that answers (even with nothing) ends the run."""
    from apcrypto.transport.usb import IDLE_POLL, MAX_STALLS

    bus, backend, emu = rig
    dev = bus.plug(emu)
    t = open_transport(URL, backend=backend, timeout=0.5, peer_deadline=5.0, reconnect_delay=0.01)
    try:
        for i in range(MAX_STALLS + 2):
            dev.stall(EP_IRQ)
            for _ in range(400):  # the transport's idle poll finds the halt and clears it
                if EP_IRQ not in dev.halted():
                    break
                time.sleep(0.005)
            assert isinstance(_tapq(t, i + 1), Completion)  # the link works between stalls
            time.sleep(3 * IDLE_POLL)  # and the endpoint is read (nothing to read) in between
        assert t.counters["stalls_cleared"] >= MAX_STALLS + 1 and t.counters["links_lost"] == 0
    finally:
        t.close()


def test_a_reconnect_that_meets_an_unexpected_error_tries_again(rig, monkeypatch) -> None:
    """Whatever a reconnect attempt raises (a device that is not what it says, a backend's bug), the
    attempt failed and the next one may find the adapter: the link is never lost for good."""
    bus, backend, emu = rig
    dev = bus.plug(emu)
    t = open_transport(URL, backend=backend, timeout=0.5, peer_deadline=10.0, reconnect_delay=0.01)
    try:
        real_find = usb.core.find
        calls = {"n": 0}

        def flaky_find(*args: Any, **kw: Any) -> Any:
            calls["n"] += 1
            if calls["n"] <= 2:
                raise AssertionError("a device that is not what it says")
            return real_find(*args, **kw)

        monkeypatch.setattr(usb.core, "find", flaky_find)
        dev.unplug()
        time.sleep(0.2)
        dev.replug()
        for _ in range(400):
            if t.state == "up":
                break
            time.sleep(0.01)
        assert t.state == "up" and t.counters["reconnect_errors"] == 2
        assert isinstance(_tapq(t, 1), Completion)
    finally:
        t.close()


def test_a_description_without_interface_0_is_refused_at_plug(rig) -> None:
    bus, _, emu = rig
    with open(PROFILES_DIR / "usb_default.toml", "rb") as f:
        raw = tomllib.load(f)
    bad = copy.deepcopy(raw)
    bad["configurations"][0]["interfaces"][0]["bInterfaceNumber"] = 1
    with pytest.raises(ValueError, match="no interface 0"):
        bus.plug(emu, bad)


def test_a_full_bus_refuses_the_128th_device() -> None:
    bus = VirtualBus()

    class Echo:
        def __init__(self, notify: Any) -> None:
            pass

        def handle(self, frame: bytes) -> list[bytes]:
            return [frame]

    for i in range(127):
        bus.plug(session_factory=Echo, frame_size=codec_frame_size(), serial=f"S{i}")
    with pytest.raises(ValueError, match="bus is full"):
        bus.plug(session_factory=Echo, frame_size=codec_frame_size(), serial="S127")
    assert len(bus.devices()) == 127


def test_a_command_the_restarted_adapter_refuses_never_ran_and_is_re_driven(rig) -> None:
    """After an adapter restart (no re-enumeration) the next command is answered NOT_HELLO: it was
    refused before it ran, so a state-changing request sent into it is re-driven once the session
    is renewed, not ended ``Indeterminate``."""
    import apcrypto

    bus, backend, emu = rig
    dev = bus.plug(emu)
    with apcrypto.connect(URL, backend=backend, config="fast", timeout=0.5, use_interrupts=False) as c:
        assert c.wait_ready(10)
        assert c.counter_increment(1).result(10) == 1
        dev.restart()
        futs = [c.counter_increment(1) for _ in range(6)]  # in flight together: each one refused
        assert all(isinstance(f.result(10), int) for f in futs)  # ran (once: below), after it
        assert c.transport.counters["refused_unrun"] >= 1  # type: ignore[attr-defined]
    starts = [e for e in emu.execution_log.entries() if e.function == "CPRB:CI" and e.started is not None]
    assert len(starts) == 1 + 6


@pytest.mark.parametrize(
    ("option", "value"),
    [("timeout", float("inf")), ("timeout", 0), ("peer_deadline", float("nan")), ("domains", [300])],
)
def test_a_bad_link_option_is_a_value_error_not_a_missing_device(rig, option: str, value: Any) -> None:
    """A caller retrying on ``ConnectionError`` would retry a bad option forever: it is refused at
    once, naming the option, on every framed transport."""
    bus, backend, emu = rig
    bus.plug(emu)
    with pytest.raises(ValueError, match=option):
        open_transport(URL, backend=backend, **{option: value})
    with pytest.raises(ValueError, match=option):
        open_transport("tcp://127.0.0.1:9", **{option: value})


def test_answers_waiting_on_the_adapter_are_read_while_it_holds_back_a_write(rig) -> None:
    """An adapter refuses (NAKs) bulk OUT while its answers fill its IN buffer; the one I/O thread
    must read them between attempts to write, or it waits for itself and every command in flight is
    reported lost although each was answered."""
    bus, backend, emu = rig
    dev = bus.plug(emu, in_backlog=16 * 1024)  # a small IN buffer: a few hundred answers fill it
    t = open_transport(URL, backend=backend, timeout=1.0, peer_deadline=5.0)
    try:
        first = [Command(tag, Instr.TAPQ, QID) for tag in range(1, 3001)]
        more = [Command(tag, Instr.TAPQ, QID) for tag in range(3001, 3006)]
        t.submit(first)
        for _ in range(2000):  # the adapter took them: its answers now fill its IN buffer
            if dev.stats.frames_in >= len(first):
                break
            time.sleep(0.005)
        t.submit(more)  # a write the adapter holds back until those answers are read
        ended: dict[int, Any] = {}
        end = time.monotonic() + 30
        while len(ended) < len(first) + len(more) and time.monotonic() < end:
            for ev in t.poll(0.05):
                if isinstance(ev, Completion):
                    ended[ev.tag] = ev
                elif isinstance(ev, TransportLost):
                    ended.update(dict.fromkeys(ev.tags, ev))
        assert len(ended) == 3005 and all(isinstance(ev, Completion) for ev in ended.values())
        assert t.counters["write_timeouts"] >= 1 and t.counters["links_lost"] == 0  # it did hold back
    finally:
        t.close()
