"""Shared helpers for the firmware and format tests: deterministic RSA keys, contexts.

Keys are made from a fixed seed (primes via ``gmpy2.next_prime``) so every run tests the same
numbers, then loaded into ``cryptography`` through ``RSAPrivateNumbers`` — which validates them —
and the CRT parameters come from cryptography's own ``rsa_crt_*`` helpers.  The expected values in
the tests are computed by cryptography (OpenSSL) or plain ``pow``, independently of the gmpy2 code
under test.  Generation is cached, so a 4096-bit key is made once per session.
"""

from __future__ import annotations

import functools
import random
from math import gcd

import gmpy2
from cryptography.hazmat.primitives.asymmetric import rsa

from firmware_stubs import DomainStore, FirmwareContext

PUBLIC_EXPONENT = 65537
KEY_SIZES = (512, 1024, 1030, 2048, 3072, 4096)  # 1030 bits = 129 bytes: just past MEB1/CRB1


def _prime(rng: random.Random, bits: int) -> int:
    while True:
        candidate = rng.getrandbits(bits) | (3 << (bits - 2)) | 1  # top two bits: p*q has 2*bits bits
        p = int(gmpy2.next_prime(candidate))
        if p.bit_length() == bits and gcd(p - 1, PUBLIC_EXPONENT) == 1:
            return p


@functools.cache
def rsa_key(bits: int, seed: int = 0) -> rsa.RSAPrivateKey:
    """A deterministic RSA key of exactly ``bits`` bits (``bits`` even), validated by cryptography."""
    rng = random.Random(f"rsa-{bits}-{seed}")
    p = _prime(rng, bits // 2)
    q = _prime(rng, bits // 2)
    while q == p:
        q = _prime(rng, bits // 2)
    n = p * q
    d = rsa.rsa_recover_private_exponent(PUBLIC_EXPONENT, p, q)
    numbers = rsa.RSAPrivateNumbers(
        p=p,
        q=q,
        d=d,
        dmp1=rsa.rsa_crt_dmp1(d, p),
        dmq1=rsa.rsa_crt_dmq1(d, q),
        iqmp=rsa.rsa_crt_iqmp(p, q),
        public_numbers=rsa.RSAPublicNumbers(PUBLIC_EXPONENT, n),
    )
    key = numbers.private_key()
    assert key.key_size == bits
    return key


def crt_args(key: rsa.RSAPrivateKey) -> tuple[int, int, int, int, int]:
    """(p, q, dp, dq, qinv) in build_crt's order; qinv is cryptography's ``iqmp`` = q^-1 mod p."""
    pn = key.private_numbers()
    return pn.p, pn.q, pn.dmp1, pn.dmq1, pn.iqmp


def context(
    mode: str = "accel", *, domain: int = 5, seed: int = 0, max_mod_bytes: int = 512
) -> FirmwareContext:
    """A fresh firmware context with its own store and a seeded RNG."""
    return FirmwareContext(domain, DomainStore(), random.Random(seed), max_mod_bytes=max_mod_bytes, mode=mode)
