"""What the sans-I/O core asks its runner to do.  Immutable, told apart by type.

The core never performs I/O, sleeps or reads a clock: it returns these, and a runner (threaded,
asyncio or simulated) carries them out and feeds the results back as calls on the core.

They are NamedTuples, not frozen dataclasses: the core builds one ``Resolve`` per request and an
``Execute`` per batch, and a tuple is built in C (a frozen dataclass sets each field through
``object.__setattr__``, three to four times the cost).  Runners dispatch on ``type(action)``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from apcrypto.core.events import Command


class Execute(NamedTuple):
    """Submit these AP instructions to the transport (in order)."""

    commands: tuple[Command, ...]


class ArmTimer(NamedTuple):
    """(Re)arm the timer ``key`` to fire at ``at`` on the runner's clock (an absolute deadline: the
    ``now`` the core was last called with, plus the wait); re-arming replaces it.  A deadline
    already past fires as soon as the runner can."""

    key: tuple[Any, ...]  # an apcrypto.core.timers.TimerKey
    at: float


class CancelTimer(NamedTuple):
    key: tuple[Any, ...]


class Resolve(NamedTuple):
    """Request ``rid`` has its outcome: ``value`` on success, else ``error`` (an ApcryptoError)."""

    rid: int
    value: Any = None
    error: BaseException | None = None


Action = Execute | ArmTimer | CancelTimer | Resolve
