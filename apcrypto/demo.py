"""``apcrypto demo``: a mixed workload on the embedded emulator, with a machine failure mid-run.

It uses only the public surface (``apcrypto.connect("emu:", emulator=...)``) on an emulator whose
clock is virtual, so service times and the card's recovery take no real time and utilisation is
exact.  At the end every verdict is checked against the emulator's execution log.
"""

from __future__ import annotations

import random
import sys
import time
from collections import Counter, defaultdict, deque
from concurrent.futures import Future, wait
from typing import Any, TextIO

import apcrypto
from apcrypto.audit import audit
from apcrypto.errors import ApcryptoError
from apcrypto.testing import RsaKey, make_key
from apformats.results import qid_card


def _result_ok(how: str, val: Any, key: RsaKey | None, res: Any) -> bool:
    """Check a result independently: ME against pow(), CRT by re-encrypting with the public key."""
    if how == "me":
        return int.from_bytes(res, "big") == val
    if how == "crt":
        assert key is not None
        return pow(int.from_bytes(res, "big"), key.e, key.n) == val
    if how == "random":
        return len(res) == val
    return True


class Progress:
    """A one-line progress bar on a terminal; a few plain lines otherwise (CI logs)."""

    def __init__(self, total: int, out: TextIO) -> None:
        self.total, self.out = total, out
        self.tty = out.isatty()
        self.last = -1

    def show(self, done: int, note: str = "") -> None:
        pct = done * 100 // max(1, self.total)
        if self.tty:
            bar = "#" * (pct // 4) + "." * (25 - pct // 4)
            self.out.write(f"\r  [{bar}] {done:5d}/{self.total} {note:<40}")
            self.out.flush()
        elif pct // 25 != self.last // 25 or done == self.total:
            self.out.write(f"  {done:5d}/{self.total} done {note}\n")
        self.last = pct

    def end(self) -> None:
        if self.tty:
            self.out.write("\n")


def ordinal(n: int) -> str:
    """1st, 2nd, 3rd, 4th, ..., 11th, 12th, 13th, 21st."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


#: how long the demo waits for its outcomes before it reports the undecided ones (never reached by a
#: driver that keeps its promise: every request ends in bounded time)
SETTLE_LIMIT = 120.0


def _settle(futures: list[Future[Any]], progress: Progress, sim: bool, client: Any) -> int:
    """Wait (bounded) until every future is done, showing progress; returns how many are not.

    Outcomes arrive in any order; each wait is on the first future not done yet, and a done-callback
    counts them all, so the whole wait is linear in the number of requests.
    """
    finished: deque[None] = deque()  # append is thread-safe: one entry per outcome
    for f in futures:
        f.add_done_callback(lambda _f: finished.append(None))
    wait_until = time.monotonic() + SETTLE_LIMIT
    i = 0
    while True:
        while i < len(futures) and futures[i].done():
            i += 1
        left = wait_until - time.monotonic()
        if i == len(futures) or left <= 0:
            return len(futures) - i - sum(1 for f in futures[i:] if f.done())
        progress.show(len(finished))
        if sim:  # advance the simulation to the next outcome
            client.settle([futures[i]])
        else:
            wait([futures[i]], timeout=min(1.0, left))


def run_demo(*, seed: int = 7, requests: int = 3000, sim: bool = False, out: TextIO = sys.stdout) -> int:
    """Run the demo; returns 0 when every verdict checks out, 1 otherwise.

    By default it goes through the public client (``apcrypto.connect``): a runner thread drives the
    card on a virtual clock while this thread submits, so thread timing varies the details between
    runs.  ``sim=True`` runs the same workload on the simulation runner, single-threaded: the same
    seed then replays the same run exactly.  Every figure printed is measured in this run: the time
    window is the workload's, from its first submission to its last reply, on the emulator's clock.
    """
    if requests < 1:
        raise ValueError(f"the demo needs at least one request, got {requests}")
    from emulator import Emulator, VirtualClock  # the demo builds the emulator it then connects to

    rng = random.Random(seed)
    t_start = time.perf_counter()
    this = f"apcrypto demo --sim --seed {seed} --requests {requests}"
    if sim:
        out.write(f"apcrypto demo  seed={seed}  requests={requests}  (simulation runner)\n")
        out.write(f"  deterministic: `{this}` replays this run exactly\n")
    else:
        out.write(f"apcrypto demo  seed={seed}  requests={requests}  (public client, runner thread)\n")
        out.write(
            "  thread timing varies the details between runs; for a run that replays exactly, "
            f"on the simulation runner: `{this}`\n"
        )
    keys = {bits: make_key(bits, rng) for bits in (1024, 2048, 4096)}
    emu = Emulator("default", clock=VirtualClock(), seed=seed)
    client: Any
    # the audit at the end holds every request against the execution log: the ledger keeps them all
    history = {"ledger_history": requests}
    if sim:
        from apcrypto.core.config import FAST
        from apcrypto.runners.sim import SimClient, SimRunner

        client = SimClient(SimRunner(emu, FAST.with_(**history), psmid_base=0xDE40 << 32))
        client.runner.run(emu.clock.now() + 0.05)  # bring-up
        ready = True
    else:
        client = apcrypto.connect("emu:", emulator=emu, config="fast", psmid_base=0xDE40 << 32, **history)
        ready = client.wait_ready(10.0)
    states = [q["state"] for q in client.stats()["queues"].values()]
    out.write(
        "  " + ", ".join(f"card {c.name} {c.type} ({c.mode}, {c.engines} engines)" for c in emu.stats().cards)
    )
    in_service = sum(st not in ("offline",) and not st.startswith("reset") for st in states)
    out.write(f"; {in_service} of {len(states)} queues in service\n")
    if not ready:
        out.write("  ! some queues were still being brought up after 10 s\n")
    accel = [c.card for c in emu.stats().cards if c.mode == "accel"]
    cca = [c.card for c in emu.stats().cards if c.mode == "cca"]
    failing = cca[0] if cca else accel[0]
    t_virtual0 = emu.clock.now()

    # the workload: RSA ME and CRT of several sizes, random bytes, and state-changing requests
    kinds = [("ME-1024", 18), ("ME-2048", 25), ("ME-4096", 4), ("CRT-1024", 12), ("CRT-2048", 14),
             ("CRT-4096", 2), ("random", 5), ("counter+1", 15), ("key-store", 5)]  # fmt: skip
    names, weights = zip(*kinds, strict=True)
    plan: list[tuple[str, Future[Any], Any]] = []
    # a third of the way through that card's share of the work (its kinds are ~25% of the mix)
    nth = max(1, requests * 25 // 100 // max(1, len(cca)) // 3)
    accepted0 = next(c.requests for c in emu.stats().cards if c.card == failing)
    fault = emu.control.machine_failure(failing, recovery_time=0.02, after_requests=nth)
    out.write(
        f"  ! machine failure armed on card {failing:02x}: at its {ordinal(nth)} request from now, "
        "recovering in 20 ms\n"
    )
    progress = Progress(requests, out)
    for _ in range(requests):
        kind = rng.choices(names, weights)[0]
        if kind.startswith(("ME", "CRT")):
            key = keys[int(kind.split("-")[1])]
            m = rng.randrange(2, key.n - 1)
            data = m.to_bytes(key.size, "big")
            if kind.startswith("ME"):
                fut = client.mod_expo(data, key.e, key.n)
                expect: Any = ("me", pow(m, key.e, key.n), key)
            else:
                fut = client.mod_expo_crt(data, key.p, key.q, key.dp, key.dq, key.qinv)
                expect = ("crt", m, key)
        elif kind == "random":
            fut, expect = client.random_bytes(32), ("random", 32, None)
        elif kind == "counter+1":
            fut, expect = client.counter_increment(1), ("counter", None, None)
        else:
            fut, expect = client.key_store(rng.randrange(16), rng.randbytes(32)), ("none", None, None)
        plan.append((kind, fut, expect))

    undecided = _settle([f for _, f, _ in plan], progress, sim, client)
    # the window: from the first submission to the last reply the workload took off a card (an idle
    # runner may have moved the clock on since, to its next poll)
    ends = [e.dequeued or e.ended or 0.0 for e in emu.execution_log.entries() if e.enqueued >= t_virtual0]
    elapsed_v = max(0.0, max(ends, default=t_virtual0) - t_virtual0)
    progress.show(requests - undecided, f"in {elapsed_v * 1000:.1f} ms of virtual time")
    progress.end()
    if undecided:
        out.write(f"  ! {undecided} requests undecided after {SETTLE_LIMIT:.0f} s\n")

    # outcomes per kind, with every RSA result checked independently
    table: dict[str, Counter[str]] = {k: Counter() for k in names}
    wrong = 0
    for kind, fut, (how, val, key) in plan:
        if not fut.done():
            table[kind]["undecided"] += 1
            continue
        exc = fut.exception()
        if exc is None:
            res = fut.result()
            table[kind]["completed"] += 1
            wrong += not _result_ok(how, val, key, res)
        else:
            table[kind][type(exc).__name__ if isinstance(exc, ApcryptoError) else "error"] += 1
    stats = client.stats()
    cols = ["completed", "BadRequest", "Indeterminate", "DeviceUnavailable", "DeadlineExceeded"]
    cols += sorted({c for t in table.values() for c in t} - set(cols))  # anything else, shown too
    out.write(f"\n  {'kind':<10}" + "".join(f"{c:>18}" for c in cols) + "\n")
    for kind in names:
        out.write(f"  {kind:<10}" + "".join(f"{table[kind][c]:>18}" for c in cols) + "\n")
    counters = stats["counters"]
    fired = emu.control.state(fault) != "pending"
    if fired:
        what = f"machine failure on card {failing:02x} fired"
    else:
        got = next(c.requests for c in emu.stats().cards if c.card == failing) - accepted0
        what = f"machine failure on card {failing:02x} did not fire (the card took only {got} requests)"
    out.write(
        f"\n  {what}: machine-failure replies {counters.get('mf_replies', 0)}, "
        f"re-driven {counters.get('redriven', 0)}, queues recovered {counters.get('recoveries_drained', 0)}, "
        f"results checked: {wrong} wrong\n"
    )

    # utilisation over the workload window, both from the emulator's execution log: engines busy per
    # card (started to ended), and per queue the slots held (NQAP accepted until the reply is taken)
    es = emu.stats()
    if elapsed_v > 0:
        t_end = t_virtual0 + elapsed_v
        held: defaultdict[int, float] = defaultdict(float)  # slot-seconds per queue
        busy: defaultdict[int, float] = defaultdict(float)  # engine-seconds per card
        for e in emu.execution_log.entries():  # clipped to the window: a health probe sent after
            if e.enqueued >= t_virtual0:  # the last reply may still be on a card now
                held[e.qid] += max(0.0, min(t_end, e.dequeued or e.ended or t_end) - e.enqueued)
            if e.started is not None:
                run = min(t_end, e.ended or t_end) - max(t_virtual0, e.started)
                busy[qid_card(e.qid)] += max(0.0, run)
        out.write(
            f"\n  utilisation over {elapsed_v * 1000:.1f} ms of virtual time (engines busy, slots held)\n"
        )
        for c in es.cards:
            util = busy[c.card] / (c.engines * elapsed_v)
            qs = [q for q in es.queues if q.card == c.card and q.usage]
            slots = " ".join(f"{q.domain:04x}:{held[q.qid] / (q.slots * elapsed_v):.0%}" for q in qs)
            mark = "  <- machine failure" if c.card == failing and fired else ""
            out.write(f"  card {c.name} {c.type}  engines {util:6.1%}  slots {slots}{mark}\n")
    else:
        out.write("\n  no request reached a card: no utilisation to show\n")

    client.close()
    rep = audit(client.core.ledger, emu.execution_log.entries())
    emu.close()
    verdict_ok = rep.ok and not rep.indeterminate_never_started and wrong == 0 and not undecided
    out.write(
        f"\n  verdicts vs execution log: lost: {len(rep.lost)}, ran twice: {len(rep.ran_twice)}, "
        f"indeterminate that never started: {len(rep.indeterminate_never_started)}  "
        f"-> {'OK' if verdict_ok else 'FAILED'}\n"
    )
    out.write(f"  ({time.perf_counter() - t_start:.1f} s wall)\n")
    return 0 if verdict_ok else 1
