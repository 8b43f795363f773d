"""The emulator server against a hostile or broken peer: a routing id is not a credential, a closed
session stays closed, connections that never say HELLO do not keep others out, a control request
is one frame, and refusals say what was wrong.  Each found by attacking a real server process."""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from apformats.frames import (
    BATCH_FRAMES_MAX,
    READAHEAD_VERSION,
    ErrorCode,
    ErrorFrame,
    ResultFrame,
    Welcome,
    decode_frame,
    encode_bye,
    encode_command,
    encode_hello,
    encode_interrupt,
    encode_ping,
)
from apformats.messages import build_mex
from apformats.results import Instr
from emulator import Emulator
from emulator.control_client import ControlError
from emulator.server import EmulatorServer
from tests._fixtures_zmq import ServerProcess, server_factory

V2 = {"min_version": READAHEAD_VERSION, "max_version": READAHEAD_VERSION}


class _Dealers:
    """DEALER sockets to a server, each closed at the end of the test."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.socks: list[zmq.Socket] = []

    def __call__(self, url: str, ident: bytes | None = None) -> zmq.Socket:
        s = self.ctx.socket(zmq.DEALER)
        s.linger = 0
        if ident is not None:
            s.setsockopt(zmq.ROUTING_ID, ident)  # a client may name itself: the attacker's lever
        s.connect(url)
        self.socks.append(s)
        return s

    def close(self) -> None:
        for s in self.socks:
            s.close(linger=0)
        self.ctx.term()


@pytest.fixture
def dealer() -> Iterator[_Dealers]:
    d = _Dealers()
    try:
        yield d
    finally:
        d.close()


def _ask(sock: zmq.Socket, *frames: bytes, timeout: float = 5.0) -> list[Any]:
    """Send ``frames`` as one message, return the decoded frames of the answer."""
    sock.send_multipart(list(frames))
    assert sock.poll(int(timeout * 1000)), "no answer"
    return [decode_frame(p) for p in sock.recv_multipart()]


def test_a_routing_id_reused_after_a_drop_is_a_new_client(
    server_factory: Callable[..., ServerProcess], dealer: _Dealers
) -> None:
    """The victim's connection drops without BYE while its card holds its reply; another connection
    under the same routing id gets a session of its own (NOT_HELLO), never the victim's APQNs, reply
    or resume token; the victim resumes with its token and collects its reply."""
    srv = server_factory("--profile", "small")
    ident = b"\x00spoofed-id"
    victim = dealer(srv.data, ident)
    (welcome,) = _ask(victim, encode_hello([0]))
    assert isinstance(welcome, Welcome)
    q = welcome.qids[0]
    (nqap,) = _ask(victim, encode_command(1, Instr.NQAP, q, 0x5EC2E7, build_mex(b"\x02", 3, 0xFFFF1)))
    assert isinstance(nqap, ResultFrame) and nqap.status_word == 0
    victim.close()  # the link drops: no BYE
    with srv.control_client() as ctl:  # once the server saw it go (ZeroMQ holds a second connection
        for _ in range(500):  # under a routing id in use until the first one's pipe is gone)
            if ctl.stats()["server"].get("connections_closed"):
                break
            time.sleep(0.01)

    attacker = dealer(srv.data, ident)
    for tag, instr in ((1, Instr.DQAP), (2, Instr.TAPQ)):
        (answer,) = _ask(attacker, encode_command(tag, instr, q))
        assert isinstance(answer, ErrorFrame) and answer.code == ErrorCode.NOT_HELLO, answer
    (mine,) = _ask(attacker, encode_hello())
    assert isinstance(mine, Welcome) and q not in mine.qids and mine.token != welcome.token
    attacker.close()

    back = dealer(srv.data)
    (resumed,) = _ask(back, encode_hello([0], token=welcome.token))
    assert isinstance(resumed, Welcome) and resumed.resumed and q in resumed.qids
    (reply,) = _ask(back, encode_command(3, Instr.DQAP, q))
    assert isinstance(reply, ResultFrame) and reply.psmid == 0x5EC2E7
    with srv.control_client() as ctl:
        server = ctl.stats()["server"]
    assert server["routing_ids_reused"] >= 1 and server["connections_closed"] >= 1


def test_a_clean_close_still_frees_its_apqns_at_once(
    server_factory: Callable[..., ServerProcess], dealer: _Dealers
) -> None:
    """A BYE read after the server saw its connection close is still the client's own (no new
    connection came on that descriptor since): its APQNs are freed at once, not held for a grace."""
    srv = server_factory("--profile", "small")
    with srv.control_client() as ctl:
        for i in range(5):
            s = dealer(srv.data)
            (w,) = _ask(s, encode_hello([0]))
            assert isinstance(w, Welcome), (i, w)  # the last client's domain 0 is free again
            s.send(encode_bye("done"))
            s.close(linger=1000)
            for _ in range(500):  # the server lets the session go: left, never detached
                sessions = ctl.sessions()
                if not sessions:
                    break
                assert all(x["client"] is not None for x in sessions), sessions  # none detached
                time.sleep(0.01)
            assert not ctl.sessions()
        assert ctl.stats()["tenancy"].get("detached", 0) == 0


def _offline_server(tmp_path: Path) -> tuple[EmulatorServer, Emulator]:
    emu = Emulator("fast", clock="wall")  # as served: the batch runs what falls due as it goes
    srv = EmulatorServer(emu, bind="tcp://127.0.0.1:0", control="tcp://127.0.0.1:0",
                         control_token_file=tmp_path / "token")  # fmt: skip
    srv.start()
    return srv, emu


class _GoneRouter:
    """The data socket of a client that is gone: one batch to take, and every send unroutable."""

    def __init__(self, message: list[bytes]) -> None:
        self.inbox = [message]

    def recv_multipart(self, flags: int = 0, copy: bool = True) -> list[Any]:
        if not self.inbox:
            raise zmq.Again()
        parts = self.inbox.pop(0)
        return [_Part(p) for p in parts] if not copy else parts

    def send(self, data: bytes, flags: int = 0) -> None:
        raise zmq.ZMQError(zmq.EHOSTUNREACH)


class _Part:
    """A received part as ``copy=False`` gives it: its bytes and the connection (descriptor) it came on."""

    def __init__(self, data: bytes, fd: int = 9) -> None:
        self.bytes = data
        self.fd = fd

    def get(self, option: Any) -> Any:
        assert option == zmq.SRCFD
        return self.fd


def test_a_batch_does_not_reopen_the_session_it_lost_midway(tmp_path: Path) -> None:
    """An answer sent mid-batch (interrupts wait) finds the client gone: its session is let go, and
    the rest of the batch -- a HELLO among it -- is not handled on the closed session, which would
    otherwise be granted APQNs that no peer, probe or grace would ever free."""
    srv, emu = _offline_server(tmp_path)
    real = srv._data
    ident = b"\x00gone"
    try:
        first = _GoneRouter([ident, encode_hello([0], **V2)])
        srv._data = first  # type: ignore[assignment]
        srv._recv_data([])  # HELLO handled; its WELCOME not sent yet
        peer = srv._peers[ident]
        q = peer.session.qids()[0]
        batch = [ident, *(encode_ping(i) for i in range(1, 5))]
        batch += [encode_hello([1], **V2), encode_ping(6), encode_hello([0], **V2)]
        # an interrupt waits for this client: at the 4th frame the server answers what it has
        srv._irqs.put((ident, encode_interrupt(q)))
        srv._data = _GoneRouter(batch)  # type: ignore[assignment]
        srv._serve_data(True)
        assert ident not in srv._peers and peer.session.closed
        assert peer.session.stats["frames_in"] == 1 + 4  # its HELLO and the batch up to the loss
        held = {qq for lease in srv.tenancy.leases() for qq in lease.qids}
        assert not any(qq & 0xFF == 1 for qq in held), held  # no lease for the HELLO after the loss
        assert srv.stats["unroutable"] >= 1
    finally:
        srv._data = real
        srv.close()
        emu.close()


class _Router:
    """A data socket fed by the test: (ident, descriptor, frame) messages, answers kept."""

    def __init__(self) -> None:
        self.inbox: list[tuple[bytes, int, bytes]] = []
        self.sent: list[list[bytes]] = []
        self._parts: list[bytes] = []

    def recv_multipart(self, flags: int = 0, copy: bool = True) -> list[Any]:
        if not self.inbox:
            raise zmq.Again()
        ident, fd, frame = self.inbox.pop(0)
        return [_Part(ident, fd), _Part(frame, fd)]

    def send(self, data: bytes, flags: int = 0) -> None:
        self._parts.append(bytes(data))
        if not flags & zmq.SNDMORE:
            self.sent.append(self._parts)
            self._parts = []


class _Monitor:
    """The data socket's connection events, as the test makes them happen."""

    def __init__(self) -> None:
        self.events: list[list[bytes]] = []

    def accepted(self, fd: int) -> None:
        self.events.append([struct.pack("=hi", zmq.EVENT_ACCEPTED, fd), b"tcp://127.0.0.1:1"])

    def disconnected(self, fd: int) -> None:
        self.events.append([struct.pack("=hi", zmq.EVENT_DISCONNECTED, fd), b"tcp://127.0.0.1:1"])

    def getsockopt(self, option: int) -> int:
        return zmq.POLLIN if self.events else 0

    def recv_multipart(self, flags: int = 0) -> list[bytes]:
        if not self.events:
            raise zmq.Again()
        return self.events.pop(0)

    def close(self, linger: int = 0) -> None:
        pass


