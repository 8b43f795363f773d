"""The apcrypto pytest plugin: an emulated AP adapter in *your* test suite.

Installed with apcrypto (entry point ``pytest11``), like pytest-postgresql or pyvisa-sim: no
conftest needed.  Every fixture name starts with ``apcrypto_`` so it never shadows your own.

Fixtures
    ``apcrypto_emulator``   an in-process :class:`emulator.Emulator` (virtual clock by default)
    ``apcrypto_server``     a real ``apcrypto-emulator serve`` process on free loopback ports, one per
                            test session (per xdist worker); its log is attached to failing tests
    ``apcrypto_server_factory``  start more servers (``factory(profile="small")``)
    ``apcrypto_client``     a connected :class:`apcrypto.Client` on the emulator or the server
    ``apcrypto_faults``     fault injection with the control plane's names, on either; cleared after
    ``apcrypto_execution_log``   ``()`` -> what the card really ran, as plain dicts
    ``apcrypto_verify``     ``(client)`` -> checks every outcome of the client against that log
    ``apcrypto_domains``    the domains this worker may use (None: all; see "xdist" below)

Choosing (first found wins): the marker ``@pytest.mark.apcrypto(profile=, clock=, seed=,
transport=, verify=)``, then the ini options ``apcrypto_profile`` (default ``fast``),
``apcrypto_clock`` (``virtual`` | ``wall``), ``apcrypto_seed`` (0), ``apcrypto_transport``
(``emu`` | ``tcp``).

xdist: each worker builds its own emulator and its own server, so workers never share an APQN.  With
``--apcrypto-url tcp://HOST:PORT`` (and ``--apcrypto-control``) every worker uses that one shared
server instead, and worker ``gwN`` is given domain N only (``apcrypto_domains``), so workers still
never touch each other's queues.

Loading the plugin imports the ``apcrypto`` package it lives in, but not the emulator, pyzmq or pyusb:
those wait until a fixture needs them, so a suite that does not use the plugin pays little for it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

__all__ = ["Faults", "OutcomeReport", "ServerProcess", "Settings", "check_outcomes"]

_MARKER = "apcrypto"
_LOG_TAIL = 200  # lines of a server's log attached to a failing test


# -- configuration -----------------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("apcrypto", "apcrypto emulated adapters")
    group.addoption("--apcrypto-url", default=None, help="use this shared emulator server (tcp://HOST:PORT)")
    group.addoption("--apcrypto-control", default=None, help="the shared server's control plane URL")
    parser.addini("apcrypto_profile", "emulator profile for the apcrypto fixtures", default="fast")
    parser.addini("apcrypto_clock", "clock of apcrypto_emulator: virtual | wall", default="virtual")
    parser.addini("apcrypto_seed", "emulator seed", default="0")
    parser.addini("apcrypto_transport", "transport of apcrypto_client: emu | tcp", default="emu")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "apcrypto(profile=None, clock=None, seed=None, transport=None, verify=True): "
        "choose the emulator behind the apcrypto fixtures for this test",
    )


@dataclass(frozen=True)
class Settings:
    """What the apcrypto fixtures of one test use (marker, else ini)."""

    profile: str
    clock: str
    seed: int
    transport: str
    verify: bool


@pytest.fixture
def apcrypto_settings(request: pytest.FixtureRequest) -> Settings:
    """The marker's choices over the ini options."""
    ini = request.config.getini
    marker = request.node.get_closest_marker(_MARKER)
    kw = dict(marker.kwargs) if marker is not None else {}
    unknown = set(kw) - {"profile", "clock", "seed", "transport", "verify"}
    if unknown:
        raise pytest.UsageError(f"@pytest.mark.apcrypto: unknown argument(s) {sorted(unknown)}")
    settings = Settings(
        profile=str(kw.get("profile") or ini("apcrypto_profile")),
        clock=str(kw.get("clock") or ini("apcrypto_clock")),
        seed=int(str(ini("apcrypto_seed") if kw.get("seed") is None else kw["seed"])),
        transport=str(kw.get("transport") or ini("apcrypto_transport")),
        verify=bool(kw.get("verify", True)),
    )
    if settings.clock not in ("virtual", "wall"):
        raise pytest.UsageError(f"apcrypto clock must be 'virtual' or 'wall', not {settings.clock!r}")
    if settings.transport not in ("emu", "tcp"):
        raise pytest.UsageError(f"apcrypto transport must be 'emu' or 'tcp', not {settings.transport!r}")
    return settings


