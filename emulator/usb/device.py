"""The device model behind one plugged adapter: chapter 9 state, endpoint pipes and a frame session.

What the host sees is a vendor-specific interface with three endpoints, found by kind, not by number
(the description decides the numbers): bulk OUT carries instruction frames to the adapter, bulk IN
carries result frames back, interrupt IN carries AP interrupts.  Bulk OUT bytes are cut into frames
(:class:`apformats.frames.FrameStream`, the host's reassembler too), each frame goes to a frame
session (``one frame in -> frames out``, transport-independent) and what it answers is queued on
bulk IN as a byte stream the host reads in whatever sizes it likes.  The session's ``notify``
callback (an AP interrupt, from the emulator's clock) queues an INTERRUPT frame on the interrupt
endpoint.

Faults come through a small control API (the lewis idea: a control plane beside the data plane):
:meth:`VirtualUsbDevice.stall`, :meth:`inject_timeouts`, :meth:`limit_reads`, unplug/replug through
the bus.  Each surfaces to the host as the error triple libusb would give (:mod:`emulator.usb.errors`).

Locking: ``_cond`` guards the device state and is never held while calling into the session (which
takes the emulator's lock, whose clock thread calls back into ``_on_interrupt`` under that lock).
``_session_lock`` serialises whole writes so frames reach the session in stream order.  Order:
``_session_lock`` -> emulator lock -> ``_cond``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from apformats.frames import HEADER_LEN, TRAILER_LEN, FrameKind, FrameSize, FrameStream, peek_kind
from emulator.usb import errors
from emulator.usb.descriptors import (
    DT_CONFIG,
    DT_DEVICE,
    DT_STRING,
    AltSetting,
    Configuration,
    UsbDescription,
    configuration_descriptor_bytes,
    device_descriptor_bytes,
    langid_descriptor_bytes,
    string_descriptor_bytes,
)

log = logging.getLogger(__name__)

# standard requests (USB 2.0 table 9-4) and feature selectors
GET_STATUS, CLEAR_FEATURE, SET_FEATURE = 0x00, 0x01, 0x03
GET_DESCRIPTOR, GET_CONFIGURATION, SET_CONFIGURATION = 0x06, 0x08, 0x09
GET_INTERFACE, SET_INTERFACE = 0x0A, 0x0B
ENDPOINT_HALT = 0
RECIPIENT_DEVICE, RECIPIENT_INTERFACE, RECIPIENT_ENDPOINT = 0, 1, 2

#: frames the wire faults apply to (the ZeroMQ server's set: answers to commands and interrupts)
FAULTABLE: frozenset[int] = frozenset({FrameKind.RESULT, FrameKind.ERROR, FrameKind.INTERRUPT})

#: bytes the device keeps queued on bulk IN before it NAKs bulk OUT (a real device's buffer limit)
DEFAULT_IN_BACKLOG = 1 << 20


class Session(Protocol):
    """A transport-independent frame session: one frame's bytes in, the frames to send back out."""

    def handle(self, frame: bytes) -> list[bytes]: ...


class TransportFaultSource(Protocol):
    """``emulator.control.transport_faults``: frame faults the wire owner applies (one per call)."""

    def take_drop(self) -> bool: ...
    def take_corrupt(self) -> bool: ...
    def take_disconnect(self) -> bool: ...


#: builds a session whose AP interrupts go to the given callable (INTERRUPT frame bytes)
SessionFactory = Callable[[Callable[[bytes], None]], Session]


@dataclass(frozen=True, slots=True)
class Roles:
    """Which endpoint does what, found by kind in the active alternate setting."""

    frames_out: int  # bulk OUT: host -> adapter
    frames_in: int  # bulk IN: adapter -> host
    interrupts: int  # interrupt IN: AP interrupts


