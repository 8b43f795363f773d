"""Request encoding reuse: a key's type 50 head is encoded once and kept in a bounded LRU.

``ModExpo`` and ``ModExpoCrt`` copy a cached head (header and key fields) and lay out their data
behind it.  These tests hold the bytes against the construct specification
(:func:`apformats.messages.build_mex_construct` / ``build_crt_construct``, which share no code with
the cache) on cold and warm caches, hold every refusal (exception type and text) against the
checked path the cache skips, and check that the cache stays bounded.  The type 6 fast builder is
held against its construct twin the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apcrypto import requests as rq
from apcrypto.requests import ModExpo, ModExpoCrt
from apformats import messages as m
from apformats.errors import FormatError
from apformats.msgtypes import Reply

FAST = settings(
    max_examples=150,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(autouse=True)
def cold_cache() -> Iterator[None]:
    rq.clear_key_cache()
    yield
    rq.clear_key_cache()


def _outcome(fn: Callable[[], Any]) -> Any:
    """``fn()``, or (exception type, text): what a caller sees either way."""
    try:
        return fn()
    except (TypeError, ValueError) as exc:
        return type(exc), str(exc)


def _me_view(r: ModExpo) -> tuple[int, str, bytes]:
    return r.mod_len, r.function, r.message(0)


# --- ME -----------------------------------------------------------------------------------------

_int_or_bytes = st.one_of(
    st.integers(min_value=0, max_value=(1 << 4200) - 1),
    st.binary(max_size=530),
)


@st.composite
def me_valid(draw: st.DrawFn) -> tuple[Any, Any, Any]:
    """Encodable ME operands, as ints or bytes (modulus bytes with leading zeros too)."""
    mod_len = draw(st.integers(min_value=1, max_value=512))
    top = draw(st.integers(min_value=1, max_value=255))
    modulus_int = (top << (8 * (mod_len - 1))) | draw(st.integers(0, (1 << (8 * (mod_len - 1))) - 1))
    zeros = draw(st.integers(0, 3))
    modulus = draw(st.sampled_from([modulus_int, bytes(zeros) + modulus_int.to_bytes(mod_len, "big")]))
    data_len = draw(st.integers(0, mod_len))
    data_int = draw(st.integers(0, (1 << (8 * data_len)) - 1))
    data = draw(st.sampled_from([data_int, data_int.to_bytes(data_len, "big")]))
    exp = draw(st.integers(0, (1 << (8 * mod_len)) - 1))
    exponent = draw(st.sampled_from([exp, exp.to_bytes((exp.bit_length() + 7) // 8, "big")]))
    return data, exponent, modulus


def _stripped(modulus: Any) -> Any:
    return modulus.lstrip(b"\0") if isinstance(modulus, bytes) else modulus


@FAST
@given(me_valid())
def test_me_bytes_equal_construct_cold_and_warm(args: tuple[Any, Any, Any]) -> None:
    data, exponent, modulus = args
    spec = m.build_mex_construct(data, exponent, _stripped(modulus))
    rq.clear_key_cache()
    cold = ModExpo(data, exponent, modulus)
    warm = ModExpo(data, exponent, modulus)
    assert cold.message(0) == spec
    assert warm.message(0) == spec
    assert rq._me_key.cache_info().hits >= 1  # the second request used the cached head
    assert _me_view(cold) == _me_view(warm) == rq._me_checked(data, exponent, modulus)


@FAST
@given(me_valid(), st.data())
def test_me_other_data_behind_a_cached_key(args: tuple[Any, Any, Any], draw: st.DataObject) -> None:
    """A warm key with new data (shorter, longer, zero, full length) still encodes exactly."""
    _data, exponent, modulus = args
    ModExpo(b"\x01", exponent, modulus)  # warm the key
    mod_len = ModExpo(b"\x01", exponent, modulus).mod_len
    data = draw.draw(st.one_of(st.binary(max_size=mod_len), st.integers(0, (1 << (8 * mod_len)) - 1)))
    spec = m.build_mex_construct(data, exponent, _stripped(modulus))
    assert ModExpo(data, exponent, modulus).message(0) == spec


@FAST
@given(_int_or_bytes | st.booleans() | st.floats() | st.just(-1), _int_or_bytes | st.just(-5), _int_or_bytes)
def test_me_refusals_equal_the_checked_path(data: Any, exponent: Any, modulus: Any) -> None:
    """Whatever the operands, cold or warm, a caller sees what the checked path says."""
    expected = _outcome(lambda: rq._me_checked(data, exponent, modulus))
    for _ in range(2):
        got = _outcome(lambda: _me_view(ModExpo(data, exponent, modulus)))
        assert got == expected
    with contextlib.suppress(TypeError, ValueError):  # the key warmed by valid data, then these
        ModExpo(b"", exponent, modulus)
    assert _outcome(lambda: _me_view(ModExpo(data, exponent, modulus))) == expected


@FAST
@given(me_valid(), st.integers(-1, 2), st.booleans())
def test_me_data_at_the_length_boundary(args: tuple[Any, Any, Any], extra: int, as_int: bool) -> None:
    """Data one byte short of, at, and one or two bytes over the modulus length, on a warm key."""
    _data, exponent, modulus = args
    mod_len = ModExpo(b"", exponent, modulus).mod_len
    n = max(0, mod_len + extra)
    data: Any = (1 << (8 * n - 1)) if as_int and n else b"\x01" * n
    expected = _outcome(lambda: rq._me_checked(data, exponent, modulus))
    assert _outcome(lambda: _me_view(ModExpo(data, exponent, modulus))) == expected
    if extra <= 0:
        assert ModExpo(data, exponent, modulus).message(0) == m.build_mex_construct(
            data, exponent, _stripped(modulus)
        )


def test_me_refusals_by_example() -> None:
    n = (1 << 2047) | 1
    ModExpo(b"\x02", 65537, n)  # warm
    with pytest.raises(ValueError, match="data is longer than the 256-byte modulus"):
        ModExpo(bytes(257), 65537, n)
    with pytest.raises(ValueError, match="must not be negative"):
        ModExpo(-1, 65537, n)
    with pytest.raises(TypeError, match="data must be int or big-endian bytes"):
        ModExpo(True, 65537, n)
    with pytest.raises(TypeError, match="data must be int or big-endian bytes"):
        ModExpo(2.0, 65537, n)
    with pytest.raises(ValueError, match="exponent is 257 bytes"):
        ModExpo(b"\x02", bytes(256) + b"\x01", n)
    with pytest.raises(ValueError, match=r"modulus must be 1\.\.512 bytes"):
        ModExpo(b"\x02", 3, bytes(5))
    with pytest.raises(TypeError, match="exponent must be int"):
        ModExpo(b"\x02", 65537.0, n)  # a float equal to a cached int is not that int


def test_me_bytearray_inputs_encode_the_same() -> None:
    n = (1 << 1023) | 0x1234567
    spec = m.build_mex_construct(b"\x05", 3, n)
    assert ModExpo(bytearray(b"\x05"), 3, n).message(0) == spec
    assert ModExpo(b"\x05", bytearray(b"\x03"), bytearray(n.to_bytes(128, "big"))).message(0) == spec
    assert ModExpo(5, 3, n).message(0) == spec


# --- CRT ----------------------------------------------------------------------------------------


def _keys() -> list[tuple[int, ...]]:
    from cryptography.hazmat.primitives.asymmetric import rsa

    out = []
    for bits in (1024, 2048):
        k = rsa.generate_private_key(public_exponent=65537, key_size=bits).private_numbers()
        out.append((k.p, k.q, k.dmp1, k.dmq1, k.iqmp))
    return out


KEYS = _keys()


@st.composite
def crt_valid(draw: st.DrawFn) -> tuple[Any, ...]:
    p, q, dp, dq, u = draw(st.sampled_from(KEYS))
    as_bytes = draw(st.booleans())
    parts = [x.to_bytes((x.bit_length() + 7) // 8, "big") if as_bytes else x for x in (p, q, dp, dq, u)]
    mod_len = ((p * q).bit_length() + 7) // 8
    data = draw(
        st.one_of(
            st.binary(max_size=mod_len),
            st.integers(0, p * q - 1),
            st.binary(min_size=mod_len - 1, max_size=mod_len + 2),  # the length boundary
            st.integers(1 << (8 * mod_len - 8), 1 << (8 * mod_len + 8)),
        )
    )
    return (data, *parts)


@FAST
@given(crt_valid())
def test_crt_bytes_equal_construct_cold_and_warm(args: tuple[Any, ...]) -> None:
    expected = _outcome(lambda: rq._crt_checked(*args))
    ModExpoCrt(b"", *args[1:])  # warm the key
    view = _outcome(lambda: (lambda r: (r.mod_len, r.function, r._msg))(ModExpoCrt(*args)))
    assert view == expected
    if isinstance(expected, tuple) and isinstance(expected[0], type):
        return  # data too long: refused alike
    spec = m.build_crt_construct(*args)
    rq.clear_key_cache()
    cold = ModExpoCrt(*args)
    warm = ModExpoCrt(*args)
    assert cold.message(0) == warm.message(0) == spec
    assert (cold.mod_len, cold.function) == (warm.mod_len, warm.function) == rq._crt_checked(*args)[:2]


@FAST
@given(crt_valid(), _int_or_bytes | st.booleans() | st.just(-1), st.integers(0, 5))
def test_crt_refusals_equal_the_checked_path(args: tuple[Any, ...], bad: Any, where: int) -> None:
    """One argument replaced by an arbitrary value: cold or warm, the checked path's answer."""
    args = (*args[:where], bad, *args[where + 1 :])
    expected = _outcome(lambda: rq._crt_checked(*args))
    for _ in range(2):
        got = _outcome(lambda: (lambda r: (r.mod_len, r.function, r.message(0)))(ModExpoCrt(*args)))
        assert got == expected


