"""Fault specifications: frozen dataclasses whose reprs are valid Python.

A fault is data; :mod:`emulator.control` arms it and the card model applies it.  Each fault that
takes a trigger fires now (no trigger), at a clock time (``at=``), or right after the card accepts
its ``after_requests``-th NQAP counted from when the fault was armed (so ``after_requests=3`` lets
three more requests in and fails the card with them held).

Every field is checked when the fault is built (so in process and through the control plane alike),
and a value out of its range is a ``ValueError`` naming the field.  The ranges, chosen so that no
timer lands further out than a clock can wait and no typo arms a fault for centuries:

==========================  ========================================
``card``                    int in [0, 255]
``qid``                     int in [0, 0xFFFF]
``at``                      finite, in [0, :data:`MAX_AT`] s of emulator clock time
``duration``,               finite, in [0, :data:`MAX_DURATION`] s
``recovery_time``
``factor``                  finite, in (0, :data:`MAX_FACTOR`]
``after_requests``, ``nth`` int in [1, :data:`MAX_COUNT`]
``reply_code``              int in [0, 255]
``probability``             finite, in [0, 1]
==========================  ========================================

Booleans are not accepted where an int is meant (``True`` is an ``int`` to Python, not to us).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

from apformats.results import qid_card

__all__ = [
    "MAX_AT",
    "MAX_COUNT",
    "MAX_DURATION",
    "MAX_FACTOR",
    "Busy",
    "Checkstop",
    "Deconfigure",
    "FailRequest",
    "Fault",
    "MachineFailure",
    "ResetInProgress",
    "SlowEngines",
]


#: Latest ``at=`` accepted, seconds of emulator clock time (about 3 years).
MAX_AT: Final = 1e8
#: Longest ``duration`` / ``recovery_time`` accepted, seconds (about 11.6 days).
MAX_DURATION: Final = 1e6
#: Largest slow-engines ``factor``.
MAX_FACTOR: Final = 1e6
#: Largest ``after_requests`` / ``nth``.
MAX_COUNT: Final = 1_000_000_000


def check_int(name: str, value: object, lo: int, hi: int) -> int:
    """``value`` as an int in [lo, hi], or a ValueError that names ``name`` and the range."""
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {value!r}")
    return value


def check_number(name: str, value: object, lo: float, hi: float, *, open_low: bool = False) -> float:
    """``value`` as a finite number in [lo, hi] ((lo, hi] with ``open_low``), or a ValueError."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        v = float(value)  # type: ignore[arg-type]
        ok = (lo < v if open_low else lo <= v) and v <= hi
    if not ok:
        bracket = "(" if open_low else "["
        raise ValueError(f"{name} must be a finite number in {bracket}{lo:g}, {hi:g}], got {value!r}")
    return float(value)  # type: ignore[arg-type]


def _check_trigger(at: float | None, after_requests: int | None) -> None:
    if at is not None and after_requests is not None:
        raise ValueError("give at= or after_requests=, not both")
    if at is not None:
        check_number("at", at, 0.0, MAX_AT)
    if after_requests is not None:
        check_int("after_requests", after_requests, 1, MAX_COUNT)


def _check_duration(name: str, value: float | None, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    check_number(name, value, 0.0, MAX_DURATION)


@dataclass(frozen=True, kw_only=True)
class _CardFault:
    """What every whole-card fault has: the card, and when it strikes."""

    card: int
    at: float | None = None
    after_requests: int | None = None

    def __post_init__(self) -> None:
        check_int("card", self.card, 0, 255)
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
        check_int("qid", self.qid, 0, 0xFFFF)
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
        check_int("card", self.card, 0, 255)
        _check_trigger(self.at, self.after_requests)
        _check_duration("duration", self.duration, optional=True)
        check_number("factor", self.factor, 0.0, MAX_FACTOR, open_low=True)

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
        check_int("reply_code", self.reply_code, 0, 0xFF)
        if self.qid is not None:
            check_int("qid", self.qid, 0, 0xFFFF)
        if self.nth is not None:
            check_int("nth", self.nth, 1, MAX_COUNT)
        if self.probability is not None:
            if self.nth is not None:
                raise ValueError("give nth= or probability=, not both")
            check_number("probability", self.probability, 0.0, 1.0)


Fault = MachineFailure | Checkstop | Deconfigure | ResetInProgress | Busy | SlowEngines | FailRequest
