"""Helpers for demos, tests and benchmarks of code that uses apcrypto.

Reproducible RSA keys from a seed, so that a test or a demo run can be replayed exactly.  They come
from a seeded ``random.Random``: never use them to protect anything.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

import gmpy2

PUBLIC_EXPONENT = 65537


@dataclass(frozen=True)
class RsaKey:
    """An RSA key with its CRT parts (``qinv`` = q⁻¹ mod p, p the larger prime)."""

    n: int
    e: int
    d: int
    p: int
    q: int
    dp: int
    dq: int
    qinv: int

    @property
    def size(self) -> int:
        """Modulus length in bytes (the length of every result)."""
        return (self.n.bit_length() + 7) // 8


def make_key(bits: int, rng: random.Random, e: int = PUBLIC_EXPONENT) -> RsaKey:
    """A key of exactly ``bits`` bits drawn from ``rng`` (gmpy2 primality testing)."""
    half = bits // 2
    while True:
        p = int(gmpy2.next_prime(rng.getrandbits(half) | (3 << (half - 2))))
        q = int(gmpy2.next_prime(rng.getrandbits(bits - half) | (3 << (bits - half - 2))))
        if p == q:
            continue
        p, q = max(p, q), min(p, q)
        n, phi = p * q, (p - 1) * (q - 1)
        if n.bit_length() != bits or gmpy2.gcd(e, phi) != 1:
            continue
        d = int(gmpy2.invert(e, phi))
        return RsaKey(n, e, d, p, q, d % (p - 1), d % (q - 1), int(gmpy2.invert(q, p)))


@functools.cache
def seeded_key(bits: int = 1024, seed: str | int = 0) -> RsaKey:
    """The same key for the same (bits, seed), cached for the process."""
    return make_key(bits, random.Random(f"apcrypto-testing-rsa-{bits}-{seed}"))
