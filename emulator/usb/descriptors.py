"""USB descriptors of an emulated adapter, built from a description in data (TOML or a dict).

pyusb's ``usb.core`` copies descriptor fields with a strict ``getattr`` (``_set_attr``), so every
object here carries every field it reads, including the ones a software device would happily forget
(``extra_descriptors``, ``bRefresh``, ``bSynchAddress``, ``port_numbers``, ``speed``).  Fields that
follow from the layout (lengths, counts, string indexes) are derived, never written by hand, so a
description cannot contradict itself.  The raw chapter 9 byte forms are built too, because a host
may ask for them through GET_DESCRIPTOR and the numbers must agree with the attributes.

The schema is the one ``emulator/profiles/usb_default.toml`` documents; unknown keys are an error
(pyvisa-sim's silently ignored typos are the anti-pattern).
"""

from __future__ import annotations

import struct
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"
SPEC_VERSION = 1

# chapter 9 descriptor types and sizes
DT_DEVICE, DT_CONFIG, DT_STRING, DT_INTERFACE, DT_ENDPOINT = 1, 2, 3, 4, 5
DEVICE_LEN, CONFIG_LEN, INTERFACE_LEN, ENDPOINT_LEN = 18, 9, 9, 7

#: ``speed`` names -> libusb ``LIBUSB_SPEED_*`` (the values ``usb.util.SPEED_*`` and ``Device.speed`` use)
SPEEDS: dict[str, int] = {"low": 1, "full": 2, "high": 3, "super": 4}

#: endpoint ``type`` names -> ``bmAttributes`` transfer type bits
ENDPOINT_TYPES: dict[str, int] = {"control": 0, "isochronous": 1, "bulk": 2, "interrupt": 3}

#: largest bulk ``wMaxPacketSize`` per speed (USB 2.0 §5.8.3, USB 3.2 §9.6.6); low speed has no bulk
BULK_MAX_PACKET: dict[int, tuple[int, ...]] = {2: (8, 16, 32, 64), 3: (512,), 4: (1024,)}


class DescriptionError(ValueError):
    """The USB description is malformed: unknown key, missing field, value out of range."""


# --- descriptor objects: exactly what pyusb's Device/Configuration/Interface/Endpoint read ---------


@dataclass(frozen=True, slots=True)
class EndpointDescriptor:
    bEndpointAddress: int
    bmAttributes: int
    wMaxPacketSize: int
    bInterval: int = 0
    bRefresh: int = 0
    bSynchAddress: int = 0
    extra_descriptors: tuple[int, ...] = ()
    bLength: int = ENDPOINT_LEN
    bDescriptorType: int = DT_ENDPOINT

    @property
    def is_in(self) -> bool:
        return bool(self.bEndpointAddress & 0x80)

    @property
    def transfer_type(self) -> int:
        return self.bmAttributes & 0x3


@dataclass(frozen=True, slots=True)
class InterfaceDescriptor:
    bInterfaceNumber: int
    bAlternateSetting: int
    bNumEndpoints: int
    bInterfaceClass: int
    bInterfaceSubClass: int
    bInterfaceProtocol: int
    iInterface: int
    extra_descriptors: tuple[int, ...] = ()
    bLength: int = INTERFACE_LEN
    bDescriptorType: int = DT_INTERFACE


@dataclass(frozen=True, slots=True)
class ConfigurationDescriptor:
    wTotalLength: int
    bNumInterfaces: int
    bConfigurationValue: int
    iConfiguration: int
    bmAttributes: int
    bMaxPower: int
    extra_descriptors: tuple[int, ...] = ()
    bLength: int = CONFIG_LEN
    bDescriptorType: int = DT_CONFIG


@dataclass(frozen=True, slots=True)
class DeviceDescriptor:
    bcdUSB: int
    bDeviceClass: int
    bDeviceSubClass: int
    bDeviceProtocol: int
    bMaxPacketSize0: int
    idVendor: int
    idProduct: int
    bcdDevice: int
    iManufacturer: int
    iProduct: int
    iSerialNumber: int
    bNumConfigurations: int
    # where the device sits on the bus: filled in by the virtual bus when it is plugged
    bus: int | None = None
    address: int | None = None
    port_number: int | None = None
    port_numbers: tuple[int, ...] | None = None
    speed: int | None = None
    bLength: int = DEVICE_LEN
    bDescriptorType: int = DT_DEVICE