def test_a_message_is_a_sessions_only_if_it_came_on_its_connection(tmp_path: Path) -> None:
    """The descriptor rule, event by event (ZeroMQ reuses a closed connection's descriptor): after
    the peer's connection closed, a message under its routing id on that descriptor is still its own
    (what it sent before it closed: a BYE) while no connection was accepted there since; once one
    was, the message is that new connection's, which gets a session of its own."""
    srv, emu = _offline_server(tmp_path)
    real_data, real_mon = srv._data, srv._mon
    router, mon = _Router(), _Monitor()
    srv._data, srv._mon = router, mon  # type: ignore[assignment]
    ident, fd = b"\x00victim", 9

    def handle(frame: bytes, on: int = fd, who: bytes = ident) -> Any:
        router.inbox.append((who, on, frame))
        router.sent.clear()
        srv._serve_data(True)
        ((_, raw),) = router.sent
        return decode_frame(raw)

    try:
        # A: the peer's connection closed and its descriptor took another one: not the peer
        mon.accepted(fd)
        welcome = handle(encode_hello())
        assert isinstance(welcome, Welcome)
        q = welcome.qids[0]
        assert isinstance(handle(encode_command(1, Instr.TAPQ, q)), ResultFrame)
        mon.disconnected(fd)
        mon.accepted(fd)
        answer = handle(encode_command(2, Instr.TAPQ, q))
        assert isinstance(answer, ErrorFrame) and answer.code == ErrorCode.NOT_HELLO
        assert srv.stats["routing_ids_reused"] == 1
        # B: the routing id of a live peer on another descriptor: not the peer
        b, bfd = b"\x00b", 10
        mon.accepted(bfd)
        wb = handle(encode_hello(), on=bfd, who=b)
        assert isinstance(wb, Welcome)
        mon.accepted(bfd + 1)
        answer = handle(encode_command(3, Instr.TAPQ, wb.qids[0]), on=bfd + 1, who=b)
        assert isinstance(answer, ErrorFrame) and answer.code == ErrorCode.NOT_HELLO
        assert srv.stats["routing_ids_reused"] == 2
        # C: closed, nothing accepted on its descriptor since: what is read under its id is still
        # its own -- its BYE -- so its APQNs are left at once, not held for a grace
        c, cfd = b"\x00c", 12
        mon.accepted(cfd)
        wc = handle(encode_hello(), on=cfd, who=c)
        assert isinstance(wc, Welcome)
        router.inbox.append((c, cfd, encode_bye("done")))
        mon.disconnected(cfd)  # read before the BYE is handled (events are read after each receive)
        srv._serve_data(True)
        assert c not in srv._peers and srv.stats["routing_ids_reused"] == 2
        held = {qq for lease in srv.tenancy.leases() for qq in lease.qids}
        assert not held & set(wc.qids), "the BYE'd session's APQNs are still held"
        assert held >= set(welcome.qids) | set(wb.qids)  # A's and B's wait their grace
    finally:
        srv._data, srv._mon = real_data, real_mon
        srv.close()
        emu.close()


