"""Throughput measurements: ``apcrypto bench`` and the pieces ``benches/`` times.

``apcrypto bench`` (:func:`run_bench`) is a load generator in the manner of ``openssl speed -multi``,
fio and redis-benchmark: ``--clients`` connections to any URL, each keeping ``--depth`` requests
outstanding (a list of depths is a sweep; depth 1 is the naive one-request-at-a-time driver, the
baseline of DESIGN §7), for ``--requests`` requests or ``--duration`` seconds.  Each point reports
throughput, latency percentiles (submit to outcome, as the caller sees it) and utilisation per APQN
as the card measures it (engine time used over engine time available, on the card's clock).

The driver-over-raw-loop ratio (DESIGN §7 "overhead") compares the driver with a raw NQAP/DQAP loop
that keeps every slot of the same APQNs full through the same transport with no bookkeeping.  The two
are comparable only where both keep the same slots full: RSA operations (the raw loop speaks type 50)
at a depth x clients of at least the slots of those APQNs.  Elsewhere it is not reported.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import threading
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
    transport must; the driver's figure includes encoding too).  It busy-polls the emulator from the
    calling thread, so on a wall clock it competes with the emulator's own thread for the GIL: the
    benches use it on a virtual clock; ``apcrypto bench`` uses :func:`raw_transport_loop` instead.
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


def naive_run(client: Any, n: int, modulus: int = MODULUS_2048) -> int:
    """The naive baseline (DESIGN §7): one request at a time, each awaited before the next is sent, so
    every engine but one idles while the host thinks.  Returns completions."""
    size = (modulus.bit_length() + 7) // 8
    done = 0
    for i in range(n):
        if client.mod_expo((i + 2).to_bytes(size, "big"), EXPONENT, modulus).result(timeout=60) is not None:
            done += 1
    return done


def firmware_loop(requests: list[bytes], compute: str = "real") -> int:
    """The firmware alone: what an engine computes, with no queues or driver at all.  ``requests`` are
    built by the caller (time only the execution); ``compute`` as the profile's ``timing.compute``."""
    import random

    import firmware_stubs

    ctx = firmware_stubs.FirmwareContext(
        domain=0, store=firmware_stubs.DomainStore(), rng=random.Random(0), compute=compute
    )
    return sum(1 for r in requests if firmware_stubs.execute(r, ctx).ok)


def raw_transport_loop(
    transport: Any,
    requests: list[bytes] | int,
    *,
    slots: int = 8,
    timeout: float = 60.0,
    poll_interval: float = 0.00025,
    interrupts: bool = False,
) -> int:
    """The raw transport, no driver: keep ``slots`` NQAPs per accelerator queue outstanding through
    the Transport ABC, DQAP whenever a status or (with ``interrupts``, where the transport supports
    them) an INTERRUPT says a reply waits.  Same bytes the driver would send; none of its bookkeeping.
    Works on every transport (emu:, tcp://, usb://).  Compare it with a driver using the same
    interrupt setting: an interrupt costs a frame per reply on ``tcp://``."""
    from apcrypto.transport.base import Command, Completion, Interrupt
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
    if interrupts and transport.supports_interrupts:
        arming = {next(tags): q for q in qids}
        transport.submit([Command(t, Instr.AQIC, q, flag=True) for t, q in arming.items()])
        while arming:
            for ev in transport.poll(0.05):
                armed = isinstance(ev, Completion) and arming.pop(ev.tag, None) is not None
                if armed and ev.result.status.response_code != 0:
                    raise RuntimeError(f"raw loop: AQIC answered {ev.result.status.rc_name()}")
            if time.monotonic() > deadline:
                raise TimeoutError("raw loop: AQIC unanswered")
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
        polled = transport.poll(poll_interval)
        events = [ev for ev in polled if isinstance(ev, Completion)]
        for ev in polled:  # an INTERRUPT says a reply waits on its queue: fetch it
            if isinstance(ev, Interrupt) and held.get(ev.qid) and not dqap_out[ev.qid]:
                t = next(tags)
                kind[t] = (ev.qid, Instr.DQAP)
                batch.append(Command(t, Instr.DQAP, ev.qid))
                dqap_out[ev.qid] = True
        irq_fetch = bool(batch)
        if not polled:
            # nothing said a reply waits: poll every queue that holds work with DQAP, at the driver's
            # own polling rate (no interrupts here), so slow engines cannot stall the loop
            for q in qids:
                if held[q] and not dqap_out[q]:
                    t = next(tags)
                    kind[t] = (q, Instr.DQAP)
                    batch.append(Command(t, Instr.DQAP, q))
                    dqap_out[q] = True
        progressed = False
        for ev in events:
            q, ins = kind.pop(ev.tag)
            st = ev.result.status
            if ins is Instr.DQAP:
                dqap_out[q] = False
                if st.response_code == 0:
                    held[q] -= 1
                    done += 1
                    progressed = True
            elif st.response_code != 0:
                raise RuntimeError(f"raw loop: NQAP answered {st.rc_name()}")
            if (st.replies_waiting or (ins is Instr.DQAP and st.response_code == 0)) and not dqap_out[q]:
                t = next(tags)
                kind[t] = (q, Instr.DQAP)
                batch.append(Command(t, Instr.DQAP, q))
                dqap_out[q] = True
        if not progressed and not irq_fetch:
            time.sleep(poll_interval)  # an empty round: wait as long as the driver's poll would
        top_up(batch)
        if batch:
            transport.submit(batch)
    return done


