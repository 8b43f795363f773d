"""What one AP instruction returns, shared by the emulator, every transport and the driver core."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from apformats.status import HwInfo, QueueStatus


class Instr(IntEnum):
    """The AP instructions apcrypto uses (PQAP subfunctions folded in as their own opcodes)."""

    TAPQ = 0
    RAPQ = 1
    ZAPQ = 2
    AQIC = 3
    NQAP = 0x10
    DQAP = 0x11


@dataclass(frozen=True, slots=True)
class ApResult:
    """The outcome of one instruction on one APQN.

    ``status`` is always present.  ``psmid`` and ``reply`` are set by a DQAP that returned a reply
    (response code NORMAL); ``hwinfo`` by a TAPQ whose response code lets the GR2 word be trusted.
    """

    status: QueueStatus
    psmid: int = 0
    reply: bytes = b""
    hwinfo: HwInfo | None = None


def qid_of(card: int, domain: int) -> int:
    """``AP_MKQID``: the 16-bit APQN of (card, domain)."""
    if not (0 <= card <= 0xFF and 0 <= domain <= 0xFF):
        raise ValueError(f"card {card} / domain {domain} out of range 0..255")
    return (card << 8) | domain


def qid_card(qid: int) -> int:
    return (qid >> 8) & 0xFF


def qid_domain(qid: int) -> int:
    return qid & 0xFF


def qid_str(qid: int) -> str:
    """sysfs spelling of an APQN: ``XX.YYYY`` in hex."""
    return f"{qid_card(qid):02x}.{qid_domain(qid):04x}"
