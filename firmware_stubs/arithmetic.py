"""The arithmetic behind the firmware's RSA: which library computes a modular exponentiation.

Two implementations give the *same numbers* for every input the firmware lets through (a test feeds
both valid keys and corrupted ones and checks each against plain Python ``pow`` and ``cryptography``):

* ``openssl`` -- OpenSSL's ``BN_mod_exp_mont_consttime_x2`` (OpenSSL >= 3.0), reached through
  ``cffi`` in ABI mode on the ``libcrypto`` Python's own ``ssl`` module loads.  It runs the two
  half-size exponentiations of a CRT together (AVX-512 IFMA where the CPU has it), about 3x gmpy2
  per core for CRT-2048 here.  ``cffi`` drops the GIL around every call, so threads computing
  with it use every core.  The Garner recombination is the firmware's own formula (in Python
  ints): no blinding, no verification with a public exponent (a type 50 CRT request carries none),
  so a corrupted key gives the same wrong answer the formula gives, as a card computes it.
* ``gmpy2`` -- GMP's ``mpz_powm``; always there (a hard dependency).  It releases the GIL only in a
  thread whose context has ``allow_release_gil`` set (:func:`prepare_thread` sets it).

``auto`` (the default everywhere) is ``openssl`` when it loads, else ``gmpy2``.  Why a raw BN call
and not a padding-free RSA key object: ``cryptography`` exposes no unpadded private operation,
and OpenSSL's own ``RSA_private_decrypt`` insists on a public exponent and verifies with it, which
would answer a corrupted CRT key differently from the firmware's formula.
"""

from __future__ import annotations

import ctypes.util
import threading
import weakref
from typing import Any, Protocol

import gmpy2

__all__ = [
    "ARITHMETIC_NAMES",
    "Arithmetic",
    "Gmpy2Arithmetic",
    "OpenSSLArithmetic",
    "available",
    "prepare_thread",
    "resolve",
    "unavailable_reason",
]

#: What a profile (``execution.arithmetic``) or a :class:`~firmware_stubs.FirmwareContext` may name.
ARITHMETIC_NAMES: tuple[str, ...] = ("auto", "openssl", "gmpy2")


class Arithmetic(Protocol):
    """Modular exponentiation on Python ints; operands are already checked by the firmware
    (modulus odd and non-zero, base and exponents below their moduli, CRT parts non-zero)."""

    name: str

    def powmod(self, base: int, exponent: int, modulus: int) -> int: ...

    def crt(self, c: int, p: int, q: int, dp: int, dq: int, u: int) -> int:
        """Garner: m1 = c^dp mod p, m2 = c^dq mod q, h = u(m1 - m2) mod p, result m2 + h*q."""
        ...


class Gmpy2Arithmetic:
    """GMP through gmpy2: the reference implementation and the fallback."""

    name = "gmpy2"

    def powmod(self, base: int, exponent: int, modulus: int) -> int:
        return int(gmpy2.powmod(base, exponent, modulus))

    def crt(self, c: int, p: int, q: int, dp: int, dq: int, u: int) -> int:
        mp, mq, mc = gmpy2.mpz(p), gmpy2.mpz(q), gmpy2.mpz(c)
        m1 = gmpy2.powmod(mc, dp, mp)
        m2 = gmpy2.powmod(mc, dq, mq)
        h = gmpy2.f_mod(u * (m1 - m2), mp)
        return int(m2 + h * mq)


_CDEF = """
typedef struct bignum_st BIGNUM;
typedef struct bignum_ctx BN_CTX;
typedef struct bn_mont_ctx_st BN_MONT_CTX;
BIGNUM *BN_bin2bn(const unsigned char *s, int len, BIGNUM *ret);
int BN_bn2binpad(const BIGNUM *a, unsigned char *to, int tolen);
BIGNUM *BN_new(void);
void BN_clear_free(BIGNUM *a);
BN_CTX *BN_CTX_new(void);
void BN_CTX_free(BN_CTX *c);
int BN_mod_exp_mont(BIGNUM *r, const BIGNUM *a, const BIGNUM *p, const BIGNUM *m, BN_CTX *ctx,
                    BN_MONT_CTX *m_ctx);
int BN_mod_exp_mont_consttime_x2(BIGNUM *rr1, const BIGNUM *a1, const BIGNUM *p1, const BIGNUM *m1,
                                 BN_MONT_CTX *in_mont1, BIGNUM *rr2, const BIGNUM *a2,
                                 const BIGNUM *p2, const BIGNUM *m2, BN_MONT_CTX *in_mont2,
                                 BN_CTX *ctx);
"""