def test_connections_that_never_say_hello_do_not_keep_a_client_out(
    server_factory: Callable[..., ServerProcess], dealer: _Dealers
) -> None:
    srv = server_factory("--profile", "small", "--max-sessions", "3")
    junk = [dealer(srv.data) for _ in range(3)]
    for s in junk:
        (err,) = _ask(s, b"junk")  # a session slot each, no HELLO
        assert isinstance(err, ErrorFrame)
    newcomer = dealer(srv.data)
    (w,) = _ask(newcomer, encode_hello())
    assert isinstance(w, Welcome)  # the oldest unhandshaken connection made room
    with srv.control_client() as ctl:
        assert ctl.stats()["server"]["unhandshaken_evicted"] == 1


def test_a_batch_over_the_limit_or_on_version_1_says_so(
    server_factory: Callable[..., ServerProcess], dealer: _Dealers
) -> None:
    srv = server_factory("--profile", "small")
    v2 = dealer(srv.data)
    assert isinstance(_ask(v2, encode_hello(**V2))[0], Welcome)
    (err,) = _ask(v2, *[encode_ping(i) for i in range(BATCH_FRAMES_MAX + 1)])
    assert isinstance(err, ErrorFrame) and err.code == ErrorCode.MALFORMED
    assert f"a batch holds at most {BATCH_FRAMES_MAX}" in err.text
    assert len(_ask(v2, *[encode_ping(i) for i in range(BATCH_FRAMES_MAX)])) == BATCH_FRAMES_MAX
    v1 = dealer(srv.data)
    assert isinstance(_ask(v1, encode_hello(max_version=1))[0], Welcome)
    (err,) = _ask(v1, encode_ping(1), encode_ping(2))
    assert isinstance(err, ErrorFrame) and "version 1 takes one" in err.text


def test_a_control_request_is_one_frame_and_its_envelope_is_not_echoed(
    server_factory: Callable[..., ServerProcess], dealer: _Dealers
) -> None:
    srv = server_factory("--profile", "small")
    s = dealer(srv.control)
    s.send_multipart([b"x" * 1000, b"y" * 1000, b'{"op": "ping"}'])
    assert s.poll(5000)
    parts = s.recv_multipart()
    assert len(parts) == 1 and b"one frame" in parts[0]  # nothing of what came is sent back
    with srv.control_client() as ctl:
        assert ctl.ping() == "pong" and ctl.stats()["server"]["control_malformed"] == 1
        with pytest.raises(ControlError, match="unknown fault type 'MAX_AT'"):
            ctl.inject("MAX_AT")  # a module constant of emulator.faults is not a fault type
        with pytest.raises(ControlError, match="no card 200"):
            ctl.card_state(200)
