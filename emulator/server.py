"""The emulator as a ZeroMQ server: a ROUTER data plane carrying frames, a ROUTER control plane carrying JSON.

Threads and sockets: every ZeroMQ socket lives on the thread that runs :meth:`EmulatorServer.serve`
(sockets are not thread-safe).  The emulator runs on a ``WallClock`` whose pump thread completes requests
and fires AQIC notifications; those only *queue* INTERRUPT frames and poke a wake-up socketpair that the
serving thread polls next to the data and control sockets, so the pump thread never touches a ZeroMQ
socket.  Signal handlers (SIGTERM/SIGINT in the CLI) use the same wake-up.

Data plane: one ROUTER socket (``ROUTER_MANDATORY``, ``linger=0``), one :class:`FrameSession` per client
routing id. Each ZeroMQ message from a client is ``[frame]`` (the ROUTER prepends the routing id); each
reply is one frame. A session that agreed protocol version 2 (read-ahead) may batch: a message of up to
:data:`~apformats.frames.BATCH_FRAMES_MAX` parts, one frame each, both ways (every frame a batch answers,
and the interrupts waiting, leave as one message per client). Clients are DEALERs: no REQ sockets, so no
EFSM after a timeout. Every session of the server shares one :class:`~emulator.frame_server.Tenancy`: an
APQN is driven by one session at a time, and a session whose connection drops keeps its APQNs and replies
for ``session_grace`` seconds, for its client to resume (under CURVE, only from the same client key, which
ZeroMQ's ZAP handler reports as the message's ``User-Id``).

Control plane: a second ROUTER socket.  A request is one JSON object ``{"op": NAME, "args": {...}, "id": X,
"token": T}`` (``id`` optional, echoed); the answer is ``{"id": X, "ok": true, "result": ...}`` or ``{"id": X,
"ok": false, "error": TEXT, "type": EXCEPTION_NAME}``.  ``CONTROL_OPS`` lists every op; :class:`emulator.
control_client.ControlClient` mirrors them.  The control plane has its own credential, required for every
op (``shutdown`` and the reads included): with CURVE, a key on its own allow-list (``CURVE_DIR/control``;
the ZAP domain ``control``, while data-plane keys are in the domain ``data``); without CURVE, the token the
server writes to an owner-only file at start (:mod:`emulator.control_client` says where and how clients
find it).  Every argument is checked (type, finite, in its documented range, see :mod:`emulator.faults`);
JSON's ``NaN``/``Infinity`` are refused at the door.  The execution log is read in pages (``cursor``,
``limit``), so a read never serialises the whole log on the serving thread.

Exposure and resources: both planes refuse a non-loopback address unless ``insecure=True`` (then a
warning is logged on every start); a handshake not completed within ``handshake_ivl`` seconds is dropped
(ZeroMQ's default is 30 s, long enough for 1,100 idle connections to exhaust the descriptors); at most
``max_sessions`` clients hold a session, a further one is refused with ``SHUTTING_DOWN`` ("server full").

Transport faults (``emu.control.transport_faults``, armed through the control plane or in process) apply
to the frames that answer commands (RESULT, ERROR) and to INTERRUPT frames, in the server-to-client
direction: a dropped frame is a command executed whose answer never arrives (the interesting case for the
driver's ledger); a corrupted frame has one body byte flipped (the client's CRC check catches it).
Handshake and heartbeat frames are exempt, so a fault hits the conversation under test deterministically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hmac
import ipaddress
import json
import logging
import operator
import os
import queue
import random
import secrets
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, cast

import orjson
import zmq
from zmq.utils.monitor import recv_monitor_message

from apformats.frames import (
    BATCH_FRAMES_MAX,
    DEFAULT_MAX_FRAME,
    HEADER_LEN,
    READAHEAD_VERSION,
    TRAILER_LEN,
    ErrorCode,
    FrameKind,
    encode_bye,
    encode_error,
    encode_ping,
    peek_kind,
)
from emulator import faults as fault_types
from emulator.control_client import token_file_for, write_token_file
from emulator.execution_log import FIELDS, MAX_PAGE, Execution
from emulator.faults import check_int
from emulator.frame_server import DEFAULT_GRACE, FrameSession, Tenancy

__all__ = [
    "CONTROL_OPS",
    "EmulatorServer",
    "Waker",
    "check_endpoint",
    "jsonable",
    "normalize_bind",
    "raise_nofile_limit",
]

log = logging.getLogger(__name__)

#: Frames a transport fault may hit (the conversation under test, not its handshake or heartbeat).
FAULTABLE: frozenset[int] = frozenset({FrameKind.RESULT, FrameKind.ERROR, FrameKind.INTERRUPT})

#: Fault classes the ``inject`` op can build by name (every concrete fault in ``emulator.faults``).
FAULT_TYPES: dict[str, type] = {
    name: obj
    for name in fault_types.__all__
    if isinstance(obj := getattr(fault_types, name), type)
    and issubclass(obj, fault_types.Fault)
    and obj is not fault_types.Fault
}

#: A session silent this long gets a PING from the server (a live client pings every 0.5 s or less).
#: Sending to a connection that is gone fails at once (ROUTER_MANDATORY), so a client that died
#: without a BYE is detached -- its grace starts -- within seconds, not after ``session_idle``.
PROBE_SILENT = 3.0

#: The flags of a multipart send, as plain ints: ``send_multipart`` combines pyzmq's enum flags
#: per part (``Flag.__or__``, a few microseconds each), which a server answering every request pays.
_MORE = int(zmq.SNDMORE | zmq.NOBLOCK)
_LAST = int(zmq.NOBLOCK)


def _send_parts(sock: zmq.Socket, parts: Iterable[bytes]) -> None:
    """``sock.send_multipart(parts, NOBLOCK)`` without its per-part checks and flag arithmetic: the
    same sends, each part but the last with SNDMORE (ZeroMQ delivers the message whole or not at
    all; a refusal -- EAGAIN, EHOSTUNREACH -- comes at the first part, as with ``send_multipart``)."""
    send = sock.send
    last: bytes | None = None
    for part in parts:
        if last is not None:
            send(last, _MORE)
        last = part
    if last is not None:
        send(last, _LAST)


#: Most data messages handled per poll round before control and interrupts get a turn.
BATCH = 256
RUN_DUE_EVERY = 4  # frames of a client's batch between two looks at the clock (see _recv_data)
#: Answers of a round that leave after the message that made them this many, without waiting for the
#: round's end: a client sending its work in several messages gets the first answers while the server
#: works on the rest (see _recv_data).
ANSWER_AT = 64
#: Default cap on concurrent client sessions, and default ZMTP handshake timeout in seconds.
MAX_SESSIONS = 256

#: A session whose connection closed is let go (detached) this long after: what the client sent
#: before it closed (its BYE) is read by then.
GONE_AFTER = 1.0

#: Messages ZeroMQ holds per peer for the serving thread (the rest wait in the client and in TCP).
RCVHWM = 64
HANDSHAKE_IVL = 2.0
#: Entries per execution-log page when the op is not told (``limit``).
DEFAULT_PAGE = 1000


class Waker:
    """A socketpair another thread (or a signal handler) writes one byte to, to end a blocking poll."""

    def __init__(self) -> None:
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)

    def fileno(self) -> int:
        return self._r.fileno()

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):  # full means a wake is already pending
            self._w.send(b"\0")

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while self._r.recv(4096):
                pass

    def close(self) -> None:
        self._r.close()
        self._w.close()


def normalize_bind(url: str) -> str:
    """``tcp://HOST:0`` means any free port, which ZeroMQ spells ``*``."""
    if url.startswith("tcp://") and url.endswith(":0"):
        return url[:-2] + ":*"
    return url


