"""A software ``usb.backend.IBackend``: emulated AP adapters as USB devices on a virtual bus.

The pyftdi pattern (``pyftdi/tests/backend/usbvirt.py``), kept as supported API rather than a test
helper: real pyusb code (``usb.core.find``, ``Device.write/read``, ``usb.util.dispose_resources``)
runs unchanged against emulated hardware, with no libusb on the machine.  A module-level bus makes
discovery work without code changes (pyvisa-sim's ``@sim``):

    from emulator import usb_backend
    dev = usb_backend.plug(emulator)                  # appears on the bus
    t = apcrypto.transport.open_transport("usb://1209:0a70", backend=usb_backend.get_backend())
    # or: APCRYPTO_USB_BACKEND=emulator.usb_backend and no code change at all
    dev.unplug(); dev.replug(); dev.stall(0x81)       # faults, as libusb error triples

The backend is a thin adapter: it validates handles, turns pyusb's millisecond timeouts into capped
seconds (0 means "forever" to libusb; here "forever" is :data:`MAX_BLOCK_MS`, so no test can hang)
and hands each call to the device model (:mod:`emulator.usb.device`).
"""

from __future__ import annotations

import array
import itertools
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import usb.backend

from apformats.frames import FrameSize
from emulator.usb import errors
from emulator.usb.descriptors import (
    Configuration,
    ConfigurationDescriptor,
    DeviceDescriptor,
    EndpointDescriptor,
    InterfaceDescriptor,
    UsbDescription,
    load_description,
)
from emulator.usb.device import DEFAULT_IN_BACKLOG, SessionFactory, VirtualUsbDevice

log = logging.getLogger(__name__)

#: longest any one backend call blocks, whatever timeout the caller asked for (0 = "infinite")
MAX_BLOCK_MS = 5000

Description = UsbDescription | Mapping[str, Any] | str | Path | None


# -- the virtual bus -----------------------------------------------------------------------------


