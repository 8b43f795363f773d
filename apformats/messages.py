"""AP message layouts: construct definitions (the specification) and the public helpers.

All integers are big-endian.  Sources: ``reference/zcrypt.md`` §4.1-§4.4.

Type 50 request (RSA, accelerator) — 16-byte head, then fields right-justified and zero-padded::

    off size field                       variants (keyblock, fields @offset(size), total)
    0   1    reserved1 = 0               MEB1 0x0001 exponent 16(128) modulus 144 message 272      400
    1   1    msg_type_code = 0x50        MEB2 0x0002 exponent 16(256) modulus 272 message 528      784
    2   2    msg_len = total             MEB3 0x0003 exponent 16(512) modulus 528 message 1040    1552
    4   1    reserved2 = 0               CRB1 0x0011 p 16 q 80 dp 144 dq 208 u 272 (64) msg 336    464
    5   1    ignored                     CRB2 0x0012 p 16 q 144 dp 272 dq 400 u 528 (128) msg 656  912
    6   2    reserved3 = 0               CRB3 0x0013 p 16 q 272 dp 528 dq 784 u 1040 (256) msg 1296 1808
    8   2    keyblock_type
    10  6    reserved4 = 0

Type 80 reply: reserved, type 0x80, ``len`` (u16, total), code, 3+8 reserved, then the result
right-aligned at the end (``result = reply[16:len]``).

Type 82 / 87 / 88 error reply (8 bytes): reserved, type, u16 reserved, ``reply_code`` at byte 4,
3 reserved.  **Machine-failure reply** (our extension, still 8 bytes and a valid Linux type 82):
``reply_code`` = 0x10, byte 5 = :class:`MachineFailureState` (0 unknown = a plain Linux reply,
1 in-process, 2 request-pending), byte 6 = engine number or ``NO_ENGINE`` (0xFF).

CPRB request, **type 6** (our simplified design, not the 88-byte Linux type 6 header; the type
byte stays at offset 1)::

    off size field
    0   1    reserved = 0
    1   1    type = 0x06
    2   2    msg_len = 16 + payload_len
    4   4    reserved = 0
    8   2    function_code, 2 ASCII chars [A-Z0-9]
    10  2    domain (u16): the target domain, checked by the card
    12  4    payload_len (u32)
    16  n    payload

CPRB reply, **type 86** (16-byte head; ``reply_code`` at byte 4 as in type 82, same code space)::

    off size field
    0   1    reserved = 0
    1   1    type = 0x86
    2   2    msg_len = 16 + payload_len
    4   1    reply_code (0 = AP level ok)
    5   1    reserved = 0
    6   2    function_code (echo of the request's)
    8   2    rtcode (u16, CCA return code: 0 ok, 4 warning, 8 application error, 12/16 environment)
    10  2    rscode (u16, CCA reason code)
    12  4    payload_len (u32)
    16  n    payload

Function codes and payloads: ``RL`` random (req u16 count; reply: the bytes), ``CI`` counter
increment (req u64 increment; reply u64 new value), ``KS`` key-slot store (req u8 slot + key bytes;
reply empty), ``KR`` key-slot read (req u8 slot; reply the key bytes).

Parsers are strict about what identifies a message (type, keyblock, lengths) and, for requests,
reserved fields; reply parsers ignore reserved bytes (hardware may set them) and accept error
replies longer than 8 bytes (Linux reads only the first 8).  Every parser raises only
:class:`FormatError`.  The per-request helpers (the type 50 and type 6 builders, the parsers) run
the verified :mod:`apformats.fastpath`; the ``*_construct`` functions are the specification path
the tests compare it with.
"""

from __future__ import annotations

import construct as cs

