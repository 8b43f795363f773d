"""FrameSession and Tenancy: handshake, APQN isolation and assignment, resume, error answers and
interrupts, against a recording fake.

The fake stands in for ``emulator.Emulator`` (INTERNALS §3) so the session logic is tested without
clocks or firmware; the ZeroMQ tests run the same session against the real emulator.
"""

from __future__ import annotations

import dataclasses
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from apformats.codes import ResponseCode
from apformats.frames import (
    Command,
    ErrorCode,
    ErrorFrame,
    InterruptFrame,
    Pong,
    ResultFrame,
    Welcome,
    decode_frame,
    encode_bye,
    encode_command,
    encode_error,
    encode_hello,
    encode_ping,
    encode_pong,
    encode_result,
    encode_welcome,
)
from apformats.results import ApResult, Instr, qid_of
from apformats.status import HwInfo, QueueStatus
from emulator.core import INSTRUCTIONS
from emulator.frame_server import FrameSession, Tenancy, load_apqn_matrix


class FakeEmulator:
    """Records every instruction; answers NORMAL; keeps AQIC callbacks so a test can fire them."""

    def __init__(self, qids: list[int]) -> None:
        self._qids = qids
        self.calls: list[tuple[str, int]] = []
        self.irq: dict[int, Callable[[int], None] | None] = {}
        self.explode = False

    def _ok(self, name: str, qid: int, **kw: object) -> ApResult:
        if self.explode:
            raise RuntimeError("emulator bug")
        self.calls.append((name, qid))
        return ApResult(QueueStatus(queue_empty=True), **kw)  # type: ignore[arg-type]

    def tapq(self, qid: int, t_bit: bool = True) -> ApResult:
        return self._ok("tapq", qid, hwinfo=HwInfo(at=13, nd=16, qd=7, accel=True) if t_bit else None)

    def nqap(self, qid: int, psmid: int, message: bytes, special: bool = False) -> ApResult:
        return self._ok("nqap", qid)

    def dqap(self, qid: int) -> ApResult:
        return self._ok("dqap", qid, psmid=7, reply=b"reply")

    def rapq(self, qid: int, fbit: bool = False) -> ApResult:
        return self._ok("rapq", qid)

    def zapq(self, qid: int, fbit: bool = False) -> ApResult:
        return self._ok("zapq", qid)

    def aqic(self, qid: int, enable: bool, notify: Callable[[int], None] | None = None) -> ApResult:
        self.irq[qid] = notify
        return self._ok("aqic", qid)

    def qids(self) -> list[int]:
        return list(self._qids)

    def zeroize(self, qid: int) -> None:
        self.calls.append(("zeroize", qid))

    def execute(self, command: Command, notify: Callable[[int], object] | None = None) -> ApResult:
        return INSTRUCTIONS[command.instr](self, command, notify)  # type: ignore[arg-type]


QIDS = [qid_of(c, d) for c in (0, 1) for d in (1, 2, 3)]


def session(allowed=None, *, notify: bool = True) -> tuple[FrameSession, FakeEmulator, list[bytes]]:
    emu = FakeEmulator(QIDS)
    sent: list[bytes] = []
    s = FrameSession(emu, allowed, sent.append if notify else None, name="t")
    return s, emu, sent


def one(frames: list[bytes]):
    assert len(frames) == 1
    return decode_frame(frames[0])


def test_handshake_then_commands() -> None:
    s, emu, _ = session()
    assert one(s.handle(encode_command(1, Instr.TAPQ, QIDS[0]))) == ErrorFrame(
        1, ErrorCode.NOT_HELLO, "no session: send HELLO first"
    )
    assert emu.calls == []
    welcome = one(s.handle(encode_hello()))
    assert welcome.token is not None and len(welcome.token) == 16
    assert dataclasses.replace(welcome, token=None) == Welcome(1, tuple(QIDS), True)
    res = one(s.handle(encode_command(2, Instr.TAPQ, QIDS[0], flag=True)))
    assert isinstance(res, ResultFrame) and res.tag == 2
    assert res.to_result().hwinfo == HwInfo(at=13, nd=16, qd=7, accel=True)
    res = one(s.handle(encode_command(3, Instr.DQAP, QIDS[0])))
    assert res.to_result() == ApResult(QueueStatus(queue_empty=True), 7, b"reply")
    for tag, instr in enumerate((Instr.NQAP, Instr.RAPQ, Instr.ZAPQ), 4):
        assert one(s.handle(encode_command(tag, instr, QIDS[1], 9, b"m"))).tag == tag
    assert [c[0] for c in emu.calls] == ["tapq", "dqap", "nqap", "rapq", "zapq"]
    assert one(s.handle(encode_ping(5))) == Pong(5)
    assert s.handle(encode_pong(5)) == []


