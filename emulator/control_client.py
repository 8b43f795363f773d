"""A client for the emulator server's control plane (the ``lewis-control`` of apcrypto).

Tests and operators flip faults and read the ground truth through it without touching the data plane
under test.  One DEALER socket (never REQ: a timed-out REQ socket is stuck in EFSM), one request at a
time, answers matched by ``id`` so a late answer to a timed-out request is skipped, not mistaken.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from pathlib import Path
from typing import Any

import zmq

__all__ = ["ControlClient", "ControlError", "curve_options"]


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


class ControlClient:
    """Talk to ``apcrypto-emulator serve --control URL``.  Methods mirror the server's control ops.

    Thread-safe (one lock around the socket).  ``timeout`` bounds each request; a request that times out
    raises :class:`TimeoutError` and leaves the client usable.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 2.0,
        curve_server_key: bytes | str | None = None,
        curve_keypair: tuple[bytes | str, bytes | str] | None = None,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.linger = 0
        if curve_server_key is not None:
            public, secret = curve_keypair if curve_keypair is not None else zmq.curve_keypair()
            self._sock.curve_serverkey = _key(curve_server_key)
            self._sock.curve_publickey = _key(public)
            self._sock.curve_secretkey = _key(secret)
        self._sock.connect(url)
        self._closed = False

    def call(self, op: str, **args: Any) -> Any:
        """Run one control op; return its result or raise :class:`ControlError` / :class:`TimeoutError`."""
        with self._lock:
            if self._closed:
                raise RuntimeError("ControlClient is closed")
            req_id = next(self._ids)
            self._sock.send(json.dumps({"op": op, "args": args, "id": req_id}).encode())
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
        """Execution entries (all, or one psmid's) as dicts with the ``Execution`` fields."""
        return self.call("execution_log", psmid=psmid)

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


def _key(k: bytes | str) -> bytes:
    return k.encode("ascii") if isinstance(k, str) else k
