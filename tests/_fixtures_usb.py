"""Fixtures for the USB path: a private virtual bus per test, emulators on a wall clock, and an echo
session for tests of the USB plumbing alone.

Import the fixtures you use into the test module (``from tests._fixtures_usb import usb_bus, ...``).
Each test gets its own :class:`VirtualBus` and backend, so nothing a test plugs in outlives it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from apformats import frames
from emulator import Emulator
from emulator.usb_backend import EmulatorUsbBackend, VirtualBus, codec_frame_size

VID, PID = 0x1209, 0x0A70
EP_OUT, EP_IN, EP_IRQ = 0x01, 0x81, 0x82


class EchoSession:
    """A frame session that answers every frame with itself; a PING makes it raise an interrupt.

    Tests of descriptors, pipes and faults use it so they depend on the frame codec's framing only.
    """

    def __init__(self, notify: Callable[[bytes], None]) -> None:
        self.notify = notify
        self.closed = False
        self.seen: list[bytes] = []

    def handle(self, frame: bytes) -> list[bytes]:
        self.seen.append(frame)
        if isinstance(frames.decode_frame(frame), frames.Ping):
            self.notify(frames.encode_interrupt(0x0102))
        return [frame]

    def close(self) -> None:
        self.closed = True


class UsbBus:
    """A bus, its backend and helpers to plug echo devices or emulators."""

    def __init__(self, max_block_ms: int = 2000) -> None:
        self.bus = VirtualBus()
        self.backend = EmulatorUsbBackend(self.bus, max_block_ms=max_block_ms)
        self.sessions: list[EchoSession] = []

    def plug_echo(self, **options: object):  # -> VirtualUsbDevice
        def factory(notify: Callable[[bytes], None]) -> EchoSession:
            s = EchoSession(notify)
            self.sessions.append(s)
            return s

        return self.bus.plug(session_factory=factory, frame_size=codec_frame_size(), **options)

    def plug(self, emulator: Emulator, **options: object):  # -> VirtualUsbDevice
        return self.bus.plug(emulator, **options)


@pytest.fixture
def usb_bus() -> Iterator[UsbBus]:
    b = UsbBus()
    yield b
    b.bus.clear()


@pytest.fixture
def wall_emulator() -> Iterator[Emulator]:
    """The default topology with zero service times on a wall clock (replies are ready at once)."""
    emu = Emulator("fast", clock="wall")
    yield emu
    emu.close()


@pytest.fixture
def timed_emulator() -> Iterator[Emulator]:
    """The default topology with real service times on a wall clock (replies arrive later)."""
    emu = Emulator("default", clock="wall")
    yield emu
    emu.close()


def split_frames(data: bytes) -> list[frames.Frame]:
    """Decode a byte string holding whole frames back to back."""
    out = []
    i = 0
    while i < len(data):
        n = frames.frame_length(data[i : i + frames.HEADER_LEN])
        out.append(frames.decode_frame(data[i : i + n]))
        i += n
    return out
