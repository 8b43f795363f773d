"""REOFFER: a resumed version 2 session gets back the replies its lost answers took off the card.

An NQAP or DQAP answer (and the replies read ahead behind it, in the same multipart message) that a
link takes with it leaves replies that nobody holds: the card gave them away, the client never got
them, and the driver's next DQAP finds the queue empty (``card_forgot``: the requests end
Indeterminate although they completed).  The server keeps, per session, the replies each answer
took; the resumed client names the tags it lost; the server puts exactly those replies back at the
front of their queues, in the order taken.  Tested here at every layer: the frame codec, the
server session (sans-I/O, virtual clock), the client transport against a scripted ROUTER, and a
real server process over TCP.
"""

from __future__ import annotations

import random
import struct
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import zmq

import apcrypto
from apcrypto.transport import Command, TransportLost
from apcrypto.transport.zmq_client import ZmqTransport
from apformats.codes import NO_PENDING_REPLY, ResponseCode
from apformats.errors import FormatError
from apformats.frames import (
    REOFFER_TAGS_MAX,
    ErrorCode,
    ErrorFrame,
    FrameKind,
    Hello,
    Ping,
    Reoffer,
    ResultFrame,
    Welcome,
    decode_frame,
    decode_frame_spec,
    encode_command,
    encode_frame,
    encode_frame_spec,
    encode_hello,
    encode_reoffer,
    encode_welcome,
)
from apformats.messages import build_mex
from apformats.results import Instr, qid_of
from emulator import Emulator
from emulator.execution_log import read_execution_log
from emulator.frame_server import FrameSession, TakenReplies, Tenancy
from tests._fixtures_kill import KEYS, PSMID_BASE, Req, check, wait_all
from tests._fixtures_zmq import E, ServerProcess, rsa_key, server_factory

__all__ = ["server_factory"]  # fixture, imported for pytest

RC = ResponseCode
Q = qid_of(0, 0)
MOD = rsa_key(1024).n
TOKEN = bytes(range(16))


# --- the frame -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("tags", [(), (7,), (1, 0xFFFFFFFF, 3), tuple(range(REOFFER_TAGS_MAX))])
def test_reoffer_round_trips_and_both_decoders_agree(tags: tuple[int, ...]) -> None:
    data = encode_reoffer(tags)
    assert data == encode_frame(Reoffer(tags)) == encode_frame_spec(Reoffer(tags))
    assert decode_frame(data) == decode_frame_spec(data) == Reoffer(tags)
    assert data[3] == FrameKind.REOFFER and len(data) == 8 + 2 + 4 * len(tags) + 4


def _sealed(kind: int, body: bytes) -> bytes:
    blob = struct.pack(">2sBBI", b"AP", 1, kind, len(body)) + body
    return blob + struct.pack(">I", zlib.crc32(blob))


def test_a_reoffer_is_bounded_both_ways() -> None:
    with pytest.raises(ValueError):
        encode_reoffer(range(REOFFER_TAGS_MAX + 1))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        encode_reoffer([1 << 32])
    too_many = _sealed(
        FrameKind.REOFFER, struct.pack(">H", REOFFER_TAGS_MAX + 1) + bytes(4 * (REOFFER_TAGS_MAX + 1))
    )
    for decode in (decode_frame, decode_frame_spec):
        with pytest.raises(FormatError) as exc:
            decode(too_many)
        assert exc.value.kind == "field"
    short = _sealed(FrameKind.REOFFER, struct.pack(">H", 2) + bytes(4))  # says 2 tags, carries 1
    trailing = _sealed(FrameKind.REOFFER, struct.pack(">HI", 1, 5) + b"\x00")
    assert [_kind_of(short), _kind_of(trailing)] == ["truncated", "trailing"]


def _kind_of(data: bytes) -> str:
    try:
        decode_frame(data)
    except FormatError as exc:
        return exc.kind
    raise AssertionError("decoded")


# --- the bookkeeping -----------------------------------------------------------------------------------


