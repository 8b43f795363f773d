"""Numeric codes of the AP architecture as the Linux zcrypt driver names them.

Sources: ``reference/zcrypt.md`` §2.2 (AP response codes), §4.3 (type 82/88 reply codes).  These are
data, consumed by the driver's classifier table and the emulator; nothing here decides what to do.
"""

from __future__ import annotations

from enum import IntEnum


class ResponseCode(IntEnum):
    """AP queue status-word response codes (``AP_RESPONSE_*``), status word bits 8-15."""

    NORMAL = 0x00
    Q_NOT_AVAIL = 0x01
    RESET_IN_PROGRESS = 0x02
    DECONFIGURED = 0x03
    CHECKSTOPPED = 0x04
    BUSY = 0x05
    INVALID_ADDRESS = 0x06
    OTHERWISE_CHANGED = 0x07
    INVALID_GISA = 0x08
    Q_BOUND_TO_ANOTHER = 0x09
    STATE_CHANGE_IN_PROGRESS = 0x0A
    Q_NOT_BOUND = 0x0B
    Q_FULL = 0x10  # NQAP: no free slot.  Same number as NO_PENDING_REPLY on DQAP.
    INDEX_TOO_BIG = 0x11
    NO_FIRST_PART = 0x13
    MESSAGE_TOO_BIG = 0x15
    REQ_FAC_NOT_INST = 0x16
    Q_BIND_ERROR = 0x30
    Q_NOT_AVAIL_FOR_ASSOC = 0x31
    Q_NOT_EMPTY = 0x32
    BIND_LIMIT_EXCEEDED = 0x33
    INVALID_ASSOC_SECRET = 0x34
    ASSOC_SECRET_NOT_UNIQUE = 0x35
    ASSOC_FAILED = 0x36
    INVALID_DOMAIN = 0x42


#: DQAP's name for 0x10 ("no reply available"); an alias, not a separate enum member.
NO_PENDING_REPLY = ResponseCode.Q_FULL


class MessageType(IntEnum):
    """Message type code at byte 1 of every AP request and reply."""

    TYPE6 = 0x06  # CPRB request (coprocessor)
    TYPE50 = 0x50  # RSA request (accelerator)
    TYPE80 = 0x80  # RSA reply (accelerator)
    TYPE82 = 0x82  # error reply
    TYPE86 = 0x86  # CPRB reply (coprocessor)
    TYPE87 = 0x87  # EP11 error reply
    TYPE88 = 0x88  # error reply (CEX2A-era naming)


class ReplyCode(IntEnum):
    """Type 82 ``reply_code`` (RY) values; type 88 codes with the same number behave the same.

    Names follow ``REP82_ERROR_*``; where only a ``REP88_`` name exists the member is named after it.
    """

    MACHINE_FAILURE = 0x10
    PREEMPT_FAILURE = 0x12
    CHECKPT_FAILURE = 0x14
    MESSAGE_TYPE = 0x20
    INVALID_COMM_CD = 0x21
    MESSAGE_MALFORMD = 0x22  # REP88
    INVALID_MSG_LEN = 0x23
    RESERVD_FIELD = 0x24
    FORMAT_FIELD = 0x29
    INVALID_COMMAND = 0x30
    KEY_TYPE = 0x34  # REP88
    MALFORMED_MSG = 0x40
    INVALID_SPECIAL_CMD = 0x41
    INVALID_DOMAIN_PRECHECK = 0x42
    RESERVED_FIELDO = 0x50
    WORD_ALIGNMENT = 0x60
    MESSAGE_LENGTH = 0x80
    OPERAND_INVALID = 0x82
    OPERAND_SIZE = 0x84
    EVEN_MOD_IN_OPND = 0x85
    RESERVED_FIELD = 0x88
    INVALID_DOMAIN_PENDING = 0x8A
    FILTERED_BY_HYPERVISOR = 0x8B
    TRANSPORT_FAIL = 0x90
    PACKET_TRUNCATED = 0xA0
    ZERO_BUFFER_LEN = 0xB0


class MachineFailureState(IntEnum):
    """Our extension of a type 82 / MACHINE_FAILURE reply (byte 5): what the held message was doing.

    ``UNKNOWN`` is what a plain 8-byte Linux-style machine-failure reply carries (byte 5 is reserved,
    zero); the driver must treat it as conservatively as ``IN_PROCESS``.
    """

    UNKNOWN = 0
    IN_PROCESS = 1  # an engine had started it: outcome unknown
    REQUEST_PENDING = 2  # still waiting in its slot: it never ran, safe to re-drive


#: Engine byte value meaning "no engine" (request-pending messages).
NO_ENGINE = 0xFF