@dataclass(frozen=True, slots=True)
class AltSetting:
    """One alternate setting of an interface: its descriptor and its endpoints, in order."""

    descriptor: InterfaceDescriptor
    endpoints: tuple[EndpointDescriptor, ...]


@dataclass(frozen=True, slots=True)
class Configuration:
    """One configuration: its descriptor and its interfaces (each a tuple of alternate settings)."""

    descriptor: ConfigurationDescriptor
    interfaces: tuple[tuple[AltSetting, ...], ...]

    def altsetting(self, number: int, alternate: int) -> AltSetting | None:
        """The alternate setting by ``bInterfaceNumber`` / ``bAlternateSetting`` (not logical index)."""
        for alts in self.interfaces:
            for a in alts:
                if a.descriptor.bInterfaceNumber == number and a.descriptor.bAlternateSetting == alternate:
                    return a
        return None


@dataclass(frozen=True, slots=True)
class UsbDescription:
    """A whole device: descriptors, string table and where it plugs in by default."""

    device: DeviceDescriptor
    configurations: tuple[Configuration, ...]
    strings: tuple[str, ...]  # string index i is strings[i - 1]
    langids: tuple[int, ...]
    bus: int
    port_numbers: tuple[int, ...]

    @property
    def serial_number(self) -> str | None:
        return self.string(self.device.iSerialNumber)

    def string(self, index: int) -> str | None:
        if index == 0 or index > len(self.strings):
            return None
        return self.strings[index - 1]

    def with_serial(self, serial: str) -> UsbDescription:
        """The same device with another serial number (several adapters from one description)."""
        strings = list(self.strings)
        if self.device.iSerialNumber:
            strings[self.device.iSerialNumber - 1] = serial
            return replace(self, strings=tuple(strings))
        strings.append(serial)
        return replace(self, strings=tuple(strings), device=replace(self.device, iSerialNumber=len(strings)))

    def located(self, *, bus: int, address: int, port_numbers: tuple[int, ...]) -> DeviceDescriptor:
        """The device descriptor as enumerated at ``bus``/``address``."""
        return replace(
            self.device,
            bus=bus,
            address=address,
            port_number=port_numbers[-1] if port_numbers else None,
            port_numbers=port_numbers,
        )


# --- raw chapter 9 bytes ------------------------------------------------------------------------


def device_descriptor_bytes(d: DeviceDescriptor) -> bytes:
    return struct.pack(
        "<BBHBBBBHHHBBBB",
        d.bLength,
        d.bDescriptorType,
        d.bcdUSB,
        d.bDeviceClass,
        d.bDeviceSubClass,
        d.bDeviceProtocol,
        d.bMaxPacketSize0,
        d.idVendor,
        d.idProduct,
        d.bcdDevice,
        d.iManufacturer,
        d.iProduct,
        d.iSerialNumber,
        d.bNumConfigurations,
    )


def _interface_bytes(i: InterfaceDescriptor) -> bytes:
    return struct.pack(
        "<BBBBBBBBB",
        i.bLength,
        i.bDescriptorType,
        i.bInterfaceNumber,
        i.bAlternateSetting,
        i.bNumEndpoints,
        i.bInterfaceClass,
        i.bInterfaceSubClass,
        i.bInterfaceProtocol,
        i.iInterface,
    ) + bytes(i.extra_descriptors)


def _endpoint_bytes(e: EndpointDescriptor) -> bytes:
    return struct.pack(
        "<BBBBHB",
        e.bLength,
        e.bDescriptorType,
        e.bEndpointAddress,
        e.bmAttributes,
        e.wMaxPacketSize,
        e.bInterval,
    ) + bytes(e.extra_descriptors)


def _config_body(interfaces: Sequence[Sequence[AltSetting]]) -> bytes:
    out = bytearray()
    for alts in interfaces:
        for a in alts:
            out += _interface_bytes(a.descriptor)
            for e in a.endpoints:
                out += _endpoint_bytes(e)
    return bytes(out)


