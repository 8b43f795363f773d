"""What the sans-I/O core asks its runner to do.  Frozen, slotted, compared by type.

The core never performs I/O, sleeps or reads a clock: it returns these, and a runner (threaded,
asyncio or simulated) carries them out and feeds the results back as calls on the core.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from apcrypto.core.events import Command


@dataclass(frozen=True, slots=True)
class Execute:
    """Submit these AP instructions to the transport (in order)."""

    commands: tuple[Command, ...]


@dataclass(frozen=True, slots=True)
class ArmTimer:
    """(Re)arm the timer ``key`` to fire at ``at`` on the runner's clock (an absolute deadline: the
    ``now`` the core was last called with, plus the wait); re-arming replaces it.  A deadline
    already past fires as soon as the runner can."""

    key: tuple[Any, ...]  # an apcrypto.core.timers.TimerKey
    at: float


@dataclass(frozen=True, slots=True)
class CancelTimer:
    key: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Resolve:
    """Request ``rid`` has its outcome: ``value`` on success, else ``error`` (an ApcryptoError)."""

    rid: int
    value: Any = None
    error: BaseException | None = None


Action = Execute | ArmTimer | CancelTimer | Resolve