def check_endpoint(url: str, *, insecure: bool = False) -> bool:
    """Refuse an endpoint we cannot or should not bind: ``ValueError`` saying why.

    ``tcp://HOST:PORT`` (port a number or ``*``) and ``ipc://PATH`` are accepted.  A tcp host must be a
    loopback address (``127.0.0.0/8``, ``::1``, ``localhost``) unless ``insecure``; returns True when the
    endpoint is exposed beyond this machine (the caller warns).
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("tcp", "ipc"):
        raise ValueError(f"endpoint {url!r} is not tcp://HOST:PORT or ipc://PATH")
    if scheme == "ipc":
        if not rest:
            raise ValueError(f"endpoint {url!r} has no path")
        return False
    host, colon, port = rest.rpartition(":")
    if not colon or not host or not (port == "*" or (port.isdigit() and int(port) <= 65535)):
        raise ValueError(f"endpoint {url!r} is not tcp://HOST:PORT (port a number, 0 or *)")
    name = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        loopback = name == "localhost" or ipaddress.ip_address(name).is_loopback
    except ValueError:  # an interface name, '*', or a host name we will not resolve to decide
        loopback = False
    if loopback:
        return False
    if not insecure:
        raise ValueError(
            f"refusing to bind {url}: {host} is not a loopback address (the emulator has no business on "
            "a network; pass --insecure to bind it anyway)"
        )
    return True


def raise_nofile_limit() -> tuple[int, int]:
    """Raise this process's soft descriptor limit to its hard limit (idle connections cost one each);
    returns the ``(soft, hard)`` limits now in force."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and (hard == resource.RLIM_INFINITY or soft < hard):
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft, hard


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number this control plane accepts (arguments must be finite)")


_execution_row = operator.attrgetter(*FIELDS)


def _executions(entries: list[Execution]) -> list[dict[str, Any]]:
    """Execution records as JSON objects, fast (a page is serialised on the serving thread): every
    field is already plain JSON data, so no generic walk is needed.  Same shape as :func:`jsonable`."""
    return [{"type": "Execution", **dict(zip(FIELDS, _execution_row(e), strict=True))} for e in entries]


def _dumps(answer: dict[str, Any]) -> bytes:
    """Encode a control answer.  orjson: a log page's thousands of floats cost the serving thread a
    tenth of what the standard library's encoder takes.  Anything orjson refuses (an int beyond 64
    bits, a non-str key) falls back to the standard encoder; a non-finite float, which JSON cannot
    spell, becomes null (answers carry none: arguments are finite and so are the clocks)."""
    try:
        return orjson.dumps(answer)
    except TypeError:
        return json.dumps(answer).encode()


class PlainJson(dict[str, Any]):
    """An answer that is plain JSON data already (a log page): :func:`jsonable` passes it through."""