# --- the cache ----------------------------------------------------------------------------------


def test_the_key_cache_is_bounded() -> None:
    for i in range(3 * rq.KEY_CACHE_SIZE):
        ModExpo(b"\x02", 3, (1 << 1023) | (2 * i + 1))
    info = rq._me_key.cache_info()
    assert info.currsize == rq.KEY_CACHE_SIZE == info.maxsize
    rq.clear_key_cache()
    assert rq._me_key.cache_info().currsize == 0 == rq._crt_key.cache_info().currsize


def test_journal_sees_the_same_request_fields() -> None:
    """The journal stores a request's plain fields (apcrypto.journal): the cached path sets the
    same ones, with the same values, as the checked path."""
    n = (1 << 2047) | 0x1D7
    ModExpo(b"\x02", 65537, n)
    r = ModExpo(b"\x03", 65537, n)
    mod_len, function, msg = rq._me_checked(b"\x03", 65537, n)
    assert vars(r) == {"mod_len": mod_len, "function": function, "_msg": msg}


# --- type 6 -------------------------------------------------------------------------------------

_fc = st.one_of(
    st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=2, max_size=2),
    st.text(max_size=3),
)


def _cprb_outcome(fn: Callable[..., bytes], *args: Any) -> Any:
    try:
        return fn(*args)
    except FormatError as exc:
        return FormatError, exc.kind
    except ValueError as exc:
        return ValueError, str(exc)