# -- apcrypto bench --------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpSpec:
    """One operation ``--op`` can name: how to call it, and its card function class."""

    name: str
    function: str  # the card's name for it ("MEX_2K", "CPRB:CI"), as the execution log records it
    raw: bool  # the raw NQAP/DQAP loop can drive it (type 50 RSA)
    call: Callable[[Any, int], Any]


def _rsa(bits: int) -> Any:
    from apcrypto.testing import seeded_key

    return seeded_key(bits, "bench")


def _me(bits: int) -> Callable[[Any, int], Any]:
    def call(client: Any, i: int) -> Any:
        key = _rsa(bits)
        return client.mod_expo((i % 1000 + 2).to_bytes(key.size, "big"), key.e, key.n)

    return call


def _crt(bits: int) -> Callable[[Any, int], Any]:
    def call(client: Any, i: int) -> Any:
        k = _rsa(bits)
        return client.mod_expo_crt((i % 1000 + 2).to_bytes(k.size, "big"), k.p, k.q, k.dp, k.dq, k.qinv)

    return call


#: ``--op`` names: RSA ME and CRT of each size the cards take, and the CPRB functions.
OPS: dict[str, OpSpec] = {
    **{
        f"me-{b // 1024}k": OpSpec(f"me-{b // 1024}k", f"MEX_{b // 1024}K", True, _me(b))
        for b in (1024, 2048, 4096)
    },
    **{
        f"crt-{b // 1024}k": OpSpec(f"crt-{b // 1024}k", f"CRT_{b // 1024}K", True, _crt(b))
        for b in (1024, 2048, 4096)
    },
    "rng": OpSpec("rng", "CPRB:RL", False, lambda c, i: c.random_bytes(32)),
    "counter": OpSpec("counter", "CPRB:CI", False, lambda c, i: c.counter_increment(1)),
    "key-store": OpSpec("key-store", "CPRB:KS", False, lambda c, i: c.key_store(i % 16, bytes(32))),
    "key-read": OpSpec("key-read", "CPRB:KR", False, lambda c, i: c.key_read(i % 16)),
}


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50/p90/p99/max/mean of ``samples`` in milliseconds (nearest-rank; zeros when empty)."""
    if not samples:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0, "mean": 0.0}
    xs = sorted(samples)

    def rank(p: float) -> float:
        return xs[min(len(xs) - 1, max(0, int(-(-p * len(xs) // 100)) - 1))] * 1e3

    return {
        "p50": rank(50),
        "p90": rank(90),
        "p99": rank(99),
        "max": xs[-1] * 1e3,
        "mean": sum(xs) / len(xs) * 1e3,
    }


class _Load:
    """Shared by the client threads of one point: the request budget and what came back."""

    def __init__(self, requests: int | None, stop_at: float | None) -> None:
        self.requests = requests
        self.stop_at = stop_at
        self.lock = threading.Lock()
        self.issued = 0
        self.done = 0
        self.latencies: list[float] = []
        self.errors: dict[str, int] = {}

    def take(self) -> int | None:
        """The next request's index, or None when the budget or the time is spent."""
        with self.lock:
            if self.requests is not None and self.issued >= self.requests:
                return None
            if self.stop_at is not None and time.perf_counter() >= self.stop_at:
                return None
            self.issued += 1
            return self.issued - 1

    def finished(self, started: float, fut: Any) -> None:
        elapsed = time.perf_counter() - started
        exc = fut.exception()
        with self.lock:
            self.done += 1
            if exc is None:
                self.latencies.append(elapsed)
            else:
                name = type(exc).__name__
                self.errors[name] = self.errors.get(name, 0) + 1


