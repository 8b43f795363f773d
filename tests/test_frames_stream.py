"""Stream reassembly (:class:`apformats.frames.FrameStream`), the h11 ``tr()`` three-way check: a
stream of frames fed whole, byte by byte, and with trailing bytes of a next frame that must stay
behind.  Both ends of the USB path use it (the host on bulk IN and interrupt IN with the codec's
header reader, the device on bulk OUT with the header hook ``emulator.usb_backend`` gives it), so
every property is checked in both configurations."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apformats import frames
from apformats.errors import FormatError
from apformats.frames import FrameStream
from apformats.results import ApResult, Instr
from apformats.status import QueueStatus
from emulator.usb_backend import codec_frame_size

MAKERS: dict[str, Callable[[], FrameStream]] = {
    "codec": FrameStream,  # the host's
    "hook": lambda: FrameStream(frame_size=codec_frame_size()),  # the device's
}

FRAMES = [
    frames.encode_hello(),
    frames.encode_command(1, Instr.NQAP, 0x0102, 0xAB, b"m" * 700),  # longer than one 512-byte packet
    frames.encode_result(1, ApResult(QueueStatus(queue_empty=True), 0xAB, b"r" * 256)),
    frames.encode_interrupt(0x0102),
    frames.encode_ping(3),
    frames.encode_command(2, Instr.TAPQ, 0x0001),
]
STREAM = b"".join(FRAMES)
TOO_BIG = b"AP\x01\x10" + (1 << 20).to_bytes(4, "big")  # a COMMAND header claiming a 1 MiB body


@pytest.fixture(params=sorted(MAKERS))
def make(request: pytest.FixtureRequest) -> Callable[[], FrameStream]:
    return MAKERS[request.param]


def test_whole(make: Callable[[], FrameStream]) -> None:
    a = make()
    assert a.feed(STREAM) == FRAMES
    assert a.pending == 0


def test_byte_by_byte(make: Callable[[], FrameStream]) -> None:
    a = make()
    ends = {sum(len(f) for f in FRAMES[: k + 1]) for k in range(len(FRAMES))}
    out: list[bytes] = []
    for i in range(len(STREAM)):
        got = a.feed(STREAM[i : i + 1])
        assert bool(got) == (i + 1 in ends)  # a frame comes out exactly when its last byte arrives
        out += got
    assert out == FRAMES


def test_trailing_bytes_stay_behind(make: Callable[[], FrameStream]) -> None:
    a = make()
    nxt = frames.encode_ping(99)
    for cut in (1, frames.HEADER_LEN - 1, frames.HEADER_LEN, len(nxt) - 1):
        a.reset()
        assert a.feed(STREAM + nxt[:cut]) == FRAMES
        assert a.pending == cut
        assert a.feed(nxt[cut:]) == [nxt]
        assert a.pending == 0


def test_memoryview_chunks(make: Callable[[], FrameStream]) -> None:
    """The host feeds views of a reused read buffer: the frames must not alias it."""
    buf = bytearray(STREAM)
    a = make()
    got = a.feed(memoryview(buf)[:100]) + a.feed(memoryview(buf)[100:])
    buf[:] = bytes(len(buf))
    assert got == FRAMES


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


def test_a_bad_header_raises_until_reset(make: Callable[[], FrameStream]) -> None:
    a = make()
    with pytest.raises(FormatError, match="magic"):
        a.feed(b"ZZ" + STREAM[2:])
    with pytest.raises(FormatError, match="magic"):  # out of step for good, good bytes or not
        a.feed(STREAM)
    a.reset()
    assert a.feed(STREAM) == FRAMES


def test_the_length_is_refused_from_the_header_alone(make: Callable[[], FrameStream]) -> None:
    with pytest.raises(FormatError, match="limit"):  # not one body byte waited for
        make().feed(TOO_BIG)


def test_max_len_is_the_limit_and_can_be_raised() -> None:
    big = frames.encode_command(1, Instr.NQAP, 1, 1, bytes(frames.DEFAULT_MAX_FRAME))
    with pytest.raises(FormatError, match="limit"):
        FrameStream().feed(big[: frames.HEADER_LEN])
    a = FrameStream(max_len=len(big))
    assert a.feed(big[:10]) == [] and a.feed(big[10:]) == [big]
    a.max_len = frames.HEADER_LEN + frames.TRAILER_LEN  # a peer's WELCOME may change it mid-stream
    with pytest.raises(FormatError, match="limit"):
        a.feed(big[: frames.HEADER_LEN])


def test_good_frames_before_a_bad_header_come_first(make: Callable[[], FrameStream]) -> None:
    a = make()
    assert a.feed(STREAM + b"ZZ" + STREAM[2:]) == FRAMES  # the answers read so far are not lost
    with pytest.raises(FormatError):
        a.check()
    with pytest.raises(FormatError):
        a.feed(b"")
    a.reset()
    a.check()
    assert a.feed(STREAM) == FRAMES


def test_a_hook_that_never_knows_keeps_buffering() -> None:
    a = FrameStream(frame_size=lambda header: None)  # the plumbing tests' device
    assert a.feed(STREAM) == [] and a.pending == len(STREAM)


def test_a_hook_length_shorter_than_a_header_is_refused() -> None:
    with pytest.raises(FormatError, match="shorter than a header"):
        FrameStream(frame_size=lambda header: 0).feed(STREAM)
