"""The software pyusb backend, seen through real pyusb: descriptors, strings, chapter 9 state, pipes
and the fault triples libusb would raise.  No libusb on the machine is needed or touched."""

from __future__ import annotations

import errno
import struct
import threading
import time

import pytest
import usb.core
import usb.util

from apformats import frames
from apformats.codes import ResponseCode
from apformats.results import Instr
from apformats.status import QueueStatus
from emulator.usb.descriptors import (
    DescriptionError,
    configuration_descriptor_bytes,
    load_description,
    parse_description,
)
from emulator.usb_backend import EmulatorUsbBackend, VirtualBus
from tests._fixtures_usb import (
    EP_IN,
    EP_IRQ,
    EP_OUT,
    PID,
    VID,
    UsbBus,
    split_frames,
    usb_bus,
    wall_emulator,
)

__all__ = ["usb_bus", "wall_emulator"]  # fixtures used here


def _find(b: UsbBus, **kw: object) -> usb.core.Device:
    dev = usb.core.find(backend=b.backend, idVendor=VID, idProduct=PID, **kw)
    assert dev is not None
    return dev


@pytest.fixture
def echo(usb_bus: UsbBus):
    """An echo device and the pyusb Device for it, configured; resources disposed at the end."""
    vdev = usb_bus.plug_echo()
    dev = _find(usb_bus)
    dev.set_configuration()
    yield vdev, dev
    usb.util.dispose_resources(dev)


# --- pyusb sees the device ----------------------------------------------------------------------


def test_find_strings_and_identity(usb_bus: UsbBus) -> None:
    usb_bus.plug_echo()
    dev = _find(usb_bus)
    assert (dev.idVendor, dev.idProduct) == (0x1209, 0x0A70)
    assert dev.manufacturer == "apcrypto project"
    assert dev.product == "AP crypto adapter (emulated)"
    assert dev.serial_number == "APEMU0001"
    assert dev.langids == (0x0409,)
    assert (dev.bus, dev.address, dev.port_number, dev.port_numbers) == (1, 1, 1, (1,))
    assert dev.speed == usb.util.SPEED_HIGH
    assert dev.parent is None
    assert usb.util.get_string(dev, dev[0].iConfiguration) == "AP instruction frames"
    usb.util.dispose_resources(dev)


def test_str_dev_renders_every_descriptor(usb_bus: UsbBus) -> None:
    usb_bus.plug_echo()
    dev = _find(usb_bus)
    text = str(dev)
    for needle in (
        "DEVICE ID 1209:0a70 on Bus 001 Address 001",
        "APEMU0001",
        "CONFIGURATION 1: 100 mA",
        "INTERFACE 0: Vendor Specific",
        "ENDPOINT 0x1: Bulk OUT",
        "ENDPOINT 0x81: Bulk IN",
        "ENDPOINT 0x82: Interrupt IN",
        "AP queues",
    ):
        assert needle in text
    assert "Error Accessing String" not in text
    usb.util.dispose_resources(dev)


def test_configuration_interface_endpoints(usb_bus: UsbBus) -> None:
    usb_bus.plug_echo()
    dev = _find(usb_bus)
    (cfg,) = list(dev)
    assert (cfg.bConfigurationValue, cfg.bNumInterfaces, cfg.bMaxPower, cfg.extra_descriptors) == (
        1,
        1,
        50,
        (),
    )
    (intf,) = list(cfg)  # iteration stops at the IndexError past the last alternate setting
    assert (intf.bInterfaceNumber, intf.bAlternateSetting, intf.bInterfaceClass, intf.bNumEndpoints) == (
        0,
        0,
        0xFF,
        3,
    )
    eps = {e.bEndpointAddress: e for e in intf}
    assert set(eps) == {EP_OUT, EP_IN, EP_IRQ}
    assert usb.util.endpoint_type(eps[EP_OUT].bmAttributes) == usb.util.ENDPOINT_TYPE_BULK
    assert usb.util.endpoint_type(eps[EP_IRQ].bmAttributes) == usb.util.ENDPOINT_TYPE_INTR
    assert eps[EP_IN].wMaxPacketSize == 512 and eps[EP_IRQ].wMaxPacketSize == 64
    assert all((e.bRefresh, e.bSynchAddress, e.extra_descriptors) == (0, 0, ()) for e in eps.values())
    ep_in = usb.util.find_descriptor(
        intf,
        custom_match=lambda e: (
            usb.util.endpoint_direction(e.bEndpointAddress) == usb.util.ENDPOINT_IN
            and usb.util.endpoint_type(e.bmAttributes) == usb.util.ENDPOINT_TYPE_BULK
        ),
    )
    assert ep_in.bEndpointAddress == EP_IN
    usb.util.dispose_resources(dev)


