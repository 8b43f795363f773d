"""What ``tcp://`` and ``usb://`` share: a transport that carries :mod:`apformats.frames` over a link
owned by one I/O thread.

Template methods, as python-can's ``BusABC``: :class:`FramedTransport` holds the policy, and a
backend keeps only what its link does differently (open a socket or a device, read and write it,
notice that it broke).  Both backends therefore answer a runner in the same way:

* Every submitted tag ends in exactly one event: a :class:`Completion`, or a :class:`TransportLost`
  naming it.  A tag named in a TransportLost, permanent or not, never completes (the base
  ``Transport.poll`` drops it from ``outstanding()``; a late answer is counted as ``stale_rx``).
* **ERROR frames** for a tag: the codes with an AP meaning complete the command with that response
  code (:data:`ERROR_RESPONSE_CODES`: TOO_BIG -> MESSAGE_TOO_BIG, UNKNOWN_OPCODE -> REQ_FAC_NOT_INST,
  DOMAIN_DENIED -> Q_NOT_AVAIL), as the hardware would answer.  Any other code is protocol breakage
  (MALFORMED, CORRUPT, INTERNAL, ...) and ends the tag with a non-permanent TransportLost: the
  command's effect is unknown, or the bytes were not what we sent.  :data:`SESSION_GONE` codes
  (NOT_HELLO, SHUTTING_DOWN) mean the peer forgot us: the link is renewed.
* A frame larger than the peer's limit (WELCOME's ``max_frame``) completes with MESSAGE_TOO_BIG
  without being sent.  A frame from the peer that does not decode (CRC) is counted and dropped: its
  tag cannot be trusted, so that command ends by the backend's reply deadline.
* **Link down** (the backend says why) -> ``TransportLost(tags=<commands sent on that link and
  unanswered>, permanent=False)``; the backend reconnects and says HELLO again.  Commands submitted
  meanwhile are held in the outbox and sent after the new WELCOME; nothing sent on the old link is
  ever re-sent (the driver decides from its ledger).
* **Peer gone** (no handshake within ``peer_deadline`` of the last sign of life, or a refused HELLO
  on a reconnect) -> one ``TransportLost(tags=<every unanswered command>, permanent=True,
  unsent=<the held ones>)``; while the peer stays gone, every submit gets a permanent
  TransportLost, ``unsent``, at once (never silently held).  The transport keeps trying to reach
  the peer, for as long as it is open, with capped exponential back-off and jitter
  (:class:`Backoff`).  When a handshake succeeds again it emits :class:`PeerRestored` and serves
  new commands as before: the driver brings its queues up again, and the application needs no new
  client.
* **Lost for good** only when the caller asked for it (``give_up_after`` seconds without the peer)
  or the I/O thread itself failed: the state is ``lost``, and every later submit bounces as above.
* A HELLO answered with a :data:`HANDSHAKE_REFUSALS` code fails the open with
  :class:`HandshakeRefused` (retrying cannot help a caller that is still opening), or
  :class:`apcrypto.errors.ApqnInUse` when the APQNs are held by other sessions; other ERRORs
  before WELCOME are only logged.  On a reconnect the same refusal declares the peer gone, and the
  back-off goes on: an operator may fix the server while the client waits.
* **Sessions survive a reconnect**: every HELLO presents our resume token (our own proposal until
  a WELCOME names it), so a server that kept our session (within its grace) gives back the same APQNs
  and the replies they hold (WELCOME ``resumed``); the driver drains them and decides from what it
  finds.  A first handshake retried on a new connection finds the session its first attempt got.  A
  WELCOME that is not a resume after an earlier session means the server lost what it held for us
  (restarted, or the grace ran out): counted as ``sessions_lost`` and logged.

* **Read-ahead** (session version 2, :data:`apformats.frames.READAHEAD_VERSION`; a backend offers it
  in its HELLO): the server answers an NQAP or DQAP that finds replies waiting with those replies too,
  as extra RESULT frames under the same tag.  They are kept per queue and answer the next DQAPs of that
  queue here, without a frame: the queue a runner sees is the card's plus the replies kept for it, so
  while any are kept, other answers for that queue say replies wait (a TAPQ that found the card's
  queue empty must not look like forgotten work), a DQAP that crossed the read-ahead on the wire is
  answered with the older kept reply, an INTERRUPT that came meanwhile is passed on after the last
  one, and a reset carried out discards them, as the card discards its own.  What a peer may send
  ahead is bounded (:data:`~apformats.frames.READAHEAD_MAX` per answer, :data:`READAHEAD_KEEP` per
  queue).  Kept replies outlive a lost link: they are the card's answers, already here; but they
  answer DQAPs only while the link is up (an answer reads as the peer's, proof to a driver that
  the link works), so a DQAP submitted while it is down waits in the outbox for the next handshake.
* **Reoffer** (session version 2): an NQAP or DQAP whose answer a link took with it (lost in flight
  or timed out: a late answer is dropped, so its replies never reach the driver) took replies off
  the card that nobody has now.  Its tag is remembered (the latest :data:`~apformats.frames.
  REOFFER_TAGS_MAX`), and the first frame after a WELCOME that *resumes* the session is a REOFFER
  naming them, before any command: the server puts those replies back at the front of their queues,
  and the driver's next DQAPs find them there.  A WELCOME that does not resume forgets them.

Threads: ``submit`` encodes on the caller's thread and appends to the outbox; the I/O thread takes
the outbox while the link is up (or a backend's :meth:`_push` lets the submitting thread send it
while the I/O thread sleeps, holding the backend's I/O lock), and turns frames in into events that
:meth:`poll` returns.  The outbox, the event queue and ``_state`` changes that a submit must see are
guarded by ``_cv``; the rest (``_inflight``, the link) is the I/O thread's alone, or whoever's holds
the backend's I/O lock.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import secrets
import threading
from abc import abstractmethod
from collections import Counter, OrderedDict, deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar, TypedDict, cast

from apcrypto.errors import ApqnInUse
from apcrypto.transport.base import (
    Command,
    Completion,
    Interrupt,
    PeerRestored,
    Transport,
    TransportEvent,
    TransportLost,
)
from apformats.codes import ResponseCode
from apformats.errors import FormatError
from apformats.frames import (
    DEFAULT_MAX_FRAME,
    READAHEAD_MAX,
    READAHEAD_VERSION,
    REOFFER_TAGS_MAX,
    TOKEN_LEN,
    Bye,
    ErrorCode,
    ErrorFrame,
    Frame,
    InterruptFrame,
    Ping,
    Pong,
    ResultFrame,
    Welcome,
    decode_frame,
    encode_command,
    encode_pong,
    encode_reoffer,
    peek_kind,
)
from apformats.results import ApResult, Instr
from apformats.status import QueueStatus

__all__ = [
    "ERROR_RESPONSE_CODES",
    "HANDSHAKE_REFUSALS",
    "SESSION_GONE",
    "Backoff",
    "FramedTransport",
    "HandshakeRefused",
    "LinkOptions",
    "code_name",
    "link_options",
    "lost",
]

#: ERROR codes that mean what an AP response code means: the command completes with that code.
ERROR_RESPONSE_CODES: dict[int, ResponseCode] = {
    ErrorCode.TOO_BIG: ResponseCode.MESSAGE_TOO_BIG,
    ErrorCode.UNKNOWN_OPCODE: ResponseCode.REQ_FAC_NOT_INST,
    ErrorCode.DOMAIN_DENIED: ResponseCode.Q_NOT_AVAIL,
}
#: ERROR codes meaning the peer has no session for us (it restarted, dropped us, or is stopping).
SESSION_GONE: frozenset[int] = frozenset({ErrorCode.NOT_HELLO, ErrorCode.SHUTTING_DOWN})
#: ERROR codes that refuse a HELLO: retrying cannot help.
HANDSHAKE_REFUSALS: frozenset[int] = frozenset(
    {ErrorCode.BAD_VERSION, ErrorCode.DOMAIN_DENIED, ErrorCode.APQN_IN_USE}
)

# one immutable result per code, shared by every completion that carries it
_RESULTS: dict[int, ApResult] = {
    code: ApResult(QueueStatus(response_code=rc)) for code, rc in ERROR_RESPONSE_CODES.items()
}
_TOO_BIG = _RESULTS[ErrorCode.TOO_BIG]
#: Read-ahead replies kept per queue at most (a well-behaved server sends no more than the queue's
#: slots); beyond it a reply is dropped and counted, so a peer cannot grow our memory.
READAHEAD_KEEP = 256
#: The instructions a server reads ahead after (their tag also names the extra RESULT frames).
_READS_AHEAD = frozenset({Instr.NQAP, Instr.DQAP})
#: The instructions that discard a queue's replies when carried out.
_RESETS = frozenset({Instr.RAPQ, Instr.ZAPQ})
#: Response codes whose status word describes the queue (its bits are the card's view of it).
_QUEUE_RCS = frozenset({ResponseCode.NORMAL, ResponseCode.Q_FULL, ResponseCode.BUSY})


#: Events of one incoming batch handed to the core at a time: a long batch (a server answering 64
#: NQAPs with their read-ahead) goes in chunks, each followed by a send of what the core submitted for
#: it, so the peer works on those while the rest is decoded (never between an answer and its
#: read-ahead).  A short batch goes whole.
RX_CHUNK = 32


class LinkOptions(TypedDict, total=False):
    """The options every frame-carrying transport takes (defaults: :class:`FramedTransport`'s).

    ``domains``: the domains to ask for (None: whatever the peer grants).  ``timeout``: handshake and
    per-answer deadline, seconds.  ``reconnect_delay``: the first pause between reconnection attempts,
    doubling up to ``reconnect_delay_max``, each pause shortened by a random fraction of at most
    ``reconnect_jitter`` (0: none) so that the clients of a restarted server do not all knock at once.
    ``peer_deadline``: how long a vanished peer may take to come back before it is declared gone
    (its queues go out of service; reconnection goes on).  ``give_up_after``: stop trying once the
    peer has been silent that long (None, the default: never, while the transport is open).
    ``resume_token``: the session token the first HELLO presents (16 bytes; None: a fresh one from
    :mod:`secrets`), so that a restarted process gets its dead predecessor's session back
    (``connect(..., journal=...)`` passes the journalled one).
    """

    domains: Sequence[int] | None
    timeout: float
    reconnect_delay: float
    reconnect_delay_max: float
    reconnect_jitter: float
    peer_deadline: float
    give_up_after: float | None
    resume_token: bytes | None


_LINK_KEYS = tuple(LinkOptions.__annotations__)


#: Longest a link timeout may be, in seconds (a year): beyond, a deadline is not a deadline (and the
#: OS's timers cannot hold it).
MAX_SECONDS = 365 * 24 * 3600.0


def link_options(options: Mapping[str, Any]) -> LinkOptions:
    """The :class:`LinkOptions` among ``options``; the rest belong to other layers or transports
    (one ``connect(url, **options)`` serves every transport)."""
    return cast(LinkOptions, {k: options[k] for k in _LINK_KEYS if k in options})


class Backoff:
    """Capped exponential back-off with jitter: the pauses between attempts to reach a lost peer.

    Pause *n* (from 0) is ``min(cap, first * 2**n)`` times a factor drawn from ``[1 - jitter, 1]``:
    the cap bounds how long a returning peer waits to be noticed, the doubling keeps a long outage
    cheap, and the jitter spreads the reconnections of many clients after a server restart.  It holds
    no clock: the caller adds the pause to its own reading.  ``rng`` is for tests (seeded).
    """

    def __init__(
        self, first: float, cap: float, jitter: float = 0.0, rng: random.Random | None = None
    ) -> None:
        if not first > 0:
            raise ValueError(f"reconnect_delay must be > 0, got {first!r}")
        if not 0.0 <= jitter < 1.0:
            raise ValueError(f"reconnect_jitter must be in [0, 1), got {jitter!r}")
        self.first = first
        self.cap = max(first, cap)
        self.jitter = jitter
        self._rng = rng or random.Random()
        self._base = first

    @property
    def current(self) -> float:
        """The un-jittered pause the next :meth:`next` is drawn from."""
        return self._base

    def next(self) -> float:
        """The next pause, then double the base (up to the cap)."""
        pause = self._base * (1.0 - self.jitter * self._rng.random())
        self._base = min(self._base * 2.0, self.cap)
        return pause

    def reset(self) -> None:
        """The peer answered: the next outage starts again from ``first``."""
        self._base = self.first


class HandshakeRefused(ConnectionError):
    """The peer refused the session at open: an ERROR to HELLO (``code``: BAD_VERSION,
    DOMAIN_DENIED), or for ``tcp://`` a failed security handshake (``code`` 0: CURVE key not on the
    allow-list, CURVE on one side only)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def code_name(code: int) -> str:
    """An ERROR code's name for messages (the number when this codec does not know it)."""
    return ErrorCode(code).name if code in ErrorCode._value2member_map_ else str(code)


