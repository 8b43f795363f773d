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
have, and turns them into events for :meth:`poll`.  The device answers in the order commands were
written.

The failure semantics are those of ``tcp://`` (one event per tag, ERROR codes, frames too big, link
down, lost for good: :mod:`apcrypto.transport.framed`), so a runner sees one contract whatever the
transport.  What is particular to this link:

* **Timeout** (``USBTimeoutError``, ``ETIMEDOUT``): on a read it only means "nothing yet"; a write is
  retried until ``timeout`` seconds have passed, then the link counts as broken.
* **Stall** (``EPIPE``): ``clear_halt`` on that endpoint and carry on.  The adapter's contract is that
  a stalled transfer consumed nothing and a cleared bulk OUT restarts at a frame boundary, so the
  frames being written go again, whole.  An endpoint that keeps stalling breaks the link.
* **Reply lost** (a dropped or corrupted frame): once the oldest answer is ``timeout`` overdue the
  thread sends a PING; answers are ordered, so when its PONG comes back every command written before
  it and still unanswered has lost its answer -> ``TransportLost(tags, permanent=False)``.  No PONG
  within ``timeout`` either: the link is broken.
* **Link broken**: ``ENODEV`` after an unplug, any other USB error, a BYE, ``NOT_HELLO``, a stream
  that no longer parses.  The frames of a write that failed count as sent (in doubt).  The thread
  re-enumerates with back-off (``reconnect_delay`` doubling up to ``reconnect_delay_max``, with
  jitter: :class:`~apcrypto.transport.framed.Backoff`), configures the device afresh and says HELLO
  again.
* **Device gone**: no handshake within ``peer_deadline`` of the break.  The thread goes on looking
  for the device at the capped back-off, so a device plugged in again is used again by itself,
  until ``close()`` or, if the caller set it, ``give_up_after``.

``close()`` is idempotent, says BYE when it can, joins the thread and never raises, plugged or not.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import itertools
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Unpack

import usb.core
import usb.util

from apcrypto.transport.base import Command, TransportEvent
from apcrypto.transport.framed import (
    ERROR_RESPONSE_CODES,
    FramedTransport,
    HandshakeRefused,
    LinkOptions,
    link_options,
)
from apformats import frames
from apformats.errors import FormatError
from apformats.results import Instr

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

#: environment variable naming a module whose ``get_backend()`` gives the pyusb backend
BACKEND_ENV = "APCRYPTO_USB_BACKEND"
#: instructions after which a queue raises no interrupts until the next AQIC enable
IRQ_OFF: frozenset[Instr] = frozenset({Instr.AQIC, Instr.RAPQ, Instr.ZAPQ})

READ_SIZE = 64 * 1024  # one bulk IN transfer (a multiple of every wMaxPacketSize)
IRQ_READ_SIZE = 1024
SLICE_MS = 1  # how long one read may block when there may be nothing to read
WRITE_SLICE_MS = 50  # how long one bulk OUT write may wait before answers are read (see _write_queued)
IRQ_POLL_INTERVAL = 0.002  # seconds between interrupt IN polls while a queue may interrupt
IDLE_POLL = 0.05  # seconds between reads of both IN endpoints however quiet the link is
MAX_STALLS = 8  # consecutive stalls on one endpoint before the link counts as broken


class UsbDeviceNotFound(ConnectionError):
    """At open: no such device on the bus (or no pyusb backend / library to look with)."""


class UsbHandshakeRefused(HandshakeRefused):
    """At open: the adapter answered HELLO with an ERROR (version or domains).  ``code``: ErrorCode."""


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


@dataclass(slots=True)
class _Link:
    """The open device and its three endpoints (the I/O thread's alone)."""

    dev: usb.core.Device
    ep_out: int
    ep_in: int
    ep_irq: int


