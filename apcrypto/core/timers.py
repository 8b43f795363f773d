"""Typed timer keys of the driver core.

A key names what a timer is for: ``TimerKey("poll", qid)``.  It is a NamedTuple whose kind is a
``Literal``, so mypy checks every key the core builds, and it still equals (and hashes like) the
plain tuple ``("poll", qid)`` that runners and tests may hold.  Timers are armed at absolute
deadlines on the runner's clock (:class:`apcrypto.core.actions.ArmTimer` carries ``at``), so
re-arming compares like with like and a runner never has to know when the core asked.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

TimerKind = Literal["poll", "limit", "reply", "deadline", "unavailable", "target", "grace"]

#: What each kind bounds (documentation; the handlers are in machine.TIMERS).
KINDS: dict[str, str] = {
    "poll": "a queue's next look (its state step's wait hint, or an offline queue's re-probe)",
    "limit": "the time a queue may spend in a bounded state (reset, irq, probe, recovery)",
    "reply": "no reply at all for this long while work is on the card: reset the queue",
    "deadline": "a request's caller-given deadline",
    "unavailable": "the grace of work whose kind has no queue in service",
    "target": "the grace of a targeted request whose own APQN is out of service",
    "grace": "work a gone peer's session may still hold for us: decided when it ends unresumed",
}


class TimerKey(NamedTuple):
    kind: TimerKind
    ident: int | str  # qid, request id, or card mode

    @classmethod
    def poll(cls, qid: int) -> TimerKey:
        return cls("poll", qid)

    @classmethod
    def limit(cls, qid: int) -> TimerKey:
        return cls("limit", qid)

    @classmethod
    def reply(cls, qid: int) -> TimerKey:
        return cls("reply", qid)

    @classmethod
    def deadline(cls, rid: int) -> TimerKey:
        return cls("deadline", rid)

    @classmethod
    def unavailable(cls, mode: str) -> TimerKey:
        return cls("unavailable", mode)

    @classmethod
    def target(cls, rid: int) -> TimerKey:
        return cls("target", rid)

    @classmethod
    def grace(cls, qid: int) -> TimerKey:
        return cls("grace", qid)