class VirtualBus:
    """The devices plugged in, with bus addresses handed out as a hub would (1..127, never reused
    while in use; a replugged device gets a new one)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._devices: list[VirtualUsbDevice] = []
        self._addresses = itertools.cycle(range(1, 128))

    def plug(
        self,
        emulator: Any = None,
        description: Description = None,
        *,
        serial: str | None = None,
        allowed_domains: Iterable[int] | None = None,
        session_factory: SessionFactory | None = None,
        frame_size: FrameSize | None = None,
        in_backlog: int = DEFAULT_IN_BACKLOG,
    ) -> VirtualUsbDevice:
        """Plug an emulated adapter in; returns the device handle (its control API).

        ``emulator`` is an :class:`emulator.Emulator`; the device serves it through a
        :class:`emulator.frame_server.FrameSession` limited to ``allowed_domains``.  Tests of the USB
        plumbing alone may pass ``session_factory`` and ``frame_size`` instead.
        """
        desc = load_description(description)
        if serial is not None:
            desc = desc.with_serial(serial)
        name = f"usb:{desc.serial_number or 'adapter'}"
        if session_factory is None:
            if emulator is None:
                raise ValueError("plug() needs an emulator or a session_factory")
            session_factory = _frame_session_factory(emulator, allowed_domains, name)
        if frame_size is None:
            frame_size = codec_frame_size()
        faults = getattr(getattr(emulator, "control", None), "transport_faults", None)
        dev = VirtualUsbDevice(
            desc, session_factory, frame_size, in_backlog=in_backlog, name=name, transport_faults=faults
        )
        self._attach(dev)
        return dev

    def unplug(self, device: VirtualUsbDevice) -> None:
        """Pull the cable: open handles get ENODEV on every call, enumeration stops listing it."""
        with self._lock:
            if device not in self._devices or not device.attached:
                return
        device._detach()

    def replug(self, device: VirtualUsbDevice) -> None:
        """Plug a pulled device back in, at a new address, unconfigured, with a fresh session."""
        if device.attached:
            return
        self._attach(device)

    def remove(self, device: VirtualUsbDevice) -> None:
        """Unplug and forget a device (test teardown)."""
        self.unplug(device)
        with self._lock:
            if device in self._devices:
                self._devices.remove(device)

    def clear(self) -> None:
        """Remove every device."""
        for d in self.all_devices():
            self.remove(d)

    def devices(self) -> list[VirtualUsbDevice]:
        """The devices attached now, in plug order."""
        with self._lock:
            return [d for d in self._devices if d.attached]

    def all_devices(self) -> list[VirtualUsbDevice]:
        with self._lock:
            return list(self._devices)

    def _attach(self, dev: VirtualUsbDevice) -> None:
        with self._lock:
            live = [d for d in self._devices if d.attached and d is not dev]
            d0 = dev.description.device
            serial = dev.description.serial_number
            for other in live:
                o = other.description
                if (o.device.idVendor, o.device.idProduct, o.serial_number) == (
                    d0.idVendor,
                    d0.idProduct,
                    serial,
                ):
                    raise ValueError(
                        f"a device {d0.idVendor:04x}:{d0.idProduct:04x} with serial {serial!r} "
                        "is already plugged in; pass serial="
                    )
            used = {d.address for d in live}
            if len(used) >= 127:
                raise ValueError("the bus is full: 127 devices (USB addresses 1-127) are plugged in")
            address = next(a for a in self._addresses if a not in used)
            ports = {d.port_numbers for d in live}
            port = dev.description.port_numbers
            while port in ports:
                port = (*port[:-1], port[-1] + 1) if port else (1,)
            dev.port_numbers = port
            if dev not in self._devices:
                self._devices.append(dev)
            dev._bus = self
            dev._attach(address)


def _frame_session_factory(emulator: Any, allowed_domains: Iterable[int] | None, name: str) -> SessionFactory:
    from emulator.frame_server import FrameSession  # lazy: the bus works without the emulator

    domains = None if allowed_domains is None else frozenset(allowed_domains)

    def factory(notify: Callable[[bytes], None]) -> Any:
        return FrameSession(emulator, allowed_domains=domains, notify=notify, name=name)

    return factory


def codec_frame_size() -> FrameSize:
    """The frame codec's header reader, as the stream assembler wants it."""
    from apformats.frames import DEFAULT_MAX_FRAME, HEADER_LEN, frame_length

    def frame_size(buf: bytes) -> int | None:
        if len(buf) < HEADER_LEN:
            return None
        return frame_length(buf[:HEADER_LEN], max_len=DEFAULT_MAX_FRAME)

    return frame_size


# -- the pyusb backend ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _DevRef:
    """What ``enumerate_devices`` yields: a device as it was when enumerated (libusb's
    ``libusb_device``: descriptors stay readable after unplug, opening it does not)."""

    device: VirtualUsbDevice
    generation: int
    descriptor: DeviceDescriptor


class _Handle:
    """An open device (libusb's ``libusb_device_handle``); dead once its generation is gone."""

    __slots__ = ("closed", "device", "generation")

    def __init__(self, ref: _DevRef) -> None:
        self.device = ref.device
        self.generation = ref.generation
        self.closed = False


def _seconds(timeout_ms: int | None, cap_ms: int) -> float:
    if timeout_ms is None or timeout_ms <= 0:
        return cap_ms / 1000.0
    return min(timeout_ms, cap_ms) / 1000.0