def test_index_errors_past_the_last_descriptor(usb_bus: UsbBus) -> None:
    usb_bus.plug_echo()
    be = usb_bus.backend
    (ref,) = be.enumerate_devices()
    assert be.get_interface_descriptor(ref, 0, 0, 0).bInterfaceNumber == 0
    for call in (
        lambda: be.get_interface_descriptor(ref, 0, 1, 0),
        lambda: be.get_interface_descriptor(ref, 1, 0, 0),
        lambda: be.get_configuration_descriptor(ref, 1),
        lambda: be.get_endpoint_descriptor(ref, 3, 0, 0, 0),
    ):
        with pytest.raises(IndexError):
            call()


def test_raw_descriptors_agree_with_the_attributes(usb_bus: UsbBus) -> None:
    usb_bus.plug_echo()
    dev = _find(usb_bus)
    raw = bytes(dev.ctrl_transfer(0x80, 6, 0x0100, 0, 64))
    fields = struct.unpack("<BBHBBBBHHHBBBB", raw)
    assert fields == (
        18, 1, dev.bcdUSB, dev.bDeviceClass, dev.bDeviceSubClass, dev.bDeviceProtocol, dev.bMaxPacketSize0,
        dev.idVendor, dev.idProduct, dev.bcdDevice, dev.iManufacturer, dev.iProduct, dev.iSerialNumber,
        dev.bNumConfigurations,
    )  # fmt: skip
    cfg = bytes(dev.ctrl_transfer(0x80, 6, 0x0200, 0, 255))
    assert len(cfg) == dev[0].wTotalLength == 9 + 9 + 3 * 7
    short = bytes(dev.ctrl_transfer(0x80, 6, 0x0200, 0, 9))  # hosts read the header first
    assert short == cfg[:9]
    assert bytes(dev.ctrl_transfer(0x80, 6, 0x0300, 0, 255)) == b"\x04\x03\x09\x04"
    serial = bytes(dev.ctrl_transfer(0x80, 6, 0x0303, 0x0409, 255))
    assert serial[2:].decode("utf-16-le") == "APEMU0001" and serial[0] == len(serial)
    with pytest.raises(usb.core.USBError) as exc:  # no such string: the device STALLs EP0
        dev.ctrl_transfer(0x80, 6, 0x0399, 0x0409, 255)
    assert exc.value.errno == errno.EPIPE
    usb.util.dispose_resources(dev)


def test_configuration_state_is_consistent(usb_bus: UsbBus) -> None:
    usb_bus.plug_echo()
    dev = _find(usb_bus)
    with pytest.raises(usb.core.USBError, match="Configuration not set"):
        dev.get_active_configuration()
    dev.set_configuration()
    assert dev.get_active_configuration().bConfigurationValue == 1
    assert bytes(dev.ctrl_transfer(0x80, 8, 0, 0, 1)) == b"\x01"
    assert bytes(dev.ctrl_transfer(0x80, 0, 0, 0, 2)) == b"\x00\x00"  # GET_STATUS: bus powered
    dev.set_configuration(0)
    with pytest.raises(usb.core.USBError):  # 0: unconfigured again
        dev.get_active_configuration()
    with pytest.raises(ValueError):
        dev.set_configuration(7)
    usb.util.dispose_resources(dev)