def _worker_number() -> int | None:
    """``gw3`` -> 3 under pytest-xdist, else None."""
    name = os.environ.get("PYTEST_XDIST_WORKER", "")
    return int(name[2:]) if name.startswith("gw") and name[2:].isdigit() else None


@pytest.fixture(scope="session")
def apcrypto_domains(pytestconfig: pytest.Config) -> list[int] | None:
    """The domains this worker's clients use: all (None) on its own emulator or server; on a shared
    server (``--apcrypto-url``) under xdist, worker ``gwN`` gets domain N alone."""
    n = _worker_number()
    if pytestconfig.getoption("apcrypto_url") and n is not None:
        return [n]
    return None


# -- the in-process emulator ---------------------------------------------------------------------------


@pytest.fixture
def apcrypto_emulator(apcrypto_settings: Settings) -> Iterator[Any]:
    """An :class:`emulator.Emulator` in this process, closed after the test."""
    from emulator import Emulator

    s = apcrypto_settings
    emu = Emulator(s.profile, clock=s.clock, seed=s.seed)
    try:
        yield emu
    finally:
        emu.close()


# -- a real server process -------------------------------------------------------------------------------


@dataclass
class ServerProcess:
    """One ``apcrypto-emulator serve`` process: ``data`` and ``control`` URLs, its ``log`` file."""

    proc: subprocess.Popen[str]
    data: str
    control: str
    log: Path
    profile: str
    token_file: str | None = None  # the control plane's credential, when the server writes one

    def control_client(self, **kw: Any) -> Any:
        """A :class:`emulator.control_client.ControlClient` on this server's control plane."""
        from emulator.control_client import ControlClient

        if self.token_file:
            kw.setdefault("token_file", self.token_file)
        return ControlClient(self.control, **kw)

    def log_tail(self, lines: int = _LOG_TAIL) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            return f"(log unreadable: {exc})"

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL if it does not go within ``timeout``; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(timeout)


def start_server(
    log_dir: Path, profile: str, seed: int = 0, *extra: str, timeout: float = 30.0
) -> ServerProcess:
    """Start a server on free loopback ports (port 0) and wait for its READY line."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"apcrypto-server-{os.getpid()}-{time.monotonic_ns()}.log"
    cmd = [
        sys.executable, "-m", "emulator", "serve",
        "--bind", "tcp://127.0.0.1:0", "--control", "tcp://127.0.0.1:0",
        "--profile", profile, "--seed", str(seed), *extra,
    ]  # fmt: skip
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline() if proc.stdout else ""))
    reader.start()
    reader.join(timeout)
    ready = line[0] if line else ""
    if not ready.startswith("READY"):
        proc.kill()
        proc.wait(10)
        reader.join(5)
        if proc.stdout is not None:
            proc.stdout.close()
        raise RuntimeError(
            f"emulator server did not start ({ready.strip() or 'no READY line'}):\n{log.read_text()}"
        )
    fields_ = dict(part.split("=", 1) for part in ready.split()[1:])
    return ServerProcess(proc, fields_["data"], fields_["control"], log, profile, fields_.get("token_file"))


def _stop(server: ServerProcess) -> None:
    rc = server.stop()
    if server.proc.stdout is not None:
        server.proc.stdout.close()
    if rc not in (0, -signal.SIGTERM):
        raise RuntimeError(f"emulator server exited {rc}; log:\n{server.log_tail()}")


@pytest.fixture(scope="session")
def apcrypto_server(
    pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """A server process for the session (one per xdist worker), stopped cleanly at the end."""
    profile = str(pytestconfig.getini("apcrypto_profile"))
    seed = int(pytestconfig.getini("apcrypto_seed"))
    server = start_server(tmp_path_factory.mktemp("apcrypto-server"), profile, seed)
    try:
        yield server
    finally:
        _stop(server)


@pytest.fixture
def apcrypto_server_factory(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """``factory(profile="fast", seed=0, *extra_args)`` -> a new server, stopped after the test."""
    started: list[ServerProcess] = []

    def start(profile: str = "fast", seed: int = 0, *extra: str) -> ServerProcess:
        server = start_server(tmp_path / "servers", profile, seed, *extra)
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            _stop(server)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Generator[None, Any, Any]:
    """A failing test that used a server gets the tail of that server's log in its report."""
    report: Any = yield
    if report.failed:
        for server in getattr(item, "_apcrypto_servers", ()):
            report.sections.append((f"apcrypto server log ({server.log})", server.log_tail()))
    return report


