"""Instruction frames: round trips, the three-way decode check, limits, and fast path vs construct."""

from __future__ import annotations

import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apformats.errors import FormatError
from apformats.frames import (
    DEFAULT_MAX_FRAME,
    HEADER_LEN,
    TRAILER_LEN,
    Bye,
    CommandFrame,
    ErrorCode,
    ErrorFrame,
    FrameKind,
    Hello,
    InterruptFrame,
    Ping,
    Pong,
    Reoffer,
    ResultFrame,
    Welcome,
    decode_frame,
    decode_frame_spec,
    encode_bye,
    encode_command,
    encode_error,
    encode_frame,
    encode_frame_spec,
    encode_hello,
    encode_interrupt,
    encode_ping,
    encode_pong,
    encode_result,
    encode_welcome,
    error_code_for,
    frame_length,
    peek_kind,
    peek_tag,
)
from apformats.results import ApResult, Instr
from apformats.status import HwInfo, QueueStatus

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 0xFFFFFFFFFFFFFFFF)
small_bytes = st.binary(max_size=300)
text = st.text(max_size=40)

frames = st.one_of(
    st.builds(
        Hello,
        st.integers(0, 255),
        st.integers(0, 255),
        st.none() | st.lists(st.integers(0, 255), max_size=20).map(tuple),
        st.none() | st.binary(min_size=16, max_size=16),
    ),
    st.builds(
        Welcome,
        st.integers(0, 255),
        st.lists(u16, max_size=20).map(tuple),
        st.booleans(),
        u32,
        st.booleans(),
        st.none() | st.binary(min_size=16, max_size=16),
    ),
    st.builds(
        CommandFrame, u32, st.sampled_from(list(Instr)), u16, u64, small_bytes, st.booleans(), st.booleans()
    ),
    st.builds(ResultFrame, u32, u32, u64, small_bytes, st.none() | u64),
    st.builds(InterruptFrame, u16),
    st.builds(ErrorFrame, u32, st.sampled_from(list(ErrorCode)) | st.integers(100, 0xFFFF), text),
    st.builds(Ping, u64),
    st.builds(Pong, u64),
    st.builds(Bye, text),
    st.builds(Reoffer, st.lists(u32, max_size=30).map(tuple)),
)

hot_frames = st.one_of(
    st.builds(
        CommandFrame, u32, st.sampled_from(list(Instr)), u16, u64, small_bytes, st.booleans(), st.booleans()
    ),
    st.builds(ResultFrame, u32, u32, u64, small_bytes, st.none() | u64),
    st.builds(InterruptFrame, u16),
)


def reseal(data: bytes) -> bytes:
    """Recompute the CRC so a corruption reaches the body parser instead of stopping at the CRC."""
    body = data[:-TRAILER_LEN]
    return body + struct.pack(">I", zlib.crc32(body))


def outcome(fn, data: bytes):
    try:
        return fn(data)
    except FormatError as exc:
        return ("FormatError", type(exc).__name__)


EXAMPLES = [
    Hello(),
    Hello(1, 3, (0, 1, 5)),
    Hello(1, 1, ()),
    Welcome(1, (0x0001, 0x0105), True, 4096),
    Welcome(1, (), False),
    Hello(1, 1, None, bytes(range(16))),
    Welcome(1, (0x0203,), True, 65536, True, b"\xff" * 16),
    CommandFrame(7, Instr.NQAP, 0x0105, 0xDEADBEEF, b"\x00\x50abc", flag=False, special=True),
    CommandFrame(8, Instr.AQIC, 0x0001, flag=True),
    CommandFrame(0xFFFFFFFF, Instr.TAPQ, 0xFFFF),
    ResultFrame(3, QueueStatus(queue_empty=True).word, 0, b"", HwInfo(at=13, nd=16, qd=7).word),
    ResultFrame(4, 0, 2**64 - 1, b"reply bytes", None),
    InterruptFrame(0x0105),
    ErrorFrame(0, ErrorCode.NOT_HELLO, "say HELLO first"),
    ErrorFrame(9, 4242, "future code"),
    Ping(1),
    Pong(1),
    Bye(""),
    Bye("server shutting down"),
    Reoffer(()),
    Reoffer((1, 0xFFFFFFFF)),
]


@pytest.mark.parametrize("frame", EXAMPLES, ids=lambda f: type(f).__name__)
def test_round_trip_every_kind(frame) -> None:
    data = encode_frame(frame)
    assert data == encode_frame_spec(frame)
    assert decode_frame(data) == frame
    assert decode_frame_spec(data) == frame
    assert frame_length(data[:HEADER_LEN]) == len(data)
    assert peek_kind(data) is not None


