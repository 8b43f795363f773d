"""A client for the emulator server's control plane (the ``lewis-control`` of apcrypto).

Tests and operators flip faults and read the ground truth through it without touching the data plane
under test.  One DEALER socket (never REQ: a timed-out REQ socket is stuck in EFSM), one request at a
time, answers matched by ``id`` so a late answer to a timed-out request is skipped, not mistaken.

**The control plane's own credential** (the server's owner has it, a data-plane client does not):

- With CURVE, the control socket has its own allow-list (``CURVE_DIR/control/*.key``, made by
  ``apcrypto-emulator keygen``); a key on the data-plane list cannot even complete the handshake.
  :func:`control_options` loads the control certificate.
- Without CURVE, a random token that the server writes, at start, to a file readable by its owner alone
  (mode 0600, as Jupyter does): ``--control-token-file PATH``, or by default
  :func:`token_file_for(control_url) <token_file_for>` in :func:`runtime_dir`.  Every request carries
  it (``{"op": ..., "token": ...}``).  :class:`ControlClient` finds it by itself, in this order: the
  ``token=`` or ``token_file=`` argument, ``$APCRYPTO_CONTROL_TOKEN``, ``$APCRYPTO_CONTROL_TOKEN_FILE``,
  then the runtime file for the URL it was given (use the URL the server printed).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import stat
import threading
import time
from pathlib import Path
from typing import Any

import zmq

__all__ = [
    "ControlClient",
    "ControlError",
    "control_options",
    "curve_options",
    "find_token",
    "read_token_file",
    "runtime_dir",
    "token_file_for",
    "write_token_file",
]

TOKEN_ENV = "APCRYPTO_CONTROL_TOKEN"
TOKEN_FILE_ENV = "APCRYPTO_CONTROL_TOKEN_FILE"
RUNTIME_ENV = "APCRYPTO_RUNTIME_DIR"
#: Entries per page when :meth:`ControlClient.execution_log` walks the whole log (a page of 1000
#: costs the server's serving thread about 1 ms: rows, not objects, encoded by orjson).
PAGE = 1000


def runtime_dir() -> Path:
    """Where servers leave their control token files: ``$APCRYPTO_RUNTIME_DIR``, else
    ``$XDG_RUNTIME_DIR/apcrypto``, else ``~/.local/share/apcrypto/runtime`` (Jupyter's choice)."""
    if os.environ.get(RUNTIME_ENV):
        return Path(os.environ[RUNTIME_ENV])
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "apcrypto"
    return Path.home() / ".local" / "share" / "apcrypto" / "runtime"


def token_file_for(control_url: str) -> Path:
    """The default token file of the server whose control plane is bound at ``control_url``."""
    return runtime_dir() / f"control-{re.sub(r'[^A-Za-z0-9.]+', '-', control_url).strip('-')}.json"


def write_token_file(path: str | Path, control_url: str, token: str) -> Path:
    """Write ``token`` for ``control_url`` to ``path``, readable and writable by the owner alone.

    The file is created 0600 under a temporary name and renamed into place, so it is never readable by
    anyone else, not even for an instant; a missing parent directory is created 0700.
    """
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"url": control_url, "token": token, "pid": os.getpid()}, f)
    os.replace(tmp, path)
    return path


def read_token_file(path: str | Path) -> str:
    """The token in a file :func:`write_token_file` made; ``PermissionError`` if others could read it."""
    path = Path(path)
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PermissionError(f"{path} is accessible to others (mode {stat.S_IMODE(mode):o}): not using it")
    data = json.loads(path.read_text())
    token = data.get("token") if isinstance(data, dict) else None
    if not isinstance(token, str):
        raise ValueError(f"{path} holds no control token")
    return token


def find_token(url: str) -> str | None:
    """The control token for the server at ``url``, from the environment or its runtime file; None if
    there is none (the server will then refuse, and say so)."""
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV]
    for path in (os.environ.get(TOKEN_FILE_ENV), token_file_for(url)):
        if path and Path(path).exists():
            return read_token_file(path)
    return None


class ControlError(RuntimeError):
    """The server refused or failed a control request.  ``type`` is the server-side exception name."""

    def __init__(self, message: str, type_: str = "") -> None:
        super().__init__(message)
        self.type = type_


