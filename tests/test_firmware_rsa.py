"""firmware_stubs RSA: ME and CRT results against cryptography (OpenSSL) and plain ``pow``."""

from __future__ import annotations

import random

import pytest
from _fixtures_firmware import KEY_SIZES, context, crt_args, rsa_key
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from apformats import messages as m
from firmware_stubs import FirmwareResult, execute

# DigestInfo prefix of SHA-256 (RFC 8017 §9.2 note 1).
SHA256_PREFIX = bytes.fromhex("3031300d060960864801650304020105000420")


@pytest.fixture(scope="module", params=KEY_SIZES, ids=lambda b: f"{b}bit")
def key(request: pytest.FixtureRequest) -> rsa.RSAPrivateKey:
    return rsa_key(request.param)


def _result(res: FirmwareResult) -> bytes:
    assert res.ok and res.reply_code == 0 and res.effect is None, res
    reply = m.parse_reply(res.reply)
    assert (reply.kind, reply.msg_type) == ("ok", 0x80)
    return reply.result


def _mod_len(key: rsa.RSAPrivateKey) -> int:
    return (key.key_size + 7) // 8


def _function(kind: str, mod_len: int) -> str:
    return f"{kind}_{'1K' if mod_len <= 128 else '2K' if mod_len <= 256 else '4K'}"


def test_me_and_crt_match_cryptography_signature(key: rsa.RSAPrivateKey) -> None:
    """PKCS#1 v1.5 signing is deterministic: CRT(EM) must equal OpenSSL's signature byte for byte,
    and ME(signature, e) must give back the EMSA-PKCS1-v1_5 block."""
    message = b"apcrypto firmware test vector"
    signature = key.sign(message, padding.PKCS1v15(), hashes.SHA256())
    pub = key.public_key().public_numbers()
    ctx = context()
    res = execute(m.build_mex(signature, pub.e, pub.n), ctx)
    assert res.function == _function("MEX", _mod_len(key))
    em = _result(res)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(message)
    t = SHA256_PREFIX + digest.finalize()
    assert em == b"\x00\x01" + b"\xff" * (_mod_len(key) - len(t) - 3) + b"\x00" + t
    res = execute(m.build_crt(em, *crt_args(key)), ctx)
    assert res.function == _function("CRT", _mod_len(key))
    assert _result(res) == signature


def test_random_operands_against_pow(key: rsa.RSAPrivateKey) -> None:
    pn = key.private_numbers()
    n, e, d = pn.public_numbers.n, pn.public_numbers.e, pn.d
    rng = random.Random(key.key_size)
    ctx = context()
    for data in (0, 1, 2, n - 1, rng.randrange(n), rng.randrange(n)):
        enc = _result(execute(m.build_mex(data, e, n), ctx))
        assert len(enc) == _mod_len(key)  # result is the modulus length, zero-padded
        assert int.from_bytes(enc, "big") == pow(data, e, n)
        dec = _result(execute(m.build_crt(data, *crt_args(key)), ctx))
        assert len(dec) == _mod_len(key)
        assert int.from_bytes(dec, "big") == pow(data, d, n)
        # ME(CRT(m)) == m
        assert int.from_bytes(_result(execute(m.build_mex(dec, e, n), ctx)), "big") == data


def test_oaep_ciphertext_decrypts_with_crt() -> None:
    """cryptography encrypts (randomised OAEP); raw CRT then cryptography's own unpadding agree."""
    key = rsa_key(2048)
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    ciphertext = key.public_key().encrypt(b"secret", oaep)
    raw = _result(execute(m.build_crt(ciphertext, *crt_args(key)), context()))
    pn = key.private_numbers()
    assert int.from_bytes(raw, "big") == pow(int.from_bytes(ciphertext, "big"), pn.d, pn.public_numbers.n)
    assert raw[0] == 0  # OAEP encoded messages start with a zero byte
    assert key.decrypt(ciphertext, oaep) == b"secret"


def test_crt_with_p_smaller_than_q() -> None:
    """Garner with u = q^-1 mod p must not assume p > q."""
    key = rsa_key(1024)
    p, q, dp, dq, _ = crt_args(key)
    swapped = (q, p, dq, dp, pow(p, -1, q))
    pn = key.private_numbers()
    c = 0x1234567890ABCDEF
    got = _result(execute(m.build_crt(c, *swapped), context()))
    assert int.from_bytes(got, "big") == pow(c, pn.d, pn.public_numbers.n)


def test_max_mod_bytes_allows_exactly_the_limit() -> None:
    key = rsa_key(2048)
    pub = key.public_key().public_numbers()
    assert execute(m.build_mex(5, pub.e, pub.n), context(max_mod_bytes=256)).ok
    assert execute(m.build_crt(5, *crt_args(key)), context(max_mod_bytes=256)).ok
