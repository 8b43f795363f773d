"""The events the driver core consumes, and the instruction it emits, defined by the core itself.

The core is the consumer of these types, so it owns them: a transport imports them from here (and
``apcrypto.transport.base`` re-exports them for backends and older callers), never the other way
round.  That keeps the sans-I/O core free of any import from the I/O side.

``Command``, the instruction it emits, is :class:`apformats.frames.Command`: the one type a COMMAND
frame decodes to and the emulator executes, so nothing converts between driver, wire and card.
``Completion`` is a NamedTuple too, not a frozen dataclass: one is built per AP instruction, and a
tuple is built in C (about a third of a frozen dataclass's cost).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from apformats.frames import Command
from apformats.results import ApResult


class Completion(NamedTuple):
    """The adapter's answer to the command submitted under ``tag``."""

    tag: int
    result: ApResult


class Interrupt(NamedTuple):
    """An AP adapter interrupt for ``qid``: a reply may be waiting (only after AQIC enabled it)."""

    qid: int


@dataclass(frozen=True, slots=True)
class TransportLost:
    """Commands that will never be answered.  ``tags`` lists them all, whether or not the link recovers.

    ``permanent`` is False while the transport still tries to reach the peer (a dropped frame, a
    reconnect in progress): the tags are still dead, but the queues need not go out of service.
    ``unsent`` is the subset that provably never left the host (held while disconnected), so the
    driver may re-drive them as never sent.  ``resumable`` (with ``permanent``): the peer keeps our
    session, and the replies its cards hold for us, for a grace; a reconnect presenting our resume
    token gets them back (:class:`PeerRestored` ``resumed``), so the driver keeps the work the card
    holds undecided ("maybe on the card") until then, bounded by ``DriverConfig.session_grace``.
    """

    reason: str
    tags: tuple[int, ...] = ()
    permanent: bool = True
    qids: tuple[int, ...] = field(default=())
    unsent: tuple[int, ...] = ()
    resumable: bool = False
    #: the APQNs of the one peer this loss is about (a pool of servers: one server's); None: every
    #: queue (a transport with one peer).  What a loss that can no longer resume decides is limited
    #: to it, so another server's kept session is left to its own grace.
    scope: tuple[int, ...] | None = None


@dataclass(frozen=True, slots=True)
class PeerRestored:
    """The transport's peer is reachable again after a permanent :class:`TransportLost`.

    Queues taken offline by the loss need not wait out their re-probe back-off: the core re-probes
    every offline queue at once, brings the healthy ones up again and serves the work that waited.
    ``resumed``: the peer gave our old session back (its APQNs and the replies they held), so the
    core drains those replies before any reset; False (a new session) means they are gone.
    ``reason`` is for the log only.
    """

    reason: str = ""
    resumed: bool = False
    #: the APQNs of the peer that is back (a pool of servers: one server's); None: every queue.
    #: Only these are re-probed, drained or decided: another server may still be gone.
    scope: tuple[int, ...] | None = None


TransportEvent = Completion | Interrupt | TransportLost | PeerRestored

__all__ = [
    "Command",
    "Completion",
    "Interrupt",
    "PeerRestored",
    "TransportEvent",
    "TransportLost",
]
