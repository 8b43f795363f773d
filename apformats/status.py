"""The AP queue status word (GR1 low 32 bits) and the TAPQ hardware-info word (GR2).

``STATUS_WORD`` and ``HWINFO_WORD`` (construct ``BitStruct``s, MSB-first as on s390) are the
specification.  :class:`QueueStatus` and :class:`HwInfo` are the frozen values the rest of the code
passes around; their ``word``/``from_word`` integer conversions are the hot-path form, and
``tests/test_formats_status.py`` proves they agree with the construct definitions bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import construct as cs

from apformats.codes import ResponseCode
from apformats.errors import FormatError

# --- construct definitions: the specification -------------------------------------------------

STATUS_WORD = cs.BitStruct(
    "queue_empty" / cs.Flag,  # bit 0 (E)
    "replies_waiting" / cs.Flag,  # bit 1 (R)
    "queue_full" / cs.Flag,  # bit 2 (F)
    cs.Padding(3),  # bits 3-5 reserved
    "async_" / cs.Flag,  # bit 6: response code reports an asynchronous error
    "irq_enabled" / cs.Flag,  # bit 7 (I)
    "response_code" / cs.BitsInteger(8),  # bits 8-15
    cs.Padding(16),  # bits 16-31 reserved
)

HWINFO_WORD = cs.BitStruct(
    "apsc" / cs.Flag,  # S
    "mex4k" / cs.Flag,  # M
    "crt4k" / cs.Flag,  # C
    "cca" / cs.Flag,  # D
    "accel" / cs.Flag,  # A
    "ep11" / cs.Flag,  # X
    "apxa" / cs.Flag,  # N
    "slcf" / cs.Flag,  # H
    "class_" / cs.BitsInteger(8),
    "bs" / cs.BitsInteger(2),
    cs.Padding(14),
    "at" / cs.BitsInteger(8),
    "nd" / cs.BitsInteger(8),
    cs.Padding(4),
    "ml" / cs.BitsInteger(4),
    cs.Padding(4),
    "qd" / cs.BitsInteger(4),
)

#: Size of one ``ml`` unit (``AP_TAPQ_ML_FIELD_CHUNK_SIZE``) and the default when ``ml`` is 0.
ML_CHUNK = 4096
DEFAULT_MAX_MSG_SIZE = 12 * 1024

_RC_MASK = 0x00FF0000


@dataclass(frozen=True, slots=True)
class QueueStatus:
    """One AP queue status word, as every instruction returns it."""

    response_code: int = ResponseCode.NORMAL
    queue_empty: bool = False
    replies_waiting: bool = False
    queue_full: bool = False
    irq_enabled: bool = False
    async_: bool = False

    @property
    def word(self) -> int:
        """The 32-bit status word (bit 0 = MSB)."""
        return (
            (0x80000000 if self.queue_empty else 0)
            | (0x40000000 if self.replies_waiting else 0)
            | (0x20000000 if self.queue_full else 0)
            | (0x02000000 if self.async_ else 0)
            | (0x01000000 if self.irq_enabled else 0)
            | ((self.response_code & 0xFF) << 16)
        )

    @classmethod
    def from_word(cls, word: int) -> QueueStatus:
        """Decode a 32-bit status word; reserved bits are ignored (hardware may set them)."""
        if not 0 <= word <= 0xFFFFFFFF:
            raise FormatError(f"status word {word!r} is not a 32-bit value", kind="range")
        return cls(
            response_code=(word & _RC_MASK) >> 16,
            queue_empty=bool(word & 0x80000000),
            replies_waiting=bool(word & 0x40000000),
            queue_full=bool(word & 0x20000000),
            irq_enabled=bool(word & 0x01000000),
            async_=bool(word & 0x02000000),
        )

    @property
    def rc(self) -> int:
        """Short alias for the response code."""
        return self.response_code

    def rc_name(self) -> str:
        """The kernel's name for the response code, or ``"response code N"`` if unknown."""
        try:
            return ResponseCode(self.response_code).name
        except ValueError:
            return f"response code {self.response_code:#04x}"


def queue_slots(qd: int) -> int:
    """Request slots of a queue whose TAPQ reports queue depth ``qd``: ``qd + 1``.  The one place
    this is written; the kernel once used ``qd`` itself and lost a slot per queue."""
    return qd + 1


