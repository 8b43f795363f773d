"""The firmware's arithmetic implementations give the same numbers: valid keys against
``cryptography`` (OpenSSL's own RSA), corrupted keys against plain Python ``pow`` (Garner written
out here, sharing no code with the implementations), and the firmware's error paths unchanged
whichever implementation is chosen."""

from __future__ import annotations

import random

import pytest
from _fixtures_firmware import KEY_SIZES, context, crt_args, rsa_key
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apformats import messages as m
from firmware_stubs import FirmwareContext, execute
from firmware_stubs.arithmetic import ARITHMETIC_NAMES, available, resolve, unavailable_reason

#: Every implementation must load on the project's machines (cffi is a dependency, libcrypto is
#: what Python's ssl module uses): a missing one is a failure here, not a skip.
NAMES = ("gmpy2", "openssl")


def _garner(c: int, p: int, q: int, dp: int, dq: int, u: int) -> int:
    m1, m2 = pow(c, dp, p), pow(c, dq, q)
    return m2 + ((u * (m1 - m2)) % p) * q


def test_every_implementation_loads_here() -> None:
    assert set(available()) == {"auto", *NAMES}
    assert available()["auto"] is available()["openssl"]  # auto takes the fastest
    assert unavailable_reason("openssl") is None
    assert "unknown arithmetic" in (unavailable_reason("nope") or "")
    with pytest.raises(ValueError, match="unknown arithmetic"):
        resolve("nope")
    with pytest.raises(ValueError, match="unknown arithmetic"):
        context_with("nope")
    assert set(ARITHMETIC_NAMES) == {"auto", *NAMES}


def context_with(arithmetic: str) -> FirmwareContext:
    base = context()
    return FirmwareContext(base.domain, base.store, base.rng, arithmetic=arithmetic)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bits", KEY_SIZES)
def test_valid_keys_match_cryptography(name: str, bits: int) -> None:
    """CRT of the PKCS#1 v1.5 block is cryptography's signature, byte for byte; ME undoes it."""
    key = rsa_key(bits)
    pub = key.public_key().public_numbers()
    arith = resolve(name)
    rng = random.Random(bits)
    for i in range(4):
        message = f"apcrypto arithmetic {name} {i}".encode()
        signature = int.from_bytes(key.sign(message, padding.PKCS1v15(), hashes.SHA256()), "big")
        em = pow(signature, pub.e, pub.n)  # plain Python: the encoded block
        assert arith.crt(em, *crt_args(key)) == signature
        assert arith.powmod(signature, pub.e, pub.n) == em
    for c in (0, 1, 2, pub.n - 1, rng.randrange(pub.n)):  # small bases take OpenSSL's other path
        assert arith.crt(c, *crt_args(key)) == _garner(c, *crt_args(key))


@pytest.mark.parametrize("name", NAMES)
def test_through_the_firmware_against_cryptography(name: str) -> None:
    key = rsa_key(2048)
    signature = key.sign(b"firmware", padding.PKCS1v15(), hashes.SHA256())
    pub = key.public_key().public_numbers()
    em = pow(int.from_bytes(signature, "big"), pub.e, pub.n)
    res = execute(m.build_crt(em, *crt_args(key)), context_with(name))
    assert res.ok and m.parse_reply(res.reply).result == signature


_CORRUPT = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_CORRUPT
@given(
    data=st.data(),
    bits=st.sampled_from((512, 1024, 2048)),
    flips=st.lists(st.sampled_from(("p", "q", "dp", "dq", "u", "swap", "composite", "short_q")), max_size=3),
)
def test_corrupted_keys_give_the_formulas_answer_everywhere(
    data: st.DataObject, bits: int, flips: list[str]
) -> None:
    """A corrupted key (wrong exponent, wrong inverse, composite or unequal factors) is no error for
    the firmware: it computes Garner's formula on what it was given.  Every implementation must
    give that same (wrong) number; the error replies are the same too."""
    key = rsa_key(bits)
    p, q, dp, dq, u = crt_args(key)
    for flip in flips:
        if flip == "swap":
            p, q, dp, dq = q, p, dq, dp
        elif flip == "composite":
            p = p * 3 if p * 3 * q < 1 << bits else p
        elif flip == "short_q":
            q = q >> 24 | 1
        else:
            value = {"p": p, "q": q, "dp": dp, "dq": dq, "u": u}[flip]
            value ^= 1 << data.draw(st.integers(1, max(1, value.bit_length() - 2)), label=f"bit of {flip}")
            p, q, dp, dq, u = (
                value if n == flip else v
                for n, v in zip(("p", "q", "dp", "dq", "u"), (p, q, dp, dq, u), strict=True)
            )
    mod_bytes = ((p * q).bit_length() + 7) // 8
    c = data.draw(st.integers(0, (1 << (8 * mod_bytes)) - 1), label="c")  # may be >= p*q: an error
    replies = {name: execute(m.build_crt(c, p, q, dp, dq, u), context_with(name)) for name in NAMES}
    first = replies["gmpy2"]
    for res in replies.values():
        assert (res.reply, res.ok, res.reply_code) == (first.reply, first.ok, first.reply_code)
    valid = p & 1 and q & 1 and c < p * q and 0 < dp < p and 0 < dq < q and 0 < u < p
    assert first.ok == bool(valid)
    if valid:
        assert int.from_bytes(m.parse_reply(first.reply).result, "big") == _garner(c, p, q, dp, dq, u)
        for name in NAMES:
            assert resolve(name).crt(c, p, q, dp, dq, u) == _garner(c, p, q, dp, dq, u)


@pytest.mark.parametrize("name", NAMES)
def test_error_paths_are_the_firmwares_not_the_librarys(name: str) -> None:
    """Even moduli, zero fields and oversized operands are answered by the firmware's checks before
    any library sees them: the same reply codes as gmpy2 gives."""
    key = rsa_key(1024)
    p, q, dp, dq, u = crt_args(key)
    n = p * q
    cases = [
        m.build_crt(5, p + 1, q, dp, dq, u),  # even p
        m.build_crt(5, p, q, dp, dq, p),  # u >= p
        m.build_crt(5, p, q, p, dq, u),  # dp >= p
        m.build_crt(n, p, q, dp, dq, u),  # c >= n
        m.build_mex(5, 65537, n + 1),  # even modulus
        m.build_mex(n, 65537, n),  # m >= n
    ]
    for request in cases:
        got, ref = execute(request, context_with(name)), execute(request, context_with("gmpy2"))
        assert not got.ok and (got.reply, got.reply_code) == (ref.reply, ref.reply_code) != (b"", 0)


@pytest.mark.parametrize("name", NAMES)
def test_threads_compute_in_parallel_and_agree(name: str) -> None:
    """The per-thread state (OpenSSL's BN_CTX, gmpy2's context) keeps concurrent callers apart."""
    from concurrent.futures import ThreadPoolExecutor

    from firmware_stubs.arithmetic import prepare_thread

    key = rsa_key(1024)
    args = crt_args(key)
    arith = resolve(name)
    cs = [random.Random(i).getrandbits(1000) for i in range(64)]

    def work(c: int) -> int:
        prepare_thread()
        return arith.crt(c, *args)

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(work, cs))
    assert got == [_garner(c, *args) for c in cs]
