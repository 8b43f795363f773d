"""Instruction frames: the bytes that carry AP instructions and their results between a host and an adapter.

The same frame bytes travel on every wire transport (ZeroMQ messages, USB bulk transfers), so one codec is
tested once and trusted everywhere.  A frame is::

    offset  size  field
    0       2     magic  b"AP"
    2       1     frame format version (FRAME_VERSION = 1)
    3       1     kind   (FrameKind)
    4       4     length of the body, big-endian u32
    8       n     body   (layout per kind, below)
    8+n     4     CRC-32 (zlib) of bytes 0 .. 8+n, big-endian

Bodies (all integers big-endian):

* HELLO     (client -> server) min_version u8, max_version u8, flags u8 (bit 0: a domain list follows,
  bit 1: a resume token follows), domains u16 count + u8 each, then the 16-byte resume token when
  bit 1 is set.  No domain list means "whatever the server assigns by default" (a shared server: one
  free domain; see ``emulator.frame_server``).  A token asks for the session it was issued to back.
* WELCOME   (server -> client) version u8, flags u8 (bit 0: interrupts supported, bit 1: this is the
  session the HELLO's token named, resumed with its queues and replies, bit 2: a resume token
  follows), max_frame u32, qids u16 count + u16 each (the APQNs assigned to this session), then the
  16-byte resume token when bit 2 is set.
* COMMAND   tag u32, opcode u8 (``Instr``), flags u8 (bit 0: AQIC enable / RAPQ-ZAPQ F bit / TAPQ T bit,
  bit 1: NQAP special), qid u16, psmid u64, message length u32 + bytes.
* RESULT    tag u32, status word u32, psmid u64, GR2 hardware-info u64, flags u8 (bit 0: GR2 valid),
  3 reserved zero bytes, reply length u32 + bytes.
* INTERRUPT qid u16.
* ERROR     tag u32 (0: not about one command), code u16 (``ErrorCode``), text u16 length + UTF-8.
* PING/PONG token u64 (PONG echoes the PING's token).
* BYE       reason: u16 length + UTF-8.
* REOFFER   (client -> server, session version 2 only) tags: u16 count (at most
  :data:`REOFFER_TAGS_MAX`) + u32 each: the NQAP/DQAP commands whose answers the client lost with
  its last link.  Sent right after a *resumed* WELCOME, before any COMMAND; the server puts the
  replies it dequeued for those answers back on their queues (``emulator.frame_server``).  No answer.

Why a CRC when TCP and USB have their own: the transport-fault injector corrupts frames on purpose, and a
peer must tell "corrupted in flight" (no field can be trusted, not even the tag) from "well-formed but
wrong" (the tag can be trusted and answered).  Reserved bits must be zero so a future flag is never
silently ignored.

The construct definitions (``FRAME`` and the ``*_BODY`` structs) are the specification.  COMMAND,
RESULT and INTERRUPT (about one per request on ``tcp://``) are on the per-request hot path, so
:func:`encode_frame`/:func:`decode_frame` use a ``struct`` fast path for them;
``tests/test_frames.py`` proves (with hypothesis, on valid, corrupted and truncated bytes) that it
agrees with :func:`decode_frame_spec`/:func:`encode_frame_spec`.  Every decode failure raises
:class:`~apformats.errors.FormatError`, and the length field is checked against the limit from a fixed-size
header parse before any body is looked at.

On a byte stream with no message boundaries (a USB bulk pipe) :class:`FrameStream` cuts the frames out,
the same on both ends of the pipe.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Final, NamedTuple

import construct as cs

from apformats.errors import FormatError
from apformats.results import ApResult, Instr
from apformats.status import HwInfo, QueueStatus

__all__ = [
    "BATCH_FRAMES_MAX",
    "DEFAULT_MAX_FRAME",
    "ERROR_FOR_KIND",
    "FRAME",
    "FRAME_VERSION",
    "HEADER_LEN",
    "MAGIC",
    "PROTOCOL_VERSION",
    "READAHEAD_MAX",
    "READAHEAD_VERSION",
    "REOFFER_TAGS_MAX",
    "TOKEN_LEN",
    "TRAILER_LEN",
    "Bye",
    "Command",
    "CommandFrame",
    "ErrorCode",
    "ErrorFrame",
    "Frame",
    "FrameKind",
    "FrameSize",
    "FrameStream",
    "Hello",
    "InterruptFrame",
    "Ping",
    "Pong",
    "Reoffer",
    "ResultFrame",
    "Welcome",
    "decode_frame",
    "decode_frame_spec",
    "encode_bye",
    "encode_command",
    "encode_error",
    "encode_frame",
    "encode_frame_spec",
    "encode_hello",
    "encode_interrupt",
    "encode_ping",
    "encode_pong",
    "encode_reoffer",
    "encode_result",
    "encode_welcome",
    "error_code_for",
    "frame_length",
    "peek_kind",
    "peek_tag",
]

MAGIC: Final = b"AP"
#: Version of the frame layout itself (header byte 2).  A frame with another value cannot be parsed.
FRAME_VERSION: Final = 1
#: Version of the session protocol negotiated by HELLO/WELCOME (what the frames mean).
PROTOCOL_VERSION: Final = 1
#: The session version from which a server *reads ahead*: an NQAP or DQAP whose status says replies
#: wait is answered with its RESULT followed by more RESULT frames carrying the same tag, one per
#: reply the server then dequeued (DQAP after DQAP, at most :data:`READAHEAD_MAX`, stopping at the
#: first that takes none).  The client keeps them and answers its next DQAPs of that queue from them,
#: so a queue's replies come back in one round trip instead of one round trip each.  A client asks
#: for it by offering ``max_version >= READAHEAD_VERSION`` in HELLO; version 1 sessions never see it.
READAHEAD_VERSION: Final = 2
#: Most replies one NQAP or DQAP reads ahead (bounds what a client must keep per answer).
READAHEAD_MAX: Final = 32
#: Most frames one message may carry in a version 2 session (one frame per part, either way): a
#: batch costs the sender one send and the receiver one receive, instead of one per frame.
BATCH_FRAMES_MAX: Final = 256
#: Most tags one REOFFER frame may name (a client that lost more names its latest ones).
REOFFER_TAGS_MAX: Final = 1024
HEADER_LEN: Final = 8
TRAILER_LEN: Final = 4
#: Length of a session's resume token (128 bits, from ``secrets``).
TOKEN_LEN: Final = 16
#: Largest whole frame (header + body + CRC) accepted unless a peer says otherwise.  A CEX card's
#: largest message (ml = 15 chunks of 4096 bytes) plus the RESULT overhead fits with room to spare.
DEFAULT_MAX_FRAME: Final = 65536


class FrameKind(IntEnum):
    """Header byte 3."""

    HELLO = 0x01
    WELCOME = 0x02
    COMMAND = 0x10
    RESULT = 0x11
    INTERRUPT = 0x20
    ERROR = 0x30
    PING = 0x40
    PONG = 0x41
    BYE = 0x50
    REOFFER = 0x60


class ErrorCode(IntEnum):
    """Why a peer refused a frame (ERROR body).  Receivers keep unknown codes as plain ints."""

    MALFORMED = 1  # well-formed header, body does not parse (bad length, reserved bits, bad UTF-8, ...)
    TOO_BIG = 2  # length field over the limit; nothing of the body was looked at
    UNKNOWN_OPCODE = 3  # COMMAND opcode is no Instr this peer knows
    BAD_VERSION = 4  # frame version or HELLO version range not supported
    DOMAIN_DENIED = 5  # HELLO asked for a domain this server does not grant
    NOT_HELLO = 6  # a COMMAND before a successful HELLO (or after the session was dropped)
    UNKNOWN_KIND = 7  # header kind byte is no FrameKind
    UNEXPECTED = 8  # a kind this peer never accepts in this direction (a client sending RESULT)
    INTERNAL = 9  # the receiver failed executing a well-formed frame (a bug; outcome unknown)
    SHUTTING_DOWN = 10  # the server is stopping and accepts no more commands
    CORRUPT = 11  # CRC mismatch or bad magic: no field of the frame can be trusted
    APQN_IN_USE = 12  # HELLO asked for an APQN another session holds (or none is free)


#: ``FormatError.kind`` -> the ERROR code a receiver answers with (data, not code; default MALFORMED).
ERROR_FOR_KIND: Final[dict[str, ErrorCode]] = {
    "too_big": ErrorCode.TOO_BIG,
    "version": ErrorCode.BAD_VERSION,
    "opcode": ErrorCode.UNKNOWN_OPCODE,
    "kind": ErrorCode.UNKNOWN_KIND,
    "crc": ErrorCode.CORRUPT,
    "magic": ErrorCode.CORRUPT,
}


def error_code_for(err: FormatError) -> ErrorCode:
    """The ERROR code that answers a frame which failed to decode with ``err``."""
    return ERROR_FOR_KIND.get(err.kind, ErrorCode.MALFORMED)


# --- decoded frames: frozen values -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """Client's opening frame: the protocol versions it speaks, the domains it wants (None: the
    server's default assignment) and, on a reconnect, the resume token of the session it had."""

    min_version: int = PROTOCOL_VERSION
    max_version: int = PROTOCOL_VERSION
    domains: tuple[int, ...] | None = None
    token: bytes | None = None


