"""Bulk-stream reassembly, the h11 ``tr()`` three-way check: a stream of frames fed whole, byte by
byte, and with trailing bytes of a next frame that must stay behind.  Both sides of the USB path
reassemble (the device on bulk OUT, the host on bulk IN and interrupt IN), so both are checked."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Protocol

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apformats import frames
from apformats.errors import FormatError
from apformats.results import ApResult, Instr
from apformats.status import QueueStatus
from emulator.usb.stream import FrameAssembler
from emulator.usb_backend import codec_frame_size


class Assembler(Protocol):
    def feed(self, data: bytes) -> list[bytes]: ...
    @property
    def pending(self) -> int: ...
    def reset(self) -> None: ...


def _device_side() -> Assembler:
    return FrameAssembler(codec_frame_size())


def _host_side() -> Assembler:
    from apcrypto.transport.usb import FrameReader

    return FrameReader()


MAKERS: dict[str, Callable[[], Assembler]] = {"device": _device_side, "host": _host_side}

FRAMES = [
    frames.encode_hello(),
    frames.encode_command(1, Instr.NQAP, 0x0102, 0xAB, b"m" * 700),  # longer than one 512-byte packet
    frames.encode_result(1, ApResult(QueueStatus(queue_empty=True), 0xAB, b"r" * 256)),
    frames.encode_interrupt(0x0102),
    frames.encode_ping(3),
    frames.encode_command(2, Instr.TAPQ, 0x0001),
]
STREAM = b"".join(FRAMES)


@pytest.fixture(params=sorted(MAKERS))
def make(request: pytest.FixtureRequest) -> Callable[[], Assembler]:
    return MAKERS[request.param]


def test_whole(make: Callable[[], Assembler]) -> None:
    a = make()
    assert a.feed(STREAM) == FRAMES
    assert a.pending == 0


def test_byte_by_byte(make: Callable[[], Assembler]) -> None:
    a = make()
    out: list[bytes] = []
    for i in range(len(STREAM)):
        got = a.feed(STREAM[i : i + 1])
        # a frame comes out exactly when its last byte arrives, never before
        ends = {sum(len(f) for f in FRAMES[: k + 1]) for k in range(len(FRAMES))}
        assert bool(got) == (i + 1 in ends)
        out += got
    assert out == FRAMES


def test_trailing_bytes_stay_behind(make: Callable[[], Assembler]) -> None:
    a = make()
    nxt = frames.encode_ping(99)
    for cut in (1, frames.HEADER_LEN - 1, frames.HEADER_LEN, len(nxt) - 1):
        a.reset()
        assert a.feed(STREAM + nxt[:cut]) == FRAMES
        assert a.pending == cut
        assert a.feed(nxt[cut:]) == [nxt]
        assert a.pending == 0


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=20))
def test_any_split(cuts: list[int]) -> None:
    points = [0, *sorted(cuts), len(STREAM)]
    for make in MAKERS.values():
        a = make()
        out: list[bytes] = []
        for lo, hi in itertools.pairwise(points):
            out += a.feed(STREAM[lo:hi])
        assert out == FRAMES


def test_a_bad_header_raises_and_reset_recovers(make: Callable[[], Assembler]) -> None:
    a = make()
    with pytest.raises(FormatError):
        a.feed(b"ZZ" + STREAM[2:])
    a.reset()
    assert a.feed(STREAM) == FRAMES
    too_big = b"AP\x01\x10" + (1 << 20).to_bytes(4, "big")
    with pytest.raises(FormatError, match="limit"):  # refused from the header alone
        make().feed(too_big)


def test_host_reader_returns_good_frames_before_a_bad_header() -> None:
    a = _host_side()
    assert a.feed(STREAM + b"ZZ" + STREAM[2:]) == FRAMES  # the answers read so far are not lost
    with pytest.raises(FormatError):
        a.check()
    with pytest.raises(FormatError):
        a.feed(b"")
    a.reset()
    a.check()
    assert a.feed(STREAM) == FRAMES