def test_domain_isolation() -> None:
    s, emu, _ = session(allowed=[1, 2])
    assert one(s.handle(encode_hello([1, 3]))).code == ErrorCode.DOMAIN_DENIED
    assert not s.established
    welcome = one(s.handle(encode_hello([2])))
    assert welcome.qids == (qid_of(0, 2), qid_of(1, 2))
    for instr in Instr:
        res = one(s.handle(encode_command(9, instr, qid_of(0, 1), flag=True)))
        assert isinstance(res, ResultFrame)
        assert res.to_result().status.response_code == ResponseCode.Q_NOT_AVAIL
    assert emu.calls == [] and emu.irq == {}
    assert s.stats["denied"] == len(Instr)
    # a second HELLO cannot widen the session, only repeat it (no domain list: what it has)
    err = one(s.handle(encode_hello([1, 2])))
    assert err.code == ErrorCode.DOMAIN_DENIED and "cannot be widened" in err.text
    assert one(s.handle(encode_hello())).qids == welcome.qids
    assert one(s.handle(encode_command(10, Instr.TAPQ, qid_of(0, 1)))).to_result().status.rc == 0x01
    assert one(s.handle(encode_hello([2]))).qids == welcome.qids
    # a fresh session with no domain list: every granted domain (a private tenancy, as USB has)
    s2, _, _ = session(allowed=[1, 2])
    assert one(s2.handle(encode_hello())).qids == tuple(q for q in QIDS if q & 0xFF in (1, 2))


def test_bad_frames_get_errors_and_the_session_keeps_going() -> None:
    s, emu, _ = session()
    s.handle(encode_hello())
    good = encode_command(11, Instr.NQAP, QIDS[0], 1, b"x")
    bad_opcode = bytearray(good)
    bad_opcode[12] = 0x7F
    bad_opcode[-4:] = struct.pack(">I", zlib.crc32(bytes(bad_opcode[:-4])))
    cases = {
        bytes(bad_opcode): (11, ErrorCode.UNKNOWN_OPCODE),
        good[:-1]: (0, ErrorCode.MALFORMED),
        good[:5]: (0, ErrorCode.MALFORMED),
        b"": (0, ErrorCode.MALFORMED),
        good[:20] + b"\xff" + good[21:]: (0, ErrorCode.CORRUPT),
        encode_command(12, Instr.NQAP, QIDS[0], 1, bytes(70000)): (12, ErrorCode.TOO_BIG),
        good[:2] + b"\x09" + good[3:]: (0, ErrorCode.BAD_VERSION),
        encode_welcome([1], interrupts=False): (0, ErrorCode.UNEXPECTED),
        encode_result(5, ApResult(QueueStatus())): (0, ErrorCode.UNEXPECTED),
    }
    for data, (tag, code) in cases.items():
        err = one(s.handle(data))
        assert isinstance(err, ErrorFrame), data
        assert (err.tag, err.code) == (tag, code), err
    assert emu.calls == []
    assert s.handle(encode_error(0, ErrorCode.MALFORMED, "you too")) == []
    assert one(s.handle(good)).tag == 11
    assert emu.calls == [("nqap", QIDS[0])]


def test_emulator_exception_becomes_internal_error() -> None:
    s, emu, _ = session()
    s.handle(encode_hello())
    emu.explode = True
    err = one(s.handle(encode_command(4, Instr.TAPQ, QIDS[0])))
    assert (err.tag, err.code) == (4, ErrorCode.INTERNAL)
    emu.explode = False
    assert isinstance(one(s.handle(encode_command(5, Instr.TAPQ, QIDS[0]))), ResultFrame)


def test_interrupts_reach_notify_until_closed() -> None:
    s, emu, sent = session()
    s.handle(encode_hello())
    s.handle(encode_command(1, Instr.AQIC, QIDS[2], flag=True))
    cb = emu.irq[QIDS[2]]
    assert cb is not None
    cb(QIDS[2])
    assert [decode_frame(f) for f in sent] == [InterruptFrame(QIDS[2])]
    s.handle(encode_command(2, Instr.AQIC, QIDS[2], flag=False))
    assert emu.irq[QIDS[2]] is None
    assert s.handle(encode_bye("done")) == []
    assert s.closed and not s.established
    cb(QIDS[2])
    assert len(sent) == 1
    assert one(s.handle(encode_command(3, Instr.TAPQ, QIDS[0]))).code == ErrorCode.NOT_HELLO