@dataclass(frozen=True, slots=True)
class Welcome:
    """Server's answer to HELLO: the agreed version and what this session may use.

    ``token`` is the session's resume token (present it in the HELLO of a reconnect); ``resumed``
    says the HELLO's token was honoured: the same APQNs, and the replies they hold, are back.
    """

    version: int
    qids: tuple[int, ...]
    interrupts: bool
    max_frame: int = DEFAULT_MAX_FRAME
    resumed: bool = False
    token: bytes | None = None


class Command(NamedTuple):
    """One AP instruction: what a COMMAND frame carries, what the driver core emits and what the
    emulator's ``execute`` runs -- one type on every side, so nothing converts between them.

    ``tag`` names it until its answer comes.  ``flag``: AQIC's enable bit, RAPQ/ZAPQ's F bit,
    TAPQ's T bit.  ``special``: NQAP's special bit.  A NamedTuple, not a frozen dataclass: one is
    built per AP instruction, and a tuple is built in C (about a third of a dataclass's cost).
    """

    tag: int
    instr: Instr
    qid: int
    psmid: int = 0
    message: bytes = b""
    flag: bool = False
    special: bool = False


#: The frame codec's name for :class:`Command` (the same type).
CommandFrame = Command


@dataclass(frozen=True, slots=True)
class ResultFrame:
    """The answer to the COMMAND with the same tag.  Raw words, so a frame round-trips bit for bit."""

    tag: int
    status_word: int
    psmid: int = 0
    reply: bytes = b""
    hwinfo_word: int | None = None

    def to_result(self) -> ApResult:
        hw = None if self.hwinfo_word is None else HwInfo.from_word(self.hwinfo_word)
        return ApResult(QueueStatus.from_word(self.status_word), self.psmid, self.reply, hw)

    @classmethod
    def from_result(cls, tag: int, result: ApResult) -> ResultFrame:
        hw = None if result.hwinfo is None else result.hwinfo.word
        return cls(tag, result.status.word, result.psmid, result.reply, hw)


