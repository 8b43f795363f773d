"""``usb://VID:PID[/SERIAL]`` -- an AP adapter on USB, through real pyusb.

The adapter is a vendor-specific interface with three endpoints, found by kind: bulk OUT carries
instruction frames (``apformats.frames``, the same bytes as on every transport), bulk IN carries
their answers, interrupt IN carries AP interrupts.  The pyusb backend is ``backend=`` (an
``IBackend``, or the name of a module with ``get_backend()``), else the module named by
``$APCRYPTO_USB_BACKEND`` (``emulator.usb_backend`` puts emulated adapters on a virtual bus), else
pyusb's own choice (libusb on real hardware).  Pointing a program at the emulator is a
configuration change, as with pyvisa-sim.

Threads: pyusb promises nothing about sharing a ``Device`` between threads (pyusb#325), so one I/O
thread owns it.  ``submit`` encodes on the caller's thread and queues; the I/O thread writes the
queue in one bulk transfer (many commands in flight), reads bulk IN and interrupt IN, cuts frames
out of those byte streams with :class:`apformats.frames.FrameStream` whatever sizes the transfers
have, and turns them into events for :meth:`poll`.  The device answers in the order commands were written.

Failure semantics -- the same as ``tcp://`` (``apcrypto.transport.zmq_client``), so a runner sees one
contract whatever the transport:

* Every submitted tag ends in exactly one event: a :class:`Completion`, or a :class:`TransportLost`
  naming it.  A tag named in a TransportLost, permanent or not, never completes (dropped from
  ``outstanding()``; a late answer is counted as stale).
* **Timeout** (``USBTimeoutError``, ``ETIMEDOUT``): on a read it only means "nothing yet"; a write is
  retried until ``timeout`` seconds have passed, then the link counts as broken.
* **Stall** (``EPIPE``): ``clear_halt`` on that endpoint and carry on.  The adapter's contract is that
  a stalled transfer consumed nothing and a cleared bulk OUT restarts at a frame boundary, so the
  frame being written goes again, whole.  An endpoint that keeps stalling breaks the link.
* **Reply lost** (a dropped or corrupted frame): once the oldest answer is ``timeout`` overdue the
  thread sends a PING; answers are ordered, so when its PONG comes back every command written before
  it and still unanswered has lost its answer -> ``TransportLost(tags, permanent=False)``.  No PONG
  within ``timeout`` either: the link is broken.
* **Link broken** (``ENODEV`` after an unplug, any other USB error, a BYE, ``NOT_HELLO``, a stream
  that no longer parses) -> ``TransportLost(tags=<commands written on that link and unanswered>,
  permanent=False)``; the thread re-enumerates with back-off (``reconnect_delay`` doubling up to
  ``reconnect_delay_max``), configures the device afresh and says HELLO again.  Commands submitted
  meanwhile are held and written after the handshake; nothing written on the old link is re-sent.
* **Device gone**: no handshake within ``peer_deadline`` of the break -> one permanent
  ``TransportLost`` naming every unanswered command, held ones included; later submits get one at once.
* **ERROR frames** for a tag: codes with an AP meaning complete the command with that response code
  (:data:`ERROR_RESPONSE_CODES`), others end it with a non-permanent ``TransportLost``.  A frame
  larger than the adapter's ``max_frame`` completes at once with ``MESSAGE_TOO_BIG``, unsent.

``close()`` is idempotent, says BYE when it can, joins the thread and never raises, plugged or not.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import itertools
import logging
import os
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import usb.core
import usb.util

from apcrypto.transport.base import Command, Completion, Interrupt, Transport, TransportEvent, TransportLost
from apformats import frames
from apformats.codes import ResponseCode
from apformats.errors import FormatError
from apformats.results import ApResult, Instr
from apformats.status import QueueStatus

__all__ = [
    "BACKEND_ENV",
    "ERROR_RESPONSE_CODES",
    "UsbDeviceNotFound",
    "UsbHandshakeRefused",
    "UsbLocator",
    "UsbTransport",
    "open_usb",
    "parse_usb_url",
    "resolve_backend",
]

log = logging.getLogger(__name__)

#: environment variable naming a module whose ``get_backend()`` gives the pyusb backend
BACKEND_ENV = "APCRYPTO_USB_BACKEND"

#: ERROR codes that mean what an AP response code means (as ``tcp://`` maps them)
ERROR_RESPONSE_CODES: dict[int, ResponseCode] = {
    frames.ErrorCode.TOO_BIG: ResponseCode.MESSAGE_TOO_BIG,
    frames.ErrorCode.UNKNOWN_OPCODE: ResponseCode.REQ_FAC_NOT_INST,
    frames.ErrorCode.DOMAIN_DENIED: ResponseCode.Q_NOT_AVAIL,
}
#: ERROR codes meaning the adapter has no session for us
SESSION_GONE: frozenset[int] = frozenset({frames.ErrorCode.NOT_HELLO, frames.ErrorCode.SHUTTING_DOWN})
#: instructions after which a queue raises no interrupts until the next AQIC enable
IRQ_OFF: frozenset[Instr] = frozenset({Instr.AQIC, Instr.RAPQ, Instr.ZAPQ})

READ_SIZE = 64 * 1024  # one bulk IN transfer (a multiple of every wMaxPacketSize)
IRQ_READ_SIZE = 1024
SLICE_MS = 1  # how long one read may block when there may be nothing to read
IRQ_POLL_INTERVAL = 0.002  # seconds between interrupt IN polls while a queue may interrupt
IDLE_POLL = 0.05  # seconds between reads of both IN endpoints however quiet the link is
MAX_STALLS = 8  # consecutive stalls on one endpoint before the link counts as broken

_TOO_BIG = ApResult(QueueStatus(response_code=ResponseCode.MESSAGE_TOO_BIG))


class UsbDeviceNotFound(ConnectionError):
    """At open: no such device on the bus (or no pyusb backend / library to look with)."""


class UsbHandshakeRefused(ConnectionError):
    """At open: the adapter answered HELLO with an ERROR (version or domains).  ``code``: ErrorCode."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


