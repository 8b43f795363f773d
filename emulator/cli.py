"""``apcrypto-emulator``: serve an emulator over ZeroMQ, make CURVE keys, talk to a control plane.

``serve`` prints exactly one machine-readable line on stdout once both sockets are bound::

    READY data=tcp://127.0.0.1:41234 control=tcp://127.0.0.1:41235

so a test or a supervisor can start it with port ``0`` (or ``*``) and read where it landed.  Logs go to
stderr.  SIGTERM and SIGINT stop it cleanly (sockets closed, clock thread joined, exit status 0).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import signal
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]

log = logging.getLogger("emulator.cli")


def _domains(text: str) -> list[int]:
    """``0,1,5-7`` -> [0, 1, 5, 6, 7]."""
    out: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, _, hi = part.partition("-")
        first, last = int(lo, 0), int(hi or lo, 0)
        if not 0 <= first <= last <= 255:
            raise argparse.ArgumentTypeError(f"bad domain range {part!r} (domains are 0..255)")
        out.extend(range(first, last + 1))
    return out


def _profile(text: str) -> str | Path:
    return Path(text) if ("/" in text or text.endswith(".toml")) else text


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="apcrypto-emulator", description="The apcrypto AP adapter emulator.")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="serve an emulator over ZeroMQ (data + control plane)")
    s.add_argument("--profile", default="default", type=_profile, help="bundled profile name or TOML path")
    s.add_argument("--bind", default="tcp://127.0.0.1:5555", help="data plane endpoint (port 0 or *: any)")
    s.add_argument("--control", default="tcp://127.0.0.1:5556", help="control plane endpoint")
    s.add_argument("--curve-dir", type=Path, help="CURVE: server.key_secret + clients/*.key allow-list")
    s.add_argument("--seed", type=int, default=0, help="seed of every random stream (replayable runs)")
    s.add_argument("--domains", type=_domains, help="domains clients may use, e.g. 0,1,4-7 (default: all)")
    s.add_argument("--max-frame", type=int, default=None, help="largest frame accepted, bytes")
    s.add_argument("--session-idle", type=float, default=60.0, help="drop sessions silent this long, s")
    s.add_argument("--exec-log", type=Path, metavar="FILE", help="spill the exec log to this SQLite file")
    s.add_argument(
        "--exec-log-size", type=int, default=100_000, metavar="N", help="execution-log entries kept in memory"
    )
    s.add_argument(
        "--exec-log-flush",
        type=float,
        default=0.05,
        metavar="SECONDS",
        help="longest time between commits of --exec-log (staleness after a SIGKILL)",
    )
    s.add_argument("--log-level", default="WARNING")

    k = sub.add_parser("keygen", help="create CURVE certificates in the layout --curve-dir expects")
    k.add_argument("dir", type=Path)
    k.add_argument("--client", action="append", help="client name (repeatable; default: client)")

    c = sub.add_parser("control", help="send one control-plane request and print the JSON answer")
    c.add_argument("url", help="control endpoint, e.g. tcp://127.0.0.1:5556")
    c.add_argument("op", help="op name (op 'ops' lists them)")
    c.add_argument("args", nargs="*", help="key=value (values are JSON when they parse, else strings)")
    c.add_argument("--curve-dir", type=Path, help="directory made by keygen")
    c.add_argument("--client", default="client", help="client certificate name under --curve-dir")
    c.add_argument("--timeout", type=float, default=5.0)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    opts = _parser().parse_args(argv)
    if opts.cmd == "serve":
        return _serve(opts)
    if opts.cmd == "keygen":
        return _keygen(opts.dir, opts.client or ["client"])
    return _control(opts)


def _serve(opts: argparse.Namespace) -> int:
    logging.basicConfig(
        level=opts.log_level.upper(), stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    from apformats.frames import DEFAULT_MAX_FRAME
    from emulator import Emulator, WallClock
    from emulator.server import EmulatorServer

    emu = Emulator(opts.profile, clock=WallClock(), seed=opts.seed)
    try:
        emu.execution_log.configure(
            capacity=opts.exec_log_size, spill=opts.exec_log, flush_interval=opts.exec_log_flush
        )
    except (ValueError, OSError, sqlite3.Error) as exc:
        emu.close()
        print(f"apcrypto-emulator: cannot serve: --exec-log: {exc}", file=sys.stderr)
        return 2
    server = EmulatorServer(
        emu,
        bind=opts.bind,
        control=opts.control,
        curve_dir=opts.curve_dir,
        domains=opts.domains,
        max_frame=opts.max_frame or DEFAULT_MAX_FRAME,
        seed=opts.seed,
        session_idle=opts.session_idle,
    )
    try:
        try:
            data_url, control_url = server.start()
        except Exception as exc:
            print(f"apcrypto-emulator: cannot serve: {exc}", file=sys.stderr)
            return 2
        stop = lambda *_: server.stop()  # noqa: E731 - a signal handler, nothing more
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        print(f"READY data={data_url} control={control_url}", flush=True)
        server.serve()
        return 0
    finally:
        server.close()
        emu.close()
        emu.execution_log.close()


def _keygen(directory: Path, clients: list[str]) -> int:
    import zmq.auth

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "clients").mkdir(exist_ok=True)
    private = directory / "private"
    private.mkdir(exist_ok=True)
    zmq.auth.create_certificates(directory, "server")
    for name in clients:
        public, _ = zmq.auth.create_certificates(private, name)
        shutil.copy(public, directory / "clients" / f"{name}.key")
    print(f"server key: {directory / 'server.key_secret'}")
    print(f"client keys: {private} (allow-list: {directory / 'clients'})")
    return 0


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _control(opts: argparse.Namespace) -> int:
    from emulator.control_client import ControlClient, ControlError, curve_options

    args = {}
    for item in opts.args:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"apcrypto-emulator: argument {item!r} is not key=value", file=sys.stderr)
            return 2
        args[key] = _value(value)
    curve = curve_options(opts.curve_dir, opts.client) if opts.curve_dir else {}
    with ControlClient(opts.url, timeout=opts.timeout, **curve) as client:
        try:
            result = client.call(opts.op, **args)
        except (ControlError, TimeoutError) as exc:
            print(f"apcrypto-emulator: {exc}", file=sys.stderr)
            return 1
    print(json.dumps(result, indent=2))
    return 0