@dataclass(frozen=True, slots=True)
class InterruptFrame:
    """An AP interrupt for ``qid`` (only after AQIC enabled it for this session)."""

    qid: int


@dataclass(frozen=True, slots=True)
class ErrorFrame:
    """A refused frame.  ``tag`` names the COMMAND it answers, 0 when none can be trusted."""

    tag: int
    code: ErrorCode | int
    text: str = ""


@dataclass(frozen=True, slots=True)
class Ping:
    token: int = 0


@dataclass(frozen=True, slots=True)
class Pong:
    token: int = 0


@dataclass(frozen=True, slots=True)
class Bye:
    """The sender ends the session (a client leaving, a server shutting down or dropping the client)."""

    reason: str = ""


@dataclass(frozen=True, slots=True)
class Reoffer:
    """A resumed client's list of the NQAP/DQAP tags whose answers it lost with its last link: an
    answer and the replies read ahead behind it travel in one message, so a lost answer means its
    replies were lost too, and the server may put them back on the card (session version 2)."""

    tags: tuple[int, ...] = ()


Frame = (
    Hello | Welcome | CommandFrame | ResultFrame | InterruptFrame | ErrorFrame | Ping | Pong | Bye | Reoffer
)

# --- construct definitions: the specification -------------------------------------------------------

_U8, _U16, _U32, _U64 = cs.Int8ub, cs.Int16ub, cs.Int32ub, cs.Int64ub


def _flags(*names: str) -> cs.Construct:
    """One flag byte: the named flags in the low bits (first name = bit 0), the rest reserved zero."""
    fields = [n / cs.Flag for n in reversed(names)]
    return cs.BitStruct("reserved" / cs.Const(0, cs.BitsInteger(8 - len(names))), *fields)


HEADER = cs.Struct(
    "magic" / cs.Const(MAGIC),
    "version" / _U8,
    "kind" / _U8,
    "length" / _U32,
)

HELLO_BODY = cs.Struct(
    "min_version" / _U8,
    "max_version" / _U8,
    "flags" / _flags("has_domains", "has_token"),
    "domains" / cs.PrefixedArray(_U16, _U8),
    "token" / cs.If(cs.this.flags.has_token, cs.Bytes(TOKEN_LEN)),
    cs.Check(lambda c: c.flags.has_domains or len(c.domains) == 0),
    cs.Check(lambda c: len(c.domains) <= 256),
    cs.Terminated,
)

WELCOME_BODY = cs.Struct(
    "version" / _U8,
    "flags" / _flags("interrupts", "resumed", "has_token"),
    "max_frame" / _U32,
    "qids" / cs.PrefixedArray(_U16, _U16),
    "token" / cs.If(cs.this.flags.has_token, cs.Bytes(TOKEN_LEN)),
    cs.Terminated,
)

COMMAND_BODY = cs.Struct(
    "tag" / _U32,
    "opcode" / _U8,
    "flags" / _flags("flag", "special"),
    "qid" / _U16,
    "psmid" / _U64,
    "message" / cs.Prefixed(_U32, cs.GreedyBytes),
    cs.Terminated,
)

