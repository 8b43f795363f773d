"""Value types and layout tables shared by the construct spec and the ``struct`` fast path.

Both :mod:`apformats.messages` (construct, the specification) and :mod:`apformats.fastpath`
(hand-written, the hot path) import from here, so the two paths cannot disagree about *what* a
variant is (offsets, sizes, keyblock codes) — only about how the bytes are read, which the tests
check.  Offsets and sizes are ``reference/zcrypt.md`` §4.1.
"""

from __future__ import annotations

from dataclasses import dataclass

from apformats.codes import MachineFailureState, ReplyCode
from apformats.errors import FormatError

#: Size of the common type 50 / type 80 / type 6 / type 86 header.
HEAD_LEN = 16
#: Size of a type 82 / 87 / 88 error reply (the only bytes Linux looks at).
ERROR_REPLY_LEN = 8
#: Largest modulus any type 50 variant carries (MEB3 / CRB3), bytes.
MAX_MOD_BYTES = 512
#: Largest total message our 16-bit ``msg_len`` fields can describe.
MAX_MSG_LEN = 0xFFFF
#: CPRB function codes are two characters from this alphabet ("RL", "CI", "PK", ...).
FC_ALPHABET = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
#: CPRB function code of the random-number request; its op class is ``"RNG"``, not ``"CPRB:RL"``.
FC_RANDOM = "RL"
#: Error-reply message types that share the 8-byte type 82 header (§4.3).
ERROR_TYPES = frozenset({0x82, 0x87, 0x88})


@dataclass(frozen=True, slots=True)
class Type50Variant:
    """One type 50 layout: where every field sits and how big the whole message is."""

    name: str  # "MEB1" .. "CRB3"
    keyblock: int  # keyblock_type at offset 8
    crt: bool
    mod_size: int  # size of the message field (the largest modulus the variant carries), bytes
    total: int  # total message size == msg_len
    fields: tuple[tuple[str, int, int], ...]  # (name, offset, size), in message order
    function: str  # op class for the service-time model: MEX_1K .. CRT_4K


def _me(name: str, keyblock: int, size: int, function: str) -> Type50Variant:
    fields = (("exponent", 16, size), ("modulus", 16 + size, size), ("message", 16 + 2 * size, size))
    return Type50Variant(name, keyblock, False, size, 16 + 3 * size, fields, function)


def _crt(name: str, keyblock: int, size: int, function: str) -> Type50Variant:
    half = size // 2
    names = ("p", "q", "dp", "dq", "u")
    keys = tuple((n, 16 + i * half, half) for i, n in enumerate(names))
    fields = (*keys, ("message", 16 + 5 * half, size))
    return Type50Variant(name, keyblock, True, size, 16 + 5 * half + size, fields, function)


#: All six variants, smallest first within each kind (§4.1).  Totals: 400/784/1552, 464/912/1808.
TYPE50_VARIANTS: tuple[Type50Variant, ...] = (
    _me("MEB1", 0x0001, 128, "MEX_1K"),
    _me("MEB2", 0x0002, 256, "MEX_2K"),
    _me("MEB3", 0x0003, 512, "MEX_4K"),
    _crt("CRB1", 0x0011, 128, "CRT_1K"),
    _crt("CRB2", 0x0012, 256, "CRT_2K"),
    _crt("CRB3", 0x0013, 512, "CRT_4K"),
)
VARIANT_BY_KEYBLOCK: dict[int, Type50Variant] = {v.keyblock: v for v in TYPE50_VARIANTS}
VARIANT_BY_NAME: dict[str, Type50Variant] = {v.name: v for v in TYPE50_VARIANTS}
ME_VARIANTS: tuple[Type50Variant, ...] = tuple(v for v in TYPE50_VARIANTS if not v.crt)
CRT_VARIANTS: tuple[Type50Variant, ...] = tuple(v for v in TYPE50_VARIANTS if v.crt)


@dataclass(frozen=True, slots=True)
class Reply:
    """A decoded reply, whatever its type: what the driver's classifier needs and nothing more.

    ``kind`` is ``"ok"`` for a type 80 with code 0 and a type 86 with reply_code 0 and CCA
    ``rtcode`` ≤ 4 (0 = success, 4 = warning); everything else is ``"error"``.  ``mf_state`` is set
    exactly when ``reply_code`` is MACHINE_FAILURE: decoded from byte 5 of a type 82 (our
    extension), ``UNKNOWN`` for other types, which carry no such field.  ``engine`` is set only for
    a known state with an engine byte other than 0xFF.
    """

    kind: str
    msg_type: int
    reply_code: int
    result: bytes = b""
    mf_state: MachineFailureState | None = None
    engine: int | None = None
    rtcode: int | None = None
    rscode: int | None = None


@dataclass(frozen=True, slots=True)
class Request:
    """A decoded request (type 50 or type 6), as the firmware sees it.

    Type 50 key parts are the integer values of their right-justified fields (``0`` for an all-zero
    field: the firmware reports that as a zero-length operand).  ``variant`` names the layout.
    Type 6 sets ``function``, ``domain`` and ``payload`` instead.
    """

    msg_type: int
    variant: str | None = None
    message: int = 0
    exponent: int | None = None
    modulus: int | None = None
    p: int | None = None
    q: int | None = None
    dp: int | None = None
    dq: int | None = None
    u: int | None = None
    function: str | None = None
    domain: int | None = None
    payload: bytes = b""


