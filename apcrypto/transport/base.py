"""The transport seam: one ABC, many backends chosen by URL scheme (the python-can pattern).

A transport moves AP instructions to an adapter and their results back.  It knows nothing of
requests, ledgers or crypto: it sees opaque ``tag`` numbers chosen by the runner, APQNs, psmids and
message bytes.  The base class holds the policy every backend shares (tag bookkeeping, close
semantics, which tags a lost peer leaves unanswered); a backend implements only ``_send`` and
``_recv`` and, optionally, interrupt support.

Threading contract: ``submit`` and ``poll`` are called by one runner at a time: its own thread (or
loop), or -- for a transport that sets ``lends_io_thread`` -- the transport's notifying thread taking
the runner's turn under the runner's core lock.  ``wakeup`` and the notify callback may be used from
any thread.  A backend calls the notify callback with none of its locks held that a runner's turn
would need (``submit`` and ``poll`` must not block on them); ``tcp://`` calls it holding only its
socket's I/O lock, which every other thread takes without blocking (a submitting thread that finds it
taken hands its send to the I/O thread), so callbacks run in such a turn cannot deadlock on it.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

from apcrypto.core.events import (
    Command,
    Completion,
    Interrupt,
    PeerRestored,
    TransportEvent,
    TransportLost,
)

# The event types are the core's (it consumes them): defined in apcrypto.core.events, re-exported
# here for backends and for callers that import them from the transport package.
__all__ = [
    "Command",
    "Completion",
    "Interrupt",
    "PeerRestored",
    "Transport",
    "TransportClosed",
    "TransportEvent",
    "TransportLost",
]


class TransportClosed(RuntimeError):
    """``submit`` on a closed transport: a runner bug, never an adapter condition."""


class Transport(ABC):
    """Base of every transport.  Subclasses implement ``_send``, ``_recv`` and ``_close``."""

    #: True when the backend delivers :class:`Interrupt` events (AQIC works end to end).
    supports_interrupts: bool = False

    def __init__(self) -> None:
        self._closed = False
        self._outstanding: dict[int, Command] = {}
        self._notify: Callable[[], None] | None = None
        self._lock = threading.Lock()

    # -- the public, policy-holding surface -------------------------------------------------------
    def submit(self, commands: Sequence[Command]) -> None:
        """Send commands; their completions arrive later through :meth:`poll` (maybe at once)."""
        if self._closed:
            raise TransportClosed(f"{type(self).__name__} is closed")
        for c in commands:
            self._outstanding[c.tag] = c
        self._send(commands)

    def poll(self, timeout: float = 0.0) -> list[TransportEvent]:
        """Return what has arrived, waiting at most ``timeout`` seconds for the first event."""
        if self._closed:
            return []
        events = self._recv(timeout)
        for ev in events:
            if isinstance(ev, Completion):
                self._outstanding.pop(ev.tag, None)
            elif isinstance(ev, TransportLost):
                for t in ev.tags:  # permanent or not: these tags are finished
                    self._outstanding.pop(t, None)
        return events

    def outstanding(self) -> list[Command]:
        """Commands submitted and not yet answered (for a runner's diagnostics and leak checks)."""
        return list(self._outstanding.values())

    def set_notify(self, callback: Callable[[], None] | None) -> None:
        """Register a callable run (from any thread) when :meth:`poll` has something new to return."""
        self._notify = callback

    def _notify_ready(self) -> None:
        cb = self._notify
        if cb is not None:
            cb()

    def wakeup(self) -> None:  # noqa: B027 - optional hook, default is a no-op
        """Make a blocked :meth:`poll` return early (thread-safe).  Default: nothing blocks long."""

    def close(self) -> None:
        """Release every resource.  Idempotent; never raises on a dead peer."""
        if self._closed:
            return
        self._closed = True
        try:
            self._close()
        finally:
            self._outstanding.clear()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what a backend implements -------------------------------------------------------------
    @abstractmethod
    def qids(self) -> list[int]:
        """The APQNs this transport can reach (the QCI configuration as this client may see it)."""

    @abstractmethod
    def _send(self, commands: Sequence[Command]) -> None: ...

    @abstractmethod
    def _recv(self, timeout: float) -> list[TransportEvent]: ...

    @abstractmethod
    def _close(self) -> None: ...