def _remember_server(request: pytest.FixtureRequest, server: ServerProcess) -> None:
    node: Any = request.node
    servers = getattr(node, "_apcrypto_servers", [])
    servers.append(server)
    node._apcrypto_servers = servers


# -- what the client talks to, and its control plane ----------------------------------------------------


@dataclass
class _Target:
    url: str
    options: dict[str, Any]
    control: Any  # emu.control, or a ControlClient
    read_log: Callable[[], list[dict[str, Any]]]
    close: Callable[[], None] = lambda: None


@pytest.fixture
def _apcrypto_target(request: pytest.FixtureRequest, apcrypto_settings: Settings) -> Iterator[_Target]:
    from apcrypto.cardstats import plain

    shared = request.config.getoption("apcrypto_url")
    if apcrypto_settings.transport == "emu" and not shared:
        emu = request.getfixturevalue("apcrypto_emulator")
        yield _Target(
            "emu:",
            {"emulator": emu},
            emu.control,
            lambda: [plain(e) for e in emu.execution_log.entries()],
        )
        return
    if shared:
        from emulator.control_client import ControlClient

        data, control_url = shared, request.config.getoption("apcrypto_control")
        if not control_url:
            raise pytest.UsageError(
                "--apcrypto-url needs --apcrypto-control (fault injection, execution log)"
            )
        ctl = ControlClient(control_url, timeout=10.0)  # its credential from the environment
    else:
        marker = request.node.get_closest_marker(_MARKER)
        wants_own = marker is not None and ("profile" in marker.kwargs or "seed" in marker.kwargs)
        if wants_own:
            factory = request.getfixturevalue("apcrypto_server_factory")
            server = factory(apcrypto_settings.profile, apcrypto_settings.seed)
        else:
            server = request.getfixturevalue("apcrypto_server")
        _remember_server(request, server)
        data = server.data
        ctl = server.control_client(timeout=10.0)
    try:
        yield _Target(data, {}, ctl, lambda: [plain(e) for e in ctl.execution_log()], ctl.close)
    finally:
        ctl.close()


class Faults:
    """Fault injection with the control plane's names (``machine_failure``, ``checkstop``,
    ``deconfigure``, ``restore``, ``busy``, ``reset_in_progress``, ``fail_request``,
    ``slow_engines``, ``drop_frames``, ``corrupt_frames``, ``disconnect``, ``clear``...), the same on
    the in-process emulator and on a server.  Everything injected is cleared after the test."""

    def __init__(self, control: Any) -> None:
        self.control = control

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.control, name)

    def clear(self) -> None:
        self.control.clear()


@pytest.fixture
def apcrypto_faults(_apcrypto_target: _Target) -> Iterator[Faults]:
    """:class:`Faults` on whatever ``apcrypto_client`` talks to; everything is cleared after the test."""
    faults = Faults(_apcrypto_target.control)
    try:
        yield faults
    finally:
        faults.clear()


@pytest.fixture
def apcrypto_execution_log(_apcrypto_target: _Target) -> Callable[[], list[dict[str, Any]]]:
    """``apcrypto_execution_log()`` -> every execution the card recorded: dicts with ``psmid, qid,
    function, enqueued, started, ended, outcome, reply_code``."""
    return _apcrypto_target.read_log


# -- the checker --------------------------------------------------------------------------------------------


@dataclass
class OutcomeReport:
    """What :func:`check_outcomes` found: ``problems`` is empty when every outcome agrees with the log."""

    requests: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return not self.problems