@pytest.mark.parametrize("frame", EXAMPLES, ids=lambda f: type(f).__name__)
def test_three_way_decode(frame) -> None:
    """Whole frame decodes; every proper prefix and any trailing byte is a FormatError on both paths."""
    data = encode_frame(frame)
    for cut in range(len(data)):
        for fn in (decode_frame, decode_frame_spec):
            with pytest.raises(FormatError):
                fn(data[:cut])
    for fn in (decode_frame, decode_frame_spec):
        with pytest.raises(FormatError) as ei:
            fn(data + b"\x00")
        assert ei.value.kind == "trailing"


def test_helpers_match_dataclasses() -> None:
    assert decode_frame(encode_hello([1, 2])) == Hello(1, 1, (1, 2))
    assert decode_frame(encode_hello()) == Hello()
    assert decode_frame(encode_welcome([5], interrupts=True)) == Welcome(1, (5,), True)
    token = bytes(range(16))
    assert decode_frame(encode_hello([3], token=token)) == Hello(1, 1, (3,), token)
    resumed = decode_frame(encode_welcome([5], interrupts=False, resumed=True, token=token))
    assert resumed == Welcome(1, (5,), False, resumed=True, token=token)
    with pytest.raises(ValueError):
        encode_hello(token=b"short")  # a token is exactly 16 bytes
    assert decode_frame(encode_command(1, Instr.DQAP, 5)) == CommandFrame(1, Instr.DQAP, 5)
    assert decode_frame(encode_interrupt(5)) == InterruptFrame(5)
    assert decode_frame(encode_error(2, ErrorCode.TOO_BIG, "x")) == ErrorFrame(2, ErrorCode.TOO_BIG, "x")
    assert decode_frame(encode_ping(3)) == Ping(3)
    assert decode_frame(encode_pong(3)) == Pong(3)
    assert decode_frame(encode_bye("r")) == Bye("r")
    long_text = decode_frame(encode_error(0, ErrorCode.INTERNAL, "é" * 5000))
    assert isinstance(long_text, ErrorFrame) and len(long_text.text.encode()) <= 4096


def test_result_converts_to_and_from_apresult() -> None:
    res = ApResult(
        QueueStatus(replies_waiting=True, irq_enabled=True), 42, b"abc", HwInfo(at=14, nd=85, ml=3, qd=7)
    )
    frame = decode_frame(encode_result(9, res))
    assert isinstance(frame, ResultFrame)
    assert frame.tag == 9
    assert frame.to_result() == res
    assert ResultFrame.from_result(9, res) == frame
    plain = ApResult(QueueStatus(response_code=0x10))
    assert decode_frame(encode_result(1, plain)).to_result() == plain


def test_oversize_is_refused_from_the_header_alone() -> None:
    """A length over the limit is TOO_BIG even when the body never arrives: nothing is read or allocated."""
    header = struct.pack(">2sBBI", b"AP", 1, FrameKind.COMMAND, 0xFFFFFFF0)
    for fn in (decode_frame, decode_frame_spec):
        with pytest.raises(FormatError) as ei:
            fn(header)
        assert ei.value.kind == "too_big"
        assert error_code_for(ei.value) is ErrorCode.TOO_BIG
    with pytest.raises(FormatError, match="exceeds"):
        frame_length(header)
    msg = bytes(DEFAULT_MAX_FRAME)
    big = encode_command(5, Instr.NQAP, 1, 1, msg)
    with pytest.raises(FormatError) as ei:
        decode_frame(big)
    assert ei.value.kind == "too_big"
    assert peek_tag(big) == 5
    assert decode_frame(big, max_len=len(big)) == CommandFrame(5, Instr.NQAP, 1, 1, msg)


@pytest.mark.parametrize(
    ("mutate", "kind", "code"),
    [
        (lambda d: b"XX" + d[2:], "magic", ErrorCode.CORRUPT),
        (lambda d: reseal(d[:2] + b"\x02" + d[3:]), "version", ErrorCode.BAD_VERSION),
        (lambda d: reseal(d[:3] + b"\x77" + d[4:]), "kind", ErrorCode.UNKNOWN_KIND),
        (lambda d: reseal(d[:12] + b"\x7f" + d[13:]), "opcode", ErrorCode.UNKNOWN_OPCODE),
        (lambda d: reseal(d[:13] + b"\x80" + d[14:]), None, ErrorCode.MALFORMED),
        (lambda d: d[:20] + bytes([d[20] ^ 1]) + d[21:], "crc", ErrorCode.CORRUPT),
    ],
    ids=["magic", "version", "kind", "opcode", "reserved", "crc"],
)
def test_bad_frames_map_to_error_codes(mutate, kind, code) -> None:
    data = mutate(encode_command(77, Instr.NQAP, 0x0102, 5, b"hello"))
    for fn in (decode_frame, decode_frame_spec):
        with pytest.raises(FormatError) as ei:
            fn(data)
        if kind is not None:
            assert ei.value.kind == kind
        assert error_code_for(ei.value) is code
    # the tag is trusted only when the frame is intact apart from the refused field
    assert peek_tag(data) == (77 if kind in ("opcode", None) else 0)


