"""What the card answers to bad input: one table, condition → type 82 reply code.

Codes are ``reference/zcrypt.md`` §4.3; how the driver treats them is §5.1 (all of these are
``-EINVAL`` "malformed request" except MESSAGE_TYPE (``-EAGAIN``, rescan/retry elsewhere) and
INVALID_COMMAND (default branch, ``-EAGAIN``)).  The first group of keys are the
:class:`apformats.FormatError` ``kind``\\ s that :func:`apformats.messages.parse_request` raises,
so a request that does not parse needs no if-chain either.

CCA application errors (a well-formed CPRB whose payload the function rejects) are not AP-level
errors: they come back as a type 86 with ``reply_code`` 0 and ``rtcode``/``rscode`` from
:data:`CCA_STATUS`.  The reason codes are our choice, taken from the rc/rs pairs the Linux driver
maps to ``-EINVAL`` (§5.2: 8/65, 8/66, 8/72).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from apformats.codes import ReplyCode
from apformats.messages import build_error_reply
from firmware_stubs.context import FirmwareResult

REPLY_FOR_CONDITION: Mapping[str, ReplyCode] = MappingProxyType(
    {
        # -- request does not parse (FormatError.kind from apformats.messages.parse_request) --
        "truncated": ReplyCode.MALFORMED_MSG,  # shorter than a 16-byte header: unparseable
        "malformed": ReplyCode.MALFORMED_MSG,  # e.g. CPRB function code not two chars A-Z0-9
        "field": ReplyCode.MALFORMED_MSG,
        "type": ReplyCode.MESSAGE_TYPE,  # not a request type at all
        "keyblock": ReplyCode.FORMAT_FIELD,  # type 50 keyblock_type not one of the six variants
        "length": ReplyCode.INVALID_MSG_LEN,  # msg_len / payload_len not matching bytes or variant
        "reserved": ReplyCode.RESERVD_FIELD,  # nonzero reserved field
        # -- request parses, the card rejects it --
        "wrong_mode": ReplyCode.MESSAGE_TYPE,  # CPRB on an accelerator, type 50 on a CCA card
        "zero_field": ReplyCode.OPERAND_SIZE,  # an all-zero (zero-length) key field
        "modulus_too_big": ReplyCode.OPERAND_SIZE,  # modulus longer than ctx.max_mod_bytes
        "even_modulus": ReplyCode.EVEN_MOD_IN_OPND,  # ME modulus, CRT p or q even
        "operand_too_big": ReplyCode.OPERAND_INVALID,  # data >= n (CRT: or dp >= p, dq >= q, u >= p)
        "unknown_function": ReplyCode.INVALID_COMMAND,  # CPRB function code we do not implement
        "wrong_domain": ReplyCode.INVALID_DOMAIN_PENDING,  # CPRB domain != the queue's domain
    }
)

#: CCA application errors → (rtcode, rscode) in a type 86 reply.
CCA_STATUS: Mapping[str, tuple[int, int]] = MappingProxyType(
    {
        "payload_length": (8, 72),  # payload size wrong for the function
        "value_range": (8, 66),  # RL count > 4096, counter would pass 2**64-1
        "slot_empty": (8, 65),  # KR of a key slot that holds nothing
    }
)


def error_result(condition: str, function: str) -> FirmwareResult:
    """The type 82 reply for ``condition`` (a key of :data:`REPLY_FOR_CONDITION`)."""
    code = REPLY_FOR_CONDITION[condition]
    return FirmwareResult(build_error_reply(code), function, False, int(code), None)
