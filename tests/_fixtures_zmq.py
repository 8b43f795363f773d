"""Fixtures for the ZeroMQ tests: a real ``python -m emulator serve`` process, clients, RSA keys.

Every server process is terminated and waited for in teardown, and a server that was not killed on
purpose must exit 0 after SIGTERM (the clean-stop contract).  Waits are bounded polls, never sleeps.

The control plane needs its credential: each server writes its control token to an owner-only file in
the runtime directory, which for a test run is a private temporary one (``$APCRYPTO_RUNTIME_DIR``, set
here when this module is imported, inherited by every server and CLI the tests start), so a plain
``ControlClient(srv.control)`` finds it by itself as an operator's would; :meth:`ServerProcess.
control_client` passes the file named on the READY line explicitly (tests for a CURVE server pass their
certificate instead).
"""

from __future__ import annotations

import atexit
import functools
import os
import random
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gmpy2
import pytest

from apcrypto.testing import RsaKey, seeded_key
from apcrypto.transport.base import Transport, TransportEvent
from emulator.control_client import ControlClient

ROOT = Path(__file__).resolve().parent.parent
E = 65537

if not os.environ.get("APCRYPTO_RUNTIME_DIR"):  # token files of this test run's servers, not ~/.local
    _RUNTIME = tempfile.mkdtemp(prefix="apcrypto-runtime-")
    os.environ["APCRYPTO_RUNTIME_DIR"] = _RUNTIME
    atexit.register(shutil.rmtree, _RUNTIME, True)


@dataclass
class ServerProcess:
    """One running ``apcrypto-emulator serve``; ``data``/``control`` are the bound endpoints."""

    proc: subprocess.Popen[str]
    data: str
    control: str
    log: Path
    killed: bool = False
    clients: list[ControlClient] = field(default_factory=list)
    token_file: Path | None = None

    def control_client(self, **kw: Any) -> ControlClient:
        """A control client with this server's credential (its token file, unless ``kw`` has CURVE keys
        or a token of its own)."""
        if self.token_file is not None and not {"curve_server_key", "token", "token_file"} & set(kw):
            kw["token_file"] = self.token_file
        c = ControlClient(self.control, **kw)
        self.clients.append(c)
        return c

    def kill(self) -> None:
        """SIGKILL: the peer vanishes without a word (no BYE, sockets reset by the kernel)."""
        self.killed = True
        self.proc.kill()
        self.proc.wait(10)

    def freeze(self) -> None:
        """SIGSTOP: the peer stops answering but its TCP connections stay up."""
        self.killed = True
        self.proc.send_signal(signal.SIGSTOP)

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        for c in self.clients:
            c.close()
        self.clients.clear()
        if self.killed:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(10)
            return
        try:
            rc = self.terminate()
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"server ignored SIGTERM; log:\n{self.log.read_text()}") from None
        assert rc == 0, f"server exited {rc} after SIGTERM; log:\n{self.log.read_text()}"


def start_server(
    *args: str,
    log_dir: Path,
    ready_timeout: float = 30.0,
    env: dict[str, str] | None = None,
    nofile: int | None = None,
    token_in_log_dir: bool = False,
) -> ServerProcess:
    """Start ``python -m emulator serve ARGS`` on free loopback ports and wait for its READY line.

    ``env`` adds environment variables; ``nofile`` starts the process with that soft descriptor limit
    (as a default Linux login has 1024), so a test sees what the server does about it.  The control
    token goes to the runtime directory (the server's default), or to a file in ``log_dir`` with
    ``token_in_log_dir``.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.monotonic_ns()
    log = log_dir / f"server-{stamp}.log"
    cmd = [
        sys.executable,
        "-m",
        "emulator",
        "serve",
        "--bind",
        "tcp://127.0.0.1:0",
        "--control",
        "tcp://127.0.0.1:0",
    ]
    if token_in_log_dir and "--control-token-file" not in args and "--curve-dir" not in args:
        cmd += ["--control-token-file", str(log_dir / f"control-{stamp}.token")]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}

    def limit() -> None:  # runs in the child between fork and exec
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))

    with log.open("w") as err:
        proc = subprocess.Popen(
            [*cmd, *args],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            cwd=ROOT,
            env=full_env,
            preexec_fn=limit if nofile is not None else None,  # only setrlimit, no threads
        )
    assert proc.stdout is not None
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            if not sel.select(ready_timeout):
                raise AssertionError(f"no READY line within {ready_timeout} s")
            line = proc.stdout.readline().strip()
        fields = dict(item.split("=", 1) for item in line.split()[1:])
        assert line.startswith("READY "), line
        token = fields.get("token_file")
        return ServerProcess(
            proc, fields["data"], fields["control"], log, token_file=Path(token) if token else None
        )
    except BaseException:
        proc.kill()
        proc.wait(10)
        proc.stdout.close()
        raise AssertionError(f"server did not start; log:\n{log.read_text()}") from None


@pytest.fixture(scope="module")
def zmq_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A shared server on the small profile (2 CEX8A cards x domains 0-1) for tests that do not kill it."""
    srv = start_server("--profile", "small", "--seed", "1", log_dir=tmp_path_factory.mktemp("zmq"))
    try:
        yield srv
    finally:
        srv.proc.stdout.close()  # type: ignore[union-attr]
        srv.stop()


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start private servers (for tests that kill, stop or reconfigure them); all stopped in teardown.
    Keyword arguments go to :func:`start_server` (``env=``, ``nofile=``)."""
    started: list[ServerProcess] = []

    def start(*args: str, **kw: Any) -> ServerProcess:
        srv = start_server(*args, log_dir=tmp_path, **kw)
        started.append(srv)
        return srv

    yield start
    errors = []
    for srv in started:
        srv.proc.stdout.close()  # type: ignore[union-attr]
        try:
            srv.stop()
        except AssertionError as exc:
            errors.append(str(exc))
    assert not errors, "\n".join(errors)


@pytest.fixture
def control(zmq_server: ServerProcess) -> Iterator[ControlClient]:
    """A control client for the shared server; heals every fault afterwards so tests stay independent."""
    with zmq_server.control_client(timeout=5.0) as c:
        yield c
        c.clear()


def collect(
    t: Transport, until: Callable[[list[TransportEvent]], bool], timeout: float = 5.0
) -> list[TransportEvent]:
    """Poll ``t`` until ``until(events so far)`` holds; fail after ``timeout`` seconds."""
    events: list[TransportEvent] = []
    deadline = time.monotonic() + timeout
    while not until(events):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"condition not met within {timeout} s; events: {events}")
        events.extend(t.poll(min(left, 0.5)))
    return events


def rsa_key(bits: int = 1024) -> RsaKey:
    """A deterministic RSA key for checking results with ``pow``."""
    return seeded_key(bits, "zmq")


def counter_effects(log: list[dict[str, Any]]) -> dict[int, int]:
    """psmid -> the counter value a completed CI left, from an execution log read over the control
    plane (an entry's ``effect`` reads ``counter A->B``)."""
    out = {}
    for e in log:
        m = re.fullmatch(r"counter (\d+)->(\d+)", e.get("effect") or "")
        if m and e["outcome"] == "completed":
            out[e["psmid"]] = int(m.group(2))
    return out