# --- URL and backend ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UsbLocator:
    """Which device ``usb://VID:PID[/SERIAL]`` names (ids in hex, as lsusb prints them)."""

    vid: int
    pid: int
    serial: str | None = None

    def __str__(self) -> str:
        return f"usb://{self.vid:04x}:{self.pid:04x}" + (f"/{self.serial}" if self.serial else "")

    def matches(self, dev: usb.core.Device) -> bool:
        """pyusb ``custom_match`` on the serial, when one was named (a device whose strings cannot be
        read is not the one we want)."""
        if self.serial is None:
            return True
        try:
            return bool(dev.serial_number == self.serial)
        except (usb.core.USBError, ValueError, NotImplementedError):
            return False


def parse_usb_url(url: str) -> UsbLocator:
    scheme, sep, rest = url.partition("://")
    if scheme.lower() != "usb" or not sep:
        raise ValueError(f"not a usb URL: {url!r} (expected usb://VID:PID[/SERIAL])")
    ids, _, serial = rest.partition("/")
    vid_s, colon, pid_s = ids.partition(":")
    try:
        if not colon:
            raise ValueError
        vid, pid = int(vid_s, 16), int(pid_s, 16)
    except ValueError:
        raise ValueError(f"bad usb URL {url!r}: VID:PID must be hex, e.g. usb://1209:0a70") from None
    if not (0 <= vid <= 0xFFFF and 0 <= pid <= 0xFFFF):
        raise ValueError(f"bad usb URL {url!r}: VID and PID are 16-bit")
    return UsbLocator(vid, pid, serial or None)


