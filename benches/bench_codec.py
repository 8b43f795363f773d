"""construct (the specification) against the verified struct fast paths, per hot-path format.

Each pair records ``construct / fast path`` (how many times slower the specification path is),
measured by pytest-benchmark in this run; the fast paths are proven equal to construct by
``tests/test_frames.py`` and the message tests.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from apformats import frames
from apformats import messages as msgs

MOD = (1 << 2047) | 0x1D7
DATA = (12345).to_bytes(256, "big")
REQ = msgs.build_mex(DATA, 65537, MOD)
REPLY = msgs.build_type80(DATA)
IRQ = frames.encode_frame_spec(frames.InterruptFrame(0x0105))

#: median seconds per call of each path, by format, to record the ratio once both ran
_MEDIANS: dict[str, dict[str, float]] = {}


def _pair(name: str, path: str, median: float, record_ratio: Callable[[str, float], None]) -> None:
    got = _MEDIANS.setdefault(name, {})
    got[path] = median
    if len(got) == 2:
        record_ratio(f"codec {name}: construct / struct fast path (x slower)", got["construct"] / got["fast"])


@pytest.mark.parametrize("path", ["fast", "construct"])
def test_build_mex_2048(timed, record_ratio, path: str) -> None:
    fn = msgs.build_mex if path == "fast" else msgs.build_mex_construct
    res, median = timed(fn, DATA, 65537, MOD)
    assert res == REQ
    _pair("build type 50 ME-2048", path, median, record_ratio)


@pytest.mark.parametrize("path", ["fast", "construct"])
def test_parse_type80_reply(timed, record_ratio, path: str) -> None:
    fn = msgs.parse_reply if path == "fast" else msgs.parse_reply_construct
    res, median = timed(fn, REPLY)
    assert res.result[-256:] == DATA
    _pair("parse type 80 reply", path, median, record_ratio)


@pytest.mark.parametrize("path", ["fast", "construct"])
def test_command_frame_round_trip(timed, record_ratio, path: str) -> None:
    frame = frames.decode_frame(frames.encode_command(7, 0x10, 0x0001, 99, REQ))
    enc, dec = (
        (frames.encode_frame, frames.decode_frame)
        if path == "fast"
        else (frames.encode_frame_spec, frames.decode_frame_spec)
    )
    res, median = timed(lambda: dec(enc(frame)))
    assert res == frame
    _pair("COMMAND frame encode+decode", path, median, record_ratio)


@pytest.mark.parametrize("path", ["fast", "construct"])
def test_interrupt_frame_round_trip(timed, record_ratio, path: str) -> None:
    """About one INTERRUPT per request on ``tcp://``: built by the server, parsed by the client."""
    frame = frames.InterruptFrame(0x0105)
    enc, dec = (
        (frames.encode_frame, frames.decode_frame)
        if path == "fast"
        else (frames.encode_frame_spec, frames.decode_frame_spec)
    )
    res, median = timed(lambda: dec(enc(frame)))
    assert res == frame and enc(frame) == IRQ
    _pair("INTERRUPT frame encode+decode", path, median, record_ratio)
