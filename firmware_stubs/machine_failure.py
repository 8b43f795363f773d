"""The machine-failure handler: one type 82 / 0x10 reply per message the failed card held.

DESIGN §3 / patent US 11,593,208 (reference/zcrypt.md §8): the card tells the program, per held
message, whether an engine had started it (*in-process*: outcome unknown, may have executed) or it
was still waiting (*request-pending*: never ran, safe to re-drive).  Pure formatting: the emulator
decides which messages were held and in which state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from apformats.codes import MachineFailureState
from apformats.messages import build_machine_failure


@dataclass(frozen=True, slots=True)
class HeldMessage:
    """A message the card held when it failed; ``engine`` is the engine running it, if any."""

    psmid: int
    state: MachineFailureState
    engine: int | None = None


def format_machine_failure(held: Sequence[HeldMessage]) -> list[tuple[int, bytes]]:
    """Exactly one ``(psmid, reply)`` per held message, in the order given.

    A request-pending message never reached an engine, so its engine byte is always ``NO_ENGINE``
    whatever ``engine`` says; an in-process one carries its engine (``NO_ENGINE`` if unknown).
    """
    replies: list[tuple[int, bytes]] = []
    for msg in held:
        engine = None if msg.state == MachineFailureState.REQUEST_PENDING else msg.engine
        replies.append((msg.psmid, build_machine_failure(msg.state, engine)))
    return replies