def find_roles(alt: AltSetting) -> Roles:
    """The adapter's three endpoints in ``alt``; ValueError when the description lacks one."""

    def one(transfer_type: int, is_in: bool, what: str) -> int:
        found = [
            e.bEndpointAddress for e in alt.endpoints if e.transfer_type == transfer_type and e.is_in == is_in
        ]
        if len(found) != 1:
            raise ValueError(f"the adapter interface needs exactly one {what} endpoint, found {found}")
        return found[0]

    return Roles(
        frames_out=one(2, False, "bulk OUT"),
        frames_in=one(2, True, "bulk IN"),
        interrupts=one(3, True, "interrupt IN"),
    )


@dataclass
class DeviceStats:
    """Counters tests read to check that a path was really taken."""

    frames_in: int = 0  # frames the session received
    frames_out: int = 0  # frames queued on bulk IN
    interrupts: int = 0  # INTERRUPT frames queued on interrupt IN
    transfers_out: int = 0  # bulk OUT transfers accepted (pipelining packs many frames into one)
    bytes_written: int = 0
    bytes_read: int = 0
    sessions: int = 0
    faults: dict[str, int] = field(default_factory=dict)

    def fault(self, kind: str) -> None:
        self.faults[kind] = self.faults.get(kind, 0) + 1


