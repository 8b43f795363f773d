"""The outbox: the one writer of the core's actions, and the book of what is in flight.

Every instruction the core issues gets its tag here and waits in the batch until the flush;
every timer is armed or cancelled here (absolute deadlines on the runner's clock: ``now`` is the
reading the core was called with, so ``arm_after(key, delay)`` is ``now + delay``; re-arming keeps
an earlier pending deadline unless forced); every outcome is appended here.  ``take()`` hands the
runner one ``Execute`` with the whole batch first, then the rest in the order they were decided.
Because the batch is still in the outbox until then, a queue leaving service can take back its
NQAPs that have not left the host (``withdraw``): they never reach a card that is being reset.
"""

from __future__ import annotations

import itertools
from typing import Any

from apcrypto.core.actions import Action, ArmTimer, CancelTimer, Execute, Resolve
from apcrypto.core.events import Command
from apformats.results import Instr

# Two commands are built per request (NQAP, DQAP): built as the tuple they are, without the
# NamedTuple's Python-level __new__ (half the cost).  The field order is checked here once.
_tuple_new = tuple.__new__
if Command._fields != ("tag", "instr", "qid", "psmid", "message", "flag", "special"):
    raise ImportError("apformats.frames.Command changed its fields: update Outbox.emit")


class Outbox:
    __slots__ = ("_tags", "actions", "armed", "cmds", "in_flight", "now")

    def __init__(self) -> None:
        self._tags = itertools.count(1)
        self.in_flight: dict[int, tuple[int, Instr, int]] = {}  # tag -> (qid, instr, psmid)
        self.cmds: list[Command] = []  # this flush's batch
        self.actions: list[Action] = []  # timers and outcomes, in the order decided
        self.armed: dict[tuple[Any, ...], float] = {}  # timer key -> absolute deadline
        #: the runner's clock at the entry point being handled (the core sets it first thing), so
        #: that every piece arms timers as absolute deadlines on the same reading
        self.now = 0.0

    def emit(self, qid: int, instr: Instr, psmid: int = 0, message: bytes = b"", flag: bool = False) -> int:
        """Queue one instruction for the batch; returns its tag."""
        tag = next(self._tags)
        self.in_flight[tag] = (qid, instr, psmid)
        self.cmds.append(_tuple_new(Command, (tag, instr, qid, psmid, message, flag, False)))
        return tag

    def settle(self, tag: int) -> tuple[int, Instr, int] | None:
        """The command under ``tag`` is answered (or lost): what it was, or None if unknown."""
        return self.in_flight.pop(tag, None)

    def withdraw(self, qid: int, instr: Instr = Instr.NQAP) -> list[Command]:
        """Take back this batch's ``instr`` commands for ``qid``: they have not left the host."""
        if not self.cmds:
            return []
        keep: list[Command] = []
        taken: list[Command] = []
        for c in self.cmds:
            if c.qid == qid and c.instr is instr:
                taken.append(c)
                self.in_flight.pop(c.tag, None)
            else:
                keep.append(c)
        self.cmds = keep
        return taken

    def arm(self, key: tuple[Any, ...], at: float, *, force: bool = False) -> None:
        cur = self.armed.get(key)
        if cur is not None and cur <= at and not force:
            return  # an earlier-or-equal wake-up is already pending
        self.armed[key] = at
        self.actions.append(ArmTimer(key, at))

    def arm_after(self, key: tuple[Any, ...], delay: float, *, force: bool = False) -> None:
        """Arm ``key`` ``delay`` seconds after :attr:`now` (see :meth:`arm`)."""
        self.arm(key, self.now + delay, force=force)

    def disarm(self, key: tuple[Any, ...]) -> None:
        if self.armed.pop(key, None) is not None:
            self.actions.append(CancelTimer(key))

    def fired(self, key: tuple[Any, ...]) -> None:
        self.armed.pop(key, None)

    def cancel_all(self) -> None:
        for key in self.armed:
            self.actions.append(CancelTimer(key))
        self.armed.clear()

    def resolve(self, rid: int, value: Any, error: BaseException | None) -> None:
        self.actions.append(Resolve(rid, value, error))

    def take(self) -> list[Action]:
        """Everything decided since the last take: the batch first, as one ``Execute``."""
        out = self.actions
        if self.cmds:
            out.insert(0, Execute(tuple(self.cmds)))
            self.cmds = []
        self.actions = []
        return out