def test_bad_utf8_and_field_checks() -> None:
    bad_text = reseal(encode_error(1, ErrorCode.MALFORMED, "ab")[:-6] + b"\xff\xfe" + b"\0\0\0\0")
    with pytest.raises(FormatError):
        decode_frame(bad_text)
    ok = encode_result(1, ApResult(QueueStatus()))
    hw_without_flag = reseal(ok[:24] + (1).to_bytes(8, "big") + ok[32:])
    for fn in (decode_frame, decode_frame_spec):
        with pytest.raises(FormatError):
            fn(hw_without_flag)
    domains_without_flag = reseal(encode_hello(())[:10] + b"\x00\x00\x01\x05" + b"\0\0\0\0")
    with pytest.raises(FormatError):
        decode_frame(domains_without_flag)


def test_encode_rejects_out_of_range() -> None:
    with pytest.raises(ValueError):
        encode_command(2**32, Instr.TAPQ, 1)
    with pytest.raises(ValueError):
        encode_frame(ResultFrame(1, 2**32))
    with pytest.raises(ValueError):
        encode_frame(InterruptFrame(2**16))
    with pytest.raises(TypeError):
        encode_frame("not a frame")  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(frames)
def test_every_frame_round_trips(frame) -> None:
    data = encode_frame(frame)
    assert data == encode_frame_spec(frame)
    assert decode_frame(data) == frame == decode_frame_spec(data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hot_frames, st.data())
def test_fast_path_agrees_with_construct_on_damage(frame, data) -> None:
    """Flip, truncate, extend: the fast path and construct both refuse or both decode the same frame."""
    raw = bytearray(encode_frame(frame))
    how = data.draw(st.sampled_from(["flip", "flip-resealed", "truncate", "extend", "splice-resealed"]))
    if how.startswith("flip"):
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] ^= data.draw(st.integers(1, 255))
    elif how == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif how == "extend":
        raw += data.draw(st.binary(min_size=1, max_size=8))
    else:  # replace a stretch of the body with arbitrary bytes, keeping or changing the length
        start = data.draw(st.integers(HEADER_LEN, len(raw) - TRAILER_LEN))
        end = data.draw(st.integers(start, len(raw) - TRAILER_LEN))
        raw = raw[:start] + bytearray(data.draw(st.binary(max_size=12))) + raw[end:]
        body_len = len(raw) - HEADER_LEN - TRAILER_LEN
        raw[4:8] = struct.pack(">I", body_len)
    blob = bytes(raw)
    if how.endswith("resealed") and len(blob) >= HEADER_LEN + TRAILER_LEN:
        blob = reseal(blob)
    assert outcome(decode_frame, blob) == outcome(decode_frame_spec, blob)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80))
def test_fast_path_agrees_with_construct_on_noise(noise) -> None:
    for head in (
        encode_command(1, Instr.TAPQ, 1)[:HEADER_LEN],
        encode_result(1, ApResult(QueueStatus()))[:HEADER_LEN],
        encode_interrupt(1)[:HEADER_LEN],
    ):
        blob = head[:4] + struct.pack(">I", len(noise)) + noise
        blob = blob + struct.pack(">I", zlib.crc32(blob))
        assert outcome(decode_frame, blob) == outcome(decode_frame_spec, blob)
    assert outcome(decode_frame, noise) == outcome(decode_frame_spec, noise)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(list(FrameKind)), st.binary(max_size=40))
def test_any_body_decodes_canonically_or_raises_format_error(kind, body) -> None:
    """Any body: decoding raises FormatError or yields a frame that re-encodes to the very same bytes."""
    blob = struct.pack(">2sBBI", b"AP", 1, kind, len(body)) + body
    blob += struct.pack(">I", zlib.crc32(blob))
    try:
        frame = decode_frame(blob)
    except FormatError:
        with pytest.raises(FormatError):
            decode_frame_spec(blob)
        return
    assert decode_frame_spec(blob) == frame
    assert encode_frame(frame) == blob


@settings(max_examples=200, deadline=None)
@given(u16, st.binary(max_size=6))
def test_interrupt_fast_path_equals_construct(qid, body) -> None:
    """INTERRUPT (about one per request on tcp://) skips construct: the bytes built are construct's, and
    any INTERRUPT body (right, short, long) decodes to the same frame or fails with the same error kind."""
    assert encode_interrupt(qid) == encode_frame_spec(InterruptFrame(qid))
    blob = reseal(struct.pack(">2sBBI", b"AP", 1, FrameKind.INTERRUPT, len(body)) + body + b"\0\0\0\0")
    try:
        fast: object = decode_frame(blob)
    except FormatError as exc:
        with pytest.raises(FormatError) as spec_exc:
            decode_frame_spec(blob)
        assert exc.kind == spec_exc.value.kind
        return
    assert fast == decode_frame_spec(blob) == InterruptFrame(int.from_bytes(body, "big"))