def curve_options(curve_dir: str | Path, client: str = "client") -> dict[str, Any]:
    """``curve_server_key`` and ``curve_keypair`` from a directory laid out by ``apcrypto-emulator keygen``.

    The result works for :class:`ControlClient` and for ``apcrypto.transport.open_transport("tcp://...")``.
    """
    import zmq.auth

    d = Path(curve_dir)
    server_public, _ = zmq.auth.load_certificate(d / "server.key")
    public, secret = zmq.auth.load_certificate(d / "private" / f"{client}.key_secret")
    return {"curve_server_key": server_public, "curve_keypair": (public, secret)}


def control_options(curve_dir: str | Path, client: str = "control") -> dict[str, Any]:
    """:func:`curve_options` for a control-plane certificate (listed in ``CURVE_DIR/control``)."""
    return curve_options(curve_dir, client)


class ControlClient:
    """Talk to ``apcrypto-emulator serve --control URL``.  Methods mirror the server's control ops.

    Thread-safe (one lock around the socket).  ``timeout`` bounds each request; a request that times out
    raises :class:`TimeoutError` and leaves the client usable.  Without CURVE, the control token is
    ``token``, else read from ``token_file``, else found by :func:`find_token`.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 2.0,
        curve_server_key: bytes | str | None = None,
        curve_keypair: tuple[bytes | str, bytes | str] | None = None,
        token: str | None = None,
        token_file: str | Path | None = None,
    ) -> None:
        self.url = url
        self.timeout = timeout
        if token is None and curve_server_key is None:
            token = read_token_file(token_file) if token_file is not None else find_token(url)
        self._token = token
        keys = None
        if curve_server_key is not None:
            public, secret = curve_keypair if curve_keypair is not None else zmq.curve_keypair()
            keys = (
                _key(curve_server_key, "curve_server_key"),
                _key(public, "public"),
                _key(secret, "secret"),
            )
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.linger = 0
        if keys is not None:
            self._sock.curve_serverkey, self._sock.curve_publickey, self._sock.curve_secretkey = keys
        self._sock.connect(url)
        self._closed = False

    def call(self, op: str, **args: Any) -> Any:
        """Run one control op; return its result or raise :class:`ControlError` / :class:`TimeoutError`."""
        with self._lock:
            if self._closed:
                raise RuntimeError("ControlClient is closed")
            req_id = next(self._ids)
            req: dict[str, Any] = {"op": op, "args": args, "id": req_id}
            if self._token is not None:
                req["token"] = self._token
            self._sock.send(json.dumps(req, allow_nan=False).encode())
            deadline = time.monotonic() + self.timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not self._sock.poll(max(1, int(left * 1000))):
                    raise TimeoutError(
                        f"control op {op!r}: no answer from {self.url} within {self.timeout} s"
                    )
                answer = json.loads(self._sock.recv())
                if answer.get("id") != req_id:
                    continue  # the late answer to an earlier, timed-out request
                if answer.get("ok"):
                    return answer.get("result")
                raise ControlError(f"{op}: {answer.get('error')}", answer.get("type", ""))

    def close(self) -> None:
        """Close the socket and its context (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._sock.close(linger=0)
            self._ctx.term()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- card and queue faults (emulator.control) ------------------------------------------------------
    def machine_failure(
        self, card: int, recovery_time: float | None = None, **trigger: Any
    ) -> dict[str, Any]:
        """``trigger``: ``at=`` (emulator clock time) or ``after_requests=``; none: now."""
        return self.call("machine_failure", card=card, recovery_time=recovery_time, **trigger)

    def checkstop(self, card: int, **trigger: Any) -> dict[str, Any]:
        return self.call("checkstop", card=card, **trigger)

    def deconfigure(self, card: int, **trigger: Any) -> dict[str, Any]:
        return self.call("deconfigure", card=card, **trigger)

    def restore(self, card: int) -> None:
        return self.call("restore", card=card)

    def reset_in_progress(self, qid: int, duration: float, **trigger: Any) -> dict[str, Any]:
        return self.call("reset_in_progress", qid=qid, duration=duration, **trigger)

    def busy(self, qid: int, duration: float, **trigger: Any) -> dict[str, Any]:
        return self.call("busy", qid=qid, duration=duration, **trigger)

    def fail_request(self, reply_code: int, qid: int | None = None, nth: int | None = None, **kw: Any) -> Any:
        return self.call("fail_request", reply_code=reply_code, qid=qid, nth=nth, **kw)

    def slow_engines(self, card: int, factor: float, duration: float | None = None, **trigger: Any) -> Any:
        return self.call("slow_engines", card=card, factor=factor, duration=duration, **trigger)

    def inject(self, type: str, **fields: Any) -> dict[str, Any]:
        """Arm any fault by class name (``emulator.faults``) and its fields."""
        return self.call("inject", type=type, **fields)

    def state(self, fault: dict[str, Any]) -> str:
        """``pending`` / ``active`` / ``done`` of a fault, passed as an arm method returned it."""
        return self.call("state", **fault)

    def clear(self) -> None:
        return self.call("clear")

    def faults(self) -> list[dict[str, Any]]:
        return self.call("faults")

    # -- observation -----------------------------------------------------------------------------------
    def execution_log(self, psmid: int | None = None) -> list[dict[str, Any]]:
        """Execution entries (all the server holds, or one psmid's) as dicts with the ``Execution``
        fields.  The whole log is read in pages of :data:`PAGE`, up to where it ended at the first page
        (so a busy server cannot keep the reader going forever)."""
        if psmid is not None:
            return self.call("execution_log", psmid=psmid)
        out: list[dict[str, Any]] = []
        cursor, end = 0, None
        while True:
            page = self.execution_log_page(cursor, PAGE)
            out.extend(page["entries"])
            end = page["end"] if end is None else end
            if not page["entries"] or page["next"] >= end:
                return out
            cursor = page["next"]

    def execution_log_page(self, cursor: int = 0, limit: int = PAGE) -> dict[str, Any]:
        """One page: ``{"entries": [...], "next": CURSOR, "oldest": SEQ, "end": SEQ, "missed": N}``
        (see :class:`emulator.execution_log.LogPage`); each entry a dict as :meth:`execution_log` gives.
        (On the wire the server sends ``"fields"`` once and ``"rows"``; this rebuilds the dicts.)"""
        page = self.call("execution_log", cursor=cursor, limit=limit)
        fields = page.pop("fields")
        page["entries"] = [
            {"type": "Execution", **dict(zip(fields, row, strict=True))} for row in page.pop("rows")
        ]
        return page

    def now(self) -> float:
        return self.call("now")

    def stats(self) -> dict[str, Any]:
        return self.call("stats")

    def qids(self) -> list[int]:
        return self.call("qids")

    def card_state(self, card: int) -> str:
        return self.call("card_state", card=card)

    def sessions(self) -> list[dict[str, Any]]:
        return self.call("sessions")

    # -- transport faults ------------------------------------------------------------------------------
    def drop_frames(self, n: int = 1) -> dict[str, int]:
        return self.call("drop_frames", n=n)

    def corrupt_frames(self, n: int = 1) -> dict[str, int]:
        return self.call("corrupt_frames", n=n)

    def disconnect(self, client: str | None = None) -> int:
        """Drop one client (routing id hex from :meth:`sessions`) or all; returns how many."""
        return self.call("disconnect", client=client)

    def transport_faults(self) -> dict[str, int]:
        return self.call("transport_faults")

    # -- the server ------------------------------------------------------------------------------------
    def ping(self) -> str:
        return self.call("ping")

    def ops(self) -> list[str]:
        return self.call("ops")

    def shutdown(self) -> str:
        return self.call("shutdown")


def _key(k: bytes | str, what: str = "key") -> bytes:
    """A CURVE key as Z85 bytes, checked: a malformed key is a ValueError here, not a dead I/O thread."""
    from zmq.utils import z85

    raw = k.encode("ascii", "replace") if isinstance(k, str) else bytes(k)
    if len(raw) == 32:
        return z85.encode(raw)
    try:
        ok = len(raw) == 40 and len(z85.decode(raw)) == 32
    except Exception:  # z85 raises what its table lookup raises
        ok = False
    if not ok:
        raise ValueError(f"{what}: not a CURVE key (40 Z85 characters or 32 bytes)")
    return raw