RESULT_BODY = cs.Struct(
    "tag" / _U32,
    "status" / _U32,
    "psmid" / _U64,
    "hwinfo" / _U64,
    "flags" / _flags("has_hwinfo"),
    "reserved" / cs.Const(b"\x00\x00\x00"),
    "reply" / cs.Prefixed(_U32, cs.GreedyBytes),
    cs.Check(lambda c: c.flags.has_hwinfo or c.hwinfo == 0),
    cs.Terminated,
)

INTERRUPT_BODY = cs.Struct("qid" / _U16, cs.Terminated)

ERROR_BODY = cs.Struct(
    "tag" / _U32,
    "code" / _U16,
    "text" / cs.PascalString(_U16, "utf8"),
    cs.Terminated,
)

TOKEN_BODY = cs.Struct("token" / _U64, cs.Terminated)

BYE_BODY = cs.Struct("reason" / cs.PascalString(_U16, "utf8"), cs.Terminated)

REOFFER_BODY = cs.Struct(
    "tags" / cs.PrefixedArray(_U16, _U32),
    cs.Check(lambda c: len(c.tags) <= REOFFER_TAGS_MAX),
    cs.Terminated,
)

BODIES: Final[dict[int, cs.Construct]] = {
    FrameKind.HELLO: HELLO_BODY,
    FrameKind.WELCOME: WELCOME_BODY,
    FrameKind.COMMAND: COMMAND_BODY,
    FrameKind.RESULT: RESULT_BODY,
    FrameKind.INTERRUPT: INTERRUPT_BODY,
    FrameKind.ERROR: ERROR_BODY,
    FrameKind.PING: TOKEN_BODY,
    FrameKind.PONG: TOKEN_BODY,
    FrameKind.BYE: BYE_BODY,
    FrameKind.REOFFER: REOFFER_BODY,
}

#: The whole frame.  ``decode_frame_spec`` checks the header (magic, version, kind, limit) first.
FRAME = cs.Struct(
    "raw"
    / cs.RawCopy(
        cs.Struct(
            "magic" / cs.Const(MAGIC),
            "version" / cs.Const(FRAME_VERSION, _U8),
            "kind" / _U8,
            "body" / cs.Prefixed(_U32, cs.Switch(cs.this.kind, BODIES)),
        )
    ),
    "crc" / cs.Checksum(_U32, zlib.crc32, cs.this.raw.data),
    cs.Terminated,
)

_CONSTRUCT_KINDS: Final[dict[type[Exception], str]] = {
    cs.StreamError: "truncated",
    cs.TerminatedError: "trailing",
    cs.ChecksumError: "crc",
    cs.ConstError: "reserved",
    cs.CheckError: "field",
}


def _construct_error(exc: Exception) -> FormatError:
    for typ, kind in _CONSTRUCT_KINDS.items():
        if isinstance(exc, typ):
            return FormatError(f"bad frame: {exc}", kind=kind)
    if isinstance(exc, UnicodeDecodeError):
        return FormatError(f"bad frame text: {exc}", kind="text")
    return FormatError(f"bad frame: {exc}", kind="malformed")


# --- header: shared by both paths, checked before the body ------------------------------------------

_HDR = struct.Struct(">2sBBI")
_CRC = struct.Struct(">I")
_KINDS: Final = frozenset(int(k) for k in FrameKind)
_INSTRS: Final[dict[int, Instr]] = {int(i): i for i in Instr}


def _check_header(magic: bytes, version: int, kind: int, length: int, max_len: int) -> None:
    """The checks every frame passes before its body is read (and before it is allocated, on a stream)."""
    if magic != MAGIC:
        raise FormatError(f"bad magic {magic!r}", kind="magic", offset=0)
    if version != FRAME_VERSION:
        raise FormatError(
            f"frame version {version} not supported (want {FRAME_VERSION})", kind="version", offset=2
        )
    if HEADER_LEN + length + TRAILER_LEN > max_len:
        raise FormatError(
            f"frame body of {length} bytes exceeds the {max_len}-byte limit", kind="too_big", offset=4
        )
    if kind not in _KINDS:
        raise FormatError(f"unknown frame kind {kind:#04x}", kind="kind", offset=3)


def frame_length(header: bytes | bytearray | memoryview, *, max_len: int = DEFAULT_MAX_FRAME) -> int:
    """Total length of the frame whose first ``HEADER_LEN`` bytes are ``header`` (for stream readers).

    Raises :class:`FormatError` (kind ``too_big``, ``magic``, ``version``, ``kind``) before the caller
    reads or allocates the rest.
    """
    if len(header) < HEADER_LEN:
        raise FormatError(f"frame header needs {HEADER_LEN} bytes, got {len(header)}", kind="truncated")
    magic, version, kind, length = _HDR.unpack_from(header)
    _check_header(magic, version, kind, length, max_len)
    return HEADER_LEN + length + TRAILER_LEN


