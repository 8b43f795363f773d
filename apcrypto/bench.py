"""Throughput measurements: the driver against the raw NQAP/DQAP loop and the raw firmware.

DESIGN §7 asks for ratios measured in one run on the same emulator: the driver's throughput over a
raw transport loop that does no bookkeeping at all (fill every queue's slots, drain every reply),
and over the firmware alone for compute-bound RSA.  ``benches/`` runs these under pytest-benchmark;
``apcrypto bench`` prints them.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from apformats import messages as msgs
from apformats.codes import ResponseCode

#: A fixed odd 2048-bit modulus: ME with e = 65537 is the cheap, common public-key operation.
MODULUS_2048 = (1 << 2047) | 0x1D7
EXPONENT = 65537


def workload(n: int, modulus: int = MODULUS_2048) -> list[bytes]:
    """``n`` distinct type 50 ME requests (data 2, 3, ...)."""
    size = (modulus.bit_length() + 7) // 8
    return [msgs.build_mex((i + 2).to_bytes(size, "big"), EXPONENT, modulus) for i in range(n)]


def raw_loop(emu: Any, requests: list[bytes] | int, qids: list[int] | None = None) -> int:
    """Drive ``emu`` directly: keep every queue's slots full, drain every reply.  Returns replies.

    Given a count instead of messages, it encodes the requests itself (as any user of the raw
    transport must; the driver's figure includes encoding too).
    """
    if isinstance(requests, int):
        requests = workload(requests)
    qids = [q for q in (qids or emu.qids()) if emu.tapq(q).hwinfo and emu.tapq(q).hwinfo.accel]
    slots = {q: emu.tapq(q).hwinfo.slots for q in qids}
    held = dict.fromkeys(qids, 0)
    step = getattr(emu.clock, "step", None)
    i = done = 0
    n = len(requests)
    psmid = 1 << 40
    while done < n:
        progressed = False
        for q in qids:
            while i < n and held[q] < slots[q]:
                if emu.nqap(q, psmid + i, requests[i]).status.response_code != ResponseCode.NORMAL:
                    break
                held[q] += 1
                i += 1
                progressed = True
            while held[q]:
                r = emu.dqap(q)
                if r.status.response_code != ResponseCode.NORMAL:
                    break
                held[q] -= 1
                done += 1
                progressed = True
        if not progressed and step is not None:
            step()
    return done


def driver_run(client: Any, n: int, modulus: int = MODULUS_2048) -> int:
    """Submit ``n`` ME requests through the public client and wait for all.  Returns completions."""
    size = (modulus.bit_length() + 7) // 8
    futs = [client.mod_expo((i + 2).to_bytes(size, "big"), EXPONENT, modulus) for i in range(n)]
    # wait for the batch, not future by future: one wake-up instead of one per completion
    concurrent.futures.wait(futs, timeout=120)
    return sum(1 for f in futs if f.result(timeout=0) is not None)


def firmware_loop(requests: list[bytes]) -> int:
    """The firmware alone: what an engine computes, with no queues or driver at all."""
    import random

    import firmware_stubs

    ctx = firmware_stubs.FirmwareContext(domain=0, store=firmware_stubs.DomainStore(), rng=random.Random(0))
    return sum(1 for r in requests if firmware_stubs.execute(r, ctx).ok)


@dataclass
class Rate:
    name: str
    ops: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else float("inf")


def timed(name: str, fn: Callable[[], int]) -> Rate:
    t = time.perf_counter()
    ops = fn()
    return Rate(name, ops, time.perf_counter() - t)


def compare(n: int = 4000, *, profile: str = "fast") -> dict[str, Any]:
    """One run: raw loop, driver (threaded client, in process) and firmware on the same workload."""
    import apcrypto
    from emulator import Emulator

    with Emulator(profile, clock="wall") as emu:
        raw = timed("raw NQAP/DQAP loop", lambda: raw_loop(emu, n))
    with Emulator(profile, clock="wall") as emu, apcrypto.connect("emu:", emulator=emu) as client:
        client.wait_ready()
        drv = timed("apcrypto client", lambda: driver_run(client, n))
    fw = timed("firmware only", lambda: firmware_loop(workload(n)))
    return {
        "rates": [raw, drv, fw],
        "driver_over_raw": drv.per_second / raw.per_second,
        "driver_over_firmware": drv.per_second / fw.per_second,
    }


def raw_transport_loop(
    transport: Any, requests: list[bytes] | int, *, slots: int = 8, timeout: float = 60.0
) -> int:
    """The raw transport, no driver: keep ``slots`` NQAPs per accelerator queue outstanding through
    the Transport ABC, DQAP whenever a status says a reply waits.  Same bytes the driver would send;
    none of its bookkeeping.  Works on every transport (emu:, tcp://, usb://)."""
    from apcrypto.transport.base import Command, Completion
    from apformats.results import Instr

    if isinstance(requests, int):
        requests = workload(requests)
    tags = itertools.count(1)
    qids = []
    probe = {next(tags): q for q in transport.qids()}
    transport.submit([Command(t, Instr.TAPQ, q, flag=True) for t, q in probe.items()])
    deadline = time.monotonic() + timeout
    while probe:
        for ev in transport.poll(0.05):
            if isinstance(ev, Completion) and ev.tag in probe:
                q = probe.pop(ev.tag)
                if ev.result.hwinfo is not None and ev.result.hwinfo.accel:
                    qids.append(q)
        if time.monotonic() > deadline:
            raise TimeoutError("raw loop: TAPQ unanswered")
    kind: dict[int, tuple[int, Instr]] = {}
    held = dict.fromkeys(qids, 0)
    dqap_out = dict.fromkeys(qids, False)
    i = done = 0
    n = len(requests)
    psmid = 1 << 41

    def top_up(batch: list[Any]) -> None:
        nonlocal i
        for q in qids:
            while i < n and held[q] < slots:
                t = next(tags)
                kind[t] = (q, Instr.NQAP)
                batch.append(Command(t, Instr.NQAP, q, psmid + i, requests[i]))
                held[q] += 1
                i += 1

    batch: list[Any] = []
    top_up(batch)
    transport.submit(batch)
    while done < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"raw loop: {n - done} replies missing")
        batch = []
        for ev in transport.poll(0.05):
            if not isinstance(ev, Completion):
                continue
            q, ins = kind.pop(ev.tag)
            st = ev.result.status
            if ins is Instr.DQAP:
                dqap_out[q] = False
                if st.response_code == 0:
                    held[q] -= 1
                    done += 1
            elif st.response_code != 0:
                raise RuntimeError(f"raw loop: NQAP answered {st.rc_name()}")
            if (st.replies_waiting or (ins is Instr.DQAP and st.response_code == 0)) and not dqap_out[q]:
                t = next(tags)
                kind[t] = (q, Instr.DQAP)
                batch.append(Command(t, Instr.DQAP, q))
                dqap_out[q] = True
        top_up(batch)
        if batch:
            transport.submit(batch)
    return done
