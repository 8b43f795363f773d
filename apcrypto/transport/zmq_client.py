"""``tcp://HOST:PORT`` -- the emulator server (``apcrypto-emulator serve``) over ZeroMQ.

One DEALER socket, owned by one I/O thread (ZeroMQ sockets are not thread-safe).  ``submit`` encodes the
commands on the caller's thread and hands them over through a queue and a wake-up socketpair; the I/O
thread sends them at once (many commands in flight: the server answers each by tag, in any order),
receives RESULT / INTERRUPT / ERROR frames, and turns them into events that :meth:`poll` returns.

Failure semantics (what a runner can rely on):

* Every submitted tag ends in exactly one event: a :class:`Completion`, or a :class:`TransportLost`
  naming it.  A tag named in a TransportLost, permanent or not, will never complete (this transport drops
  it from ``outstanding()``; a late answer is counted as stale and discarded).
* **Reply timeout** (``timeout``, default 2 s): a command unanswered that long while the peer is otherwise
  alive (a dropped or corrupted frame) -> ``TransportLost(tags=(tag,), permanent=False)``.
* **Link loss** (the TCP connection dropped, seen by a socket monitor; no frame from the server for 3
  heartbeat intervals; a BYE; or ``NOT_HELLO``: the server forgot the session) ->
  ``TransportLost(tags=<commands sent on that link and unanswered>, permanent=False)``, then reconnection
  with a fresh socket and a new HELLO, after ``reconnect_delay`` doubling up to ``reconnect_delay_max``.
  Commands submitted while the link is down are held and sent after the handshake; nothing sent on the
  old link is ever re-sent (the driver decides from its ledger).
* **Peer gone**: no handshake succeeded within ``peer_deadline`` of the last frame heard from the server ->
  one ``TransportLost(tags=<every unanswered command, held ones included>, permanent=True)``; later
  submits get a permanent TransportLost for their tags at once.  Held commands never reached the server.
* **ERROR frames** for a tag: the codes with an AP meaning complete the command with that response code
  (``ERROR_RESPONSE_CODES``: TOO_BIG -> MESSAGE_TOO_BIG, UNKNOWN_OPCODE -> REQ_FAC_NOT_INST,
  DOMAIN_DENIED -> Q_NOT_AVAIL), as the hardware would answer; any other code is protocol breakage
  (MALFORMED, CORRUPT, INTERNAL, ...) and ends the tag with a non-permanent TransportLost, since the
  command's effect is unknown (INTERNAL) or the bytes were not what we sent.
* A frame too big for the server's limit (WELCOME's max_frame) completes at once with MESSAGE_TOO_BIG
  without being sent.  Corrupted frames from the server (CRC) are counted and dropped: their tag cannot
  be trusted, so that command ends by its reply timeout.

Heartbeat: the I/O thread sends PING when it has heard nothing for ``heartbeat`` seconds (default
``min(0.5, peer_deadline / 10)``); any frame from the server counts as a sign of life.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import socket
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Sequence
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from apcrypto.transport.base import Command, Completion, Interrupt, Transport, TransportEvent, TransportLost
from apformats.codes import ResponseCode
from apformats.errors import FormatError
from apformats.frames import (
    DEFAULT_MAX_FRAME,
    Bye,
    ErrorCode,
    ErrorFrame,
    InterruptFrame,
    Ping,
    Pong,
    ResultFrame,
    Welcome,
    decode_frame,
    encode_bye,
    encode_command,
    encode_hello,
    encode_ping,
    encode_pong,
)
from apformats.results import ApResult
from apformats.status import QueueStatus

__all__ = ["ERROR_RESPONSE_CODES", "HandshakeRefused", "ServerUnreachable", "ZmqTransport", "open_tcp"]

log = logging.getLogger(__name__)

#: ERROR codes that mean what an AP response code means: the command completes with that code.
ERROR_RESPONSE_CODES: dict[int, ResponseCode] = {
    ErrorCode.TOO_BIG: ResponseCode.MESSAGE_TOO_BIG,
    ErrorCode.UNKNOWN_OPCODE: ResponseCode.REQ_FAC_NOT_INST,
    ErrorCode.DOMAIN_DENIED: ResponseCode.Q_NOT_AVAIL,
}
#: ERROR codes meaning the server has no session for us (it restarted, dropped us, or is stopping).
SESSION_GONE: frozenset[int] = frozenset({ErrorCode.NOT_HELLO, ErrorCode.SHUTTING_DOWN})
#: Socket events the I/O thread watches (see ``_read_monitor``).
MONITORED = (
    zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
#: ERROR codes that refuse a HELLO: retrying cannot help.
HANDSHAKE_REFUSALS: frozenset[int] = frozenset({ErrorCode.BAD_VERSION, ErrorCode.DOMAIN_DENIED})


class ServerUnreachable(ConnectionError):
    """No WELCOME within ``timeout`` at open: the server is down, or refused our CURVE key."""


class HandshakeRefused(ConnectionError):
    """The server refused the session at open: an ERROR to HELLO (``code``: BAD_VERSION, DOMAIN_DENIED) or
    a failed security handshake (``code`` 0: CURVE key not on the allow-list, CURVE on one side only)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class _Waker:
    """A socketpair the runner thread writes to so the I/O thread's poll returns."""

    def __init__(self) -> None:
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)

    def fileno(self) -> int:
        return self._r.fileno()

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._w.send(b"\0")

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while self._r.recv(4096):
                pass

    def close(self) -> None:
        self._r.close()
        self._w.close()


