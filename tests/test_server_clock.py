"""A server finishes what falls due during a client's batch on its serving thread, mid-batch, and
when that raises an interrupt it answers what it has so far at once, not only at the batch's end.

While the serving thread handles a batch of frames it is inside the wall clock's ``assisting()``
context, so the clock's pump stands down (see ``tests/test_emulator_clock.py``); engines whose
service time ends meanwhile must still finish in time -- the serving thread looks at the clock as
it goes -- or every engine would sit on a finished request until the batch is over.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import zmq

from apformats.frames import (
    READAHEAD_VERSION,
    ResultFrame,
    Welcome,
    decode_frame,
    encode_command,
    encode_hello,
)
from apformats.messages import build_mex
from apformats.results import Instr
from emulator import Emulator
from emulator.server import EmulatorServer

MODULUS = (1 << 2047) | 0x1D7
SIZE = 256


@pytest.mark.timeout(30)
def test_engines_that_finish_during_a_batch_are_finished_before_the_batch_ends(tmp_path: Path) -> None:
    emu = Emulator("default", clock="wall")  # MEX_2K 0.4 ms on 2 x 4 accelerator engines
    srv = EmulatorServer(
        emu,
        bind="tcp://127.0.0.1:0",
        control="tcp://127.0.0.1:0",
        default_grant="all",
        control_token_file=tmp_path / "token",
    )
    data_url, _ = srv.start()
    serving = threading.Thread(target=srv.serve, daemon=True)
    serving.start()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.rcvtimeo = 10_000
    try:
        sock.connect(data_url)
        sock.send(encode_hello(min_version=READAHEAD_VERSION, max_version=READAHEAD_VERSION))
        welcome = decode_frame(sock.recv())
        assert isinstance(welcome, Welcome)
        accel = [q for q in welcome.qids if (q >> 8) in (0, 1)]  # the two CEX8A cards
        assert len(accel) == 8
        for tag, qid in enumerate(accel, 100):  # interrupts on, as the driver runs
            sock.send(encode_command(tag, Instr.AQIC, qid, flag=True))
            assert isinstance(decode_frame(sock.recv()), ResultFrame)
        # 64 NQAPs (every slot) in one message: handling them takes longer than a service time
        frames = []
        for i in range(64):
            msg = build_mex((i + 2).to_bytes(SIZE, "big"), 65537, MODULUS)
            frames.append(encode_command(i + 1, Instr.NQAP, accel[i % 8], 1000 + i, msg))
        sock.send_multipart(frames)
        answered: set[int] = set()
        messages = 0
        while len(answered) < 64:
            messages += 1
            for part in sock.recv_multipart():
                f = decode_frame(part)
                if isinstance(f, ResultFrame) and f.tag <= 64:
                    answered.add(f.tag)
        # ... and the interrupts they raised went out mid-batch with the answers so far
        assert messages >= 2
        entries = {e.psmid: e for e in emu.execution_log.entries() if 1000 <= e.psmid < 1064}
        assert len(entries) == 64
        last_in = max(e.enqueued for e in entries.values())
        finished_before = [e for e in entries.values() if e.ended is not None and e.ended < last_in]
        # the first engines' requests were done well before the last NQAP of the batch came in
        assert len(finished_before) >= 8, sorted((e.enqueued, e.ended) for e in entries.values())[:10]
    finally:
        sock.close(linger=0)
        ctx.term()
        srv.stop()
        serving.join(10)
        srv.close()
        emu.close()


class _FakeFrame:
    """A received part as ``copy=False`` gives it: its bytes, and the connection it came on."""

    def __init__(self, data: bytes) -> None:
        self.bytes = data

    def get(self, option: Any) -> Any:
        assert option == zmq.SRCFD
        return 7  # one connection


class _FakeRouter:
    """The server's data socket as the test: messages to take, in order, then ``zmq.Again``; what the
    server sends is kept as messages (a part each, the routing identity first)."""

    def __init__(self, messages: list[list[bytes]]) -> None:
        self.inbox = list(messages)
        self.sent: list[list[bytes]] = []
        self._parts: list[bytes] = []

    def recv_multipart(self, flags: int = 0, copy: bool = True) -> list[Any]:
        if not self.inbox:
            raise zmq.Again()
        parts = self.inbox.pop(0)
        return parts if copy else [_FakeFrame(p) for p in parts]

    def send(self, data: bytes, flags: int = 0) -> None:
        self._parts.append(bytes(data))
        if not flags & zmq.SNDMORE:
            self.sent.append(self._parts)
            self._parts = []


def test_a_round_of_long_messages_is_answered_message_by_message(tmp_path: Path) -> None:
    """Two long messages handled in one round: the first one's answers leave before the second is
    handled (once they are ANSWER_AT or more), so the client works on them meanwhile; short ones
    still leave together at the round's end."""
    from emulator.server import ANSWER_AT

    emu = Emulator("fast")  # no service time: every NQAP's answer carries its reply (read-ahead)
    srv = EmulatorServer(
        emu,
        bind="tcp://127.0.0.1:0",
        control="tcp://127.0.0.1:0",
        default_grant="all",
        control_token_file=tmp_path / "token",
    )
    srv.start()
    real = srv._data
    ident = b"\x00client"
    try:
        fake = _FakeRouter(
            [[ident, encode_hello(min_version=READAHEAD_VERSION, max_version=READAHEAD_VERSION)]]
        )
        srv._data = fake  # type: ignore[assignment]
        srv._serve_data(True)
        welcome = decode_frame(fake.sent[0][1])
        assert isinstance(welcome, Welcome)
        accel = [q for q in welcome.qids if (q >> 8) in (0, 1)]
        msg = build_mex((5).to_bytes(SIZE, "big"), 65537, MODULUS)

        def nqaps(first: int, n: int) -> list[bytes]:
            return [ident] + [
                encode_command(t, Instr.NQAP, accel[t % len(accel)], 1000 + t, msg)
                for t in range(first, first + n)
            ]

        n = ANSWER_AT // 2  # each NQAP: its answer and its reply, so ANSWER_AT frames a message
        fake.inbox = [nqaps(1, n), nqaps(1 + n, n)]
        fake.sent.clear()
        srv._serve_data(True)
        tags = [sorted({decode_frame(p).tag for p in m[1:]}) for m in fake.sent]
        assert tags == [list(range(1, 1 + n)), list(range(1 + n, 1 + 2 * n))]
        assert all(m[0] == ident and len(m) == 1 + ANSWER_AT for m in fake.sent)
        # short messages: one answer for the round
        fake.inbox = [nqaps(100, 2), nqaps(102, 2)]
        fake.sent.clear()
        srv._serve_data(True)
        assert [sorted({decode_frame(p).tag for p in m[1:]}) for m in fake.sent] == [[100, 101, 102, 103]]
    finally:
        srv._data = real
        srv.close()
        emu.close()