def lost(
    reason: str,
    cmds: Sequence[Command],
    *,
    permanent: bool,
    unsent: Sequence[Command] = (),
    resumable: bool = False,
) -> TransportLost:
    """The event that ends ``cmds``.  ``unsent``: those that provably never left this host (held
    while the link was down), which the driver may re-drive as never sent.  ``resumable``: the peer
    keeps our session (and the replies its cards hold) for its grace, so a reconnect may get them."""
    return TransportLost(
        reason,
        tuple(c.tag for c in cmds),
        permanent,
        tuple(sorted({c.qid for c in cmds})),
        tuple(c.tag for c in unsent),
        resumable,
    )


class FramedTransport(Transport):
    """Base of the frame-carrying transports: the shared policy (see the module doc).

    A backend calls :meth:`_start_io` at the end of its constructor and implements, on its I/O
    thread: :meth:`_io_main` (open the link, handshake, serve until ``_stop``), :meth:`_write_frame`,
    :meth:`_say_bye`, :meth:`_drop_link` and :meth:`_link_broken`.  While it serves, it feeds what it
    reads to :meth:`_on_frames`, sends what :meth:`_take_outbox` gives it and records each sent
    command in ``_inflight``; it reports a WELCOME with :meth:`_session_up`, a refusal with
    :meth:`_refused`, a broken link with :meth:`_link_down`, a peer silent past ``peer_deadline``
    with :meth:`_declare_gone` (and keeps reconnecting), and the end of its patience
    (``give_up_after``) with :meth:`_give_up`; :meth:`_outage_limits` says when those are due.
    """

    supports_interrupts = True
    #: how messages name the peer ("server", "adapter")
    peer_kind: ClassVar[str] = "peer"
    #: the peer keeps a dropped session (its APQNs and stored replies) for a grace and gives it back
    #: to a HELLO presenting our resume token; only then is a peer gone a ``resumable`` loss
    keeps_sessions: ClassVar[bool] = False
    #: what a refused HELLO raises (a backend may narrow it for its own callers)
    refused_error: ClassVar[type[HandshakeRefused]] = HandshakeRefused
    #: the I/O thread's name, before the endpoint (what debuggers and log formats show)
    thread_name: ClassVar[str] = "apcrypto-io"
    #: a threaded runner may take its turn on the I/O thread when events come while it sleeps
    #: (``_emit`` notifies outside ``_cv``, and ``submit``/``poll`` are safe from that thread)
    lends_io_thread: ClassVar[bool] = True

    def __init__(
        self,
        endpoint: str,
        *,
        domains: Sequence[int] | None = None,
        timeout: float = 2.0,
        reconnect_delay: float = 0.1,
        reconnect_delay_max: float = 2.0,
        reconnect_jitter: float = 0.25,
        peer_deadline: float = 5.0,
        give_up_after: float | None = None,
        resume_token: bytes | None = None,
    ) -> None:
        super().__init__()
        if resume_token is not None and (
            not isinstance(resume_token, bytes) or len(resume_token) != TOKEN_LEN
        ):
            raise ValueError(f"resume_token must be {TOKEN_LEN} bytes, not {resume_token!r}")
        for name, value in (("timeout", timeout), ("peer_deadline", peer_deadline)):
            if not (isinstance(value, int | float) and 0 < value < MAX_SECONDS):
                raise ValueError(f"{name} must be > 0 s and finite (< {MAX_SECONDS:g}), got {value!r}")
        if give_up_after is not None and not (
            isinstance(give_up_after, int | float) and 0 < give_up_after < MAX_SECONDS
        ):
            raise ValueError(f"give_up_after must be > 0 s and finite, or None, got {give_up_after!r}")
        if domains is not None and not all(type(d) is int and 0 <= d <= 0xFF for d in domains):
            raise ValueError(f"domains must be ints 0..255, got {domains!r}")
        self.endpoint = endpoint
        self.domains = None if domains is None else tuple(sorted(set(domains)))
        self.timeout = timeout
        self.reconnect_delay = reconnect_delay
        self.reconnect_delay_max = max(reconnect_delay, reconnect_delay_max)
        self.peer_deadline = peer_deadline
        self.give_up_after = give_up_after
        #: the pauses between reconnection attempts (the I/O thread's)
        self.backoff = Backoff(reconnect_delay, self.reconnect_delay_max, reconnect_jitter)
        self.counters: Counter[str] = Counter()
        #: the last WELCOME (the session's qids, limit and interrupt support); None before the first
        self.welcome: Welcome | None = None
        # our session's proposed identity: a journalled one after a restart, else a fresh one
        self._token = resume_token if resume_token is not None else secrets.token_bytes(TOKEN_LEN)
        self._log = logging.getLogger(type(self).__module__)  # each backend logs under its own name
        # shared between caller threads and the I/O thread, guarded by _cv
        self._cv = threading.Condition()
        self._outbox: deque[tuple[Command, bytes]] = deque()  # submitted, not yet sent (held)
        self._events: deque[TransportEvent] = deque()
        self._woken = False
        self._stop = False
        #: read-ahead replies by qid, in the order the card gave them (see "Read-ahead" above); shared
        self._ahead: dict[int, deque[ApResult]] = {}
        self._ahead_irq: set[int] = set()  # queues that had an INTERRUPT while replies were kept
        self._state = "connecting"  # connecting | up | down | lost (given up: nothing more happens)
        self._gone = False  # the peer is declared gone: submits bounce; reconnection goes on
        # the I/O thread's own
        self._inflight: OrderedDict[int, tuple[Command, float]] = OrderedDict()  # in send order
        self._connected_once = False
        self._readahead = False  # this session's server reads ahead (WELCOME version >= 2)
        self._ra_tag = 0  # the last NQAP/DQAP answered: extra RESULTs with its tag are read-ahead
        self._ra_qid = 0
        self._ra_left = 0
        self._kept_now: dict[int, None] = {}  # queues given read-ahead replies in this batch
        self._gone_reason: str | None = None  # the peer said it has no session for us (_on_error)
        #: NQAP/DQAP tags whose answers were lost, for a REOFFER after a resume (oldest first)
        self._lost_tags: dict[int, None] = {}
        self._ready = threading.Event()  # set by the first WELCOME, or by a failed open
        self._open_error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.endpoint} state={self._state} inflight={len(self._inflight)}>"

    @property
    def resume_token(self) -> bytes:
        """The token every HELLO presents: the last WELCOME's, and before the first one our own
        proposal, so that a handshake retried on a new connection finds the session an earlier
        attempt was granted (instead of leaving it reserved on the server)."""
        w = self.welcome
        return w.token if w is not None and w.token is not None else self._token

    @property
    def state(self) -> str:
        """``connecting``, ``up``, ``down`` (reconnecting within ``peer_deadline``), ``gone`` (the peer
        was declared gone; still reconnecting) or ``lost`` (given up, or the I/O thread failed)."""
        with self._cv:
            if self._gone and self._state != "lost":
                return "gone"
            return self._state

    # -- runner side -------------------------------------------------------------------------------
    def qids(self) -> list[int]:
        w = self.welcome
        return list(w.qids) if w is not None else []

    def _send(self, commands: Sequence[Command]) -> None:
        if self._ahead:
            commands = self._answer_from_ahead(commands)
            if not commands:
                return
        try:
            encoded = [
                (c, encode_command(c.tag, c.instr, c.qid, c.psmid, c.message, flag=c.flag)) for c in commands
            ]
        except ValueError:
            for c in commands:  # never sent, never outstanding
                self._outstanding.pop(c.tag, None)
            raise
        with self._cv:
            self._note_submitted(commands)
            gone = self._gone or self._state == "lost"
            if gone:
                # held off while the peer is gone: never sent; the session it may keep is still ours
                resumable = self._state != "lost" and self._session_kept()
                self._events.append(
                    lost(
                        f"{self._peer} is gone",
                        commands,
                        permanent=True,
                        unsent=commands,
                        resumable=resumable,
                    )
                )
            else:
                self._outbox.extend(encoded)
            self._cv.notify_all()
        if gone:
            self._notify_ready()
        else:
            self._push()

    def _answer_from_ahead(self, commands: Sequence[Command]) -> Sequence[Command]:
        """Answer each DQAP of a queue we hold read-ahead replies for with the oldest of them, here
        and now (the card already gave it; this DQAP would have taken it); return the rest to send.

        Only while the link is up: an answer reads as the peer's, and a driver takes the peer's
        answer as proof that its link works (its reply timers stop waiting for the link).  While the
        link is down such a DQAP waits in the outbox with everything else, and is answered here when
        the outbox is taken again (:meth:`_take_outbox`, once a handshake has succeeded)."""
        rest: list[Command] = []
        answered: list[TransportEvent] = []
        with self._cv:
            if self._state != "up" or self._gone:
                return commands
            ahead = self._ahead
            for c in commands:
                if c.instr is Instr.DQAP and c.qid in ahead:
                    after: list[TransportEvent] = []
                    answered.append(Completion(c.tag, self._take_ahead(c.qid, after)))
                    answered += after
                else:
                    rest.append(c)
            if answered:
                self._events.extend(answered)
                self._cv.notify_all()
        if answered:
            self._notify_ready()
        return rest

    def _take_ahead(self, qid: int, after: list[TransportEvent]) -> ApResult:
        """The oldest read-ahead reply kept for ``qid`` (under ``_cv``; there is one).  When it was
        the last and an INTERRUPT came while replies were kept, that interrupt is passed on after it
        (in ``after``): the kept replies' status words predate it."""
        kept = self._ahead[qid]
        result = kept.popleft()
        self.counters["readahead_used"] += 1
        if not kept:
            del self._ahead[qid]
            if qid in self._ahead_irq:
                self._ahead_irq.discard(qid)
                after.append(Interrupt(qid))
        elif not result.status.replies_waiting:  # more kept than its status says: ask for them
            after.append(Interrupt(qid))
        return result

    def _recv(self, timeout: float) -> list[TransportEvent]:
        with self._cv:
            if not self._events and not self._woken and timeout > 0:
                self._cv.wait_for(lambda: self._events or self._woken, timeout)
            self._woken = False
            out = list(self._events)
            self._events.clear()
        return out

    def wakeup(self) -> None:
        with self._cv:
            self._woken = True
            self._cv.notify_all()

    def _close(self) -> None:
        self._stop_io()

    def _start_io(self, open_timeout: float | None = None, timed_out: BaseException | None = None) -> None:
        """Start the I/O thread and wait for the first handshake; raise what failed the open
        (``timed_out`` when ``open_timeout`` passes with no verdict)."""
        name = f"{self.thread_name} {self.endpoint}"
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        answered = self._ready.wait(open_timeout)
        err = self._open_error
        if err is None and not answered:
            err = timed_out or ConnectionError(f"{self.endpoint}: no handshake within {open_timeout} s")
        if err is not None:
            self._stop_io()
            self._closed = True
            raise err

    def _stop_io(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._wake_io()
        t = self._thread
        if t is not None and t.is_alive() and t is not threading.current_thread():
            t.join(max(5.0, 2 * self.timeout))
            if t.is_alive():  # a backend call that ignores its timeout
                self._log.error("%r: I/O thread did not stop", self)
        self._release()

    def _emit(self, *events: TransportEvent) -> None:
        with self._cv:
            self._events.extend(events)
            self._cv.notify_all()
        self._notify_ready()

    # -- runner-side hooks -------------------------------------------------------------------------
    def _note_submitted(self, commands: Sequence[Command]) -> None:
        """Called under ``_cv`` for every submit (a backend may track what it implies)."""

    def _wake_io(self) -> None:
        """Make the I/O thread look at the outbox and ``_stop`` now.  Default: it waits on ``_cv``,
        which every submit and close notifies."""

    def _push(self) -> None:
        """A submit just filled the outbox: get it sent.  Default: wake the I/O thread, which sends it.
        A backend whose link a submitting thread may use itself (when the I/O thread is not using it)
        sends it here instead, sparing a thread switch per submit."""
        self._wake_io()

    def _release(self) -> None:
        """Free what outlives the I/O thread (after it is joined).  Default: nothing."""

    # -- the I/O thread: life cycle ------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._io_main()
        except BaseException as exc:  # a bug here must end in an event, not in a silent hang
            self._log.exception("%r: I/O thread failed", self)
            if not self._ready.is_set():
                self._fail_open(exc)
            else:
                self._give_up(f"I/O thread failed: {exc!r}")
        finally:
            try:
                if self._state == "up":
                    self._say_bye()
            finally:
                self._drop_link()

    def _fail_open(self, exc: BaseException) -> None:
        """The first handshake failed: the constructor raises ``exc``."""
        self._drop_link()
        self._open_error = exc
        with self._cv:
            self._state = "lost"
        self._ready.set()

    def _session_up(self, welcome: Welcome) -> None:
        """A WELCOME: the session is up (the backend then sends what the outbox holds)."""
        old = self.welcome
        if old is not None and set(welcome.qids) != set(old.qids):
            self._log.warning(
                "%r: the %s now offers %s (was %s)", self, self.peer_kind, welcome.qids, old.qids
            )
        if old is not None:
            if welcome.resumed:
                self.counters["resumed"] += 1
            else:
                self.counters["sessions_lost"] += 1
                self._log.warning(
                    "%r: the %s did not resume our session; what it held for us is gone", self, self.peer_kind
                )
        self.welcome = welcome
        self._readahead = welcome.version >= READAHEAD_VERSION
        self._ra_tag = 0
        self._send_reoffer(welcome)
        if not welcome.interrupts:
            self.supports_interrupts = False
        with self._cv:
            self._state = "up"
            was_gone, self._gone = self._gone, False
        self.backoff.reset()
        if self._connected_once:
            self.counters["reconnects"] += 1
            self._log.info("%r: reconnected", self)
        self._connected_once = True
        self._ready.set()
        if was_gone:
            self._peer_restored()

    def _note_lost(self, cmds: Iterable[Command]) -> None:
        """Remember the tags of NQAPs and DQAPs whose answers never came (version 2 sessions): the
        server may have taken replies off the card for them (see "Reoffer" above)."""
        if not self._readahead:
            return
        lost_tags = self._lost_tags
        for c in cmds:
            if c.instr in _READS_AHEAD:
                lost_tags[c.tag] = None
        while len(lost_tags) > REOFFER_TAGS_MAX:  # the oldest are the likeliest pruned by the server
            del lost_tags[next(iter(lost_tags))]
            self.counters["reoffer_overflow"] += 1

    def _send_reoffer(self, welcome: Welcome) -> None:
        """First thing on a resumed version 2 session: name the answers we lost, before any command."""
        tags, self._lost_tags = list(self._lost_tags), {}
        if not tags or not welcome.resumed or welcome.version < READAHEAD_VERSION:
            return
        self.counters["reoffer_tags"] += len(tags)
        self._write_frame(encode_reoffer(tags))

    def _session_kept(self) -> bool:
        """Whether a peer gone now may still keep our session (and the replies it holds) for us."""
        return self.keeps_sessions and self.welcome is not None and self.welcome.token is not None

    def _peer_restored(self) -> None:
        """A handshake succeeded after the peer was declared gone: tell the runner, whose driver
        brings the queues it took out of service up again."""
        self.counters["restored"] += 1
        self._log.warning("%r: the %s is back", self, self.peer_kind)
        resumed = self.welcome is not None and self.welcome.resumed
        self._emit(PeerRestored(f"{self._peer} answered a handshake again", resumed=bool(resumed)))

    def _refusal(self, err: ErrorFrame) -> Exception | None:
        """The exception for an ERROR that refuses our HELLO; None for one that does not."""
        code = int(err.code)
        if code not in HANDSHAKE_REFUSALS:
            return None
        text = f"{self.endpoint} refused the session: {code_name(code)}: {err.text}"
        if code == ErrorCode.APQN_IN_USE:
            return ApqnInUse(text, code=code)
        return self.refused_error(text, code)

    def _refused(self, exc: Exception) -> None:
        """HELLO refused: the open fails; on a reconnect the peer is declared gone (the backend
        goes on trying: the peer may be reconfigured while we wait)."""
        if self._connected_once:
            self._declare_gone(str(exc))
        else:
            self._fail_open(exc)

    def _link_down(self, reason: str) -> None:
        """Transient loss: end what was sent on this link and is unanswered; the backend reconnects."""
        self._log.warning("%r: link down (%s); reconnecting", self, reason)
        self.counters["links_lost"] += 1
        cmds = self._sent_and_unanswered()
        with self._cv:
            self._state = "down"
        self._emit(lost(reason, cmds, permanent=False))

    def _declare_gone(self, reason: str) -> None:
        """The peer is gone: every unanswered command (sent or held) ends lost, permanently, and
        every command submitted until a handshake succeeds again bounces at once.  The backend goes
        on reconnecting (with :attr:`backoff`); :meth:`_session_up` ends this."""
        if self._gone:
            return
        self._log.warning("%r: %s gone (%s); still trying to reach it", self, self.peer_kind, reason)
        self.counters["peer_gone"] += 1
        self._end_everything(reason, gone=True)

    def _give_up(self, reason: str) -> None:
        """Lost for good (``give_up_after`` passed, or the I/O thread failed): as :meth:`_declare_gone`,
        but nothing will try again; only :meth:`close` is left."""
        self._log.warning("%r: lost for good: %s", self, reason)
        self._end_everything(reason, gone=False)

    def _end_everything(self, reason: str, *, gone: bool) -> None:
        sent = self._sent_and_unanswered()
        with self._cv:
            held = [c for c, _ in self._outbox]
            self._outbox.clear()
            was_gone = self._gone
            if gone:
                self._gone = True
            else:
                self._state = "lost"
        if sent or held or not was_gone:  # the first permanent loss is always said, even when empty
            # only a peer gone (not a link closed or given up) with a session token may resume
            resumable = gone and self._session_kept()
            self._emit(lost(reason, sent + held, permanent=True, unsent=held, resumable=resumable))

    def _outage_limits(self, since: float) -> tuple[float | None, float | None]:
        """When a link silent since ``since`` makes the peer gone (None: already declared), and when
        the transport gives up (None: never)."""
        gone_at = None if self._gone else since + self.peer_deadline
        give_up_at = None if self.give_up_after is None else since + self.give_up_after
        return gone_at, give_up_at

    def _sent_and_unanswered(self) -> list[Command]:
        self._ra_tag = 0  # what the old link still carried for it is gone with it
        doubt = self._drop_link()
        cmds = [c for c, _ in self._inflight.values()] + doubt
        self._inflight.clear()
        self._note_lost(cmds)
        return cmds

    # -- the I/O thread: commands out ----------------------------------------------------------------
    @property
    def _max_frame(self) -> int:
        """The largest frame the peer takes (its WELCOME says)."""
        w = self.welcome
        return w.max_frame if w is not None else DEFAULT_MAX_FRAME

    @property
    def _rx_limit(self) -> int:
        """The largest frame taken from the peer: its own limit, never less than the default."""
        return max(self._max_frame, DEFAULT_MAX_FRAME)

    def _take_outbox(self) -> list[tuple[Command, bytes]]:
        """Everything submitted and not yet taken, in order (called while the link is up).  A frame
        over the peer's limit completes now, unsent; the limit is the one the current session
        announced, which a reconnect may have changed since the submit."""
        with self._cv:
            if not self._outbox:
                return []
            batch = list(self._outbox)
            self._outbox.clear()
        if self._ahead:  # DQAPs held while the link was down: kept replies answer them now
            rest = self._answer_from_ahead([c for c, _ in batch])
            if len(rest) != len(batch):
                sending = {c.tag for c in rest}
                batch = [e for e in batch if e[0].tag in sending]
        limit = self._max_frame
        if any(len(f) > limit for _, f in batch):
            self._emit(*[Completion(c.tag, _TOO_BIG) for c, f in batch if len(f) > limit])
            batch = [e for e in batch if len(e[1]) <= limit]
        return batch

    def _hold_back(self, rest: Sequence[tuple[Command, bytes]]) -> None:
        """Put commands the link would not take now back at the head of the outbox, in order."""
        with self._cv:
            self._outbox.extendleft(reversed(rest))

    def _no_answer(self, tags: Iterable[int], reason: str) -> TransportLost | None:
        """The answers to ``tags`` were lost in transit while the link stayed up: end the commands
        still in flight among them (None if none is)."""
        cmds = [self._inflight.pop(t)[0] for t in tags if t in self._inflight]
        if not cmds:
            return None
        self._note_lost(cmds)  # a late answer is dropped as stale, its read-ahead with it
        self.counters["reply_timeouts"] += len(cmds)
        return lost(reason, cmds, permanent=False)

    # -- the I/O thread: frames in -------------------------------------------------------------------
    def _on_frames(self, raws: Iterable[bytes]) -> int:
        """Decode and act on frames from the peer, in order, and emit their events in one go.
        Returns how many decoded (a backend's sign of life)."""
        events: list[TransportEvent] = []
        good = 0
        limit = self._rx_limit
        chunk = RX_CHUNK
        try:
            for raw in raws:
                try:
                    f = decode_frame(raw, max_len=limit)
                except FormatError as exc:  # corrupted in flight: no field can be trusted, not the tag
                    self.counters["corrupt_rx"] += 1
                    self._log.warning("%r: dropping a bad %s frame: %s", self, peek_kind(raw), exc)
                    continue
                good += 1
                if len(events) >= chunk and type(f) is ResultFrame and f.tag in self._inflight:
                    # a long batch, and a new answer begins (the last one's read-ahead is whole):
                    # the core has what came so far, and what it sends for it leaves now, so the
                    # peer works on that while we decode the rest
                    self._emit_events(events)
                    events = []
                    if self._gone_reason is None:  # nothing more goes out on a session that is gone
                        self._chunk_done()
                ev = self._on_frame(f, events)
                if ev is not None:
                    events.append(ev)
        finally:  # a frame that breaks the link must not swallow the answers read before it
            self._emit_events(events)
        gone, self._gone_reason = self._gone_reason, None
        if gone is not None:  # the peer has no session for us (see _on_error)
            self._link_broken(gone)
        return good

    def _emit_events(self, events: list[TransportEvent]) -> None:
        if self._kept_now:
            # make sure DQAPs come for what was kept: an INTERRUPT per queue after the batch's
            # own events (a hint the core acts on only when no DQAP of that queue is out; the
            # answer's own status usually has it ask already)
            events.extend(Interrupt(q) for q in self._kept_now)
            self._kept_now.clear()
        if events:
            self._emit(*events)

    def _chunk_done(self) -> None:
        """A chunk of a long incoming batch went to the core: send what it submitted meanwhile, if
        this backend can from here.  Default: nothing (the I/O loop sends after the batch)."""

    def _on_frame(self, f: Frame, events: list[TransportEvent]) -> TransportEvent | None:
        if isinstance(f, ResultFrame):  # the hot path first
            entry = self._inflight.pop(f.tag, None)
            if entry is None:
                if f.tag == self._ra_tag and self._ra_left > 0:
                    self._keep(f)
                    return None
                self.counters["stale_rx"] += 1
                return None
            if not self._readahead:
                return Completion(f.tag, f.to_result())
            cmd = entry[0]
            if cmd.instr in _READS_AHEAD:
                self._ra_tag, self._ra_qid, self._ra_left = f.tag, cmd.qid, READAHEAD_MAX
            if cmd.qid in self._ahead:
                return self._behind_ahead(f, cmd, events)
            return Completion(f.tag, f.to_result())
        if isinstance(f, InterruptFrame):
            self.counters["interrupts"] += 1
            if f.qid in self._ahead:
                with self._cv:
                    if f.qid in self._ahead:
                        self._ahead_irq.add(f.qid)
            return Interrupt(f.qid)
        if isinstance(f, ErrorFrame):
            return self._on_error(f)
        if isinstance(f, Ping):
            self._write_frame(encode_pong(f.token))
            return None
        if isinstance(f, Pong):
            return self._on_pong(f.token)
        if isinstance(f, Welcome):
            self._on_welcome(f)
            return None
        if isinstance(f, Bye):
            self._link_broken(f"{self.peer_kind} said BYE: {f.reason}")
            return None
        self.counters["unexpected_rx"] += 1
        return None

    def _keep(self, f: ResultFrame) -> None:
        """An extra RESULT after the last NQAP/DQAP's answer: a reply the server dequeued for us,
        kept until a DQAP of its queue asks (it may already have: see _dqap_behind_ahead)."""
        self._ra_left -= 1
        result = f.to_result()
        if result.status.response_code != ResponseCode.NORMAL:  # a server reads ahead replies only
            self.counters["stale_rx"] += 1
            return
        self.counters["readahead_rx"] += 1
        qid = self._ra_qid
        with self._cv:
            kept = self._ahead.get(qid)
            if kept is None:
                kept = self._ahead[qid] = deque()
            if len(kept) >= READAHEAD_KEEP:
                self.counters["readahead_dropped"] += 1
                return
            kept.append(result)
        self._kept_now[qid] = None

    def _behind_ahead(self, f: ResultFrame, cmd: Command, events: list[TransportEvent]) -> Completion | None:
        """The answer to ``cmd``, executed on the card after replies of its queue were read ahead for
        us and while we still keep some: the queue the caller sees is the card's plus those kept
        replies, so the answer must say so.

        * A DQAP is answered with the oldest kept reply, as the card would have answered it had the
          read-ahead not come first; a reply it took itself joins the end of the kept ones, and an
          empty answer ("no reply pending", which changed nothing) is dropped.  Its events go
          straight into ``events`` (an INTERRUPT passed on must follow the completion).
        * Any other instruction's status says replies wait and the queue is not empty (a TAPQ that
          found the card's queue empty must not make a caller think held work was forgotten).
        * A reset (RAPQ, ZAPQ) that was carried out discards the kept replies, as the card discards
          the replies it holds: everything read ahead before it has arrived before its answer.
        """
        real = f.to_result()
        qid = cmd.qid
        with self._cv:
            kept = self._ahead.get(qid)
            if kept is None:  # a caller's DQAP took the last one meanwhile
                return Completion(f.tag, real)
            st = real.status
            if cmd.instr is Instr.DQAP:
                if st.response_code == ResponseCode.NORMAL:
                    kept.append(real)
                after: list[TransportEvent] = []
                events.append(Completion(f.tag, self._take_ahead(qid, after)))
                events.extend(after)
                self.counters["readahead_reordered"] += 1
                return None
            if cmd.instr in _RESETS and st.response_code == ResponseCode.NORMAL:
                self.counters["readahead_discarded"] += len(kept)
                del self._ahead[qid]
                self._ahead_irq.discard(qid)
                return Completion(f.tag, real)
        if st.response_code in _QUEUE_RCS and not (st.replies_waiting and not st.queue_empty):
            st = dataclasses.replace(st, replies_waiting=True, queue_empty=False)
            real = dataclasses.replace(real, status=st)
        return Completion(f.tag, real)

    def _on_error(self, err: ErrorFrame) -> TransportEvent | None:
        self.counters["errors_rx"] += 1
        code = int(err.code)
        if self._state == "connecting":
            refusal = self._refusal(err)
            if refusal is not None:
                self._refused(refusal)
                return None
        if code in SESSION_GONE:  # it restarted, dropped us or is stopping: a new session is needed
            reason = f"{self.peer_kind} has no session for us: {code_name(code)}: {err.text}"
            # the command it names was refused before it ran: it never reached a card, and says so
            # now (the others in flight may have run before the session went: in doubt, as on any
            # loss).  Before the link goes: a backend may unwind from _link_broken
            entry = self._inflight.pop(err.tag, None) if err.tag else None
            if entry is not None:
                self.counters["refused_unrun"] += 1
                self._emit(lost(reason, [entry[0]], permanent=False, unsent=[entry[0]]))
            # the link goes once the frames read with this one are taken: the peer refuses every
            # command it was sent with an ERROR of its own, and each one read now is known unrun
            if self._gone_reason is None:
                self._gone_reason = reason
            return None
        entry = self._inflight.pop(err.tag, None) if err.tag else None
        if entry is None:
            self._log.info("%r: %s reported %s: %s", self, self.peer_kind, code_name(code), err.text)
            return None
        result = _RESULTS.get(code)
        if result is not None:
            return Completion(err.tag, result)
        reason = f"{self.peer_kind} refused the command: {code_name(code)}: {err.text}"
        return lost(reason, [entry[0]], permanent=False)

    def _on_pong(self, token: int) -> TransportEvent | None:
        """A PONG to one of our PINGs (default: a heartbeat answer, nothing to do)."""
        return None

    def _on_welcome(self, welcome: Welcome) -> None:
        """A WELCOME outside a handshake the backend runs itself (default: unexpected)."""
        self.counters["unexpected_rx"] += 1

    @property
    def _peer(self) -> str:
        return f"{self.peer_kind} {self.endpoint}"

    # -- what a backend implements (on its I/O thread) -----------------------------------------------
    @abstractmethod
    def _io_main(self) -> None:
        """Open the link and handshake (:meth:`_session_up`, or :meth:`_fail_open`/:meth:`_refused`),
        then serve until ``_stop``, reconnecting when the link breaks."""

    @abstractmethod
    def _write_frame(self, frame: bytes) -> None:
        """Send one frame of our own (PONG, PING, HELLO) now."""

    @abstractmethod
    def _say_bye(self) -> None:
        """Tell the peer we are leaving (best effort, never raises); the link is up."""

    @abstractmethod
    def _drop_link(self) -> list[Command]:
        """Close the link without a word (idempotent) and return the commands handed to it that are
        not in ``_inflight`` yet: a write that failed may have delivered them, so they are in doubt
        like those in flight."""

    @abstractmethod
    def _link_broken(self, reason: str) -> None:
        """The peer ended the session (BYE, NOT_HELLO): give up this link and reconnect."""
