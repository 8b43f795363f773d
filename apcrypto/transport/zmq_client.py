"""``tcp://HOST:PORT`` -- the emulator server (``apcrypto-emulator serve``) over ZeroMQ.

One DEALER socket, used by one thread at a time (ZeroMQ sockets are not thread-safe): whoever holds the
I/O lock.  The I/O thread holds it except while it sleeps in ``poll`` on the sockets' descriptors.
``submit`` encodes the commands on the caller's thread and puts them in the outbox; if the I/O thread is
asleep, the submitting thread takes the lock and sends them itself (no thread switch on the way out),
otherwise the I/O thread sends them before it sleeps again (woken by a socketpair if need be).  Many
commands are in flight: the server answers each by tag, in any order.  The I/O thread receives RESULT /
INTERRUPT / ERROR frames and turns them into events that :meth:`poll` returns.

The failure semantics shared with ``usb://`` (one event per tag, ERROR codes, frames too big, link down,
lost for good) are :mod:`apcrypto.transport.framed`'s.  What is particular to this link:

* **Reply timeout** (``timeout``, default 2 s): a command unanswered that long while the peer is otherwise
  alive (a dropped or corrupted frame) -> ``TransportLost(tags=(tag,), permanent=False)``.
* **Link down**: the TCP connection dropped (seen by a socket monitor), no frame from the server for 3
  heartbeat intervals, a BYE, or ``NOT_HELLO``; reconnection uses a fresh socket and a new HELLO, after
  a pause from the transport's :class:`~apcrypto.transport.framed.Backoff` (``reconnect_delay``
  doubling up to ``reconnect_delay_max``, with jitter); each attempt waits for its WELCOME as long as
  the current back-off step.
* **Peer gone**: no handshake succeeded within ``peer_deadline`` of the last frame heard from the server.
  Reconnection goes on at the capped back-off (a server killed and restarted on the same port is found
  again by itself), until ``close()`` or, if the caller set it, ``give_up_after``.
* At open, a refused CURVE handshake raises :class:`HandshakeRefused` (``code`` 0) at once, and no WELCOME
  within ``timeout`` raises :class:`ServerUnreachable`.

Heartbeat: the I/O thread sends PING when it has heard nothing for ``heartbeat`` seconds (default
``min(0.5, peer_deadline / 10)``); any frame from the server counts as a sign of life.
"""

from __future__ import annotations

import contextlib
import itertools
import select
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any, Unpack, cast

import zmq
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from apcrypto.transport.base import Command
from apcrypto.transport.framed import (
    ERROR_RESPONSE_CODES,
    FramedTransport,
    HandshakeRefused,
    LinkOptions,
    link_options,
)
from apformats.frames import (
    BATCH_FRAMES_MAX,
    PROTOCOL_VERSION,
    READAHEAD_VERSION,
    Welcome,
    encode_bye,
    encode_hello,
    encode_ping,
)

__all__ = ["ERROR_RESPONSE_CODES", "HandshakeRefused", "ServerUnreachable", "ZmqTransport", "open_tcp"]

