"""``emu:`` -- the embedded emulator, reached by direct calls (no frames, no sockets, no threads).

``emu:`` builds an emulator from the default profile, ``emu:NAME`` from a bundled profile or a TOML
path; ``emulator=`` drives one the caller built (tests use its control plane and execution log).
Commands execute synchronously inside ``submit``; their completions wait in a deque for ``poll``.
Adapter interrupts arrive from the emulator's clock context (its pump thread on a wall clock).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

from apcrypto.transport.base import Command, Completion, Interrupt, Transport, TransportEvent
from apformats.codes import ResponseCode
from apformats.results import ApResult, qid_domain
from apformats.status import QueueStatus

_NOT_AVAIL = ApResult(QueueStatus(response_code=ResponseCode.Q_NOT_AVAIL))


class InprocTransport(Transport):
    """Direct calls into an :class:`emulator.Emulator` living in this process."""

    supports_interrupts = True

    def __init__(self, emulator: Any, *, owns: bool = False, domains: Sequence[int] | None = None) -> None:
        super().__init__()
        self.emulator = emulator
        self._owns = owns
        self._domains = None if domains is None else frozenset(domains)
        self._events: deque[TransportEvent] = deque()
        # the clock's assisting context (a wall clock's: see _send), looked up once, not per batch
        assisting = getattr(getattr(emulator, "clock", None), "assisting", None)
        self._assist: Any = None if assisting is None else assisting()

    @property
    def clock_assist(self) -> Any | None:
        """The emulator's wall-clock ``assisting()`` context (None on a virtual clock): a runner
        enters it for each of its turns, so the clock's pump stands down while the runner works the
        emulator and what falls due meanwhile (an engine finishing, the interrupt saying so) runs on
        the runner's thread at the turn's end instead of fighting it for the GIL and the lock."""
        return self._assist

    @property
    def virtual_clock(self) -> Any | None:
        """The emulator's clock when it is virtual (the runner then drives time), else None."""
        clock = self.emulator.clock
        return (
            clock
            if hasattr(clock, "step") and hasattr(clock, "next_deadline") and not hasattr(clock, "running")
            else None
        )

    def qids(self) -> list[int]:
        qids = list(self.emulator.qids())
        if self._domains is not None:
            qids = [q for q in qids if qid_domain(q) in self._domains]
        return qids

    def _allowed(self, qid: int) -> bool:
        return self._domains is None or qid_domain(qid) in self._domains

    def _on_irq(self, qid: int) -> None:
        self._events.append(Interrupt(qid))
        self._notify_ready()

    def _send(self, commands: Sequence[Command]) -> None:
        # On a wall clock, the interrupts these commands cause are raised on this thread when the
        # batch is done (``WallClock.assisting``, as the frame server does per batch of frames)
        # instead of on the clock's pump thread: no thread switch and clock-lock round trip per
        # batch, and the runner's pump loop sees them at once.
        assist = self._assist
        if assist is None:
            self._execute(commands)
        else:
            with assist:
                self._execute(commands)

    def _execute(self, commands: Sequence[Command]) -> None:
        execute = self.emulator.execute  # the emulator's one instruction entry, as the frame server's
        irq = self._on_irq
        append = self._events.append
        if self._domains is None:  # the common case: every queue the emulator has is ours
            for c in commands:
                append(Completion(c.tag, execute(c, irq)))
            return
        allowed = self._allowed
        for c in commands:
            append(Completion(c.tag, execute(c, irq) if allowed(c.qid) else _NOT_AVAIL))

    def _recv(self, timeout: float) -> list[TransportEvent]:
        ev = self._events
        out: list[TransportEvent] = []
        while ev:
            out.append(ev.popleft())
        return out

    def _close(self) -> None:
        if self._owns:
            self.emulator.close()


def open_inproc(
    url: str,
    *,
    emulator: Any = None,
    seed: int = 0,
    clock: str = "wall",
    domains: Sequence[int] | None = None,
    **_ignored: Any,
) -> InprocTransport:
    """Open ``emu:[PROFILE]``.  Without ``emulator=``, builds one on a wall clock and owns it."""
    if emulator is not None:
        return InprocTransport(emulator, domains=domains)
    from emulator import Emulator  # the driver reaches the emulator only through this transport

    profile = url.partition(":")[2] or "default"
    return InprocTransport(Emulator(profile, clock=clock, seed=seed), owns=True, domains=domains)