def check_outcomes(client: Any, executions: list[dict[str, Any]]) -> OutcomeReport:
    """Hold every request the client's ledger remembers against the card's execution log.

    Written for the plugin, apart from :mod:`apcrypto.audit`, so that a bug there cannot hide here.
    Per request (all its attempts' psmids):

    * it has an outcome (nothing lost);
    * ``completed``: some attempt really completed on a card;
    * ``failed``: when a card answered, it answered with an error reply (``outcome == "error"``);
    * not idempotent: started at most once over all its attempts (never run twice);
    * ``indeterminate``: not every attempt is a message the card reported as never started
      (``pending-failed``) -- that one should have been re-driven, not reported indeterminate;
    * ``unavailable`` without any attempt (it never left the host): no execution at all.
    """
    by_psmid: dict[int, list[dict[str, Any]]] = {}
    for e in executions:
        by_psmid.setdefault(int(e["psmid"]), []).append(e)
    report = OutcomeReport()
    for rid, rec in list(client.core.ledger.records.items()):
        report.requests += 1
        name = rec.outcome.value if rec.outcome is not None else "none"
        report.outcomes[name] = report.outcomes.get(name, 0) + 1
        runs = [e for a in rec.attempts for e in by_psmid.get(a.psmid, [])]
        psmids = ", ".join(f"{a.psmid:#x}" for a in rec.attempts) or "never sent"
        what = f"request {rid} ({type(rec.request).__name__}, psmid {psmids})"
        started = [e for e in runs if e.get("started") is not None and not _rejected_unrun(e)]
        if rec.outcome is None:
            report.problems.append(f"{what}: no outcome (lost)")
            continue
        if len(started) > 1 and not rec.idempotent:
            report.problems.append(f"{what}: state-changing, but the card started it {len(started)} times")
        if name == "completed" and not any(e.get("outcome") == "completed" for e in runs):
            report.problems.append(f"{what}: completed, but no execution completed on a card")
        if name == "failed" and runs and not any(e.get("outcome") == "error" for e in runs):
            report.problems.append(f"{what}: failed, but the card never answered it with an error reply")
        if name == "indeterminate" and runs and all(e.get("outcome") == "pending-failed" for e in runs):
            report.problems.append(f"{what}: indeterminate, but the card said it never started (re-drive it)")
        if name == "unavailable" and not rec.attempts and runs:
            report.problems.append(f"{what}: never sent, but the card ran it")
    return report


def _rejected_unrun(e: dict[str, Any]) -> bool:
    # a card refuses a message it cannot parse (message type 0x20, command code 0x21) before running it
    return e.get("outcome") == "error" and e.get("reply_code") in (0x20, 0x21) and e.get("effect") is None


@pytest.fixture
def apcrypto_verify(_apcrypto_target: _Target) -> Callable[..., OutcomeReport]:
    """``apcrypto_verify(client)``: wait for the client's requests to settle, then assert that every
    outcome agrees with the execution log (raises ``AssertionError`` listing each disagreement)."""

    def verify(client: Any, timeout: float = 30.0) -> OutcomeReport:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = client.stats()
            if st["in_flight"] == 0 and st["backlog"] == 0:
                break
            time.sleep(0.01)
        report = check_outcomes(client, _apcrypto_target.read_log())
        if report.problems:
            raise AssertionError(
                f"{len(report.problems)} outcome(s) disagree with the execution log:\n  "
                + "\n  ".join(report.problems[:50])
            )
        return report

    return verify


@pytest.fixture
def apcrypto_client(
    _apcrypto_target: _Target,
    apcrypto_settings: Settings,
    apcrypto_domains: list[int] | None,
    apcrypto_verify: Callable[..., OutcomeReport],
) -> Iterator[Any]:
    """A connected :class:`apcrypto.Client` (short ``fast`` driver timings), ready to use.  After the
    test it is closed, and (unless ``@pytest.mark.apcrypto(verify=False)``) every outcome it gave is
    checked against the execution log."""
    import apcrypto

    # the check after the test holds every request against the log: the ledger must remember them all
    options: dict[str, Any] = {"config": "fast", "ledger_history": 1_000_000, **_apcrypto_target.options}
    if apcrypto_domains is not None:
        options["domains"] = apcrypto_domains
    client = apcrypto.connect(_apcrypto_target.url, **options)
    try:
        if not client.wait_ready(30):
            raise RuntimeError(f"apcrypto_client: {_apcrypto_target.url} not ready in 30 s")
        yield client
    finally:
        client.close()
    if apcrypto_settings.verify:
        apcrypto_verify(client)
