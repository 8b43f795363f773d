"""construct (the specification) against the verified struct fast paths, per hot-path format."""

from __future__ import annotations

import pytest

from apformats import frames
from apformats import messages as msgs

MOD = (1 << 2047) | 0x1D7
DATA = (12345).to_bytes(256, "big")
REQ = msgs.build_mex(DATA, 65537, MOD)
REPLY = msgs.build_type80(DATA)


@pytest.mark.parametrize("path", ["fast", "construct"])
def test_build_mex_2048(benchmark, path: str) -> None:
    fn = msgs.build_mex if path == "fast" else msgs.build_mex_construct
    assert benchmark(fn, DATA, 65537, MOD) == REQ


@pytest.mark.parametrize("path", ["fast", "construct"])
def test_parse_type80_reply(benchmark, path: str) -> None:
    fn = msgs.parse_reply if path == "fast" else msgs.parse_reply_construct
    assert benchmark(fn, REPLY).result[-256:] == DATA


def test_command_frame_round_trip(benchmark) -> None:
    def rt() -> object:
        return frames.decode_frame(frames.encode_command(7, 0x10, 0x0001, 99, REQ))

    assert benchmark(rt) is not None