def _split(data: bytes | bytearray | memoryview, max_len: int) -> tuple[int, int]:
    """Validate header, total length and CRC; return ``(kind, body_length)``."""
    if len(data) < HEADER_LEN:
        raise FormatError(f"frame of {len(data)} bytes is shorter than its header", kind="truncated")
    magic, version, kind, length = _HDR.unpack_from(data)
    _check_header(magic, version, kind, length, max_len)
    total = HEADER_LEN + length + TRAILER_LEN
    if len(data) < total:
        raise FormatError(
            f"frame truncated: {len(data)} of {total} bytes", kind="truncated", offset=len(data)
        )
    if len(data) > total:
        raise FormatError(f"{len(data) - total} bytes after the frame", kind="trailing", offset=total)
    (crc,) = _CRC.unpack_from(data, total - TRAILER_LEN)
    if crc != zlib.crc32(memoryview(data)[: total - TRAILER_LEN]):
        raise FormatError("frame CRC mismatch", kind="crc", offset=total - TRAILER_LEN)
    return kind, length


def peek_kind(data: bytes | bytearray | memoryview) -> FrameKind | None:
    """The kind byte of a frame whose header looks right, else None (for logging refused frames)."""
    if len(data) < HEADER_LEN or bytes(data[:2]) != MAGIC or data[3] not in _KINDS:
        return None
    return FrameKind(data[3])


def peek_tag(data: bytes | bytearray | memoryview) -> int:
    """The tag of a COMMAND frame that failed to decode, when it can be trusted; else 0.

    Trusted means: magic, version and kind are right, the frame is complete and its CRC matches, so
    the tag bytes are what the sender wrote.  The receiver then answers ERROR for that tag and the
    sender completes the one command instead of waiting for a timeout.
    """
    if len(data) < HEADER_LEN + 4 + TRAILER_LEN:
        return 0
    magic, version, kind, length = _HDR.unpack_from(data)
    if magic != MAGIC or version != FRAME_VERSION or kind != FrameKind.COMMAND or length < 4:
        return 0
    total = HEADER_LEN + length + TRAILER_LEN
    if len(data) != total:
        return 0
    (crc,) = _CRC.unpack_from(data, total - TRAILER_LEN)
    if crc != zlib.crc32(memoryview(data)[: total - TRAILER_LEN]):
        return 0
    return int.from_bytes(data[HEADER_LEN : HEADER_LEN + 4], "big")


def _instr(opcode: int) -> Instr:
    try:
        return _INSTRS[opcode]
    except KeyError:
        raise FormatError(f"unknown opcode {opcode:#04x}", kind="opcode", offset=HEADER_LEN + 4) from None


def _error_code(code: int) -> ErrorCode | int:
    try:
        return ErrorCode(code)
    except ValueError:
        return code


# --- byte streams: whole frames out of bytes split anyhow --------------------------------------------

#: Reads a frame header (the first ``HEADER_LEN`` bytes of a frame): the frame's total length, or None
#: to wait for more bytes; raises ValueError (FormatError) for a header it refuses.
FrameSize = Callable[[bytes], "int | None"]


