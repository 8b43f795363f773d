"""apformats.messages: exact type 50 layouts, round trips, bad bytes, fast path == construct."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apformats import messages as m
from apformats.codes import NO_ENGINE, MachineFailureState, ReplyCode
from apformats.errors import FormatError
from apformats.msgtypes import TYPE50_VARIANTS, VARIANT_BY_NAME, _product_byte_len

# Deterministic and bounded: the whole file runs in a few seconds.
FAST = settings(
    max_examples=150,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# zcrypt.md §4.1, typed in from the table (not computed from msgtypes): name -> (keyblock, total, fields).
LINUX_LAYOUT: dict[str, tuple[int, int, dict[str, tuple[int, int]]]] = {
    "MEB1": (0x0001, 400, {"exponent": (16, 128), "modulus": (144, 128), "message": (272, 128)}),
    "MEB2": (0x0002, 784, {"exponent": (16, 256), "modulus": (272, 256), "message": (528, 256)}),
    "MEB3": (0x0003, 1552, {"exponent": (16, 512), "modulus": (528, 512), "message": (1040, 512)}),
    "CRB1": (
        0x0011,
        464,
        {
            "p": (16, 64),
            "q": (80, 64),
            "dp": (144, 64),
            "dq": (208, 64),
            "u": (272, 64),
            "message": (336, 128),
        },
    ),
    "CRB2": (
        0x0012,
        912,
        {
            "p": (16, 128),
            "q": (144, 128),
            "dp": (272, 128),
            "dq": (400, 128),
            "u": (528, 128),
            "message": (656, 256),
        },
    ),
    "CRB3": (
        0x0013,
        1808,
        {
            "p": (16, 256),
            "q": (272, 256),
            "dp": (528, 256),
            "dq": (784, 256),
            "u": (1040, 256),
            "message": (1296, 512),
        },
    ),
}


def _outcome(fn: Callable[[bytes], Any], data: bytes) -> Any:
    """fn(data), or the FormatError class; any other exception propagates and fails the test."""
    try:
        return fn(data)
    except FormatError:
        return FormatError


def _assert_same(fast: Callable[[bytes], Any], spec: Callable[[bytes], Any], data: bytes) -> None:
    assert _outcome(fast, data) == _outcome(spec, data)


def _field(msg: bytes, off: int, size: int) -> bytes:
    return msg[off : off + size]


# --- exact type 50 layouts ----------------------------------------------------------------------


def test_variant_table_matches_linux_offsets() -> None:
    for v in TYPE50_VARIANTS:
        keyblock, total, fields = LINUX_LAYOUT[v.name]
        assert (v.keyblock, v.total) == (keyblock, total)
        assert {name: (off, size) for name, off, size in v.fields} == fields
        built = m.TYPE50_STRUCTS[v.name].build({name: 0 for name in fields})
        assert built == bytes([0, 0x50]) + total.to_bytes(2, "big") + bytes(4) + keyblock.to_bytes(
            2, "big"
        ) + bytes(total - 10)


@pytest.mark.parametrize("mod_len", [1, 64, 128, 129, 200, 256, 257, 384, 512])
def test_mex_layout_exact(mod_len: int) -> None:
    modulus = bytes([0xC3]) + bytes(i % 251 + 1 for i in range(mod_len - 1))
    exponent, data = b"\x03", b"\x7e"
    msg = m.build_mex(data, exponent, modulus)
    name = "MEB1" if mod_len <= 128 else "MEB2" if mod_len <= 256 else "MEB3"
    keyblock, total, fields = LINUX_LAYOUT[name]
    assert len(msg) == total
    assert msg[:16] == bytes([0, 0x50]) + total.to_bytes(2, "big") + bytes(4) + keyblock.to_bytes(
        2, "big"
    ) + bytes(6)
    for fname, value in (("exponent", exponent), ("modulus", modulus), ("message", data)):
        off, size = fields[fname]
        assert _field(msg, off, size) == bytes(size - len(value)) + value  # right-justified, zero-padded
    assert msg == m.build_mex_construct(data, exponent, modulus)
    assert m.request_function(msg) == VARIANT_BY_NAME[name].function


@pytest.mark.parametrize(
    ("bits", "name"), [(512, "CRB1"), (1024, "CRB1"), (1040, "CRB2"), (2048, "CRB2"), (4096, "CRB3")]
)
def test_crt_layout_exact(bits: int, name: str) -> None:
    p = (1 << (bits // 2 - 1)) | 0x11
    q = (1 << (bits // 2 - 1)) | 0x2B
    dp, dq, u, data = 0xAAAA, 0xBBBB, 0xCCCC, 0x1234
    msg = m.build_crt(data, p, q, dp, dq, u)
    keyblock, total, fields = LINUX_LAYOUT[name]
    assert len(msg) == total and msg[8:10] == keyblock.to_bytes(2, "big")
    assert int.from_bytes(msg[2:4], "big") == total
    for fname, value in (("p", p), ("q", q), ("dp", dp), ("dq", dq), ("u", u), ("message", data)):
        off, size = fields[fname]
        assert _field(msg, off, size) == value.to_bytes(size, "big")
    assert fields["p"][1] * 2 == fields["message"][1]  # half-size key fields
    assert msg == m.build_crt_construct(data, p, q, dp, dq, u)


def test_builders_encode_bad_operand_values_for_the_card_to_reject() -> None:
    even = (1 << 1023) | 2
    assert len(m.build_mex(3, 65537, even)) == 400  # even modulus still encodes
    n = (1 << 1023) | 1
    assert m.parse_request(m.build_mex(n, 3, n)).message == n  # data == modulus encodes
    assert m.parse_request(m.build_mex(b"\xff" * 128, 3, n)).message == (1 << 1024) - 1  # data > modulus
    assert m.parse_request(m.build_mex(5, 3, bytes(128))).modulus == 0  # all-zero modulus field


@pytest.mark.parametrize(
    ("data", "exponent", "modulus"),
    [
        (1, 3, 0),  # zero-length modulus
        (1, 3, b""),
        (1, 3, 1 << 4096),  # 513 bytes
        (1, 3, b"\x01" * 513),
        (1 << 1024, 3, (1 << 1023) | 1),  # data longer than the modulus
        (b"\x00" * 129, 3, (1 << 1023) | 1),
        (1, 1 << 1024, (1 << 1023) | 1),  # exponent longer than the modulus
        (-1, 3, 7),
    ],
)
def test_build_mex_rejects_unencodable(data: Any, exponent: Any, modulus: Any) -> None:
    with pytest.raises(ValueError):
        m.build_mex(data, exponent, modulus)
    with pytest.raises(ValueError):
        m.build_mex_construct(data, exponent, modulus)


def test_build_crt_rejects_unencodable() -> None:
    big = (1 << 2048) | 1  # p*q over 512 bytes
    with pytest.raises(ValueError):
        m.build_crt(1, big, big, 1, 1, 1)
    with pytest.raises(ValueError):
        m.build_crt(1, 0, 7, 1, 1, 1)  # modulus p*q = 0
    with pytest.raises(ValueError):
        m.build_crt(1 << 200, 1 << 80, 1 << 80, 1, 1, 1)  # data longer than modulus
    with pytest.raises(ValueError):
        m.build_crt(1, 3, 1 << 2050, 1, 1, 1)  # q does not fit a half-size field


# --- round trips ----------------------------------------------------------------------------------


def test_request_round_trips() -> None:
    n = (1 << 2047) | 12345
    req = m.parse_request(m.build_mex(42, 65537, n))
    assert (req.msg_type, req.variant, req.message, req.exponent, req.modulus) == (0x50, "MEB2", 42, 65537, n)
    req = m.parse_request(m.build_crt(9, 101, 103, 7, 11, 13))
    assert (req.variant, req.p, req.q, req.dp, req.dq, req.u, req.message) == ("CRB1", 101, 103, 7, 11, 13, 9)
    req = m.parse_request(m.build_cprb("KS", 0x1234, b"\x03key"))
    assert (req.msg_type, req.function, req.domain, req.payload) == (0x06, "KS", 0x1234, b"\x03key")


def test_cprb_layout() -> None:
    msg = m.build_cprb("CI", 7, (5).to_bytes(8, "big"))
    assert msg == bytes.fromhex("0006 0018 00000000 4349 0007 00000008 0000000000000005")
    reply = m.build_cprb_reply("CI", (6).to_bytes(8, "big"), rtcode=4, rscode=9)
    assert reply == bytes.fromhex("0086 0018 00 00 4349 0004 0009 00000008 0000000000000006")
    assert m.request_function(msg) == "CPRB:CI"
    assert m.request_function(m.build_cprb("RL", 0, b"\x00\x10")) == "RNG"


def test_reply_round_trips() -> None:
    r = m.parse_reply(m.build_type80(b"\x00\x01result"))
    assert (r.kind, r.msg_type, r.reply_code, r.result, r.mf_state) == (
        "ok",
        0x80,
        0,
        b"\x00\x01result",
        None,
    )
    raw = m.build_type80(b"x" * 512)
    assert len(raw) == 528 and raw[2:4] == (528).to_bytes(2, "big") and raw[-512:] == b"x" * 512
    for msg_type in (0x82, 0x87, 0x88):
        raw = m.build_error_reply(ReplyCode.OPERAND_INVALID, msg_type=msg_type)
        assert raw == bytes([0, msg_type, 0, 0, 0x82, 0, 0, 0])
        r = m.parse_reply(raw)
        assert (r.kind, r.msg_type, r.reply_code, r.mf_state, r.engine) == (
            "error",
            msg_type,
            0x82,
            None,
            None,
        )
    r = m.parse_reply(m.build_cprb_reply("RL", b"rand"))
    assert (r.kind, r.msg_type, r.result, r.rtcode, r.rscode) == ("ok", 0x86, b"rand", 0, 0)
    r = m.parse_reply(m.build_cprb_reply("KR", rtcode=8, rscode=65))
    assert (r.kind, r.rtcode, r.rscode, r.reply_code) == ("error", 8, 65, 0)
    with pytest.raises(ValueError):
        m.build_error_reply(0x82, msg_type=0x80)
    for bad in ({"rtcode": 0x10000}, {"rscode": -1}, {"reply_code": 0x100}):
        with pytest.raises(ValueError):
            m.build_cprb_reply("CI", **bad)
    for fc in ("ci", "C", "CIX", "C\u00e9"):
        with pytest.raises(ValueError):
            m.build_cprb(fc, 0)
    with pytest.raises(ValueError):
        m.build_cprb("CI", 0x10000)


@pytest.mark.parametrize(
    ("state", "engine", "byte5", "byte6"),
    [
        (MachineFailureState.IN_PROCESS, 3, 1, 3),
        (MachineFailureState.IN_PROCESS, None, 1, NO_ENGINE),
        (MachineFailureState.REQUEST_PENDING, None, 2, NO_ENGINE),
        (MachineFailureState.UNKNOWN, None, 0, NO_ENGINE),
    ],
)
def test_machine_failure_reply(
    state: MachineFailureState, engine: int | None, byte5: int, byte6: int
) -> None:
    raw = m.build_machine_failure(state, engine)
    assert raw == bytes([0, 0x82, 0, 0, 0x10, byte5, byte6, 0])  # 8 bytes: a valid Linux type 82
    r = m.parse_reply(raw)
    assert (r.kind, r.reply_code, r.mf_state, r.engine) == ("error", ReplyCode.MACHINE_FAILURE, state, engine)
    assert m.MACHINE_FAILURE_REPLY.parse(raw).state == byte5


def test_plain_linux_machine_failure_is_unknown_state() -> None:
    r = m.parse_reply(m.build_error_reply(ReplyCode.MACHINE_FAILURE))
    assert (r.mf_state, r.engine) == (MachineFailureState.UNKNOWN, None)
    r = m.parse_reply(m.build_error_reply(ReplyCode.MACHINE_FAILURE, msg_type=0x88))
    assert (r.mf_state, r.engine) == (MachineFailureState.UNKNOWN, None)


# --- bad bytes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"", "truncated"),
        (b"\x00\x80\x00\x10", "truncated"),
        (b"\x00\x80\x00\x20" + bytes(12), "length"),  # len 32 but 16 bytes
        (b"\x00\x82\x00\x00\x10\x07\x00\x00", "field"),  # undefined machine-failure state
        (b"\x00\x82\x00\x00\x10", "truncated"),
        (b"\x00\x50" + bytes(20), "type"),  # a request is not a reply
        (b"\x00\x86\x00\x10" + bytes(12)[:-4] + b"\x00\x00\x00\x05", "length"),
    ],
)
def test_parse_reply_rejects(data: bytes, kind: str) -> None:
    with pytest.raises(FormatError) as info:
        m.parse_reply(data)
    assert info.value.kind == kind
    with pytest.raises(FormatError):
        m.parse_reply_construct(data)


def _patched(msg: bytes, offset: int, value: bytes) -> bytes:
    return msg[:offset] + value + msg[offset + len(value) :]


_MEX = m.build_mex(3, 65537, (1 << 1023) | 1)
_CPRB = m.build_cprb("CI", 1, bytes(8))


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (_MEX[:15], "truncated"),
        (_MEX[:-1], "length"),
        (_MEX + b"\x00", "length"),
        (_patched(_MEX, 2, b"\x01\x91"), "length"),
        (_patched(_MEX, 0, b"\x01"), "reserved"),
        (_patched(_MEX, 4, b"\x01"), "reserved"),
        (_patched(_MEX, 7, b"\x01"), "reserved"),
        (_patched(_MEX, 15, b"\x01"), "reserved"),
        (_patched(_MEX, 8, b"\x00\x04"), "keyblock"),
        (_patched(_MEX, 1, b"\x51"), "type"),
        (_patched(_CPRB, 8, b"ci"), "malformed"),
        (_patched(_CPRB, 12, b"\x00\x00\x00\x09"), "length"),
        (_CPRB[:-1], "length"),
        (_patched(_CPRB, 5, b"\x01"), "reserved"),
    ],
)
def test_parse_request_rejects(data: bytes, kind: str) -> None:
    with pytest.raises(FormatError) as info:
        m.parse_request(data)
    assert info.value.kind == kind
    with pytest.raises(FormatError):
        m.parse_request_construct(data)


def test_ignored_byte_5_is_ignored() -> None:
    assert m.parse_request(_patched(_MEX, 5, b"\x77")) == m.parse_request(_MEX)


def test_construct_errors_are_wrapped_once() -> None:
    with pytest.raises(FormatError) as info:
        m.parse_request_construct(_MEX[:-3])
    assert info.value.__cause__ is not None and not isinstance(info.value.__cause__, FormatError)


# --- fast path == construct (hypothesis) --------------------------------------------------------

_mod_lens = st.integers(min_value=1, max_value=512)


@st.composite
def mex_args(draw: st.DrawFn) -> tuple[int, int, bytes]:
    mod_len = draw(_mod_lens)
    modulus = draw(st.binary(min_size=mod_len, max_size=mod_len))
    data = draw(st.integers(min_value=0, max_value=(1 << (8 * mod_len)) - 1))
    exponent = draw(st.integers(min_value=0, max_value=(1 << (8 * mod_len)) - 1))
    return data, exponent, modulus


@st.composite
def crt_args(draw: st.DrawFn) -> tuple[int, ...]:
    half_bits = draw(st.integers(min_value=1, max_value=2048))
    p = draw(st.integers(min_value=1, max_value=(1 << half_bits) - 1))
    q = draw(st.integers(min_value=1, max_value=(1 << half_bits) - 1))
    n_bytes = ((p * q).bit_length() + 7) // 8
    data = draw(st.integers(min_value=0, max_value=(1 << (8 * n_bytes)) - 1))
    dp, dq, u = (draw(st.integers(min_value=0, max_value=(1 << half_bits) - 1)) for _ in range(3))
    return data, p, q, dp, dq, u


@FAST
@given(mex_args())
def test_build_mex_fast_equals_construct(args: tuple[int, int, bytes]) -> None:
    msg = m.build_mex(*args)
    assert msg == m.build_mex_construct(*args)
    assert m.parse_request(msg) == m.parse_request_construct(msg)
    assert m.parse_request(msg).message == args[0]


@FAST
@given(crt_args())
def test_build_crt_fast_equals_construct(args: tuple[int, ...]) -> None:
    try:
        msg = m.build_crt(*args)
    except ValueError:
        with pytest.raises(ValueError):
            m.build_crt_construct(*args)
        return
    assert msg == m.build_crt_construct(*args)
    req = m.parse_request(msg)
    assert req == m.parse_request_construct(msg)
    assert (req.message, req.p, req.q, req.dp, req.dq, req.u) == args


def _valid_messages() -> list[bytes]:
    return [
        m.build_mex(3, 65537, (1 << 1023) | 1),
        m.build_mex(b"\x05", 3, b"\x00" * 256),
        m.build_mex(3, 65537, (1 << 4095) | 1),
        m.build_crt(9, 101, 103, 7, 11, 13),
        m.build_crt(9, (1 << 1000) | 1, (1 << 1000) | 3, 7, 11, 13),
        m.build_crt(9, (1 << 2000) | 1, (1 << 2000) | 3, 7, 11, 13),
        m.build_cprb("RL", 3, b"\x00\x20"),
        m.build_cprb("KS", 0xFFFF, b"\x01" + b"k" * 40),
        m.build_cprb("ZZ", 0, b""),
        m.build_type80(b""),
        m.build_type80(b"\x01" * 256),
        m.build_error_reply(0x84),
        m.build_error_reply(0x10, msg_type=0x88),
        m.build_machine_failure(MachineFailureState.IN_PROCESS, 7),
        m.build_machine_failure(MachineFailureState.REQUEST_PENDING, None),
        m.build_cprb_reply("CI", (1).to_bytes(8, "big")),
        m.build_cprb_reply("KR", rtcode=8, rscode=65, reply_code=0x10),
    ]


VALID = _valid_messages()


@st.composite
def corrupted(draw: st.DrawFn) -> bytes:
    """A valid message with header-biased byte changes, then maybe truncated or extended."""
    msg = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2, 3]))):
        index = draw(st.one_of(st.integers(0, min(17, len(msg) - 1)), st.integers(0, len(msg) - 1)))
        msg[index] = draw(
            st.one_of(st.sampled_from([0, 1, 0x06, 0x10, 0x50, 0x80, 0x82, 0x86, 0xFF]), st.integers(0, 255))
        )
    tail = draw(st.sampled_from(["keep", "keep", "keep", "cut", "extend"]))
    if tail == "cut":
        del msg[draw(st.integers(0, len(msg) - 1)) :]
    elif tail == "extend":
        msg += draw(st.binary(min_size=1, max_size=4))
    return bytes(msg)


def _all_parsers_agree(data: bytes) -> None:
    _assert_same(m.parse_request, m.parse_request_construct, data)
    _assert_same(m.parse_reply, m.parse_reply_construct, data)
    _assert_same(m.request_function, m.request_function_construct, data)


@settings(FAST, max_examples=400)
@given(corrupted())
def test_parsers_fast_equals_construct_on_corrupted_messages(data: bytes) -> None:
    _all_parsers_agree(data)


@FAST
@given(st.binary(max_size=40))
def test_parsers_fast_equals_construct_on_random_bytes(data: bytes) -> None:
    _all_parsers_agree(data)


@pytest.mark.parametrize("msg", VALID)
def test_parsers_agree_on_valid_messages(msg: bytes) -> None:
    outcomes = [_outcome(m.parse_request, msg), _outcome(m.parse_reply, msg)]
    assert sum(o is not FormatError for o in outcomes) == 1  # each valid message is exactly one kind
    _assert_same(m.parse_request, m.parse_request_construct, msg)
    _assert_same(m.parse_reply, m.parse_reply_construct, msg)
    _assert_same(m.request_function, m.request_function_construct, msg)


@pytest.mark.parametrize("msg", VALID, ids=lambda b: b[:2].hex())
def test_parsers_agree_on_every_single_header_byte_change(msg: bytes) -> None:
    """Exhaustive over the header: each byte 0..17 set to a handful of values, plus every truncation."""
    for index in range(min(18, len(msg))):
        for value in {0x00, 0x01, 0x10, 0x50, 0x86, 0xFF, msg[index] ^ 0x01}:
            _all_parsers_agree(_patched(msg, index, bytes([value])))
    for cut in range(min(len(msg), 40)):
        _all_parsers_agree(msg[:cut])
    _all_parsers_agree(msg[:-1])
    _all_parsers_agree(msg + b"\x00")


@FAST
@given(st.integers(0, 2**1100), st.integers(0, 2**1100))
def test_crt_modulus_length_shortcut_is_exact(p: int, q: int) -> None:
    assert _product_byte_len(p, q) == ((p * q).bit_length() + 7) // 8


@pytest.mark.parametrize(("p_bits", "q_bits"), [(4, 5), (8, 1), (512, 513), (1024, 1025), (1, 1)])
def test_crt_modulus_length_shortcut_on_byte_boundaries(p_bits: int, q_bits: int) -> None:
    for p in (1 << (p_bits - 1), (1 << p_bits) - 1):
        for q in (1 << (q_bits - 1), (1 << q_bits) - 1):
            assert _product_byte_len(p, q) == ((p * q).bit_length() + 7) // 8
