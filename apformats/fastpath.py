"""Hand-written ``struct``/int fast paths for the per-request message helpers.

construct costs 20-35 µs per message; the driver and the emulator build, classify and parse one
message per request, so these run in a few µs instead.  The construct definitions in
:mod:`apformats.messages` stay the specification: ``tests/test_formats_messages.py`` proves with
hypothesis that every function here returns what its construct twin returns, on valid bytes and on
truncated or corrupted bytes (where both must raise :class:`FormatError`).

Error ``kind``s raised here are what the firmware maps to reply codes (``firmware_stubs``):
``"truncated"`` (shorter than a header), ``"type"``, ``"keyblock"``, ``"length"`` (msg_len or byte
count wrong), ``"reserved"`` (nonzero reserved field), ``"malformed"`` (bad function code),
``"field"`` (undefined field value).
"""

from __future__ import annotations

import struct
from typing import Any

from apformats.errors import FormatError
from apformats.msgtypes import (
    ERROR_TYPES,
    HEAD_LEN,
    MAX_MSG_LEN,
    TYPE50_VARIANTS,
    VARIANT_BY_KEYBLOCK,
    Reply,
    Request,
    Type50Variant,
    cprb_reply_fields,
    decode_fc,
    error_reply_fields,
    function_of_fc,
    plan_crt,
    plan_mex,
)

# Type 50 head: reserved1, type, msg_len, reserved2, ignored, reserved3, keyblock_type, reserved4.
_T50_HEAD = struct.Struct(">BBHBBHH6s")
# Type 6 / type 86 head (see messages.py docstring for the layout).
_T6_HEAD = struct.Struct(">BBH4s2sHI")
_T86_HEAD = struct.Struct(">BBHBB2sHHI")
_ZERO6 = bytes(6)
_ZERO4 = bytes(4)

_HEADS: dict[str, bytes] = {
    v.name: _T50_HEAD.pack(0, 0x50, v.total, 0, 0, 0, v.keyblock, _ZERO6) for v in TYPE50_VARIANTS
}


def _layout(variant: Type50Variant, parts: dict[str, bytes]) -> bytes:
    buf = bytearray(variant.total)
    buf[0:HEAD_LEN] = _HEADS[variant.name]
    for name, off, size in variant.fields:
        value = parts[name]
        end = off + size
        buf[end - len(value) : end] = value
    return bytes(buf)


def build_mex(data: int | bytes, exponent: int | bytes, modulus: int | bytes) -> bytes:
    """Fast path of :func:`apformats.messages.build_mex`."""
    variant, parts = plan_mex(data, exponent, modulus)
    return _layout(variant, parts)


def build_crt(
    data: int | bytes, p: int | bytes, q: int | bytes, dp: int | bytes, dq: int | bytes, qinv: int | bytes
) -> bytes:
    """Fast path of :func:`apformats.messages.build_crt`."""
    variant, parts = plan_crt(data, p, q, dp, dq, qinv)
    return _layout(variant, parts)


def build_cprb(function: str, domain: int, payload: bytes = b"") -> bytes:
    """Fast path of :func:`apformats.messages.build_cprb` (the same checks, in the same order)."""
    fc = function.encode("ascii", "replace")
    decode_fc(fc, 8)  # raises FormatError(ValueError) for a bad code
    n = len(payload)
    if HEAD_LEN + n > MAX_MSG_LEN:
        raise ValueError(f"payload of {n} bytes does not fit msg_len")
    if not 0 <= domain <= 0xFFFF:
        raise ValueError(f"domain {domain} out of range")
    return _T6_HEAD.pack(0, 0x06, HEAD_LEN + n, _ZERO4, fc, domain, n) + bytes(payload)


def _type50_variant(data: bytes) -> Type50Variant:
    variant = VARIANT_BY_KEYBLOCK.get((data[8] << 8) | data[9])
    if variant is None:
        raise FormatError(f"unknown keyblock type {data[8]:02x}{data[9]:02x}", kind="keyblock", offset=8)
    return variant


def request_function(data: bytes) -> str:
    """Fast path of :func:`apformats.messages.request_function` (header only)."""
    if len(data) < HEAD_LEN:
        raise FormatError(f"request of {len(data)} bytes is shorter than a header", kind="truncated")
    msg_type = data[1]
    if msg_type == 0x50:
        return _type50_variant(data).function
    if msg_type == 0x06:
        return function_of_fc(decode_fc(bytes(data[8:10]), 8))
    raise FormatError(f"message type {msg_type:#04x} is not a request", kind="type", offset=1)