def _drive(client: Any, spec: OpSpec, depth: int, load: _Load, timeout: float) -> None:
    """Keep ``depth`` requests of ``spec`` outstanding on ``client`` until the load says stop."""
    window = threading.Semaphore(depth)
    deadline = time.perf_counter() + timeout
    while True:
        if not window.acquire(timeout=max(0.0, deadline - time.perf_counter())):
            raise TimeoutError(f"bench: no reply within {timeout:.0f} s")
        i = load.take()
        if i is None:
            window.release()
            break
        started = time.perf_counter()
        fut = spec.call(client, i)

        def done(f: Any, started: float = started) -> None:
            load.finished(started, f)
            window.release()

        fut.add_done_callback(done)
    for _ in range(depth):  # the last replies
        if not window.acquire(timeout=max(0.0, deadline - time.perf_counter())):
            raise TimeoutError(f"bench: no reply within {timeout:.0f} s")


@dataclass
class Point:
    """One measured point: an operation at one depth with some clients."""

    op: str
    depth: int
    clients: int
    completed: int
    errors: dict[str, int]
    seconds: float
    latency_ms: dict[str, float]
    utilisation: dict[str, Any]  # {"source": "card" | "none", "cards": {...}, "apqns": {...}}

    @property
    def ops_per_s(self) -> float:
        return self.completed / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "depth": self.depth,
            "clients": self.clients,
            "completed": self.completed,
            "errors": self.errors,
            "seconds": self.seconds,
            "ops_per_s": self.ops_per_s,
            "latency_ms": self.latency_ms,
            "utilisation": self.utilisation,
        }


def _utilisation(report: dict[str, Any] | None) -> dict[str, Any]:
    if report is None:
        return {"source": "none", "cards": {}, "apqns": {}}
    apqns = {q: sum(float(r["utilisation"]) for r in fns.values()) for q, fns in report["queues"].items()}
    # the cards that served the operation (an ME run leaves the coprocessors idle: not a 0 to average)
    cards = {name: c["utilisation"] for name, c in report["cards"].items() if c["ops"]}
    return {"source": "card", "window_s": report["seconds"], "cards": cards, "apqns": apqns}