def resolve_backend(backend: Any = None) -> Any:
    """The pyusb backend: ``backend`` (an object, or a module name), else the module named by
    ``$APCRYPTO_USB_BACKEND``, else None (pyusb then tries libusb1, openusb, libusb0)."""
    if backend is None:
        backend = os.environ.get(BACKEND_ENV) or None
    if isinstance(backend, str):
        try:
            module = importlib.import_module(backend)
        except ImportError as exc:
            raise UsbDeviceNotFound(f"usb: cannot import backend module {backend!r}: {exc}") from exc
        get = getattr(module, "get_backend", None)
        if get is None:
            raise UsbDeviceNotFound(f"usb: backend module {backend!r} has no get_backend()")
        backend = get()
        if backend is None:
            raise UsbDeviceNotFound(f"usb: {module.__name__}.get_backend() found no usable library")
    return backend


# --- the transport ----------------------------------------------------------------------------------


class _LinkBroken(Exception):
    """The current device handle is unusable (the I/O thread reconnects)."""


class _Refused(Exception):
    """The adapter refused HELLO: retrying cannot help."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass(slots=True)
class _Link:
    """The open device and its three endpoints (the I/O thread's alone)."""

    dev: usb.core.Device
    ep_out: int
    ep_in: int
    ep_irq: int


#: a command on its way: (tag, qid, frame bytes)
_Out = tuple[int, int, bytes]


class UsbTransport(Transport):
    """A :class:`Transport` over pyusb bulk and interrupt pipes, driven by one I/O thread.
    Build it with :func:`open_usb`."""

    supports_interrupts = True

    def __init__(
        self,
        locator: UsbLocator,
        backend: Any,
        *,
        domains: Sequence[int] | None = None,
        timeout: float = 2.0,
        reconnect_delay: float = 0.1,
        reconnect_delay_max: float = 2.0,
        peer_deadline: float = 5.0,
    ) -> None:
        super().__init__()
        for name, value in (
            ("timeout", timeout),
            ("reconnect_delay", reconnect_delay),
            ("peer_deadline", peer_deadline),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        self.locator = locator
        self.backend = backend
        self.domains = None if domains is None else tuple(sorted(set(domains)))
        self.timeout = timeout
        self.reconnect_delay = reconnect_delay
        self.reconnect_delay_max = max(reconnect_delay, reconnect_delay_max)
        self.peer_deadline = peer_deadline
        self.counters: Counter[str] = Counter()
        self.welcome: frames.Welcome | None = None
        # shared between caller threads and the I/O thread, guarded by _cv
        self._cv = threading.Condition()
        self._outbox: deque[_Out] = deque()
        self._events: deque[TransportEvent] = deque()
        self._woken = False
        self._stop = False
        self._state = "connecting"  # connecting | up | down | lost
        self._irq_qids: set[int] = set()  # queues an AQIC enable went to (no disable or reset since)
        # the I/O thread's own
        self._link: _Link | None = None
        self._in_reader = frames.FrameStream()
        self._irq_reader = frames.FrameStream()
        self._out: list[_Out] = []  # being written, in order
        self._out_pos = 0  # bytes of _out[0] the device has accepted
        self._in_flight: OrderedDict[int, tuple[int, float]] = OrderedDict()  # tag -> (qid, written at)
        self._ping: tuple[int, float, list[int]] | None = None  # token, sent at, tags it vouches for
        self._tokens = itertools.count(1)
        self._stalls: Counter[int] = Counter()
        self._next_irq = 0.0
        self._next_idle_poll = 0.0
        self._buffers: dict[int, Any] = {}  # read size -> reusable array('B')
        self._ready = threading.Event()
        self._open_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"apcrypto-usb {locator}", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._open_error is not None:
            self._thread.join()
            self._closed = True
            raise self._open_error

    def __repr__(self) -> str:
        return f"<UsbTransport {self.locator} state={self._state} inflight={len(self._in_flight)}>"

    @property
    def state(self) -> str:
        """``up``, ``down`` (reconnecting) or ``lost``."""
        return self._state

    # -- runner-thread side ------------------------------------------------------------------------
    def qids(self) -> list[int]:
        w = self.welcome
        return list(w.qids) if w else []

    def poll(self, timeout: float = 0.0) -> list[TransportEvent]:
        """As :meth:`Transport.poll`; a non-permanent TransportLost also ends its tags."""
        events = super().poll(timeout)
        for ev in events:
            if isinstance(ev, TransportLost) and not ev.permanent:
                for t in ev.tags:
                    self._outstanding.pop(t, None)
        return events

    def _send(self, commands: Sequence[Command]) -> None:
        try:
            encoded = [
                (c.tag, c.qid, frames.encode_command(c.tag, c.instr, c.qid, c.psmid, c.message, flag=c.flag))
                for c in commands
            ]
        except ValueError:
            for c in commands:  # never sent, never outstanding
                self._outstanding.pop(c.tag, None)
            raise
        w = self.welcome
        limit = w.max_frame if w else frames.DEFAULT_MAX_FRAME
        events: list[TransportEvent] = [Completion(t, _TOO_BIG) for t, _, f in encoded if len(f) > limit]
        encoded = [e for e in encoded if len(e[2]) <= limit]
        with self._cv:
            for c in commands:  # where interrupts may come from decides how often to look for them
                if c.instr is Instr.AQIC and c.flag:
                    self._irq_qids.add(c.qid)
                elif c.instr in IRQ_OFF:
                    self._irq_qids.discard(c.qid)
            if self._state == "lost":
                if encoded:
                    events.append(_lost(f"usb: {self.locator} is gone", encoded, permanent=True))
            else:
                self._outbox.extend(encoded)
            self._events.extend(events)
            self._cv.notify_all()
        if events:
            self._notify_ready()

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
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout=max(5.0, 2 * self.timeout))
        if self._thread.is_alive():  # a backend call that ignores its timeout
            log.error("%r: I/O thread did not stop", self)

    def _emit(self, *events: TransportEvent) -> None:
        with self._cv:
            self._events.extend(events)
            self._cv.notify_all()
        self._notify_ready()

    # -- the I/O thread: life cycle --------------------------------------------------------------------
    def _run(self) -> None:
        try:
            try:
                self._connect()
            except _Refused as exc:
                self._open_error = UsbHandshakeRefused(f"{self.locator} refused the session: {exc}", exc.code)
            except BaseException as exc:
                self._open_error = (
                    exc
                    if isinstance(exc, UsbDeviceNotFound)
                    else UsbDeviceNotFound(f"usb: cannot open {self.locator}: {_describe(exc)}")
                )
            self._ready.set()
            if self._open_error is None:
                self._state = "up"
                self._loop()
        except BaseException:  # a bug here must not leave callers waiting forever
            log.exception("%r: I/O thread failed", self)
            self._lose_everything("usb: I/O thread failed (see log)")
        finally:
            self._dispose(bye=True)

    def _loop(self) -> None:
        delay = self.reconnect_delay
        down_since = 0.0
        while not self._stop:
            if self._state == "up":
                try:
                    self._service()
                except (usb.core.USBError, _LinkBroken, FormatError) as exc:
                    down_since, delay = time.monotonic(), self.reconnect_delay
                    self._link_down(_describe(exc))
            elif self._state == "down":
                left = down_since + self.peer_deadline - time.monotonic()
                if left <= 0:
                    self._lose_everything(
                        f"usb: {self.locator} did not come back within {self.peer_deadline} s"
                    )
                    continue
                try:
                    self._connect()
                except _Refused as exc:
                    self._lose_everything(f"usb: {self.locator} refused the session: {exc}")
                    continue
                except (usb.core.USBError, _LinkBroken, FormatError, UsbDeviceNotFound) as exc:
                    log.debug("%r: reconnect failed: %s", self, _describe(exc))
                    self._wait(min(delay, left))
                    delay = min(delay * 2, self.reconnect_delay_max)
                    continue
                self.counters["reconnects"] += 1
                log.info("%r: reconnected", self)
                self._state = "up"
            else:  # lost: nothing left but to be closed
                self._wait(1.0)

    def _wait(self, seconds: float) -> None:
        with self._cv:
            if not self._stop:
                self._cv.wait(seconds)

    def _link_down(self, reason: str) -> None:
        """Transient loss: end what was written on this link and unanswered, then reconnect."""
        log.warning("%r: link down (%s); reconnecting", self, reason)
        self.counters["links_lost"] += 1
        self._dispose(bye=False)
        # frames handed to a write that failed may have arrived: in doubt, like those in flight
        gone = [(t, q) for t, (q, _) in self._in_flight.items()] + [(t, q) for t, q, _ in self._out]
        self._in_flight.clear()
        self._out, self._out_pos, self._ping = [], 0, None
        with self._cv:
            self._state = "down"
        self._emit(_lost(f"usb: {reason}", gone, permanent=False))

    def _lose_everything(self, reason: str) -> None:
        """Permanent loss: every unanswered command (written or held), and every later one."""
        log.error("%r: %s", self, reason)
        gone = [(t, q) for t, (q, _) in self._in_flight.items()] + [(t, q) for t, q, _ in self._out]
        self._in_flight.clear()
        self._out, self._out_pos, self._ping = [], 0, None
        self._dispose(bye=False)
        with self._cv:
            gone += [(t, q) for t, q, _ in self._outbox]
            self._outbox.clear()
            self._state = "lost"
        self._emit(_lost(reason, gone, permanent=True))

    # -- connecting ------------------------------------------------------------------------------------
    def _connect(self) -> None:
        """Find the device, give it a fresh configuration (the adapter then starts a fresh session),
        claim the interface and say HELLO."""
        loc = self.locator
        try:
            dev = usb.core.find(
                backend=self.backend, idVendor=loc.vid, idProduct=loc.pid, custom_match=loc.matches
            )
        except usb.core.NoBackendError as exc:
            raise UsbDeviceNotFound(
                f"usb: no pyusb backend (install libusb, or set {BACKEND_ENV}): {exc}"
            ) from exc
        if dev is None:
            raise UsbDeviceNotFound(f"usb: no device {loc}")
        self._link = None
        try:
            dev.set_configuration()
            intf = dev.get_active_configuration()[(0, 0)]
            self._link = _Link(
                dev,
                ep_out=_endpoint(intf, usb.util.ENDPOINT_OUT, usb.util.ENDPOINT_TYPE_BULK),
                ep_in=_endpoint(intf, usb.util.ENDPOINT_IN, usb.util.ENDPOINT_TYPE_BULK),
                ep_irq=_endpoint(intf, usb.util.ENDPOINT_IN, usb.util.ENDPOINT_TYPE_INTR),
            )
            usb.util.claim_interface(dev, intf)
            self._in_reader.reset()
            self._irq_reader.reset()
            self._stalls.clear()
            self._handshake()
        except BaseException:
            self._link = self._link or _Link(dev, 0, 0, 0)
            self._dispose(bye=False)
            raise

    def _handshake(self) -> None:
        link = self._link
        assert link is not None
        self._write_frame(frames.encode_hello(self.domains))
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline and not self._stop:
            for raw in self._read(link.ep_in, self._in_reader, READ_SIZE, 10):
                f = frames.decode_frame(raw)
                if isinstance(f, frames.Welcome):
                    if self.welcome is not None and set(f.qids) != set(self.welcome.qids):
                        log.warning("%r: the adapter now offers %s (was %s)", self, f.qids, self.welcome.qids)
                    self.welcome = f
                    self._in_reader.max_len = max(f.max_frame, frames.DEFAULT_MAX_FRAME)
                    if not f.interrupts:
                        self.supports_interrupts = False
                    return
                if isinstance(f, frames.ErrorFrame):
                    raise _Refused(f"{_code_name(f.code)}: {f.text}", int(f.code))
                log.debug("%r: ignoring %r before WELCOME", self, f)
        raise _LinkBroken(f"no WELCOME within {self.timeout} s")

    # -- the I/O thread: one round while up ------------------------------------------------------------
    def _service(self) -> None:
        """Write what is queued, read answers and interrupts, check for lost answers.

        A read that finds nothing blocks for its timeout (a millisecond at least: libusb has nothing
        shorter, and nothing a submit could cut short), so the loop reads only where something is
        expected: bulk IN while commands are in flight, interrupt IN every ``IRQ_POLL_INTERVAL`` while
        some queue may interrupt, and both every ``IDLE_POLL`` anyway, to notice unsolicited frames
        and a vanished device on a quiet link.
        """
        link = self._link
        assert link is not None
        with self._cv:
            if self._outbox:
                self._out.extend(self._outbox)
                self._outbox.clear()
        if self._out:
            self._write_queued()
        now = time.monotonic()
        busy = bool(self._in_flight or self._ping)
        background = now >= self._next_idle_poll
        if background:
            self._next_idle_poll = now + IDLE_POLL
        if busy or background:
            self._on_frames(self._read(link.ep_in, self._in_reader, READ_SIZE, SLICE_MS))
            self._in_reader.check()
        if background or (self._irq_qids and now >= self._next_irq):
            self._next_irq = now + IRQ_POLL_INTERVAL
            self._on_frames(self._read(link.ep_irq, self._irq_reader, IRQ_READ_SIZE, SLICE_MS))
            self._irq_reader.check()
        self._check_answers(time.monotonic())
        if not self._in_flight and not self._ping:
            wake = min(self._next_idle_poll, self._next_irq) if self._irq_qids else self._next_idle_poll
            with self._cv:
                if not self._outbox and not self._stop:
                    self._cv.wait(max(0.0, wake - time.monotonic()))

    def _write_queued(self) -> None:
        """Write every queued frame in one transfer; resume after partial counts, stalls, timeouts."""
        link = self._link
        assert link is not None
        deadline = time.monotonic() + self.timeout
        while self._out:
            data = b"".join(f for _, _, f in self._out)[self._out_pos :]
            try:
                n = link.dev.write(link.ep_out, data, _ms(deadline - time.monotonic()))
            except usb.core.USBTimeoutError:
                self.counters["write_timeouts"] += 1
                if time.monotonic() >= deadline:
                    raise _LinkBroken(f"bulk OUT accepted nothing for {self.timeout} s") from None
                continue
            except usb.core.USBError as exc:
                if exc.errno != errno.EPIPE:
                    raise
                self._clear_stall(link.ep_out)
                self._out_pos = 0  # the adapter restarts its stream at a frame boundary
                continue
            self._stalls[link.ep_out] = 0
            pos, now = self._out_pos + n, time.monotonic()
            while self._out and pos >= len(self._out[0][2]):
                tag, qid, f = self._out.pop(0)
                pos -= len(f)
                self._in_flight[tag] = (qid, now)
                self.counters["sent"] += 1
            self._out_pos = pos

    def _write_frame(self, frame: bytes) -> None:
        """Write one frame of our own (HELLO, PING), retrying timeouts and stalls like the queue."""
        link = self._link
        assert link is not None
        deadline = time.monotonic() + self.timeout
        sent = 0
        while sent < len(frame):
            try:
                sent += link.dev.write(link.ep_out, frame[sent:], _ms(deadline - time.monotonic()))
            except usb.core.USBTimeoutError:
                if time.monotonic() >= deadline:
                    raise _LinkBroken(f"bulk OUT accepted nothing for {self.timeout} s") from None
            except usb.core.USBError as exc:
                if exc.errno != errno.EPIPE:
                    raise
                self._clear_stall(link.ep_out)
                sent = 0

    def _read(self, ep: int, reader: frames.FrameStream, size: int, timeout_ms: int) -> list[bytes]:
        """The whole frames one read completes; a timeout is just "nothing yet"."""
        link = self._link
        assert link is not None
        buf = self._buffers.get(size)
        if buf is None:  # one buffer per size, reused: pyusb would allocate (and zero) one per read
            buf = self._buffers[size] = usb.util.create_buffer(size)
        try:
            n = link.dev.read(ep, buf, timeout_ms)
        except usb.core.USBTimeoutError:
            return []
        except usb.core.USBError as exc:
            if exc.errno != errno.EPIPE:
                raise
            self._clear_stall(ep)
            return []
        self._stalls[ep] = 0
        return reader.feed(memoryview(buf)[:n])

    def _clear_stall(self, ep: int) -> None:
        self.counters["stalls_cleared"] += 1
        self._stalls[ep] += 1
        if self._stalls[ep] > MAX_STALLS:
            raise _LinkBroken(f"endpoint {ep:#04x} keeps stalling")
        link = self._link
        assert link is not None
        log.info("%r: endpoint %#04x stalled; clearing the halt", self, ep)
        link.dev.clear_halt(ep)

    # -- the I/O thread: frames in -----------------------------------------------------------------------
    def _on_frames(self, raws: list[bytes]) -> None:
        events: list[TransportEvent] = []
        try:
            for raw in raws:
                try:
                    f = frames.decode_frame(raw)
                except FormatError as exc:  # corrupted in flight: no field can be trusted, not the tag
                    self.counters["corrupt_rx"] += 1
                    log.warning("%r: dropping a bad %s frame: %s", self, frames.peek_kind(raw), exc)
                    continue
                ev = self._on_frame(f)
                if ev is not None:
                    events.append(ev)
        finally:  # a frame that breaks the link must not swallow the answers read before it
            if events:
                self._emit(*events)

    def _on_frame(self, f: frames.Frame) -> TransportEvent | None:
        if isinstance(f, frames.ResultFrame):
            if self._in_flight.pop(f.tag, None) is None:
                self.counters["stale_rx"] += 1
                return None
            return Completion(f.tag, f.to_result())
        if isinstance(f, frames.InterruptFrame):
            self.counters["interrupts"] += 1
            return Interrupt(f.qid)
        if isinstance(f, frames.Pong):
            return self._on_pong(f.token)
        if isinstance(f, frames.Ping):
            self._write_frame(frames.encode_pong(f.token))
            return None
        if isinstance(f, frames.ErrorFrame):
            return self._on_error(f)
        if isinstance(f, frames.Bye):
            raise _LinkBroken(f"the adapter said BYE: {f.reason}")
        self.counters["unexpected_rx"] += 1
        return None

    def _on_error(self, err: frames.ErrorFrame) -> TransportEvent | None:
        self.counters["errors_rx"] += 1
        code = int(err.code)
        if code in SESSION_GONE:  # e.g. a device reset: it forgot us
            raise _LinkBroken(f"the adapter has no session for us: {_code_name(code)}: {err.text}")
        entry = self._in_flight.pop(err.tag, None) if err.tag else None
        if entry is None:
            log.info("%r: adapter reported %s: %s", self, _code_name(code), err.text)
            return None
        rc = ERROR_RESPONSE_CODES.get(code)
        if rc is not None:
            return Completion(err.tag, ApResult(QueueStatus(response_code=rc)))
        reason = f"usb: adapter refused the command: {_code_name(code)}: {err.text}"
        return _lost(reason, [(err.tag, entry[0])], permanent=False)

    def _check_answers(self, now: float) -> None:
        """PING once the oldest answer is overdue; a PING unanswered that long means a dead link."""
        if self._ping is not None:
            if now - self._ping[1] > self.timeout:
                raise _LinkBroken(f"no PONG within {self.timeout} s")
            return
        if self._in_flight and now - next(iter(self._in_flight.values()))[1] >= self.timeout:
            token = next(self._tokens)
            self._write_frame(frames.encode_ping(token))
            self._ping = (token, now, list(self._in_flight))
            self.counters["pings"] += 1

    def _on_pong(self, token: int) -> TransportEvent | None:
        if self._ping is None or self._ping[0] != token:
            return None
        lost = [(t, self._in_flight.pop(t)[0]) for t in self._ping[2] if t in self._in_flight]
        self._ping = None
        if not lost:
            return None
        self.counters["reply_timeouts"] += len(lost)
        return _lost(f"usb: no answer within {self.timeout} s (frame lost in transit)", lost, permanent=False)

    def _dispose(self, *, bye: bool) -> None:
        link, self._link = self._link, None
        if link is None:
            return
        if bye and link.ep_out:
            with contextlib.suppress(usb.core.USBError, ValueError):
                link.dev.write(link.ep_out, frames.encode_bye("client closing"), 50)
        with contextlib.suppress(usb.core.USBError, ValueError):  # a vanished device: nothing to release
            usb.util.dispose_resources(link.dev)


# --- helpers ------------------------------------------------------------------------------------------


def _lost(reason: str, gone: Sequence[tuple[int, int] | _Out], *, permanent: bool) -> TransportLost:
    tags = tuple(g[0] for g in gone)
    qids = tuple(sorted({g[1] for g in gone}))
    return TransportLost(reason, tags, permanent, qids)


def _endpoint(intf: usb.core.Interface, direction: int, kind: int) -> int:
    ep = usb.util.find_descriptor(
        intf,
        custom_match=lambda e: (
            usb.util.endpoint_direction(e.bEndpointAddress) == direction
            and usb.util.endpoint_type(e.bmAttributes) == kind
        ),
    )
    if ep is None:
        raise UsbDeviceNotFound("usb: the device's interface 0 lacks the AP adapter endpoints")
    return int(ep.bEndpointAddress)


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))  # 0 would mean "forever" to libusb