@FAST
@given(_fc, st.integers(-2, 0x10001), st.binary(max_size=300))
def test_build_cprb_fast_equals_construct(fc: str, domain: int, payload: bytes) -> None:
    fast = _cprb_outcome(m.build_cprb, fc, domain, payload)
    assert fast == _cprb_outcome(m.build_cprb_construct, fc, domain, payload)
    if isinstance(fast, bytes):
        req = m.parse_request(fast)
        assert (req.function, req.domain, req.payload) == (fc, domain, payload)


def test_build_cprb_rejects_a_payload_too_big_for_msg_len() -> None:
    big = bytes(0xFFFF - 15)
    for fn in (m.build_cprb, m.build_cprb_construct):
        with pytest.raises(ValueError, match="does not fit msg_len"):
            fn("RL", 0, big)
    assert m.build_cprb("RL", 0, big[:-1]) == m.build_cprb_construct("RL", 0, big[:-1])


# --- type 80: the Reply the fast parser builds directly ------------------------------------------


@FAST
@given(st.integers(0, 255), st.binary(max_size=600))
def test_type80_reply_built_directly_equals_the_dataclass(code: int, result: bytes) -> None:
    msg = bytearray(m.build_type80(result))
    msg[4] = code
    fast = m.parse_reply(bytes(msg))
    spec = m.parse_reply_construct(bytes(msg))
    assert fast == spec == Reply("ok" if code == 0 else "error", 0x80, code, result)
    assert hash(fast) == hash(spec)
    assert repr(fast) == repr(spec)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.kind = "ok"  # type: ignore[misc]
