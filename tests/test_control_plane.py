"""The control plane's own door and its limits, against real server processes: the credential (token
file, CURVE allow-list), argument checks that keep the clock alive, paged log reads, the stats read,
exposure refused without --insecure, failing fast when serve cannot start, keygen modes, malformed
CURVE keys, the session cap, and 1,100 idle connections."""

from __future__ import annotations

import json
import os
import resource
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zmq

from apcrypto.transport import Command, Completion, open_transport
from apcrypto.transport.zmq_client import HandshakeRefused
from apformats.codes import ResponseCode
from apformats.messages import build_mex
from apformats.results import Instr, qid_of
from emulator import Emulator
from emulator.cli import main as cli_main
from emulator.control_client import ControlClient, ControlError, control_options, curve_options
from emulator.server import CONTROL_OPS, EmulatorServer, check_endpoint
from tests._fixtures_zmq import ROOT, E, ServerProcess, collect, rsa_key, server_factory, zmq_server

__all__ = ["server_factory", "zmq_server"]

RC = ResponseCode
Q00, Q01 = qid_of(0, 0), qid_of(0, 1)


def raw_control(url: str, request: dict[str, Any] | bytes, timeout: float = 5.0) -> dict[str, Any]:
    """One control request sent by hand (no ControlClient, so no credential unless given)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    try:
        sock.connect(url)
        sock.send(request if isinstance(request, bytes) else json.dumps(request).encode())
        assert sock.poll(int(timeout * 1000)), "no answer"
        return json.loads(sock.recv())
    finally:
        sock.close(linger=0)
        ctx.term()


def served(url: str, **options: Any) -> bool:
    """A data-plane client completes a real RSA request (the emulator's clock runs)."""
    k = rsa_key(1024)
    # the session asks for the domain of the queue it uses (the server gives each APQN to one session)
    with open_transport(url, timeout=3.0, **{"domains": [1], **options}) as t:
        t.submit([Command(1, Instr.NQAP, Q01, psmid=77, message=build_mex(5, E, k.n))])
        assert collect(t, lambda evs: bool(evs))[0].result.status.rc == RC.NORMAL
        deadline = time.monotonic() + 5.0
        tag = 2
        while time.monotonic() < deadline:
            t.submit([Command(tag, Instr.DQAP, Q01)])
            res = collect(
                t, lambda evs, tag=tag: any(isinstance(e, Completion) and e.tag == tag for e in evs)
            )
            r = next(e.result for e in res if isinstance(e, Completion) and e.tag == tag)
            if r.status.rc == RC.NORMAL:
                return r.psmid == 77
            tag += 1
            t.poll(0.01)
    return False


# --- the credential ----------------------------------------------------------------------------


def test_anonymous_and_wrong_token_requests_are_refused(zmq_server: ServerProcess) -> None:
    """Every op needs the credential: reads, fault arming, disconnect and shutdown alike."""
    assert zmq_server.token_file is not None
    for op, args in [
        ("shutdown", {}),
        ("execution_log", {}),
        ("now", {}),
        ("clear", {}),
        ("busy", {"qid": Q00, "duration": 1.0}),
        ("disconnect", {}),
        ("stats", {}),
        ("no_such_op", {}),
    ]:
        for token in (None, "", "x" * 43, 17):
            req = {"op": op, "args": args, "id": 1} | ({} if token is None else {"token": token})
            answer = raw_control(zmq_server.control, req)
            assert answer["ok"] is False and answer["type"] == "PermissionError", (op, token, answer)
    with zmq_server.control_client() as c:
        assert c.ping() == "pong" and c.faults() == []  # nothing was armed; the server still runs
        assert c.stats()["server"]["control_refused"] >= 32


def test_the_token_file_is_owner_only_and_found_by_itself(
    server_factory: Callable[..., ServerProcess], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = tmp_path / "runtime"
    monkeypatch.setenv("APCRYPTO_RUNTIME_DIR", str(runtime))
    srv = server_factory(
        "--profile", "small", env={"APCRYPTO_RUNTIME_DIR": str(runtime)}, token_in_log_dir=False
    )
    assert srv.token_file is not None and srv.token_file.parent == runtime
    assert stat.S_IMODE(srv.token_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(runtime.stat().st_mode) == 0o700
    with ControlClient(srv.control) as c:  # no credential given: found in the runtime directory
        assert c.ping() == "pong"
    assert cli_main(["control", srv.control, "ping"]) == 0
    srv.token_file.chmod(0o644)  # a token others can read is not used
    with pytest.raises(PermissionError, match="accessible to others"):
        ControlClient(srv.control)
    srv.token_file.chmod(0o600)
    assert srv.terminate() == 0
    assert not srv.token_file.exists()  # removed on a clean stop


def test_shutdown_is_a_control_op_with_a_credential(server_factory: Callable[..., ServerProcess]) -> None:
    srv = server_factory("--profile", "small")
    assert raw_control(srv.control, {"op": "shutdown"})["type"] == "PermissionError"
    assert srv.proc.poll() is None
    with srv.control_client() as c:
        assert c.shutdown() == "stopping"
    assert srv.proc.wait(10) == 0


def test_curve_control_plane_has_its_own_allow_list(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    assert cli_main(["keygen", str(keys), "--client", "app", "--control-client", "ops"]) == 0
    srv = server_factory("--profile", "small", "--curve-dir", str(keys))
    assert srv.token_file is None  # under CURVE the control key is the credential
    data_key, control_key = curve_options(keys, "app"), control_options(keys, "ops")
    with ControlClient(srv.control, **control_key) as c:
        assert c.ping() == "pong" and c.now() >= 0.0
    for who in (data_key, {**data_key, "curve_keypair": zmq.curve_keypair()}):
        with ControlClient(srv.control, timeout=0.5, **who) as c, pytest.raises(TimeoutError):
            c.shutdown()  # the handshake is refused: not even an answer
    with pytest.raises(HandshakeRefused):
        open_transport(srv.data, timeout=2.0, **control_key)  # and a control key is no data key
    assert served(srv.data, **data_key)
    assert srv.proc.poll() is None


# --- arguments checked, clock alive --------------------------------------------------------------

OVERFLOWS = [
    ("busy", {"qid": Q00, "duration": 1e10}),
    ("busy", {"qid": Q00, "duration": 1.0, "at": 1e10}),
    ("machine_failure", {"card": 0, "recovery_time": 1e10}),
    ("slow_engines", {"card": 0, "factor": 1e15}),
    ("checkstop", {"card": 0, "at": 1e10}),
    ("inject", {"type": "Busy", "qid": Q00, "duration": 1e300}),
    ("drop_frames", {"n": 10**12}),
    ("restore", {"card": 10**6}),
    ("card_state", {"card": "0"}),
    ("execution_log", {"psmid": -1}),
    ("execution_log", {"cursor": 0, "limit": 10**9}),
    ("disconnect", {"client": "not hex"}),
]


def test_overflow_inputs_are_refused_and_the_clock_lives_on(zmq_server: ServerProcess) -> None:
    with zmq_server.control_client() as c:
        for op, args in OVERFLOWS:
            with pytest.raises(ControlError) as ei:
                c.call(op, **args)
            assert ei.value.type in ("ValueError", "TypeError"), (op, ei.value)
        # at=Infinity is not even JSON to this door (Python's json would read it as inf)
        for literal in ("Infinity", "-Infinity", "NaN"):
            token = json.dumps(c._token)
            body = f'{{"op": "checkstop", "args": {{"card": 0, "at": {literal}}}, "token": {token}}}'
            answer = raw_control(zmq_server.control, body.encode())
            assert answer["ok"] is False and "finite" in answer["error"], answer
        assert c.faults() == []
        stats = c.stats()
        assert stats["clock"] == {"running": True, "errors": 0}
        assert c.now() > 0
    assert served(zmq_server.data)


# --- paged log reads, stats -----------------------------------------------------------------------


def test_the_log_is_read_in_pages(zmq_server: ServerProcess) -> None:
    assert served(zmq_server.data)
    with zmq_server.control_client() as c:
        whole = c.call("execution_log")
        assert whole and [e["seq"] for e in whole] == list(
            range(whole[0]["seq"], whole[0]["seq"] + len(whole))
        )
        pages, cursor = [], 0
        while True:
            page = c.execution_log_page(cursor, 1)
            assert len(page["entries"]) <= 1 and page["missed"] == 0
            if not page["entries"]:
                break
            pages += page["entries"]
            cursor = page["next"]
        assert pages[: len(whole)] == whole
        assert c.execution_log() == c.call("execution_log")  # the client's paging = the one-shot read
        assert c.execution_log(psmid=77)[-1]["outcome"] == "completed"


def test_a_whole_log_read_is_refused_beyond_one_page() -> None:
    """The one-shot read serialises at most one page on the serving thread; beyond that it says to page."""
    from emulator.execution_log import MAX_PAGE

    emu = Emulator("small", seed=1)
    emu.execution_log.configure(capacity=MAX_PAGE + 5)
    k = rsa_key(512)
    for psmid in range(MAX_PAGE + 1):
        assert emu.nqap(Q00, psmid, build_mex(3, E, k.n)).status.rc == RC.NORMAL
        emu.clock.run_until_idle()
        assert emu.dqap(Q00).psmid == psmid
    srv = EmulatorServer(emu)  # not started: no sockets, no token; its request handler alone
    try:
        answer = srv._control(json.dumps({"op": "execution_log"}).encode())
        page = srv._control(
            json.dumps({"op": "execution_log", "args": {"cursor": 9000, "limit": 5000}}).encode()
        )
    finally:
        srv.close()
    assert answer["ok"] is False and "pages" in answer["error"]
    assert page["ok"] and len(page["result"]["rows"]) == MAX_PAGE + 1 - 9000
    assert page["result"]["next"] == page["result"]["end"] == MAX_PAGE + 1


def test_stats_counts_per_card_queue_and_function(zmq_server: ServerProcess) -> None:
    with zmq_server.control_client() as c:
        before = c.stats()["emulator"]
        assert served(zmq_server.data)
        after = c.stats()
    emu = after["emulator"]
    q = next(q for q in emu["queues"] if q["qid"] == Q01)
    q0 = next(q for q in before["queues"] if q["qid"] == Q01)
    assert q["functions"].get("MEX_1K", 0) == q0["functions"].get("MEX_1K", 0) + 1
    card0 = next(card for card in emu["cards"] if card["card"] == 0)
    assert card0["functions"]["MEX_1K"] == sum(
        q["functions"].get("MEX_1K", 0) for q in emu["queues"] if q["card"] == 0
    )
    assert emu["functions"]["MEX_1K"] == sum(card["functions"].get("MEX_1K", 0) for card in emu["cards"])
    assert after["execution_log"]["capacity"] == 100_000 and after["execution_log"]["spill"] is None
    assert set(after) >= {"emulator", "utilisation", "server", "sessions", "max_sessions", "clock"}
    assert sorted(CONTROL_OPS) == sorted(set(CONTROL_OPS))


# --- exposure and failing fast -------------------------------------------------------------------


def serve_cli(*args: str, timeout: float = 20.0) -> tuple[int, str, float]:
    """Run ``serve ARGS`` to its end; (exit status, stderr, seconds from start to exit)."""
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "emulator", "serve", "--profile", "small", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    return proc.returncode, proc.stderr, time.monotonic() - started


def test_serve_on_a_busy_port_says_why_and_exits(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc, err, seconds = serve_cli("--bind", f"tcp://127.0.0.1:{port}", "--control", "tcp://127.0.0.1:0")
    assert rc == 2
    assert (
        err
        == f"apcrypto-emulator: cannot serve: cannot bind tcp://127.0.0.1:{port}: Address already in use\n"
    )
    assert seconds < 10.0  # interpreter start included (0.5-1.7 s measured on a loaded 2-core box)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (("--bind", "127.0.0.1:5555"), "not tcp://HOST:PORT"),
        (("--control", "udp://127.0.0.1:1"), "not tcp://HOST:PORT"),
        (("--bind", "tcp://127.0.0.1:http"), "port a number"),
        (("--bind", "tcp://0.0.0.0:0"), "not a loopback address"),
        (("--control", "tcp://*:0"), "not a loopback address"),
        (("--bind", "tcp://[::]:0"), "not a loopback address"),
    ],
)
def test_serve_refuses_bad_or_exposed_endpoints_in_one_line(args: tuple[str, ...], why: str) -> None:
    base = {"--bind": "tcp://127.0.0.1:0", "--control": "tcp://127.0.0.1:0"}
    base.update(dict(zip(args[::2], args[1::2], strict=True)))
    rc, err, _ = serve_cli(*[x for kv in base.items() for x in kv])
    assert rc == 2 and err.count("\n") == 1 and why in err, err


def test_insecure_binds_and_warns(server_factory: Callable[..., ServerProcess]) -> None:
    srv = server_factory("--profile", "small", "--bind", "tcp://0.0.0.0:0", "--insecure")
    with srv.control_client() as c:
        assert c.ping() == "pong"
    assert "INSECURE" in srv.log.read_text()
    assert check_endpoint("tcp://127.0.0.2:1") is False and check_endpoint("ipc:///tmp/x") is False
    assert check_endpoint("tcp://[::1]:1") is False and check_endpoint("tcp://localhost:1") is False
    assert check_endpoint("tcp://10.0.0.1:1", insecure=True) is True


def test_keygen_writes_secrets_owner_only(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    old = os.umask(0o022)  # the usual umask: create_certificates alone would make secrets 0644
    try:
        assert cli_main(["keygen", str(keys), "--client", "a"]) == 0
    finally:
        os.umask(old)
    secrets_ = [keys / "server.key_secret", *(keys / "private").glob("*.key_secret")]
    assert len(secrets_) == 3  # server, client a, control
    assert {stat.S_IMODE(p.stat().st_mode) for p in secrets_} == {0o600}
    assert stat.S_IMODE((keys / "private").stat().st_mode) == 0o700
    assert stat.S_IMODE((keys / "server.key").stat().st_mode) == 0o644


@pytest.mark.parametrize("bad", ["short", "|" * 40, b"\x00" * 31, "~" * 40, "x" * 41])
def test_a_malformed_curve_key_is_a_value_error_at_connect(bad: str | bytes) -> None:
    started = time.monotonic()
    with pytest.raises(ValueError, match="CURVE key"):
        open_transport("tcp://127.0.0.1:9", timeout=1.0, curve_server_key=bad)
    with pytest.raises(ValueError, match="CURVE key"):
        ControlClient("tcp://127.0.0.1:9", curve_server_key=bad)
    assert time.monotonic() - started < 5.0


# --- bounded resources ------------------------------------------------------------------------------


def test_the_session_cap_refuses_a_client_beyond_it(server_factory: Callable[..., ServerProcess]) -> None:
    """Beyond ``--max-sessions`` a HELLO is answered "server full" (a transient refusal: the client keeps
    trying until its deadline); the sessions within the cap are served, and a freed slot is reused."""
    srv = server_factory("--profile", "small", "--max-sessions", "2")
    a = open_transport(srv.data, timeout=2.0)
    try:
        with open_transport(srv.data, timeout=2.0) as b:
            with pytest.raises(ConnectionError):
                open_transport(srv.data, timeout=1.0)
            for i, t in enumerate((a, b)):
                t.submit([Command(i, Instr.TAPQ, t.qids()[0])])  # each session its own APQNs
                assert collect(t, lambda evs: bool(evs))[0].result.status.rc == RC.NORMAL
            a.close()
            with open_transport(srv.data, timeout=3.0) as c:
                c.submit([Command(9, Instr.TAPQ, c.qids()[0])])
                # the freed session's APQNs were zeroized at its BYE: one may still be resetting
                rc = collect(c, lambda evs: bool(evs))[0].result.status.rc
                assert rc in (RC.NORMAL, RC.RESET_IN_PROGRESS)
    finally:
        a.close()
    with srv.control_client() as ctl:
        assert ctl.stats()["server"]["sessions_refused"] >= 1


def test_1100_idle_connections_do_not_lock_out_a_client(server_factory: Callable[..., ServerProcess]) -> None:
    """The issue's attack with a default login's 1024-descriptor limit: 1,100 TCP connections that never
    speak, to each plane; a legitimate client is still served on both."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * 1100 + 200
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    srv = server_factory("--profile", "small", nofile=1024)
    idle: list[socket.socket] = []
    try:
        for url in (srv.data, srv.control):
            host, port = url.removeprefix("tcp://").rsplit(":", 1)
            for _ in range(1100):
                s = socket.socket()
                s.setblocking(False)
                s.connect_ex((host, int(port)))
                idle.append(s)
        started = time.monotonic()
        with srv.control_client(timeout=10.0) as c:
            assert c.ping() == "pong"
        assert served(srv.data)
        assert time.monotonic() - started < 10.0
    finally:
        for s in idle:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert srv.proc.poll() is None
