"""The arithmetic behind the firmware's RSA: which library computes a modular exponentiation.

Two implementations give the *same numbers* for every input the firmware lets through (a test feeds
both valid keys and corrupted ones and checks each against plain Python ``pow`` and ``cryptography``):

* ``openssl`` -- OpenSSL's ``BN_mod_exp_mont_consttime_x2`` (OpenSSL >= 3.0), reached through
  ``cffi`` in ABI mode on the ``libcrypto`` Python's own ``ssl`` module loads.  It runs the two
  half-size exponentiations of a CRT together (AVX-512 IFMA where the CPU has it), about 3x gmpy2
  per core for CRT-2048 here.  ``cffi`` drops the GIL around every call, so threads computing
  with it use every core.  The Garner recombination is the firmware's own formula on OpenSSL's
  ``BN_mod_sub``/``BN_mod_mul``/``BN_mul``/``BN_add``: no blinding, no verification with a public
  exponent (a type 50 CRT request carries none), so a corrupted key gives the same wrong answer
  the formula gives, as a card computes it.
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
void BN_free(BIGNUM *a);
BN_CTX *BN_CTX_new(void);
void BN_CTX_free(BN_CTX *c);
int BN_nnmod(BIGNUM *r, const BIGNUM *a, const BIGNUM *m, BN_CTX *ctx);
int BN_mod_exp_mont(BIGNUM *r, const BIGNUM *a, const BIGNUM *p, const BIGNUM *m, BN_CTX *ctx,
                    BN_MONT_CTX *m_ctx);
int BN_mod_exp_mont_consttime_x2(BIGNUM *rr1, const BIGNUM *a1, const BIGNUM *p1, const BIGNUM *m1,
                                 BN_MONT_CTX *in_mont1, BIGNUM *rr2, const BIGNUM *a2,
                                 const BIGNUM *p2, const BIGNUM *m2, BN_MONT_CTX *in_mont2,
                                 BN_CTX *ctx);
int BN_mod_sub(BIGNUM *r, const BIGNUM *a, const BIGNUM *b, const BIGNUM *m, BN_CTX *ctx);
int BN_mod_mul(BIGNUM *r, const BIGNUM *a, const BIGNUM *b, const BIGNUM *m, BN_CTX *ctx);
int BN_mul(BIGNUM *r, const BIGNUM *a, const BIGNUM *b, BN_CTX *ctx);
int BN_add(BIGNUM *r, const BIGNUM *a, const BIGNUM *b);
int BN_num_bits(const BIGNUM *a);
"""


def _bytes(x: int) -> bytes:
    return x.to_bytes((x.bit_length() + 7) // 8 or 1, "big")


class OpenSSLArithmetic:
    """OpenSSL's bignum library through cffi (ABI mode: nothing to compile at install time).

    One ``BN_CTX`` per thread (OpenSSL's contexts are not thread-safe); every ``BIGNUM`` a call
    makes is freed before it returns, whatever happens.
    """

    name = "openssl"

    def __init__(self, library: str | None = None) -> None:
        from cffi import FFI  # an import error means "not available": see _load

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

    def _ctx(self) -> Any:
        ctx = getattr(self._local, "ctx", None)
        if ctx is None:
            ctx = self._ffi.gc(self._lib.BN_CTX_new(), self._lib.BN_CTX_free)
            self._local.ctx = ctx
        return ctx

    def _bn(self, x: int, owned: list[Any]) -> Any:
        b = _bytes(x)
        bn = self._lib.BN_bin2bn(b, len(b), self._ffi.NULL)
        if bn == self._ffi.NULL:
            raise MemoryError("BN_bin2bn")
        owned.append(bn)
        return bn

    def _new(self, owned: list[Any]) -> Any:
        bn = self._lib.BN_new()
        if bn == self._ffi.NULL:
            raise MemoryError("BN_new")
        owned.append(bn)
        return bn

    def _int(self, bn: Any) -> int:
        size = (self._lib.BN_num_bits(bn) + 7) // 8
        if size == 0:
            return 0
        buf = self._ffi.new("unsigned char[]", size)
        self._lib.BN_bn2binpad(bn, buf, size)
        return int.from_bytes(self._ffi.buffer(buf), "big")

    @staticmethod
    def _check(ok: int, what: str) -> None:
        if ok != 1:
            raise ArithmeticError(f"OpenSSL {what} failed")

    def powmod(self, base: int, exponent: int, modulus: int) -> int:
        lib, owned = self._lib, list[Any]()
        ctx = self._ctx()
        try:
            b, e, m = self._bn(base, owned), self._bn(exponent, owned), self._bn(modulus, owned)
            r = self._new(owned)
            self._check(lib.BN_mod_exp_mont(r, b, e, m, ctx, self._ffi.NULL), "BN_mod_exp_mont")
            return self._int(r)
        finally:
            for bn in owned:
                lib.BN_free(bn)

    def crt(self, c: int, p: int, q: int, dp: int, dq: int, u: int) -> int:
        lib, owned = self._lib, list[Any]()
        null = self._ffi.NULL
        ctx = self._ctx()
        try:
            bc, bp, bq = self._bn(c, owned), self._bn(p, owned), self._bn(q, owned)
            bdp, bdq, bu = self._bn(dp, owned), self._bn(dq, owned), self._bn(u, owned)
            a1, a2, m1, m2, h, r = (self._new(owned) for _ in range(6))
            self._check(lib.BN_nnmod(a1, bc, bp, ctx) & lib.BN_nnmod(a2, bc, bq, ctx), "BN_nnmod")
            self._check(
                lib.BN_mod_exp_mont_consttime_x2(m1, a1, bdp, bp, null, m2, a2, bdq, bq, null, ctx),
                "BN_mod_exp_mont_consttime_x2",
            )
            self._check(lib.BN_mod_sub(h, m1, m2, bp, ctx), "BN_mod_sub")
            self._check(lib.BN_mod_mul(h, h, bu, bp, ctx), "BN_mod_mul")
            self._check(lib.BN_mul(h, h, bq, ctx), "BN_mul")
            self._check(lib.BN_add(r, m2, h), "BN_add")
            return self._int(r)
        finally:
            for bn in owned:
                lib.BN_free(bn)


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