def test_taken_replies_are_bounded_oldest_first() -> None:
    t = TakenReplies(max_tags=2, max_bytes=10)
    t.record(1, Q, [(1, b"aa")])
    t.record(2, Q, [(2, b"bb")])
    t.record(3, Q, [(3, b"cc")])  # a third tag: the oldest goes
    assert len(t) == 2 and t.size == 4 and t.dropped == 1
    t.record(4, Q, [(4, b"0123456789")])  # 14 bytes over a bound of 10: everything older goes
    assert len(t) == 1 and t.size == 10 and t.dropped == 3
    back, missed = t.take([1, 4])
    assert back == {Q: [(4, b"0123456789")]} and missed == 1
    assert len(t) == 0 and t.size == 0  # a take forgets everything: what was not named arrived


def test_taken_replies_come_back_in_answer_order_per_queue_and_a_reset_voids_them() -> None:
    t = TakenReplies()
    q2 = qid_of(1, 0)
    t.record(10, Q, [(1, b"a"), (2, b"b")])
    t.record(11, q2, [(3, b"c")])
    t.record(12, Q, [(4, b"d")])
    t.record(13, Q, [(5, b"e")])
    back, missed = t.take([13, 12, 11, 10, 99])  # the client's order does not matter; 99 unknown
    assert back == {Q: [(1, b"a"), (2, b"b"), (4, b"d"), (5, b"e")], q2: [(3, b"c")]} and missed == 1
    t.record(20, Q, [(6, b"f")])
    t.record(21, q2, [(7, b"g")])
    t.forget_queue(Q)
    assert t.take([20, 21]) == ({q2: [(7, b"g")]}, 1)


# --- the server session (virtual clock: nothing completes unless the test moves time) -------------------


class _Server:
    """One emulator shared through a Tenancy, as the ZeroMQ server runs it; connections come and go."""

    def __init__(self) -> None:
        self.emu = Emulator("default", seed=3)
        self.tenancy = Tenancy(self.emu, grace=60.0, clock=lambda: 0.0)

    def connect(self, version: int = 2, token: bytes = TOKEN) -> tuple[FrameSession, Welcome]:
        s = FrameSession(self.emu, notify=lambda frame: None, name="t", tenancy=self.tenancy)
        welcome = decode_frame(s.handle(encode_hello([0], max_version=version, token=token))[0])
        assert isinstance(welcome, Welcome) and welcome.version == version
        return s, welcome

    def nqaps(self, s: FrameSession, psmids: range) -> None:
        for p in psmids:
            (ans,) = _results(s.handle(encode_command(p, Instr.NQAP, Q, p, build_mex(p + 2, E, MOD))))
            assert ans.to_result().status.response_code == RC.NORMAL
        self.emu.clock.advance(1.0)  # every reply is ready now


def _results(frames: list[bytes]) -> list[ResultFrame]:
    out = [decode_frame(f) for f in frames]
    assert all(isinstance(f, ResultFrame) for f in out), out
    return out  # type: ignore[return-value]


def _drain(s: FrameSession, tag: int) -> list[tuple[int, bytes]]:
    """DQAP until the card says nothing is pending: every reply it gives, in order (read-ahead too)."""
    got: list[tuple[int, bytes]] = []
    for t in range(tag, tag + 50):
        frames = _results(s.handle(encode_command(t, Instr.DQAP, Q)))
        got += [(f.psmid, f.reply) for f in frames if f.to_result().status.response_code == RC.NORMAL]
        if frames[-1].to_result().status.response_code == NO_PENDING_REPLY:
            return got
    raise AssertionError("the queue never ran dry")