class EmulatorUsbBackend(usb.backend.IBackend):
    """pyusb's backend seam over a :class:`VirtualBus` (every method pyusb's core calls)."""

    def __init__(self, bus: VirtualBus | None = None, *, max_block_ms: int = MAX_BLOCK_MS) -> None:
        super().__init__()
        self.bus = bus if bus is not None else BUS
        self.max_block_ms = max_block_ms

    def __repr__(self) -> str:
        return f"<EmulatorUsbBackend {len(self.bus.devices())} device(s)>"

    # -- enumeration and descriptors --------------------------------------------------------------
    def enumerate_devices(self) -> list[_DevRef]:
        if self.bus is BUS:
            _autoplug_from_environment()
        out = []
        for d in self.bus.devices():
            gen, addr, ports = d.generation, d.address, d.port_numbers
            if d.attached and addr is not None:
                desc = d.description.located(bus=d.bus_number, address=addr, port_numbers=ports)
                out.append(_DevRef(d, gen, desc))
        return out

    def get_parent(self, dev: _DevRef) -> None:
        return None  # plugged straight into the root hub

    def get_device_descriptor(self, dev: _DevRef) -> DeviceDescriptor:
        return dev.descriptor

    def _config(self, dev: _DevRef, config: int) -> Configuration:
        cfgs = dev.device.description.configurations
        if not 0 <= config < len(cfgs):
            raise IndexError(f"Invalid configuration index {config}")
        return cfgs[config]

    def get_configuration_descriptor(self, dev: _DevRef, config: int) -> ConfigurationDescriptor:
        return self._config(dev, config).descriptor

    def get_interface_descriptor(self, dev: _DevRef, intf: int, alt: int, config: int) -> InterfaceDescriptor:
        cfg = self._config(dev, config)
        if not 0 <= intf < len(cfg.interfaces):
            raise IndexError(f"Invalid interface index {intf}")
        alts = cfg.interfaces[intf]
        if not 0 <= alt < len(alts):
            raise IndexError(f"Invalid alternate setting index {alt}")
        return alts[alt].descriptor

    def get_endpoint_descriptor(
        self, dev: _DevRef, ep: int, intf: int, alt: int, config: int
    ) -> EndpointDescriptor:
        self.get_interface_descriptor(dev, intf, alt, config)
        eps = self._config(dev, config).interfaces[intf][alt].endpoints
        if not 0 <= ep < len(eps):
            raise IndexError(f"Invalid endpoint index {ep}")
        return eps[ep]

    # -- handles and chapter 9 state --------------------------------------------------------------
    def open_device(self, dev: _DevRef) -> _Handle:
        dev.device.open(dev.generation)
        return _Handle(dev)

    def close_device(self, dev_handle: _Handle) -> None:
        # libusb_close never fails, on a live or a vanished device alike
        if not dev_handle.closed:
            dev_handle.closed = True
            dev_handle.device.close(dev_handle.generation, dev_handle)

    def _h(self, h: _Handle) -> VirtualUsbDevice:
        if h.closed:
            raise errors.no_device_error("handle is closed")
        return h.device

    def set_configuration(self, dev_handle: _Handle, config_value: int) -> None:
        self._h(dev_handle).set_configuration(dev_handle.generation, config_value, dev_handle)

    def get_configuration(self, dev_handle: _Handle) -> int:
        return self._h(dev_handle).get_configuration(dev_handle.generation)

    def set_interface_altsetting(self, dev_handle: _Handle, intf: int, altsetting: int) -> None:
        self._h(dev_handle).set_interface_altsetting(dev_handle.generation, intf, altsetting)

    def claim_interface(self, dev_handle: _Handle, intf: int) -> None:
        self._h(dev_handle).claim_interface(dev_handle.generation, dev_handle, intf)

    def release_interface(self, dev_handle: _Handle, intf: int) -> None:
        self._h(dev_handle).release_interface(dev_handle.generation, dev_handle, intf)

    def clear_halt(self, dev_handle: _Handle, ep: int) -> None:
        self._h(dev_handle).clear_halt(dev_handle.generation, ep)

    def reset_device(self, dev_handle: _Handle) -> None:
        self._h(dev_handle).reset(dev_handle.generation)

    def is_kernel_driver_active(self, dev_handle: _Handle, intf: int) -> bool:
        self._h(dev_handle).check_alive(dev_handle.generation)
        return False  # no kernel driver binds a vendor-specific emulated interface

    def detach_kernel_driver(self, dev_handle: _Handle, intf: int) -> None:
        self._h(dev_handle).check_alive(dev_handle.generation)

    def attach_kernel_driver(self, dev_handle: _Handle, intf: int) -> None:
        self._h(dev_handle).check_alive(dev_handle.generation)

    # -- transfers --------------------------------------------------------------------------------
    def bulk_write(self, dev_handle: _Handle, ep: int, intf: int, data: array.array, timeout: int) -> int:
        d = self._h(dev_handle)
        return d.bulk_write(dev_handle.generation, dev_handle, ep, data.tobytes(), self._s(timeout))

    def bulk_read(self, dev_handle: _Handle, ep: int, intf: int, buff: array.array, timeout: int) -> int:
        d = self._h(dev_handle)
        data = d.read(dev_handle.generation, dev_handle, ep, len(buff) * buff.itemsize, self._s(timeout))
        buff[: len(data)] = array.array("B", data)
        return len(data)

    intr_read = bulk_read  # the device model tells the endpoints apart, as the host does by address

    def intr_write(self, dev_handle: _Handle, ep: int, intf: int, data: array.array, timeout: int) -> int:
        raise errors.not_found_error(f"no interrupt OUT endpoint {ep:#04x}")

    def ctrl_transfer(
        self,
        dev_handle: _Handle,
        bmRequestType: int,
        bRequest: int,
        wValue: int,
        wIndex: int,
        data: array.array,
        timeout: int,
    ) -> int:
        d = self._h(dev_handle)
        if bmRequestType & 0x80:  # IN: fill the caller's buffer
            got = d.control(dev_handle.generation, bmRequestType, bRequest, wValue, wIndex, len(data))
            assert isinstance(got, bytes)
            data[: len(got)] = array.array("B", got)
            return len(got)
        sent = d.control(dev_handle.generation, bmRequestType, bRequest, wValue, wIndex, data.tobytes())
        assert isinstance(sent, int)
        return sent

    def _s(self, timeout_ms: int | None) -> float:
        return _seconds(timeout_ms, self.max_block_ms)


