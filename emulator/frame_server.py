"""One client's session with the emulator, in frames: bytes of one frame in, frame bytes out; and the
assignment of APQNs to sessions when many clients share one emulator.

Transport-independent on purpose: the ZeroMQ server (``emulator.server``) and the USB backend both feed
frames from their own wire into a :class:`FrameSession` and send back what it returns, so the handshake,
APQN isolation and error answers behave identically on every transport.

What a session guarantees:

* Nothing reaches the emulator before a successful HELLO, and a bad frame never reaches it at all: a
  frame that does not decode is answered with an ERROR frame (naming the command's tag when the frame is
  intact enough to trust it) and the session keeps going.  So no request or reply the emulator holds is
  lost because a client sent garbage.
* APQN isolation: a session sees only the APQNs assigned to it (WELCOME lists them), and a command for
  any other APQN gets a RESULT with response code ``Q_NOT_AVAIL`` (0x01, "APQN not available to this
  configuration", as the hardware answers) without the emulator ever being called for that queue.  A
  second HELLO on an established session cannot widen it.
* AQIC enable registers this session's interrupt callback: when the emulator signals a reply for the
  queue, the session hands an INTERRUPT frame to its ``notify`` callable.  That runs in the emulator's
  clock context (the WallClock pump thread), so ``notify`` must only queue the bytes; the owner of the
  wire sends them.

Shared service (:class:`Tenancy`, one per server): an APQN (card x domain) is driven by at most one
session at a time, as vfio-ap assigns an APQN to one guest.  Because every reply on an APQN then
belongs to the one session that holds it, no client can DQAP another's replies, enqueue onto its
queues, or read or wipe its key slots (KR, ZAPQ): the server matches every instruction by (session,
APQN), and psmids stay the client's own business.

* **Assignment.**  A HELLO with a domain list asks for every APQN of those domains the client may have
  (on every card, as a vfio-ap matrix assigns a domain across its adapters); one held by another session
  is refused with ERROR ``APQN_IN_USE``, a domain the client may not have with ``DOMAIN_DENIED``.  A HELLO
  without a list gets the default: **one free domain on every card** (the lowest domain free on all of
  them, so the client still sees every kind of card and every card's engines; if no domain is free
  everywhere, the lowest free domain of each card).  That is what a test process sharing a server wants:
  a queue of each card to itself, and room for as many such clients as the profile has domains.  The
  price is paid by a client alone on a server: it keeps one queue's slots per card in flight, not every
  domain's, which costs throughput where the link's round trip is long against the service time (on
  the ``fast`` profile over ``tcp://``, a lone default client measured a third to a half of what it does with
  every domain).  A server for one user at a time says ``default_grant="all"`` (``serve --default-grant
  all``): every free APQN the client may have; or the client names its ``domains``.
* **Who may have what.**  The server's ``--domains`` bounds every client; under CURVE an APQN matrix
  (``serve --apqn-matrix FILE``, :func:`load_apqn_matrix`) maps client keys to the APQNs they may ever be
  assigned.
* **Sessions survive a reconnect.**  WELCOME issues a 128-bit resume token.  The client proposes it
  in its first HELLO (``apcrypto`` draws it from ``secrets`` when the transport is made) and the
  server adopts it unless another key holds it (then it draws a fresh one): so a first handshake that
  the client retried on a new connection, because the WELCOME was slow, finds the session the first
  attempt was granted instead of taking a second one and leaving the first reserved.  Like a secret
  key, a token only protects the client that chose it well (a server given none draws one).  When a
  connection drops without a BYE, its APQNs and the replies the cards hold for it stay reserved for
  ``grace`` seconds; a HELLO presenting the token (under CURVE: from the same client key) gets the same
  APQNs back (WELCOME ``resumed``) and drains what is waiting.  A version 2 session's lease also keeps
  the replies each NQAP/DQAP answer took off the card (:class:`TakenReplies`, bounded): the resumed
  client's REOFFER names the answers it lost, and :meth:`FrameSession._reoffer` puts their replies
  back at the front of their queues, so none is lost with an answer in flight.  A resume on a new
  connection while the old one still looks alive takes the session over (the old connection is told
  BYE).  After the grace,
  or at once when the client says BYE, the APQNs are zeroized (ZAPQ semantics: held requests and
  replies discarded, key slots cleared) and freed.

A session built without a ``tenancy`` (the USB adapter: one host per device) gets a private one that
grants every allowed domain by default and neither reserves nor zeroizes anything.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import threading
import time
import tomllib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from apformats.codes import ResponseCode
from apformats.errors import FormatError
from apformats.frames import (
    DEFAULT_MAX_FRAME,
    PROTOCOL_VERSION,
    READAHEAD_MAX,
    READAHEAD_VERSION,
    Bye,
    Command,
    ErrorCode,
    ErrorFrame,
    Hello,
    Ping,
    Pong,
    Reoffer,
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
from apformats.results import ApResult, Instr, qid_card, qid_domain, qid_of, qid_str
from apformats.status import QueueStatus

__all__ = [
    "DEFAULT_GRACE",
    "DEFAULT_GRANTS",
    "REOFFER_KEEP_BYTES",
    "REOFFER_KEEP_TAGS",
    "SUPPORTED_VERSIONS",
    "FrameSession",
    "InstructionTarget",
    "Lease",
    "Refusal",
    "Tenancy",
    "load_apqn_matrix",
]

log = logging.getLogger(__name__)

#: Protocol versions this server speaks (inclusive range).  Version 2 adds read-ahead
#: (:data:`apformats.frames.READAHEAD_VERSION`); a version 1 client gets exactly what it always got.
SUPPORTED_VERSIONS: tuple[int, int] = (PROTOCOL_VERSION, READAHEAD_VERSION)
#: The instructions whose status may start a read-ahead (their status says whether replies wait).
_READS_AHEAD = frozenset({Instr.NQAP, Instr.DQAP})
#: The instructions after whose answer the replies a session keeps for a REOFFER of one queue are
#: void (the card discarded what it held; a reply taken before must not come back after).
_RESETS = frozenset({Instr.RAPQ, Instr.ZAPQ})
#: Most answers (tags) whose dequeued replies a session keeps for a REOFFER, the oldest dropped first.
REOFFER_KEEP_TAGS = 512
#: Most reply bytes a session keeps for a REOFFER, the oldest answers dropped first.
REOFFER_KEEP_BYTES = 1 << 20
#: How long a dropped session's APQNs and replies wait for it to come back, seconds.
DEFAULT_GRACE = 60.0
#: What a HELLO without a domain list is granted: ``domain`` (one free domain on every card) or
#: ``all`` (every free APQN the client may have).
DEFAULT_GRANTS = ("domain", "all")

NotifyFn = Callable[[bytes], None]


class InstructionTarget(Protocol):
    """The part of ``emulator.Emulator`` (INTERNALS §3) a session drives: its one instruction entry
    (``execute``, as the in-process transport uses it) and its topology."""

    def execute(self, command: Command, notify: Callable[[int], object] | None = None) -> ApResult: ...
    def qids(self) -> list[int]: ...


class ZeroizeTarget(Protocol):
    """What a shared :class:`Tenancy` needs besides the topology: take an APQN back, whatever state it
    is in (``emulator.Emulator.zeroize``)."""

    def qids(self) -> list[int]: ...
    def zeroize(self, qid: int) -> None: ...


_NOT_AVAILABLE = ApResult(QueueStatus(response_code=ResponseCode.Q_NOT_AVAIL))


def _apqns(qids: Iterable[int]) -> str:
    return ", ".join(qid_str(q) for q in sorted(qids)) or "none"


# --- assignment: which session drives which APQN ------------------------------------------------------


class Refusal(Exception):
    """A HELLO the tenancy will not grant: the ERROR ``code`` and the text the client is told."""

    def __init__(self, code: ErrorCode, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


class TakenReplies:
    """The replies a version 2 session took off its cards (a DQAP's own, and those read ahead) per
    answer it sent, so a resumed client can have the ones whose answers it lost put back (REOFFER).

    Why it is enough to key them by tag: an answer and the replies read ahead behind it leave in one
    multipart message, which ZeroMQ delivers whole or not at all, so a tag whose answer the client
    never got is a tag whose replies it never got.  Bounded: the last ``max_tags`` answers and
    ``max_bytes`` of reply bytes, the oldest dropped first (their replies stay lost, as before).
    Pure bookkeeping: no I/O, no clock; the session that owns the lease calls it.
    """

    __slots__ = ("_by_tag", "_bytes", "dropped", "max_bytes", "max_tags")

    def __init__(self, max_tags: int = REOFFER_KEEP_TAGS, max_bytes: int = REOFFER_KEEP_BYTES) -> None:
        self.max_tags = max_tags
        self.max_bytes = max_bytes
        # tag -> (qid, replies, their bytes), in the order answered; the size is kept, not re-summed
        self._by_tag: dict[int, tuple[int, list[tuple[int, bytes]], int]] = {}
        self._bytes = 0
        self.dropped = 0  # answers pruned by the bounds (their replies can no longer come back)

    def __len__(self) -> int:
        return len(self._by_tag)

    @property
    def size(self) -> int:
        """Reply bytes kept."""
        return self._bytes

    def record(self, tag: int, qid: int, replies: list[tuple[int, bytes]]) -> None:
        """The answer to ``tag`` carried ``replies`` (psmid, reply) of ``qid``, in the order taken.
        Called for every answer that takes a reply, so it is kept cheap: no sums over what is kept."""
        by_tag = self._by_tag
        old = by_tag.pop(tag, None)
        if old is not None:
            self._bytes -= old[2]
        size = 0
        for _, reply in replies:
            size += len(reply)
        by_tag[tag] = (qid, replies, size)
        self._bytes += size
        while len(by_tag) > self.max_tags or self._bytes > self.max_bytes:
            oldest = next(iter(by_tag))
            self._bytes -= by_tag.pop(oldest)[2]
            self.dropped += 1

    def forget_queue(self, qid: int) -> None:
        """The queue was reset: the replies taken from it before must never come back."""
        for tag in [t for t, (q, _, _) in self._by_tag.items() if q == qid]:
            self._bytes -= self._by_tag.pop(tag)[2]

    def take(self, tags: Iterable[int]) -> tuple[dict[int, list[tuple[int, bytes]]], int]:
        """The replies of the answers ``tags`` names, per queue in the order they were taken, and how
        many of ``tags`` were not kept (unknown, pruned, or never answered); then forget everything:
        what a resumed client did not name, it received."""
        wanted = set(tags)
        out: defaultdict[int, list[tuple[int, bytes]]] = defaultdict(list)
        found = 0
        for tag, (qid, replies, _) in self._by_tag.items():  # answer order, not the client's order
            if tag in wanted:
                found += 1
                out[qid].extend(replies)
        self.clear()
        return dict(out), len(wanted) - found

    def clear(self) -> None:
        self._by_tag.clear()
        self._bytes = 0


@dataclass(eq=False, slots=True)
class Lease:
    """One session's hold on its APQNs, from the WELCOME that granted them until they are freed.

    ``holder`` is the connection driving it now (None while it is detached, waiting for its client to
    come back); ``key`` the CURVE public key (Z85) it belongs to, None without CURVE.
    """

    token: bytes
    key: str | None
    qids: frozenset[int]
    holder: FrameSession | None
    detached_at: float | None = None
    resumes: int = 0
    #: the replies its version 2 sessions took per answer, for a REOFFER after a resume
    taken: TakenReplies = dataclasses.field(default_factory=TakenReplies)


class Tenancy:
    """The APQN assignment of one emulator shared by many sessions (see the module doc).

    ``allowed_domains`` bounds every client (None: all); ``matrix`` maps a CURVE public key (Z85, or
    ``"*"`` for any other key) to the APQNs it may ever have (None: no per-key limit); ``grace`` is how
    long a dropped session is kept for its client.  ``shared=False`` is a private tenancy (one session,
    e.g. a USB adapter's host): the default grant is every allowed APQN, and nothing is reserved or
    zeroized.  ``clock`` reads the time for the grace (the server's monotonic clock; tests pass their
    own).  ``default_grant``: see :data:`DEFAULT_GRANTS`.  Not thread-safe: the thread that handles
    frames owns it.
    """

    def __init__(
        self,
        emulator: Any,
        allowed_domains: Iterable[int] | None = None,
        *,
        grace: float = DEFAULT_GRACE,
        matrix: Mapping[str, Iterable[int]] | None = None,
        shared: bool = True,
        clock: Callable[[], float] = time.monotonic,
        default_grant: str = "domain",
    ) -> None:
        if not grace >= 0 or grace == float("inf"):
            raise ValueError(f"session grace must be a finite number of seconds >= 0, got {grace!r}")
        if default_grant not in DEFAULT_GRANTS:
            raise ValueError(f"default_grant must be one of {DEFAULT_GRANTS}, got {default_grant!r}")
        self.default_grant = default_grant
        self.emulator = emulator
        self.allowed = None if allowed_domains is None else frozenset(allowed_domains)
        self.matrix = None if matrix is None else {k: frozenset(v) for k, v in matrix.items()}
        self.grace = grace
        self.shared = shared
        self.clock = clock
        self.stats: Counter[str] = Counter()
        self._owner: dict[int, Lease] = {}
        self._leases: dict[bytes, Lease] = {}
        self._evicted: list[FrameSession] = []

    # -- queries -----------------------------------------------------------------------------------
    def owner(self, qid: int) -> Lease | None:
        """The lease holding ``qid`` (live or waiting for its client), None when it is free."""
        return self._owner.get(qid)

    def leases(self) -> list[Lease]:
        return list(self._leases.values())

    def permitted(self, key: str | None) -> frozenset[int]:
        """Every APQN a client with ``key`` may ever be assigned."""
        qids = frozenset(self.emulator.qids())
        if self.allowed is not None:
            qids = frozenset(q for q in qids if qid_domain(q) in self.allowed)
        if self.matrix is not None:
            mine = self.matrix.get(key or "", self.matrix.get("*", frozenset()))
            qids &= mine
        return qids

    # -- a session comes, goes, comes back ------------------------------------------------------------
    def open(self, hello: Hello, key: str | None, session: FrameSession) -> tuple[Lease, bool]:
        """Grant ``hello`` for ``session``: ``(lease, resumed)``.  Raises :class:`Refusal`."""
        token = hello.token
        if token is not None:
            lease = self._leases.get(token)
            if lease is not None and lease.key == key:
                return self._resume(lease, session), True
            if lease is not None:  # another key's: never shared, never revealed
                token = None
            self.stats["unknown_tokens"] += 1  # new, expired, issued before a restart, or not this key's
        qids = self._assign(hello.domains, key)
        # the client's own token when it proposed one (see the module doc), else a fresh one
        lease = Lease(token or secrets.token_bytes(16), key, qids, session)
        if self.shared:
            for q in qids:
                self._owner[q] = lease
            self._leases[lease.token] = lease
        self.stats["granted"] += 1
        return lease, False

    def _resume(self, lease: Lease, session: FrameSession) -> Lease:
        old = lease.holder
        if old is not None and old is not session:
            old.evict()  # a half-dead connection the server has not noticed yet: the client moved on
            self._evicted.append(old)
            self.stats["taken_over"] += 1
        lease.holder = session
        lease.detached_at = None
        lease.resumes += 1
        self.stats["resumed"] += 1
        return lease

    def _assign(self, domains: tuple[int, ...] | None, key: str | None) -> frozenset[int]:
        permitted = self.permitted(key)
        if domains is not None:
            have = {qid_domain(q) for q in permitted}
            denied = sorted(set(domains) - have)
            if denied:
                raise Refusal(ErrorCode.DOMAIN_DENIED, f"domains {denied} are not granted to this client")
            wanted = frozenset(q for q in permitted if qid_domain(q) in domains)
            if not wanted:  # an empty list: a session of nothing, that a client could open in bulk
                raise Refusal(ErrorCode.DOMAIN_DENIED, "a HELLO's domain list must name a domain")
            busy = [q for q in wanted if q in self._owner]
            if busy:
                raise Refusal(ErrorCode.APQN_IN_USE, f"APQNs {_apqns(busy)} are in use by another session")
            return wanted
        if not self.shared:
            return permitted
        if not permitted:
            raise Refusal(ErrorCode.DOMAIN_DENIED, "no APQN is granted to this client")
        free = permitted - self._owner.keys()
        if not free:
            raise Refusal(
                ErrorCode.APQN_IN_USE,
                f"no free APQN: all {len(permitted)} this client may have are in use by other sessions",
            )
        if self.default_grant == "all":
            return free
        return self._default_grant(permitted, free)

    @staticmethod
    def _default_grant(permitted: frozenset[int], free: frozenset[int]) -> frozenset[int]:
        """One free domain on every card (see the module doc)."""
        cards = {qid_card(q) for q in permitted}
        for d in sorted({qid_domain(q) for q in free}):
            group = frozenset(q for q in permitted if qid_domain(q) == d)
            if group <= free and {qid_card(q) for q in group} == cards:
                return group
        lowest: dict[int, int] = {}
        for q in sorted(free):
            lowest.setdefault(qid_card(q), qid_domain(q))
        return frozenset(qid_of(c, d) for c, d in lowest.items())

    def leave(self, lease: Lease, session: FrameSession) -> None:
        """The client said BYE: its APQNs are zeroized and free now."""
        if lease.holder is session:
            self._free(lease, "left")

    def detach(self, lease: Lease, session: FrameSession) -> None:
        """The connection is gone without a BYE: keep the lease for its client for the grace."""
        if lease.holder is not session:
            return  # taken over by a resume, or already freed
        lease.holder = None
        if not self.shared:
            return
        if self.grace <= 0:
            self._free(lease, "dropped")
            return
        lease.detached_at = self.clock()
        self.stats["detached"] += 1
        log.info("session holding %s detached; kept %.3g s for its client", _apqns(lease.qids), self.grace)

    def expire(self) -> list[Lease]:
        """Free the leases whose grace has run out (the server calls this about once a second)."""
        now = self.clock()
        gone = [
            lease
            for lease in self._leases.values()
            if lease.holder is None
            and lease.detached_at is not None
            and now - lease.detached_at >= self.grace
        ]
        for lease in gone:
            self._free(lease, "expired")
        return gone

    def take_evicted(self) -> list[FrameSession]:
        """Sessions whose lease a resume moved to another connection (their owner says BYE to them)."""
        out, self._evicted = self._evicted, []
        return out

    def _free(self, lease: Lease, why: str) -> None:
        if self._leases.pop(lease.token, None) is None:
            return
        lease.holder = None
        for q in lease.qids:
            if self._owner.get(q) is lease:
                del self._owner[q]
            self.emulator.zeroize(q)
        self.stats[why] += 1
        log.info("APQNs %s zeroized and free (%s)", _apqns(lease.qids), why)


def load_apqn_matrix(path: str | Path, curve_dir: str | Path | None = None) -> dict[str, frozenset[int]]:
    """Read an APQN matrix file: which APQNs each CURVE client may ever be assigned.

    TOML, one table per client under ``[clients]``, named by its certificate (``clients/NAME.key`` in the
    CURVE directory), by its Z85 public key, or ``"*"`` for every other allow-listed key::

        [clients.alice]          # vfio-ap style: every card listed x every domain listed
        cards = [0, 1]
        domains = [0, 1]

        [clients.bob]            # or APQNs one by one, in sysfs spelling
        apqns = ["02.0003", "03.0003"]

    ``cards`` defaults to every card.  Returns Z85 key (or ``"*"``) -> qids; raises ``ValueError`` for a
    malformed file or a client name with no certificate.
    """
    raw = tomllib.loads(Path(path).read_text())
    clients = raw.get("clients")
    if not isinstance(clients, dict) or set(raw) - {"clients"}:
        raise ValueError(f"{path}: an APQN matrix holds one [clients.NAME] table per client, nothing else")
    out: dict[str, frozenset[int]] = {}
    for name, entry in clients.items():
        if not isinstance(entry, dict) or not set(entry) <= {"cards", "domains", "apqns"}:
            raise ValueError(f"{path}: [clients.{name}] takes cards, domains and apqns only")
        qids: set[int] = set()
        for text in entry.get("apqns", []):
            card, _, domain = str(text).partition(".")
            try:
                qids.add(qid_of(int(card, 16), int(domain, 16)))
            except ValueError:
                raise ValueError(f"{path}: [clients.{name}]: bad APQN {text!r} (want CC.DDDD, hex)") from None
        if "domains" in entry:
            cards = entry.get("cards", range(256))
            qids.update(
                qid_of(c, d) for c in cards for d in entry["domains"] if 0 <= c < 256 and 0 <= d < 256
            )
        out[_client_key(name, curve_dir, path)] = frozenset(qids)
    return out


def _client_key(name: str, curve_dir: str | Path | None, path: str | Path) -> str:
    if name == "*" or len(name) == 40:
        return name
    if curve_dir is not None:
        cert = Path(curve_dir) / "clients" / f"{name}.key"
        if cert.is_file():
            import zmq.auth

            public, _ = zmq.auth.load_certificate(cert)
            return public.decode("ascii")
    raise ValueError(f"{path}: client {name!r} has no certificate clients/{name}.key (nor is it a Z85 key)")


# --- one session ----------------------------------------------------------------------------------------


class FrameSession:
    """The server side of one client's frame conversation with an emulator.

    ``allowed_domains``: the domains the server grants any client (None: every domain), used when no
    ``tenancy`` is given (a private one is made).  A shared server passes its :class:`Tenancy` and the
    connection's CURVE key (``key``, Z85; None without CURVE).  ``notify`` receives INTERRUPT frame bytes
    (from the emulator's clock thread); without it, WELCOME says interrupts are not supported.
    """

    def __init__(
        self,
        emulator: InstructionTarget,
        allowed_domains: Iterable[int] | None = None,
        notify: NotifyFn | None = None,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        name: str = "",
        tenancy: Tenancy | None = None,
        key: str | None = None,
    ) -> None:
        self.emulator = emulator
        self.tenancy = tenancy if tenancy is not None else Tenancy(emulator, allowed_domains, shared=False)
        self.key = key
        self.max_frame = max_frame
        self.name = name
        self.stats: Counter[str] = Counter()
        self.lease: Lease | None = None
        self._notify = notify
        self._qids: frozenset[int] = frozenset()  # nothing before HELLO
        self._established = False
        self._version = 0
        self._closed = threading.Event()
        #: keep the replies each answer took, for a REOFFER after a resume (version 2, shared server)
        self._keeps_taken = False
        #: a REOFFER is taken now: a resumed version 2 session, before its first COMMAND
        self._may_reoffer = False

    # -- state -------------------------------------------------------------------------------------
    @property
    def established(self) -> bool:
        """True once a HELLO was accepted (and the session is not closed)."""
        return self._established and not self.closed

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    @property
    def version(self) -> int:
        """The protocol version agreed by HELLO (0 before it).  From
        :data:`~apformats.frames.READAHEAD_VERSION` on, the session reads ahead and its owner may
        send it several frames in one message (the client then takes every part as a frame)."""
        return self._version

    @property
    def domains(self) -> frozenset[int]:
        """The domains of this session's APQNs; empty before HELLO."""
        return frozenset(qid_domain(q) for q in self._qids)

    def may_use(self, qid: int) -> bool:
        """APQN isolation: is ``qid`` assigned to this session?"""
        return qid in self._qids

    def qids(self) -> list[int]:
        """The APQNs assigned to this session (what WELCOME lists)."""
        return sorted(self._qids)

    def close(self) -> None:
        """The connection is gone (dropped, idle, disconnected by the server): later interrupts for it
        are dropped, later frames get NOT_HELLO, and its APQNs wait the grace for a resume."""
        if self.lease is not None:
            self.tenancy.detach(self.lease, self)
        self._end()

    def evict(self) -> None:
        """The session was resumed on another connection: this one ends, the lease lives on there."""
        self.stats["evicted"] += 1
        self._end()

    def _end(self) -> None:
        self._closed.set()
        self._established = False
        self._qids = frozenset()

    # -- frames in, frames out ---------------------------------------------------------------------
    def handle(self, data: bytes) -> list[bytes]:
        """Process one received frame; return the frames to send back (usually one, maybe none)."""
        self.stats["frames_in"] += 1
        try:
            frame = decode_frame(data, max_len=self.max_frame)
        except FormatError as exc:
            return [self._refuse(data, exc)]
        if isinstance(frame, Command):
            return self._command(frame)
        if isinstance(frame, Ping):
            return [encode_pong(frame.token)]
        if isinstance(frame, Hello):
            return [self._hello(frame)]
        if isinstance(frame, Pong):
            return []
        if isinstance(frame, Reoffer):
            return self._reoffer(frame)
        if isinstance(frame, Bye):
            self.stats["bye"] += 1
            if self.lease is not None:
                self.tenancy.leave(self.lease, self)
            self._end()
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
        if self.established and self.lease is not None:
            return self._hello_again(hello, self.lease)
        try:
            lease, resumed = self.tenancy.open(hello, self.key, self)
        except Refusal as no:
            self.stats["errors_sent"] += 1
            self.stats[f"refused_{no.code.name.lower()}"] += 1
            return encode_error(0, no.code, no.text)
        self.lease = lease
        self._qids = lease.qids
        self._version = min(hello.max_version, hi)
        self._established = True
        self._keeps_taken = self._version >= READAHEAD_VERSION and self.tenancy.shared
        self._may_reoffer = resumed and self._keeps_taken
        self._closed.clear()
        self.stats["resumed" if resumed else "hello"] += 1
        return self._welcome(resumed)

    def _hello_again(self, hello: Hello, lease: Lease) -> bytes:
        """A second HELLO on an established session: it may repeat what it has, never widen it."""
        asked = (
            lease.qids
            if hello.domains is None
            else frozenset(q for q in self.emulator.qids() if qid_domain(q) in hello.domains)
        )
        if not asked <= lease.qids:
            self.stats["errors_sent"] += 1
            self.stats["refused_widen"] += 1
            text = f"a session cannot be widened: it holds {_apqns(lease.qids)}; open another for more"
            return encode_error(0, ErrorCode.DOMAIN_DENIED, text)
        return self._welcome(resumed=False)

    def _welcome(self, resumed: bool) -> bytes:
        assert self.lease is not None
        return encode_welcome(
            self.qids(),
            interrupts=self._notify is not None,
            version=self._version,
            max_frame=self.max_frame,
            resumed=resumed,
            token=self.lease.token,
        )

    def _command(self, cmd: Command) -> list[bytes]:
        if not self.established:
            self.stats["errors_sent"] += 1
            return [encode_error(cmd.tag, ErrorCode.NOT_HELLO, "no session: send HELLO first")]
        self.stats["commands"] += 1
        if self._may_reoffer:  # the resumed client named no lost answer: it has everything else
            self._may_reoffer = False
            assert self.lease is not None
            self.lease.taken.clear()
        if cmd.qid not in self._qids:
            self.stats["denied"] += 1
            return [encode_result(cmd.tag, _NOT_AVAILABLE)]
        irq = self._on_interrupt if self._notify else None
        try:
            result = self.emulator.execute(cmd, irq)
            out = [encode_result(cmd.tag, result)]
            if self._version < READAHEAD_VERSION:
                return out
            st = result.status
            normal = st.response_code == ResponseCode.NORMAL
            if cmd.instr in _READS_AHEAD:
                taken = [result] if normal and cmd.instr is Instr.DQAP else []
                if st.replies_waiting and normal:
                    ahead = self._read_ahead(cmd, irq)
                    out += [encode_result(cmd.tag, r) for r in ahead]
                    taken += ahead
                if taken and self._keeps_taken:
                    assert self.lease is not None
                    self.lease.taken.record(cmd.tag, cmd.qid, [(r.psmid, r.reply) for r in taken])
            elif cmd.instr in _RESETS and normal and self.lease is not None:
                self.lease.taken.forget_queue(cmd.qid)
            return out
        except Exception as exc:  # a bug in the emulator must not take the server down
            log.exception("%s: %s on qid %#06x failed", self.name, cmd.instr.name, cmd.qid)
            self.stats["errors_sent"] += 1
            return [encode_error(cmd.tag, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")]

    def _read_ahead(self, cmd: Command, irq: Callable[[int], object] | None) -> list[ApResult]:
        """Replies wait on ``cmd``'s queue: dequeue them now (DQAP after DQAP, at most
        :data:`READAHEAD_MAX`) and answer them under ``cmd``'s tag, so the client has them in the
        same round trip (see :data:`apformats.frames.READAHEAD_VERSION`).  A DQAP that takes no reply
        changes nothing on the card, so the one that ends the loop is simply not sent."""
        dqap = Command(cmd.tag, Instr.DQAP, cmd.qid)
        frames: list[ApResult] = []
        for _ in range(READAHEAD_MAX):
            r = self.emulator.execute(dqap, irq)
            if r.status.response_code != ResponseCode.NORMAL:
                break
            frames.append(r)
            if not r.status.replies_waiting:
                break
        self.stats["read_ahead"] += len(frames)
        return frames

    def _reoffer(self, frame: Reoffer) -> list[bytes]:
        """A resumed client names the NQAP/DQAP answers it lost with its last link: put the replies
        those answers took back at the front of their queues, in the order taken, so the card holds
        them again and the client's next DQAPs get them (the driver needs no change: the queue is
        simply not empty).  Answers no longer kept (pruned by the bounds, never sent, or not this
        session's) bring nothing back: those replies stay lost, counted ``reoffer_missed``.  Taken
        only right after a resumed WELCOME and before any COMMAND (the kept answers are the old
        link's); otherwise refused with ERROR ``UNEXPECTED``.  No answer: the client goes on."""
        if not self.established:
            self.stats["errors_sent"] += 1
            return [encode_error(0, ErrorCode.NOT_HELLO, "no session: send HELLO first")]
        if not self._may_reoffer:
            self.stats["errors_sent"] += 1
            self.stats["refused_reoffer"] += 1
            text = "REOFFER is taken only right after a resumed version 2 WELCOME, before any COMMAND"
            return [encode_error(0, ErrorCode.UNEXPECTED, text)]
        self._may_reoffer = False
        assert self.lease is not None
        per_queue, missed = self.lease.taken.take(frame.tags)
        put_back: Callable[[int, list[tuple[int, bytes]]], int] | None = getattr(
            self.emulator, "put_back", None
        )
        back = lost = 0
        for qid, replies in per_queue.items():
            n = put_back(qid, replies) if put_back is not None and qid in self._qids else 0
            back += n
            lost += len(replies) - n
        for counters in (self.stats, self.tenancy.stats):
            counters["reoffer_tags"] += len(frame.tags)
            counters["reoffered"] += back
            counters["reoffer_missed"] += missed
            counters["reoffer_refused"] += lost  # kept, but the queue took them not (reset, gone)
        log.info("%s: REOFFER of %d tags put %d replies back", self.name, len(frame.tags), back)
        return []

    def _on_interrupt(self, qid: int) -> None:
        """Emulator callback (clock context): queue an INTERRUPT frame for this session's owner.

        No interrupt is raised for replies an answer already carried: a reply ready when its NQAP
        returned is read ahead with that NQAP's answer, and the read clears the queue's pending
        interruption before it is delivered (``Emulator._raise_irq``)."""
        notify = self._notify
        if notify is None or self.closed:
            return
        self.stats["interrupts"] += 1
        notify(encode_interrupt(qid))

    def __repr__(self) -> str:
        state = "closed" if self.closed else "established" if self._established else "new"
        return f"<FrameSession {self.name!r} {state} apqns={_apqns(self._qids)}>"