def test_a_resumed_session_gets_back_exactly_the_replies_its_lost_answers_took() -> None:
    srv = _Server()
    a, _ = srv.connect()
    srv.nqaps(a, range(100, 106))
    first = _results(a.handle(encode_command(20, Instr.DQAP, Q, 0)))  # takes 100 and reads ahead 101..105
    assert sorted(f.psmid for f in first) == list(range(100, 106))  # in completion order (jitter)
    lost_two = [(f.psmid, f.reply) for f in first]
    a.close()  # the link went with that answer
    b, welcome = srv.connect()
    assert welcome.resumed
    assert b.handle(encode_reoffer([20])) == []  # no answer: the client just goes on
    assert _drain(b, 30) == lost_two  # the same replies, bit for bit, in the order taken
    assert b.stats["reoffered"] == 6 and srv.tenancy.stats["reoffered"] == 6
    # a reply put back is not a new run: one execution each, taken again (dequeued set anew)
    log = srv.emu.execution_log
    assert [log.starts(p) for p in range(100, 106)] == [1] * 6
    assert all(e.dequeued is not None and e.outcome == "completed" for e in log.entries())


def test_a_reply_put_back_is_not_read_back_until_taken_again() -> None:
    """The execution log must not say the host has a reply that went back on the card: a reset that
    then discards it logs it ``discarded`` with no ``dequeued`` (tests/oracle.py's log consistency:
    "read back by the host but discarded" would be a lie)."""
    srv = _Server()
    a, _ = srv.connect()
    srv.nqaps(a, range(100, 103))
    assert len(_results(a.handle(encode_command(20, Instr.DQAP, Q)))) == 3
    a.close()
    b, _ = srv.connect()
    assert b.handle(encode_reoffer([20])) == [] and b.stats["reoffered"] == 3
    entries = srv.emu.execution_log.entries()
    assert [(e.outcome, e.dequeued) for e in entries] == [("completed", None)] * 3
    (ans,) = _results(b.handle(encode_command(30, Instr.RAPQ, Q)))
    assert ans.to_result().status.response_code == RC.NORMAL
    assert [(e.outcome, e.dequeued) for e in srv.emu.execution_log.entries()] == [("discarded", None)] * 3


def test_only_the_named_tags_come_back_ahead_of_what_the_card_still_holds() -> None:
    srv = _Server()
    a, _ = srv.connect()
    srv.nqaps(a, range(200, 203))
    kept = _results(a.handle(encode_command(40, Instr.DQAP, Q)))  # received: 200..202 all at once
    assert sorted(f.psmid for f in kept) == [200, 201, 202]
    srv.nqaps(a, range(300, 304))
    lost = _results(a.handle(encode_command(41, Instr.NQAP, Q, 304, build_mex(306, E, MOD))))
    # an NQAP that found replies waiting took them too (its own not ready yet: virtual clock)
    assert sorted(f.psmid for f in lost[1:]) == [300, 301, 302, 303]
    srv.emu.clock.advance(1.0)  # 304 is ready on the card, behind what the lost answer took
    a.close()
    b, _ = srv.connect()
    assert b.handle(encode_reoffer([41, 999])) == []
    # 200..202 are not repeated; the lost ones come first, in the order taken, then the card's own
    assert [p for p, _ in _drain(b, 50)] == [f.psmid for f in lost[1:]] + [304]
    assert b.stats["reoffer_missed"] == 1 and b.stats["reoffered"] == 4


def test_without_a_reoffer_the_lost_replies_stay_lost_and_are_forgotten() -> None:
    srv = _Server()
    a, _ = srv.connect()
    srv.nqaps(a, range(100, 103))
    assert len(_results(a.handle(encode_command(20, Instr.DQAP, Q)))) == 3
    a.close()
    b, _ = srv.connect()
    assert _drain(b, 30) == []  # what the old link's answer took is gone (the loss REOFFER repairs)
    # a REOFFER after a command is refused: the kept answers were the old link's, and are forgotten
    (err,) = [decode_frame(f) for f in b.handle(encode_reoffer([20]))]
    assert isinstance(err, ErrorFrame) and err.code == ErrorCode.UNEXPECTED
    assert len(srv.tenancy.leases()[0].taken) == 0


