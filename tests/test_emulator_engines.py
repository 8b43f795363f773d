"""Engine backends (profile ``execution``): RSA computed by worker threads or worker processes.

What must hold whatever computes: the same replies as inline (checked against cryptography and
plain ``pow``, error paths included); the service time still comes from the model; a virtual
clock never uses a backend; worker processes end on close and when the emulator's process dies
(real processes, real signals); a worker that dies is a machine failure of its card (the
firmware's machine-failure replies, then the card serves again), never a hang.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _fixtures_emulator import E, crt, key, mex, result_int
from _fixtures_firmware import crt_args, rsa_key
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

import apcrypto
from apformats.codes import MachineFailureState, ReplyCode
from apformats.messages import build_crt, build_mex, parse_reply
from apformats.results import ApResult, qid_of
from emulator import CardState, Emulator, load_profile
from emulator.engines import ProcessEngines, ThreadEngines

PARALLEL = (Path(__file__).parent.parent / "emulator" / "profiles" / "parallel-processes.toml").read_text()
Q0 = [qid_of(0, d) for d in range(4)]
DEADLINE = 20.0


def _profile(tmp_path: Path, backend: str, *, workers: int = 1, crt_2k: float = 0.0) -> Path:
    text = PARALLEL.replace('backend = "processes"', f'backend = "{backend}"')
    text = text.replace("workers = 1 ", f"workers = {workers} ")
    text = text.replace("CRT_2K = 0.0", f"CRT_2K = {crt_2k}", 1)
    path = tmp_path / f"{backend}-{workers}.toml"
    path.write_text(text)
    return path


def _collect(emu: Emulator, qids: list[int], count: int, timeout: float = DEADLINE) -> dict[int, ApResult]:
    """DQAP every queue until ``count`` replies are in (bounded)."""
    got: dict[int, ApResult] = {}
    end = time.monotonic() + timeout
    while len(got) < count:
        assert time.monotonic() < end, f"only {len(got)} of {count} replies within {timeout}s"
        idle = True
        for qid in qids:
            r = emu.dqap(qid)
            if r.status.rc == 0:
                got[r.psmid] = r
                idle = False
        if idle:
            time.sleep(0.002)
    return got


def _gone(pid: int) -> bool:
    """True once ``pid`` has ended (a zombie no reaper collected counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def _wait(cond, timeout: float = DEADLINE) -> bool:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def test_parallel_profiles_and_backend_choice(tmp_path: Path) -> None:
    p = load_profile("parallel")
    assert (p.execution.backend, p.execution.workers, p.execution.arithmetic) == ("threads", 1, "auto")
    assert load_profile("parallel-processes").execution.backend == "processes"
    assert load_profile("fast").execution.backend == "inline"
    with Emulator("parallel-processes", clock="wall") as emu:
        assert isinstance(emu.engines, ProcessEngines)
    with Emulator("parallel", clock="wall") as emu:
        assert isinstance(emu.engines, ThreadEngines)
    with Emulator(_profile(tmp_path, "threads"), clock="wall") as emu:
        assert isinstance(emu.engines, ThreadEngines)
    with Emulator("fast", clock="wall") as emu:
        assert emu.engines is None


def test_virtual_clock_computes_inline_and_replays() -> None:
    """The simulation path never depends on workers: no backend, and the same log every run."""
    logs = []
    for _ in range(2):
        emu = Emulator("parallel-processes", seed=7)  # virtual clock
        assert emu.engines is None
        for i, qid in enumerate(Q0 * 3):
            assert emu.nqap(qid, i, crt(i + 2)).status.rc == 0
        got = _collect(emu, Q0, 12)
        assert {p: result_int(r) for p, r in got.items()} == {
            i: pow(i + 2, key().d, key().n) for i in range(12)
        }
        logs.append([(e.psmid, e.engine, e.started, e.ended, e.outcome) for e in emu.execution_log.entries()])
    assert logs[0] == logs[1]


@pytest.mark.parametrize("backend", ["threads", "processes"])
def test_backends_answer_as_inline_does(tmp_path: Path, backend: str) -> None:
    """Valid requests against cryptography; every error path against the inline emulator."""
    k = rsa_key(2048)
    pub = k.public_key().public_numbers()
    p, q, dp, dq, u = crt_args(k)
    em = [
        pow(int.from_bytes(k.sign(b"m%d" % i, padding.PKCS1v15(), hashes.SHA256()), "big"), pub.e, pub.n)
        for i in range(6)
    ]
    requests = [build_crt(x, p, q, dp, dq, u) for x in em]
    requests += [build_mex(x, pub.e, pub.n) for x in em[:2]]
    bad = [
        build_crt(5, p + 1, q, dp, dq, u),  # even modulus
        build_crt(5, p, q, dp, dq, p),  # u >= p
        build_crt(pub.n, p, q, dp, dq, u),  # operand >= modulus
        build_crt(7, p, q, dp ^ 2, dq, u),  # corrupted exponent: a wrong number, not an error
        build_mex(5, E, pub.n + 1),
        b"\x00\x50" + bytes(30),  # a header naming no operation
    ]
    with Emulator("fast") as ref:
        for i, r in enumerate(bad):
            assert ref.nqap(Q0[i % 4], 100 + i, r).status.rc == 0
        expected = {p_: r.reply for p_, r in _collect(ref, Q0, len(bad)).items()}
    with Emulator(_profile(tmp_path, backend), clock="wall") as emu:
        for i, r in enumerate(requests + bad):
            psmid = i if i < len(requests) else 100 + i - len(requests)
            end = time.monotonic() + DEADLINE
            while emu.nqap(Q0[i % 4], psmid, r).status.rc != 0:  # Q_FULL: wait for a slot
                assert time.monotonic() < end
                time.sleep(0.002)
        got = _collect(emu, Q0, len(requests) + len(bad))
    for i in range(6):
        sig = k.sign(b"m%d" % i, padding.PKCS1v15(), hashes.SHA256())
        assert parse_reply(got[i].reply).result == sig  # CRT == cryptography's signature
    assert [result_int(got[6]), result_int(got[7])] == [pow(x, pub.e, pub.n) for x in em[:2]]
    assert {p_: got[p_].reply for p_ in expected} == expected
    assert parse_reply(expected[100]).reply_code == ReplyCode.EVEN_MOD_IN_OPND


def test_service_time_comes_from_the_model(tmp_path: Path) -> None:
    """A worker answers in well under the service time; the message still ends no sooner."""
    with Emulator(_profile(tmp_path, "processes", crt_2k=0.3), clock="wall") as emu:
        k = rsa_key(2048)
        assert emu.nqap(Q0[0], 1, build_crt(12345, *crt_args(k))).status.rc == 0
        got = _collect(emu, Q0[:1], 1)
        assert parse_reply(got[1].reply).kind == "ok"
        (entry,) = emu.execution_log.for_psmid(1)
        assert entry.ended - entry.started >= 0.3 - 1e-9


def _spawn_workers(emu: Emulator, card: int = 0) -> list[int]:
    qid = qid_of(card, 0)
    assert emu.nqap(qid, 999, crt(3)).status.rc == 0
    _collect(emu, [qid], 1)
    assert isinstance(emu.engines, ProcessEngines)
    return emu.engines.pids(card)


def test_close_ends_every_worker(tmp_path: Path) -> None:
    emu = Emulator(_profile(tmp_path, "processes", workers=2), clock="wall")
    pids = _spawn_workers(emu, 0) + _spawn_workers(emu, 1)
    assert len(pids) == 4 and not any(_gone(p) for p in pids)
    emu.close()
    assert all(_gone(p) for p in pids)  # reaped by close, not left to the system


_CRASHER = """
import sys, time
from apformats.results import qid_of
from apformats.messages import build_mex
from emulator import Emulator
emu = Emulator(sys.argv[1], clock="wall")
for card in (0, 1):
    assert emu.nqap(qid_of(card, 0), 1, build_mex(2, 3, 35)).status.rc == 0
    while emu.dqap(qid_of(card, 0)).status.rc != 0:
        time.sleep(0.01)
print(" ".join(str(p) for c in (0, 1) for p in emu.engines.pids(c)), flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_workers_end_when_the_emulator_process_dies(tmp_path: Path, how: signal.Signals) -> None:
    """No orphans: the emulator's process killed outright leaves no worker behind."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _CRASHER, str(_profile(tmp_path, "processes", workers=2))],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 4 and not any(_gone(p) for p in pids)
        proc.send_signal(how)
        proc.wait(10)
        assert _wait(lambda: all(_gone(p) for p in pids), 5.0), [p for p in pids if not _gone(p)]
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_a_dead_worker_is_a_machine_failure_of_its_card(tmp_path: Path) -> None:
    """Worker stopped with 4 requests on the engines and 4 waiting, then killed: the card fails,
    the firmware's handler answers in-process for the engines' and request-pending for the rest;
    after recovery the card computes again (a new worker); the other card never noticed."""
    with Emulator(_profile(tmp_path, "processes"), clock="wall") as emu:
        (pid,) = _spawn_workers(emu, 0)
        _spawn_workers(emu, 1)
        os.kill(pid, signal.SIGSTOP)
        try:
            for i in range(8):
                assert emu.nqap(Q0[i % 4], i, crt(i + 2)).status.rc == 0
            running = [e.psmid for e in emu.execution_log.entries() if e.outcome == "running"]
            assert sorted(running) == [0, 1, 2, 3]  # four engines took the first four
            assert emu.nqap(qid_of(1, 0), 50, crt(50)).status.rc == 0  # the other card, meanwhile
        finally:
            os.kill(pid, signal.SIGKILL)
            os.kill(pid, signal.SIGCONT)
        assert _wait(lambda: emu.card_state(0) is CardState.RECOVERING, 5.0), "no machine failure"
        assert emu.engines.lost == 1  # type: ignore[union-attr]
        got = _collect(emu, Q0, 8, timeout=5.0)  # after the profile's 0.25 s recovery
        for psmid, r in got.items():
            rep = parse_reply(r.reply)
            assert rep.reply_code == ReplyCode.MACHINE_FAILURE
            if psmid < 4:
                assert rep.mf_state is MachineFailureState.IN_PROCESS and rep.engine is not None
            else:
                assert rep.mf_state is MachineFailureState.REQUEST_PENDING
        outcomes = {e.psmid: e.outcome for e in emu.execution_log.entries() if e.psmid < 8}
        assert outcomes == {i: "in-process-failed" if i < 4 else "pending-failed" for i in range(8)}
        assert result_int(_collect(emu, [qid_of(1, 0)], 1)[50]) == pow(50, key().d, key().n)
        assert emu.nqap(Q0[0], 60, crt(60)).status.rc == 0  # served again, by a new worker
        assert result_int(_collect(emu, Q0[:1], 1)[60]) == pow(60, key().d, key().n)
        assert emu.engines.pids(0) and emu.engines.pids(0) != [pid]  # type: ignore[union-attr]


def test_driver_over_a_dying_worker_loses_nothing(tmp_path: Path) -> None:
    """Through the driver: a worker killed mid-run; every request still ends, right (CRT is
    idempotent: in-process work is re-driven), within a bound."""
    k = rsa_key(2048)
    pn = k.private_numbers()
    n = pn.public_numbers.n
    emu = Emulator(_profile(tmp_path, "processes"), clock="wall")
    with emu, apcrypto.connect("emu:", emulator=emu) as client:
        assert client.wait_ready(DEADLINE)
        args = crt_args(k)
        futs = [client.mod_expo_crt((i + 2).to_bytes(256, "big"), *args) for i in range(300)]
        assert _wait(lambda: sum(f.done() for f in futs) >= 20)
        victim = emu.engines.pids(0) or emu.engines.pids(1)  # type: ignore[union-attr]
        os.kill(victim[0], signal.SIGKILL)
        results = [f.result(DEADLINE) for f in futs]
        assert emu.engines.lost == 1  # type: ignore[union-attr]
    e = pn.public_numbers.e  # r^e = c (mod n) proves r = c^d: RSA is a permutation of [0, n)
    assert [pow(int.from_bytes(r, "big"), e, n) for r in results] == [i + 2 for i in range(300)]


def test_a_reset_drops_answers_still_being_computed(tmp_path: Path) -> None:
    """RAPQ while the worker holds two answers: they are discarded with the queue (never
    delivered later); the next requests get their own answers."""
    with Emulator(_profile(tmp_path, "processes"), clock="wall") as emu:
        (pid,) = _spawn_workers(emu, 0)
        os.kill(pid, signal.SIGSTOP)
        try:
            assert emu.nqap(Q0[0], 1, crt(11)).status.rc == 0
            assert emu.nqap(Q0[0], 2, crt(12)).status.rc == 0
            assert emu.rapq(Q0[0]).status.rc == 0
        finally:
            os.kill(pid, signal.SIGCONT)
        assert emu.nqap(Q0[0], 3, crt(13)).status.rc == 0
        got = _collect(emu, Q0[:1], 1)
        assert list(got) == [3] and result_int(got[3]) == pow(13, key().d, key().n)
        time.sleep(0.05)  # the two stale answers have long been computed by now
        assert emu.dqap(Q0[0]).status.rc != 0  # ... and were dropped
        assert {e.psmid: e.outcome for e in emu.execution_log.entries() if e.psmid in (1, 2)} == {
            1: "discarded",
            2: "discarded",
        }
        assert emu.card_state(0) is CardState.NORMAL and emu.engines.lost == 0  # type: ignore[union-attr]


def test_a_client_owning_its_emulator_stops_the_workers() -> None:
    """``connect("emu:parallel-processes")`` builds (and owns) a wall-clock emulator with workers;
    closing the client ends them."""
    k = rsa_key(2048)
    with apcrypto.connect("emu:parallel-processes") as client:
        assert client.wait_ready(DEADLINE)
        out = client.mod_expo_crt((5).to_bytes(256, "big"), *crt_args(k)).result(DEADLINE)
        emu = client.transport.emulator  # type: ignore[attr-defined]
        pids = emu.engines.pids(0) + emu.engines.pids(1)
        assert pids
    assert int.from_bytes(out, "big") == pow(5, k.private_numbers().d, k.public_key().public_numbers().n)
    assert all(_gone(p) for p in pids)


def test_no_worker_can_start_so_the_card_computes_inline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker that cannot be started (no processes left, a broken interpreter path) is logged
    and the request computed inline: answered right, not failed and not hung."""
    import emulator.engines as engines

    def refuse(self: object, card: int) -> None:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(engines._Worker, "__init__", refuse)
    with Emulator(_profile(tmp_path, "processes"), clock="wall") as emu:
        assert emu.nqap(Q0[0], 1, crt(21)).status.rc == 0
        assert result_int(_collect(emu, Q0[:1], 1)[1]) == pow(21, key().d, key().n)
        assert emu.engines.pids(0) == [] and emu.engines.lost == 0  # type: ignore[union-attr]
    assert "cannot start an engine worker for card 0" in caplog.text


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def test_a_killed_server_leaves_no_worker_behind() -> None:
    """``apcrypto-emulator serve --profile parallel-processes`` computes in worker processes; SIGKILL
    of the server (no chance to close anything) still leaves none of them running."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "emulator", "serve", "--profile", "parallel-processes",
         "--default-grant", "all", "--bind", "tcp://127.0.0.1:0", "--control", "tcp://127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        url = dict(f.split("=", 1) for f in line[1:])["data"]
        k = rsa_key(2048)
        with apcrypto.connect(url) as client:
            assert client.wait_ready(DEADLINE)
            futs = [client.mod_expo_crt((i + 2).to_bytes(256, "big"), *crt_args(k)) for i in range(16)]
            assert all(f.result(DEADLINE) for f in futs)
            pids = _children(proc.pid)
            assert 1 <= len(pids) <= 2  # a worker per accelerator card that computed (CCA cards: no RSA)
            proc.kill()
            proc.wait(10)
        assert _wait(lambda: all(_gone(p) for p in pids), 5.0)
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_worker_frames_survive_any_split_and_refuse_oversize() -> None:
    """The worker pipes' framing: frames split across reads or packed into one come out whole and
    in order; a length over the bound is refused, not allocated; end of input is EOFError."""
    import itertools
    import struct

    from firmware_stubs.worker import MAX_FRAME, FrameReader, frame, write_all

    r, w = os.pipe()
    try:
        reader = FrameReader(r)
        objs = [(i, bytes(range(i * 9)) * 3, None, True) for i in range(20)]  # < a pipe's buffer
        data = b"".join(frame(o) for o in objs)
        ends = list(itertools.accumulate(len(frame(o)) for o in objs))
        for cut in (1, 3, 7, 500, len(data)):  # the stream in pieces of several sizes
            got: list[object] = []
            for i in range(0, len(data), cut):
                write_all(w, data[i : i + cut])
                if len(got) < len(objs) and ends[len(got)] <= i + cut:
                    got += reader.read()  # a whole frame is waiting: returns without blocking
            while len(got) < len(objs):
                got += reader.read()
            assert got == objs
        write_all(w, struct.pack(">I", MAX_FRAME + 1) + b"x")
        with pytest.raises(ValueError, match="over the"):
            reader.read()
    finally:
        os.close(w)
    try:
        with pytest.raises(EOFError):
            FrameReader(r).read()
    finally:
        os.close(r)


def test_an_engine_thread_that_raises_is_a_machine_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The threads backend: a computation that raises (a library failing, not bad input: the
    firmware answers bad input) fails the card like a dead worker process, never a hang."""
    import emulator.engines as engines

    def broken(request: bytes, ctx: object) -> object:
        raise ArithmeticError("OpenSSL BN_mod_exp_mont_consttime_x2 failed")

    with Emulator(_profile(tmp_path, "threads"), clock="wall") as emu:
        monkeypatch.setattr(engines, "execute", broken)
        assert emu.nqap(Q0[0], 1, crt(31)).status.rc == 0
        assert _wait(lambda: emu.card_state(0) is CardState.RECOVERING, 5.0)
        rep = parse_reply(_collect(emu, Q0[:1], 1, timeout=5.0)[1].reply)
        assert (rep.reply_code, rep.mf_state) == (ReplyCode.MACHINE_FAILURE, MachineFailureState.IN_PROCESS)
        assert emu.engines.lost == 1  # type: ignore[union-attr]
        monkeypatch.undo()
        assert emu.nqap(Q0[0], 2, crt(32)).status.rc == 0  # the same threads compute again
        assert result_int(_collect(emu, Q0[:1], 1)[2]) == pow(32, key().d, key().n)
    assert "engine thread of card 0 failed" in caplog.text


def test_a_worker_holds_a_bounded_number_of_jobs(tmp_path: Path) -> None:
    """Past MAX_OUTSTANDING jobs on one worker the backend refuses (the card computes inline), so
    the pipes can never fill both ways at once; the held jobs still all come back."""
    from emulator.engines import MAX_OUTSTANDING
    from firmware_stubs import DomainStore, FirmwareContext

    done: list[object] = []
    engines = ProcessEngines(1, lambda batch: done.extend(t for t, _ in batch), lambda card: None)
    ctx = FirmwareContext(0, DomainStore(), random.Random(0))
    try:
        assert engines.submit(0, -1, mex(3), ctx)
        assert _wait(lambda: done == [-1])
        (pid,) = engines.pids(0)
        os.kill(pid, signal.SIGSTOP)
        try:
            accepted = [engines.submit(0, i, mex(i + 2), ctx) for i in range(MAX_OUTSTANDING + 5)]
        finally:
            os.kill(pid, signal.SIGCONT)
        assert accepted == [True] * MAX_OUTSTANDING + [False] * 5
        assert _wait(lambda: len(done) == MAX_OUTSTANDING + 1)
        assert sorted(done[1:]) == list(range(MAX_OUTSTANDING))  # type: ignore[type-var]
    finally:
        engines.close()


def test_a_worker_talking_nonsense_is_killed_and_fails_its_card(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker whose output is not frames (here: a length over the bound, then silence) is not
    waited for: it is killed, reaped and its card fails, as if it had died."""
    import emulator.engines as engines

    liar = "import sys, time; sys.stdout.buffer.write(b'\\xff' * 8); sys.stdout.flush(); time.sleep(60)"
    monkeypatch.setattr(engines, "WORKER_COMMAND", [sys.executable, "-c", liar])
    with Emulator(_profile(tmp_path, "processes"), clock="wall") as emu:
        assert emu.nqap(Q0[0], 1, crt(41)).status.rc == 0
        pids = emu.engines.pids(0)  # type: ignore[union-attr]
        assert _wait(lambda: emu.card_state(0) is CardState.RECOVERING, 10.0)
        assert emu.engines.lost == 1 and all(_gone(p) for p in pids)  # type: ignore[union-attr]
        rep = parse_reply(_collect(emu, Q0[:1], 1, timeout=5.0)[1].reply)
        assert rep.mf_state is MachineFailureState.IN_PROCESS
