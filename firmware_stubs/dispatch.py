"""``execute``: one request in, one reply out, never an exception for bad bytes.

Order of judgement (first match answers): request type vs card mode → parse (format errors by
``FormatError.kind``) → per-kind operand checks (RSA) or domain then function code (CPRB).  Every
error answer comes from the table in :mod:`firmware_stubs.reply_codes`.
"""

from __future__ import annotations

from apformats.errors import FormatError
from apformats.messages import parse_request, request_function
from firmware_stubs import cprb_ops, rsa
from firmware_stubs.context import MODE_REQUEST_TYPE, FirmwareContext, FirmwareResult
from firmware_stubs.reply_codes import error_result

#: Op class of a request whose header names no operation.
INVALID_FUNCTION = "INVALID"

_REQUEST_TYPES = frozenset(MODE_REQUEST_TYPE.values())


def execute(request: bytes, ctx: FirmwareContext) -> FirmwareResult:
    """Run ``request`` on a card in ``ctx.mode`` for ``ctx.domain``; see :class:`FirmwareResult`."""
    data = bytes(request)
    try:
        function = request_function(data)
    except FormatError:
        function = INVALID_FUNCTION
    if len(data) < 2:
        return error_result("truncated", function)
    msg_type = data[1]
    if msg_type != MODE_REQUEST_TYPE[ctx.mode]:
        return error_result("wrong_mode" if msg_type in _REQUEST_TYPES else "type", function)
    try:
        req = parse_request(data)
    except FormatError as exc:
        return error_result(exc.kind, function)
    if req.msg_type == 0x50:
        variant = req.variant or ""
        return rsa.crt(req, ctx) if variant.startswith("CRB") else rsa.mod_expo(req, ctx)
    if req.domain != ctx.domain:
        return error_result("wrong_domain", function)
    handler = cprb_ops.HANDLERS.get(req.function or "")
    if handler is None:
        return error_result("unknown_function", function)
    return handler(req.payload, ctx)
