"""``apcrypto demo``: a mixed workload on the embedded emulator, with a machine failure mid-run.

It uses only the public surface (``apcrypto.connect("emu:", emulator=...)``) on an emulator whose
clock is virtual, so service times and the card's recovery take no real time and utilisation is
exact.  At the end every verdict is checked against the emulator's execution log.
"""

from __future__ import annotations

import random
import sys
import time
from collections import Counter
from concurrent.futures import Future
from typing import Any, TextIO

import apcrypto
from apcrypto.audit import audit
from apcrypto.errors import ApcryptoError
from apcrypto.testing import RsaKey, make_key


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


def run_demo(*, seed: int = 7, requests: int = 3000, sim: bool = False, out: TextIO = sys.stdout) -> int:
    """Run the demo; returns 0 when every verdict checks out, 1 otherwise.

    By default it goes through the public client (``apcrypto.connect``): a runner thread drives the
    card on a virtual clock while this thread submits, so thread timing varies the details between
    runs.  ``sim=True`` runs the same workload on the simulation runner, single-threaded: the same
    seed then replays the same run exactly.
    """
    from emulator import Emulator, VirtualClock  # the demo builds the emulator it then connects to

    rng = random.Random(seed)
    t_start = time.perf_counter()
    mode = "simulation runner: replays exactly" if sim else "public client, runner thread"
    out.write(f"apcrypto demo  seed={seed}  requests={requests}  ({mode})\n")
    out.write(f"  replay exactly: apcrypto demo --sim --seed {seed} --requests {requests}\n")
    keys = {bits: make_key(bits, rng) for bits in (1024, 2048, 4096)}
    emu = Emulator("default", clock=VirtualClock(), seed=seed)
    client: Any
    if sim:
        from apcrypto.runners.sim import SimClient, SimRunner

        client = SimClient(SimRunner(emu, psmid_base=0xDE40 << 32))
        client.runner.run(emu.clock.now() + 0.05)  # bring-up
    else:
        client = apcrypto.connect("emu:", emulator=emu, config="fast", psmid_base=0xDE40 << 32)
        client.wait_ready(10.0)
    out.write(
        "  " + ", ".join(f"card {c.name} {c.type} ({c.mode}, {c.engines} engines)" for c in emu.stats().cards)
    )
    out.write(f"; {len(client.core.queues)} queues in service\n")
    accel = [c.card for c in emu.stats().cards if c.mode == "accel"]
    cca = [c.card for c in emu.stats().cards if c.mode == "cca"]
    failing = cca[0] if cca else accel[0]
    before = {c.card: c.busy_time for c in emu.stats().cards}
    slot_s0 = {k: v["slot_seconds"] for k, v in client.stats()["queues"].items()}
    t_virtual0 = emu.clock.now()

    # the workload: RSA ME and CRT of several sizes, random bytes, and state-changing requests
    kinds = [("ME-1024", 18), ("ME-2048", 25), ("ME-4096", 4), ("CRT-1024", 12), ("CRT-2048", 14),
             ("CRT-4096", 2), ("random", 5), ("counter+1", 15), ("key-store", 5)]  # fmt: skip
    names, weights = zip(*kinds, strict=True)
    plan: list[tuple[str, Future[Any], Any]] = []
    # a third of the way through that card's share of the work (its kinds are ~25% of the mix)
    nth = max(1, requests * 25 // 100 // max(1, len(cca)) // 3)
    emu.control.machine_failure(failing, recovery_time=0.02, after_requests=nth)
    out.write(
        f"  ! machine failure armed on card {failing:02x}: fires at its {nth}th request, recovers in 20 ms\n"
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

    done = 0
    futures = [f for _, f, _ in plan]
    while done < len(plan):
        done = sum(1 for f in futures if f.done())
        progress.show(done, f"virtual t={min(emu.clock.now() - t_virtual0, 999):.3f}s")
        if done < len(plan):
            nxt = next(f for f in futures if not f.done())  # outcomes arrive in any order
            if sim:  # advance the simulation to the next outcome
                client.settle([nxt])
            else:
                nxt.exception(timeout=30)  # wait for progress, bounded
    progress.end()

    # outcomes per kind, with every RSA result checked independently
    table: dict[str, Counter[str]] = {k: Counter() for k in names}
    wrong = 0
    for kind, fut, (how, val, key) in plan:
        exc = fut.exception()
        if exc is None:
            res = fut.result()
            table[kind]["completed"] += 1
            wrong += not _result_ok(how, val, key, res)
        else:
            table[kind][type(exc).__name__ if isinstance(exc, ApcryptoError) else "error"] += 1
    stats = client.stats()
    # the window ends with the last reply (the idle runner may have jumped the clock on since)
    t_end = max((e.dequeued or e.ended or 0.0) for e in emu.execution_log.entries())
    elapsed_v = t_end - t_virtual0
    cols = ["completed", "BadRequest", "Indeterminate", "DeviceUnavailable", "DeadlineExceeded"]
    out.write(f"\n  {'kind':<10}" + "".join(f"{c:>18}" for c in cols) + "\n")
    for kind in names:
        out.write(f"  {kind:<10}" + "".join(f"{table[kind][c]:>18}" for c in cols) + "\n")
    counters = stats["counters"]
    out.write(
        f"\n  machine-failure replies {counters.get('mf_replies', 0)}, "
        f"re-driven {counters.get('redriven', 0)}, recoveries {counters.get('recoveries_drained', 0)}, "
        f"results checked: {wrong} wrong\n"
    )

    # utilisation: engines per card over the workload window, slots per queue (driver's view)
    es = emu.stats()
    out.write(f"\n  utilisation over {elapsed_v * 1000:.1f} ms of virtual time\n")
    for c in es.cards:
        util = (c.busy_time - before[c.card]) / (c.engines * elapsed_v) if elapsed_v > 0 else 0.0
        qs = [(k, v) for k, v in stats["queues"].items() if k.startswith(c.name + ".")]
        slots = " ".join(
            f"{k[3:]}:{(v['slot_seconds'] - slot_s0[k]) / (v['slots'] * elapsed_v):.0%}" for k, v in qs
        )
        mark = "  <- machine failure" if c.card == failing else ""
        out.write(f"  card {c.name} {c.type}  engines {util:6.1%}  slots {slots}{mark}\n")

    client.close()
    rep = audit(client.core.ledger, emu.execution_log.entries())
    emu.close()
    verdict_ok = rep.ok and not rep.indeterminate_never_started and wrong == 0
    out.write(
        f"\n  verdicts vs execution log: lost: {len(rep.lost)}, ran twice: {len(rep.ran_twice)}, "
        f"indeterminate that never started: {len(rep.indeterminate_never_started)}  "
        f"-> {'OK' if verdict_ok else 'FAILED'}\n"
    )
    out.write(f"  ({time.perf_counter() - t_start:.1f} s wall)\n")
    return 0 if verdict_ok else 1
