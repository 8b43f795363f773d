"""``usb://VID:PID[/SERIAL]`` -- an AP adapter on USB, through real pyusb.

The adapter is a vendor-specific interface with three endpoints, found by kind: bulk OUT carries
instruction frames (``apformats.frames``, the same bytes as on every transport), bulk IN carries
their answers, interrupt IN carries AP interrupts.  The backend is whatever pyusb is given: an
explicit ``backend=`` (an ``IBackend`` or the name of a module with ``get_backend()``), else the
module named by ``APCRYPTO_USB_BACKEND`` (``emulator.usb_backend`` puts emulated adapters on a
virtual bus), else pyusb's own choice (libusb on real hardware).  So pointing a program at the
emulator is a configuration change, as with pyvisa-sim.

Threads: pyusb promises nothing about sharing a ``Device`` between threads (pyusb#325), so one I/O
thread owns it: it writes what ``submit`` queued, reads bulk IN and interrupt IN, and turns frames
into events for ``poll``.  Bulk pipes are byte streams: frames are cut out of them with
:class:`FrameReader` whatever sizes the transfers have.  Many commands may be in flight at once;
answers come back in the order the commands were written.

Faults, as libusb reports them (``usb.core.USBError`` triples):

* timeout (``ETIMEDOUT``): on a read it only means "nothing yet"; a write is retried until
  ``timeout`` seconds have passed, then the link counts as broken.
* stall (``EPIPE``): ``clear_halt`` on that endpoint, then carry on (a cleared bulk OUT restarts at a
  frame boundary, so the frame being written is sent again whole).
* no device (``ENODEV``) or any other error: the link is broken.  A non-permanent
  :class:`TransportLost` says so; the thread re-enumerates with exponential back-off
  (``reconnect_delay`` doubling up to ``reconnect_delay_max``) and, on success, reports the commands
  that were in flight as lost (permanent :class:`TransportLost` with their tags: the device session
  that would have answered them is gone) and sends what was submitted meanwhile.  Past
  ``peer_deadline`` it gives up: a permanent :class:`TransportLost` names every unanswered command,
  and later submits are answered the same way at once.
* an answer that never comes (a dropped or corrupted frame): after ``timeout`` the thread sends a
  PING; answers are ordered, so when its PONG arrives every command written before it and still
  unanswered has lost its answer (permanent :class:`TransportLost` with those tags).  No PONG within
  ``timeout`` either: the link is broken (see above).

An ERROR frame naming a command ends that command the same way (the driver decides from its ledger;
a transport knows nothing of requests).  ``close()`` is idempotent, joins the thread and never raises,
plugged or not.
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
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import usb.core
import usb.util

from apcrypto.errors import DeviceUnavailable
from apcrypto.transport.base import Command, Completion, Interrupt, Transport, TransportEvent, TransportLost
from apformats import frames
from apformats.errors import FormatError
from apformats.results import Instr

__all__ = [
    "BACKEND_ENV",
    "FrameReader",
    "UsbLocator",
    "UsbTransport",
    "open_usb",
    "parse_usb_url",
    "resolve_backend",
]

log = logging.getLogger(__name__)

#: environment variable naming a module whose ``get_backend()`` gives the pyusb backend
BACKEND_ENV = "APCRYPTO_USB_BACKEND"

READ_SIZE = 64 * 1024  # one bulk IN transfer (a multiple of every wMaxPacketSize)
IRQ_READ_SIZE = 1024
SLICE_MS = 1  # how long one read may block while the thread has other things to do
IRQ_POLL_INTERVAL = 0.002  # seconds between interrupt IN polls while a queue may interrupt
IDLE_POLL = 0.05  # seconds between reads of both IN endpoints however quiet the link is
#: instructions after which a queue raises no interrupts until the next AQIC enable
_IRQ_OFF = frozenset({Instr.AQIC, Instr.RAPQ, Instr.ZAPQ})
MAX_STALLS = 8  # consecutive stalls on one endpoint before the link counts as broken


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
        """pyusb ``custom_match``: the serial, when one was named (a device whose strings cannot be
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
        raise ValueError(
            f"bad usb URL {url!r}: VID:PID must be two hex numbers, e.g. usb://1209:0a70"
        ) from None
    if not (0 <= vid <= 0xFFFF and 0 <= pid <= 0xFFFF):
        raise ValueError(f"bad usb URL {url!r}: VID and PID are 16-bit")
    return UsbLocator(vid, pid, serial or None)


def resolve_backend(backend: Any = None) -> Any:
    """The pyusb backend to use: ``backend`` (an object, or a module name), else the module named by
    ``$APCRYPTO_USB_BACKEND``, else None (pyusb picks libusb1 / openusb / libusb0)."""
    if backend is None:
        backend = os.environ.get(BACKEND_ENV) or None
    if isinstance(backend, str):
        try:
            module = importlib.import_module(backend)
        except ImportError as exc:
            raise DeviceUnavailable(f"usb: cannot import backend module {backend!r}: {exc}") from exc
        get = getattr(module, "get_backend", None)
        if get is None:
            raise DeviceUnavailable(f"usb: backend module {backend!r} has no get_backend()")
        backend = get()
        if backend is None:
            raise DeviceUnavailable(f"usb: {module.__name__}.get_backend() found no usable library")
    return backend


# --- bulk stream reassembly -------------------------------------------------------------------------


class FrameReader:
    """Cuts whole frames out of a byte stream split anyhow (sans-I/O).  The frame codec reads the
    header; a header it refuses raises :class:`FormatError` and the stream is out of step."""

    __slots__ = ("_buf", "_need", "max_len")

    def __init__(self, max_len: int = frames.DEFAULT_MAX_FRAME) -> None:
        self.max_len = max_len
        self._buf = bytearray()
        self._need = 0  # length of the frame at the head once its header is in, else 0

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        self._buf += data
        out: list[bytes] = []
        buf = self._buf
        while True:
            if not self._need:
                if len(buf) < frames.HEADER_LEN:
                    return out
                self._need = frames.frame_length(buf[: frames.HEADER_LEN], max_len=self.max_len)
            if len(buf) < self._need:
                return out
            out.append(bytes(buf[: self._need]))
            del buf[: self._need]
            self._need = 0

    @property
    def pending(self) -> int:
        return len(self._buf)

    def reset(self) -> None:
        self._buf.clear()
        self._need = 0


# --- the transport ----------------------------------------------------------------------------------


class _State(Enum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    LOST = "lost"


class _LinkBroken(Exception):
    """The I/O thread's signal that the current device handle is unusable."""


class _Refused(Exception):
    """The adapter refused the handshake (a configuration error, not a broken link)."""


@dataclass(slots=True)
class _Link:
    """The open device and its three endpoints (owned by the I/O thread)."""

    dev: usb.core.Device
    ep_out: int
    ep_in: int
    ep_irq: int
    intf: int


class UsbTransport(Transport):
    """A :class:`Transport` over pyusb bulk and interrupt pipes, driven by one I/O thread."""

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
        if min(timeout, reconnect_delay, reconnect_delay_max, peer_deadline) <= 0:
            raise ValueError("usb transport: timeouts and delays must be > 0")
        self.locator = locator
        self.backend = backend
        self.domains = None if domains is None else tuple(sorted(set(domains)))
        self.timeout = timeout
        self.reconnect_delay = reconnect_delay
        self.reconnect_delay_max = reconnect_delay_max
        self.peer_deadline = peer_deadline
        self.stats: Counter[str] = Counter()
        self.welcome: frames.Welcome | None = None
        # shared with callers, guarded by _cv
        self._cv = threading.Condition()
        self._pending: deque[tuple[int, bytes]] = deque()
        self._events: list[TransportEvent] = []
        self._woken = False
        self._stop = False
        self._state = _State.CONNECTING
        # the I/O thread's own
        self._link: _Link | None = None
        self._in_reader = FrameReader()
        self._irq_reader = FrameReader()
        self._out: list[tuple[int, bytes]] = []  # frames being written, in order
        self._out_pos = 0  # bytes of the first frame in _out already accepted
        self._in_flight: dict[int, float] = {}  # tag -> when its frame was written (write order)
        self._lost_in_flight: list[int] = []  # in flight when the link broke: answers gone
        self._ping: tuple[int, float, list[int]] | None = None  # token, sent at, tags it covers
        self._tokens = itertools.count(1)
        self._stalls: Counter[int] = Counter()
        self._next_irq = 0.0  # when the loop polls interrupt IN next (while _irq_qids)
        self._next_idle_poll = 0.0  # when the loop reads both IN endpoints regardless
        self._irq_qids: set[int] = set()  # queues an AQIC enable went to (and no disable or reset)
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
        return f"<UsbTransport {self.locator} {self._state.value}>"

    @property
    def state(self) -> str:
        """``connected``, ``reconnecting`` or ``lost`` (``connecting`` only inside the constructor)."""
        return self._state.value

    # -- the Transport surface (runner thread) -----------------------------------------------------
    def qids(self) -> list[int]:
        return list(self.welcome.qids) if self.welcome else []

    def _send(self, commands: Sequence[Command]) -> None:
        try:
            encoded = [
                (c.tag, frames.encode_command(c.tag, c.instr, c.qid, c.psmid, c.message, flag=c.flag))
                for c in commands
            ]
            limit = self.welcome.max_frame if self.welcome else frames.DEFAULT_MAX_FRAME
            for tag, f in encoded:
                if len(f) > limit:
                    raise ValueError(f"command tag {tag}: {len(f)}-byte frame exceeds the adapter's {limit}")
        except ValueError:
            for c in commands:  # never sent: not outstanding
                self._outstanding.pop(c.tag, None)
            raise
        with self._cv:
            for c in commands:  # where interrupts may come from decides how often to poll for them
                if c.instr is Instr.AQIC and c.flag:
                    self._irq_qids.add(c.qid)
                elif c.instr in _IRQ_OFF:
                    self._irq_qids.discard(c.qid)
            if self._state is _State.LOST:
                self._events.append(
                    TransportLost(
                        "usb: adapter is gone", tuple(t for t, _ in encoded), True, tuple(self.qids())
                    )
                )
                notify = True
            else:
                self._pending.extend(encoded)
                notify = False
            self._cv.notify_all()
        if notify:
            self._notify_ready()

    def _recv(self, timeout: float) -> list[TransportEvent]:
        with self._cv:
            if not self._events and not self._woken and timeout > 0:
                self._cv.wait(timeout)
            self._woken = False
            events, self._events = self._events, []
        return events

    def wakeup(self) -> None:
        with self._cv:
            self._woken = True
            self._cv.notify_all()

    def _close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=max(5.0, 2 * self.timeout))
            if self._thread.is_alive():  # a backend call that ignores its timeout
                log.error("%r: I/O thread did not stop", self)

    # -- events (I/O thread) -------------------------------------------------------------------------
    def _emit(self, *events: TransportEvent) -> None:
        if not events:
            return
        with self._cv:
            self._events.extend(events)
            self._cv.notify_all()
        self._notify_ready()

    # -- the I/O thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            try:
                self._connect()
            except BaseException as exc:
                self._open_error = (
                    exc if isinstance(exc, DeviceUnavailable) else _unavailable(self.locator, exc)
                )
                return
            finally:
                self._ready.set()
            self._set_state(_State.CONNECTED)
            self._loop()
        except BaseException:  # a bug here must not leave callers waiting forever
            log.exception("%r: I/O thread failed", self)
            self._give_up("usb: I/O thread failed (see log)")
        finally:
            self._dispose(bye=True)

    def _loop(self) -> None:
        delay = self.reconnect_delay
        lost_at = 0.0
        while not self._stop:
            if self._state is _State.CONNECTED:
                try:
                    self._service()
                except (usb.core.USBError, _LinkBroken, FormatError) as exc:
                    lost_at = time.monotonic()
                    delay = self.reconnect_delay
                    self._link_broken(exc)
            elif self._state is _State.RECONNECTING:
                if time.monotonic() - lost_at > self.peer_deadline:
                    self._give_up(f"usb: {self.locator} did not come back within {self.peer_deadline} s")
                    continue
                try:
                    self._connect()
                except _Refused as exc:
                    self._give_up(f"usb: {self.locator} refused the session: {exc}")
                    continue
                except (usb.core.USBError, _LinkBroken, FormatError, DeviceUnavailable) as exc:
                    log.debug("%r: reconnect failed: %s", self, exc)
                    remaining = lost_at + self.peer_deadline - time.monotonic()
                    self._wait(min(delay, max(remaining, 0.0) + 0.001))
                    delay = min(delay * 2, self.reconnect_delay_max)
                    continue
                self.stats["reconnects"] += 1
                self._set_state(_State.CONNECTED)
                if self._lost_in_flight:
                    tags, self._lost_in_flight = tuple(self._lost_in_flight), []
                    self._emit(
                        TransportLost(
                            "usb: reconnected; the answers to these commands were lost with the old "
                            "device session",
                            tags,
                            True,
                        )
                    )
            else:  # LOST: nothing to do but wait to be closed
                self._wait(1.0)

    def _wait(self, seconds: float) -> None:
        with self._cv:
            if not self._stop:
                self._cv.wait(seconds)

    def _set_state(self, state: _State) -> None:
        with self._cv:
            self._state = state

    def _link_broken(self, exc: BaseException) -> None:
        """The handle is dead: drop it, remember what was in flight, start reconnecting."""
        why = _describe(exc)
        log.warning("%r: link broken (%s); reconnecting", self, why)
        self.stats["link_broken"] += 1
        self._dispose(bye=False)
        self._lost_in_flight.extend(self._in_flight)
        self._in_flight.clear()
        self._ping = None
        # frames not fully written go out again, whole, on the new link
        with self._cv:
            self._pending.extendleft(reversed(self._out))
            self._state = _State.RECONNECTING
        self._out, self._out_pos = [], 0
        self._emit(TransportLost(f"usb: {why}; reconnecting", (), False, tuple(self.qids())))

    def _give_up(self, reason: str) -> None:
        """Past the deadline: every unanswered command is reported, the transport stays dead."""
        with self._cv:
            held = [t for t, _ in self._pending]
            self._pending.clear()
            self._state = _State.LOST
        tags = [*self._lost_in_flight, *self._in_flight, *(t for t, _ in self._out), *held]
        self._lost_in_flight, self._out, self._out_pos = [], [], 0
        self._in_flight.clear()
        self._dispose(bye=False)
        log.error("%r: %s", self, reason)
        self._emit(TransportLost(reason, tuple(dict.fromkeys(tags)), True, tuple(self.qids())))

    # -- connecting ------------------------------------------------------------------------------------
    def _connect(self) -> None:
        loc = self.locator
        try:
            dev = usb.core.find(
                backend=self.backend, idVendor=loc.vid, idProduct=loc.pid, custom_match=loc.matches
            )
        except usb.core.NoBackendError as exc:
            raise DeviceUnavailable(
                f"usb: no pyusb backend (install libusb or set {BACKEND_ENV}): {exc}"
            ) from exc
        if dev is None:
            raise DeviceUnavailable(f"usb: no device {loc}")
        try:
            dev.set_configuration()  # a fresh configuration: the device starts a fresh session
            intf = dev.get_active_configuration()[(0, 0)]
            link = _Link(
                dev,
                ep_out=_endpoint(intf, usb.util.ENDPOINT_OUT, usb.util.ENDPOINT_TYPE_BULK),
                ep_in=_endpoint(intf, usb.util.ENDPOINT_IN, usb.util.ENDPOINT_TYPE_BULK),
                ep_irq=_endpoint(intf, usb.util.ENDPOINT_IN, usb.util.ENDPOINT_TYPE_INTR),
                intf=intf.bInterfaceNumber,
            )
            usb.util.claim_interface(dev, link.intf)
            self._link = link
            self._in_reader.reset()
            self._irq_reader.reset()
            self._stalls.clear()
            self._handshake()
        except BaseException:
            self._dispose(bye=False)
            raise

    def _handshake(self) -> None:
        link = self._link
        assert link is not None
        self._write_all(frames.encode_hello(self.domains))
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline and not self._stop:
            for raw in self._read(link.ep_in, self._in_reader, READ_SIZE, 10):
                f = frames.decode_frame(raw)
                if isinstance(f, frames.Welcome):
                    if self.welcome is not None and set(f.qids) != set(self.welcome.qids):
                        log.warning("%r: the adapter now offers %s (was %s)", self, f.qids, self.welcome.qids)
                    self.welcome = f
                    self._in_reader.max_len = f.max_frame
                    return
                if isinstance(f, frames.ErrorFrame):
                    raise _Refused(f"{_code_name(f.code)}: {f.text}")
                log.debug("%r: ignoring %r before WELCOME", self, f)
        raise _LinkBroken("no WELCOME within the timeout")

    # -- the connected loop ---------------------------------------------------------------------------
    def _service(self) -> None:
        """One round: write what is queued, read answers and interrupts, check answer deadlines.

        A read blocks for at least a millisecond when there is nothing to read (libusb has no
        shorter timeout, and none that a submit could cut short), so the loop reads only where
        something is expected: bulk IN while commands are in flight, interrupt IN every
        ``IRQ_POLL_INTERVAL`` while some queue may have interrupts enabled, and both every
        ``IDLE_POLL`` anyway, to notice unsolicited frames and a vanished device while idle.
        """
        link = self._link
        assert link is not None
        with self._cv:
            if self._pending:
                self._out.extend(self._pending)
                self._pending.clear()
        if self._out:
            self._write_queued()
        now = time.monotonic()
        busy = bool(self._in_flight or self._ping)
        background = now >= self._next_idle_poll
        if background:
            self._next_idle_poll = now + IDLE_POLL
        if busy or background:
            for raw in self._read(link.ep_in, self._in_reader, READ_SIZE, SLICE_MS):
                self._on_frame(raw)
        if background or (self._irq_qids and now >= self._next_irq):
            self._next_irq = now + IRQ_POLL_INTERVAL
            for raw in self._read(link.ep_irq, self._irq_reader, IRQ_READ_SIZE, SLICE_MS):
                self._on_frame(raw)
        self._check_answers(time.monotonic())
        if not self._in_flight and not self._ping:
            wake = self._next_idle_poll
            if self._irq_qids:
                wake = min(wake, self._next_irq)
            with self._cv:
                if not self._pending and not self._stop:
                    self._cv.wait(max(0.0, wake - time.monotonic()))

    def _write_queued(self) -> None:
        """Write the queued frames in one transfer; partial counts and stalls resume at the right place."""
        link = self._link
        assert link is not None
        deadline = time.monotonic() + self.timeout
        while self._out:
            data = b"".join(f for _, f in self._out)[self._out_pos :]
            try:
                n = link.dev.write(link.ep_out, data, _ms(deadline - time.monotonic()))
            except usb.core.USBTimeoutError:
                self.stats["write_timeouts"] += 1
                if time.monotonic() >= deadline:
                    raise _LinkBroken(f"bulk OUT accepted nothing for {self.timeout} s") from None
                continue
            except usb.core.USBError as exc:
                if exc.errno != errno.EPIPE:
                    raise
                self._clear_stall(link.ep_out)
                self._out_pos = 0  # the device restarts its stream at a frame boundary
                continue
            self._stalls[link.ep_out] = 0
            self._advance(n)

    def _advance(self, n: int) -> None:
        """``n`` more bytes were accepted: frames wholly written are now in flight."""
        pos = self._out_pos + n
        now = time.monotonic()
        while self._out and pos >= len(self._out[0][1]):
            tag, f = self._out.pop(0)
            pos -= len(f)
            self._in_flight[tag] = now
            self.stats["frames_out"] += 1
        self._out_pos = pos

    def _write_all(self, data: bytes) -> None:
        """Write a control frame (HELLO, PING, BYE) outside the command queue."""
        link = self._link
        assert link is not None
        deadline = time.monotonic() + self.timeout
        sent = 0
        while sent < len(data):
            try:
                sent += link.dev.write(link.ep_out, data[sent:], _ms(deadline - time.monotonic()))
            except usb.core.USBTimeoutError:
                if time.monotonic() >= deadline:
                    raise _LinkBroken("bulk OUT timed out") from None
            except usb.core.USBError as exc:
                if exc.errno != errno.EPIPE:
                    raise
                self._clear_stall(link.ep_out)
                sent = 0

    def _read(self, ep: int, reader: FrameReader, size: int, timeout_ms: int) -> list[bytes]:
        """Whatever whole frames one read completes; a timeout is just "nothing yet"."""
        link = self._link
        assert link is not None
        try:
            data = link.dev.read(ep, size, timeout_ms)
        except usb.core.USBTimeoutError:
            return []
        except usb.core.USBError as exc:
            if exc.errno != errno.EPIPE:
                raise
            self._clear_stall(ep)
            return []
        self._stalls[ep] = 0
        return reader.feed(data)

    def _clear_stall(self, ep: int) -> None:
        self.stats["stalls_cleared"] += 1
        self._stalls[ep] += 1
        if self._stalls[ep] > MAX_STALLS:
            raise _LinkBroken(f"endpoint {ep:#04x} keeps stalling")
        link = self._link
        assert link is not None
        log.info("%r: endpoint %#04x stalled; clearing the halt", self, ep)
        link.dev.clear_halt(ep)

    def _on_frame(self, raw: bytes) -> None:
        try:
            f = frames.decode_frame(raw)
        except FormatError as exc:  # corrupted in flight: no field can be trusted, not even the tag
            self.stats["bad_frames"] += 1
            log.warning("%r: dropped a bad %s frame: %s", self, frames.peek_kind(raw), exc)
            return
        self.stats["frames_in"] += 1
        if isinstance(f, frames.ResultFrame):
            if self._in_flight.pop(f.tag, None) is None:
                self.stats["stale_answers"] += 1
                return
            self._emit(Completion(f.tag, f.to_result()))
        elif isinstance(f, frames.InterruptFrame):
            self.stats["interrupts"] += 1
            self._emit(Interrupt(f.qid))
        elif isinstance(f, frames.Pong):
            self._on_pong(f.token)
        elif isinstance(f, frames.ErrorFrame):
            self._on_error(f)
        elif isinstance(f, frames.Bye):
            raise _LinkBroken(f"the adapter ended the session: {f.reason}")
        else:
            self.stats["unexpected_frames"] += 1

    def _on_error(self, f: frames.ErrorFrame) -> None:
        if f.code == frames.ErrorCode.NOT_HELLO:  # the device lost our session (a reset): start over
            raise _LinkBroken("the adapter has no session for us")
        if f.tag and self._in_flight.pop(f.tag, None) is not None:
            self._emit(
                TransportLost(f"usb: adapter refused the command: {_code_name(f.code)}: {f.text}", (f.tag,))
            )
            return
        self.stats["errors_received"] += 1
        log.warning("%r: adapter reported %s: %s", self, _code_name(f.code), f.text)

    def _check_answers(self, now: float) -> None:
        """Ping when an answer is overdue; a ping unanswered past the timeout means a dead link."""
        if self._ping is not None:
            if now - self._ping[1] > self.timeout:
                raise _LinkBroken(f"no PONG within {self.timeout} s")
            return
        if self._in_flight and now - next(iter(self._in_flight.values())) > self.timeout:
            token = next(self._tokens)
            self._write_all(frames.encode_ping(token))
            self._ping = (token, now, list(self._in_flight))
            self.stats["pings"] += 1

    def _on_pong(self, token: int) -> None:
        if self._ping is None or self._ping[0] != token:
            return
        lost = [t for t in self._ping[2] if self._in_flight.pop(t, None) is not None]
        self._ping = None
        if lost:
            self.stats["lost_answers"] += len(lost)
            self._emit(TransportLost("usb: answer lost in transit (dropped or corrupted frame)", tuple(lost)))

    def _dispose(self, *, bye: bool) -> None:
        link, self._link = self._link, None
        if link is None:
            return
        if bye:
            with contextlib.suppress(usb.core.USBError, ValueError):
                link.dev.write(link.ep_out, frames.encode_bye("client closing"), 50)
        with contextlib.suppress(usb.core.USBError, ValueError):  # a vanished device: nothing to release
            usb.util.dispose_resources(link.dev)


# --- helpers ------------------------------------------------------------------------------------------


def _endpoint(intf: usb.core.Interface, direction: int, kind: int) -> int:
    ep = usb.util.find_descriptor(
        intf,
        custom_match=lambda e: (
            usb.util.endpoint_direction(e.bEndpointAddress) == direction
            and usb.util.endpoint_type(e.bmAttributes) == kind
        ),
    )
    if ep is None:
        raise DeviceUnavailable("usb: the device's interface 0 has no AP adapter endpoints")
    return int(ep.bEndpointAddress)


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))  # 0 would mean "forever" to libusb


def _code_name(code: int) -> str:
    return code.name if isinstance(code, frames.ErrorCode) else str(code)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, usb.core.USBError) and exc.errno == errno.ENODEV:
        return "device gone (ENODEV)"
    return f"{type(exc).__name__}: {exc}"


def _unavailable(locator: UsbLocator, exc: BaseException) -> DeviceUnavailable:
    err = DeviceUnavailable(f"usb: cannot open {locator}: {_describe(exc)}")
    err.__cause__ = exc
    return err


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

    Raises :class:`~apcrypto.errors.DeviceUnavailable` when no such device answers (or no pyusb
    backend exists), and ValueError for a malformed URL.
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