def _key(k: bytes | str) -> bytes:
    return k.encode("ascii") if isinstance(k, str) else k


class ZmqTransport(Transport):
    """A DEALER to an emulator server.  Build it with :func:`open_tcp`."""

    supports_interrupts = True

    def __init__(
        self,
        url: str,
        *,
        domains: Sequence[int] | None = None,
        timeout: float = 2.0,
        reconnect_delay: float = 0.1,
        reconnect_delay_max: float = 2.0,
        peer_deadline: float = 5.0,
        heartbeat: float | None = None,
        curve_server_key: bytes | str | None = None,
        curve_keypair: tuple[bytes | str, bytes | str] | None = None,
    ) -> None:
        super().__init__()
        if not url.startswith("tcp://") or ":" not in url[6:]:
            raise ValueError(f"not a tcp://HOST:PORT URL: {url!r}")
        for name, value in (("timeout", timeout), ("peer_deadline", peer_deadline)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        self.url = url
        self.timeout = timeout
        self.reconnect_delay = reconnect_delay
        self.reconnect_delay_max = max(reconnect_delay, reconnect_delay_max)
        self.peer_deadline = peer_deadline
        self.heartbeat = heartbeat if heartbeat is not None else min(0.5, peer_deadline / 10)
        self._domains = None if domains is None else tuple(sorted(set(domains)))
        self._curve = None
        if curve_server_key is not None:
            public, secret = curve_keypair if curve_keypair is not None else zmq.curve_keypair()
            self._curve = (_key(curve_server_key), _key(public), _key(secret))

        # shared between the runner thread and the I/O thread
        self._cond = threading.Condition()
        self._events: deque[TransportEvent] = deque()
        self._woken = False
        self._outbox: deque[tuple[Command, bytes]] = deque()
        self._waker = _Waker()
        self._stop = False
        self._qids: list[int] = []
        self._max_frame = DEFAULT_MAX_FRAME
        self._ready = threading.Event()
        self._open_error: BaseException | None = None
        self.counters: Counter[str] = Counter()

        # owned by the I/O thread
        self._ctx = zmq.Context()
        self._sock: zmq.Socket | None = None
        self._mon: zmq.Socket | None = None
        self._state = "connecting"  # connecting | up | down | lost
        self._inflight: OrderedDict[int, tuple[Command, float]] = OrderedDict()
        self._held: deque[tuple[Command, bytes]] = deque()
        self._last_rx = time.monotonic()
        self._last_ping = 0.0
        self._pings = itertools.count(1)
        self._delay = reconnect_delay
        self._attempt_ends = 0.0
        self._next_attempt = 0.0
        self._connected_once = False

        self._thread = threading.Thread(target=self._run, name=f"apcrypto-zmq {url}", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout + 1.0) or self._open_error is not None:
            err = self._open_error or ServerUnreachable(f"no answer from {url} within {timeout} s")
            self._shutdown_io()
            self._closed = True
            raise err

    # -- runner-thread side ------------------------------------------------------------------------
    def qids(self) -> list[int]:
        with self._cond:
            return list(self._qids)

    def poll(self, timeout: float = 0.0) -> list[TransportEvent]:
        """As :meth:`Transport.poll`; a non-permanent TransportLost also ends its tags (see module doc)."""
        events = super().poll(timeout)
        for ev in events:
            if isinstance(ev, TransportLost) and not ev.permanent:
                for t in ev.tags:
                    self._outstanding.pop(t, None)
        return events

    def _send(self, commands: Sequence[Command]) -> None:
        try:
            encoded = [
                (c, encode_command(c.tag, c.instr, c.qid, c.psmid, c.message, flag=c.flag)) for c in commands
            ]
        except ValueError:
            for c in commands:
                self._outstanding.pop(c.tag, None)
            raise
        with self._cond:
            self._outbox.extend(encoded)
        self._waker.wake()

    def _recv(self, timeout: float) -> list[TransportEvent]:
        with self._cond:
            if not self._events and not self._woken and timeout > 0:
                self._cond.wait_for(lambda: self._events or self._woken, timeout)
            self._woken = False
            out = list(self._events)
            self._events.clear()
        return out

    def wakeup(self) -> None:
        with self._cond:
            self._woken = True
            self._cond.notify_all()

    def _close(self) -> None:
        self._shutdown_io()

    def _shutdown_io(self) -> None:
        with self._cond:
            self._stop = True
        self._waker.wake()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        self._waker.close()
        self._ctx.term()

    def _emit(self, *events: TransportEvent) -> None:
        with self._cond:
            self._events.extend(events)
            self._cond.notify_all()
        self._notify_ready()

    # -- I/O thread ----------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._connect(time.monotonic())
            self._loop()
        except Exception as exc:  # a bug here must end in an event, not a silent hang
            log.exception("zmq transport I/O thread failed")
            if not self._ready.is_set():
                self._open_error = exc
                self._ready.set()
            else:
                self._lose_everything(f"I/O thread failed: {exc!r}")
        finally:
            self._close_socket(bye=self._state == "up")

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._waker, zmq.POLLIN)
        registered: tuple[zmq.Socket | None, zmq.Socket | None] = (None, None)
        while True:
            with self._cond:
                if self._stop:
                    return
            if registered != (self._sock, self._mon):
                for old in registered:
                    if old is not None:
                        poller.unregister(old)
                registered = (self._sock, self._mon)
                for new in registered:
                    if new is not None:
                        poller.register(new, zmq.POLLIN)
            now = time.monotonic()
            wait = max(0.0, min(self._next_timer(now) - now, 1.0))
            ready = dict(poller.poll(int(wait * 1000) + 1))
            if self._waker.fileno() in ready:
                self._waker.drain()
            if self._mon is not None and self._mon in ready:
                self._read_monitor()
            if self._sock is not None and self._sock in ready:
                self._read_all()
            self._take_outbox()
            self._timers(time.monotonic())

    def _next_timer(self, now: float) -> float:
        if self._state == "up":
            t = max(self._last_rx, self._last_ping) + self.heartbeat
            t = min(t, self._last_rx + 3 * self.heartbeat)
            if self._inflight:
                _, sent = next(iter(self._inflight.values()))
                t = min(t, sent + self.timeout)
            return t
        if self._state == "connecting":
            return min(self._attempt_ends, self._lost_at())
        if self._state == "down":
            return min(self._next_attempt, self._lost_at())
        return now + 1.0

    def _lost_at(self) -> float:
        limit = self.peer_deadline if self._connected_once else self.timeout
        return self._last_rx + limit

    def _timers(self, now: float) -> None:
        state = self._state
        if state == "up":
            if now - self._last_rx >= 3 * self.heartbeat:
                self._link_down(f"no frame from the server for {now - self._last_rx:.2f} s")
                return
            if now - max(self._last_rx, self._last_ping) >= self.heartbeat:
                self._last_ping = now
                self.counters["pings"] += 1
                self._write(encode_ping(next(self._pings)))
            expired = []
            for t, (_, sent) in self._inflight.items():  # in send order: stop at the first one still in time
                if now - sent < self.timeout:
                    break
                expired.append(t)
            if expired:
                cmds = [self._inflight.pop(t)[0] for t in expired]
                self.counters["reply_timeouts"] += len(cmds)
                self._emit(_lost(f"no answer within {self.timeout} s", cmds, permanent=False))
            return
        if state in ("connecting", "down") and now >= self._lost_at():
            if not self._connected_once:
                self._open_error = ServerUnreachable(
                    f"no WELCOME from {self.url} within {self.timeout} s (server down, or CURVE key refused?)"
                )
                self._ready.set()
                self._state = "lost"
                self._close_socket()
                return
            self._lose_everything(f"server {self.url} unreachable for {self.peer_deadline} s")
            return
        if state == "connecting" and now >= self._attempt_ends:
            self._close_socket()
            self._state = "down"
            self._next_attempt = now + self._delay
            self._delay = min(self._delay * 2, self.reconnect_delay_max)
        elif state == "down" and now >= self._next_attempt:
            self._connect(now)

    def _connect(self, now: float) -> None:
        """One handshake attempt: a fresh socket (nothing of an old link can leak into it) and a HELLO."""
        self._close_socket()
        sock = self._ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.setsockopt(zmq.RECONNECT_IVL, max(1, int(self.reconnect_delay * 1000)))
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, max(1, int(self.reconnect_delay_max * 1000)))
        if self._curve is not None:
            sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = self._curve
        self._mon = sock.get_monitor_socket(MONITORED)
        sock.connect(self.url)
        self._sock = sock
        self._state = "connecting"
        self._attempt_ends = now + max(self._delay, 0.05)
        self.counters["handshakes"] += 1
        self._write(encode_hello(self._domains))

    def _close_socket(self, *, bye: bool = False) -> None:
        if self._sock is None:
            return
        if bye:
            with contextlib.suppress(zmq.ZMQError):
                self._sock.send(encode_bye("client closing"), zmq.NOBLOCK)
        if self._mon is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._sock.disable_monitor()
            self._mon.close(linger=0)
            self._mon = None
        self._sock.close(linger=0)
        self._sock = None

    def _read_monitor(self) -> None:
        """Socket events: a dropped TCP connection ends the link at once (no heartbeat wait); a refused
        security handshake (CURVE key not allowed, mechanism mismatch) fails an open at once."""
        while self._mon is not None:
            try:
                event = recv_monitor_message(self._mon, zmq.NOBLOCK)["event"]
            except zmq.Again:
                return
            if event == zmq.EVENT_DISCONNECTED:
                if self._state == "up":
                    self._link_down("the server closed the connection")
            elif not self._connected_once and self._state == "connecting":
                what = (
                    "CURVE key refused" if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH else "security mismatch"
                )
                self._open_error = HandshakeRefused(f"{self.url}: {what} (handshake event {event})", 0)
                self._state = "lost"
                self._close_socket()
                self._ready.set()

    def _write(self, frame: bytes) -> bool:
        if self._sock is None:
            return False
        try:
            self._sock.send(frame, zmq.NOBLOCK)
            return True
        except zmq.Again:
            self.counters["send_would_block"] += 1
            return False

    def _take_outbox(self) -> None:
        with self._cond:
            if not self._outbox:
                return
            batch = list(self._outbox)
            self._outbox.clear()
        if self._state == "lost":
            cmds = [c for c, _ in batch]
            self._emit(_lost(f"server {self.url} is gone", cmds, permanent=True, unsent=cmds))
            return
        self._held.extend(batch)
        if self._state == "up":
            self._flush_held()

    def _flush_held(self) -> None:
        now = time.monotonic()
        too_big: list[TransportEvent] = []
        while self._held:
            cmd, frame = self._held[0]
            if len(frame) > self._max_frame:
                self._held.popleft()
                too_big.append(
                    Completion(cmd.tag, ApResult(QueueStatus(response_code=ResponseCode.MESSAGE_TOO_BIG)))
                )
                continue
            if not self._write(frame):
                break  # high-water mark: the rest waits for the next round
            self._held.popleft()
            self._inflight[cmd.tag] = (cmd, now)
            self.counters["sent"] += 1
        if too_big:
            self._emit(*too_big)

    def _read_all(self) -> None:
        assert self._sock is not None
        events: list[TransportEvent] = []
        while self._sock is not None:
            try:
                parts = self._sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            if len(parts) != 1:
                self.counters["malformed_rx"] += 1
                continue
            try:
                frame = decode_frame(parts[0], max_len=max(self._max_frame, DEFAULT_MAX_FRAME))
            except FormatError as exc:
                self.counters["corrupt_rx"] += 1
                log.warning("dropping a bad frame from %s: %s", self.url, exc)
                continue
            self._last_rx = time.monotonic()
            ev = self._on_frame(frame)
            if ev is not None:
                events.append(ev)
        if events:
            self._emit(*events)

    def _on_frame(self, frame: Any) -> TransportEvent | None:
        if isinstance(frame, ResultFrame):
            entry = self._inflight.pop(frame.tag, None)
            if entry is None:
                self.counters["stale_rx"] += 1
                return None
            return Completion(frame.tag, frame.to_result())
        if isinstance(frame, InterruptFrame):
            return Interrupt(frame.qid)
        if isinstance(frame, Ping):
            self._write(encode_pong(frame.token))
            return None
        if isinstance(frame, Pong):
            return None
        if isinstance(frame, Welcome):
            self._on_welcome(frame)
            return None
        if isinstance(frame, ErrorFrame):
            return self._on_error(frame)
        if isinstance(frame, Bye):
            if self._state in ("up", "connecting"):
                self._link_down(f"server said BYE: {frame.reason}")
            return None
        self.counters["unexpected_rx"] += 1
        return None

    def _on_welcome(self, w: Welcome) -> None:
        if self._state != "connecting":
            return
        with self._cond:
            self._qids = list(w.qids)
            self._max_frame = w.max_frame
        if not w.interrupts:
            self.supports_interrupts = False
        self._state = "up"
        self._delay = self.reconnect_delay
        self._last_ping = time.monotonic()
        if self._connected_once:
            self.counters["reconnects"] += 1
            log.info("reconnected to %s", self.url)
        self._connected_once = True
        self._ready.set()
        self._flush_held()

    def _on_error(self, err: ErrorFrame) -> TransportEvent | None:
        self.counters["errors_rx"] += 1
        code = int(err.code)
        name = ErrorCode(code).name if code in ErrorCode._value2member_map_ else str(code)
        if self._state == "connecting" and code in HANDSHAKE_REFUSALS:
            refusal = HandshakeRefused(f"{self.url} refused the session: {name}: {err.text}", code)
            if not self._connected_once:
                self._open_error = refusal
                self._state = "lost"
                self._close_socket()
                self._ready.set()
            else:
                self._lose_everything(str(refusal))
            return None
        entry = self._inflight.pop(err.tag, None) if err.tag else None
        if code in SESSION_GONE:
            if entry is not None:
                self._inflight[err.tag] = entry  # ends with the link's other unanswered commands
            if self._state == "up":
                self._link_down(f"server has no session for us: {name}: {err.text}")
            return None
        if entry is None:
            log.info("error from %s: %s: %s", self.url, name, err.text)
            return None
        cmd = entry[0]
        rc = ERROR_RESPONSE_CODES.get(code)
        if rc is not None:
            return Completion(cmd.tag, ApResult(QueueStatus(response_code=rc)))
        return _lost(f"server refused the command: {name}: {err.text}", [cmd], permanent=False)

    def _link_down(self, reason: str) -> None:
        """Transient loss: end the link's unanswered commands, then reconnect with back-off."""
        log.info("link to %s down: %s", self.url, reason)
        self.counters["links_lost"] += 1
        cmds = [c for c, _ in self._inflight.values()]
        self._inflight.clear()
        self._close_socket()
        self._state = "down"
        self._next_attempt = time.monotonic() + self._delay
        self._delay = min(self._delay * 2, self.reconnect_delay_max)
        self._emit(_lost(reason, cmds, permanent=False))

    def _lose_everything(self, reason: str) -> None:
        """Permanent loss: every unanswered command (sent or held), and every later one, ends lost."""
        log.warning("transport to %s lost: %s", self.url, reason)
        sent = [c for c, _ in self._inflight.values()]
        held = [c for c, _ in self._held]
        self._inflight.clear()
        self._held.clear()
        with self._cond:
            held += [c for c, _ in self._outbox]
            self._outbox.clear()
        self._close_socket()
        self._state = "lost"
        self._emit(_lost(reason, sent + held, permanent=True, unsent=held))

    def __repr__(self) -> str:
        return f"<ZmqTransport {self.url} state={self._state} inflight={len(self._inflight)}>"