def _code_name(code: int) -> str:
    return frames.ErrorCode(code).name if code in frames.ErrorCode._value2member_map_ else str(code)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, usb.core.USBError) and exc.errno == errno.ENODEV:
        return "device gone (ENODEV)"
    return f"{type(exc).__name__}: {exc}"


def open_usb(
    url: str,
    *,
    backend: Any = None,
    domains: Sequence[int] | None = None,
    timeout: float = 2.0,
    reconnect_delay: float = 0.1,
    reconnect_delay_max: float = 2.0,
    peer_deadline: float = 5.0,
    **_ignored: Any,
) -> UsbTransport:
    """Open ``usb://VID:PID[/SERIAL]``: find the device, configure it, HELLO, start the I/O thread.

    ``backend``: a pyusb ``IBackend`` or a backend module's name (default ``$APCRYPTO_USB_BACKEND``,
    else libusb).  ``domains``: the domains to ask for (None: whatever the adapter grants).
    ``timeout``: handshake, write and per-answer deadline, seconds.  ``peer_deadline``: how long a
    vanished device may take to come back before the loss is permanent.  Raises
    :class:`UsbDeviceNotFound` or :class:`UsbHandshakeRefused` (both ``ConnectionError``), ValueError
    for a malformed URL.  Options meant for other transports are ignored.
    """
    return UsbTransport(
        parse_usb_url(url),
        resolve_backend(backend),
        domains=domains,
        timeout=timeout,
        reconnect_delay=reconnect_delay,
        reconnect_delay_max=reconnect_delay_max,
        peer_deadline=peer_deadline,
    )