def parse_request(data: bytes) -> Request:
    """Fast path of :func:`apformats.messages.parse_request`."""
    n = len(data)
    if n < HEAD_LEN:
        raise FormatError(f"request of {n} bytes is shorter than a header", kind="truncated")
    msg_type = data[1]
    if msg_type == 0x50:
        variant = _type50_variant(data)
        r1, _, msg_len, r2, _ignored, r3, _, r4 = _T50_HEAD.unpack_from(data)
        if n != variant.total or msg_len != variant.total:
            raise FormatError(
                f"{variant.name} needs {variant.total} bytes; got {n}, msg_len {msg_len}",
                kind="length",
                offset=2,
            )
        if r1 or r2 or r3 or r4 != _ZERO6:
            raise FormatError("nonzero reserved field in type 50 header", kind="reserved")
        values: dict[str, Any] = {
            name: int.from_bytes(data[off : off + size], "big") for name, off, size in variant.fields
        }
        return Request(0x50, variant.name, **values)
    if msg_type == 0x06:
        r1, _, msg_len, r2, fc_raw, domain, payload_len = _T6_HEAD.unpack_from(data)
        fc = decode_fc(fc_raw, 8)
        if msg_len != n or HEAD_LEN + payload_len != n:
            raise FormatError(
                f"type 6 of {n} bytes: msg_len {msg_len}, payload_len {payload_len}", kind="length", offset=2
            )
        if r1 or r2 != _ZERO4:
            raise FormatError("nonzero reserved field in type 6 header", kind="reserved")
        return Request(0x06, function=fc, domain=domain, payload=bytes(data[HEAD_LEN:]))
    raise FormatError(f"message type {msg_type:#04x} is not a request", kind="type", offset=1)


# A type 80 is parsed once per request on the driver's completion path.  A frozen dataclass sets
# each of its 8 fields through object.__setattr__ (about 1 us); setting the slots through their own
# descriptors, as that __init__ does underneath, builds the same value in half the time.  The
# hypothesis tests compare every parsed Reply with the construct path's (built by Reply()).
_new = object.__new__
_SET = tuple(Reply.__dict__[f].__set__ for f in Reply.__slots__)
_SET_NAMES = ("kind", "msg_type", "reply_code", "result", "mf_state", "engine", "rtcode", "rscode")
assert Reply.__slots__ == _SET_NAMES, "Reply's fields changed: update _type80"
_set_kind, _set_type, _set_code, _set_result, _set_mf, _set_engine, _set_rt, _set_rs = _SET


def _type80(code: int, result: bytes) -> Reply:
    """``Reply("ok" if code == 0 else "error", 0x80, code, result)``, built directly."""
    r = _new(Reply)
    _set_kind(r, "ok" if code == 0 else "error")
    _set_type(r, 0x80)
    _set_code(r, code)
    _set_result(r, result)
    _set_mf(r, None)
    _set_engine(r, None)
    _set_rt(r, None)
    _set_rs(r, None)
    return r


def parse_reply(data: bytes) -> Reply:
    """Fast path of :func:`apformats.messages.parse_reply`."""
    n = len(data)
    if n < 2:
        raise FormatError(f"reply of {n} bytes", kind="truncated")
    msg_type = data[1]
    if msg_type == 0x80:
        if n < HEAD_LEN:
            raise FormatError(f"type 80 of {n} bytes", kind="truncated")
        length = (data[2] << 8) | data[3]
        if length != n:
            raise FormatError(f"type 80 len {length} but {n} bytes", kind="length", offset=2)
        return _type80(data[4], bytes(data[HEAD_LEN:]))
    if msg_type in ERROR_TYPES:
        if n < 8:
            raise FormatError(f"type {msg_type:02x} of {n} bytes", kind="truncated")
        return error_reply_fields(msg_type, data[4], data[5], data[6])
    if msg_type == 0x86:
        if n < HEAD_LEN:
            raise FormatError(f"type 86 of {n} bytes", kind="truncated")
        _, _, msg_len, reply_code, _, _fc, rtcode, rscode, payload_len = _T86_HEAD.unpack_from(data)
        if msg_len != n or HEAD_LEN + payload_len != n:
            raise FormatError(
                f"type 86 of {n} bytes: msg_len {msg_len}, payload_len {payload_len}", kind="length", offset=2
            )
        return cprb_reply_fields(reply_code, rtcode, rscode, bytes(data[HEAD_LEN:]))
    raise FormatError(f"message type {msg_type:#04x} is not a reply", kind="type", offset=1)
