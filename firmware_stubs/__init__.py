"""What an AP card computes, as pure functions: bytes in, bytes out (docs/INTERNALS.md §2).

No queues, sockets, threads or clocks: the emulator decides *when* and *where* a request runs;
this package decides *what* it answers — RSA ME/CRT (type 50 → type 80), our CPRB functions
(type 6 → type 86), error replies (type 82) for bad input, and the machine-failure replies.
"""

from firmware_stubs.context import DomainStore, FirmwareContext, FirmwareResult
from firmware_stubs.dispatch import INVALID_FUNCTION, execute
from firmware_stubs.machine_failure import HeldMessage, format_machine_failure
from firmware_stubs.reply_codes import CCA_STATUS, REPLY_FOR_CONDITION

__all__ = [
    "CCA_STATUS",
    "INVALID_FUNCTION",
    "REPLY_FOR_CONDITION",
    "DomainStore",
    "FirmwareContext",
    "FirmwareResult",
    "HeldMessage",
    "execute",
    "format_machine_failure",
]