def configuration_descriptor_bytes(cfg: Configuration) -> bytes:
    """The full configuration descriptor set (config + interfaces + endpoints), ``wTotalLength`` long."""
    c = cfg.descriptor
    head = struct.pack(
        "<BBHBBBBB",
        c.bLength,
        c.bDescriptorType,
        c.wTotalLength,
        c.bNumInterfaces,
        c.bConfigurationValue,
        c.iConfiguration,
        c.bmAttributes,
        c.bMaxPower,
    )
    return head + bytes(c.extra_descriptors) + _config_body(cfg.interfaces)


def langid_descriptor_bytes(langids: Sequence[int]) -> bytes:
    """String descriptor 0: the LANGID table."""
    body = b"".join(struct.pack("<H", x) for x in langids)
    return bytes((2 + len(body), DT_STRING)) + body


def string_descriptor_bytes(text: str) -> bytes:
    """String descriptor ``n``: UTF-16LE, at most 126 code units (bLength is one byte)."""
    body = text.encode("utf-16-le")
    if len(body) > 252:
        raise DescriptionError(f"string too long for a descriptor: {text!r}")
    return bytes((2 + len(body), DT_STRING)) + body


# --- loading a description ----------------------------------------------------------------------

_DEVICE_KEYS = {
    "idVendor": None,  # required
    "idProduct": None,
    "bcdUSB": 0x0200,
    "bcdDevice": 0x0100,
    "bDeviceClass": 0,
    "bDeviceSubClass": 0,
    "bDeviceProtocol": 0,
    "bMaxPacketSize0": 64,
    "manufacturer": None,
    "product": None,
    "serial_number": None,
    "speed": "high",
    "langids": [0x0409],
    "bus": 1,
    "port_numbers": [1],
}
_CONFIG_KEYS: dict[str, Any] = {
    "bConfigurationValue": 1,
    "name": None,
    "bmAttributes": 0x80,
    "bMaxPower": 50,
    "extra_descriptors": [],
    "interfaces": None,
}
_INTERFACE_KEYS: dict[str, Any] = {
    "bInterfaceNumber": 0,
    "bAlternateSetting": 0,
    "bInterfaceClass": 0xFF,
    "bInterfaceSubClass": 0,
    "bInterfaceProtocol": 0,
    "name": None,
    "extra_descriptors": [],
    "endpoints": [],
}
_ENDPOINT_KEYS: dict[str, Any] = {
    "bEndpointAddress": None,
    "type": None,
    "wMaxPacketSize": None,
    "bInterval": 0,
    "bRefresh": 0,
    "bSynchAddress": 0,
    "extra_descriptors": [],
}


def _fields(where: str, given: Mapping[str, Any], schema: Mapping[str, Any], required: Sequence[str]) -> dict:
    unknown = set(given) - set(schema)
    if unknown:
        raise DescriptionError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(schema)}")
    missing = [k for k in required if k not in given]
    if missing:
        raise DescriptionError(f"{where}: missing required key(s) {missing}")
    return {k: given.get(k, default) for k, default in schema.items()}


