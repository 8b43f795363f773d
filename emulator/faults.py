"""Fault specifications: frozen dataclasses whose reprs are valid Python.

A fault is data; :mod:`emulator.control` arms it and the card model applies it.  Each fault that
takes a trigger fires now (no trigger), at a clock time (``at=``), or right after the card accepts
its ``after_requests``-th NQAP counted from when the fault was armed (so ``after_requests=3`` lets
three more requests in and fails the card with them held).
"""

from __future__ import annotations

from dataclasses import dataclass

from apformats.results import qid_card

__all__ = [
    "Busy",
    "Checkstop",
    "Deconfigure",
    "FailRequest",
    "Fault",
    "MachineFailure",
    "ResetInProgress",
    "SlowEngines",
]


def _check_trigger(at: float | None, after_requests: int | None) -> None:
    if at is not None and after_requests is not None:
        raise ValueError("give at= or after_requests=, not both")
    if after_requests is not None and (type(after_requests) is not int or after_requests < 1):
        raise ValueError(f"after_requests must be an int >= 1, got {after_requests!r}")


def _check_duration(name: str, value: float | None, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if value is None or value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class _CardFault:
    """What every whole-card fault has: the card, and when it strikes."""

    card: int
    at: float | None = None
    after_requests: int | None = None

    def __post_init__(self) -> None:
        _check_trigger(self.at, self.after_requests)

    @property
    def trigger_card(self) -> int:
        return self.card


@dataclass(frozen=True, kw_only=True)
class MachineFailure(_CardFault):
    """A non-recoverable error: held messages get in-process / request-pending replies, stored until
    ``recovery_time`` (profile default when None) has passed; BUSY on all but DQAP meanwhile."""

    recovery_time: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_duration("recovery_time", self.recovery_time, optional=True)


@dataclass(frozen=True, kw_only=True)
class Checkstop(_CardFault):
    """The card stops dead: RC 0x04 everywhere, held messages lost, no replies, until restored."""


@dataclass(frozen=True, kw_only=True)
class Deconfigure(_CardFault):
    """The card is configured off: RC 0x03 everywhere, held messages lost, until restored."""


@dataclass(frozen=True, kw_only=True)
class _QueueFault:
    """What every fault on one queue for a while has: the queue, how long, and when it strikes."""

    qid: int
    duration: float
    at: float | None = None
    after_requests: int | None = None

    def __post_init__(self) -> None:
        _check_trigger(self.at, self.after_requests)
        _check_duration("duration", self.duration)

    @property
    def trigger_card(self) -> int:
        return qid_card(self.qid)


@dataclass(frozen=True, kw_only=True)
class ResetInProgress(_QueueFault):
    """An externally initiated reset of one queue: its messages are discarded, RC 0x02 for
    ``duration`` seconds, interrupts end disabled."""


@dataclass(frozen=True, kw_only=True)
class Busy(_QueueFault):
    """RC 0x05 on NQAP, DQAP and TAPQ of one queue for ``duration`` seconds; the engines keep
    working on what the queue holds."""


@dataclass(frozen=True, kw_only=True)
class SlowEngines:
    """Every service time started on the card is multiplied by ``factor`` (for ``duration``
    seconds, or until cleared)."""

    card: int
    factor: float
    duration: float | None = None
    at: float | None = None
    after_requests: int | None = None

    def __post_init__(self) -> None:
        _check_trigger(self.at, self.after_requests)
        _check_duration("duration", self.duration, optional=True)
        if not self.factor > 0:
            raise ValueError(f"factor must be > 0, got {self.factor!r}")

    @property
    def trigger_card(self) -> int:
        return self.card


@dataclass(frozen=True, kw_only=True)
class FailRequest:
    """One accepted request fails on its engine with a type 82 reply ``reply_code`` and no effect.

    ``qid`` limits it to one queue (None: any queue).  ``nth`` picks the nth matching NQAP accepted
    after the fault was armed (None: the next one).  With ``probability`` it is standing instead:
    every matching request fails with that probability (drawn from the emulator's fault stream)
    until cleared.
    """

    reply_code: int
    qid: int | None = None
    nth: int | None = None
    probability: float | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.reply_code <= 0xFF:
            raise ValueError(f"reply_code must be a byte, got {self.reply_code!r}")
        if self.nth is not None and (type(self.nth) is not int or self.nth < 1):
            raise ValueError(f"nth must be an int >= 1, got {self.nth!r}")
        if self.probability is not None:
            if self.nth is not None:
                raise ValueError("give nth= or probability=, not both")
            if not 0 <= self.probability <= 1:
                raise ValueError(f"probability must be in [0, 1], got {self.probability!r}")


Fault = MachineFailure | Checkstop | Deconfigure | ResetInProgress | Busy | SlowEngines | FailRequest
