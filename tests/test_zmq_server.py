"""The server process: bad frames from a raw client, domain grants, CURVE, control plane, CLI, peer loss
and clean stop."""

from __future__ import annotations

import json
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq

from apcrypto.transport import Command, Completion, TransportLost, open_transport
from apcrypto.transport.zmq_client import HandshakeRefused, ZmqTransport
from apformats.codes import ResponseCode
from apformats.frames import (
    DEFAULT_MAX_FRAME,
    ErrorCode,
    ErrorFrame,
    Pong,
    ResultFrame,
    Welcome,
    decode_frame,
    encode_command,
    encode_hello,
    encode_ping,
)
from apformats.results import Instr, qid_of
from emulator.cli import main as cli_main
from emulator.control_client import ControlClient, ControlError, control_options, curve_options
from emulator.server import CONTROL_OPS
from tests._fixtures_zmq import ServerProcess, collect, control, server_factory, zmq_server

__all__ = ["control", "server_factory", "zmq_server"]  # fixtures, imported for pytest

RC = ResponseCode
Q00, Q01, Q10, Q11 = qid_of(0, 0), qid_of(0, 1), qid_of(1, 0), qid_of(1, 1)


class RawClient:
    """A bare DEALER speaking frames by hand, to send what a well-behaved client never would."""

    def __init__(self, url: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(url)

    def ask(self, *parts: bytes, timeout: float = 5.0):
        self.sock.send_multipart(list(parts))
        assert self.sock.poll(int(timeout * 1000)), "no answer"
        return decode_frame(self.sock.recv())

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


@pytest.fixture
def raw(zmq_server: ServerProcess) -> Iterator[RawClient]:
    c = RawClient(zmq_server.data)
    yield c
    c.close()


def test_bad_frames_get_errors_and_others_keep_being_served(
    raw: RawClient, zmq_server: ServerProcess
) -> None:
    with open_transport(zmq_server.data) as other:
        cmd = encode_command(5, Instr.TAPQ, Q00)
        assert raw.ask(cmd) == ErrorFrame(5, ErrorCode.NOT_HELLO, "no session: send HELLO first")
        assert isinstance(raw.ask(encode_hello()), Welcome)
        bad_opcode = bytearray(cmd)
        bad_opcode[12] = 0x66
        bad_opcode[-4:] = struct.pack(">I", zlib.crc32(bytes(bad_opcode[:-4])))
        cases = [
            ((bytes(bad_opcode),), 5, ErrorCode.UNKNOWN_OPCODE),
            ((cmd[:-3],), 0, ErrorCode.MALFORMED),
            ((b"garbage",), 0, ErrorCode.MALFORMED),
            ((cmd[:11] + b"\x07" + cmd[12:],), 0, ErrorCode.CORRUPT),
            ((encode_command(6, Instr.NQAP, Q00, 1, bytes(DEFAULT_MAX_FRAME)),), 6, ErrorCode.TOO_BIG),
            ((cmd, cmd), 0, ErrorCode.MALFORMED),  # two frames in one message
        ]
        for parts, tag, code in cases:
            err = raw.ask(*parts)
            assert isinstance(err, ErrorFrame) and (err.tag, err.code) == (tag, code), err
            # the other client is served between every bad frame
            other.submit([Command(tag + 100, Instr.TAPQ, Q00)])  # its own APQN (domain 0)
            evs = collect(other, lambda evs: any(isinstance(e, Completion) for e in evs))
            assert evs[0].result.status.rc == RC.NORMAL
        res = raw.ask(encode_command(7, Instr.TAPQ, Q11, flag=True))  # raw was given domain 1
        assert isinstance(res, ResultFrame) and res.to_result().hwinfo is not None
        assert raw.ask(encode_ping(9)) == Pong(9)


def test_control_plane_ops(zmq_server: ServerProcess, control: ControlClient) -> None:
    assert control.ping() == "pong"
    assert control.ops() == sorted(CONTROL_OPS)
    assert control.qids() == [Q00, Q01, Q10, Q11]
    t0 = control.now()
    assert isinstance(t0, float) and control.call("clock") >= t0
    assert control.card_state(0) == "NORMAL"
    stats = control.stats()
    assert {"emulator", "server", "sessions", "utilisation"} <= set(stats)
    fault = control.busy(Q00, 60.0)
    assert fault["type"] == "Busy"
    assert [f["type"] for f in control.faults()] == ["Busy"]
    control.slow_engines(0, 2.0, 1.0)
    control.fail_request(0x82, qid=Q00, nth=1)
    control.reset_in_progress(Q01, 0.001)
    assert control.state(fault) == "active"
    later = control.inject("Checkstop", card=1, at=1e6)
    assert later == {"type": "Checkstop", "card": 1, "at": 1e6, "after_requests": None}
    assert control.state(later) == "pending"
    with pytest.raises(ControlError):
        control.inject("Meteorite", card=0)
    control.clear()
    assert control.state(fault) == "done"
    assert control.faults() == []
    with pytest.raises(ControlError) as ei:
        control.call("no_such_op")
    assert ei.value.type == "KeyError"
    with pytest.raises(ControlError):
        control.machine_failure(99)  # no such card
    with pytest.raises(ControlError):
        control.call("busy", qid=Q00)  # missing argument
    with open_transport(zmq_server.data, domains=[0]) as t:
        assert t.qids() == [Q00, Q10]
        sessions = control.sessions()
        mine = [s for s in sessions if s["domains"] == [0]]
        assert len(mine) == 1 and mine[0]["established"]
        assert control.disconnect(mine[0]["client"]) == 1
        evs = collect(t, lambda evs: any(isinstance(e, TransportLost) for e in evs))
        assert not evs[-1].permanent
    # a malformed request is an answer, not a dead control plane
    bad = RawClient(zmq_server.control)
    try:
        bad.sock.send(b"{not json")
        assert bad.sock.poll(5000)
        answer = json.loads(bad.sock.recv())
        assert answer["ok"] is False and answer["type"] == "JSONDecodeError"
    finally:
        bad.close()
    assert control.ping() == "pong"


def test_control_client_times_out_without_a_server() -> None:
    with ControlClient("tcp://127.0.0.1:9", timeout=0.2) as c, pytest.raises(TimeoutError):
        c.ping()


def test_cli_control_and_keygen(
    zmq_server: ServerProcess,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    token = ["--token-file", str(zmq_server.token_file)]
    assert cli_main(["control", zmq_server.control, "ping", *token]) == 0
    assert json.loads(capsys.readouterr().out) == "pong"
    assert cli_main(["control", zmq_server.control, "busy", f"qid={Q11}", *token]) == 1
    assert "missing" in capsys.readouterr().err
    assert cli_main(["control", zmq_server.control, "clear", *token]) == 0
    capsys.readouterr()
    assert cli_main(["control", zmq_server.control, "execution_log", *token]) == 0
    assert isinstance(json.loads(capsys.readouterr().out), list)
    assert cli_main(["control", zmq_server.control, "ping"]) == 0  # found in the runtime dir
    capsys.readouterr()
    monkeypatch.setenv("APCRYPTO_CONTROL_TOKEN", "guess")
    assert cli_main(["control", zmq_server.control, "ping"]) == 1  # a wrong credential: refused
    assert "credential" in capsys.readouterr().err
    assert cli_main(["keygen", str(tmp_path / "keys"), "--client", "a", "--client", "b"]) == 0
    assert sorted(p.name for p in (tmp_path / "keys" / "clients").iterdir()) == ["a.key", "b.key"]
    assert sorted(p.name for p in (tmp_path / "keys" / "control").iterdir()) == ["control.key"]
    assert set(curve_options(tmp_path / "keys", "a")) == {"curve_server_key", "curve_keypair"}


def test_domain_grants_and_sigterm_stop(server_factory: Callable[..., ServerProcess]) -> None:
    srv = server_factory("--profile", "small", "--domains", "1")
    with pytest.raises(HandshakeRefused) as ei:
        open_transport(srv.data, domains=[0, 1])
    assert ei.value.code == ErrorCode.DOMAIN_DENIED
    with open_transport(srv.data) as t:
        assert t.qids() == [Q01, Q11]
        t.submit([Command(1, Instr.TAPQ, Q00)])
        evs = collect(t, lambda evs: bool(evs))
        assert evs[0].result.status.rc == RC.Q_NOT_AVAIL
        started = time.monotonic()
        assert srv.terminate() == 0  # SIGTERM: clean stop, exit status 0
        assert time.monotonic() - started < 5
        evs = collect(t, lambda evs: any(isinstance(e, TransportLost) for e in evs))
        lost = [e for e in evs if isinstance(e, TransportLost)]
        assert "BYE" in lost[0].reason and not lost[0].permanent


def test_peer_frozen_then_lost_reports_every_unanswered_tag(
    server_factory: Callable[..., ServerProcess],
) -> None:
    srv = server_factory("--profile", "small")
    deadline = 1.0
    t = open_transport(
        srv.data, timeout=5.0, peer_deadline=deadline, reconnect_delay=0.05, reconnect_delay_max=0.2
    )
    assert isinstance(t, ZmqTransport)
    try:
        srv.freeze()  # stops answering; its sockets stay open
        frozen = time.monotonic()
        t.submit([Command(i, Instr.TAPQ, Q00) for i in range(1, 4)])  # sent, never answered
        evs = collect(t, lambda evs: any(isinstance(e, TransportLost) for e in evs), timeout=3)
        t.submit([Command(i, Instr.TAPQ, Q00) for i in range(4, 6)])  # held while reconnecting
        evs += collect(
            t, lambda evs: any(isinstance(e, TransportLost) and e.permanent for e in evs), timeout=3
        )
        elapsed = time.monotonic() - frozen
        lost = [e for e in evs if isinstance(e, TransportLost)]
        assert lost[-1].permanent and all(not e.permanent for e in lost[:-1])
        assert sorted(tag for e in lost for tag in e.tags) == [1, 2, 3, 4, 5]
        assert elapsed < deadline + 0.5, elapsed
        assert t.outstanding() == []
        t.submit([Command(6, Instr.TAPQ, Q00)])  # after a permanent loss: lost at once
        evs = collect(t, lambda evs: bool(evs), timeout=1)
        assert isinstance(evs[0], TransportLost) and evs[0].tags == (6,) and evs[0].permanent
    finally:
        t.close()
        t.close()  # idempotent, quiet on a dead peer


def test_peer_killed_is_lost_within_the_deadline(server_factory: Callable[..., ServerProcess]) -> None:
    srv = server_factory("--profile", "small")
    with open_transport(srv.data, peer_deadline=0.8, reconnect_delay=0.05) as t:
        srv.kill()
        killed = time.monotonic()
        t.submit([Command(1, Instr.TAPQ, Q00)])
        evs = collect(
            t, lambda evs: any(isinstance(e, TransportLost) and e.permanent for e in evs), timeout=3
        )
        assert time.monotonic() - killed < 0.8 + 0.5
        assert sorted(tag for e in evs if isinstance(e, TransportLost) for tag in e.tags) == [1]


def test_curve_allows_listed_keys_and_refuses_others(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    assert cli_main(["keygen", str(keys), "--client", "ops"]) == 0
    srv = server_factory("--profile", "small", "--curve-dir", str(keys))
    allowed = curve_options(keys, "ops")
    with open_transport(srv.data, **allowed) as t:
        t.submit([Command(1, Instr.TAPQ, Q00)])
        assert collect(t, lambda evs: bool(evs))[0].result.status.rc == RC.NORMAL
    with ControlClient(srv.control, **control_options(keys)) as c:
        assert c.ping() == "pong"
    with ControlClient(srv.control, timeout=0.5, **allowed) as c, pytest.raises(TimeoutError):
        c.ping()  # a data-plane key does not open the control door
    stranger = {"curve_server_key": allowed["curve_server_key"], "curve_keypair": zmq.curve_keypair()}
    for options in (stranger, {}):  # an unlisted key; no CURVE at all
        started = time.monotonic()
        with pytest.raises(HandshakeRefused) as ei:
            open_transport(srv.data, timeout=2.0, **options)
        assert ei.value.code == 0
        assert time.monotonic() - started < 1.0  # the refused handshake is seen, not waited out
    with ControlClient(srv.control, timeout=0.3, **stranger) as c, pytest.raises(TimeoutError):
        c.ping()


def test_server_restart_is_a_transient_loss(server_factory: Callable[..., ServerProcess]) -> None:
    """The server dies and a new one binds the same port: the link comes back within the deadline."""
    srv = server_factory("--profile", "small")
    with open_transport(srv.data, peer_deadline=5.0, reconnect_delay=0.05, reconnect_delay_max=0.2) as t:
        srv.kill()
        evs = collect(t, lambda evs: any(isinstance(e, TransportLost) for e in evs), timeout=3)
        assert [e.permanent for e in evs if isinstance(e, TransportLost)] == [False]
        server_factory("--profile", "small", "--bind", srv.data)
        t.submit([Command(1, Instr.TAPQ, Q00)])
        evs = collect(t, lambda evs: any(isinstance(e, Completion) for e in evs), timeout=5)
        assert [e.result.status.rc for e in evs if isinstance(e, Completion)] == [RC.NORMAL]
        assert t.counters["reconnects"] == 1