def test_no_notify_means_no_interrupts() -> None:
    s, emu, _ = session(notify=False)
    assert one(s.handle(encode_hello())).interrupts is False
    s.handle(encode_command(1, Instr.AQIC, QIDS[0], flag=True))
    assert emu.irq[QIDS[0]] is None


@pytest.mark.parametrize(("lo", "hi"), [(3, 4), (0, 0), (3, 1)])
def test_version_negotiation_refuses(lo: int, hi: int) -> None:
    s, _, _ = session()
    err = one(s.handle(encode_hello(min_version=lo, max_version=hi)))
    assert err.code == ErrorCode.BAD_VERSION
    assert not s.established
    assert one(s.handle(encode_hello(min_version=0, max_version=5))).version == 2


@pytest.mark.parametrize(("lo", "hi", "agreed"), [(1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 9, 2)])
def test_version_negotiation_agrees_on_the_highest_both_speak(lo: int, hi: int, agreed: int) -> None:
    s, _, _ = session()
    assert one(s.handle(encode_hello(min_version=lo, max_version=hi))).version == agreed
    assert s.version == agreed


# --- the shared tenancy: one session per APQN, resume within the grace ---------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def shared(
    *, grace: float = 60.0, matrix=None, qids=QIDS
) -> tuple[Tenancy, FakeEmulator, Clock, Callable[..., FrameSession]]:
    emu = FakeEmulator(list(qids))
    clock = Clock()
    tenancy = Tenancy(emu, grace=grace, matrix=matrix, clock=clock)

    def new(key: str | None = None) -> FrameSession:
        return FrameSession(emu, notify=lambda b: None, tenancy=tenancy, key=key, name="t")

    return tenancy, emu, clock, new


def test_default_grant_is_one_free_domain_on_every_card_and_apqns_are_exclusive() -> None:
    tenancy, emu, _, new = shared()
    a, b, c, d = new(), new(), new(), new()
    assert one(a.handle(encode_hello())).qids == (qid_of(0, 1), qid_of(1, 1))
    assert one(b.handle(encode_hello())).qids == (qid_of(0, 2), qid_of(1, 2))
    err = one(c.handle(encode_hello([2, 3])))
    assert err.code == ErrorCode.APQN_IN_USE and "00.0002" in err.text and not c.established
    assert one(c.handle(encode_hello([3]))).qids == (qid_of(0, 3), qid_of(1, 3))
    err = one(d.handle(encode_hello()))
    assert err.code == ErrorCode.APQN_IN_USE and "no free APQN" in err.text
    assert one(d.handle(encode_hello([9]))).code == ErrorCode.DOMAIN_DENIED
    assert one(d.handle(encode_hello([]))).code == ErrorCode.DOMAIN_DENIED  # a session of nothing
    assert len(tenancy.leases()) == 3
    # b's APQN is not a's: every instruction on it is refused without reaching the emulator
    for instr in Instr:
        res = one(a.handle(encode_command(5, instr, qid_of(0, 2), 1, b"m", flag=True)))
        assert res.to_result().status.response_code == ResponseCode.Q_NOT_AVAIL
    assert emu.calls == []
    # a leaves with BYE: its APQNs are zeroized and free for the next client at once
    a.handle(encode_bye())
    assert emu.calls == [("zeroize", qid_of(0, 1)), ("zeroize", qid_of(1, 1))]
    assert one(d.handle(encode_hello())).qids == (qid_of(0, 1), qid_of(1, 1))
    assert tenancy.owner(qid_of(0, 1)) is d.lease


def test_default_grant_takes_the_lowest_domain_free_on_every_card() -> None:
    _, _, _, new = shared()
    one(new().handle(encode_hello([1])))
    x = new()
    one(x.handle(encode_hello([2])))
    one(new().handle(encode_hello([3])))
    x.handle(encode_bye())  # domain 2 is free again, on both cards
    assert one(new().handle(encode_hello())).qids == (qid_of(0, 2), qid_of(1, 2))


def test_default_grant_mixes_domains_when_no_domain_is_free_everywhere() -> None:
    qids = [qid_of(0, 1), qid_of(0, 2), qid_of(1, 1), qid_of(1, 2)]
    matrix = {"k1": {qid_of(0, 1)}, "k2": {qid_of(1, 2)}, "*": set(qids)}
    _, _, _, new = shared(matrix=matrix, qids=qids)
    assert one(new("k1").handle(encode_hello())).qids == (qid_of(0, 1),)
    assert one(new("k2").handle(encode_hello())).qids == (qid_of(1, 2),)
    assert one(new("k3").handle(encode_hello())).qids == (qid_of(0, 2), qid_of(1, 1))


