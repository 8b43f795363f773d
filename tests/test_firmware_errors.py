"""firmware_stubs: every bad-operand case yields its documented reply code, never an exception."""

from __future__ import annotations

import pytest
from _fixtures_firmware import context, crt_args, rsa_key
from hypothesis import given, settings
from hypothesis import strategies as st

from apformats import messages as m
from apformats.codes import ReplyCode
from apformats.msgtypes import VARIANT_BY_NAME
from firmware_stubs import INVALID_FUNCTION, REPLY_FOR_CONDITION, FirmwareResult, execute

ODD_1K = (1 << 1023) | 0x3D  # odd 1024-bit modulus, no key needed for operand checks
ODD_4K = (1 << 4095) | 1


def _patch(msg: bytes, offset: int, value: bytes) -> bytes:
    return msg[:offset] + value + msg[offset + len(value) :]


def _field_offset(variant: str, name: str) -> tuple[int, int]:
    return next((off, size) for n, off, size in VARIANT_BY_NAME[variant].fields if n == name)


def _crt_1k() -> bytes:
    return m.build_crt(7, *crt_args(rsa_key(1024)))


def _zero_field(msg: bytes, variant: str, name: str) -> bytes:
    off, size = _field_offset(variant, name)
    return _patch(msg, off, bytes(size))


_MEX = m.build_mex(7, 65537, ODD_1K)
_CI = m.build_cprb("CI", 5, (1).to_bytes(8, "big"))

# (id, request, card mode, extra context, expected reply code, expected function)
CASES = [
    ("even-modulus", m.build_mex(7, 65537, ODD_1K - 1), "accel", {}, ReplyCode.EVEN_MOD_IN_OPND, "MEX_1K"),
    ("data-equals-modulus", m.build_mex(ODD_1K, 3, ODD_1K), "accel", {}, ReplyCode.OPERAND_INVALID, "MEX_1K"),
    (
        "data-above-modulus",
        m.build_mex(b"\xff" * 128, 3, ODD_1K),
        "accel",
        {},
        ReplyCode.OPERAND_INVALID,
        "MEX_1K",
    ),
    (
        "modulus-over-card-max",
        m.build_mex(7, 3, ODD_4K),
        "accel",
        {"max_mod_bytes": 256},
        ReplyCode.OPERAND_SIZE,
        "MEX_4K",
    ),
    ("zero-modulus", m.build_mex(7, 3, bytes(128)), "accel", {}, ReplyCode.OPERAND_SIZE, "MEX_1K"),
    ("zero-exponent", m.build_mex(7, 0, ODD_1K), "accel", {}, ReplyCode.OPERAND_SIZE, "MEX_1K"),
    ("crt-zero-p", _zero_field(_crt_1k(), "CRB1", "p"), "accel", {}, ReplyCode.OPERAND_SIZE, "CRT_1K"),
    ("crt-zero-u", _zero_field(_crt_1k(), "CRB1", "u"), "accel", {}, ReplyCode.OPERAND_SIZE, "CRT_1K"),
    (
        "crt-even-p",
        m.build_crt(7, 1 << 511, (1 << 511) | 1, 3, 3, 3),
        "accel",
        {},
        ReplyCode.EVEN_MOD_IN_OPND,
        "CRT_1K",
    ),
    (
        "crt-even-q",
        m.build_crt(7, (1 << 511) | 1, 1 << 511, 3, 3, 3),
        "accel",
        {},
        ReplyCode.EVEN_MOD_IN_OPND,
        "CRT_1K",
    ),
    (
        "crt-data-over-n",
        m.build_crt(b"\xff" * 128, *crt_args(rsa_key(1024))),
        "accel",
        {},
        ReplyCode.OPERAND_INVALID,
        "CRT_1K",
    ),
    (
        "crt-4k-over-card-max",
        m.build_crt(7, *crt_args(rsa_key(4096))),
        "accel",
        {"max_mod_bytes": 256},
        ReplyCode.OPERAND_SIZE,
        "CRT_4K",
    ),
    (
        "msg-len-field",
        _patch(_MEX, 2, (401).to_bytes(2, "big")),
        "accel",
        {},
        ReplyCode.INVALID_MSG_LEN,
        "MEX_1K",
    ),
    ("short-for-variant", _MEX[:-1], "accel", {}, ReplyCode.INVALID_MSG_LEN, "MEX_1K"),
    ("long-for-variant", _MEX + b"\x00", "accel", {}, ReplyCode.INVALID_MSG_LEN, "MEX_1K"),
    ("reserved-byte-0", _patch(_MEX, 0, b"\x01"), "accel", {}, ReplyCode.RESERVD_FIELD, "MEX_1K"),
    ("reserved-byte-12", _patch(_MEX, 12, b"\x01"), "accel", {}, ReplyCode.RESERVD_FIELD, "MEX_1K"),
    ("unknown-keyblock", _patch(_MEX, 8, b"\x00\x14"), "accel", {}, ReplyCode.FORMAT_FIELD, INVALID_FUNCTION),
    ("empty", b"", "accel", {}, ReplyCode.MALFORMED_MSG, INVALID_FUNCTION),
    ("header-truncated", _MEX[:10], "accel", {}, ReplyCode.MALFORMED_MSG, INVALID_FUNCTION),
    ("cprb-on-accelerator", _CI, "accel", {}, ReplyCode.MESSAGE_TYPE, "CPRB:CI"),
    ("type50-on-cca", _MEX, "cca", {}, ReplyCode.MESSAGE_TYPE, "MEX_1K"),
    ("unknown-type", _patch(_MEX, 1, b"\x99"), "accel", {}, ReplyCode.MESSAGE_TYPE, INVALID_FUNCTION),
    ("reply-as-request", m.build_type80(b"abc"), "cca", {}, ReplyCode.MESSAGE_TYPE, INVALID_FUNCTION),
    ("unknown-cprb-function", m.build_cprb("ZZ", 5, b""), "cca", {}, ReplyCode.INVALID_COMMAND, "CPRB:ZZ"),
    (
        "cprb-wrong-domain",
        m.build_cprb("CI", 6, bytes(8)),
        "cca",
        {},
        ReplyCode.INVALID_DOMAIN_PENDING,
        "CPRB:CI",
    ),
    ("cprb-bad-fc", _patch(_CI, 8, b"c\x00"), "cca", {}, ReplyCode.MALFORMED_MSG, INVALID_FUNCTION),
    (
        "cprb-payload-len",
        _patch(_CI, 12, (9).to_bytes(4, "big")),
        "cca",
        {},
        ReplyCode.INVALID_MSG_LEN,
        "CPRB:CI",
    ),
    ("cprb-reserved", _patch(_CI, 6, b"\x01"), "cca", {}, ReplyCode.RESERVD_FIELD, "CPRB:CI"),
]


