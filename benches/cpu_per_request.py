"""CPU microseconds per request of the client's pieces: a script for A/B runs, not a pytest bench.

Wall-clock rates move with whatever else the machine runs; ``time.process_time`` (this process's
CPU) moves much less, so this measures CPU per request, in rounds, and prints medians:

* ``core``  -- :class:`~apcrypto.core.driver.DriverCore` alone against a scripted *instant card*
  (every instruction answered at once, in the batch it came in; NQAP status says a reply is
  waiting, DQAP hands it back).  Requests are built before the timed part.  This is the core's
  bookkeeping per request: ledger, dispatcher, queue machine, outbox, no runner, no I/O.
* ``build`` -- building one request object per operation (``ModExpo`` with the same key every
  time, as a server signing with one key does; ``ModExpoCrt``; ``RandomBytes``).
* ``inproc`` -- the threaded client over ``emu:`` (``fast``: real math, ``overhead``: echo math):
  process CPU per request (client and emulator share the process) and the wall rate beside the
  raw NQAP/DQAP loop's, as ``benches/bench_throughput.py`` measures it.

It uses only names that exist on ``main`` too, so the same file runs against either tree: run it
with a tree's own venv from that tree's directory (``cd TREE && .venv/bin/python
PATH/TO/cpu_per_request.py core``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from apcrypto.core.actions import ArmTimer, CancelTimer, Execute, Resolve
from apcrypto.core.config import DriverConfig
from apcrypto.core.driver import DriverCore
from apcrypto.core.events import Completion
from apcrypto.requests import ModExpo, ModExpoCrt, RandomBytes
from apformats.codes import NO_PENDING_REPLY, ResponseCode
from apformats.messages import build_type80
from apformats.results import ApResult, Instr, qid_of
from apformats.status import HwInfo, QueueStatus

MODULUS = (1 << 2047) | 0x1D7
E = 65537
SIZE = 256
HW = HwInfo(at=14, nd=85, ml=3, qd=7, accel=True, mex4k=True, crt4k=True, class_=0x80)
OK_IRQ = QueueStatus(ResponseCode.NORMAL, irq_enabled=True)
OK_MORE = QueueStatus(ResponseCode.NORMAL, replies_waiting=True, irq_enabled=True)
EMPTY = QueueStatus(NO_PENDING_REPLY, queue_empty=True, irq_enabled=True)
REPLY = build_type80(bytes(SIZE))


class InstantCard:
    """Answers every command at once; holds accepted psmids per queue until a DQAP takes them."""

    def __init__(self) -> None:
        self.held: dict[int, list[int]] = {}

    def answer(self, cmds: tuple[Any, ...]) -> list[Completion]:
        out = []
        for c in cmds:
            instr = c.instr
            if instr is Instr.NQAP:
                self.held.setdefault(c.qid, []).append(c.psmid)
                out.append(Completion(c.tag, ApResult(OK_MORE)))
            elif instr is Instr.DQAP:
                held = self.held.get(c.qid)
                if held:
                    psmid = held.pop(0)
                    st = OK_MORE if held else OK_IRQ
                    out.append(Completion(c.tag, ApResult(st, psmid=psmid, reply=REPLY)))
                else:
                    out.append(Completion(c.tag, ApResult(EMPTY)))
            elif instr is Instr.TAPQ:
                out.append(Completion(c.tag, ApResult(OK_IRQ, hwinfo=HW)))
            else:  # RAPQ, ZAPQ, AQIC
                out.append(Completion(c.tag, ApResult(OK_IRQ)))
        return out


def core_round(n: int, queues: int = 16) -> tuple[float, int]:
    """One round: bring ``queues`` queues up, then submit ``n`` requests at once and run the card
    until all are resolved.  Returns (CPU seconds of the submit-and-drain part, resolved count)."""
    core = DriverCore(DriverConfig(health_probe=False), supports_interrupts=True)
    card = InstantCard()
    pending: list[list[Any]] = []
    now = 0.0
    for i in range(queues):
        pending.append(core.add_queue(qid_of(i, 0), now))
    done = 0

    def drain() -> None:
        nonlocal done
        while pending:
            actions = pending.pop()
            for a in actions:
                t = type(a)
                if t is Execute:
                    pending.append(core.handle(card.answer(a.commands), now))
                elif t is Resolve:
                    done += 1
                elif t is ArmTimer or t is CancelTimer:
                    pass

    for _ in range(20):  # bring-up: fire the low polls until every queue is in service
        drain()
        if core.ready():
            break
        now += 0.05
        for key, at in list(core.out.armed.items()):
            if at <= now:
                pending.append(core.on_timer(key, now))
    assert core.ready() and all(q.state.in_service for q in core.queues.values())
    reqs = [ModExpo((i + 2).to_bytes(SIZE, "big"), E, MODULUS) for i in range(n)]
    done = 0
    t0 = time.process_time()
    for r in reqs:
        _rid, actions = core.submit(r, now=now)
        pending.append(actions)
    drain()
    cpu = time.process_time() - t0
    return cpu, done


def run_core(rounds: int, n: int) -> list[float]:
    core_round(2000)  # warm-up
    res = []
    for _ in range(rounds):
        cpu, done = core_round(n)
        assert done == n, (done, n)
        res.append(cpu / n * 1e6)
    return res


def run_build(rounds: int, n: int) -> dict[str, list[float]]:
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=E, key_size=2048)
    nums = key.private_numbers()
    p, q, dp, dq, qi = nums.p, nums.q, nums.dmp1, nums.dmq1, nums.iqmp
    datas = [(i + 2).to_bytes(SIZE, "big") for i in range(n)]
    out: dict[str, list[float]] = {"ModExpo": [], "ModExpoCrt": [], "RandomBytes": []}
    for _ in range(rounds):
        t0 = time.process_time()
        for d in datas:
            ModExpo(d, E, MODULUS)
        out["ModExpo"].append((time.process_time() - t0) / n * 1e6)
        t0 = time.process_time()
        for d in datas:
            ModExpoCrt(d, p, q, dp, dq, qi)
        out["ModExpoCrt"].append((time.process_time() - t0) / n * 1e6)
        t0 = time.process_time()
        for _d in datas:
            RandomBytes(32).message(0)
        out["RandomBytes"].append((time.process_time() - t0) / n * 1e6)
    return out


def run_inproc(profile: str, rounds: int, n: int) -> dict[str, list[float]]:
    import apcrypto
    from apcrypto.bench import driver_run, raw_loop
    from emulator import Emulator, load_profile

    opts = {"health_probe": False} if load_profile(profile).timing.compute == "echo" else {}
    out: dict[str, list[float]] = {"cpu_us": [], "driver_ops": [], "raw_ops": [], "ratio": []}
    emu = Emulator(profile, clock="wall")
    raw_emu = Emulator(profile, clock="wall")
    try:
        with apcrypto.connect("emu:", emulator=emu, **opts) as client:
            assert client.wait_ready(10)
            driver_run(client, n)
            raw_loop(raw_emu, n)
            for _ in range(rounds):
                c0, t0 = time.process_time(), time.perf_counter()
                assert driver_run(client, n) == n
                c1, t1 = time.process_time(), time.perf_counter()
                assert raw_loop(raw_emu, n) == n
                t2 = time.perf_counter()
                out["cpu_us"].append((c1 - c0) / n * 1e6)
                out["driver_ops"].append(n / (t1 - t0))
                out["raw_ops"].append(n / (t2 - t1))
                out["ratio"].append((n / (t1 - t0)) / (n / (t2 - t1)))
    finally:
        emu.close()
        raw_emu.close()
    return out


def _show(name: str, xs: list[float]) -> None:
    print(f"{name:28s} median {statistics.median(xs):10.2f}   min {min(xs):10.2f}   n={len(xs)}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["core", "build", "inproc"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("-n", type=int, default=0)
    ap.add_argument("--profile", default="fast")
    a = ap.parse_args()
    if a.what == "core":
        _show("core us/request", run_core(a.rounds, a.n or 20_000))
    elif a.what == "build":
        for k, v in run_build(a.rounds, a.n or 5_000).items():
            _show(f"build {k} us", v)
    else:
        for k, v in run_inproc(a.profile, a.rounds, a.n or 2_000).items():
            _show(f"{a.profile} {k}", v)


if __name__ == "__main__":
    main()