def jsonable(obj: Any) -> Any:
    """Plain JSON data for control-plane answers: dataclasses (with their type), enums, bytes, paths."""
    if obj is None or isinstance(obj, bool | int | float | str | PlainJson):
        return obj
    if isinstance(obj, list) and obj and all(type(x) is Execution for x in obj):
        return _executions(obj)
    if isinstance(obj, enum.Enum):
        return obj.name
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        d = {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        return {"type": type(obj).__name__, **d}
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [jsonable(v) for v in obj]
    if isinstance(obj, bytes | bytearray):
        return obj.hex()
    if isinstance(obj, Path):
        return str(obj)
    return repr(obj)


class _Peer:
    """A client connection: its routing id, the TCP connection it came on (``fd``, and under CURVE
    its ``key``: a routing id is only a name a client may choose, so a message under it from another
    connection or key is not this peer's), and its session."""

    __slots__ = ("closed_at", "fd", "gone", "ident", "key", "last_seen", "probed", "session", "since")

    def __init__(self, ident: bytes, session: FrameSession, fd: int = -1, key: str | None = None) -> None:
        self.ident = ident
        self.session = session
        self.fd = fd
        self.key = key
        self.last_seen = self.since = time.monotonic()
        self.probed = 0.0  # when the server last sent it a PING (see _gc)
        #: its connection closed (DISCONNECTED): the descriptor's accept count then, and when
        self.gone: int | None = None
        self.closed_at = 0.0


class EmulatorServer:
    """Serve ``emulator`` over ZeroMQ.  Use: ``start()`` (binds), then ``serve()`` on the same thread.

    ``domains`` limits what any client may ask for (None: all).  ``curve_dir`` enables CURVE: it holds
    ``server.key_secret`` (``zmq.auth`` certificate) and ``clients/*.key``, the allow-list of client public
    keys; an unknown client key fails the handshake; ``control/*.key`` is the control plane's separate
    allow-list.  Without CURVE the control plane requires the token written at :meth:`start` to
    ``control_token_file`` (default: :func:`~emulator.control_client.token_file_for` the bound control
    URL), mode 0600, removed again by :meth:`close`.  Sessions silent for ``session_idle`` seconds (a live
    client pings well within that) are dropped so a vanished client's state does not accumulate.
    ``session_grace``: how long a dropped session's APQNs wait for its client; ``apqn_matrix`` (CURVE
    only): client key -> the APQNs it may ever be assigned (:func:`emulator.frame_server.load_apqn_matrix`);
    ``default_grant``: what a HELLO without domains gets (``domain``: one free domain on every card;
    ``all``: every free APQN).
    """

    def __init__(
        self,
        emulator: Any,
        *,
        bind: str = "tcp://127.0.0.1:5555",
        control: str = "tcp://127.0.0.1:5556",
        curve_dir: str | Path | None = None,
        domains: Iterable[int] | None = None,
        max_frame: int = DEFAULT_MAX_FRAME,
        seed: int = 0,
        session_idle: float = 60.0,
        session_grace: float = DEFAULT_GRACE,
        apqn_matrix: Mapping[str, Iterable[int]] | None = None,
        default_grant: str = "domain",
        insecure: bool = False,
        control_token_file: str | Path | None = None,
        max_sessions: int = MAX_SESSIONS,
        handshake_ivl: float = HANDSHAKE_IVL,
    ) -> None:
        if apqn_matrix is not None and curve_dir is None:
            raise ValueError("an APQN matrix maps CURVE client keys: it needs CURVE (curve_dir)")
        self.emu = emulator
        self.bind_url = normalize_bind(bind)
        self.control_bind_url = normalize_bind(control)
        self.insecure = insecure
        self.control_token_file = None if control_token_file is None else Path(control_token_file)
        self.control_token_path: Path | None = None
        self._token: bytes | None = None
        self.max_sessions = check_int("max_sessions", max_sessions, 1, 1_000_000)
        if not 0.05 <= handshake_ivl <= 60.0:
            raise ValueError(f"handshake_ivl must be in [0.05, 60] s, got {handshake_ivl!r}")
        self.handshake_ivl = handshake_ivl
        self.curve_dir = None if curve_dir is None else Path(curve_dir)
        self.domains = None if domains is None else frozenset(domains)
        self.max_frame = max_frame
        self.session_idle = session_idle
        self.stats: Counter[str] = Counter()
        self.data_url = ""
        self.control_url = ""
        self._rng = random.Random(f"apcrypto-emulator-server:{seed}")
        self.tenancy = Tenancy(
            emulator, self.domains, grace=session_grace, matrix=apqn_matrix, default_grant=default_grant
        )
        self._peers: dict[bytes, _Peer] = {}
        self._irqs: queue.SimpleQueue[tuple[bytes, bytes]] = queue.SimpleQueue()
        self._irq_nudged = False  # the waker was written for an interrupt and the loop has not looked
        self._serving: int | None = None  # the serving thread's ident (its interrupts need no wake)
        self._waker = Waker()
        self._stopping = False
        self._ctx: zmq.Context | None = None
        self._data: zmq.Socket | None = None
        self._ctrl: zmq.Socket | None = None
        self._mon: zmq.Socket | None = None  # the data socket's connection events (see _monitor)
        self._accepts: dict[int, int] = {}  # descriptor -> connections accepted on it so far
        self._auth: Any = None
        self._ops: dict[str, Callable[..., Any]] = {
            name: getattr(self, f"_op_{name}") for name in CONTROL_OPS
        }
        self._armed: list[Any] = []  # faults armed through this control plane, for the ``state`` op
        self._server_full = encode_error(
            0, ErrorCode.SHUTTING_DOWN, f"server full: {self.max_sessions} sessions; try again later"
        )

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> tuple[str, str]:
        """Check the endpoints, create and bind the sockets, write the control token; return the bound
        ``(data_url, control_url)``.  Any failure leaves nothing open and raises at once (``ValueError``
        for an endpoint we refuse, ``OSError`` for one the system refuses, e.g. a port in use)."""
        exposed = [
            url
            for url in (self.bind_url, self.control_bind_url)
            if check_endpoint(url, insecure=self.insecure)
        ]
        for url in exposed:
            log.warning("INSECURE: %s is reachable beyond this machine (--insecure)", url)
        self._ctx = zmq.Context()
        try:
            self._data = self._router(self.bind_url, "data")
            self._ctrl = self._router(self.control_bind_url, "control")
            self._mon = self._monitor(self._data)
            self.data_url = self._data.getsockopt_string(zmq.LAST_ENDPOINT)
            self.control_url = self._ctrl.getsockopt_string(zmq.LAST_ENDPOINT)
            if self.curve_dir is None:
                self._token = secrets.token_urlsafe(32).encode()
                path = self.control_token_file or token_file_for(self.control_url)
                self.control_token_path = write_token_file(path, self.control_url, self._token.decode())
        except BaseException:
            self.close()
            raise
        log.info("serving data=%s control=%s curve=%s", self.data_url, self.control_url, bool(self.curve_dir))
        return self.data_url, self.control_url

    def _router(self, url: str, domain: str) -> zmq.Socket:
        assert self._ctx is not None
        sock = self._ctx.socket(zmq.ROUTER)
        try:
            sock.linger = 0
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            # ZeroMQ drops a peer sending a part over 4 frames' worth (a part a little too big gets
            # the TOO_BIG error instead); what it holds per peer waiting for us is RCVHWM messages
            # (the client's send queue and TCP hold the rest).  A message's parts are not bounded
            # by ZeroMQ: one over a batch is refused whole once read (see _recv_data)
            sock.setsockopt(zmq.MAXMSGSIZE, 4 * self.max_frame)
            sock.setsockopt(zmq.RCVHWM, RCVHWM)
            sock.setsockopt(zmq.HANDSHAKE_IVL, int(self.handshake_ivl * 1000))
            if self.curve_dir is not None:
                self._setup_curve(sock, domain)
            try:
                sock.bind(url)
            except zmq.ZMQError as exc:
                err = OSError(f"cannot bind {url}: {os.strerror(exc.errno) if exc.errno else exc}")
                err.errno = exc.errno
                raise err from None
        except BaseException:
            sock.close(linger=0)  # an unclosed socket would hang Context.term() forever
            raise
        return sock

    def _monitor(self, sock: zmq.Socket) -> zmq.Socket:
        """A PAIR receiving the data socket's ACCEPTED and DISCONNECTED events (value: the
        connection's file descriptor), read after every message received and before it is handled.

        Why: a routing id is a name the client may choose, and the session is found by it.  A
        message is the peer's only if it came on the peer's connection: the same descriptor
        (``SRCFD``), and under CURVE the same key.  A descriptor is reused by a later connection, so
        when the peer's connection closes (DISCONNECTED) the server notes how many connections that
        descriptor had accepted; a message under the peer's routing id is still the peer's (one it
        sent before it closed, its BYE) only while no new connection was accepted on it since.
        ZeroMQ writes an event before any message of the connection it announces, and a connection
        that reuses a routing id gets its messages through only after the old connection's were
        read, so the test cannot be fooled by ordering.  Anything else is another client's first
        message: it gets a new session, and the old one is let go (detached: its APQNs wait the
        grace for the rightful client to resume with its token)."""
        assert self._ctx is not None
        addr = f"inproc://apcrypto-server-monitor-{id(self):x}"
        sock.monitor(addr, zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)  # libzmq binds, we connect
        mon = self._ctx.socket(zmq.PAIR)
        mon.linger = 0
        mon.setsockopt(zmq.RCVHWM, 0)  # no event is dropped for want of room
        mon.connect(addr)
        return mon

    def _read_monitor(self) -> None:
        """Take the connection events that came (see :meth:`_monitor`)."""
        mon = self._mon
        while mon is not None and cast(int, mon.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            try:
                event = recv_monitor_message(mon, zmq.NOBLOCK)
            except zmq.Again:
                return
            fd = int(event["value"])
            if event["event"] == zmq.EVENT_ACCEPTED:
                self._accepts[fd] = self._accepts.get(fd, 0) + 1
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                now = time.monotonic()
                for p in self._peers.values():
                    if p.fd == fd and p.gone is None:
                        p.gone, p.closed_at = self._accepts.get(fd, 0), now
                        self.stats["connections_closed"] += 1

    def _is_peers(self, peer: _Peer, fd: int, key: str | None) -> bool:
        """Whether a message that came on descriptor ``fd`` (with CURVE ``key``) under ``peer``'s
        routing id is the peer's own (see :meth:`_monitor`)."""
        if peer.fd != fd or peer.key != key:
            return False
        return peer.gone is None or self._accepts.get(fd, 0) == peer.gone

    def _setup_curve(self, sock: zmq.Socket, domain: str) -> None:
        import zmq.auth
        from zmq.auth.thread import ThreadAuthenticator

        assert self.curve_dir is not None and self._ctx is not None
        if not zmq.has("curve"):
            raise RuntimeError("this libzmq has no CURVE support")
        if self._auth is None:
            lists = {"data": self.curve_dir / "clients", "control": self.curve_dir / "control"}
            for name, where in lists.items():
                if not where.is_dir():
                    raise FileNotFoundError(f"CURVE {name} allow-list directory {where} is missing (keygen)")
            self._auth = ThreadAuthenticator(self._ctx)
            self._auth.start()
            for name, where in lists.items():  # separate ZAP domains: a data key cannot open the control door
                self._auth.configure_curve(domain=name, location=str(where))
        public, secret = zmq.auth.load_certificate(self.curve_dir / "server.key_secret")
        if secret is None:
            raise ValueError(f"{self.curve_dir / 'server.key_secret'} holds no secret key")
        sock.zap_domain = domain.encode()
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_server = True

    def stop(self) -> None:
        """Ask :meth:`serve` to return (thread-safe and safe in a signal handler)."""
        self._stopping = True
        self._waker.wake()

    def close(self) -> None:
        """Close sockets, the authenticator and the context, remove the token file (idempotent).  The
        emulator is the caller's."""
        self._remove_token_file()
        if self._mon is not None:
            if self._data is not None:
                with contextlib.suppress(zmq.ZMQError):
                    self._data.disable_monitor()
            self._mon.close(linger=0)
            self._mon = None
        for sock in (self._data, self._ctrl):
            if sock is not None:
                sock.close(linger=0)
        self._data = self._ctrl = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        self._waker.close()

    def _remove_token_file(self) -> None:
        """Remove our token file, unless another server has since written its own there."""
        path, token = self.control_token_path, self._token
        self.control_token_path = None
        if path is None or token is None:
            return
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text()).get("token") == token.decode():
                path.unlink()

    # -- the loop ----------------------------------------------------------------------------------
    def serve(self) -> None:
        """Serve until :meth:`stop` (or the control op ``shutdown``); then say BYE to every client."""
        assert self._data is not None and self._ctrl is not None, "start() first"
        poller = zmq.Poller()
        poller.register(self._data, zmq.POLLIN)
        poller.register(self._ctrl, zmq.POLLIN)
        poller.register(self._waker, zmq.POLLIN)
        if self._mon is not None:
            poller.register(self._mon, zmq.POLLIN)
        self._serving = threading.get_ident()
        next_gc = time.monotonic() + 1.0
        while not self._stopping:
            ready = dict(poller.poll(500))
            if self._waker.fileno() in ready:
                self._waker.drain()
            self._irq_nudged = False  # after the drain: a later interrupt nudges again
            if self._mon is not None and self._mon in ready:
                self._read_monitor()
            self._serve_data(self._data in ready)
            if self._ctrl in ready:
                self._serve_control()
            if self.emu.control.transport_faults.take_disconnect():
                self._disconnect(None, "disconnected by a transport fault")
            now = time.monotonic()
            if now >= next_gc:
                next_gc = now + 1.0
                self._gc(now)
        self._disconnect(None, "server shutting down")

    def _serve_data(self, readable: bool) -> None:
        """Handle a batch of data messages, then send what the batch answers together with the
        interrupts that are waiting, one message per client where its session allows.

        The emulator's clock is *assisted* meanwhile (a ``WallClock``'s :meth:`~emulator.clock.
        WallClock.assisting`): what the batch makes due at once -- a reply ready when its NQAP returns,
        and the interrupt saying so -- runs here at the end of the batch instead of waking the clock's
        thread, so it leaves with the answers.  The answers go out after the execution log's spill (if
        any) has committed, so nothing a client is told is missing from the file after a SIGKILL."""
        out: list[tuple[bytes, bytes]] = []
        try:
            if readable:
                assist = getattr(self.emu.clock, "assisting", None)
                with assist() if assist is not None else contextlib.nullcontext():
                    self._recv_data(out)
        finally:
            self._answer(out)

    def _answer(self, out: list[tuple[bytes, bytes]]) -> None:
        """Send ``out`` with the interrupts waiting (after the execution log's spill has committed)
        and empty it."""
        self._take_interrupts(out)
        if out:
            self._sync_log()
            self._send_batch(out)
            out.clear()

    def _sync_log(self) -> None:
        try:
            self.emu.execution_log.flush()
        except Exception:  # a full disk loses the spill's freshness, never the data plane
            log.exception("execution-log spill commit failed")

    def _recv_data(self, out: list[tuple[bytes, bytes]]) -> None:
        assert self._data is not None
        # inside the clock's assisting context the pump stands down: engines that finish during a
        # long batch are finished here (after every message, and every RUN_DUE_EVERY frames of a
        # client's batch), not only at its end.  When that raises an interrupt (replies wait that
        # no answer carries), what is answered so far goes out at once with it: the client collects
        # those replies and refills the slots while we work on the rest.  Otherwise the answers of
        # the round leave together (fewer messages: less work per request on both sides).
        run_due = getattr(self.emu.clock, "run_due", None)
        curve = self.curve_dir is not None
        for _ in range(BATCH):
            try:
                msg = self._data.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            # a connection that closed before this message came: its sessions go first (_monitor)
            self._read_monitor()
            last = msg[-1]
            fd = last.get(zmq.SRCFD)
            key = self._user_id(last) if curve else None  # the ZAP handler's verdict: the CURVE key
            parts = [f.bytes for f in msg]
            self.stats["frames_in"] += 1
            ident = parts[0]
            peer = self._peers.get(ident)
            if peer is not None and not self._is_peers(peer, fd, key):
                # the routing id of a connection that is gone, on another one (or another key):
                # a new client, never the old one's session (which waits its grace for a resume)
                self.stats["routing_ids_reused"] += 1
                self._drop_peer(ident)
                peer = None
            if peer is None:
                if len(self._peers) >= self.max_sessions and not self._evict_unhandshaken():
                    self.stats["sessions_refused"] += 1
                    out.append((ident, self._server_full))
                    continue
                peer = self._peers[ident] = _Peer(ident, self._new_session(ident, key), fd, key)
                self.stats["sessions_opened"] += 1
            peer.last_seen = time.monotonic()
            session = peer.session
            if len(parts) == 2:
                out.extend((ident, frame) for frame in session.handle(parts[1]))
            elif 2 < len(parts) <= BATCH_FRAMES_MAX + 1 and session.version >= READAHEAD_VERSION:
                # a version 2 client's batch: one frame per part, handled in order, while the
                # session lives (an answer sent mid-batch may find the connection gone: _drop_peer)
                self.stats["batches_in"] += 1
                for i, payload in enumerate(parts[1:], 1):
                    if session.closed:
                        break
                    out.extend((ident, frame) for frame in session.handle(payload))
                    if run_due is not None and not i % RUN_DUE_EVERY:
                        run_due()
                        if not self._irqs.empty():  # replies wait: answer now (see above)
                            self._answer(out)
            else:  # any other multipart message is refused as a whole, and says why
                self.stats["batches_refused"] += 1
                why = (
                    f"a message of {len(parts) - 1} frames: a batch holds at most {BATCH_FRAMES_MAX}"
                    if session.version >= READAHEAD_VERSION
                    else f"a message of {len(parts) - 1} frames: version {session.version or 1} takes one"
                )
                out.append((ident, encode_error(0, ErrorCode.MALFORMED, why)))
            if peer.session.closed:
                self._drop_peer(ident)
            self._drop_evicted()
            if run_due is not None:
                run_due()
            if len(out) >= ANSWER_AT or not self._irqs.empty():
                self._answer(out)

    @staticmethod
    def _user_id(frame: zmq.Frame) -> str | None:
        try:
            user = frame.get("User-Id")
        except zmq.ZMQError:
            return None
        return user if isinstance(user, str) else None

    def _drop_evicted(self) -> None:
        """Connections whose session was just resumed elsewhere: BYE, and forget them (the lease
        lives on with the new connection)."""
        evicted = self.tenancy.take_evicted()
        if not evicted:
            return
        gone = {id(s) for s in evicted}
        for ident, peer in list(self._peers.items()):
            if id(peer.session) in gone:
                bye = encode_bye("session resumed on another connection")
                if self._data is not None:
                    with contextlib.suppress(zmq.ZMQError):
                        self._data.send_multipart([ident, bye], zmq.NOBLOCK)
                self._drop_peer(ident)

    def _new_session(self, ident: bytes, key: str | None = None) -> FrameSession:
        def notify(frame: bytes, ident: bytes = ident) -> None:  # clock context: queue, maybe wake
            self._irqs.put((ident, frame))
            # the serving thread takes the queue after every batch; another thread (the clock's
            # pump) wakes it, once until it next looks
            if not self._irq_nudged and threading.get_ident() != self._serving:
                self._irq_nudged = True
                self._waker.wake()

        return FrameSession(
            self.emu,
            notify=notify,
            max_frame=self.max_frame,
            name=ident.hex(),
            tenancy=self.tenancy,
            key=key,
        )

    def _take_interrupts(self, out: list[tuple[bytes, bytes]]) -> None:
        """Add the INTERRUPT frames waiting for live sessions to ``out``."""
        while True:
            try:
                ident, frame = self._irqs.get_nowait()
            except queue.Empty:
                return
            peer = self._peers.get(ident)
            if peer is not None and peer.session.established:
                out.append((ident, frame))

    def _send_batch(self, out: list[tuple[bytes, bytes]]) -> None:
        """Send a batch of frames, in order per client.  A client whose session speaks version 2 or
        later gets its frames as one message of several parts (one frame each): one send instead of
        one per frame, and a RESULT arrives with the read-ahead replies behind it, never apart from
        them.  Version 1 clients take one frame per message."""
        pending = self.emu.control.transport_faults.pending()
        faulty = bool(pending["drop"] or pending["corrupt"])  # looked up once a batch, not a frame
        if len(out) == 1:
            self._send(*out[0], faulty=faulty)
            return
        per_peer: dict[bytes, list[bytes]] = {}
        for ident, frame in out:
            frames = per_peer.get(ident)
            if frames is None:
                per_peer[ident] = [frame]
            else:
                frames.append(frame)
        for ident, frames in per_peer.items():
            peer = self._peers.get(ident)
            if len(frames) > 1 and peer is not None and peer.session.version >= READAHEAD_VERSION:
                for i in range(0, len(frames), BATCH_FRAMES_MAX):
                    self._send(ident, *frames[i : i + BATCH_FRAMES_MAX], faulty=faulty)
            else:
                for frame in frames:
                    self._send(ident, frame, faulty=faulty)

    def _send(self, ident: bytes, *frames: bytes, faulty: bool = True) -> None:
        """Send ``frames`` to ``ident`` as one message (one part each), transport faults applied
        (``faulty=False``: the caller knows none is armed)."""
        assert self._data is not None
        if faulty:
            frames = tuple(self._faulted(frames))
            if not frames:
                return
        try:
            _send_parts(self._data, (ident, *frames))
            self.stats["frames_out"] += len(frames)
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:  # the client is gone: forget its session
                self.stats["unroutable"] += 1
                self._drop_peer(ident)
            elif exc.errno == zmq.EAGAIN:  # the client does not read: its problem, not the server's
                self.stats["hwm_dropped"] += 1
            else:
                raise

    def _faulted(self, frames: Iterable[bytes]) -> Iterable[bytes]:
        faults = self.emu.control.transport_faults
        for frame in frames:
            if peek_kind(frame) in FAULTABLE:
                if faults.take_drop():
                    self.stats["fault_dropped"] += 1
                    continue
                if faults.take_corrupt():
                    self.stats["fault_corrupted"] += 1
                    frame = self._corrupt(frame)
            yield frame

    def _corrupt(self, frame: bytes) -> bytes:
        buf = bytearray(frame)
        lo, hi = HEADER_LEN, len(buf) - TRAILER_LEN
        i = self._rng.randrange(lo, hi) if hi > lo else self._rng.randrange(len(buf))
        buf[i] ^= self._rng.randrange(1, 256)
        return bytes(buf)

    def _drop_peer(self, ident: bytes) -> None:
        peer = self._peers.pop(ident, None)
        if peer is not None:
            peer.session.close()
            self.stats["sessions_closed"] += 1

    def _disconnect(self, client: str | None, reason: str) -> int:
        """Say BYE to one client (routing id in hex) or all, and forget their sessions."""
        idents = list(self._peers) if client is None else [bytes.fromhex(client)]
        count = 0
        for ident in idents:
            if ident not in self._peers:
                continue
            if self._peers[ident].session.established and self._data is not None:
                with contextlib.suppress(zmq.ZMQError):
                    self._data.send_multipart([ident, encode_bye(reason)], zmq.NOBLOCK)
            self._drop_peer(ident)
            count += 1
        return count

    def _evict_unhandshaken(self) -> bool:
        """At the session cap, make room for a newcomer by forgetting the oldest connection that never
        completed a HELLO (it holds no APQN; if it is alive, its next HELLO starts afresh).  False if
        every session is established: the newcomer is refused."""
        waiting = [p for p in self._peers.values() if not p.session.established]
        if not waiting:
            return False
        oldest = min(waiting, key=lambda p: p.since)
        self.stats["unhandshaken_evicted"] += 1
        self._drop_peer(oldest.ident)
        return True

    def _gc(self, now: float) -> None:
        self._read_monitor()
        for ident, peer in list(self._peers.items()):
            if peer.gone is not None and now - peer.closed_at > GONE_AFTER:
                self._drop_peer(ident)  # its connection closed and what it sent before is read
            elif now - peer.last_seen > self.session_idle:
                log.info("dropping idle session %s", ident.hex())
                self._drop_peer(ident)
            elif not peer.session.established and now - peer.since > self.handshake_ivl:
                self.stats["unhandshaken_dropped"] += 1  # no HELLO within the handshake interval
                self._drop_peer(ident)
            elif (
                peer.session.established
                and now - peer.last_seen > PROBE_SILENT
                and now - peer.probed > PROBE_SILENT
            ):
                peer.probed = now
                self.stats["probes"] += 1
                self._send(ident, encode_ping(0))  # a connection that is gone: dropped (detached) here
        for lease in self.tenancy.expire():
            self.stats["sessions_expired"] += 1
            log.info("session grace over: APQNs %s zeroized and free", sorted(lease.qids))

    # -- control plane -----------------------------------------------------------------------------
    def _serve_control(self) -> None:
        assert self._ctrl is not None
        for _ in range(BATCH):
            try:
                parts = self._ctrl.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            # [id, request] from a DEALER, [id, b"", request] from a REQ: anything else is refused
            # without echoing what came (an envelope of many parts would be sent back whole)
            if len(parts) == 2 or (len(parts) == 3 and parts[1] == b""):
                envelope, answer = parts[:-1], self._control(parts[-1])
            else:
                self.stats["control_malformed"] += 1
                envelope = parts[:1]
                answer = {"ok": False, "error": "a control request is one frame", "type": "ValueError"}
            with contextlib.suppress(zmq.ZMQError):  # a control client that left gets no answer
                self._ctrl.send_multipart([*envelope, _dumps(answer)], zmq.NOBLOCK)

    def _control(self, payload: bytes) -> dict[str, Any]:
        req_id = None
        try:
            req = json.loads(payload, parse_constant=_refuse_constant)
            if not isinstance(req, dict) or not isinstance(req.get("op"), str):
                raise ValueError('a control request is {"op": NAME, "args": {...}, "token": T}')
            req_id = req.get("id")
            if not isinstance(req_id, int | str | None):
                req_id = None
            self._authorise(req.get("token"))
            args = req.get("args") or {}
            if not isinstance(args, dict):
                raise ValueError("args must be an object")
            op = self._ops.get(req["op"])
            if op is None:
                raise KeyError(f"unknown op {req['op']!r}; known: {sorted(self._ops)}")
            self.stats["control_ops"] += 1
            result = op(**args)
            if type(result) in FAULT_TYPES.values():
                self._armed.append(result)
            return {"id": req_id, "ok": True, "result": jsonable(result)}
        except Exception as exc:  # every failure is an answer, never a dead server
            log.info("control request failed: %s", exc)
            return {"id": req_id, "ok": False, "error": str(exc), "type": type(exc).__name__}

    def _authorise(self, token: object) -> None:
        """Without CURVE, the token is the credential (CURVE's own allow-list already vetted the peer)."""
        if self._token is None:
            return
        if not isinstance(token, str) or not hmac.compare_digest(token.encode(), self._token):
            self.stats["control_refused"] += 1
            raise PermissionError(
                "the control plane needs its credential: the token from the file this server wrote at "
                "start (its log and READY line name it; ControlClient and 'apcrypto-emulator control' "
                "find it by themselves)"
            )

    # card and queue faults: straight to emu.control
    def _op_machine_failure(self, card: int, recovery_time: float | None = None, **trigger: Any) -> Any:
        return self.emu.control.machine_failure(card, recovery_time, **trigger)

    def _op_checkstop(self, card: int, **trigger: Any) -> Any:
        return self.emu.control.checkstop(card, **trigger)

    def _op_deconfigure(self, card: int, **trigger: Any) -> Any:
        return self.emu.control.deconfigure(card, **trigger)

    def _op_restore(self, card: int) -> Any:
        return self.emu.control.restore(check_int("card", card, 0, 255))

    def _op_reset_in_progress(self, qid: int, duration: float, **trigger: Any) -> Any:
        return self.emu.control.reset_in_progress(qid, duration, **trigger)

    def _op_busy(self, qid: int, duration: float, **trigger: Any) -> Any:
        return self.emu.control.busy(qid, duration, **trigger)

    def _op_fail_request(
        self, reply_code: int, qid: int | None = None, nth: int | None = None, **kw: Any
    ) -> Any:
        return self.emu.control.fail_request(reply_code, qid, nth, **kw)

    def _op_slow_engines(
        self, card: int, factor: float, duration: float | None = None, **trigger: Any
    ) -> Any:
        return self.emu.control.slow_engines(card, factor, duration, **trigger)

    def _op_clear(self) -> None:
        self.emu.control.clear()

    def _op_faults(self) -> Any:
        return self.emu.control.faults()

    def _op_inject(self, type: str, **fields: Any) -> Any:
        """Arm any fault by class name and fields, e.g. ``{"type": "Busy", "qid": 1, "duration": 2}``."""
        cls = FAULT_TYPES.get(type)
        if cls is None:
            raise KeyError(f"unknown fault type {type!r}; known: {sorted(FAULT_TYPES)}")
        return self.emu.control.inject(cls(**fields))

    def _op_state(self, type: str, **fields: Any) -> str:
        """``pending`` / ``active`` / ``done`` of a fault armed here, given as an arm op returned it."""
        want = {"type": type, **fields}
        for fault in reversed(self._armed):
            if jsonable(fault) == want:
                try:
                    return self.emu.control.state(fault)
                except KeyError:  # cleared: the emulator forgot it, it is over
                    return "done"
        raise KeyError(f"no fault {want} was armed through this control plane")

    # observation
    def _op_execution_log(
        self, psmid: int | None = None, cursor: int | None = None, limit: int | None = None
    ) -> Any:
        """One psmid's entries (a list); a page (``cursor``/``limit``: a dict, see ``LogPage``); or, with
        neither, every entry held, if that fits in one page (else an error that says to page)."""
        log_ = self.emu.execution_log
        if psmid is not None:
            return log_.for_psmid(check_int("psmid", psmid, 0, (1 << 64) - 1))
        if cursor is None and limit is None:
            if len(log_) > MAX_PAGE:
                raise ValueError(
                    f"the log holds {len(log_)} entries, more than one page ({MAX_PAGE}): "
                    "read it in pages (cursor=, limit=)"
                )
            return log_.entries()
        rows, nxt, oldest, end, missed = log_.page_rows(
            0 if cursor is None else cursor, DEFAULT_PAGE if limit is None else limit
        )
        # columns once, then rows: a third of the bytes of one object per entry, and quick to encode
        return PlainJson(fields=FIELDS, rows=rows, next=nxt, oldest=oldest, end=end, missed=missed)

    def _op_now(self) -> float:
        return float(self.emu.clock.now())

    _op_clock = _op_now

    def _op_stats(self) -> dict[str, Any]:
        """Card-side counters, cheap (no log walk; one snapshot under the emulator lock).

        ``{"emulator": {"type": "EmulatorStats", "time", "elapsed", "functions": {FN: n}, "cards": [
        {"card", "name", "type", "mode", "state", "engines", "engines_busy", "requests", "held",
        "busy_time", "utilisation", "functions": {FN: n}}], "queues": [{"qid", "name", "card",
        "domain", "usage", "state", "irq_enabled", "requests", "held", "slots", "waiting", "running",
        "replies", "stored", "functions": {FN: n}}]}, "utilisation", "server": {COUNTER: n}, "tenancy":
        {COUNTER: n} (sessions granted, resumed, expired; REOFFER: ``reoffered``, ``reoffer_missed``),
        "sessions", "max_sessions", "clock": {"running", "errors"}, "execution_log": {"held",
        "capacity", "oldest", "end", "spill"}}``; ``functions`` count accepted requests per function
        name (``MEX_2K``, ``CPRB:CI``, ...).
        """
        emu_stats = self.emu.stats()
        log_ = self.emu.execution_log
        clock = self.emu.clock
        return {
            "emulator": jsonable(emu_stats),
            "utilisation": getattr(emu_stats, "utilisation", None),
            "server": dict(self.stats),
            "tenancy": dict(self.tenancy.stats),
            "sessions": len(self._peers),
            "max_sessions": self.max_sessions,
            "clock": {
                "running": bool(getattr(clock, "running", True)),
                "errors": int(getattr(clock, "error_count", 0)),
            },
            "execution_log": {
                "held": len(log_),
                "capacity": log_.capacity,
                "oldest": log_.oldest,
                "end": log_.end,
                "spill": None if log_.spill_path is None else str(log_.spill_path),
            },
        }

    def _op_qids(self) -> list[int]:
        return list(self.emu.qids())

    def _op_card_state(self, card: int) -> Any:
        card = check_int("card", card, 0, 255)
        if self.emu.find_card(card) is None:
            raise ValueError(f"no card {card} in profile {self.emu.profile.name!r}")
        return self.emu.card_state(card)

    def _op_sessions(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        live = [
            {
                "client": ident.hex(),
                "established": p.session.established,
                "domains": sorted(p.session.domains),
                "apqns": p.session.qids(),
                "idle": round(now - p.last_seen, 3),
                "stats": dict(p.session.stats),
            }
            for ident, p in self._peers.items()
        ]
        clock = self.tenancy.clock()
        detached = [  # dropped without a BYE: kept for their clients until the grace ends
            {
                "client": None,
                "established": False,
                "domains": sorted({q & 0xFF for q in lease.qids}),
                "apqns": sorted(lease.qids),
                "detached_for": round(clock - lease.detached_at, 3),
            }
            for lease in self.tenancy.leases()
            if lease.holder is None and lease.detached_at is not None
        ]
        return live + detached

    # transport faults
    def _op_drop_frames(self, n: int = 1) -> dict[str, int]:
        return dict(self.emu.control.drop_frames(n))

    def _op_corrupt_frames(self, n: int = 1) -> dict[str, int]:
        return dict(self.emu.control.corrupt_frames(n))

    def _op_disconnect(self, client: str | None = None) -> int:
        """Drop one client (routing id hex, from ``sessions``) or every client now; returns how many."""
        if client is not None and (not isinstance(client, str) or len(client) > 512):
            raise ValueError("client must be a routing id in hex (from the sessions op)")
        if client is not None:
            try:
                bytes.fromhex(client)
            except ValueError:
                raise ValueError("client must be a routing id in hex (from the sessions op)") from None
        return self._disconnect(client, "disconnected by the control plane")

    def _op_transport_faults(self) -> dict[str, int]:
        return self.emu.control.transport_faults.pending()

    # the server itself
    def _op_ping(self) -> str:
        return "pong"

    def _op_ops(self) -> list[str]:
        return sorted(self._ops)

    def _op_shutdown(self) -> str:
        self.stop()
        return "stopping"


#: Every control-plane op (the ``_op_*`` methods above), in the order ``ops`` documents them.
CONTROL_OPS: tuple[str, ...] = (
    "machine_failure",
    "checkstop",
    "deconfigure",
    "restore",
    "reset_in_progress",
    "busy",
    "fail_request",
    "slow_engines",
    "inject",
    "state",
    "clear",
    "faults",
    "execution_log",
    "now",
    "clock",
    "stats",
    "qids",
    "card_state",
    "sessions",
    "drop_frames",
    "corrupt_frames",
    "disconnect",
    "transport_faults",
    "ping",
    "ops",
    "shutdown",
)