def test_matrix_bounds_each_key() -> None:
    _, _, _, new = shared(matrix={"alice": {qid_of(0, 1), qid_of(1, 1)}})
    assert one(new("alice").handle(encode_hello())).qids == (qid_of(0, 1), qid_of(1, 1))
    assert one(new("alice").handle(encode_hello([2]))).code == ErrorCode.DOMAIN_DENIED
    assert one(new("mallory").handle(encode_hello())).code == ErrorCode.DOMAIN_DENIED
    assert one(new(None).handle(encode_hello())).code == ErrorCode.DOMAIN_DENIED


def test_resume_within_the_grace_then_expiry_zeroizes_and_frees() -> None:
    tenancy, emu, clock, new = shared(grace=10.0)
    a = new()
    w = one(a.handle(encode_hello()))
    a.close()  # connection dropped without a BYE
    assert emu.calls == [] and tenancy.owner(w.qids[0]) is not None
    clock.t = 9.0
    other = new()
    assert one(other.handle(encode_hello(list({q & 0xFF for q in w.qids})))).code == ErrorCode.APQN_IN_USE
    back = new()
    again = one(back.handle(encode_hello(token=w.token)))
    assert again.resumed and again.qids == w.qids and again.token == w.token
    back.close()
    clock.t = 18.9
    assert tenancy.expire() == [] and emu.calls == []
    clock.t = 19.0
    assert [lease.qids for lease in tenancy.expire()] == [frozenset(w.qids)]
    assert sorted(emu.calls) == sorted(("zeroize", q) for q in w.qids)
    late = one(new().handle(encode_hello(token=w.token)))  # too late: a new session, not a resume
    assert not late.resumed and late.token == w.token  # (the client's token is adopted again)


def test_a_token_is_honoured_only_for_its_own_curve_key_and_a_resume_takes_over() -> None:
    tenancy, _, _, new = shared()
    a = new("alice")
    w = one(a.handle(encode_hello()))
    thief = one(new("mallory").handle(encode_hello(token=w.token)))
    assert not thief.resumed and set(thief.qids).isdisjoint(w.qids) and thief.token != w.token
    b = new("alice")  # the client reconnected before the server noticed the old connection died
    assert one(b.handle(encode_hello(token=w.token))).resumed
    assert tenancy.take_evicted() == [a] and a.closed and not a.established
    a.close()  # the server drops the evicted connection: the lease stays with b
    assert tenancy.owner(w.qids[0]) is b.lease and b.lease.holder is b


def test_apqn_matrix_file(tmp_path: Path) -> None:
    f = tmp_path / "matrix.toml"
    key = "x" * 40
    f.write_text(f"""[clients.{key}]\ncards = [0]\ndomains = [1, 2]\n[clients."*"]\napqns = ["01.0003"]\n""")
    assert load_apqn_matrix(f) == {key: {qid_of(0, 1), qid_of(0, 2)}, "*": {qid_of(1, 3)}}
    f.write_text("[clients.bob]\ndomains = [1]\n")
    with pytest.raises(ValueError, match="no certificate"):
        load_apqn_matrix(f, tmp_path)
    f.write_text('[clients."*"]\napqns = ["zz"]\n')
    with pytest.raises(ValueError, match="bad APQN"):
        load_apqn_matrix(f)


def test_a_first_handshake_retried_on_a_new_connection_finds_its_session() -> None:
    """The client proposes its token in its first HELLO: when the WELCOME is slow and the client tries
    again on a fresh connection, the retry gets the session the first attempt was granted (and the
    abandoned connection is let go) instead of a second one that would stay reserved."""
    tenancy, _, _, new = shared()
    mine = bytes(range(16))
    first, retry = new(), new()
    w1 = one(first.handle(encode_hello(token=mine)))  # this WELCOME never reaches the client
    w2 = one(retry.handle(encode_hello(token=mine)))
    assert w1.token == w2.token == mine and w2.resumed and w2.qids == w1.qids
    assert tenancy.take_evicted() == [first] and len(tenancy.leases()) == 1
    assert one(new().handle(encode_hello())).qids == (qid_of(0, 2), qid_of(1, 2))  # domain 1 not leaked