def _lost(
    reason: str, cmds: Sequence[Command], *, permanent: bool, unsent: Sequence[Command] = ()
) -> TransportLost:
    """``unsent``: the commands that never left this host (held while the link was down)."""
    tags = tuple(c.tag for c in cmds)
    qids = tuple(sorted({c.qid for c in cmds}))
    return TransportLost(reason, tags, permanent, qids, tuple(c.tag for c in unsent))


def open_tcp(
    url: str,
    *,
    domains: Sequence[int] | None = None,
    timeout: float = 2.0,
    reconnect_delay: float = 0.1,
    reconnect_delay_max: float = 2.0,
    peer_deadline: float = 5.0,
    heartbeat: float | None = None,
    curve_server_key: bytes | str | None = None,
    curve_keypair: tuple[bytes | str, bytes | str] | None = None,
    **_ignored: Any,
) -> ZmqTransport:
    """Open ``tcp://HOST:PORT`` and complete the handshake before returning.

    ``domains``: the domains to ask for (None: whatever the server grants).  ``timeout``: handshake and
    per-reply deadline, seconds.  ``peer_deadline``: how long a silent server may take to come back before
    the loss is permanent.  ``curve_server_key`` (Z85) enables CURVE, with ``curve_keypair`` (public,
    secret; default: a fresh, unlisted pair, which an allow-listing server refuses).  Raises
    :class:`ServerUnreachable` or :class:`HandshakeRefused` (both ``ConnectionError``).  Options meant
    for other transports are ignored, so one ``connect(url, **options)`` serves them all.
    """
    return ZmqTransport(
        url,
        domains=domains,
        timeout=timeout,
        reconnect_delay=reconnect_delay,
        reconnect_delay_max=reconnect_delay_max,
        peer_deadline=peer_deadline,
        heartbeat=heartbeat,
        curve_server_key=curve_server_key,
        curve_keypair=curve_keypair,
    )