def _bytes(x: int) -> bytes:
    return x.to_bytes((x.bit_length() + 7) // 8 or 1, "big")


class _Scratch:
    """One thread's OpenSSL state: a ``BN_CTX`` and the numbers a call reuses (OpenSSL's
    contexts are not thread-safe; reusing the numbers saves two C calls per operand)."""

    __slots__ = ("bns", "ctx", "lib")

    def __init__(self, ffi: Any, lib: Any) -> None:
        self.lib = lib
        self.ctx = lib.BN_CTX_new()
        self.bns = [lib.BN_new() for _ in range(8)]
        if self.ctx == ffi.NULL or ffi.NULL in self.bns:
            self.free()
            raise MemoryError("BN_CTX_new / BN_new")

    def free(self) -> None:
        for bn in self.bns:
            self.lib.BN_clear_free(bn)
        self.lib.BN_CTX_free(self.ctx)
        self.bns = []


class OpenSSLArithmetic:
    """OpenSSL's bignum library through cffi (ABI mode: nothing to compile at install time).

    Every C call through cffi drops and retakes the GIL, so a call here makes as few as it can: the
    operands go in with ``BN_bin2bn`` into per-thread numbers, the reductions mod p and q and the
    Garner recombination are Python int arithmetic (microseconds), and only the two exponentiations
    are OpenSSL's (one ``BN_mod_exp_mont_consttime_x2``).
    """

    name = "openssl"

    def __init__(self, library: str | None = None) -> None:
        from cffi import FFI  # an import error means "not available": see below

        ffi = FFI()
        ffi.cdef(_CDEF)
        path = library or ctypes.util.find_library("crypto")
        if path is None:
            raise OSError("no libcrypto found")
        self._ffi = ffi
        self._lib: Any = ffi.dlopen(path)
        self._local = threading.local()
        self.library = path
        # Prove the build has what we need (OpenSSL >= 3.0) and answers right, once, here.
        if self.crt(5, 11, 13, 3, 7, 6) != Gmpy2Arithmetic().crt(5, 11, 13, 3, 7, 6):
            raise OSError(f"{path}: BN_mod_exp_mont_consttime_x2 gives a wrong answer")

    def _scratch(self) -> _Scratch:
        scratch: _Scratch | None = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = _Scratch(self._ffi, self._lib)
            weakref.finalize(threading.current_thread(), scratch.free)
        return scratch

    def _set(self, bn: Any, x: int) -> None:
        b = _bytes(x)
        if self._lib.BN_bin2bn(b, len(b), bn) == self._ffi.NULL:
            raise MemoryError("BN_bin2bn")

    def _get(self, bn: Any, size: int) -> int:
        buf = self._ffi.new("unsigned char[]", size)
        if self._lib.BN_bn2binpad(bn, buf, size) < 0:
            raise ArithmeticError("OpenSSL BN_bn2binpad: result longer than its modulus")
        return int.from_bytes(self._ffi.buffer(buf), "big")

    @staticmethod
    def _check(ok: int, what: str) -> None:
        if ok != 1:
            raise ArithmeticError(f"OpenSSL {what} failed")

    def powmod(self, base: int, exponent: int, modulus: int) -> int:
        s = self._scratch()
        b, e, m, r = s.bns[:4]
        self._set(b, base % modulus)
        self._set(e, exponent)
        self._set(m, modulus)
        self._check(self._lib.BN_mod_exp_mont(r, b, e, m, s.ctx, self._ffi.NULL), "BN_mod_exp_mont")
        return self._get(r, (modulus.bit_length() + 7) // 8)

    def crt(self, c: int, p: int, q: int, dp: int, dq: int, u: int) -> int:
        s = self._scratch()
        a1, e1, m1, a2, e2, m2, r1, r2 = s.bns
        for bn, x in ((a1, c % p), (e1, dp), (m1, p), (a2, c % q), (e2, dq), (m2, q)):
            self._set(bn, x)
        self._check(
            self._lib.BN_mod_exp_mont_consttime_x2(
                r1, a1, e1, m1, self._ffi.NULL, r2, a2, e2, m2, self._ffi.NULL, s.ctx
            ),
            "BN_mod_exp_mont_consttime_x2",
        )
        x1 = self._get(r1, (p.bit_length() + 7) // 8)
        x2 = self._get(r2, (q.bit_length() + 7) // 8)
        return x2 + (u * (x1 - x2) % p) * q


_GMPY2 = Gmpy2Arithmetic()
_OPENSSL: OpenSSLArithmetic | None = None
_OPENSSL_ERROR: str | None = None
try:
    _OPENSSL = OpenSSLArithmetic()
except (ImportError, OSError, AttributeError, ArithmeticError) as exc:  # no cffi / libcrypto / symbol
    _OPENSSL_ERROR = f"{type(exc).__name__}: {exc}"

_BY_NAME: dict[str, Arithmetic] = {"gmpy2": _GMPY2, "auto": _OPENSSL or _GMPY2}
if _OPENSSL is not None:
    _BY_NAME["openssl"] = _OPENSSL


def available() -> dict[str, Arithmetic]:
    """The implementations that load here, by name (``gmpy2`` always; ``auto`` = the best)."""
    return dict(_BY_NAME)


def unavailable_reason(name: str) -> str | None:
    """Why ``name`` cannot be used here (None: it can)."""
    if name in _BY_NAME:
        return None
    if name == "openssl":
        return f"OpenSSL arithmetic not available here ({_OPENSSL_ERROR})"
    return f"unknown arithmetic {name!r} (one of {', '.join(ARITHMETIC_NAMES)})"


def resolve(name: str) -> Arithmetic:
    """The implementation for ``name``; ``ValueError`` saying why when it is not available."""
    arith = _BY_NAME.get(name)
    if arith is None:
        raise ValueError(unavailable_reason(name))
    return arith


def prepare_thread() -> None:
    """Let gmpy2 release the GIL in the calling thread (its context is per thread); OpenSSL calls
    through cffi release it anyway.  For threads that compute beside others."""
    ctx = gmpy2.get_context()
    ctx.allow_release_gil = True
    gmpy2.set_context(ctx)