# -- module-level bus: discovery without code changes --------------------------------------------

BUS = VirtualBus()
_backend: EmulatorUsbBackend | None = None
_backend_lock = threading.Lock()


def get_backend(*_args: object) -> EmulatorUsbBackend:
    """The backend over the module bus (the shape every pyusb backend module exports)."""
    global _backend
    with _backend_lock:
        if _backend is None:
            _backend = EmulatorUsbBackend(BUS)
        return _backend


#: ``$APCRYPTO_USB_BACKEND`` naming this module is all a fresh process needs: the first time the bus is
#: searched and nothing was ever plugged in, one emulated adapter is plugged in for the life of the
#: process.  ``$APCRYPTO_USB_PROFILE`` picks its profile (default ``default``), ``$APCRYPTO_USB_SEED``
#: its seed (default 0); ``APCRYPTO_USB_PROFILE=none`` leaves the bus empty.
BACKEND_ENV = "APCRYPTO_USB_BACKEND"
PROFILE_ENV = "APCRYPTO_USB_PROFILE"
SEED_ENV = "APCRYPTO_USB_SEED"
_auto_done = False


def _autoplug_from_environment() -> VirtualUsbDevice | None:
    """Plug the environment's emulated adapter once, if the environment asks and the bus never had one.

    Why here and not at import: pyusb finds devices through ``enumerate_devices``, so a process that
    only imports the module (or plugs its own emulator first) never gets an extra device."""
    global _auto_done
    with _backend_lock:
        if _auto_done:
            return None
        _auto_done = True
    if os.environ.get(BACKEND_ENV, "").strip() != __name__ or BUS.all_devices():
        return None
    profile = os.environ.get(PROFILE_ENV, "").strip() or "default"
    if profile.lower() == "none":
        return None
    from emulator.core import Emulator

    seed = int(os.environ.get(SEED_ENV) or "0", 0)
    log.info("usb: plugging an emulated adapter (profile %r, seed %d) from $%s", profile, seed, BACKEND_ENV)
    return plug(Emulator(profile, clock="wall", seed=seed))


def plug(emulator: Any = None, description: Description = None, **options: Any) -> VirtualUsbDevice:
    """Plug an emulated adapter into the module bus (see :meth:`VirtualBus.plug`)."""
    return BUS.plug(emulator, description, **options)


def unplug(device: VirtualUsbDevice) -> None:
    BUS.unplug(device)


def replug(device: VirtualUsbDevice) -> None:
    BUS.replug(device)


def remove(device: VirtualUsbDevice) -> None:
    BUS.remove(device)


def devices() -> list[VirtualUsbDevice]:
    return BUS.devices()


__all__ = [
    "BUS",
    "MAX_BLOCK_MS",
    "EmulatorUsbBackend",
    "VirtualBus",
    "VirtualUsbDevice",
    "devices",
    "get_backend",
    "plug",
    "remove",
    "replug",
    "unplug",
]