#: Socket events the I/O thread watches (see ``_read_monitor``).
MONITORED = (
    zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


#: The flags of a multipart send as plain ints (pyzmq's enum flags cost a few microseconds per ``|``).
_MORE = int(zmq.SNDMORE | zmq.NOBLOCK)
_LAST = int(zmq.NOBLOCK)


class ServerUnreachable(ConnectionError):
    """No WELCOME within ``timeout`` at open: the server is down, or refused our CURVE key."""


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


def _readable(sock: zmq.Socket) -> bool:
    """Whether ``sock`` holds a message to read (its ``EVENTS``), whatever its descriptor last said."""
    return bool(cast(int, sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN)


def _key(k: bytes | str) -> bytes:
    """A Z85 CURVE key, checked here: libzmq would kill the I/O thread with a malformed one."""
    raw = k.encode("ascii", "replace") if isinstance(k, str) else bytes(k)
    try:
        ok = len(raw) == 32 or (len(raw) == 40 and len(z85.decode(raw)) == 32)
    except Exception:  # z85 raises whatever its table lookup raises
        ok = False
    if not ok:
        raise ValueError("not a CURVE key (40 Z85 characters or 32 bytes)")
    return raw


class ZmqTransport(FramedTransport):
    """A DEALER to an emulator server.  Build it with :func:`open_tcp`."""

    peer_kind = "server"
    keeps_sessions = True  # HELLO presents our resume token; the server keeps a session its grace
    thread_name = "apcrypto-zmq"

    def __init__(
        self,
        url: str,
        *,
        heartbeat: float | None = None,
        curve_server_key: bytes | str | None = None,
        curve_keypair: tuple[bytes | str, bytes | str] | None = None,
        readahead: bool = True,
        **link: Unpack[LinkOptions],
    ) -> None:
        if not url.startswith("tcp://") or ":" not in url[6:]:
            raise ValueError(f"not a tcp://HOST:PORT URL: {url!r}")
        super().__init__(url, **link)
        self.url = url
        self.heartbeat = heartbeat if heartbeat is not None else min(0.5, self.peer_deadline / 10)
        self._max_version = READAHEAD_VERSION if readahead else PROTOCOL_VERSION
        self._curve = None
        if curve_server_key is not None:
            public, secret = curve_keypair if curve_keypair is not None else zmq.curve_keypair()
            self._curve = (_key(curve_server_key), _key(public), _key(secret))
        self._waker = _Waker()
        #: held by the I/O thread except while it sleeps in poll: whoever holds it owns the sockets,
        #: ``_inflight`` and the link's state, so a submitting thread that gets it may send (_push)
        self._io_lock = threading.Lock()
        self._direct = True  # False once the I/O loop has ended: the sockets are its own again
        self._io_asleep = False  # the I/O thread polls with nothing to send: a submit must wake it
        self._hwm_refused = False  # the last flush met the high-water mark: retry at the next event
        # owned by the I/O thread
        self._ctx = zmq.Context()
        self._sock: zmq.Socket | None = None
        self._mon: zmq.Socket | None = None
        self._last_rx = time.monotonic()
        self._last_ping = 0.0
        self._pings = itertools.count(1)
        self._attempt_ends = 0.0
        self._next_attempt = 0.0
        self._start_io(self.timeout + 1.0, ServerUnreachable(f"no answer from {url} within {self.timeout} s"))

    # -- runner-thread side ------------------------------------------------------------------------
    def _push(self) -> None:
        """Send what was just submitted on this thread when the I/O thread is not using the socket
        (asleep in its poll, or between turns) and nothing is in flight: the same :meth:`_flush` it
        would run, under the same lock, one thread switch sooner.  Otherwise (the I/O thread is at
        work: it flushes before it sleeps again; answers are due: it batches what came meanwhile; or
        the link is not up) it is woken as before."""
        lock = self._io_lock
        # with answers on their way the I/O thread wakes soon anyway and sends what piled up meanwhile
        # as one batch; only a link with nothing in flight (one request at a time) is sent on here
        if self._inflight or not lock.acquire(blocking=False):
            self._wake_io()
            return
        try:
            if not self._direct or self._state != "up":
                self._wake_io()
                return
            self.counters["direct_sends"] += 1
            self._flush()
            sock = self._sock
            # the send may have spent the descriptor's signal of a message that came meanwhile: the
            # sleeping I/O thread would not see it, so it is woken to read it
            if sock is not None and _readable(sock):
                self._waker.wake()
        finally:
            lock.release()

    def _wake_io(self) -> None:
        # only an I/O thread that is (about to be) asleep in its poll needs the byte: a busy one
        # looks at the outbox and at _stop before it polls again (see _io_main)
        if self._io_asleep or self._stop:
            self._io_asleep = False
            self._waker.wake()

    def _release(self) -> None:
        self._waker.close()
        if self._thread is None or not self._thread.is_alive():  # term() would wait for its sockets
            self._ctx.term()

    # -- I/O thread ----------------------------------------------------------------------------------
    def _io_main(self) -> None:
        """The I/O loop: under :attr:`_io_lock` the whole time except while it sleeps in ``poll``.

        It polls the sockets' file descriptors with the operating system's ``poll``, not
        ``zmq.Poller``: a ZeroMQ socket's descriptor says only that the socket has news, so the
        socket's own readiness (``EVENTS``) is asked under the lock before every sleep -- and no
        ZeroMQ call touches the socket while the lock is free, which is what lets a submitting
        thread send on it then (:meth:`_push`)."""
        lock = self._io_lock
        lock.acquire()
        try:
            self._connect(time.monotonic())
            self._serve_io()
        finally:
            self._direct = False  # from here on only this thread touches the sockets (BYE, close)
            lock.release()

    def _serve_io(self) -> None:
        lock = self._io_lock
        poller = select.poll()
        waker = self._waker.fileno()
        poller.register(waker, select.POLLIN)
        sockets: tuple[zmq.Socket | None, zmq.Socket | None] = (None, None)  # watched: data, monitor
        watched: set[int] = set()  # their descriptors, registered besides the waker's
        fired: set[int] = set()
        while True:
            with self._cv:
                if self._stop:
                    return
            if waker in fired:
                self._waker.drain()
            mon = self._mon
            if mon is not None and _readable(mon):
                self._read_monitor()
            self._read_socket()
            if self._state == "up":
                self._flush()
            now = time.monotonic()
            self._timers(now)
            wait = max(0.0, min(self._next_timer(now) - now, 1.0, self.timeout))
            if (self._sock, self._mon) != sockets:  # a reconnect made new ones: watch theirs
                sockets = (self._sock, self._mon)
                fds = {cast(int, sk.getsockopt(zmq.FD)) for sk in sockets if sk is not None}
                for fd in watched - fds:
                    poller.unregister(fd)
                for fd in fds - watched:
                    poller.register(fd, select.POLLIN)
                watched = fds
            with self._cv:  # asleep only with nothing to send: a submit after this wakes us
                busy = self._stop or (bool(self._outbox) and self._state == "up" and not self._hwm_refused)
                self._io_asleep = not busy
            # a descriptor signals news once, and any call on its socket may take the news (our
            # sends; a new socket's first message): what a socket already holds is read now
            for sk in sockets:
                if not busy and sk is not None and _readable(sk):
                    busy = True
            lock.release()
            try:
                fired = {fd for fd, _ in poller.poll(0 if busy else int(wait * 1000) + 1)}
            finally:
                lock.acquire()
            self._io_asleep = False

    def _next_timer(self, now: float) -> float:
        if self._state == "up":
            t = max(self._last_rx, self._last_ping) + self.heartbeat
            t = min(t, self._last_rx + 3 * self.heartbeat)
            if self._inflight:
                _, sent = next(iter(self._inflight.values()))
                t = min(t, sent + self.timeout)
            return t
        if self._state == "connecting":
            t = self._attempt_ends
        elif self._state == "down":
            t = self._next_attempt
        else:  # lost: nothing more to do until close
            return now + 1.0
        if not self._connected_once:
            return min(t, self._last_rx + self.timeout)
        return min([t, *(limit for limit in self._outage_limits(self._last_rx) if limit is not None)])

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
                ev = self._no_answer(expired, f"no answer within {self.timeout} s")
                if ev is not None:
                    self._emit(ev)
            return
        if state not in ("connecting", "down"):
            return
        if not self._connected_once:
            if now >= self._last_rx + self.timeout:
                why = "server down, or CURVE key refused?"
                self._fail_open(
                    ServerUnreachable(f"no WELCOME from {self.url} within {self.timeout} s ({why})")
                )
                return
        else:
            gone_at, give_up_at = self._outage_limits(self._last_rx)
            if give_up_at is not None and now >= give_up_at:
                self._give_up(f"server {self.url} unreachable for {self.give_up_after} s (give_up_after)")
                return
            if gone_at is not None and now >= gone_at:
                self._declare_gone(f"server {self.url} unreachable for {self.peer_deadline} s")
                if self._sock is None and state == "connecting":  # the declaration dropped the attempt
                    self._state = "down"
                    self._retry_later()
                return
        if state == "connecting" and now >= self._attempt_ends:
            self._close_socket()
            self._state = "down"
            self._retry_later()
        elif state == "down" and now >= self._next_attempt:
            self._connect(now)

    def _retry_later(self) -> None:
        self._next_attempt = time.monotonic() + self.backoff.next()

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
        self._attempt_ends = now + max(self.backoff.current, 0.05)
        self.counters["handshakes"] += 1
        # offer read-ahead (version 2) unless told not to; a version 1 server answers 1 and never does
        self._write(encode_hello(self.domains, max_version=self._max_version, token=self.resume_token))

    def _close_socket(self) -> None:
        if self._sock is None:
            return
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
                if self._state == "up":  # what the server sent before it closed comes first: its
                    self._read_socket()  # answers, and a BYE that says why (the poll may not show it)
                if self._state == "up":
                    self._link_down("the server closed the connection")
            elif not self._connected_once and self._state == "connecting":
                what = (
                    "CURVE key refused" if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH else "security mismatch"
                )
                self._fail_open(HandshakeRefused(f"{self.url}: {what} (handshake event {event})", 0))

    def _write(self, *frames: bytes) -> bool:
        """Send ``frames`` as one message (a part each); False if the high-water mark refuses it."""
        if self._sock is None:
            return False
        try:
            send = self._sock.send
            for frame in frames[:-1]:  # send_multipart, without its enum-flag arithmetic per part
                send(frame, _MORE)
            send(frames[-1], _LAST)
            return True
        except zmq.Again:
            self.counters["send_would_block"] += 1
            return False

    def _flush(self) -> None:
        """Send what was submitted, held commands first; what the high-water mark refuses waits."""
        batch = self._take_outbox()
        now = time.monotonic()
        sent = 0
        self._hwm_refused = False
        step = BATCH_FRAMES_MAX if self._readahead else 1  # a version 2 server takes a batch per message
        while sent < len(batch):
            chunk = batch[sent : sent + step]
            if not self._write(*(frame for _, frame in chunk)):
                self._hold_back(batch[sent:])
                self._hwm_refused = True
                break
            for cmd, _ in chunk:
                self._inflight[cmd.tag] = (cmd, now)
            sent += len(chunk)
        self.counters["sent"] += sent

    def _read_socket(self) -> None:
        sock = self._sock
        if sock is None or not _readable(sock):
            return
        if self._on_frames(self._incoming()):
            self._last_rx = time.monotonic()  # a frame that decodes is a sign of life

    def _incoming(self) -> Iterator[bytes]:
        """The frames waiting on the socket, one per message, until the link goes (maybe mid-batch)."""
        while True:
            sock = self._sock
            if sock is None or not _readable(sock):
                return
            try:
                parts = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(parts) != 1:
                if self._readahead and len(parts) <= BATCH_FRAMES_MAX:  # a version 2 server's batch
                    yield from parts
                    continue
                self.counters["malformed_rx"] += 1
                continue
            yield parts[0]

    def _on_welcome(self, welcome: Welcome) -> None:
        if self._state != "connecting":
            return
        self._session_up(welcome)
        self._last_ping = time.monotonic()
        self._flush()

    # -- FramedTransport hooks -------------------------------------------------------------------------
    def _write_frame(self, frame: bytes) -> None:
        self._write(frame)

    def _chunk_done(self) -> None:
        if self._state == "up":  # the I/O thread, under the I/O lock (_read_socket)
            self._flush()

    def _say_bye(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._sock.send(encode_bye("client closing"), zmq.NOBLOCK)

    def _drop_link(self) -> list[Command]:
        self._close_socket()
        return []  # a frame zmq accepted is as good as sent: it is in _inflight

    def _link_broken(self, reason: str) -> None:
        if self._state in ("up", "connecting"):
            self._link_down(reason)

    def _link_down(self, reason: str) -> None:
        super()._link_down(reason)
        self._retry_later()


def open_tcp(
    url: str,
    *,
    heartbeat: float | None = None,
    curve_server_key: bytes | str | None = None,
    curve_keypair: tuple[bytes | str, bytes | str] | None = None,
    readahead: bool = True,
    **options: Any,
) -> ZmqTransport:
    """Open ``tcp://HOST:PORT`` and complete the handshake before returning.

    The link options (``domains``, ``timeout``: handshake and per-reply deadline, ``reconnect_delay``,
    ``reconnect_delay_max``, ``peer_deadline``: how long a silent server may take to come back) are
    :class:`~apcrypto.transport.framed.LinkOptions`.  ``curve_server_key`` (Z85) enables CURVE, with
    ``curve_keypair`` (public, secret; default: a fresh, unlisted pair, which an allow-listing server
    refuses).  ``readahead`` (default on) asks the server to send a queue's waiting replies with the
    answer to the NQAP or DQAP that finds them (protocol version 2: one round trip for a queue's
    replies instead of one each; the transport then answers the next DQAPs of that queue from
    them); off, the card is seen exactly as version 1 shows it.  Raises :class:`ServerUnreachable`
    or :class:`HandshakeRefused` (both ``ConnectionError``).  Options meant for other transports
    are ignored, so one ``connect(url, **options)`` serves them all.
    """
    return ZmqTransport(
        url,
        heartbeat=heartbeat,
        curve_server_key=curve_server_key,
        curve_keypair=curve_keypair,
        readahead=readahead,
        **link_options(options),
    )