def test_an_interface_is_claimed_by_one_handle(usb_bus: UsbBus) -> None:
    usb_bus.plug_echo()
    a, b = _find(usb_bus), _find(usb_bus)
    a.set_configuration()
    usb.util.claim_interface(a, 0)
    with pytest.raises(usb.core.USBError) as exc:
        usb.util.claim_interface(b, 0)
    assert exc.value.errno == errno.EBUSY
    usb.util.dispose_resources(a)
    usb.util.claim_interface(b, 0)  # released by dispose_resources
    usb.util.dispose_resources(b)


def test_two_adapters_told_apart_by_serial(usb_bus: UsbBus) -> None:
    usb_bus.plug_echo(serial="A-1")
    usb_bus.plug_echo(serial="B-2")
    with pytest.raises(ValueError, match="already plugged"):
        usb_bus.plug_echo(serial="B-2")
    found = list(usb.core.find(find_all=True, backend=usb_bus.backend, idVendor=VID))
    assert sorted(d.serial_number for d in found) == ["A-1", "B-2"]
    assert len({d.address for d in found}) == 2 and len({d.port_numbers for d in found}) == 2
    b = _find(usb_bus, custom_match=lambda d: d.serial_number == "B-2")
    assert b.serial_number == "B-2"
    for d in [*found, b]:
        usb.util.dispose_resources(d)


# --- pipes ------------------------------------------------------------------------------------------


def test_bulk_write_returns_the_count_and_read_fills_the_buffer(echo) -> None:
    _, dev = echo
    ping = frames.encode_ping(7)
    assert dev.write(EP_OUT, ping) == len(ping)
    buf = usb.util.create_buffer(512)
    n = dev.read(EP_IN, buf)
    assert bytes(buf[:n]) == ping
    assert bytes(dev.read(EP_IRQ, 64)) == frames.encode_interrupt(0x0102)


def test_several_frames_per_write_and_frames_split_across_writes(echo) -> None:
    vdev, dev = echo
    frs = [frames.encode_ping(i) for i in range(5)] + [
        frames.encode_command(9, Instr.NQAP, 3, 4, b"x" * 1500)
    ]
    stream = b"".join(frs)
    dev.write(EP_OUT, stream[:5])  # less than a header
    dev.write(EP_OUT, stream[5:40])  # rest of frame 0, frame 1, part of frame 2
    dev.write(EP_OUT, stream[40:])  # everything else, several frames at once
    got = b""
    while len(got) < len(stream):
        got += bytes(dev.read(EP_IN, 700))  # reads that cut frames anywhere
    assert got == stream
    assert vdev.stats.frames_in == len(frs)