def _u(where: str, name: str, value: Any, bits: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < (1 << bits):
        raise DescriptionError(f"{where}: {name} must be an integer in 0..{(1 << bits) - 1}, got {value!r}")
    return value


def _bytes(where: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, list | tuple | bytes):
        raise DescriptionError(f"{where}: extra_descriptors must be a list of byte values")
    return tuple(_u(where, "extra_descriptors[]", v, 8) for v in value)


class _Strings:
    """Assigns string indexes in order of first use (index 0 means 'no string')."""

    def __init__(self) -> None:
        self.table: list[str] = []

    def index(self, text: Any, where: str) -> int:
        if text is None:
            return 0
        if not isinstance(text, str):
            raise DescriptionError(f"{where}: string fields must be strings, got {text!r}")
        string_descriptor_bytes(text)  # length check
        if text in self.table:
            return self.table.index(text) + 1
        self.table.append(text)
        return len(self.table)


def _endpoint(where: str, raw: Mapping[str, Any], speed: int) -> EndpointDescriptor:
    f = _fields(where, raw, _ENDPOINT_KEYS, ("bEndpointAddress", "type", "wMaxPacketSize"))
    addr = _u(where, "bEndpointAddress", f["bEndpointAddress"], 8)
    if addr & 0x70 or addr & 0x0F == 0:
        raise DescriptionError(f"{where}: bEndpointAddress {addr:#04x} is not a valid non-control endpoint")
    kind = f["type"]
    if kind not in ENDPOINT_TYPES or kind == "control":
        raise DescriptionError(f"{where}: type must be bulk, interrupt or isochronous, got {kind!r}")
    size = _u(where, "wMaxPacketSize", f["wMaxPacketSize"], 11)
    if kind == "bulk" and size not in BULK_MAX_PACKET.get(speed, ()):
        raise DescriptionError(
            f"{where}: a bulk endpoint at speed {speed} takes wMaxPacketSize in "
            f"{BULK_MAX_PACKET.get(speed, ())}, got {size}"
        )
    return EndpointDescriptor(
        bEndpointAddress=addr,
        bmAttributes=ENDPOINT_TYPES[kind],
        wMaxPacketSize=size,
        bInterval=_u(where, "bInterval", f["bInterval"], 8),
        bRefresh=_u(where, "bRefresh", f["bRefresh"], 8),
        bSynchAddress=_u(where, "bSynchAddress", f["bSynchAddress"], 8),
        extra_descriptors=_bytes(where, f["extra_descriptors"]),
    )


def _interfaces(where: str, raw: Any, speed: int, strings: _Strings) -> tuple[tuple[AltSetting, ...], ...]:
    if not isinstance(raw, list) or not raw:
        raise DescriptionError(f"{where}: interfaces must be a non-empty list")
    by_number: dict[int, list[AltSetting]] = {}
    for n, ri in enumerate(raw):
        w = f"{where}.interfaces[{n}]"
        f = _fields(w, ri, _INTERFACE_KEYS, ())
        eps = tuple(_endpoint(f"{w}.endpoints[{k}]", re, speed) for k, re in enumerate(f["endpoints"]))
        addrs = [e.bEndpointAddress for e in eps]
        if len(set(addrs)) != len(addrs):
            raise DescriptionError(f"{w}: duplicate endpoint addresses {addrs}")
        desc = InterfaceDescriptor(
            bInterfaceNumber=_u(w, "bInterfaceNumber", f["bInterfaceNumber"], 8),
            bAlternateSetting=_u(w, "bAlternateSetting", f["bAlternateSetting"], 8),
            bNumEndpoints=len(eps),
            bInterfaceClass=_u(w, "bInterfaceClass", f["bInterfaceClass"], 8),
            bInterfaceSubClass=_u(w, "bInterfaceSubClass", f["bInterfaceSubClass"], 8),
            bInterfaceProtocol=_u(w, "bInterfaceProtocol", f["bInterfaceProtocol"], 8),
            iInterface=strings.index(f["name"], w),
            extra_descriptors=_bytes(w, f["extra_descriptors"]),
        )
        by_number.setdefault(desc.bInterfaceNumber, []).append(AltSetting(desc, eps))
    out = []
    for number in sorted(by_number):
        alts = sorted(by_number[number], key=lambda a: a.descriptor.bAlternateSetting)
        if [a.descriptor.bAlternateSetting for a in alts] != list(range(len(alts))):
            raise DescriptionError(
                f"{where}: interface {number} alternate settings must be 0..n-1 without gaps"
            )
        out.append(tuple(alts))
    return tuple(out)


def _configuration(where: str, raw: Mapping[str, Any], speed: int, strings: _Strings) -> Configuration:
    f = _fields(where, raw, _CONFIG_KEYS, ("interfaces",))
    value = _u(where, "bConfigurationValue", f["bConfigurationValue"], 8)
    if value == 0:
        raise DescriptionError(f"{where}: bConfigurationValue 0 means 'unconfigured'")
    icfg = strings.index(f["name"], where)
    interfaces = _interfaces(where, f["interfaces"], speed, strings)
    extra = _bytes(where, f["extra_descriptors"])
    desc = ConfigurationDescriptor(
        wTotalLength=CONFIG_LEN + len(extra) + len(_config_body(interfaces)),
        bNumInterfaces=len(interfaces),
        bConfigurationValue=value,
        iConfiguration=icfg,
        bmAttributes=_u(where, "bmAttributes", f["bmAttributes"], 8) | 0x80,  # bit 7 is reserved-one
        bMaxPower=_u(where, "bMaxPower", f["bMaxPower"], 8),
        extra_descriptors=extra,
    )
    return Configuration(desc, interfaces)


def parse_description(data: Mapping[str, Any]) -> UsbDescription:
    """Validate a description mapping (the TOML document's shape) and build its descriptors."""
    top = _fields(
        "description",
        data,
        {"spec": SPEC_VERSION, "device": None, "configurations": None},
        ("device", "configurations"),
    )
    if top["spec"] != SPEC_VERSION:
        raise DescriptionError(f"description spec {top['spec']!r} is not supported (expected {SPEC_VERSION})")
    d = _fields("device", top["device"], _DEVICE_KEYS, ("idVendor", "idProduct"))
    if d["speed"] not in SPEEDS:
        raise DescriptionError(f"device: speed must be one of {sorted(SPEEDS)}, got {d['speed']!r}")
    speed = SPEEDS[d["speed"]]
    strings = _Strings()
    imanufacturer = strings.index(d["manufacturer"], "device.manufacturer")
    iproduct = strings.index(d["product"], "device.product")
    iserial = strings.index(d["serial_number"], "device.serial_number")
    raw_cfgs = top["configurations"]
    if not isinstance(raw_cfgs, list) or not raw_cfgs:
        raise DescriptionError("configurations must be a non-empty list")
    cfgs = tuple(_configuration(f"configurations[{n}]", rc, speed, strings) for n, rc in enumerate(raw_cfgs))
    values = [c.descriptor.bConfigurationValue for c in cfgs]
    if len(set(values)) != len(values):
        raise DescriptionError(f"duplicate bConfigurationValue in {values}")
    langids = tuple(_u("device", "langids[]", x, 16) for x in d["langids"])
    if strings.table and not langids:
        raise DescriptionError("device: a device with strings needs at least one LANGID")
    ports = tuple(_u("device", "port_numbers[]", p, 8) for p in d["port_numbers"])
    device = DeviceDescriptor(
        bcdUSB=_u("device", "bcdUSB", d["bcdUSB"], 16),
        bDeviceClass=_u("device", "bDeviceClass", d["bDeviceClass"], 8),
        bDeviceSubClass=_u("device", "bDeviceSubClass", d["bDeviceSubClass"], 8),
        bDeviceProtocol=_u("device", "bDeviceProtocol", d["bDeviceProtocol"], 8),
        bMaxPacketSize0=_u("device", "bMaxPacketSize0", d["bMaxPacketSize0"], 8),
        idVendor=_u("device", "idVendor", d["idVendor"], 16),
        idProduct=_u("device", "idProduct", d["idProduct"], 16),
        bcdDevice=_u("device", "bcdDevice", d["bcdDevice"], 16),
        iManufacturer=imanufacturer,
        iProduct=iproduct,
        iSerialNumber=iserial,
        bNumConfigurations=len(cfgs),
        speed=speed,
    )
    return UsbDescription(
        device=device,
        configurations=cfgs,
        strings=tuple(strings.table),
        langids=langids,
        bus=_u("device", "bus", d["bus"], 8),
        port_numbers=ports,
    )


def load_description(source: UsbDescription | Mapping[str, Any] | str | Path | None = None) -> UsbDescription:
    """A description from a built one, a mapping, a bundled name (``"default"``) or a TOML path."""
    if isinstance(source, UsbDescription):
        return source
    if source is None:
        source = "default"
    if isinstance(source, Mapping):
        return parse_description(source)
    path = Path(source)
    if not path.suffix:
        path = PROFILES_DIR / f"usb_{source}.toml"
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise DescriptionError(f"no USB description at {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise DescriptionError(f"{path}: {exc}") from exc
    return parse_description(data)