def run_point(
    url: str,
    spec: OpSpec,
    depth: int,
    clients: int = 1,
    *,
    requests: int | None = None,
    duration: float | None = None,
    control: str | None = None,
    options: dict[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
    timeout: float = 120.0,
) -> Point:
    """Measure one point.  ``emu:PROFILE`` builds one wall-clock emulator the clients share (so the
    card side sees them all); other URLs connect each client on its own."""
    import apcrypto
    from apcrypto.cardstats import CardSide, StatsSampler

    if depth < 1 or clients < 1:
        raise ValueError("depth and clients must be >= 1")
    if (requests is None) == (duration is None):
        raise ValueError("give exactly one of requests and duration")
    opts = {"config": "fast", **(options or {})}
    emu = None
    if url.startswith("emu:") and "," not in url and "emulator" not in opts:  # one embedded emulator
        from emulator import Emulator

        emu = Emulator(url.partition(":")[2] or "default", clock="wall")
        opts["emulator"] = emu
    conns: list[Any] = []
    side = None
    try:
        shares = _domain_shares(url, opts, clients)
        for share in shares:
            conns.append(apcrypto.connect(url, **opts, **({"domains": share} if share is not None else {})))
        for c in conns:
            if not c.wait_ready(30):
                raise TimeoutError(f"bench: {url} not ready in 30 s")
        side = CardSide.for_client(conns[0], control)
        sampler = StatsSampler(side) if side is not None else None
        if sampler is not None:
            sampler.sample()
        t0 = time.perf_counter()
        load = _Load(requests, None if duration is None else t0 + duration)
        errors: list[BaseException] = []

        def body(c: Any) -> None:
            try:
                _drive(c, spec, depth, load, timeout)
            except BaseException as exc:  # reported to the caller below
                errors.append(exc)

        threads = [threading.Thread(target=body, args=(c,), name=f"bench-{i}") for i, c in enumerate(conns)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(0.1)
            if progress is not None:
                progress(load.done)
        seconds = time.perf_counter() - t0
        if progress is not None:
            progress(load.done)
        if errors:
            raise errors[0]
        report = sampler.sample() if sampler is not None else None
        return Point(
            spec.name,
            depth,
            clients,
            len(load.latencies),
            dict(load.errors),
            seconds,
            percentiles(load.latencies),
            _utilisation(report),
        )
    finally:
        for c in conns:
            c.close()
        if side is not None:
            side.close()
        if emu is not None:
            emu.close()


def _domain_shares(url: str, opts: dict[str, Any], clients: int) -> list[list[int] | None]:
    """Each client its own domains: two drivers on one APQN would take each other's replies (DQAP
    hands out whichever reply is oldest), so ``--clients N`` splits the target's domains N ways."""
    if clients == 1:
        return [None]
    from apcrypto.transport import open_transport

    transport = open_transport(
        url, **{k: v for k, v in opts.items() if k in ("emulator", "domains", "timeout")}
    )
    try:
        domains = sorted({q & 0xFF for q in transport.qids()})
    finally:
        transport.close()
    if len(domains) < clients:
        raise ValueError(
            f"--clients {clients}: the target offers {len(domains)} domain(s) and each client needs its own "
            "(two drivers on one APQN would take each other's replies)"
        )
    return [domains[i::clients] for i in range(clients)]


def raw_point(
    url: str, spec: OpSpec, requests: int, *, options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The raw NQAP/DQAP loop on the same transport: every slot of every accelerator APQN kept full,
    no driver.  Returns ``{"ops_per_s", "slots", "apqns"}``."""
    from apcrypto.transport import open_transport

    if not spec.raw:
        raise ValueError(f"the raw loop drives RSA operations only, not {spec.name}")
    opts = dict(options or {})
    emu = None
    if url.startswith("emu:") and "," not in url and "emulator" not in opts:  # one embedded emulator
        from emulator import Emulator

        emu = Emulator(url.partition(":")[2] or "default", clock="wall")
        opts["emulator"] = emu
    transport_opts = {k: v for k, v in opts.items() if k not in ("config",)}
    msgs = [_request_bytes(spec, i) for i in range(requests)]
    transport = open_transport(url, **transport_opts)
    try:
        slots = _accel_slots(transport)
        t = time.perf_counter()
        done = raw_transport_loop(transport, msgs, slots=max(slots.values()) if slots else 8)
        seconds = time.perf_counter() - t
    finally:
        transport.close()
        if emu is not None:
            emu.close()
    return {
        "ops_per_s": done / seconds if seconds > 0 else 0.0,
        "slots": sum(slots.values()),
        "apqns": len(slots),
    }


def _request_bytes(spec: OpSpec, i: int) -> bytes:
    bits = int(spec.function.split("_")[1][:-1]) * 1024
    k = _rsa(bits)
    data = (i % 1000 + 2).to_bytes(k.size, "big")
    if spec.function.startswith("MEX"):
        return msgs.build_mex(data, k.e, k.n)
    return msgs.build_crt(data, k.p, k.q, k.dp, k.dq, k.qinv)


def _accel_slots(transport: Any, timeout: float = 30.0) -> dict[int, int]:
    """Slots of each accelerator APQN behind ``transport`` (TAPQ)."""
    from apcrypto.transport.base import Command, Completion
    from apformats.results import Instr

    probe = {i + 1: q for i, q in enumerate(transport.qids())}
    transport.submit([Command(t, Instr.TAPQ, q, flag=True) for t, q in probe.items()])
    out: dict[int, int] = {}
    deadline = time.monotonic() + timeout
    while probe:
        for ev in transport.poll(0.05):
            if isinstance(ev, Completion) and ev.tag in probe:
                q = probe.pop(ev.tag)
                hw = ev.result.hwinfo
                if hw is not None and hw.accel:
                    out[q] = hw.slots
        if time.monotonic() > deadline:
            raise TimeoutError("bench: TAPQ unanswered")
    return out


def run_bench(
    url: str,
    ops: list[str],
    depths: list[int],
    clients: int = 1,
    *,
    requests: int | None = None,
    duration: float | None = None,
    control: str | None = None,
    raw: bool = True,
    progress: bool = False,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Every (op, depth) point, plus the raw-loop comparison where it is comparable (JSON data)."""
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        raise ValueError(f"unknown --op {unknown}; known: {', '.join(OPS)}")
    if any(d < 1 for d in depths) or clients < 1:
        raise ValueError("--depth and --clients must be >= 1")
    points: list[Point] = []
    raws: dict[str, Any] = {}
    bar = _progress(progress)
    try:
        for op in ops:
            spec = OPS[op]
            for depth in depths:
                task = bar.add(f"{op} depth {depth} x {clients}", requests) if bar else None
                tick = (lambda n, task=task: bar.update(task, n)) if bar else None
                points.append(
                    run_point(
                        url,
                        spec,
                        depth,
                        clients,
                        requests=requests,
                        duration=duration,
                        control=control,
                        options=options,
                        progress=tick,
                    )
                )
            if raw and spec.raw:
                n = requests if requests is not None else max(p.completed for p in points if p.op == op)
                raws[op] = raw_point(url, spec, max(n, 1), options=options)
    finally:
        if bar:
            bar.close()
    comparisons = []
    for p in points:
        r = raws.get(p.op)
        if r is None:
            continue
        comparable = p.depth * p.clients >= r["slots"]
        comparisons.append(
            {
                "op": p.op,
                "depth": p.depth,
                "clients": p.clients,
                "driver_ops_per_s": p.ops_per_s,
                "raw_ops_per_s": r["ops_per_s"],
                "comparable": comparable,
                "driver_over_raw": p.ops_per_s / r["ops_per_s"] if comparable and r["ops_per_s"] else None,
            }
        )
    return {
        "url": url,
        "clients": clients,
        "requests": requests,
        "duration": duration,
        "points": [p.as_dict() for p in points],
        "raw": raws,
        "comparisons": comparisons,
    }


class _Bar:
    """A rich progress bar, one task per point (rich is the ``bench`` extra)."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._p = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            transient=False,
        )
        self._p.start()

    def add(self, label: str, total: int | None) -> Any:
        return self._p.add_task(label, total=total)

    def update(self, task: Any, done: int) -> None:
        self._p.update(task, completed=done)

    def close(self) -> None:
        self._p.stop()


def _progress(wanted: bool) -> _Bar | None:
    if not wanted:
        return None
    try:
        return _Bar()
    except ImportError:
        return None


def render_table(result: dict[str, Any]) -> str:
    """The human summary: one row per point, utilisation per APQN, the raw comparison explained."""
    lines = [
        f"{'OP':<9} {'DEPTH':>5} {'CLI':>3} {'OPS':>7} {'ERR':>5} {'OPS/S':>9} "
        f"{'P50_MS':>8} {'P90_MS':>8} {'P99_MS':>8} {'MAX_MS':>8} {'UTIL%':>6}"
    ]
    for p in result["points"]:
        u = p["utilisation"]
        util = (sum(u["cards"].values()) / len(u["cards"]) * 100) if u["cards"] else float("nan")
        lat = p["latency_ms"]
        errs = sum(p["errors"].values())
        lines.append(
            f"{p['op']:<9} {p['depth']:>5} {p['clients']:>3} {p['completed']:>7} {errs:>5} "
            + f"{p['ops_per_s']:>9.0f} "
            + " ".join(f"{lat[k]:>8.2f}" for k in ("p50", "p90", "p99", "max"))
            + f" {util:>6.1f}"
        )
    lines.append("")
    lines.append(
        "OPS/S: completed requests / wall seconds.  P50..MAX: submit-to-outcome latency per request."
    )
    lines.append("UTIL%: engine time used / engine time available as the cards measure it, mean over the")
    lines.append("       cards that served the operation; per APQN below (its share of its card's engines).")
    for p in result["points"]:
        u = p["utilisation"]
        if u["apqns"]:
            busy = ", ".join(f"{q} {v * 100:.1f}%" for q, v in sorted(u["apqns"].items()) if v > 0)
            lines.append(f"  {p['op']} depth {p['depth']}: per APQN {busy or '(idle)'}")
        elif u["source"] == "none":
            lines.append(f"  {p['op']} depth {p['depth']}: no card-side view (give --control for tcp://)")
    for op, r in result["raw"].items():
        lines.append(
            f"raw NQAP/DQAP loop, {op}: {r['ops_per_s']:.0f} ops/s -- the same transport, every slot of "
            f"the {r['apqns']} accelerator APQNs kept full ({r['slots']} slots), no driver"
        )
    for c in result["comparisons"]:
        if c["comparable"]:
            lines.append(
                f"driver / raw loop {c['driver_over_raw']:.2f} ({c['op']} at depth {c['depth']} x "
                f"{c['clients']}: driver ops/s over raw-loop ops/s; 1.0 = no driver cost)"
            )
        else:
            lines.append(
                f"driver / raw loop not comparable for {c['op']} at depth {c['depth']} x {c['clients']}: "
                f"fewer requests outstanding than the {result['raw'][c['op']]['slots']} slots "
                "the raw loop fills"
            )
    depth1 = [p for p in result["points"] if p["depth"] == 1]
    for base in depth1:
        for p in result["points"]:
            if p["op"] == base["op"] and p["depth"] > 1 and base["ops_per_s"] > 0:
                lines.append(
                    f"{p['op']} depth {p['depth']} over depth 1 (the naive one-at-a-time driver): "
                    f"{p['ops_per_s'] / base['ops_per_s']:.2f}x"
                )
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> None:
    """Throughput and p50/p99 latency against depth, one line per op (matplotlib: ``bench`` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for op in dict.fromkeys(p["op"] for p in result["points"]):
        pts = sorted((p for p in result["points"] if p["op"] == op), key=lambda p: p["depth"])
        depths = [p["depth"] for p in pts]
        ax1.plot(depths, [p["ops_per_s"] for p in pts], marker="o", label=op)
        ax2.plot(depths, [p["latency_ms"]["p50"] for p in pts], marker="o", label=f"{op} p50")
        ax2.plot(depths, [p["latency_ms"]["p99"] for p in pts], marker="x", linestyle="--", label=f"{op} p99")
    for ax, title, unit in ((ax1, "throughput", "ops/s"), (ax2, "latency", "ms")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("depth (requests outstanding per client; 1 = naive baseline)")
        ax.set_ylabel(unit)
        ax.set_title(f"{title} -- {result['url']}, {result['clients']} client(s)")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