class UsbTransport(FramedTransport):
    """A :class:`Transport` over pyusb bulk and interrupt pipes, driven by one I/O thread.
    Build it with :func:`open_usb`."""

    peer_kind = "adapter"
    thread_name = "apcrypto-usb"
    refused_error = UsbHandshakeRefused

    def __init__(self, locator: UsbLocator, backend: Any, **link: Unpack[LinkOptions]) -> None:
        super().__init__(str(locator), **link)
        if not self.reconnect_delay > 0:  # the back-off loop waits that long between attempts
            raise ValueError(f"reconnect_delay must be > 0, got {self.reconnect_delay!r}")
        self.locator = locator
        self.backend = backend
        self._irq_qids: set[int] = set()  # queues an AQIC enable went to (no disable or reset since); _cv
        # the I/O thread's own
        self._link: _Link | None = None
        self._in_reader = frames.FrameStream()
        self._irq_reader = frames.FrameStream()
        self._out: list[tuple[Command, bytes]] = []  # taken from the outbox, being written, in order
        self._out_pos = 0  # bytes of _out[0] the device has accepted
        self._ping: tuple[int, float, list[int]] | None = None  # token, sent at, tags it vouches for
        self._tokens = itertools.count(1)
        self._stalls: Counter[int] = Counter()
        self._next_irq = 0.0
        self._next_idle_poll = 0.0
        self._buffers: dict[int, Any] = {}  # read size -> reusable array('B')
        self._start_io()  # the thread always gives a verdict: found and welcomed, or why not

    def _note_submitted(self, commands: Sequence[Command]) -> None:
        for c in commands:  # where interrupts may come from decides how often to look for them
            if c.instr is Instr.AQIC and c.flag:
                self._irq_qids.add(c.qid)
            elif c.instr in IRQ_OFF:
                self._irq_qids.discard(c.qid)

    # -- the I/O thread: life cycle --------------------------------------------------------------------
    def _io_main(self) -> None:
        try:
            self._connect()
        except HandshakeRefused as exc:
            self._refused(exc)
            return
        except Exception as exc:
            if not isinstance(exc, UsbDeviceNotFound):
                exc = UsbDeviceNotFound(f"usb: cannot open {self.locator}: {_describe(exc)}")
            self._fail_open(exc)
            return
        down_since = 0.0
        while not self._stop:
            if self._state == "up":
                try:
                    self._service()
                except (usb.core.USBError, _LinkBroken, FormatError) as exc:
                    down_since = time.monotonic()
                    self._link_down(f"usb: {_describe(exc)}")
            elif self._state == "down":
                self._reconnect(down_since)
            else:  # lost: nothing left but to be closed
                self._wait(1.0)

    def _reconnect(self, down_since: float) -> None:
        """One attempt to find the device again; then a back-off pause, cut short when the peer is
        due to be declared gone or given up on (the verdicts come on time whatever the pause)."""
        now = time.monotonic()
        gone_at, give_up_at = self._outage_limits(down_since)
        if give_up_at is not None and now >= give_up_at:
            self._give_up(f"usb: {self.locator} did not come back within {self.give_up_after} s")
            return
        if gone_at is not None and now >= gone_at:
            self._declare_gone(f"usb: {self.locator} did not come back within {self.peer_deadline} s")
            gone_at = None
        try:
            self._connect()
            return
        except HandshakeRefused as exc:
            self._refused(exc)
        except (usb.core.USBError, _LinkBroken, FormatError, UsbDeviceNotFound) as exc:
            self._log.debug("%r: reconnect failed: %s", self, _describe(exc))
        except Exception as exc:  # a device that is not what it says (a bad descriptor, a backend
            # bug): this attempt failed, the next may find the right one -- never the end of the link
            self.counters["reconnect_errors"] += 1
            self._log.warning("%r: reconnect failed: %s", self, _describe(exc))
        pause = self.backoff.next()
        limits = [t - time.monotonic() for t in (gone_at, give_up_at) if t is not None]
        self._wait(max(0.0, min([pause, *limits])))

    def _wait(self, seconds: float) -> None:
        with self._cv:
            if not self._stop:
                self._cv.wait(seconds)

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
            self._dispose()
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
                    self._session_up(f)
                    self._in_reader.max_len = self._rx_limit
                    return
                refusal = self._refusal(f) if isinstance(f, frames.ErrorFrame) else None
                if refusal is not None:
                    raise refusal
                self._log.debug("%r: ignoring %r before WELCOME", self, f)
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
        self._out += self._take_outbox()
        if self._out:
            self._write_queued()
        now = time.monotonic()
        busy = bool(self._inflight or self._ping)
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
        if not self._inflight and not self._ping:
            wake = min(self._next_idle_poll, self._next_irq) if self._irq_qids else self._next_idle_poll
            with self._cv:
                if not self._outbox and not self._stop:
                    self._cv.wait(max(0.0, wake - time.monotonic()))

    def _write_queued(self) -> None:
        """Write every queued frame in one transfer; resume after partial counts, stalls, timeouts.

        An adapter may hold back (NAK) what we write while the answers it already has wait to be
        read: so a write is given a slice of time at once, and between slices bulk IN is read; the
        link is broken only when bulk OUT takes nothing for ``timeout``."""
        link = self._link
        assert link is not None
        deadline = time.monotonic() + self.timeout
        while self._out:
            data = b"".join(f for _, f in self._out)[self._out_pos :]
            try:
                n = link.dev.write(link.ep_out, data, min(WRITE_SLICE_MS, _ms(deadline - time.monotonic())))
            except usb.core.USBTimeoutError:
                self.counters["write_timeouts"] += 1
                if time.monotonic() >= deadline:
                    raise _LinkBroken(f"bulk OUT accepted nothing for {self.timeout} s") from None
                self._on_frames(self._read(link.ep_in, self._in_reader, READ_SIZE, SLICE_MS))
                self._in_reader.check()
                continue
            except usb.core.USBError as exc:
                if exc.errno != errno.EPIPE:
                    raise
                self._clear_stall(link.ep_out)
                self._out_pos = 0  # the adapter restarts its stream at a frame boundary
                continue
            self._stalls[link.ep_out] = 0
            if n:
                deadline = time.monotonic() + self.timeout  # it took some: the wait starts again
            pos, now, done = self._out_pos + n, time.monotonic(), 0
            for cmd, f in self._out:  # the frames the device now has whole are in flight
                if pos < len(f):
                    break
                pos -= len(f)
                self._inflight[cmd.tag] = (cmd, now)
                done += 1
            del self._out[:done]
            self.counters["sent"] += done
            self._out_pos = pos

    def _write_frame(self, frame: bytes) -> None:
        """Write one frame of our own (HELLO, PING, PONG), retrying timeouts and stalls like the queue."""
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
            self._stalls[ep] = 0  # it answered (nothing yet): not a stall, so the run of stalls ends
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
        self._log.info("%r: endpoint %#04x stalled; clearing the halt", self, ep)
        link.dev.clear_halt(ep)

    # -- the I/O thread: lost answers ------------------------------------------------------------------
    def _check_answers(self, now: float) -> None:
        """PING once the oldest answer is overdue; a PING unanswered that long means a dead link."""
        if self._ping is not None:
            if now - self._ping[1] > self.timeout:
                raise _LinkBroken(f"no PONG within {self.timeout} s")
            return
        if self._inflight and now - next(iter(self._inflight.values()))[1] >= self.timeout:
            token = next(self._tokens)
            self._write_frame(frames.encode_ping(token))
            self._ping = (token, now, list(self._inflight))
            self.counters["pings"] += 1

    def _on_pong(self, token: int) -> TransportEvent | None:
        if self._ping is None or self._ping[0] != token:
            return None
        vouched, self._ping = self._ping[2], None
        return self._no_answer(vouched, f"usb: no answer within {self.timeout} s (frame lost in transit)")

    # -- FramedTransport hooks ---------------------------------------------------------------------------
    def _say_bye(self) -> None:
        link = self._link
        if link is not None and link.ep_out:
            with contextlib.suppress(usb.core.USBError, ValueError):
                link.dev.write(link.ep_out, frames.encode_bye("client closing"), 50)

    def _drop_link(self) -> list[Command]:
        self._dispose()
        doubt = [c for c, _ in self._out]  # handed to a write that failed: may have arrived
        self._out, self._out_pos, self._ping = [], 0, None
        return doubt

    def _link_broken(self, reason: str) -> None:
        raise _LinkBroken(reason)  # unwinds the round; the loop reconnects

    def _dispose(self) -> None:
        link, self._link = self._link, None
        if link is not None:
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
        raise UsbDeviceNotFound("usb: the device's interface 0 lacks the AP adapter endpoints")
    return int(ep.bEndpointAddress)


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))  # 0 would mean "forever" to libusb


def _describe(exc: BaseException) -> str:
    if isinstance(exc, usb.core.USBError) and exc.errno == errno.ENODEV:
        return "device gone (ENODEV)"
    if isinstance(exc, _LinkBroken):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def open_usb(url: str, *, backend: Any = None, **options: Any) -> UsbTransport:
    """Open ``usb://VID:PID[/SERIAL]``: find the device, configure it, HELLO, start the I/O thread.

    ``backend``: a pyusb ``IBackend`` or a backend module's name (default ``$APCRYPTO_USB_BACKEND``,
    else libusb).  The link options (``domains``, ``timeout``: handshake, write and per-answer
    deadline, ``reconnect_delay``, ``reconnect_delay_max``, ``peer_deadline``: how long a vanished
    device may take to come back) are :class:`~apcrypto.transport.framed.LinkOptions`.  Raises
    :class:`UsbDeviceNotFound` or :class:`UsbHandshakeRefused` (both ``ConnectionError``), ValueError
    for a malformed URL.  Options meant for other transports are ignored.
    """
    return UsbTransport(parse_usb_url(url), resolve_backend(backend), **link_options(options))
