"""The firmware's inputs and output: per-domain state, the execution context and the result.

The emulator owns one :class:`DomainStore` per (card, domain) and passes it in a
:class:`FirmwareContext` with each request; the firmware mutates only that store and the given
``random.Random``, so a run replays exactly from the emulator's seed (``docs/INTERNALS.md`` §2).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from firmware_stubs.arithmetic import unavailable_reason

#: Card modes and the one request type each understands (a CCA coprocessor takes CPRBs, §4.4).
MODE_REQUEST_TYPE: dict[str, int] = {"accel": 0x50, "cca": 0x06}

#: The firmware's arithmetic: ``real`` computes (:mod:`firmware_stubs.arithmetic`); ``echo`` answers
#: RSA with the message itself, correctly shaped, for overhead benchmarks only (the ``overhead``
#: profile; see ``rsa.mod_expo``).
COMPUTE_MODES: tuple[str, ...] = ("real", "echo")

#: The counter is a u64 in the CPRB reply.
COUNTER_MAX = 0xFFFF_FFFF_FFFF_FFFF


@dataclass(slots=True)
class DomainStore:
    """Persistent state of one domain on one card.

    ``counter`` models a monotonic *hardware* counter: it only moves up and it **survives**
    :meth:`zeroize` (a zeroize erases secrets, not usage counters), so a request executed twice —
    e.g. re-driven after a machine failure although it had already run — shows as a counter that
    moved twice.  ``key_slots`` are secrets and are cleared by :meth:`zeroize`.  ``changes`` counts
    state-changing executions, a cheap cross-check for tests.
    """

    counter: int = 0
    key_slots: dict[int, bytes] = field(default_factory=dict)
    changes: int = 0

    def increment(self, by: int) -> tuple[int, int]:
        """Add ``by`` (≥ 0, no wrap past ``COUNTER_MAX``) and return (old, new); ``ValueError`` otherwise."""
        old = self.counter
        new = old + by
        if by < 0 or new > COUNTER_MAX:
            raise ValueError(f"counter {old} + {by} out of range")
        self.counter = new
        if by:
            self.changes += 1
        return old, new

    def store_key(self, slot: int, key: bytes) -> None:
        self.key_slots[slot] = bytes(key)
        self.changes += 1

    def zeroize(self) -> None:
        """ZAPQ's zeroize: clear key slots; the monotonic counter is kept (see class docstring)."""
        self.key_slots.clear()


@dataclass(frozen=True, slots=True)
class FirmwareContext:
    """Everything one execution may consult besides the request bytes."""

    domain: int
    store: DomainStore
    rng: random.Random
    max_mod_bytes: int = 512
    mode: str = "accel"
    compute: str = "real"
    #: which library computes RSA (:data:`~firmware_stubs.arithmetic.ARITHMETIC_NAMES`): the numbers
    #: are the same whichever it is, only the speed differs.
    arithmetic: str = "auto"

    def __post_init__(self) -> None:
        if self.mode not in MODE_REQUEST_TYPE:
            raise ValueError(f"mode {self.mode!r} not one of {sorted(MODE_REQUEST_TYPE)}")
        if self.compute not in COMPUTE_MODES:
            raise ValueError(f"compute {self.compute!r} not one of {COMPUTE_MODES}")
        reason = unavailable_reason(self.arithmetic)
        if reason is not None:
            raise ValueError(reason)


@dataclass(frozen=True, slots=True)
class FirmwareResult:
    """One execution's outcome.

    ``reply`` is the complete reply message; ``function`` the op class for the emulator's
    service-time model (``"MEX_2K"``, ``"CRT_4K"``, ``"RNG"``, ``"CPRB:CI"``, ``"INVALID"`` when the
    header names none); ``ok`` is False for every error reply (type 82, or type 86 with a CCA
    ``rtcode`` ≥ 8); ``reply_code`` the AP-level code (0 for type 80/86); ``effect`` describes the
    state change made (``"counter 5->6"``), None when nothing changed.
    """

    reply: bytes
    function: str
    ok: bool
    reply_code: int
    effect: str | None = None
