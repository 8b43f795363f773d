"""One client's session with the emulator, in frames: bytes of one frame in, frame bytes out.

Transport-independent on purpose: the ZeroMQ server (``emulator.server``) and the USB backend both feed
frames from their own wire into a :class:`FrameSession` and send back what it returns, so the handshake,
domain isolation and error answers behave identically on every transport.

What a session guarantees:

* Nothing reaches the emulator before a successful HELLO, and a bad frame never reaches it at all: a
  frame that does not decode is answered with an ERROR frame (naming the command's tag when the frame is
  intact enough to trust it) and the session keeps going.  So no request or reply the emulator holds is
  lost because a client sent garbage.
* Domain isolation: a session sees only the APQNs of its domains (WELCOME lists them), and a command for
  any other APQN gets a RESULT with response code ``Q_NOT_AVAIL`` (0x01, "APQN not available to this
  configuration", as the hardware answers) without the emulator ever being called for that queue.
* AQIC enable registers this session's interrupt callback: when the emulator signals a reply for the
  queue, the session hands an INTERRUPT frame to its ``notify`` callable.  That runs in the emulator's
  clock context (the WallClock pump thread), so ``notify`` must only queue the bytes; the owner of the
  wire sends them.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from apformats.codes import ResponseCode
from apformats.errors import FormatError
from apformats.frames import (
    DEFAULT_MAX_FRAME,
    PROTOCOL_VERSION,
    Bye,
    CommandFrame,
    ErrorCode,
    ErrorFrame,
    Hello,
    Ping,
    Pong,
    decode_frame,
    encode_error,
    encode_interrupt,
    encode_pong,
    encode_result,
    encode_welcome,
    error_code_for,
    peek_kind,
    peek_tag,
)
from apformats.results import ApResult, Instr, qid_domain
from apformats.status import QueueStatus

__all__ = ["SUPPORTED_VERSIONS", "FrameSession", "InstructionTarget"]

log = logging.getLogger(__name__)

#: Protocol versions this server speaks (inclusive range).
SUPPORTED_VERSIONS: tuple[int, int] = (PROTOCOL_VERSION, PROTOCOL_VERSION)

NotifyFn = Callable[[bytes], None]


class InstructionTarget(Protocol):
    """The part of ``emulator.Emulator`` (INTERNALS §3) a session drives."""

    def tapq(self, qid: int, t_bit: bool = True) -> ApResult: ...
    def nqap(self, qid: int, psmid: int, message: bytes, special: bool = False) -> ApResult: ...
    def dqap(self, qid: int) -> ApResult: ...
    def rapq(self, qid: int, fbit: bool = False) -> ApResult: ...
    def zapq(self, qid: int, fbit: bool = False) -> ApResult: ...
    def aqic(self, qid: int, enable: bool, notify: Callable[[int], None] | None = None) -> ApResult: ...
    def qids(self) -> list[int]: ...


_Exec = Callable[[InstructionTarget, CommandFrame, Callable[[int], None] | None], ApResult]

#: opcode -> how to run it on the emulator.  The one place an Instr meets an emulator method.
EXECUTE: dict[Instr, _Exec] = {
    Instr.TAPQ: lambda emu, c, irq: emu.tapq(c.qid, t_bit=c.flag),
    Instr.NQAP: lambda emu, c, irq: emu.nqap(c.qid, c.psmid, c.message, special=c.special),
    Instr.DQAP: lambda emu, c, irq: emu.dqap(c.qid),
    Instr.RAPQ: lambda emu, c, irq: emu.rapq(c.qid, fbit=c.flag),
    Instr.ZAPQ: lambda emu, c, irq: emu.zapq(c.qid, fbit=c.flag),
    Instr.AQIC: lambda emu, c, irq: emu.aqic(c.qid, c.flag, notify=irq if c.flag else None),
}

_NOT_AVAILABLE = ApResult(QueueStatus(response_code=ResponseCode.Q_NOT_AVAIL))


class FrameSession:
    """The server side of one client's frame conversation with an emulator.

    ``allowed_domains``: the domains the server grants this client (None: every domain).  A HELLO may ask
    for a subset; asking for more is refused with ERROR DOMAIN_DENIED.  ``notify`` receives INTERRUPT frame
    bytes (from the emulator's clock thread); without it, WELCOME says interrupts are not supported.
    """

    def __init__(
        self,
        emulator: InstructionTarget,
        allowed_domains: Iterable[int] | None = None,
        notify: NotifyFn | None = None,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        name: str = "",
    ) -> None:
        self.emulator = emulator
        self.allowed: frozenset[int] | None = None if allowed_domains is None else frozenset(allowed_domains)
        self.max_frame = max_frame
        self.name = name
        self.stats: Counter[str] = Counter()
        self._notify = notify
        self._domains: frozenset[int] | None = frozenset()  # nothing before HELLO
        self._established = False
        self._version = 0
        self._closed = threading.Event()

    # -- state -------------------------------------------------------------------------------------
    @property
    def established(self) -> bool:
        """True once a HELLO was accepted (and the session is not closed)."""
        return self._established and not self.closed

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    @property
    def domains(self) -> frozenset[int] | None:
        """The domains this session may use (None: all); empty before HELLO."""
        return self._domains

    def may_use(self, qid: int) -> bool:
        """Domain isolation: is ``qid`` in this session's configuration?"""
        return self._domains is None or qid_domain(qid) in self._domains

    def qids(self) -> list[int]:
        """The emulator's APQNs this session may use (what WELCOME lists)."""
        return [q for q in self.emulator.qids() if self.may_use(q)]

    def close(self) -> None:
        """End the session: later interrupts for it are dropped, later frames get NOT_HELLO."""
        self._closed.set()
        self._established = False

    # -- frames in, frames out ---------------------------------------------------------------------
    def handle(self, data: bytes) -> list[bytes]:
        """Process one received frame; return the frames to send back (usually one, maybe none)."""
        self.stats["frames_in"] += 1
        try:
            frame = decode_frame(data, max_len=self.max_frame)
        except FormatError as exc:
            return [self._refuse(data, exc)]
        if isinstance(frame, CommandFrame):
            return [self._command(frame)]
        if isinstance(frame, Ping):
            return [encode_pong(frame.token)]
        if isinstance(frame, Hello):
            return [self._hello(frame)]
        if isinstance(frame, Pong):
            return []
        if isinstance(frame, Bye):
            self.stats["bye"] += 1
            self.close()
            return []
        if isinstance(frame, ErrorFrame):
            # Never answer an ERROR with an ERROR: two confused peers would loop forever.
            self.stats["errors_received"] += 1
            log.info("%s: peer reported error %r", self.name, frame)
            return []
        self.stats["errors_sent"] += 1
        return [encode_error(0, ErrorCode.UNEXPECTED, f"{type(frame).__name__} is not sent to a server")]

    def _refuse(self, data: bytes, exc: FormatError) -> bytes:
        code = error_code_for(exc)
        tag = peek_tag(data)
        self.stats["errors_sent"] += 1
        self.stats[f"refused_{code.name.lower()}"] += 1
        log.info(
            "%s: refused %s frame (%d bytes, tag %d): %s", self.name, peek_kind(data), len(data), tag, exc
        )
        return encode_error(tag, code, str(exc))

    def _hello(self, hello: Hello) -> bytes:
        lo, hi = SUPPORTED_VERSIONS
        if hello.min_version > hello.max_version or hello.max_version < lo or hello.min_version > hi:
            self.stats["errors_sent"] += 1
            text = (
                f"versions {hello.min_version}..{hello.max_version} not supported (server speaks {lo}..{hi})"
            )
            return encode_error(0, ErrorCode.BAD_VERSION, text)
        wanted = None if hello.domains is None else frozenset(hello.domains)
        if wanted is None:
            granted = self.allowed
        else:
            denied = wanted if self.allowed is None else wanted - self.allowed
            if self.allowed is not None and denied:
                self.stats["errors_sent"] += 1
                return encode_error(0, ErrorCode.DOMAIN_DENIED, f"domains {sorted(denied)} are not granted")
            granted = wanted
        self._domains = granted
        self._version = min(hello.max_version, hi)
        self._established = True
        self._closed.clear()
        self.stats["hello"] += 1
        return encode_welcome(
            self.qids(), interrupts=self._notify is not None, version=self._version, max_frame=self.max_frame
        )

    def _command(self, cmd: CommandFrame) -> bytes:
        if not self.established:
            self.stats["errors_sent"] += 1
            return encode_error(cmd.tag, ErrorCode.NOT_HELLO, "no session: send HELLO first")
        self.stats["commands"] += 1
        if not self.may_use(cmd.qid):
            self.stats["denied"] += 1
            return encode_result(cmd.tag, _NOT_AVAILABLE)
        try:
            result = EXECUTE[cmd.instr](self.emulator, cmd, self._on_interrupt if self._notify else None)
            return encode_result(cmd.tag, result)
        except Exception as exc:  # a bug in the emulator must not take the server down
            log.exception("%s: %s on qid %#06x failed", self.name, cmd.instr.name, cmd.qid)
            self.stats["errors_sent"] += 1
            return encode_error(cmd.tag, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")

    def _on_interrupt(self, qid: int) -> None:
        """Emulator callback (clock context): queue an INTERRUPT frame for this session's owner."""
        notify = self._notify
        if notify is None or self.closed:
            return
        self.stats["interrupts"] += 1
        notify(encode_interrupt(qid))

    def __repr__(self) -> str:
        state = "closed" if self.closed else "established" if self._established else "new"
        return f"<FrameSession {self.name!r} {state} domains={self._describe_domains()}>"

    def _describe_domains(self) -> Any:
        return "all" if self._domains is None else sorted(self._domains)
