"""RSA modular exponentiation (ME) and CRT on type 50 requests, answered by type 80 replies.

The arithmetic is the context's (:mod:`firmware_stubs.arithmetic`: OpenSSL's bignums through cffi
when they load, else gmpy2; both give the same numbers for every input).  Operand problems
never raise: they become the reply codes of :mod:`firmware_stubs.reply_codes`, checked in the
order zero-length field → modulus size → even modulus → operand ≥ modulus.  The result is the
modulus' byte length, right-aligned in the type 80 as the driver reads it (``reference/zcrypt.md``
§4.2).  An all-zero *message* is a valid operand (0^e = 0); only key fields count as zero-length.

With ``ctx.compute == "echo"`` (the ``overhead`` profile, for benchmarks of the software alone)
every check still runs and the reply has the same shape, but holds the message itself: none of the
math, so its results are wrong on purpose.
"""

from __future__ import annotations

from apformats.messages import build_type80
from apformats.msgtypes import VARIANT_BY_NAME, Request
from firmware_stubs.arithmetic import resolve
from firmware_stubs.context import FirmwareContext, FirmwareResult
from firmware_stubs.reply_codes import error_result


def _byte_len(value: int) -> int:
    return (value.bit_length() + 7) // 8


def _ok(result: int, mod_len: int, function: str) -> FirmwareResult:
    return FirmwareResult(build_type80(result.to_bytes(mod_len, "big")), function, True, 0, None)


def mod_expo(req: Request, ctx: FirmwareContext) -> FirmwareResult:
    """ME: message^exponent mod modulus."""
    function = VARIANT_BY_NAME[req.variant or ""].function
    n, e, m = req.modulus or 0, req.exponent or 0, req.message
    if n == 0 or e == 0:
        return error_result("zero_field", function)
    mod_len = _byte_len(n)
    if mod_len > ctx.max_mod_bytes:
        return error_result("modulus_too_big", function)
    if not n & 1:
        return error_result("even_modulus", function)
    if m >= n:
        return error_result("operand_too_big", function)
    if ctx.compute == "echo":
        return _ok(m, mod_len, function)
    return _ok(resolve(ctx.arithmetic).powmod(m, e, n), mod_len, function)


def crt(req: Request, ctx: FirmwareContext) -> FirmwareResult:
    """CRT (Garner): m1 = c^dp mod p, m2 = c^dq mod q, h = u(m1 - m2) mod p, result = m2 + h*q."""
    function = VARIANT_BY_NAME[req.variant or ""].function
    p, q, dp, dq, u = (x or 0 for x in (req.p, req.q, req.dp, req.dq, req.u))
    c = req.message
    if not (p and q and dp and dq and u):
        return error_result("zero_field", function)
    n = p * q
    mod_len = _byte_len(n)
    if mod_len > ctx.max_mod_bytes:
        return error_result("modulus_too_big", function)
    if not (p & 1 and q & 1):
        return error_result("even_modulus", function)
    if c >= n or dp >= p or dq >= q or u >= p:
        return error_result("operand_too_big", function)
    if ctx.compute == "echo":
        return _ok(c, mod_len, function)
    return _ok(resolve(ctx.arithmetic).crt(c, p, q, dp, dq, u), mod_len, function)