class VirtualUsbDevice:
    """One emulated adapter as a USB device.  Host-side calls come from the backend with a token
    (the open handle's identity); control-plane calls come from tests and operators."""

    def __init__(
        self,
        description: UsbDescription,
        session_factory: SessionFactory,
        frame_size: FrameSize,
        *,
        in_backlog: int = DEFAULT_IN_BACKLOG,
        name: str = "",
        transport_faults: TransportFaultSource | None = None,
    ) -> None:
        for cfg in description.configurations:  # fail at plug time, not at the first transfer
            first = [alts[0] for alts in cfg.interfaces if alts and alts[0].descriptor.bInterfaceNumber == 0]
            if not first:
                raise ValueError(
                    f"configuration {cfg.descriptor.bConfigurationValue} has no interface 0 "
                    "(the adapter's frames go through interface 0, alternate setting 0)"
                )
            find_roles(first[0])
        self.description = description
        self.name = name or (description.serial_number or "usb-adapter")
        self.stats = DeviceStats()
        self._session_factory = session_factory
        self._in_backlog = in_backlog
        self._cond = threading.Condition()
        self._session_lock = threading.Lock()
        # bus state
        self.attached = False
        self.generation = 0  # bumps on every attach/detach: handles of an older generation are dead
        self.bus_number = description.bus
        self.address: int | None = None
        self.port_numbers = description.port_numbers
        # chapter 9 state
        self._config: Configuration | None = None
        self._alts: dict[int, int] = {}
        self._claims: dict[int, object] = {}
        self._roles: Roles | None = None
        # pipes
        self._out = FrameStream(frame_size=frame_size)
        self._in: dict[int, bytearray] = {}
        self._session: Session | None = None
        self._session_id = 0
        # faults
        self._halted: set[int] = set()
        self._timeouts: dict[int, int] = {}
        self._max_read: int | None = None
        self._transport_faults = transport_faults
        self._bus: Any = None  # the virtual bus this device is plugged into (set by the bus)

    def __repr__(self) -> str:
        state = f"bus {self.bus_number} addr {self.address}" if self.attached else "unplugged"
        return f"<VirtualUsbDevice {self.name} {state}>"

    # -- control plane ----------------------------------------------------------------------------
    def unplug(self) -> None:
        """Pull the cable (see :meth:`emulator.usb_backend.VirtualBus.unplug`)."""
        if self._bus is not None:
            self._bus.unplug(self)

    def replug(self) -> None:
        """Plug the cable back in, at a new address."""
        if self._bus is not None:
            self._bus.replug(self)

    def restart(self) -> None:
        """Firmware restart: the adapter forgets its session and flushes its pipes, but stays on the
        bus (no re-enumeration), so the host learns it from the NOT_HELLO answers to its next frames."""
        with self._cond:
            if not self.attached:
                return
            old = self._reset_state_locked(unconfigure=False)
            self.stats.fault("restart")
            self._cond.notify_all()
        _close_session(old)

    def stall(self, ep: int) -> None:
        """Halt endpoint ``ep``: every transfer on it fails with EPIPE until the host clears the halt."""
        with self._cond:
            self._halted.add(ep)
            self._cond.notify_all()

    def inject_timeouts(self, ep: int, count: int = 1) -> None:
        """Make the next ``count`` transfers on ``ep`` time out, moving no data."""
        with self._cond:
            self._timeouts[ep] = self._timeouts.get(ep, 0) + count

    def inject_bytes(self, ep: int, data: bytes) -> None:
        """Queue raw bytes on IN endpoint ``ep``, as confused firmware would send them (a host must
        notice its stream is out of step and start the device over)."""
        with self._cond:
            if ep not in self._in:
                raise ValueError(f"{ep:#04x} is not an IN endpoint of the active configuration")
            self._in[ep] += data
            self.stats.fault("garbage")
            self._cond.notify_all()

    def limit_reads(self, max_bytes: int | None) -> None:
        """Return at most ``max_bytes`` per IN transfer (short reads split frames), None to lift."""
        with self._cond:
            self._max_read = max_bytes

    def clear_faults(self) -> None:
        with self._cond:
            self._halted.clear()
            self._timeouts.clear()
            self._max_read = None
            self._cond.notify_all()

    def halted(self) -> set[int]:
        with self._cond:
            return set(self._halted)

    # -- bus: called by the virtual bus -----------------------------------------------------------
    def _attach(self, address: int) -> None:
        with self._cond:
            self.generation += 1
            self.attached = True
            self.address = address
            self._reset_state_locked(unconfigure=True)
        log.debug("%r attached", self)

    def _detach(self) -> None:
        with self._cond:
            self.generation += 1
            self.attached = False
            session = self._reset_state_locked(unconfigure=True)
            self._cond.notify_all()  # blocked transfers wake up and see ENODEV
        _close_session(session)
        log.debug("%r detached", self)

    def _reset_state_locked(self, *, unconfigure: bool) -> Session | None:
        """Back to a clean pipe state; returns the old session for closing outside the lock."""
        if unconfigure:
            self._config = None
            self._alts.clear()
            self._claims.clear()
            self._roles = None
        self._out.reset()
        self._in = {}
        self._halted.clear()
        self._timeouts.clear()
        old, self._session = self._session, None
        self._session_id += 1
        if self._config is not None:
            self._start_session_locked()
        return old

    def _start_session_locked(self) -> None:
        assert self._config is not None
        self._roles = find_roles(self._active_alt_locked(0))
        self._in = {self._roles.frames_in: bytearray(), self._roles.interrupts: bytearray()}
        sid = self._session_id
        self._session = self._session_factory(lambda frame: self._on_interrupt(sid, frame))
        self.stats.sessions += 1

    def _on_interrupt(self, sid: int, frame: bytes) -> None:
        """The session's AP interrupt: queue its frame on the interrupt endpoint (any thread)."""
        with self._cond:
            if sid != self._session_id or not self.attached or self._roles is None:
                return  # an interrupt of a session the host no longer has
            for f in self._wire_faults([frame]):
                self._in[self._roles.interrupts] += f
                self.stats.interrupts += 1
            self._cond.notify_all()

    # -- host side: called by the backend with the handle token -----------------------------------
    def check_alive(self, generation: int) -> None:
        """ENODEV unless the handle's generation is the device's current, attached one."""
        if not self.attached or generation != self.generation:
            raise errors.no_device_error(self.name)

    def open(self, generation: int) -> None:
        with self._cond:
            self.check_alive(generation)

    def close(self, generation: int, token: object) -> None:
        with self._cond:
            for intf in [i for i, t in self._claims.items() if t is token]:
                del self._claims[intf]

    def get_configuration(self, generation: int) -> int:
        with self._cond:
            self.check_alive(generation)
            return self._config.descriptor.bConfigurationValue if self._config else 0

    def set_configuration(self, generation: int, value: int, token: object = None) -> None:
        """SET_CONFIGURATION: a fresh pipe state and a fresh session (0 = unconfigured).  Refused
        (busy) while another handle (``token``: the caller's) holds an interface, as Linux's usbfs
        refuses it: a second opener must not reset the session the first one is using."""
        with self._cond:
            self.check_alive(generation)
            if value == 0:
                cfg = None
            else:
                cfgs = [
                    c for c in self.description.configurations if c.descriptor.bConfigurationValue == value
                ]
                if not cfgs:
                    raise errors.not_found_error(f"configuration {value}")
                cfg = cfgs[0]
            others = any(t is not token for t in self._claims.values())
            if others or (self._claims and cfg is not self._config):
                raise errors.busy_error("interfaces are claimed")
            self._config = cfg
            self._alts.clear()
            old = self._reset_state_locked(unconfigure=False)
            if cfg is None:
                self._roles = None
        _close_session(old)

    def claim_interface(self, generation: int, token: object, intf: int) -> None:
        with self._cond:
            self.check_alive(generation)
            if self._config is None or self._config.altsetting(intf, 0) is None:
                raise errors.not_found_error(f"interface {intf}")
            holder = self._claims.get(intf)
            if holder is not None and holder is not token:
                raise errors.busy_error(f"interface {intf} is claimed by another handle")
            self._claims[intf] = token

    def release_interface(self, generation: int, token: object, intf: int) -> None:
        with self._cond:
            self.check_alive(generation)
            if self._claims.get(intf) is not token:
                raise errors.not_found_error(f"interface {intf} is not claimed by this handle")
            del self._claims[intf]

    def set_interface_altsetting(self, generation: int, intf: int, alt: int) -> None:
        with self._cond:
            self.check_alive(generation)
            if self._config is None or self._config.altsetting(intf, alt) is None:
                raise errors.not_found_error(f"interface {intf} alternate {alt}")
            self._alts[intf] = alt

    def clear_halt(self, generation: int, ep: int) -> None:
        """CLEAR_FEATURE(ENDPOINT_HALT): the pipe works again.  A cleared bulk OUT restarts its
        stream at a frame boundary (the host resends whole frames after a stall)."""
        with self._cond:
            self.check_alive(generation)
            self._endpoint_locked(ep)
            self._halted.discard(ep)
            if self._roles is not None and ep == self._roles.frames_out:
                self._out.reset()
            self._cond.notify_all()

    def reset(self, generation: int) -> None:
        """Port reset: pipes and session start over; libusb restores configuration and claims."""
        with self._cond:
            self.check_alive(generation)
            old = self._reset_state_locked(unconfigure=False)
        _close_session(old)

    def bulk_write(self, generation: int, token: object, ep: int, data: bytes, timeout: float) -> int:
        """Bulk OUT: accept all of ``data`` or raise; whole frames found go to the session."""
        self._maybe_glitch(generation)
        with self._session_lock:
            deadline = time.monotonic() + timeout
            with self._cond:
                self._transfer_checks_locked(generation, token, ep, out=True)
                roles = self._roles
                assert roles is not None
                # NAK while the host leaves our IN buffer full (real devices run out of RAM too)
                while len(self._in[roles.frames_in]) >= self._in_backlog:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        self.stats.fault("write-backlog-timeout")
                        raise errors.timeout_error(f"bulk OUT {ep:#04x}: IN backlog full")
                    self._cond.wait(remaining)
                    self._transfer_checks_locked(generation, token, ep, out=True, count_timeout=False)
                try:
                    frames = self._out.feed(data)
                    # a stalled transfer consumed nothing (the host resends it whole): no frame of a
                    # transfer with a bad header reaches the session, not even those before it
                    self._out.check()
                except ValueError as exc:  # the codec rejected a header: the stream is out of step
                    self._halted.add(ep)
                    self._out.reset()
                    self.stats.fault("bad-frame-stall")
                    log.warning("%r: bad frame header on %#04x, stalling: %s", self, ep, exc)
                    raise errors.pipe_error(f"bulk OUT {ep:#04x}: bad frame") from None
                self.stats.bytes_written += len(data)
                self.stats.transfers_out += 1
                session, sid = self._session, self._session_id
            replies = self._wire_faults(self._run_session(session, frames))
            with self._cond:
                if sid == self._session_id and self.attached:
                    buf = self._in[roles.frames_in]
                    for r in replies:
                        buf += r
                    self.stats.frames_in += len(frames)
                    self.stats.frames_out += len(replies)
                    if replies:
                        self._cond.notify_all()
        return len(data)

    def read(self, generation: int, token: object, ep: int, size: int, timeout: float) -> bytes:
        """Bulk or interrupt IN: up to ``size`` bytes once any are there, else time out."""
        self._maybe_glitch(generation)
        deadline = time.monotonic() + timeout
        with self._cond:
            self._transfer_checks_locked(generation, token, ep, out=False)
            while True:
                buf = self._in.get(ep)
                if buf:
                    n = min(size, len(buf), self._max_read or size)
                    data = bytes(buf[:n])
                    del buf[:n]
                    self.stats.bytes_read += n
                    self._cond.notify_all()  # room for NAKed writes
                    return data
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise errors.timeout_error(f"IN {ep:#04x}")
                self._cond.wait(remaining)
                self._transfer_checks_locked(generation, token, ep, out=False, count_timeout=False)

    def control(
        self, generation: int, request_type: int, request: int, value: int, index: int, data: bytes | int
    ) -> bytes | int:
        """A control transfer on endpoint 0: IN returns the bytes (``data`` is wLength), OUT the count."""
        with self._cond:
            self.check_alive(generation)
            kind = (request_type >> 5) & 0x3
            recipient = request_type & 0x1F
            if kind != 0:
                raise errors.pipe_error(f"unsupported request type {request_type:#04x}")  # a STALL
            if request_type & 0x80:
                assert isinstance(data, int)
                return self._standard_in_locked(recipient, request, value, index)[:data]
            self._standard_out_locked(recipient, request, value, index)
            return 0 if isinstance(data, int) else len(data)

    # -- helpers ----------------------------------------------------------------------------------
    def _maybe_glitch(self, generation: int) -> None:
        """``transport_faults.disconnect()``: the device drops off the bus and re-enumerates at once
        (a cable glitch), so the host's handle dies with ENODEV and a new enumeration finds it."""
        tf = self._transport_faults
        if tf is None or generation != self.generation or not tf.take_disconnect():
            return
        self.stats.fault("disconnect")
        bus = self._bus
        if bus is not None:
            bus.unplug(self)
            bus.replug(self)
        raise errors.no_device_error(f"{self.name} (disconnect injected)")

    def _wire_faults(self, replies: list[bytes]) -> list[bytes]:
        """``transport_faults`` drop / corrupt, as the ZeroMQ server applies them: to the frames that
        answer commands and to interrupts (handshake and heartbeat frames are exempt, so a fault hits
        the conversation under test).  A corrupted frame has one body byte flipped: its header is
        intact, so the stream stays in step, and its CRC fails."""
        tf = self._transport_faults
        if tf is None:
            return replies
        out = []
        for r in replies:
            if peek_kind(r) in FAULTABLE:
                if tf.take_drop():
                    self.stats.fault("drop")
                    continue
                if tf.take_corrupt():
                    self.stats.fault("corrupt")
                    i = HEADER_LEN if len(r) > HEADER_LEN + TRAILER_LEN else len(r) - 1
                    r = r[:i] + bytes((r[i] ^ 0xFF,)) + r[i + 1 :]
            out.append(r)
        return out

    def _run_session(self, session: Session | None, frames: Iterable[bytes]) -> list[bytes]:
        replies: list[bytes] = []
        if session is None:
            return replies
        for f in frames:
            try:
                replies.extend(session.handle(f))
            except Exception:  # a session bug: surface as a stalled pipe, loudly in the log
                log.exception("%r: frame session failed on a frame", self)
                with self._cond:
                    if self._roles is not None:
                        self._halted.add(self._roles.frames_out)
                    self.stats.fault("session-error")
                raise errors.pipe_error("frame session error") from None
        return replies

    def _active_alt_locked(self, intf: int) -> AltSetting:
        assert self._config is not None
        alt = self._config.altsetting(intf, self._alts.get(intf, 0))
        assert alt is not None
        return alt

    def _endpoint_locked(self, ep: int) -> None:
        if self._config is None:
            raise errors.not_found_error("device is not configured")
        for alts in self._config.interfaces:
            number = alts[0].descriptor.bInterfaceNumber
            if any(e.bEndpointAddress == ep for e in self._active_alt_locked(number).endpoints):
                return
        raise errors.not_found_error(f"endpoint {ep:#04x}")

    def _transfer_checks_locked(
        self, generation: int, token: object, ep: int, *, out: bool, count_timeout: bool = True
    ) -> None:
        self.check_alive(generation)
        self._endpoint_locked(ep)
        if bool(ep & 0x80) == out:
            raise errors.invalid_param_error(f"endpoint {ep:#04x} direction")
        if ep in self._halted:
            self.stats.fault("stall")
            raise errors.pipe_error(f"endpoint {ep:#04x} halted")
        if count_timeout and self._timeouts.get(ep):
            self._timeouts[ep] -= 1
            self.stats.fault("timeout")
            raise errors.timeout_error(f"endpoint {ep:#04x} (injected)")

    def _standard_in_locked(self, recipient: int, request: int, value: int, index: int) -> bytes:
        d = self.description
        if request == GET_DESCRIPTOR and recipient == RECIPIENT_DEVICE:
            dtype, dindex = value >> 8, value & 0xFF
            if dtype == DT_DEVICE:
                return device_descriptor_bytes(d.device)
            if dtype == DT_CONFIG and dindex < len(d.configurations):
                return configuration_descriptor_bytes(d.configurations[dindex])
            if dtype == DT_STRING:
                if dindex == 0:
                    return langid_descriptor_bytes(d.langids)
                text = d.string(dindex)
                if text is not None and index in d.langids:
                    return string_descriptor_bytes(text)
            raise errors.pipe_error(f"no descriptor type {dtype} index {dindex}")
        if request == GET_CONFIGURATION and recipient == RECIPIENT_DEVICE:
            return bytes((self._config.descriptor.bConfigurationValue if self._config else 0,))
        if request == GET_INTERFACE and recipient == RECIPIENT_INTERFACE and self._config is not None:
            return bytes((self._alts.get(index, 0),))
        if request == GET_STATUS:
            if recipient == RECIPIENT_ENDPOINT:
                return bytes((1 if index in self._halted else 0, 0))
            if recipient == RECIPIENT_DEVICE:
                cfg = self._config or d.configurations[0]
                return bytes((1 if cfg.descriptor.bmAttributes & 0x40 else 0, 0))
            return b"\x00\x00"
        raise errors.pipe_error(f"unsupported request {request:#04x}")

    def _standard_out_locked(self, recipient: int, request: int, value: int, index: int) -> None:
        if (
            recipient == RECIPIENT_ENDPOINT
            and request in (CLEAR_FEATURE, SET_FEATURE)
            and value == ENDPOINT_HALT
        ):
            self._endpoint_locked(index)
            if request == SET_FEATURE:
                self._halted.add(index)
            else:
                self._halted.discard(index)
                if self._roles is not None and index == self._roles.frames_out:
                    self._out.reset()
            self._cond.notify_all()
            return
        # SET_CONFIGURATION / SET_INTERFACE belong to the backend's own calls, as libusb does them
        raise errors.pipe_error(f"unsupported request {request:#04x}")


def _close_session(session: Session | None) -> None:
    close = getattr(session, "close", None)
    if callable(close):
        try:
            close()
        except Exception:  # closing a session must never break an unplug
            log.exception("closing a frame session failed")


__all__ = [
    "DEFAULT_IN_BACKLOG",
    "DeviceStats",
    "Roles",
    "Session",
    "SessionFactory",
    "VirtualUsbDevice",
    "find_roles",
]