from apformats import fastpath
from apformats.codes import NO_ENGINE, MachineFailureState, ReplyCode
from apformats.errors import FormatError
from apformats.msgtypes import (
    ERROR_TYPES,
    HEAD_LEN,
    MAX_MSG_LEN,
    VARIANT_BY_KEYBLOCK,
    VARIANT_BY_NAME,
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

__all__ = [
    "CPRB_REPLY",
    "CPRB_REQUEST",
    "ERROR_REPLY",
    "MACHINE_FAILURE_REPLY",
    "REQUEST_HEAD",
    "TYPE50_CRB1",
    "TYPE50_CRB2",
    "TYPE50_CRB3",
    "TYPE50_HEAD",
    "TYPE50_MEB1",
    "TYPE50_MEB2",
    "TYPE50_MEB3",
    "TYPE50_STRUCTS",
    "TYPE80_REPLY",
    "Reply",
    "Request",
    "build_cprb",
    "build_cprb_construct",
    "build_cprb_reply",
    "build_crt",
    "build_crt_construct",
    "build_error_reply",
    "build_machine_failure",
    "build_mex",
    "build_mex_construct",
    "build_type80",
    "parse_reply",
    "parse_reply_construct",
    "parse_request",
    "parse_request_construct",
    "request_function",
    "request_function_construct",
]

# --- construct definitions: the specification ---------------------------------------------------

#: The 16 bytes every type 50 starts with, read without judging them (variant selection).
TYPE50_HEAD = cs.Struct(
    "reserved1" / cs.Int8ub,
    "msg_type_code" / cs.Const(0x50, cs.Int8ub),
    "msg_len" / cs.Int16ub,
    "reserved2" / cs.Int8ub,
    "ignored" / cs.Int8ub,
    "reserved3" / cs.Int16ub,
    "keyblock_type" / cs.Int16ub,
    "reserved4" / cs.Bytes(6),
)


def _type50_struct(variant: Type50Variant) -> cs.Struct:
    return cs.Struct(
        "reserved1" / cs.Const(0, cs.Int8ub),
        "msg_type_code" / cs.Const(0x50, cs.Int8ub),
        "msg_len" / cs.Const(variant.total, cs.Int16ub),
        "reserved2" / cs.Const(0, cs.Int8ub),
        "ignored" / cs.Default(cs.Int8ub, 0),
        "reserved3" / cs.Const(0, cs.Int16ub),
        "keyblock_type" / cs.Const(variant.keyblock, cs.Int16ub),
        "reserved4" / cs.Const(bytes(6)),
        *(name / cs.BytesInteger(size) for name, _off, size in variant.fields),
        cs.Terminated,
    )


TYPE50_MEB1 = _type50_struct(VARIANT_BY_NAME["MEB1"])
TYPE50_MEB2 = _type50_struct(VARIANT_BY_NAME["MEB2"])
TYPE50_MEB3 = _type50_struct(VARIANT_BY_NAME["MEB3"])
TYPE50_CRB1 = _type50_struct(VARIANT_BY_NAME["CRB1"])
TYPE50_CRB2 = _type50_struct(VARIANT_BY_NAME["CRB2"])
TYPE50_CRB3 = _type50_struct(VARIANT_BY_NAME["CRB3"])
TYPE50_STRUCTS: dict[str, cs.Struct] = {
    "MEB1": TYPE50_MEB1,
    "MEB2": TYPE50_MEB2,
    "MEB3": TYPE50_MEB3,
    "CRB1": TYPE50_CRB1,
    "CRB2": TYPE50_CRB2,
    "CRB3": TYPE50_CRB3,
}

TYPE80_REPLY = cs.Struct(
    "reserved1" / cs.Default(cs.Int8ub, 0),
    "type" / cs.Const(0x80, cs.Int8ub),
    "len" / cs.Rebuild(cs.Int16ub, lambda ctx: HEAD_LEN + len(ctx.result)),
    "code" / cs.Default(cs.Int8ub, 0),
    "reserved2" / cs.Default(cs.Bytes(3), bytes(3)),
    "reserved3" / cs.Default(cs.Bytes(8), bytes(8)),
    "result" / cs.Bytes(cs.this.len - HEAD_LEN),
    cs.Terminated,
)

#: Type 82 / 87 / 88: bytes 5 and 6 are reserved in Linux, ours in a type 82 machine-failure reply.
ERROR_REPLY = cs.Struct(
    "reserved1" / cs.Default(cs.Int8ub, 0),
    "type" / cs.Int8ub,
    cs.Check(lambda ctx: ctx.type in ERROR_TYPES),
    "reserved2" / cs.Default(cs.Int16ub, 0),
    "reply_code" / cs.Int8ub,
    "byte5" / cs.Default(cs.Int8ub, 0),
    "byte6" / cs.Default(cs.Int8ub, 0),
    "reserved3" / cs.Default(cs.Int8ub, 0),
    "trailer" / cs.Default(cs.GreedyBytes, b""),
)

#: Our machine-failure reply: a type 82 with reply code 0x10 and the held message's state.
MACHINE_FAILURE_REPLY = cs.Struct(
    "reserved1" / cs.Const(0, cs.Int8ub),
    "type" / cs.Const(0x82, cs.Int8ub),
    "reserved2" / cs.Const(0, cs.Int16ub),
    "reply_code" / cs.Const(int(ReplyCode.MACHINE_FAILURE), cs.Int8ub),
    "state" / cs.Int8ub,
    "engine" / cs.Int8ub,  # NO_ENGINE (0xFF) for request-pending
    "reserved3" / cs.Const(0, cs.Int8ub),
)

_FC = cs.Bytes(2)

CPRB_REQUEST = cs.Struct(
    "reserved1" / cs.Const(0, cs.Int8ub),
    "type" / cs.Const(0x06, cs.Int8ub),
    "msg_len" / cs.Rebuild(cs.Int16ub, lambda ctx: HEAD_LEN + len(ctx.payload)),
    "reserved2" / cs.Const(bytes(4)),
    "function_code" / _FC,
    "domain" / cs.Int16ub,
    "payload_len" / cs.Rebuild(cs.Int32ub, cs.len_(cs.this.payload)),
    "payload" / cs.Bytes(cs.this.payload_len),
    cs.Terminated,
    cs.Check(cs.this.msg_len == HEAD_LEN + cs.this.payload_len),
)

CPRB_REPLY = cs.Struct(
    "reserved1" / cs.Default(cs.Int8ub, 0),
    "type" / cs.Const(0x86, cs.Int8ub),
    "msg_len" / cs.Rebuild(cs.Int16ub, lambda ctx: HEAD_LEN + len(ctx.payload)),
    "reply_code" / cs.Default(cs.Int8ub, 0),
    "reserved2" / cs.Default(cs.Int8ub, 0),
    "function_code" / _FC,
    "rtcode" / cs.Default(cs.Int16ub, 0),
    "rscode" / cs.Default(cs.Int16ub, 0),
    "payload_len" / cs.Rebuild(cs.Int32ub, cs.len_(cs.this.payload)),
    "payload" / cs.Bytes(cs.this.payload_len),
    cs.Terminated,
    cs.Check(cs.this.msg_len == HEAD_LEN + cs.this.payload_len),
)

#: What identifies a request's operation class: type byte 1 and the 2 bytes at offset 8
#: (type 50 keyblock_type; type 6 function_code).  Nothing else is read.
REQUEST_HEAD = cs.Struct(
    cs.Padding(1),
    "type" / cs.Int8ub,
    cs.Padding(6),
    "selector" / cs.Switch(cs.this.type, {0x50: cs.Int16ub, 0x06: _FC}, default=cs.Error),
    cs.Padding(6),
)

_REPLY_TYPE = cs.Struct(cs.Padding(1), "type" / cs.Int8ub)

_CONSTRUCT_ERRORS = (cs.ConstructError, UnicodeError, OverflowError)


def _format_error(exc: Exception, what: str) -> FormatError:
    """One FormatError for any construct failure; kind guessed from the field path."""
    path = str(getattr(exc, "path", "") or "")
    kind = "malformed"
    if isinstance(exc, cs.StreamError | cs.TerminatedError) or "len" in path:
        kind = "length"
    elif "reserved" in path:
        kind = "reserved"
    elif "type" in path:
        kind = "type"
    return FormatError(f"{what}: {exc}", kind=kind)


# --- builders -----------------------------------------------------------------------------------


def build_mex(data: int | bytes, exponent: int | bytes, modulus: int | bytes) -> bytes:
    """Type 50 ME request (MEB1/2/3 by modulus length ≤128/≤256/≤512 bytes).

    ``ValueError`` only for what cannot be encoded (zero-length or >512-byte modulus, data or
    exponent longer than the modulus); operand values (even modulus, data ≥ modulus) are the card's
    to reject, so they encode.
    """
    return fastpath.build_mex(data, exponent, modulus)


def build_mex_construct(data: int | bytes, exponent: int | bytes, modulus: int | bytes) -> bytes:
    """:func:`build_mex` through the construct definition (the specification path)."""
    variant, parts = plan_mex(data, exponent, modulus)
    return TYPE50_STRUCTS[variant.name].build({k: int.from_bytes(v, "big") for k, v in parts.items()})


def build_crt(
    data: int | bytes, p: int | bytes, q: int | bytes, dp: int | bytes, dq: int | bytes, qinv: int | bytes
) -> bytes:
    """Type 50 CRT request (CRB1/2/3); ``qinv`` = q⁻¹ mod p (cryptography's ``iqmp``) goes in ``u``.

    ``ValueError`` when the key cannot be encoded (p*q zero or over 512 bytes, a part over the
    half-size field, data longer than the modulus).
    """
    return fastpath.build_crt(data, p, q, dp, dq, qinv)


def build_crt_construct(
    data: int | bytes, p: int | bytes, q: int | bytes, dp: int | bytes, dq: int | bytes, qinv: int | bytes
) -> bytes:
    """:func:`build_crt` through the construct definition (the specification path)."""
    variant, parts = plan_crt(data, p, q, dp, dq, qinv)
    return TYPE50_STRUCTS[variant.name].build({k: int.from_bytes(v, "big") for k, v in parts.items()})


def build_type80(result: bytes) -> bytes:
    """Type 80 success reply carrying ``result`` (right-aligned at the end, as the driver reads it)."""
    if HEAD_LEN + len(result) > MAX_MSG_LEN:
        raise ValueError(f"result of {len(result)} bytes does not fit a type 80")
    return b"\x00\x80" + (HEAD_LEN + len(result)).to_bytes(2, "big") + bytes(12) + bytes(result)


def build_error_reply(reply_code: int, *, msg_type: int = 0x82) -> bytes:
    """8-byte error reply (type 82 by default, 87 or 88) with ``reply_code`` at byte 4."""
    if msg_type not in ERROR_TYPES:
        raise ValueError(f"{msg_type:#x} is not an error reply type")
    if not 0 <= reply_code <= 0xFF:
        raise ValueError(f"reply code {reply_code} out of range")
    return bytes((0, msg_type, 0, 0, reply_code, 0, 0, 0))


def build_machine_failure(state: MachineFailureState, engine: int | None) -> bytes:
    """Type 82 / MACHINE_FAILURE reply saying what the held message was doing (byte 5) and where (6)."""
    state = MachineFailureState(state)
    if engine is not None and not 0 <= engine < NO_ENGINE:
        raise ValueError(f"engine {engine} out of range 0..{NO_ENGINE - 1}")
    return bytes(
        (0, 0x82, 0, 0, ReplyCode.MACHINE_FAILURE, state, NO_ENGINE if engine is None else engine, 0)
    )


def _check_cprb_args(function: str, payload: bytes) -> bytes:
    fc = function.encode("ascii", "replace")
    decode_fc(fc, 8)  # raises FormatError(ValueError) for a bad code
    if HEAD_LEN + len(payload) > MAX_MSG_LEN:
        raise ValueError(f"payload of {len(payload)} bytes does not fit msg_len")
    return fc


def build_cprb(function: str, domain: int, payload: bytes = b"") -> bytes:
    """Type 6 CPRB request (layout in the module docstring)."""
    return fastpath.build_cprb(function, domain, payload)


def build_cprb_construct(function: str, domain: int, payload: bytes = b"") -> bytes:
    """:func:`build_cprb` through the construct definition (the specification path)."""
    fc = _check_cprb_args(function, payload)
    if not 0 <= domain <= 0xFFFF:
        raise ValueError(f"domain {domain} out of range")
    return CPRB_REQUEST.build({"function_code": fc, "domain": domain, "payload": bytes(payload)})


def build_cprb_reply(
    function: str, payload: bytes = b"", *, rtcode: int = 0, rscode: int = 0, reply_code: int = 0
) -> bytes:
    """Type 86 CPRB reply; a CCA application error is ``rtcode`` 8 with a reason in ``rscode``."""
    fc = _check_cprb_args(function, payload)
    if not (0 <= rtcode <= 0xFFFF and 0 <= rscode <= 0xFFFF and 0 <= reply_code <= 0xFF):
        raise ValueError(f"rtcode {rtcode} / rscode {rscode} / reply_code {reply_code} out of range")
    return CPRB_REPLY.build(
        {
            "function_code": fc,
            "payload": bytes(payload),
            "rtcode": rtcode,
            "rscode": rscode,
            "reply_code": reply_code,
        }
    )


# --- parsers ------------------------------------------------------------------------------------


def parse_reply(data: bytes) -> Reply:
    """Decode any reply (type 80, 82, 86, 87, 88); :class:`FormatError` for anything else."""
    return fastpath.parse_reply(data)


def parse_reply_construct(data: bytes) -> Reply:
    """:func:`parse_reply` through the construct definitions (the specification path)."""
    try:
        msg_type = _REPLY_TYPE.parse(data).type
        if msg_type == 0x80:
            c = TYPE80_REPLY.parse(data)
            return Reply("ok" if c.code == 0 else "error", 0x80, c.code, c.result)
        if msg_type in ERROR_TYPES:
            c = ERROR_REPLY.parse(data)
            return error_reply_fields(c.type, c.reply_code, c.byte5, c.byte6)
        if msg_type == 0x86:
            c = CPRB_REPLY.parse(data)
            return cprb_reply_fields(c.reply_code, c.rtcode, c.rscode, c.payload)
    except _CONSTRUCT_ERRORS as exc:
        raise _format_error(exc, "reply") from exc
    raise FormatError(f"message type {msg_type:#04x} is not a reply", kind="type", offset=1)


def parse_request(data: bytes) -> Request:
    """Decode a type 50 or type 6 request (the firmware's view); :class:`FormatError` otherwise."""
    return fastpath.parse_request(data)


def parse_request_construct(data: bytes) -> Request:
    """:func:`parse_request` through the construct definitions (the specification path)."""
    try:
        msg_type = _REPLY_TYPE.parse(data).type
        if msg_type == 0x50:
            head = TYPE50_HEAD.parse(data)
            variant = VARIANT_BY_KEYBLOCK.get(head.keyblock_type)
            if variant is None:
                raise FormatError(f"unknown keyblock {head.keyblock_type:#06x}", kind="keyblock", offset=8)
            c = TYPE50_STRUCTS[variant.name].parse(data)
            return Request(0x50, variant.name, **{name: c[name] for name, _o, _s in variant.fields})
        if msg_type == 0x06:
            c = CPRB_REQUEST.parse(data)
            fc = decode_fc(c.function_code, 8)
            return Request(0x06, function=fc, domain=c.domain, payload=c.payload)
    except _CONSTRUCT_ERRORS as exc:
        raise _format_error(exc, "request") from exc
    raise FormatError(f"message type {msg_type:#04x} is not a request", kind="type", offset=1)


def request_function(data: bytes) -> str:
    """Operation class of a request from its header alone (cheap; for the service-time model).

    ``"MEX_1K" | "MEX_2K" | "MEX_4K" | "CRT_1K" | "CRT_2K" | "CRT_4K" | "RNG" | "CPRB:<fc>"``;
    :class:`FormatError` if the header does not identify one (short, unknown type or keyblock,
    function code not two characters A-Z0-9).  Lengths and reserved fields are not checked.
    """
    return fastpath.request_function(data)


def request_function_construct(data: bytes) -> str:
    """:func:`request_function` through the construct definition (the specification path)."""
    try:
        c = REQUEST_HEAD.parse(data)
    except _CONSTRUCT_ERRORS as exc:
        raise _format_error(exc, "request header") from exc
    if c.type == 0x50:
        variant = VARIANT_BY_KEYBLOCK.get(c.selector)
        if variant is None:
            raise FormatError(f"unknown keyblock {c.selector:#06x}", kind="keyblock", offset=8)
        return variant.function
    return function_of_fc(decode_fc(c.selector, 8))
