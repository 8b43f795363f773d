"""``apcrypto-emulator``: serve an emulator over ZeroMQ, make CURVE keys, talk to a control plane.

``serve`` prints exactly one machine-readable line on stdout once both sockets are bound::

    READY data=tcp://127.0.0.1:41234 control=tcp://127.0.0.1:41235 token_file=/run/user/0/apcrypto/...

so a test or a supervisor can start it with port ``0`` (or ``*``) and read where it landed (``token_file``
is the owner-only file holding the control plane's credential; absent under CURVE, whose control
allow-list is the credential).  Logs go to stderr.  SIGTERM and SIGINT stop it cleanly (sockets closed,
clock thread joined, token file removed, exit status 0).  A serve that cannot start (port in use, an
endpoint that is not ``tcp://HOST:PORT``, a non-loopback address without ``--insecure``) prints one line
saying why on stderr and exits 2 at once.  ``keygen`` writes secret keys 0600 in a 0700 directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
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
    s.add_argument(
        "--session-grace",
        type=float,
        default=60.0,
        help="keep a dropped session's APQNs and replies for its client this long, s (then zeroize)",
    )
    s.add_argument(
        "--default-grant",
        choices=("domain", "all"),
        default="domain",
        help="a client asking for no domain gets one free domain on every card (default), or all free APQNs",
    )
    s.add_argument("--apqn-matrix", type=Path, help="CURVE: TOML, APQNs per client key")
    s.add_argument("--insecure", action="store_true", help="allow binding non-loopback addresses (warns)")
    s.add_argument("--control-token-file", type=Path, help="where to write the control token (0600)")
    s.add_argument("--max-sessions", type=int, default=256, help="most concurrent client sessions")
    s.add_argument("--handshake-ivl", type=float, default=2.0, help="drop connections not handshaken, s")
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
    k.add_argument(
        "--control-client", action="append", help="control-plane client name (repeatable; default: control)"
    )

    c = sub.add_parser("control", help="send one control-plane request and print the JSON answer")
    c.add_argument("url", help="control endpoint, e.g. tcp://127.0.0.1:5556")
    c.add_argument("op", help="op name (op 'ops' lists them)")
    c.add_argument("args", nargs="*", help="key=value (values are JSON when they parse, else strings)")
    c.add_argument("--curve-dir", type=Path, help="directory made by keygen")
    c.add_argument("--client", default="control", help="control certificate name under --curve-dir")
    c.add_argument("--token-file", type=Path, help="the server's control token file (default: found)")
    c.add_argument("--timeout", type=float, default=5.0)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    opts = _parser().parse_args(argv)
    if opts.cmd == "serve":
        return _serve(opts)
    if opts.cmd == "keygen":
        return _keygen(opts.dir, opts.client or ["client"], opts.control_client or ["control"])
    return _control(opts)


def _serve(opts: argparse.Namespace) -> int:
    logging.basicConfig(
        level=opts.log_level.upper(), stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    from apformats.frames import DEFAULT_MAX_FRAME
    from emulator import Emulator, WallClock
    from emulator.frame_server import load_apqn_matrix
    from emulator.server import EmulatorServer, raise_nofile_limit

    raise_nofile_limit()

    matrix = None
    if opts.apqn_matrix is not None:
        if opts.curve_dir is None:
            print(
                "apcrypto-emulator: cannot serve: --apqn-matrix maps CURVE client keys: give --curve-dir",
                file=sys.stderr,
            )
            return 2
        try:
            matrix = load_apqn_matrix(opts.apqn_matrix, opts.curve_dir)
        except (OSError, ValueError) as exc:
            print(f"apcrypto-emulator: cannot serve: {exc}", file=sys.stderr)
            return 2
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
        session_grace=opts.session_grace,
        apqn_matrix=matrix,
        default_grant=opts.default_grant,
        insecure=opts.insecure,
        control_token_file=opts.control_token_file,
        max_sessions=opts.max_sessions,
        handshake_ivl=opts.handshake_ivl,
    )
    try:
        try:
            data_url, control_url = server.start()
        except Exception as exc:
            print(f"apcrypto-emulator: cannot serve: {exc}", file=sys.stderr, flush=True)
            return 2
        stop = lambda *_: server.stop()  # noqa: E731 - a signal handler, nothing more
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        token = f" token_file={server.control_token_path}" if server.control_token_path else ""
        print(f"READY data={data_url} control={control_url}{token}", flush=True)
        server.serve()
        return 0
    finally:
        server.close()
        emu.close()
        emu.execution_log.close()


def _keygen(directory: Path, clients: list[str], controls: list[str]) -> int:
    """Server certificate, data-plane clients (``clients/``) and control-plane clients (``control/``);
    every secret is written 0600 (created under umask 077, never readable by others) in ``private/``."""
    import zmq.auth

    directory.mkdir(parents=True, exist_ok=True)
    private = directory / "private"
    old = os.umask(0o077)
    try:
        private.mkdir(mode=0o700, exist_ok=True)
        zmq.auth.create_certificates(directory, "server")
        for allow_list, names in (("clients", clients), ("control", controls)):
            (directory / allow_list).mkdir(exist_ok=True)
            for name in names:
                public, _ = zmq.auth.create_certificates(private, name)
                shutil.copy(public, directory / allow_list / f"{name}.key")
    finally:
        os.umask(old)
    private.chmod(0o700)
    for secret in [directory / "server.key_secret", *private.glob("*.key_secret")]:
        secret.chmod(0o600)
    for shared in [directory / "server.key", *directory.glob("*/*.key")]:
        shared.chmod(0o644)  # public keys are meant to be shared
    for d in (directory / "clients", directory / "control"):
        d.chmod(0o755)
    print(f"server key: {directory / 'server.key_secret'}")
    print(f"client keys: {private} (allow-lists: {directory / 'clients'}, {directory / 'control'})")
    return 0


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _control(opts: argparse.Namespace) -> int:
    from emulator.control_client import ControlClient, ControlError, curve_options, read_token_file

    args = {}
    for item in opts.args:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"apcrypto-emulator: argument {item!r} is not key=value", file=sys.stderr)
            return 2
        args[key] = _value(value)
    try:
        creds: dict[str, Any] = curve_options(opts.curve_dir, opts.client) if opts.curve_dir else {}
        if opts.token_file is not None:
            creds["token"] = read_token_file(opts.token_file)
        client = ControlClient(opts.url, timeout=opts.timeout, **creds)
    except (OSError, ValueError) as exc:
        print(f"apcrypto-emulator: {exc}", file=sys.stderr)
        return 2
    with client:
        try:
            if opts.op == "execution_log" and not args:
                result: Any = client.execution_log()  # the whole log, read in pages
            else:
                result = client.call(opts.op, **args)
        except (ControlError, TimeoutError) as exc:
            print(f"apcrypto-emulator: {exc}", file=sys.stderr)
            return 1
    print(json.dumps(result, indent=2))
    return 0