def test_a_reset_after_the_take_voids_the_reoffer() -> None:
    srv = _Server()
    a, _ = srv.connect()
    srv.nqaps(a, range(100, 103))
    assert len(_results(a.handle(encode_command(20, Instr.DQAP, Q)))) == 3
    (ans,) = _results(a.handle(encode_command(21, Instr.RAPQ, Q)))
    assert ans.to_result().status.response_code == RC.NORMAL
    a.close()
    srv.emu.clock.advance(1.0)  # the reset is over
    b, _ = srv.connect()
    assert b.handle(encode_reoffer([20])) == []
    assert _drain(b, 30) == [] and b.stats["reoffered"] == 0 and b.stats["reoffer_missed"] == 1


@pytest.mark.parametrize(
    "opening",
    [
        pytest.param(lambda srv: srv.connect(token=bytes(16))[0], id="fresh-session"),
        pytest.param(lambda srv: srv.connect(version=1)[0], id="version-1"),
    ],
)
def test_a_session_that_did_not_resume_at_version_2_refuses_a_reoffer(
    opening: Callable[[_Server], FrameSession],
) -> None:
    srv = _Server()
    s = opening(srv)
    (err,) = [decode_frame(f) for f in s.handle(encode_reoffer([1]))]
    assert isinstance(err, ErrorFrame) and err.code == ErrorCode.UNEXPECTED
    assert s.stats["refused_reoffer"] == 1


def test_a_version_1_session_keeps_nothing_and_a_reoffer_before_hello_is_refused() -> None:
    srv = _Server()
    a, _ = srv.connect(version=1)
    srv.nqaps(a, range(100, 103))
    assert len(_results(a.handle(encode_command(20, Instr.DQAP, Q)))) == 1  # no read-ahead
    assert len(srv.tenancy.leases()[0].taken) == 0
    a.close()
    b, welcome = srv.connect(version=1)
    assert welcome.resumed
    (err,) = [decode_frame(f) for f in b.handle(encode_reoffer([20]))]
    assert isinstance(err, ErrorFrame) and err.code == ErrorCode.UNEXPECTED
    fresh = FrameSession(srv.emu, tenancy=srv.tenancy)
    (err,) = [decode_frame(f) for f in fresh.handle(encode_reoffer([20]))]
    assert isinstance(err, ErrorFrame) and err.code == ErrorCode.NOT_HELLO


def test_what_a_session_keeps_is_bounded_and_the_oldest_answers_go_first() -> None:
    srv = _Server()
    a, _ = srv.connect()
    srv.tenancy.leases()[0].taken = TakenReplies(max_tags=2)
    taken = []
    for n, tag in enumerate((20, 21, 22)):  # three answers, each taking two replies
        srv.nqaps(a, range(100 + 10 * n, 102 + 10 * n))
        answer = _results(a.handle(encode_command(tag, Instr.DQAP, Q)))
        assert len(answer) == 2
        taken.append([f.psmid for f in answer])
    a.close()
    b, _ = srv.connect()
    assert b.handle(encode_reoffer([20, 21, 22])) == []
    assert [p for p, _ in _drain(b, 30)] == taken[1] + taken[2]  # tag 20 was pruned: lost, as before
    assert b.stats["reoffer_missed"] == 1 and b.stats["reoffered"] == 4


# --- the client transport, against a scripted server ---------------------------------------------------


def _scripted_server(sock: zmq.Socket, seen: list[object], done: threading.Event) -> None:
    """WELCOME the first HELLO, answer nothing after it (the client's link-down detection fires),
    WELCOME the reconnect's HELLO as a resume, then record the reconnected client's first two
    frames that are not PINGs."""
    try:
        ident, raw = sock.recv_multipart()
        hello = decode_frame(raw)
        assert isinstance(hello, Hello) and hello.max_version >= 2
        sock.send_multipart([ident, encode_welcome([Q], interrupts=True, version=2, token=hello.token)])
        while True:  # the first link: take everything, answer nothing
            parts = sock.recv_multipart()
            f = decode_frame(parts[1])
            if parts[0] != ident and isinstance(f, Hello):
                ident = parts[0]
                welcome = encode_welcome([Q], interrupts=True, version=2, resumed=True, token=f.token)
                sock.send_multipart([ident, welcome])
                break
        while len(seen) < 2:
            parts = sock.recv_multipart()
            if parts[0] != ident:
                continue
            for p in parts[1:]:
                f = decode_frame(p)
                if not isinstance(f, Ping):
                    seen.append(f)
    finally:
        done.set()