class FrameStream:
    """Cuts whole frames out of a byte stream split anyhow (sans-I/O, not thread-safe).

    A bulk pipe has no message boundaries: one frame may take several transfers, and one transfer may
    carry the tail of a frame, several whole frames and the head of the next.  Each header is checked
    (:func:`frame_length`, against ``max_len``) as soon as its ``HEADER_LEN`` bytes are in, so a bad
    or oversized length is refused before any of its body is waited for.  After a refused header the
    stream is out of step for good: only :meth:`reset` (once the peers start over) brings it back.

    The frames completed before a bad header are returned first and the error is kept for the next
    call (or :meth:`check`), because a host must not lose the answers it read before the garbage.  A
    receiver that refuses a transfer whole (a USB device stalls it: the host then resends it) calls
    :meth:`check` right after :meth:`feed` and drops what feed returned.

    ``frame_size`` replaces the codec's header reader (for tests of the plumbing alone); it is given
    exactly the header bytes.
    """

    __slots__ = ("_buf", "_error", "_frame_size", "_need", "max_len")

    def __init__(self, max_len: int = DEFAULT_MAX_FRAME, *, frame_size: FrameSize | None = None) -> None:
        self.max_len = max_len
        self._frame_size = frame_size
        self._buf = bytearray()
        self._need = 0  # length of the frame at the head once its header is in, else 0
        self._error: ValueError | None = None  # a bad header found behind good frames

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Append ``data``; return the frames now complete, in stream order.

        Raises :class:`FormatError` for a bad header with no good frame before it in this call; the
        error is raised again by every call until :meth:`reset`.
        """
        if self._error is not None:
            raise self._error
        buf = self._buf
        buf += data
        out: list[bytes] = []
        while True:
            if not self._need:
                if len(buf) < HEADER_LEN:
                    return out
                try:
                    need = self._header(buf)
                except ValueError as exc:
                    self._error = exc
                    if not out:
                        raise
                    return out
                if need is None:
                    return out
                self._need = need
            if len(buf) < self._need:
                return out
            out.append(bytes(buf[: self._need]))
            del buf[: self._need]
            self._need = 0

    def _header(self, buf: bytearray) -> int | None:
        if self._frame_size is None:
            return frame_length(buf, max_len=self.max_len)  # reads the first HEADER_LEN bytes only
        need = self._frame_size(bytes(buf[:HEADER_LEN]))
        if need is not None and need < HEADER_LEN:  # would never consume a byte: loop for ever
            raise FormatError(f"frame length {need} is shorter than a header", kind="truncated")
        return need

    def check(self) -> None:
        """Raise the bad-header error a :meth:`feed` found behind good frames, if any."""
        if self._error is not None:
            raise self._error

    @property
    def pending(self) -> int:
        """Bytes held that are not yet part of a complete frame."""
        return len(self._buf)

    def reset(self) -> None:
        """Drop everything buffered and any error (the peers start the stream over)."""
        self._buf.clear()
        self._need = 0
        self._error = None


# --- spec path: construct ---------------------------------------------------------------------------


def decode_frame_spec(data: bytes | bytearray | memoryview, *, max_len: int = DEFAULT_MAX_FRAME) -> Frame:
    """Decode one frame with the construct definition (the specified, slow path)."""
    data = bytes(data)
    if len(data) < HEADER_LEN:
        raise FormatError(f"frame of {len(data)} bytes is shorter than its header", kind="truncated")
    try:
        h = HEADER.parse(data[:HEADER_LEN])
    except cs.ConstError:
        raise FormatError(f"bad magic {data[:2]!r}", kind="magic", offset=0) from None
    _check_header(MAGIC, h.version, h.kind, h.length, max_len)
    try:
        c = FRAME.parse(data)
    except (cs.ConstructError, UnicodeDecodeError) as exc:
        raise _construct_error(exc) from None
    return _from_container(h.kind, c.raw.value.body)


def _from_container(kind: int, b: cs.Container) -> Frame:
    if kind == FrameKind.COMMAND:
        return CommandFrame(
            b.tag, _instr(b.opcode), b.qid, b.psmid, bytes(b.message), b.flags.flag, b.flags.special
        )
    if kind == FrameKind.RESULT:
        return ResultFrame(b.tag, b.status, b.psmid, bytes(b.reply), b.hwinfo if b.flags.has_hwinfo else None)
    if kind == FrameKind.HELLO:
        domains = tuple(b.domains) if b.flags.has_domains else None
        token = bytes(b.token) if b.flags.has_token else None
        return Hello(b.min_version, b.max_version, domains, token)
    if kind == FrameKind.WELCOME:
        token = bytes(b.token) if b.flags.has_token else None
        return Welcome(b.version, tuple(b.qids), b.flags.interrupts, b.max_frame, b.flags.resumed, token)
    if kind == FrameKind.INTERRUPT:
        return InterruptFrame(b.qid)
    if kind == FrameKind.ERROR:
        return ErrorFrame(b.tag, _error_code(b.code), b.text)
    if kind == FrameKind.PING:
        return Ping(b.token)
    if kind == FrameKind.PONG:
        return Pong(b.token)
    if kind == FrameKind.REOFFER:
        return Reoffer(tuple(b.tags))
    return Bye(b.reason)


def encode_frame_spec(frame: Frame) -> bytes:
    """Encode one frame with the construct definition."""
    kind, body = _to_container(frame)
    try:
        return FRAME.build({"raw": {"value": {"kind": kind, "body": body}}})
    except (cs.ConstructError, UnicodeEncodeError) as exc:
        raise ValueError(f"cannot encode {frame!r}: {exc}") from exc


def _to_container(f: Frame) -> tuple[int, dict]:
    if isinstance(f, Command):
        return FrameKind.COMMAND, {
            "tag": f.tag,
            "opcode": int(f.instr),
            "flags": {"reserved": 0, "flag": f.flag, "special": f.special},
            "qid": f.qid,
            "psmid": f.psmid,
            "message": f.message,
        }
    if isinstance(f, ResultFrame):
        return FrameKind.RESULT, {
            "tag": f.tag,
            "status": f.status_word,
            "psmid": f.psmid,
            "hwinfo": 0 if f.hwinfo_word is None else f.hwinfo_word,
            "flags": {"reserved": 0, "has_hwinfo": f.hwinfo_word is not None},
            "reply": f.reply,
        }
    if isinstance(f, Hello):
        return FrameKind.HELLO, {
            "min_version": f.min_version,
            "max_version": f.max_version,
            "flags": {"reserved": 0, "has_domains": f.domains is not None, "has_token": f.token is not None},
            "domains": list(f.domains or ()),
            "token": f.token,
        }
    if isinstance(f, Welcome):
        return FrameKind.WELCOME, {
            "version": f.version,
            "flags": {
                "reserved": 0,
                "interrupts": f.interrupts,
                "resumed": f.resumed,
                "has_token": f.token is not None,
            },
            "max_frame": f.max_frame,
            "qids": list(f.qids),
            "token": f.token,
        }
    if isinstance(f, InterruptFrame):
        return FrameKind.INTERRUPT, {"qid": f.qid}
    if isinstance(f, ErrorFrame):
        return FrameKind.ERROR, {"tag": f.tag, "code": int(f.code), "text": f.text}
    if isinstance(f, Ping):
        return FrameKind.PING, {"token": f.token}
    if isinstance(f, Pong):
        return FrameKind.PONG, {"token": f.token}
    if isinstance(f, Bye):
        return FrameKind.BYE, {"reason": f.reason}
    if isinstance(f, Reoffer):
        return FrameKind.REOFFER, {"tags": list(f.tags)}
    raise TypeError(f"not a frame: {f!r}")


# --- fast path: struct, for COMMAND, RESULT and INTERRUPT ----------------------------------------

_CMD = struct.Struct(">IBBHQI")  # tag opcode flags qid psmid msglen
_RES = struct.Struct(">IIQQBBHI")  # tag status psmid hwinfo flags reserved(1+2) replylen
_CMD_HDR = _HDR.pack(MAGIC, FRAME_VERSION, FrameKind.COMMAND, 0)[:4]
_RES_HDR = _HDR.pack(MAGIC, FRAME_VERSION, FrameKind.RESULT, 0)[:4]
_INT = struct.Struct(">H")  # qid
_INT_HDR = _HDR.pack(MAGIC, FRAME_VERSION, FrameKind.INTERRUPT, _INT.size)
_LEN = struct.Struct(">I")


def _seal(head: bytes, fixed: bytes, tail: bytes) -> bytes:
    """Header, body (``fixed`` then ``tail``) and CRC: every frame a request crosses, both ways."""
    frame = b"".join((head, _LEN.pack(len(fixed) + len(tail)), fixed, tail))
    return frame + _CRC.pack(zlib.crc32(frame))


def encode_command(
    tag: int,
    instr: Instr,
    qid: int,
    psmid: int = 0,
    message: bytes = b"",
    *,
    flag: bool = False,
    special: bool = False,
) -> bytes:
    """COMMAND frame bytes (fast path).  Raises ValueError for out-of-range fields."""
    try:
        fixed = _CMD.pack(
            tag, int(instr), (1 if flag else 0) | (2 if special else 0), qid, psmid, len(message)
        )
    except struct.error as exc:
        raise ValueError(f"cannot encode COMMAND tag={tag} qid={qid} psmid={psmid}: {exc}") from exc
    return _seal(_CMD_HDR, fixed, message if type(message) is bytes else bytes(message))


def encode_result(tag: int, result: ApResult) -> bytes:
    """RESULT frame bytes for ``result`` (fast path)."""
    hw = result.hwinfo
    return _encode_result(
        tag, result.status.word, result.psmid, result.reply, None if hw is None else hw.word
    )


def _encode_result(tag: int, status: int, psmid: int, reply: bytes, hwinfo: int | None) -> bytes:
    try:
        fixed = _RES.pack(tag, status, psmid, hwinfo or 0, 0 if hwinfo is None else 1, 0, 0, len(reply))
    except struct.error as exc:
        raise ValueError(f"cannot encode RESULT tag={tag} psmid={psmid}: {exc}") from exc
    return _seal(_RES_HDR, fixed, reply if type(reply) is bytes else bytes(reply))


def _encode_interrupt(qid: int) -> bytes:
    """INTERRUPT frame bytes (fast path): the server sends about one per request on ``tcp://``, and
    construct costs ~25 µs to build and ~44 µs to parse one, against ~1 µs here."""
    try:
        frame = _INT_HDR + _INT.pack(qid)
    except struct.error as exc:
        raise ValueError(f"cannot encode INTERRUPT qid={qid}: {exc}") from exc
    return frame + _CRC.pack(zlib.crc32(frame))


def _decode_interrupt(data: bytes | bytearray | memoryview, length: int) -> InterruptFrame:
    # The same two refusals as INTERRUPT_BODY (u16 then Terminated), with the same error kinds.
    if length < _INT.size:
        raise FormatError("INTERRUPT body too short", kind="truncated", offset=HEADER_LEN)
    if length > _INT.size:
        raise FormatError(
            f"{length - _INT.size} bytes after the INTERRUPT qid", kind="trailing", offset=HEADER_LEN + 2
        )
    return InterruptFrame(_INT.unpack_from(data, HEADER_LEN)[0])


def _decode_command(data: bytes | bytearray | memoryview, length: int) -> CommandFrame:
    if length < _CMD.size:
        raise FormatError("COMMAND body too short", kind="truncated", offset=HEADER_LEN)
    tag, opcode, flags, qid, psmid, mlen = _CMD.unpack_from(data, HEADER_LEN)
    if flags & 0xFC:
        raise FormatError(
            f"COMMAND reserved flag bits set ({flags:#04x})", kind="reserved", offset=HEADER_LEN + 5
        )
    if mlen != length - _CMD.size:
        raise FormatError(f"COMMAND message length {mlen} does not fill the body", kind="length")
    start = HEADER_LEN + _CMD.size
    return CommandFrame(
        tag, _instr(opcode), qid, psmid, bytes(data[start : start + mlen]), bool(flags & 1), bool(flags & 2)
    )


def _decode_result(data: bytes | bytearray | memoryview, length: int) -> ResultFrame:
    if length < _RES.size:
        raise FormatError("RESULT body too short", kind="truncated", offset=HEADER_LEN)
    tag, status, psmid, hwinfo, flags, r1, r2, rlen = _RES.unpack_from(data, HEADER_LEN)
    if flags & 0xFE or r1 or r2:
        raise FormatError("RESULT reserved bits set", kind="reserved", offset=HEADER_LEN + 24)
    if not flags and hwinfo:
        raise FormatError("RESULT carries a GR2 word without its valid flag", kind="field")
    if rlen != length - _RES.size:
        raise FormatError(f"RESULT reply length {rlen} does not fill the body", kind="length")
    start = HEADER_LEN + _RES.size
    return ResultFrame(tag, status, psmid, bytes(data[start : start + rlen]), hwinfo if flags else None)


def decode_frame(data: bytes | bytearray | memoryview, *, max_len: int = DEFAULT_MAX_FRAME) -> Frame:
    """Decode one complete frame; raises :class:`FormatError` for anything but exactly one valid frame."""
    kind, length = _split(data, max_len)
    if kind == FrameKind.COMMAND:
        return _decode_command(data, length)
    if kind == FrameKind.RESULT:
        return _decode_result(data, length)
    if kind == FrameKind.INTERRUPT:
        return _decode_interrupt(data, length)
    return decode_frame_spec(data, max_len=max_len)


def encode_frame(frame: Frame) -> bytes:
    """Encode any frame: the struct fast path for COMMAND/RESULT/INTERRUPT, construct for the rest."""
    if isinstance(frame, Command):
        return encode_command(
            frame.tag,
            frame.instr,
            frame.qid,
            frame.psmid,
            frame.message,
            flag=frame.flag,
            special=frame.special,
        )
    if isinstance(frame, ResultFrame):
        return _encode_result(frame.tag, frame.status_word, frame.psmid, frame.reply, frame.hwinfo_word)
    if isinstance(frame, InterruptFrame):
        return _encode_interrupt(frame.qid)
    return encode_frame_spec(frame)


# --- small constructors for the rarer kinds ---------------------------------------------------------


def encode_hello(
    domains: tuple[int, ...] | list[int] | None = None,
    *,
    min_version: int = PROTOCOL_VERSION,
    max_version: int = PROTOCOL_VERSION,
    token: bytes | None = None,
) -> bytes:
    return encode_frame_spec(
        Hello(min_version, max_version, None if domains is None else tuple(domains), token)
    )


def encode_welcome(
    qids: tuple[int, ...] | list[int],
    *,
    interrupts: bool,
    version: int = PROTOCOL_VERSION,
    max_frame: int = DEFAULT_MAX_FRAME,
    resumed: bool = False,
    token: bytes | None = None,
) -> bytes:
    return encode_frame_spec(Welcome(version, tuple(qids), interrupts, max_frame, resumed, token))


def encode_interrupt(qid: int) -> bytes:
    """INTERRUPT frame bytes (struct fast path, proven equal to ``encode_frame_spec`` by the tests)."""
    return _encode_interrupt(qid)


def encode_error(tag: int, code: ErrorCode | int, text: str = "") -> bytes:
    """ERROR frame bytes; ``text`` is cut to fit its u16 length field."""
    raw = text.encode("utf8")[:4096].decode("utf8", "ignore")
    return encode_frame_spec(ErrorFrame(tag, code, raw))


def encode_ping(token: int = 0) -> bytes:
    return encode_frame_spec(Ping(token))


def encode_pong(token: int = 0) -> bytes:
    return encode_frame_spec(Pong(token))


def encode_bye(reason: str = "") -> bytes:
    return encode_frame_spec(Bye(reason))


def encode_reoffer(tags: tuple[int, ...] | list[int]) -> bytes:
    """REOFFER frame bytes (construct only: one per resumed link, never on the hot path).  Raises
    ValueError for more than :data:`REOFFER_TAGS_MAX` tags or a tag outside u32."""
    return encode_frame_spec(Reoffer(tuple(tags)))