@dataclass(frozen=True, slots=True)
class HwInfo:
    """The TAPQ GR2 hardware-info word (``struct ap_tapq_hwinfo``)."""

    at: int = 0  # raw AP type (10 CEX4 .. 14 CEX8)
    nd: int = 0  # number of domains
    ml: int = 0  # max message length in 4096-byte chunks (0 -> 12 KiB)
    qd: int = 0  # queue depth minus one
    apsc: bool = False
    mex4k: bool = False
    crt4k: bool = False
    cca: bool = False
    accel: bool = False
    ep11: bool = False
    apxa: bool = False
    slcf: bool = False
    class_: int = 0
    bs: int = 0

    @property
    def slots(self) -> int:
        """Request slots of the queue (:func:`queue_slots`)."""
        return queue_slots(self.qd)

    @property
    def max_msg_size(self) -> int:
        """Largest message the card accepts, in bytes."""
        return self.ml * ML_CHUNK if self.ml else DEFAULT_MAX_MSG_SIZE

    @property
    def fac(self) -> int:
        """The 32-bit facility half (``ap_functions`` in sysfs)."""
        return self.word >> 32

    @property
    def word(self) -> int:
        flags = (
            (self.apsc << 7)
            | (self.mex4k << 6)
            | (self.crt4k << 5)
            | (self.cca << 4)
            | (self.accel << 3)
            | (self.ep11 << 2)
            | (self.apxa << 1)
            | int(self.slcf)
        )
        return (
            (flags << 56)
            | ((self.class_ & 0xFF) << 48)
            | ((self.bs & 0x3) << 46)
            | ((self.at & 0xFF) << 24)
            | ((self.nd & 0xFF) << 16)
            | ((self.ml & 0xF) << 8)
            | (self.qd & 0xF)
        )

    @classmethod
    def from_word(cls, word: int) -> HwInfo:
        if not 0 <= word <= 0xFFFFFFFFFFFFFFFF:
            raise FormatError(f"hwinfo word {word!r} is not a 64-bit value", kind="range")
        flags = word >> 56
        return cls(
            apsc=bool(flags & 0x80),
            mex4k=bool(flags & 0x40),
            crt4k=bool(flags & 0x20),
            cca=bool(flags & 0x10),
            accel=bool(flags & 0x08),
            ep11=bool(flags & 0x04),
            apxa=bool(flags & 0x02),
            slcf=bool(flags & 0x01),
            class_=(word >> 48) & 0xFF,
            bs=(word >> 46) & 0x3,
            at=(word >> 24) & 0xFF,
            nd=(word >> 16) & 0xFF,
            ml=(word >> 8) & 0xF,
            qd=word & 0xF,
        )

    @property
    def mode(self) -> str:
        """``"accel"``, ``"cca"``, ``"ep11"`` or ``"unknown"``, from the D/A/X bits as lszcrypt does."""
        if self.cca:
            return "cca"
        if self.accel:
            return "accel"
        if self.ep11:
            return "ep11"
        return "unknown"


def parse_status_word(data: bytes) -> QueueStatus:
    """Parse 4 big-endian bytes with the construct definition (the slow, specified path)."""
    if len(data) != 4:
        raise FormatError(f"status word needs 4 bytes, got {len(data)}", kind="truncated")
    c = STATUS_WORD.parse(data)
    return QueueStatus(
        response_code=c.response_code,
        queue_empty=c.queue_empty,
        replies_waiting=c.replies_waiting,
        queue_full=c.queue_full,
        irq_enabled=c.irq_enabled,
        async_=c.async_,
    )


def build_status_word(status: QueueStatus) -> bytes:
    """Build 4 big-endian bytes with the construct definition."""
    return STATUS_WORD.build(
        {
            "queue_empty": status.queue_empty,
            "replies_waiting": status.replies_waiting,
            "queue_full": status.queue_full,
            "async_": status.async_,
            "irq_enabled": status.irq_enabled,
            "response_code": status.response_code,
        }
    )


_HW_FIELDS = (
    "apsc",
    "mex4k",
    "crt4k",
    "cca",
    "accel",
    "ep11",
    "apxa",
    "slcf",
    "class_",
    "bs",
    "at",
    "nd",
    "ml",
    "qd",
)


def parse_hwinfo_word(data: bytes) -> HwInfo:
    """Parse 8 big-endian bytes with the construct definition."""
    if len(data) != 8:
        raise FormatError(f"hwinfo word needs 8 bytes, got {len(data)}", kind="truncated")
    c = HWINFO_WORD.parse(data)
    return HwInfo(**{f: c[f] for f in _HW_FIELDS})


def build_hwinfo_word(info: HwInfo) -> bytes:
    """Build 8 big-endian bytes with the construct definition."""
    return HWINFO_WORD.build({f: getattr(info, f) for f in _HW_FIELDS})
