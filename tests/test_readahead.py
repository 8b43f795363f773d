"""Read-ahead (session protocol version 2): a server answers an NQAP or DQAP that finds replies waiting
with those replies too, and the client transport answers its next DQAPs of that queue from them.

Three layers, each checked on its own:

* the server session (:class:`emulator.frame_server.FrameSession`) on a real emulator: which answers
  carry extra RESULT frames, how many, and never in a version 1 session;
* the client side (:class:`apcrypto.transport.framed.FramedTransport`) fed frames by hand, so every
  ordering the wire can produce is tried deterministically: kept replies answer DQAPs without a
  frame sent, a DQAP that crossed a read-ahead is answered with the older reply, an INTERRUPT that
  came while replies were kept is passed on after the last of them, and what a peer may send is
  bounded;
* end to end over a real server process: real RSA results come back through read-ahead, and a client
  that does not ask for it sees version 1.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import zmq

from apcrypto.transport import Command, Completion, Interrupt, open_transport
from apcrypto.transport.framed import READAHEAD_KEEP, RX_CHUNK, FramedTransport
from apcrypto.transport.zmq_client import ZmqTransport
from apformats.codes import NO_PENDING_REPLY, ResponseCode
from apformats.frames import (
    BATCH_FRAMES_MAX,
    READAHEAD_MAX,
    ErrorCode,
    ErrorFrame,
    InterruptFrame,
    ResultFrame,
    Welcome,
    decode_frame,
    encode_command,
    encode_hello,
    encode_interrupt,
    encode_result,
)
from apformats.messages import build_mex, parse_reply
from apformats.results import ApResult, Instr, qid_of
from apformats.status import QueueStatus
from emulator import Emulator
from emulator.frame_server import FrameSession
from tests._fixtures_zmq import E, ServerProcess, collect, rsa_key, zmq_server

__all__ = ["zmq_server"]  # fixture, imported for pytest

RC = ResponseCode
Q = qid_of(0, 0)
MOD = rsa_key(1024).n


# --- the server session -------------------------------------------------------------------------------


def _session(profile: str, version: int) -> tuple[FrameSession, Emulator]:
    emu = Emulator(profile, seed=3)  # virtual clock: nothing completes unless the test moves time
    s = FrameSession(emu, notify=lambda frame: None, name="t")
    welcome = decode_frame(s.handle(encode_hello(max_version=version))[0])
    assert isinstance(welcome, Welcome) and welcome.version == version
    return s, emu


def _results(frames: list[bytes]) -> list[ResultFrame]:
    out = [decode_frame(f) for f in frames]
    assert all(isinstance(f, ResultFrame) for f in out), out
    return out  # type: ignore[return-value]


def _nqap(s: FrameSession, tag: int, psmid: int) -> list[ResultFrame]:
    return _results(s.handle(encode_command(tag, Instr.NQAP, Q, psmid, build_mex(psmid + 2, E, MOD))))


def test_an_nqap_that_finds_its_reply_ready_brings_it_back() -> None:
    s, _ = _session("fast", 2)  # zero service time: the reply is ready when the NQAP returns
    first, *extra = _nqap(s, 5, 100)
    assert first.tag == 5 and first.psmid == 0 and first.to_result().status.replies_waiting
    assert [(f.tag, f.psmid) for f in extra] == [(5, 100)]
    assert extra[0].to_result().status.response_code == RC.NORMAL
    assert not extra[0].to_result().status.replies_waiting
    # the card holds nothing more: a DQAP finds nothing and brings nothing extra
    (empty,) = _results(s.handle(encode_command(6, Instr.DQAP, Q)))
    assert empty.to_result().status.response_code == NO_PENDING_REPLY
    assert s.stats["read_ahead"] == 1


def _dqap_until_empty(s: FrameSession, tag: int) -> list[ResultFrame]:
    out: list[ResultFrame] = []
    for t in range(tag, tag + 20):
        frames = _results(s.handle(encode_command(t, Instr.DQAP, Q)))
        out += [f for f in frames if f.to_result().status.response_code == RC.NORMAL]
        if frames[-1].to_result().status.response_code != RC.NORMAL:
            return out
    raise AssertionError("the queue never ran dry")


def test_a_dqap_brings_every_waiting_reply_as_dqap_after_dqap_would() -> None:
    # the oracle: a version 1 session on an identical card (same profile, same seed, same requests)
    sessions = {v: _session("default", v) for v in (1, 2)}  # real service times, seeded jitter
    for s, emu in sessions.values():
        for i in range(5):
            assert len(_nqap(s, 10 + i, 300 + i)) == 1  # nothing is ready yet: no extra frame
        emu.clock.advance(1.0)
    v1 = _dqap_until_empty(sessions[1][0], 20)
    first, *extra = _results(sessions[2][0].handle(encode_command(20, Instr.DQAP, Q)))
    v2 = [first, *extra]
    assert sorted(f.psmid for f in v1) == [300, 301, 302, 303, 304]
    assert [(f.psmid, f.reply, f.status_word) for f in v2] == [(f.psmid, f.reply, f.status_word) for f in v1]
    assert {f.tag for f in v2} == {20}
    assert [f.to_result().status.replies_waiting for f in v2] == [True] * 4 + [False]
    (empty,) = _results(sessions[2][0].handle(encode_command(21, Instr.DQAP, Q)))
    assert empty.to_result().status.response_code == NO_PENDING_REPLY
    assert sessions[2][0].stats["read_ahead"] == 4 and sessions[1][0].stats["read_ahead"] == 0


def test_a_version_1_session_never_reads_ahead() -> None:
    s, _ = _session("fast", 1)  # replies ready at once, and still one per DQAP
    for i in range(3):
        assert len(_nqap(s, 10 + i, 400 + i)) == 1
    assert [f.psmid for f in _dqap_until_empty(s, 20)] == [400, 401, 402]
    assert s.stats["read_ahead"] == 0


class _Bottomless:
    """An instruction target whose every DQAP finds a reply and says more wait (no real card does)."""

    def __init__(self) -> None:
        self.dqaps = 0

    def execute(self, command: Command, notify: object = None) -> ApResult:
        if command.instr is Instr.DQAP:
            self.dqaps += 1
            return ApResult(QueueStatus(replies_waiting=True), self.dqaps, b"r")
        return ApResult(QueueStatus(queue_empty=True))

    def qids(self) -> list[int]:
        return [Q]

    def zeroize(self, qid: int) -> None:
        pass


def test_read_ahead_is_bounded_whatever_the_card_says() -> None:
    target = _Bottomless()
    s = FrameSession(target, notify=lambda f: None)  # type: ignore[arg-type]
    s.handle(encode_hello(max_version=2))
    frames = _results(s.handle(encode_command(1, Instr.DQAP, Q)))
    assert len(frames) == 1 + READAHEAD_MAX
    assert target.dqaps == 1 + READAHEAD_MAX


# --- the client side, fed frames by hand ----------------------------------------------------------------


class _Hand(FramedTransport):
    """A FramedTransport whose "link" is the test: a version 2 session at once, frames fed by
    :meth:`feed` (as the I/O thread would), commands taken by :meth:`wire` (as it would send them)."""

    def __init__(self, version: int = 2) -> None:
        super().__init__("hand://", timeout=1.0)
        self._version = version
        self._stopped = threading.Event()
        self._start_io(5.0)

    def _io_main(self) -> None:
        self._session_up(Welcome(self._version, (Q,), True))
        self._stopped.wait(10)

    def _stop_io(self) -> None:
        self._stopped.set()
        super()._stop_io()

    def _write_frame(self, frame: bytes) -> None:
        pass

    def _say_bye(self) -> None:
        pass

    def _drop_link(self) -> list[Command]:
        return []

    def _link_broken(self, reason: str) -> None:
        pass

    def wire(self) -> list[Command]:
        """Take what was submitted for the wire, as the I/O thread does, and mark it in flight."""
        sent = [c for c, _ in self._take_outbox()]
        for c in sent:
            self._inflight[c.tag] = (c, 0.0)
        return sent

    def feed(self, *frames: bytes) -> list[object]:
        self._on_frames(frames)
        return self.poll(0.0)


@pytest.fixture
def hand() -> Iterator[_Hand]:
    t = _Hand()
    try:
        yield t
    finally:
        t.close()


def _status(waiting: bool, rc: int = RC.NORMAL) -> QueueStatus:
    return QueueStatus(rc, replies_waiting=waiting, irq_enabled=True)


def _reply(tag: int, psmid: int, waiting: bool) -> bytes:
    return encode_result(tag, ApResult(_status(waiting), psmid, b"reply-%d" % psmid))


def _nqap_cmd(tag: int, psmid: int) -> Command:
    return Command(tag, Instr.NQAP, Q, psmid, b"m")


def _watch_emits(hand: _Hand) -> tuple[list[tuple[int, int]], list[int]]:
    """Record, per batch of events the transport hands the core, (completions in it, replies kept
    for Q at that moment); and, per chunk sent on, how many batches had gone by then."""
    emits: list[tuple[int, int]] = []
    chunks: list[int] = []
    emit = hand._emit

    def watched(*events: object) -> None:
        emits.append((sum(isinstance(e, Completion) for e in events), len(hand._ahead.get(Q, ()))))
        emit(*events)  # type: ignore[arg-type]

    hand._emit = watched  # type: ignore[method-assign]
    hand._chunk_done = lambda: chunks.append(len(emits))  # type: ignore[method-assign]
    return emits, chunks


def test_a_long_batch_reaches_the_core_in_chunks_never_between_an_answer_and_its_read_ahead(
    hand: _Hand,
) -> None:
    n = 5 * RX_CHUNK // 2
    hand.submit([_nqap_cmd(i, 1000 + i) for i in range(1, n + 1)])
    assert len(hand.wire()) == n
    emits, chunks = _watch_emits(hand)
    frames = []
    for i in range(1, n + 1):  # each answer says a reply waits, and its read-ahead follows it
        frames += [encode_result(i, ApResult(_status(True))), _reply(i, 2000 + i, False)]
    events = hand.feed(*frames)
    assert [e.tag for e in events if isinstance(e, Completion)] == list(range(1, n + 1))  # all, in order
    assert len(emits) == 3 and chunks == [1, 2]  # sent on after each chunk but the last
    assert all(done >= RX_CHUNK for done, _ in emits[:-1])
    so_far = 0
    for done, kept in emits:  # each answer handed over came with its whole read-ahead
        so_far += done
        assert kept == so_far


def test_a_short_batch_reaches_the_core_whole(hand: _Hand) -> None:
    n = RX_CHUNK - 1
    hand.submit([_nqap_cmd(i, 1000 + i) for i in range(1, n + 1)])
    hand.wire()
    emits, chunks = _watch_emits(hand)
    hand.feed(*[encode_result(i, ApResult(_status(False))) for i in range(1, n + 1)])
    assert emits == [(n, 0)] and chunks == []


def test_kept_replies_answer_the_next_dqaps_without_a_frame(hand: _Hand) -> None:
    hand.submit([_nqap_cmd(1, 100)])
    assert [c.tag for c in hand.wire()] == [1]
    evs = hand.feed(encode_result(1, ApResult(_status(True))), _reply(1, 100, True), _reply(1, 101, False))
    assert evs == [Completion(1, ApResult(_status(True))), Interrupt(Q)]
    hand.submit([Command(2, Instr.DQAP, Q)])
    hand.submit([Command(3, Instr.DQAP, Q)])
    assert hand.wire() == []  # both answered here
    got = hand.poll(0.0)
    assert [(e.tag, e.result.psmid) for e in got] == [(2, 100), (3, 101)]  # type: ignore[union-attr]
    assert hand.counters["readahead_rx"] == 2 and hand.counters["readahead_used"] == 2
    hand.submit([Command(4, Instr.DQAP, Q)])  # nothing kept: this one goes to the card
    assert [c.tag for c in hand.wire()] == [4]
    assert hand.outstanding() == [Command(4, Instr.DQAP, Q)]


def test_a_dqap_that_crossed_a_read_ahead_gets_the_older_reply(hand: _Hand) -> None:
    # the NQAP left first and its answer read the queue dry; the DQAP behind it found nothing
    hand.submit([_nqap_cmd(1, 100), Command(2, Instr.DQAP, Q)])
    assert [c.tag for c in hand.wire()] == [1, 2]
    no_reply = encode_result(2, ApResult(_status(False, NO_PENDING_REPLY)))
    evs = hand.feed(encode_result(1, ApResult(_status(True))), _reply(1, 100, False), no_reply)
    assert [(type(e).__name__, getattr(e, "tag", None)) for e in evs][:2] == [
        ("Completion", 1),
        ("Completion", 2),
    ]
    assert evs[1].result.psmid == 100 and evs[1].result.status.response_code == RC.NORMAL  # type: ignore[union-attr]
    assert hand.counters["readahead_reordered"] == 1
    # a DQAP that crossed and took a reply itself: the kept (older) one first, its own kept behind
    hand.submit([_nqap_cmd(3, 102), _nqap_cmd(4, 103), Command(5, Instr.DQAP, Q)])
    hand.wire()
    evs = hand.feed(
        encode_result(3, ApResult(_status(True))),
        _reply(3, 102, False),
        encode_result(4, ApResult(_status(False))),
        _reply(5, 103, False),
    )
    done = {e.tag: e.result.psmid for e in evs if isinstance(e, Completion)}
    assert done == {3: 0, 4: 0, 5: 102}
    assert Interrupt(Q) in evs  # 103 is kept: the core is told to come for it
    hand.submit([Command(6, Instr.DQAP, Q)])
    assert hand.wire() == []
    assert [(e.tag, e.result.psmid) for e in hand.poll(0.0)] == [(6, 103)]  # type: ignore[union-attr]


def test_kept_replies_answer_no_dqap_while_the_link_is_down(hand: _Hand) -> None:
    """An answer from kept replies reads as the peer's, and a driver takes the peer's answer as proof
    that its link works (its reply timers stop waiting for the link: tests/test_multi_stop.py).  So
    while the link is down a DQAP waits like any command, and the kept reply answers it once a
    handshake has succeeded again -- without a frame."""
    hand.submit([_nqap_cmd(1, 100)])
    hand.wire()
    hand.feed(encode_result(1, ApResult(_status(True))), _reply(1, 100, False))
    hand._link_down("test: link lost")
    assert [type(e).__name__ for e in hand.poll(0.0)] == ["TransportLost"]
    hand.submit([Command(2, Instr.DQAP, Q)])
    assert hand.poll(0.0) == []  # not answered from the kept reply while the link is down
    hand._session_up(Welcome(2, (Q,), True, resumed=True))
    assert hand.wire() == []  # taken from the outbox: answered here, nothing sent
    (done,) = [e for e in hand.poll(0.0) if isinstance(e, Completion)]
    assert done.tag == 2 and done.result.psmid == 100
    assert hand.outstanding() == []


def test_an_interrupt_that_came_while_replies_were_kept_follows_the_last(hand: _Hand) -> None:
    hand.submit([_nqap_cmd(1, 100)])
    hand.wire()
    hand.feed(encode_result(1, ApResult(_status(True))), _reply(1, 100, True), _reply(1, 101, False))
    assert hand.feed(encode_interrupt(Q)) == [Interrupt(Q)]  # a reply came after the kept ones
    hand.submit([Command(2, Instr.DQAP, Q)])
    assert hand.poll(0.0) == [Completion(2, decode_frame(_reply(2, 100, True)).to_result())]  # type: ignore[union-attr]
    hand.submit([Command(3, Instr.DQAP, Q)])
    # the last kept reply says "none waiting" (true when it was read): the interrupt is passed on
    evs = hand.poll(0.0)
    assert [type(e).__name__ for e in evs] == ["Completion", "Interrupt"]
    assert evs[0].result.psmid == 101  # type: ignore[union-attr]


def test_what_a_peer_may_send_ahead_is_bounded(hand: _Hand) -> None:
    hand.submit([_nqap_cmd(1, 100)])
    hand.wire()
    extra = [_reply(1, 1000 + i, True) for i in range(READAHEAD_MAX + 5)]
    hand.feed(encode_result(1, ApResult(_status(True))), *extra)
    assert hand.counters["readahead_rx"] == READAHEAD_MAX  # per answer
    assert hand.counters["stale_rx"] == 5
    # an extra that is not a reply is not kept; an untagged one is stale
    hand.submit([_nqap_cmd(2, 200)])
    hand.wire()
    bad = encode_result(2, ApResult(_status(False, NO_PENDING_REPLY)))
    hand.feed(encode_result(2, ApResult(_status(True))), bad, _reply(99, 5, False))
    assert hand.counters["stale_rx"] == 7
    # the per-queue keep is capped too
    for n in range(READAHEAD_KEEP // READAHEAD_MAX + 1):
        tag = 10 + n
        hand.submit([_nqap_cmd(tag, tag)])
        hand.wire()
        more = [_reply(tag, 2000 + i, True) for i in range(READAHEAD_MAX)]
        hand.feed(encode_result(tag, ApResult(_status(True))), *more)
    assert len(hand._ahead[Q]) == READAHEAD_KEEP
    assert hand.counters["readahead_dropped"] > 0


def test_a_version_1_session_keeps_nothing() -> None:
    t = _Hand(version=1)
    try:
        t.submit([_nqap_cmd(1, 100)])
        t.wire()
        evs = t.feed(encode_result(1, ApResult(_status(True))), _reply(1, 100, False))
        assert evs == [Completion(1, ApResult(_status(True)))]
        assert t.counters["stale_rx"] == 1 and not t._ahead
    finally:
        t.close()


# --- end to end -------------------------------------------------------------------------------------------


def test_real_replies_come_back_through_read_ahead(zmq_server: ServerProcess) -> None:
    k = rsa_key(1024)
    q = qid_of(0, 0)
    t = open_transport(zmq_server.data, timeout=2.0, domains=[0])
    assert isinstance(t, ZmqTransport) and t.welcome is not None and t.welcome.version == 2
    try:
        cmds = [Command(10 + i, Instr.NQAP, q, 500 + i, build_mex(i + 2, E, k.n)) for i in range(4)]
        t.submit(cmds)
        collect(t, lambda evs: {c.tag for c in cmds} <= {e.tag for e in evs if isinstance(e, Completion)})
        replies: dict[int, bytes] = {}
        for tag in range(100, 200):  # bounded: the small profile's engines finish within a few polls
            t.submit([Command(tag, Instr.DQAP, q)])
            evs = collect(t, lambda evs, tag=tag: tag in {getattr(e, "tag", None) for e in evs})
            (ev,) = [e for e in evs if isinstance(e, Completion) and e.tag == tag]
            if ev.result.status.response_code == RC.NORMAL:
                replies[ev.result.psmid] = ev.result.reply
            if len(replies) == 4:
                break
            t.poll(0.005)
        assert sorted(replies) == [500, 501, 502, 503]
        for i in range(4):
            assert int.from_bytes(parse_reply(replies[500 + i]).result, "big") == pow(i + 2, E, k.n)
    finally:
        t.close()


def test_a_client_that_does_not_ask_sees_version_1(zmq_server: ServerProcess) -> None:
    t = open_transport(zmq_server.data, timeout=2.0, domains=[1], readahead=False)
    try:
        assert isinstance(t, ZmqTransport) and t.welcome is not None and t.welcome.version == 1
    finally:
        t.close()


def test_while_replies_are_kept_other_answers_say_the_queue_holds_them(hand: _Hand) -> None:
    hand.submit([_nqap_cmd(1, 100), Command(2, Instr.TAPQ, Q), Command(3, Instr.AQIC, Q, flag=True)])
    hand.wire()
    empty = ApResult(QueueStatus(RC.NORMAL, queue_empty=True, irq_enabled=True))
    evs = hand.feed(
        encode_result(1, ApResult(_status(True))),
        _reply(1, 100, False),
        encode_result(2, empty),  # the card's queue is empty: its one reply is kept here
        encode_result(3, empty),
    )
    done = {e.tag: e.result.status for e in evs if isinstance(e, Completion)}
    for tag in (2, 3):
        assert done[tag].replies_waiting and not done[tag].queue_empty, done[tag]
        assert done[tag].irq_enabled  # the rest of the word is the card's
    hand.submit([Command(4, Instr.DQAP, Q), Command(5, Instr.TAPQ, Q)])
    assert [c.tag for c in hand.wire()] == [5]  # the DQAP was answered here
    evs = hand.feed(encode_result(5, empty))  # nothing kept any more: the card's word as it is
    got = [(e.tag, e.result.psmid, e.result.status.queue_empty) for e in evs]  # type: ignore[union-attr]
    assert got == [(4, 100, False), (5, 0, True)]


@pytest.mark.parametrize("instr", [Instr.RAPQ, Instr.ZAPQ])
def test_a_reset_discards_the_kept_replies_as_the_card_discards_its_own(hand: _Hand, instr: Instr) -> None:
    hand.submit([_nqap_cmd(1, 100), Command(2, instr, Q)])
    hand.wire()
    ok = ApResult(QueueStatus(RC.NORMAL, queue_empty=True))
    hand.feed(encode_result(1, ApResult(_status(True))), _reply(1, 100, False), encode_result(2, ok))
    assert not hand._ahead and hand.counters["readahead_discarded"] == 1
    hand.submit([Command(3, Instr.DQAP, Q)])
    assert [c.tag for c in hand.wire()] == [3]  # nothing kept: the card is asked
    # a reset the card refused discards nothing
    hand.submit([_nqap_cmd(4, 101), Command(5, instr, Q)])
    hand.wire()
    busy = ApResult(QueueStatus(RC.BUSY))
    hand.feed(encode_result(4, ApResult(_status(True))), _reply(4, 101, False), encode_result(5, busy))
    assert len(hand._ahead[Q]) == 1


# --- batches: several frames per message, both ways, in a version 2 session ---------------------------


def _raw(url: str) -> tuple[zmq.Context, zmq.Socket]:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.rcvtimeo = 5000  # an answer that never comes fails the test, never hangs it
    sock.connect(url)
    return ctx, sock


def _hello(sock: zmq.Socket, version: int, domains: list[int]) -> Welcome:
    sock.send(encode_hello(domains, max_version=version))
    (frame,) = sock.recv_multipart()
    welcome = decode_frame(frame)
    assert isinstance(welcome, Welcome) and welcome.version == version
    return welcome


def test_a_version_2_session_takes_and_gives_batches(zmq_server: ServerProcess) -> None:
    ctx, sock = _raw(zmq_server.data)
    try:
        welcome = _hello(sock, 2, [0])
        q = welcome.qids[0]
        sock.send_multipart([encode_command(tag, Instr.TAPQ, q, flag=True) for tag in (1, 2, 3)])
        answers = [decode_frame(p) for p in sock.recv_multipart()]
        assert [(type(a).__name__, a.tag) for a in answers] == [("ResultFrame", t) for t in (1, 2, 3)]
        # one frame more than a batch may carry: refused as a whole, as any malformed message
        too_many = [encode_command(10, Instr.TAPQ, q)] * (BATCH_FRAMES_MAX + 1)
        sock.send_multipart(too_many)
        (err,) = [decode_frame(p) for p in sock.recv_multipart()]
        assert isinstance(err, ErrorFrame) and err.code == ErrorCode.MALFORMED
    finally:
        sock.close(linger=0)
        ctx.term()


def test_a_version_1_session_is_never_batched(zmq_server: ServerProcess) -> None:
    ctx, sock = _raw(zmq_server.data)
    try:
        q = _hello(sock, 1, [1]).qids[0]
        sock.send_multipart([encode_command(1, Instr.TAPQ, q), encode_command(2, Instr.TAPQ, q)])
        (err,) = [decode_frame(p) for p in sock.recv_multipart()]
        assert isinstance(err, ErrorFrame) and err.code == ErrorCode.MALFORMED  # as before version 2
        for tag in (3, 4):
            sock.send(encode_command(tag, Instr.TAPQ, q))
        assert [decode_frame(p).tag for p in sock.recv_multipart()] == [3]  # one frame per message
        assert [decode_frame(p).tag for p in sock.recv_multipart()] == [4]
    finally:
        sock.close(linger=0)
        ctx.term()


def _irq_session(profile: str, version: int) -> tuple[FrameSession, Emulator, list[bytes]]:
    emu = Emulator(profile, seed=3)
    sent: list[bytes] = []
    s = FrameSession(emu, notify=sent.append, name="t")
    s.handle(encode_hello(max_version=version))
    s.handle(encode_command(1, Instr.AQIC, Q, flag=True))
    return s, emu, sent


def test_an_interrupt_for_replies_already_read_ahead_is_not_sent() -> None:
    s, emu, sent = _irq_session("fast", 2)
    assert len(_nqap(s, 5, 100)) == 2  # the reply came back with the NQAP's answer
    emu.clock.run_until_idle()  # the interrupt the card raised for it was due now
    assert sent == [] and s.stats["interrupts"] == 0  # the read-ahead answered it
    # the oracle: a version 1 session on the same card gets it, as it always did
    s1, emu1, sent1 = _irq_session("fast", 1)
    assert len(_nqap(s1, 5, 100)) == 1
    emu1.clock.run_until_idle()
    assert [decode_frame(f) for f in sent1] == [InterruptFrame(Q)]


def test_an_interrupt_for_a_reply_that_waits_is_sent_once_until_the_queue_is_read() -> None:
    s, emu, sent = _irq_session("default", 2)  # real service times: nothing ready at NQAP time
    for i in range(3):
        assert len(_nqap(s, 5 + i, 100 + i)) == 1
    (first,) = _results(s.handle(encode_command(9, Instr.DQAP, Q)))  # finds the queue dry
    assert first.to_result().status.response_code == NO_PENDING_REPLY
    emu.clock.advance(1.0)  # the three complete one after the other: one interrupt stands for all
    assert [decode_frame(f) for f in sent] == [InterruptFrame(Q)]
    got = _results(s.handle(encode_command(10, Instr.DQAP, Q)))  # the read it asked for takes all
    assert sorted(f.psmid for f in got) == [100, 101, 102]
    assert not got[-1].to_result().status.replies_waiting
    assert len(_nqap(s, 11, 103)) == 1
    emu.clock.advance(1.0)  # read since: the next reply raises a new one
    assert [decode_frame(f) for f in sent] == [InterruptFrame(Q)] * 2
