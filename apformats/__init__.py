"""AP wire formats: the one source of truth for every binary layout apcrypto speaks.

This package sits below the driver (``apcrypto``), the emulator and the firmware stubs, so all three
share one definition of each format without the driver importing the emulator or the firmware
knowing about the driver.  Every layout is a ``construct`` definition; a hand-written ``struct``
fast path may exist beside it only where a test proves the two agree on valid and corrupted bytes.
"""

from apformats.codes import (
    MachineFailureState,
    MessageType,
    ReplyCode,
    ResponseCode,
)
from apformats.errors import FormatError
from apformats.results import ApResult, Instr
from apformats.status import HwInfo, QueueStatus

__all__ = [
    "ApResult",
    "FormatError",
    "HwInfo",
    "Instr",
    "MachineFailureState",
    "MessageType",
    "QueueStatus",
    "ReplyCode",
    "ResponseCode",
]