def test_a_resumed_client_names_its_lost_answers_before_any_command() -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    sock.rcvtimeo = 8000  # a frame that never comes fails the test, never hangs it
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    seen: list[object] = []
    done = threading.Event()
    th = threading.Thread(target=_scripted_server, args=(sock, seen, done), daemon=True)
    th.start()
    t = ZmqTransport(
        f"tcp://127.0.0.1:{port}", heartbeat=0.1, timeout=5.0, reconnect_delay=0.05, peer_deadline=30.0
    )
    try:
        t.submit([Command(7, Instr.DQAP, Q), Command(8, Instr.TAPQ, Q), Command(9, Instr.NQAP, Q, 1, b"m")])
        lost: list[int] = []
        deadline = time.monotonic() + 8.0
        while not lost and time.monotonic() < deadline:
            lost = [tag for ev in t.poll(0.2) if isinstance(ev, TransportLost) for tag in ev.tags]
        assert sorted(lost) == [7, 8, 9]  # the link went down with them unanswered
        t.submit([Command(10, Instr.TAPQ, Q)])
        assert done.wait(8.0)
        reoffer, command = seen
        assert reoffer == Reoffer((7, 9))  # the NQAP and the DQAP; a TAPQ takes no reply
        assert isinstance(command, Command) and command.tag == 10
        assert t.counters["reoffer_tags"] == 2
    finally:
        t.close()
        th.join(5.0)
        sock.close(linger=0)
        ctx.term()


# --- a real server process ----------------------------------------------------------------------------


def _raw(url: str) -> tuple[zmq.Context, zmq.Socket]:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.rcvtimeo = 5000
    sock.connect(url)
    return ctx, sock


def _ask(sock: zmq.Socket, frame: bytes) -> list[object]:
    sock.send(frame)
    return [decode_frame(p) for p in sock.recv_multipart()]


@pytest.mark.parametrize("reoffer", [True, False], ids=["reoffer", "without"])
def test_a_real_server_puts_lost_replies_back_for_a_resumed_client(
    server_factory: Callable[..., ServerProcess], reoffer: bool
) -> None:
    """Over TCP, with a server process: an answer carrying read-ahead replies is "lost" (the client
    drops its socket without a word), the client resumes on a new connection, and its DQAPs find
    those replies (with REOFFER) or an empty queue, the ``card_forgot`` case (without)."""
    srv = server_factory("--profile", "fast", "--seed", "1")
    ctx, sock = _raw(srv.data)
    try:
        (welcome,) = _ask(sock, encode_hello([0], max_version=2, token=TOKEN))
        assert isinstance(welcome, Welcome) and welcome.version == 2
        q = welcome.qids[0]
        for p in (1, 2, 3):  # fast profile: each reply is ready as its NQAP returns, and read ahead
            first, *ahead = _ask(sock, encode_command(p, Instr.NQAP, q, 100 + p, build_mex(p + 2, E, MOD)))
            assert isinstance(first, ResultFrame) and [a.psmid for a in ahead] == [100 + p]  # type: ignore[attr-defined]
        lost_tags = [2, 3]  # pretend the answers to 2 and 3 never came
        sock.close(linger=0)
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.rcvtimeo = 5000
        sock.connect(srv.data)
        (again,) = _ask(sock, encode_hello([0], max_version=2, token=TOKEN))
        assert isinstance(again, Welcome) and again.resumed
        if reoffer:
            sock.send(encode_reoffer(lost_tags))
        got = []
        for tag in range(10, 20):
            answer = _ask(sock, encode_command(tag, Instr.DQAP, q))
            got += [a.psmid for a in answer if a.to_result().status.response_code == RC.NORMAL]  # type: ignore[attr-defined]
            if answer[-1].to_result().status.response_code == NO_PENDING_REPLY:  # type: ignore[attr-defined]
                break
        assert got == ([102, 103] if reoffer else [])
        stats = srv.control_client().call("stats")
        assert stats["tenancy"].get("reoffered", 0) == (2 if reoffer else 0)
        # never a second run: one execution per request in the server's own log
        runs = srv.control_client().call("execution_log")
        assert sorted(e["psmid"] if isinstance(e, dict) else e.psmid for e in runs) == [101, 102, 103]
    finally:
        sock.close(linger=0)
        ctx.term()