def test_short_reads_split_frames_anywhere(echo) -> None:
    vdev, dev = echo
    vdev.limit_reads(3)
    f = frames.encode_ping(1)
    dev.write(EP_OUT, f)
    parts = [bytes(dev.read(EP_IN, 512)) for _ in range((len(f) + 2) // 3)]
    assert all(len(p) <= 3 for p in parts) and b"".join(parts) == f


def test_a_bad_frame_header_stalls_bulk_out_until_cleared(echo) -> None:
    vdev, dev = echo
    with pytest.raises(usb.core.USBError) as exc:
        dev.write(EP_OUT, b"XX" + b"\x00" * 10)
    assert (exc.value.errno, exc.value.backend_error_code) == (errno.EPIPE, -9)
    with pytest.raises(usb.core.USBError):  # still halted
        dev.write(EP_OUT, frames.encode_ping(1))
    dev.clear_halt(EP_OUT)
    dev.write(EP_OUT, frames.encode_ping(2))  # the stream starts over at a frame boundary
    assert split_frames(bytes(dev.read(EP_IN, 512))) == [frames.Ping(2)]
    assert vdev.stats.faults["bad-frame-stall"] == 1


def test_a_transfer_with_a_bad_header_reaches_the_session_not_at_all(echo, usb_bus: UsbBus) -> None:
    """The frames before the bad header are refused with it: the host resends the stalled transfer
    whole, so delivering them would run them twice."""
    vdev, dev = echo
    seen = usb_bus.sessions[-1].seen
    before = len(seen)
    with pytest.raises(usb.core.USBError):
        dev.write(EP_OUT, frames.encode_ping(1) + frames.encode_ping(2) + b"XX" + b"\x00" * 10)
    assert len(seen) == before and vdev.stats.faults["bad-frame-stall"] == 1
    dev.clear_halt(EP_OUT)
    dev.write(EP_OUT, frames.encode_ping(1) + frames.encode_ping(2))
    assert seen[before:] == [frames.encode_ping(1), frames.encode_ping(2)]


def test_backlog_full_naks_bulk_out_until_the_host_reads(usb_bus: UsbBus) -> None:
    usb_bus.plug_echo(in_backlog=100)
    dev = _find(usb_bus)
    dev.set_configuration()
    f = frames.encode_command(1, Instr.NQAP, 0, 0, b"z" * 200)
    dev.write(EP_OUT, f)
    with pytest.raises(usb.core.USBTimeoutError):
        dev.write(EP_OUT, f, 20)
    assert len(bytes(dev.read(EP_IN, 4096))) == len(f)
    assert dev.write(EP_OUT, f, 20) == len(f)
    usb.util.dispose_resources(dev)


# --- faults as libusb error triples -----------------------------------------------------------------


def test_timeout_triple(echo) -> None:
    vdev, dev = echo
    with pytest.raises(usb.core.USBTimeoutError) as exc:  # nothing to read
        dev.read(EP_IN, 512, 10)
    assert (exc.value.errno, exc.value.backend_error_code) == (errno.ETIMEDOUT, -7)
    vdev.inject_timeouts(EP_OUT, 2)
    for _ in range(2):
        with pytest.raises(usb.core.USBTimeoutError):
            dev.write(EP_OUT, frames.encode_ping(1))
    dev.write(EP_OUT, frames.encode_ping(3))  # the injected timeouts moved no data
    assert split_frames(bytes(dev.read(EP_IN, 512))) == [frames.Ping(3)]
    assert vdev.stats.faults["timeout"] == 2


def test_infinite_timeout_is_capped(usb_bus: UsbBus) -> None:
    b = UsbBus(max_block_ms=30)
    b.plug_echo()
    dev = usb.core.find(backend=b.backend)
    dev.set_configuration()
    t0 = time.monotonic()
    with pytest.raises(usb.core.USBTimeoutError):
        dev.read(EP_IN, 512, 0)  # 0 = forever to libusb
    assert time.monotonic() - t0 < 1.0
    usb.util.dispose_resources(dev)
    b.bus.clear()


def test_stall_triple_until_clear_halt(echo) -> None:
    vdev, dev = echo
    dev.write(EP_OUT, frames.encode_ping(5))
    vdev.stall(EP_IN)
    for _ in range(2):
        with pytest.raises(usb.core.USBError) as exc:
            dev.read(EP_IN, 512)
        assert (exc.value.errno, exc.value.backend_error_code) == (errno.EPIPE, -9)
    assert bytes(dev.ctrl_transfer(0x82, 0, 0, EP_IN, 2)) == b"\x01\x00"  # GET_STATUS(endpoint): halted
    dev.clear_halt(EP_IN)
    assert split_frames(bytes(dev.read(EP_IN, 512))) == [frames.Ping(5)]  # no data lost


def test_unplug_is_enodev_everywhere_and_replug_comes_back(usb_bus: UsbBus) -> None:
    vdev = usb_bus.plug_echo()
    dev = _find(usb_bus)
    dev.set_configuration()
    dev.write(EP_OUT, frames.encode_ping(1))
    vdev.unplug()
    calls = [
        lambda: dev.write(EP_OUT, frames.encode_ping(2)),
        lambda: dev.read(EP_IN, 512),
        lambda: dev.read(EP_IRQ, 64),
        lambda: dev.ctrl_transfer(0x80, 6, 0x0100, 0, 18),
        lambda: dev.set_configuration(),
        lambda: dev.clear_halt(EP_IN),
    ]
    for call in calls:
        with pytest.raises(usb.core.USBError) as exc:
            call()
        assert (exc.value.errno, exc.value.backend_error_code) == (errno.ENODEV, -4)
    assert usb.core.find(backend=usb_bus.backend, idVendor=VID) is None
    usb.util.dispose_resources(dev)  # never raises on a vanished device
    with pytest.raises(usb.core.USBError) as exc:  # the old device object cannot be reopened
        dev.set_configuration()
    assert exc.value.errno == errno.ENODEV
    vdev.replug()
    again = _find(usb_bus)
    assert again.address != dev.address  # a new enumeration, a new address
    again.set_configuration()
    again.write(EP_OUT, frames.encode_ping(3))
    assert split_frames(bytes(again.read(EP_IN, 512))) == [frames.Ping(3)]  # nothing from before
    assert usb_bus.sessions[0].closed and not usb_bus.sessions[-1].closed
    usb.util.dispose_resources(again)


def test_reset_and_restart_start_a_fresh_session(echo) -> None:
    vdev, dev = echo
    dev.write(EP_OUT, frames.encode_ping(1))
    dev.reset()  # port reset: libusb keeps the handle, the device starts over
    dev.write(EP_OUT, frames.encode_ping(2))
    assert split_frames(bytes(dev.read(EP_IN, 512))) == [frames.Ping(2)]  # ping 1's echo was flushed
    vdev.restart()  # firmware restart, from the control plane
    dev.write(EP_OUT, frames.encode_ping(3))
    assert split_frames(bytes(dev.read(EP_IN, 512))) == [frames.Ping(3)]
    assert vdev.stats.sessions == 3 and vdev.stats.faults["restart"] == 1


def test_unplug_wakes_a_blocked_read(echo) -> None:
    vdev, dev = echo
    seen: list[BaseException] = []

    def reader() -> None:
        try:
            dev.read(EP_IN, 512, 1900)
        except usb.core.USBError as exc:
            seen.append(exc)

    t = threading.Thread(target=reader)
    t.start()
    time.sleep(0.05)
    t0 = time.monotonic()
    vdev.unplug()
    t.join(2)
    assert time.monotonic() - t0 < 0.5
    assert len(seen) == 1 and seen[0].errno == errno.ENODEV


# --- with the emulator behind it -----------------------------------------------------------------


def test_emulator_session_and_transport_faults(usb_bus: UsbBus, wall_emulator) -> None:
    emu = wall_emulator
    vdev = usb_bus.plug(emu, allowed_domains=[1])
    dev = _find(usb_bus)
    dev.set_configuration()
    qid_ok, qid_denied = 0x0001, 0x0002
    dev.write(
        EP_OUT,
        frames.encode_hello()
        + frames.encode_command(1, Instr.TAPQ, qid_ok)
        + frames.encode_command(2, Instr.TAPQ, qid_denied),
    )
    welcome, r1, r2 = split_frames(bytes(dev.read(EP_IN, 4096)))
    assert isinstance(welcome, frames.Welcome) and welcome.interrupts
    assert all(q & 0xFF == 1 for q in welcome.qids)
    assert QueueStatus.from_word(r1.status_word).response_code == ResponseCode.NORMAL
    assert QueueStatus.from_word(r2.status_word).response_code == ResponseCode.Q_NOT_AVAIL
    tf = emu.control.transport_faults
    tf.drop_frames(1)
    tf.corrupt_frames(1)
    dev.write(
        EP_OUT,
        frames.encode_ping(9) + b"".join(frames.encode_command(t, Instr.TAPQ, qid_ok) for t in (10, 11, 12)),
    )
    data = bytes(dev.read(EP_IN, 4096))
    pong_len = frames.frame_length(data[:8])
    assert frames.decode_frame(data[:pong_len]) == frames.Pong(9)  # heartbeats are exempt
    data = data[pong_len:]
    n = frames.frame_length(data[:8])
    with pytest.raises(ValueError, match="CRC"):  # 10 dropped, 11 corrupted (header intact), 12 fine
        frames.decode_frame(data[:n])
    assert frames.decode_frame(data[n:]).tag == 12
    tf.disconnect()
    with pytest.raises(usb.core.USBError) as exc:
        dev.read(EP_IN, 512, 10)
    assert exc.value.errno == errno.ENODEV
    assert vdev.attached  # a glitch: it re-enumerated at once
    usb.util.dispose_resources(dev)
    assert _find(usb_bus).address != dev.address
    assert vdev.stats.faults == {"drop": 1, "corrupt": 1, "disconnect": 1}


# --- the description ------------------------------------------------------------------------------


def _minimal(**device: object) -> dict:
    return {
        "device": {"idVendor": 1, "idProduct": 2, **device},
        "configurations": [
            {
                "interfaces": [
                    {
                        "endpoints": [
                            {"bEndpointAddress": 0x02, "type": "bulk", "wMaxPacketSize": 512},
                            {"bEndpointAddress": 0x83, "type": "bulk", "wMaxPacketSize": 512},
                            {"bEndpointAddress": 0x84, "type": "interrupt", "wMaxPacketSize": 16},
                        ]
                    }
                ]
            }
        ],
    }


def test_description_from_a_dict_with_defaults() -> None:
    d = parse_description(_minimal())
    assert d.device.iManufacturer == d.device.iSerialNumber == 0
    assert d.configurations[0].descriptor.wTotalLength == len(
        configuration_descriptor_bytes(d.configurations[0])
    )
    assert d.with_serial("S1").serial_number == "S1"
    assert load_description(d) is d
    assert load_description("default").serial_number == "APEMU0001"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"idVendr": 5}, "unknown key"),
        ({"speed": "warp"}, "speed"),
        ({"speed": "full"}, "wMaxPacketSize"),
        ({"idVendor": 0x10000}, "idVendor"),
        ({"bLength": 18}, "unknown key"),  # derived fields cannot be written
    ],
)
def test_description_errors_are_loud(change: dict, message: str) -> None:
    with pytest.raises(DescriptionError, match=message):
        parse_description(_minimal(**change))


def test_a_description_without_the_adapter_endpoints_cannot_be_plugged() -> None:
    d = _minimal()
    d["configurations"][0]["interfaces"][0]["endpoints"].pop()
    with pytest.raises(ValueError, match="interrupt IN"):
        VirtualBus().plug(session_factory=lambda n: None, frame_size=lambda b: None, description=d)


def test_custom_description_and_module_bus_discovery() -> None:
    from emulator import usb_backend

    vdev = usb_backend.plug(session_factory=lambda n: None, frame_size=lambda b: None, description=_minimal())
    try:
        be = usb_backend.get_backend()
        assert be is usb_backend.get_backend() and isinstance(be, EmulatorUsbBackend)
        dev = usb.core.find(backend=be, idVendor=1, idProduct=2)
        assert dev is not None and dev.serial_number is None
        assert vdev in usb_backend.devices()
        usb.util.dispose_resources(dev)
    finally:
        usb_backend.remove(vdev)
    assert vdev not in usb_backend.devices()
