"""``usb://`` end to end: the transport drives real pyusb against emulated adapters on a virtual bus.

RSA results are checked with ``pow``; faults are injected through the device's control API and the
emulator's transport faults, and each must end every command in exactly one event.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from apcrypto.transport import (
    Command,
    Completion,
    Interrupt,
    PeerRestored,
    TransportClosed,
    TransportLost,
    open_transport,
)
from apcrypto.transport.usb import (
    BACKEND_ENV,
    UsbDeviceNotFound,
    UsbHandshakeRefused,
    UsbTransport,
    parse_usb_url,
    resolve_backend,
)
from apformats import frames, messages
from apformats.codes import ResponseCode
from apformats.results import ApResult, Instr, qid_domain, qid_of
from emulator import Emulator
from emulator.usb.device import VirtualUsbDevice
from tests._fixtures_firmware import PUBLIC_EXPONENT, crt_args, rsa_key
from tests._fixtures_usb import EP_IN, EP_IRQ, EP_OUT, UsbBus, usb_bus, wall_emulator

__all__ = ["usb_bus", "wall_emulator"]  # fixtures used here

URL = "usb://1209:0a70"
ACCEL = qid_of(0, 1)  # a CEX8A queue in the bundled profiles


class Runner:
    """A minimal runner: submit, then poll until every tag has ended in exactly one event."""

    def __init__(self, t: UsbTransport) -> None:
        self.t = t
        self.ended: dict[int, Completion | TransportLost] = {}
        self.lost: list[TransportLost] = []
        self.interrupts: list[int] = []
        self.restored = 0  # PeerRestored events
        self._tags = iter(range(1, 1 << 30))

    def tag(self) -> int:
        return next(self._tags)

    def run(self, cmds: list[Command], timeout: float = 3.0) -> list[Completion | TransportLost]:
        self.t.submit(cmds)
        return self.wait([c.tag for c in cmds], timeout)

    def wait(self, tags: list[int], timeout: float = 3.0) -> list[Completion | TransportLost]:
        deadline = time.monotonic() + timeout
        while not all(t in self.ended for t in tags):
            left = deadline - time.monotonic()
            assert left > 0, f"tags {[t for t in tags if t not in self.ended]} never ended"
            self.pump(min(left, 0.1))
        return [self.ended[t] for t in tags]

    def pump(self, timeout: float) -> None:
        for ev in self.t.poll(timeout):
            if isinstance(ev, Completion):
                assert ev.tag not in self.ended, f"tag {ev.tag} ended twice"
                self.ended[ev.tag] = ev
            elif isinstance(ev, Interrupt):
                self.interrupts.append(ev.qid)
            elif isinstance(ev, PeerRestored):
                self.restored += 1
            else:
                assert isinstance(ev, TransportLost)
                self.lost.append(ev)
                for tag in ev.tags:
                    assert tag not in self.ended, f"tag {tag} ended twice"
                    self.ended[tag] = ev

    def until(self, predicate, timeout: float = 3.0) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, "condition never became true"
            self.pump(0.01)

    def cmd(self, instr: Instr, qid: int = ACCEL, **kw: object) -> Command:
        return Command(self.tag(), instr, qid, **kw)  # type: ignore[arg-type]

    def result(self, instr: Instr, qid: int = ACCEL, **kw: object) -> ApResult:
        (ev,) = self.run([self.cmd(instr, qid, **kw)])
        assert isinstance(ev, Completion), ev
        return ev.result


@pytest.fixture
def adapter(usb_bus: UsbBus, wall_emulator: Emulator) -> VirtualUsbDevice:
    return usb_bus.plug(wall_emulator)


@pytest.fixture
def transport(usb_bus: UsbBus, adapter: VirtualUsbDevice) -> Iterator[UsbTransport]:
    t = open_transport(URL, backend=usb_bus.backend)
    assert isinstance(t, UsbTransport)
    yield t
    t.close()


def _fast(usb_bus: UsbBus, **kw: object) -> UsbTransport:
    """A transport with short deadlines, for fault tests."""
    opts = {"timeout": 0.3, "reconnect_delay": 0.01, "reconnect_delay_max": 0.05, "peer_deadline": 0.4}
    return open_transport(URL, backend=usb_bus.backend, **{**opts, **kw})  # type: ignore[return-value]


def _rc(ev: Completion | TransportLost) -> int:
    assert isinstance(ev, Completion), ev
    return ev.result.status.response_code


# --- instructions with real results ------------------------------------------------------------------


def test_handshake_and_tapq_on_every_queue(transport: UsbTransport, wall_emulator: Emulator) -> None:
    assert transport.qids() == wall_emulator.qids()
    assert transport.supports_interrupts and transport.state == "up"
    r = Runner(transport)
    evs = r.run([r.cmd(Instr.TAPQ, q, flag=True) for q in transport.qids()])
    for ev in evs:
        assert _rc(ev) == ResponseCode.NORMAL
        assert isinstance(ev, Completion) and ev.result.hwinfo is not None and ev.result.hwinfo.slots == 8


def test_rsa_mex_and_crt_results(transport: UsbTransport) -> None:
    key = rsa_key(2048)
    n = key.public_key().public_numbers().n
    d = key.private_numbers().d
    r = Runner(transport)
    data = 0x0123456789ABCDEF << 1000
    assert (
        r.result(
            Instr.NQAP, psmid=0x51, message=messages.build_mex(data, PUBLIC_EXPONENT, n)
        ).status.response_code
        == 0
    )
    assert (
        r.result(
            Instr.NQAP, psmid=0x52, message=messages.build_crt(data, *crt_args(key))
        ).status.response_code
        == 0
    )
    replies = {}
    for _ in range(2):
        res = r.result(Instr.DQAP)
        assert res.status.response_code == ResponseCode.NORMAL
        replies[res.psmid] = messages.parse_reply(res.reply).result
    assert replies[0x51] == pow(data, PUBLIC_EXPONENT, n).to_bytes(256, "big")
    assert replies[0x52] == pow(data, d, n).to_bytes(256, "big")
    assert r.result(Instr.DQAP).status.response_code == ResponseCode.Q_FULL  # NO_PENDING_REPLY


def test_pipelining_many_commands_in_few_transfers(
    transport: UsbTransport, adapter: VirtualUsbDevice
) -> None:
    n = rsa_key(1024).public_key().public_numbers().n
    r = Runner(transport)
    queues = [qid_of(card, dom) for card in (0, 1) for dom in (0, 1, 2, 3)]
    nqaps = [
        r.cmd(Instr.NQAP, q, psmid=(q << 8) | i, message=messages.build_mex(i + 2, PUBLIC_EXPONENT, n))
        for q in queues
        for i in range(8)  # every slot of every queue
    ]
    before = adapter.stats.transfers_out
    assert all(_rc(ev) == ResponseCode.NORMAL for ev in r.run(nqaps))
    assert adapter.stats.transfers_out - before < len(nqaps) // 4  # one submit, a handful of transfers
    got = {}
    for ev in r.run([r.cmd(Instr.DQAP, q) for q in queues for _ in range(8)]):
        assert isinstance(ev, Completion) and _rc(ev) == ResponseCode.NORMAL
        got[ev.result.psmid] = messages.parse_reply(ev.result.reply).result
    assert got == {c.psmid: pow((c.psmid & 0xFF) + 2, PUBLIC_EXPONENT, n).to_bytes(128, "big") for c in nqaps}


def test_short_reads_are_reassembled(transport: UsbTransport, adapter: VirtualUsbDevice) -> None:
    adapter.limit_reads(7)  # every IN transfer cuts frames into 7-byte pieces
    r = Runner(transport)
    evs = r.run([r.cmd(Instr.TAPQ, q) for q in transport.qids()])
    assert all(_rc(ev) == ResponseCode.NORMAL for ev in evs)


def test_rapq_aqic_and_interrupts_on_the_interrupt_endpoint(
    transport: UsbTransport, adapter: VirtualUsbDevice
) -> None:
    rang = threading.Event()
    transport.set_notify(rang.set)
    r = Runner(transport)
    assert r.result(Instr.RAPQ).status.response_code == ResponseCode.NORMAL
    res = r.result(Instr.AQIC, flag=True)
    assert res.status.response_code == ResponseCode.NORMAL and res.status.irq_enabled
    n = rsa_key(1024).public_key().public_numbers().n
    r.result(Instr.NQAP, psmid=7, message=messages.build_mex(3, PUBLIC_EXPONENT, n))
    r.until(lambda: ACCEL in r.interrupts)
    assert rang.is_set()
    assert adapter.stats.interrupts >= 1 and transport.counters["interrupts"] >= 1
    assert r.result(Instr.DQAP).psmid == 7
    assert not r.result(Instr.AQIC, flag=False).status.irq_enabled


def test_domain_isolation(usb_bus: UsbBus, wall_emulator: Emulator) -> None:
    usb_bus.plug(wall_emulator, allowed_domains=[1, 3])
    with open_transport(URL, backend=usb_bus.backend) as t:
        assert t.qids() and {qid_domain(q) for q in t.qids()} == {1, 3}
        r = Runner(t)
        assert r.result(Instr.TAPQ, qid_of(0, 1)).status.response_code == ResponseCode.NORMAL
        for denied in (qid_of(0, 2), qid_of(1, 0)):
            assert r.result(Instr.TAPQ, denied).status.response_code == ResponseCode.Q_NOT_AVAIL
            assert r.result(Instr.DQAP, denied).status.response_code == ResponseCode.Q_NOT_AVAIL
    with open_transport(URL, backend=usb_bus.backend, domains=[3]) as t:
        assert {qid_domain(q) for q in t.qids()} == {3}
        assert Runner(t).result(Instr.TAPQ, qid_of(0, 1)).status.response_code == ResponseCode.Q_NOT_AVAIL
    with pytest.raises(UsbHandshakeRefused) as exc:
        open_transport(URL, backend=usb_bus.backend, domains=[2])
    assert exc.value.code == frames.ErrorCode.DOMAIN_DENIED


def test_a_frame_too_big_completes_with_message_too_big_unsent(transport: UsbTransport) -> None:
    r = Runner(transport)
    (ev,) = r.run([r.cmd(Instr.NQAP, psmid=1, message=b"\0" * frames.DEFAULT_MAX_FRAME)])
    assert _rc(ev) == ResponseCode.MESSAGE_TOO_BIG
    assert transport.counters["sent"] == 0


# --- discovery -----------------------------------------------------------------------------------------


def test_backend_from_the_environment(monkeypatch: pytest.MonkeyPatch, wall_emulator: Emulator) -> None:
    from emulator import usb_backend

    dev = usb_backend.plug(wall_emulator, serial="ENV-1")
    try:
        monkeypatch.setenv(BACKEND_ENV, "emulator.usb_backend")
        assert resolve_backend() is usb_backend.get_backend()
        with open_transport("usb://1209:0A70/ENV-1") as t:  # no backend= anywhere
            assert Runner(t).result(Instr.TAPQ).status.response_code == ResponseCode.NORMAL
    finally:
        usb_backend.remove(dev)


def test_serial_picks_the_adapter(usb_bus: UsbBus, wall_emulator: Emulator) -> None:
    usb_bus.plug(wall_emulator, serial="A", allowed_domains=[0])
    usb_bus.plug(wall_emulator, serial="B", allowed_domains=[2])
    with open_transport(URL + "/B", backend=usb_bus.backend) as t:
        assert {qid_domain(q) for q in t.qids()} == {2}
    with pytest.raises(UsbDeviceNotFound):
        open_transport(URL + "/C", backend=usb_bus.backend)


def test_default_backend_is_pyusbs_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert resolve_backend() is None  # pyusb then picks libusb; here: no library, or no such device
    with pytest.raises(UsbDeviceNotFound):
        open_transport(URL)


@pytest.mark.parametrize("url", ["usb://1209", "usb://xyz:0a70", "usb:1209:0a70", "usb://12090:1"])
def test_bad_urls(url: str) -> None:
    with pytest.raises(ValueError):
        parse_usb_url(url)


def test_parse_and_backend_errors(usb_bus: UsbBus) -> None:
    assert parse_usb_url("usb://1209:0A70/SN-1") == parse_usb_url("USB://1209:0a70/SN-1")
    assert parse_usb_url("usb://1209:0a70").serial is None
    with pytest.raises(UsbDeviceNotFound):
        open_transport(URL, backend=usb_bus.backend)  # nothing plugged in
    with pytest.raises(UsbDeviceNotFound, match="cannot import"):
        open_transport(URL, backend="no.such.module")
    with pytest.raises(UsbDeviceNotFound, match="get_backend"):
        open_transport(URL, backend="apformats")


# --- faults ---------------------------------------------------------------------------------------------


def test_timeouts_are_retried(usb_bus: UsbBus, adapter: VirtualUsbDevice) -> None:
    with _fast(usb_bus) as t:
        r = Runner(t)
        adapter.inject_timeouts(EP_OUT, 3)
        adapter.inject_timeouts(EP_IN, 3)
        assert all(_rc(ev) == 0 for ev in r.run([r.cmd(Instr.TAPQ, q) for q in t.qids()]))
        assert t.counters["write_timeouts"] == 3 and adapter.stats.faults["timeout"] == 6
        assert t.counters["links_lost"] == 0 and not r.lost


def test_stalls_are_cleared(usb_bus: UsbBus, adapter: VirtualUsbDevice) -> None:
    with _fast(usb_bus) as t:
        r = Runner(t)
        for ep in (EP_OUT, EP_IN):
            adapter.stall(ep)
            assert _rc(r.run([r.cmd(Instr.TAPQ)])[0]) == 0
            assert ep not in adapter.halted()
        r.result(Instr.AQIC, flag=True)
        adapter.stall(EP_IRQ)
        r.result(Instr.NQAP, psmid=1, message=messages.build_mex(2, 3, 1000003))
        r.until(lambda: ACCEL in r.interrupts)  # the interrupt waited behind the stall
        assert t.counters["stalls_cleared"] == 3 and not r.lost


def test_unplug_past_the_deadline_declares_the_device_gone_until_it_returns(
    usb_bus: UsbBus, adapter: VirtualUsbDevice, wall_emulator: Emulator
) -> None:
    with _fast(usb_bus) as t:
        r = Runner(t)
        adapter.inject_timeouts(EP_IN, 1 << 30)  # answers wait on the device: commands stay in flight
        inflight = [r.cmd(Instr.NQAP, psmid=p, message=messages.build_mex(2, 3, 1000003)) for p in (1, 2)]
        t.submit(inflight)
        r.until(lambda: adapter.stats.frames_in >= 3)  # HELLO + both commands reached the adapter
        adapter.unplug()
        r.until(lambda: r.lost)  # ENODEV on the next transfer
        first = r.lost[0]
        assert not first.permanent and "ENODEV" in first.reason
        assert first.tags == (1, 2) and first.qids == (ACCEL,)
        held = r.cmd(Instr.DQAP)
        t.submit([held])  # held while the device is away
        (final,) = r.wait([held.tag], timeout=2.0)
        assert isinstance(final, TransportLost) and final.permanent and final.tags == (held.tag,)
        assert t.state == "gone" and t.outstanding() == []
        late = r.cmd(Instr.TAPQ)
        (ev,) = r.run([late])  # bounced at once, never held: the driver decides where it goes
        assert isinstance(ev, TransportLost) and ev.permanent and ev.unsent == (late.tag,)
        # the adapter ran both in-flight NQAPs: only the driver's ledger can decide what they mean
        assert {e.psmid for e in wall_emulator.execution_log.entries()} >= {1, 2}
        adapter.replug()  # long after the deadline: the transport is still looking for it
        r.until(lambda: r.restored == 1)  # said once, after the new session is up
        assert t.state == "up" and t.counters["restored"] == 1 and t.counters["peer_gone"] == 1
        assert _rc(r.run([r.cmd(Instr.TAPQ)])[0]) == 0  # and serves new commands
        # one permanent loss for the outage (the held DQAP), one for the bounced TAPQ
        assert [e.tags for e in r.lost if e.permanent] == [(held.tag,), (late.tag,)]
    t.close()  # again: no error


def test_give_up_after_is_the_only_way_to_lose_the_device_for_good(
    usb_bus: UsbBus, adapter: VirtualUsbDevice
) -> None:
    with _fast(usb_bus, give_up_after=0.6) as t:
        r = Runner(t)
        adapter.unplug()
        r.until(lambda: t.state == "gone")  # past peer_deadline (0.4 s): gone, still looking
        r.until(lambda: t.state == "lost")  # past give_up_after: no more looking
        adapter.replug()
        time.sleep(0.2)  # several back-off periods (at most 0.05 s each)
        r.pump(0.01)
        assert t.state == "lost" and adapter.stats.sessions == 1 and r.restored == 0
        (ev,) = r.run([r.cmd(Instr.TAPQ)])
        assert isinstance(ev, TransportLost) and ev.permanent
    with pytest.raises(ValueError, match="give_up_after"):
        _fast(usb_bus, give_up_after=0)


def test_replug_within_the_deadline_reconnects(usb_bus: UsbBus, adapter: VirtualUsbDevice) -> None:
    with _fast(usb_bus, peer_deadline=3.0) as t:
        r = Runner(t)
        adapter.unplug()
        r.until(lambda: r.lost)  # noticed by the idle poll, nothing in flight
        assert not r.lost[0].permanent and r.lost[0].tags == () and t.state == "down"
        held = [r.cmd(Instr.TAPQ, q) for q in t.qids()[:4]]
        t.submit(held)  # held while the device is away
        time.sleep(0.05)
        adapter.replug()
        assert all(_rc(ev) == 0 for ev in r.wait([c.tag for c in held]))  # written after the new HELLO
        assert t.counters["reconnects"] == 1 and t.state == "up" and len(r.lost) == 1
        assert r.restored == 0  # back within the deadline: never declared gone, nothing to restore
        assert adapter.stats.sessions == 2


def test_dropped_and_corrupted_answers(
    usb_bus: UsbBus, adapter: VirtualUsbDevice, wall_emulator: Emulator
) -> None:
    faults = wall_emulator.control.transport_faults
    with _fast(usb_bus, timeout=0.2) as t:
        r = Runner(t)
        for arm, counter in ((faults.drop_frames, "drop"), (faults.corrupt_frames, "corrupt")):
            arm(1)
            a, b = r.cmd(Instr.TAPQ), r.cmd(Instr.TAPQ)
            ev_a, ev_b = r.run([a, b])
            assert isinstance(ev_a, TransportLost) and not ev_a.permanent and ev_a.tags == (a.tag,)
            assert _rc(ev_b) == 0
            assert adapter.stats.faults[counter] == 1
        assert t.counters["corrupt_rx"] == 1 and t.counters["reply_timeouts"] == 2
        assert t.counters["links_lost"] == 0 and t.state == "up"


def test_a_glitch_from_the_emulator_control_plane(
    usb_bus: UsbBus, adapter: VirtualUsbDevice, wall_emulator: Emulator
) -> None:
    with _fast(usb_bus, peer_deadline=3.0) as t:
        r = Runner(t)
        assert wall_emulator.control.disconnect()["disconnect"] == 1  # the control plane's own name
        r.run([r.cmd(Instr.TAPQ)])  # ends one way or the other
        r.until(lambda: t.counters["reconnects"] == 1 and t.state == "up")
        assert _rc(r.run([r.cmd(Instr.TAPQ)])[0]) == 0
        assert adapter.stats.faults["disconnect"] == 1


def test_an_adapter_restart_is_noticed_and_the_session_renewed(
    usb_bus: UsbBus, adapter: VirtualUsbDevice
) -> None:
    with _fast(usb_bus, peer_deadline=3.0) as t:
        r = Runner(t)
        adapter.restart()  # no re-enumeration: the next command gets NOT_HELLO
        (ev,) = r.run([r.cmd(Instr.TAPQ)])
        assert isinstance(ev, TransportLost) and not ev.permanent and "NOT_HELLO" in ev.reason
        r.until(lambda: t.state == "up" and t.counters["reconnects"] == 1)
        assert _rc(r.run([r.cmd(Instr.TAPQ)])[0]) == 0


def test_a_stream_out_of_step_is_started_over(usb_bus: UsbBus, adapter: VirtualUsbDevice) -> None:
    with _fast(usb_bus, peer_deadline=3.0) as t:
        r = Runner(t)
        adapter.inject_timeouts(EP_IN, 1 << 30)  # hold the answer on the device...
        first = r.cmd(Instr.TAPQ)
        t.submit([first])
        r.until(lambda: adapter.stats.frames_out >= 2)  # WELCOME + the answer, queued
        adapter.inject_bytes(EP_IN, b"garbage!" * 4)  # ...with garbage behind it
        adapter.clear_faults()
        (ev,) = r.wait([first.tag])
        assert _rc(ev) == 0  # the answer before the garbage is delivered
        r.until(lambda: t.counters["reconnects"] == 1 and t.state == "up")
        assert r.lost and "magic" in r.lost[0].reason
        assert _rc(r.run([r.cmd(Instr.TAPQ)])[0]) == 0


def test_writes_that_never_complete_break_the_link(usb_bus: UsbBus, adapter: VirtualUsbDevice) -> None:
    with _fast(usb_bus, timeout=0.1, peer_deadline=3.0) as t:
        r = Runner(t)
        adapter.inject_timeouts(EP_OUT, 1 << 30)
        (ev,) = r.run([r.cmd(Instr.TAPQ)])
        assert isinstance(ev, TransportLost) and not ev.permanent and "accepted nothing" in ev.reason
        # a new configuration clears the endpoint's state: the reconnect works
        r.until(lambda: t.state == "up" and t.counters["reconnects"] == 1)
        assert _rc(r.run([r.cmd(Instr.TAPQ)])[0]) == 0


# --- close --------------------------------------------------------------------------------------------------


def test_close_is_idempotent_and_safe_on_an_unplugged_device(
    usb_bus: UsbBus, adapter: VirtualUsbDevice
) -> None:
    t = _fast(usb_bus, peer_deadline=30.0)
    adapter.unplug()
    Runner(t).until(lambda: t.state == "down", timeout=1.0)  # reconnecting, with a long deadline
    t0 = time.monotonic()
    t.close()
    t.close()
    assert time.monotonic() - t0 < 1.0 and t.closed
    with pytest.raises(TransportClosed):
        t.submit([Command(1, Instr.TAPQ, ACCEL)])
    assert t.poll(0.01) == []


def test_close_says_bye(usb_bus: UsbBus, adapter: VirtualUsbDevice) -> None:
    t = open_transport(URL, backend=usb_bus.backend)
    (session,) = [adapter._session]
    t.close()
    assert session is not None and session.closed  # BYE ended the session on the adapter
