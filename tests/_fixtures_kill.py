"""Kill tests: a mixed workload through the public client while its peer is killed, stopped or
unplugged, and a check of every verdict against the execution logs of the instances that ran it.

The checker is independent of the code under test: it shares nothing with ``apcrypto.audit`` or the
driver's ledger.  Its inputs are what a caller sees (each future's result or exception, the psmid
an exception names), the workload it submitted, and the emulators' execution logs (read from the
SQLite spill of a server process, which survives a SIGKILL, or from an in-process emulator).

What it checks, per scenario:

* every future resolves within a bounded wait (the unresolved are counted, and must be 0);
* every result is right (RSA against ``pow``, random bytes by length, a counter value is positive);
* state-changing work is accounted for exactly: every start of a counter increment or key store in
  any instance's log is either a request that completed or one whose exception names that very
  psmid (``Indeterminate``, ``DeadlineExceeded(may_have_run=True)``); one start more means a
  request ran twice, or ran while its caller was told it did not;
* no psmid starts twice;
* ``Indeterminate`` names a psmid that reached a card (a log entry exists), unless the request was
  submitted before the client could know the peer was gone (``doubt_until``): a command sent into a
  peer that dies may be lost in its socket buffer, or run in the last moments whose log entries a
  SIGKILL cut off; the driver cannot tell either from a run.  Work submitted later never left the
  host if it is in no log, and must not be left in doubt.  Whether it had started is counted;
* ``DeadlineExceeded(may_have_run=False)`` never names a psmid that started.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from typing import Any

from apcrypto.testing import RsaKey, seeded_key

#: the client's psmid base (high 32 bits): the checker looks only at this client's messages
PSMID_HI = 0x4B11
PSMID_BASE = PSMID_HI << 32
STATE_CHANGING = frozenset({"CPRB:CI", "CPRB:KS"})
#: type 82 reply codes of a message an engine rejected without executing it (zcrypt.md §4.3)
REJECTED_UNRUN = frozenset({0x20, 0x21})
IN_SERVICE = frozenset({"idle", "working", "queue-full"})

KEYS: dict[int, RsaKey] = {bits: seeded_key(bits, "kill") for bits in (1024, 2048)}
#: (kind, weight): idempotent RSA, random bytes, and the state-changing CCA operations
MIX = (
    ("ME-1024", 30),
    ("ME-2048", 20),
    ("CRT-2048", 15),
    ("random", 5),
    ("counter+1", 20),
    ("key-store", 10),
)


@dataclass
class Req:
    kind: str
    fut: Future[Any]
    expect: Any = None
    key: RsaKey | None = None
    t: float = field(default_factory=time.monotonic)  # when it was submitted

    @property
    def state_changing(self) -> bool:
        return self.kind in ("counter+1", "key-store")


def submit_mixed(client: Any, n: int, rng: random.Random) -> list[Req]:
    """``n`` requests of the mix, through the public client only."""
    names, weights = zip(*MIX, strict=True)
    out = []
    for kind in rng.choices(names, weights, k=n):
        if kind.startswith(("ME", "CRT")):
            key = KEYS[int(kind.split("-")[1])]
            m = rng.randrange(2, key.n - 1)
            if kind.startswith("ME"):
                out.append(Req(kind, client.mod_expo(m, key.e, key.n), pow(m, key.e, key.n), key))
            else:
                out.append(Req(kind, client.mod_expo_crt(m, key.p, key.q, key.dp, key.dq, key.qinv), m, key))
        elif kind == "random":
            out.append(Req(kind, client.random_bytes(32), 32))
        elif kind == "counter+1":
            out.append(Req(kind, client.counter_increment(1)))
        else:
            out.append(Req(kind, client.key_store(rng.randrange(16), rng.randbytes(32))))
    return out


def wait_all(reqs: Sequence[Req], timeout: float) -> int:
    """Wait (bounded) for every future; the number still unresolved."""
    _, pending = wait([r.fut for r in reqs], timeout=timeout)
    return len(pending)


def wait_in_service(client: Any, timeout: float) -> float | None:
    """Seconds until the client's transport is up and every queue in service again (None: not within
    ``timeout``)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        states = [q["state"] for q in client.stats()["queues"].values()]
        if client.transport.state == "up" and states and all(s in IN_SERVICE for s in states):
            return time.monotonic() - t0
        time.sleep(0.05)  # a bounded poll of a public read-out; nothing to wait on
    return None


def _right(r: Req, value: Any) -> bool:
    if r.kind.startswith("ME"):
        return int.from_bytes(value, "big") == r.expect
    if r.kind.startswith("CRT"):
        assert r.key is not None
        return pow(int.from_bytes(value, "big"), r.key.e, r.key.n) == r.expect
    if r.kind == "random":
        return isinstance(value, bytes) and len(value) == r.expect
    if r.kind == "counter+1":
        return isinstance(value, int) and value >= 1
    return True


def _started(e: Any) -> bool:
    """An engine ran it (a rejection before execution is no run)."""
    if e.started is None:
        return False
    return not (e.outcome == "error" and e.reply_code in REJECTED_UNRUN and e.effect is None)


@dataclass
class Verdicts:
    """Counts per outcome (for the report) and every broken promise found."""

    counts: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))


def check(reqs: Iterable[Req], logs: Sequence[Sequence[Any]], doubt_until: float = float("-inf")) -> Verdicts:
    """Every verdict of ``reqs`` against the execution logs of every instance that served them.
    ``doubt_until``: requests submitted before then may have been sent into the vanishing peer."""
    v = Verdicts()
    ours = [e for log in logs for e in log if e.psmid >> 32 == PSMID_HI]
    reached = {e.psmid for e in ours}
    started = Counter(e.psmid for e in ours if _started(e))
    for psmid, n in started.items():
        if n > 1:
            v.problems.append(f"psmid {psmid:#x} started {n} times")
    sc_starts = sum(1 for e in ours if e.function in STATE_CHANGING and _started(e))
    sc_completed = sc_named = 0
    for r in reqs:
        if not r.fut.done():
            v.counts["unresolved"] += 1
            continue
        exc = r.fut.exception()
        if exc is None:
            ok = _right(r, r.fut.result())
            v.counts["completed" if ok else "WRONG"] += 1
            if not ok:
                v.problems.append(f"{r.kind}: wrong result")
            sc_completed += r.state_changing
            continue
        name = type(exc).__name__
        psmid = getattr(exc, "psmid", None)
        if name == "Indeterminate":
            if psmid in reached:
                name += " (started)" if started.get(psmid) else " (on a card, not started)"
            elif r.t < doubt_until:
                name += " (sent into the outage, in no log)"
            else:
                v.problems.append(f"{r.kind}: Indeterminate for psmid {psmid} that never reached a card")
        if name == "DeadlineExceeded" and not getattr(exc, "may_have_run", True) and started.get(psmid):
            v.problems.append(f"{r.kind}: DeadlineExceeded(may_have_run=False) but psmid {psmid:#x} ran")
        v.counts[name] += 1
        if r.state_changing and psmid is not None and started.get(psmid):
            sc_named += 1
    if v.counts["unresolved"]:
        v.problems.append(f"{v.counts['unresolved']} futures never resolved")
    if sc_starts != sc_completed + sc_named:
        v.problems.append(
            f"state-changing work started {sc_starts} times in the logs, but {sc_completed} completed and "
            f"{sc_named} were reported as maybe run: {sc_starts - sc_completed - sc_named} unaccounted"
        )
    return v