def decode_fc(raw: bytes, offset: int) -> str:
    """Validate and decode a 2-byte CPRB function code (both paths call this, so they agree)."""
    if len(raw) != 2 or raw[0] not in FC_ALPHABET or raw[1] not in FC_ALPHABET:
        raise FormatError(
            f"function code {raw!r} is not two characters A-Z0-9", kind="malformed", offset=offset
        )
    return raw.decode("ascii")


def error_reply_fields(msg_type: int, reply_code: int, b5: int, b6: int) -> Reply:
    """The :class:`Reply` of an 8-byte-header error reply; shared so both paths decode byte 5/6 alike."""
    mf_state: MachineFailureState | None = None
    engine: int | None = None
    if reply_code == ReplyCode.MACHINE_FAILURE:
        if msg_type == 0x82:
            try:
                mf_state = MachineFailureState(b5)
            except ValueError as exc:
                raise FormatError(f"machine-failure state {b5} unknown", kind="field", offset=5) from exc
            if mf_state is not MachineFailureState.UNKNOWN and b6 != 0xFF:
                engine = b6
        else:
            mf_state = MachineFailureState.UNKNOWN
    return Reply("error", msg_type, reply_code, b"", mf_state, engine)


def cprb_reply_fields(reply_code: int, rtcode: int, rscode: int, payload: bytes) -> Reply:
    """The :class:`Reply` of a type 86; shared so both paths classify ok/error alike."""
    kind = "ok" if reply_code == 0 and rtcode <= 4 else "error"
    mf_state = MachineFailureState.UNKNOWN if reply_code == ReplyCode.MACHINE_FAILURE else None
    return Reply(kind, 0x86, reply_code, payload, mf_state, None, rtcode, rscode)


def function_of_fc(fc: str) -> str:
    """Op class of a CPRB function code: ``"RNG"`` for random, ``"CPRB:<fc>"`` otherwise."""
    return "RNG" if fc == FC_RANDOM else f"CPRB:{fc}"


def key_part(value: int | bytes | bytearray | memoryview, name: str) -> bytes:
    """A key part or operand as big-endian bytes: ints minimal-length, bytes as given (zeros kept)."""
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{name} must not be negative")
        return value.to_bytes((value.bit_length() + 7) // 8, "big")
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise TypeError(f"{name} must be int or bytes, not {type(value).__name__}")


def plan_mex(
    data: int | bytes, exponent: int | bytes, modulus: int | bytes
) -> tuple[Type50Variant, dict[str, bytes]]:
    """Pick the ME variant and normalise the operands; ``ValueError`` if they cannot be encoded.

    The modulus length (``mod_len``) is the modulus' byte length (as given, for bytes).  Operand
    *values* are not judged here: an even modulus or data ≥ modulus is the card's to report.
    """
    mod = key_part(modulus, "modulus")
    mod_len = len(mod)
    if mod_len == 0:
        raise ValueError("modulus has zero length")
    if mod_len > MAX_MOD_BYTES:
        raise ValueError(f"modulus of {mod_len} bytes exceeds {MAX_MOD_BYTES}")
    parts = {"exponent": key_part(exponent, "exponent"), "modulus": mod, "message": key_part(data, "data")}
    for name in ("exponent", "message"):
        if len(parts[name]) > mod_len:
            raise ValueError(f"{name} is {len(parts[name])} bytes, longer than the {mod_len}-byte modulus")
    variant = ME_VARIANTS[0 if mod_len <= 128 else 1 if mod_len <= 256 else 2]
    return variant, parts


_CRT_NAMES = ("p", "q", "dp", "dq", "u")


def _product_byte_len(p: int, q: int) -> int:
    """Byte length of p*q without the multiplication unless the bit count sits on a byte boundary.

    p*q has ``bp + bq - 1`` or ``bp + bq`` bits; both give the same byte count except when
    ``bp + bq - 1`` is a multiple of 8.  Saves a 1024x1024-bit multiply per CRT request.
    """
    if not p or not q:
        return 0
    bits = p.bit_length() + q.bit_length()
    low, high = (bits - 1 + 7) // 8, (bits + 7) // 8
    return low if low == high else ((p * q).bit_length() + 7) // 8


def plan_crt(
    data: int | bytes,
    p: int | bytes,
    q: int | bytes,
    dp: int | bytes,
    dq: int | bytes,
    qinv: int | bytes,
) -> tuple[Type50Variant, dict[str, bytes]]:
    """Pick the CRT variant and normalise the operands; ``ValueError`` if they cannot be encoded.

    ``mod_len`` is the byte length of ``p*q``; the variant is the smallest whose message field
    holds ``mod_len`` bytes and whose half-size fields hold every key part.  ``u`` is ``qinv``.
    """
    parts = {n: key_part(v, n) for n, v in zip(_CRT_NAMES, (p, q, dp, dq, qinv), strict=True)}
    mod_len = _product_byte_len(int.from_bytes(parts["p"], "big"), int.from_bytes(parts["q"], "big"))
    if mod_len == 0:
        raise ValueError("modulus p*q has zero length")
    msg = key_part(data, "data")
    if len(msg) > mod_len:
        raise ValueError(f"data is {len(msg)} bytes, longer than the {mod_len}-byte modulus")
    parts["message"] = msg
    half = max(len(parts[n]) for n in _CRT_NAMES)
    for variant in CRT_VARIANTS:
        if mod_len <= variant.mod_size and half <= variant.mod_size // 2:
            return variant, parts
    raise ValueError(f"CRT key of {mod_len} bytes (largest part {half} bytes) does not fit CRB3")