@pytest.mark.parametrize(
    ("request_bytes", "mode", "extra", "code", "function"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_gives_documented_reply_code(
    request_bytes: bytes, mode: str, extra: dict[str, int], code: ReplyCode, function: str
) -> None:
    ctx = context(mode, **extra)
    res = execute(request_bytes, ctx)
    assert res == FirmwareResult(m.build_error_reply(code), function, False, int(code), None)
    reply = m.parse_reply(res.reply)
    assert (reply.kind, reply.msg_type, reply.reply_code) == ("error", 0x82, code)
    assert ctx.store.counter == 0 and ctx.store.changes == 0  # a rejected request changes nothing


def test_every_documented_code_is_exercised() -> None:
    exercised = {c[4] for c in CASES}
    assert exercised == set(REPLY_FOR_CONDITION.values())


def test_ignored_header_byte_does_not_matter() -> None:
    assert execute(_patch(_MEX, 5, b"\x42"), context()).ok


_VALID = [_MEX, _CI, m.build_cprb("RL", 5, b"\x00\x08"), m.build_crt(7, 101, 103, 7, 11, 13)]


@settings(max_examples=200, derandomize=True, database=None, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=48),
        st.tuples(st.sampled_from(_VALID), st.integers(0, 20), st.integers(0, 255), st.booleans()).map(
            lambda t: (_patch(t[0], t[1], bytes([t[2]])))[: None if t[3] else -1]
        ),
    ),
    st.sampled_from(["accel", "cca"]),
)
def test_execute_never_raises_and_always_answers_a_parseable_reply(data: bytes, mode: str) -> None:
    res = execute(data, context(mode))
    reply = m.parse_reply(res.reply)
    assert reply.reply_code == res.reply_code
    assert res.ok == (reply.kind == "ok")
    if not res.ok and reply.msg_type == 0x82:
        assert res.reply_code in set(REPLY_FOR_CONDITION.values())