# --- the driver, end to end: answers swallowed, the link dropped, the session resumed ------------------


def _ours_taken(entry: object) -> bool:
    """An execution-log entry (as the control plane returns it) of this test's, its reply taken."""
    e = entry if isinstance(entry, dict) else vars(entry)
    mine = e["psmid"] >> 32 == PSMID_BASE >> 32 and e["function"] == "MEX_1K"  # not the driver's probes
    return mine and e["dequeued"] is not None


def _mex(client: apcrypto.Client, n: int, rng: random.Random) -> list[Req]:
    """``n`` RSA-1024 modular exponentiations: one request message each."""
    key = KEYS[1024]
    out = []
    for _ in range(n):
        m = rng.randrange(2, key.n - 1)
        out.append(Req("ME-1024", client.mod_expo(m, key.e, key.n), pow(m, key.e, key.n), key))
    return out


def test_replies_taken_by_lost_answers_complete_their_requests_after_a_resume(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """Deterministic, with the control plane instead of wall-clock luck: every answer to a wave of
    requests is swallowed (``drop_frames``) after the server executed them and took their replies
    off the card (an NQAP on the ``fast`` profile finds its reply ready and reads it ahead); then the
    server drops the connection, the client reconnects and resumes its session.  Without REOFFER the
    driver's DQAPs find the queues empty (``card_forgot``): a state-changing request ends
    Indeterminate although it completed, a stateless one is re-driven (run twice); with it, every
    one completes from its first run."""
    rng = random.Random(11)
    log = tmp_path / "exec.sqlite"
    srv = server_factory("--profile", "fast", "--seed", "1", "--exec-log", str(log))
    ctl = srv.control_client()
    with apcrypto.connect(srv.data, config="fast", psmid_base=PSMID_BASE) as client:
        assert client.wait_ready(15)
        warm = _mex(client, 4, rng)
        assert wait_all(warm, 10) == 0
        rows = ctl.call("execution_log")
        before = sum(1 for e in rows if _ours_taken(e))
        last_seq = max((e if isinstance(e, dict) else vars(e))["seq"] for e in rows)
        ctl.call("drop_frames", n=100_000)
        wave = _mex(client, 6, rng)
        taken = 0
        deadline = time.monotonic() + 5.0
        while taken < before + 6 and time.monotonic() < deadline:  # bounded: the server took the 6 replies
            time.sleep(0.05)
            taken = sum(1 for e in ctl.call("execution_log") if _ours_taken(e))
        assert taken >= before + 6, (before, taken)
        time.sleep(0.1)  # (an NQAP's read-ahead leaves with its answer: nothing more is under way)
        ctl.call("clear")  # frames flow again
        assert ctl.call("disconnect") == 1  # the link goes, with every answer it swallowed
        assert wait_all(wave, 20) == 0
        stats = ctl.call("stats")
        counters = client.stats()["counters"]
    v = check(warm + wave, [read_execution_log(log)])
    assert not v.problems, v.problems
    assert v.counts == {"completed": 10}, v.counts
    # the replies came back: no DQAP found a queue empty, nothing was re-driven, each ran once.  Without
    # REOFFER: card_forgot, and these (stateless) requests re-driven, i.e. run twice; a
    # state-changing one would have ended Indeterminate instead.
    assert not {"card_forgot", "redriven"} & counters.keys(), counters
    wave_runs = [e for e in read_execution_log(log) if e.seq > last_seq and e.function == "MEX_1K"]
    assert len(wave_runs) == 6, wave_runs
    assert stats["tenancy"]["reoffered"] == 6 and stats["tenancy"]["resumed"] == 1, stats["tenancy"]
