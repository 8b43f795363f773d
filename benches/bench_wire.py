"""``tcp://`` against its ceilings, each measured in the same run: a server in its own process, the
driver in this one.

* **Throughput.**  The driver keeps W requests in flight, W = its accelerator queues x their slots
  (every APQN of the server, ``--default-grant all``), on the ``overhead`` profile: zero service
  time and echo math, so neither the server's engines nor gmpy2 are the limit and the figure is the
  software's.  The ceiling is a raw pyzmq DEALER -> ROUTER echo with W in flight, Python at both ends
  (the echo server in its own process), sending a frame the size of the driver's NQAP COMMAND and
  answering one the size of the RESULT that carries its reply: one round trip per request, no
  bookkeeping at all.  Medians of 3 rounds each.  Beside it, the CPU time each process spends per
  request (client: this process; server: its ``/proc`` counters), which other load on the machine
  does not move as much as it moves ops/s.
* **Latency at depth 1.**  p50 of one ME-2048 at a time through the driver against the p50 pyzmq
  round trip of the same two frames; beside it the CPU time each side spends per request then
  (every thread wakes for every request: the thread switches show here).
* **Wall-clock engine utilisation with a backlog, default profile** (real RSA, MEX_2K 0.4 ms, 8
  accelerator engines: a 20,000/s ceiling): the server in its own process over ``tcp://``, and the
  same in process (``emu:``) beside it.  Two figures each: throughput over the ceiling, and the
  cards' own busy engine time over the engine time available (the control plane's ``stats``).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zmq

import apcrypto
from apcrypto.bench import EXPONENT, MODULUS_2048, driver_run, workload
from apformats.frames import encode_command, encode_result
from apformats.messages import build_type80
from apformats.results import ApResult, Instr
from apformats.status import QueueStatus
from emulator import Emulator
from emulator.control_client import ControlClient

N = 3000
ROUNDS = 3
UTIL_N = 5000  # the utilisation bench: requests per round, rounds (see _utilisation_run)
UTIL_ROUNDS = 5
DEPTH1 = 600
CEILING_DEFAULT = 8 / 0.4e-3  # 8 accelerator engines x MEX_2K 0.4 ms

ECHO_SERVER = r"""
import sys, zmq
ctx = zmq.Context(); s = ctx.socket(zmq.ROUTER); port = s.bind_to_random_port("tcp://127.0.0.1")
print(port, flush=True)
reply = bytes(int(sys.argv[1]))
while True:
    ident, msg = s.recv_multipart()
    if msg == b"stop":
        break
    s.send_multipart([ident, reply])
"""


def _frame_sizes() -> tuple[int, int]:
    """The driver's NQAP COMMAND for ME-2048 and the RESULT that brings its type 80 reply."""
    request = encode_command(1, Instr.NQAP, 0, 1 << 40, workload(1)[0])
    reply = encode_result(1, ApResult(QueueStatus(), 1 << 40, build_type80(bytes(256))))
    return len(request), len(reply)


class Echo:
    """The raw pyzmq ceiling: a Python ROUTER echo in its own process, a DEALER here."""

    def __init__(self) -> None:
        self.request, self.reply = _frame_sizes()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ECHO_SERVER, str(self.reply)], stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        port = int(self.proc.stdout.readline())
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.rcvtimeo = 10_000  # a dead echo server fails the bench instead of hanging it
        self.sock.connect(f"tcp://127.0.0.1:{port}")
        self.msg = bytes(self.request)

    def pipelined(self, n: int, window: int) -> float:
        """ops/s of ``n`` round trips with ``window`` in flight."""
        send, recv, msg = self.sock.send, self.sock.recv, self.msg
        t = time.perf_counter()
        sent = got = 0
        while got < n:
            while sent < n and sent - got < window:
                send(msg)
                sent += 1
            recv()
            got += 1
        return n / (time.perf_counter() - t)

    def round_trips(self, n: int) -> list[float]:
        out = []
        for _ in range(n):
            t = time.perf_counter()
            self.sock.send(self.msg)
            self.sock.recv()
            out.append(time.perf_counter() - t)
        return out

    def close(self) -> None:
        try:
            self.sock.send(b"stop")
            self.proc.wait(10)
        finally:
            self.sock.close(linger=0)
            self.ctx.term()
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
            if self.proc.stdout is not None:
                self.proc.stdout.close()


@pytest.fixture(scope="module")
def echo() -> Iterator[Echo]:
    e = Echo()
    try:
        e.pipelined(2000, 64)  # warm up
        yield e
    finally:
        e.close()


@pytest.fixture(scope="module")
def overhead_server(server_process: Any) -> Iterator[tuple[Any, dict[str, str]]]:
    start, stop = server_process
    proc, ready = start("overhead")
    try:
        yield proc, ready
    finally:
        stop(proc)


def _proc_cpu(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` (None where /proc does not say)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _window(client: apcrypto.Client) -> int:
    """Requests the driver keeps in flight: its accelerator queues' slots."""
    return sum(q["slots"] for q in client.stats()["queues"].values() if q["mode"] == "accel")


def test_tcp_driver_over_pyzmq_echo(timed, record_ratio, overhead_server, echo: Echo) -> None:
    proc, ready = overhead_server
    with apcrypto.connect(ready["data"], health_probe=False) as client:  # echo math fails the probe
        assert client.wait_ready(10)
        window = _window(client)
        driver_run(client, 500)
        c0, s0 = time.process_time(), _proc_cpu(proc.pid)
        ops, median = timed(driver_run, client, N, rounds=ROUNDS, warmup_rounds=0)
        c1, s1 = time.process_time(), _proc_cpu(proc.pid)
    assert ops == N
    driver = N / median
    raw = statistics.median(echo.pipelined(N * 4, window) for _ in range(ROUNDS))
    record_ratio(
        f"tcp:// driver / raw pyzmq echo, same frames, window {window}, overhead profile (no engine limit,"
        f" no RSA), medians  ({driver:,.0f} vs {raw:,.0f} ops/s)",
        driver / raw,
    )
    record_ratio("  ... client CPU us per request over tcp://", (c1 - c0) / (N * ROUNDS) * 1e6)
    if s0 is not None and s1 is not None:
        record_ratio("  ... server CPU us per request over tcp://", (s1 - s0) / (N * ROUNDS) * 1e6)


def test_tcp_latency_depth_1_over_pyzmq_round_trip(timed, record_ratio, overhead_server, echo: Echo) -> None:
    proc, ready = overhead_server
    size = (MODULUS_2048.bit_length() + 7) // 8

    def one_at_a_time(client: apcrypto.Client) -> list[float]:
        out = []
        for i in range(DEPTH1):
            t = time.perf_counter()
            client.mod_expo((i + 2).to_bytes(size, "big"), EXPONENT, MODULUS_2048).result(10)
            out.append(time.perf_counter() - t)
        return out

    with apcrypto.connect(ready["data"], health_probe=False) as client:
        assert client.wait_ready(10)
        one_at_a_time(client)  # warm up
        c0, s0 = time.process_time(), _proc_cpu(proc.pid)
        lat, _ = timed(one_at_a_time, client, rounds=1, warmup_rounds=0)
        c1, s1 = time.process_time(), _proc_cpu(proc.pid)
    driver = statistics.median(lat)
    rtt = statistics.median(echo.round_trips(DEPTH1 * 2))
    record_ratio(
        f"tcp:// latency at depth 1, driver p50 / pyzmq round trip p50 of the same frames"
        f"  ({driver * 1e6:,.0f} vs {rtt * 1e6:,.0f} us)",
        driver / rtt,
    )
    # one request at a time, every thread wakes for every request: what each side burns per request
    record_ratio("  ... client CPU us per request at depth 1", (c1 - c0) / DEPTH1 * 1e6)
    if s0 is not None and s1 is not None:
        record_ratio("  ... server CPU us per request at depth 1", (s1 - s0) / DEPTH1 * 1e6)


def _card_busy(cards: list[Any], get: Callable[[Any, str], Any]) -> tuple[float, int]:
    accel = [c for c in cards if get(c, "mode") == "accel"]
    return sum(get(c, "busy_time") for c in accel), sum(get(c, "engines") for c in accel)


def _utilisation_run(
    client: apcrypto.Client,
    read: Callable[[], tuple[float, float, int]],
    server_cpu: Callable[[], float] | None = None,
) -> tuple[float, float, float, float]:
    """(throughput / ceiling, busy engine time / engine time available, client CPU µs per request,
    server CPU µs per request or 0 in process) over the rounds.  Rounds of UTIL_N, the median rate
    of UTIL_ROUNDS: a round is long enough (about half a second) that a scheduling hiccup of the
    machine moves it little; the CPU figures move far less than the rates."""
    assert client.wait_ready(10)
    driver_run(client, 1000)
    busy0, t0, _ = read()
    w0 = time.perf_counter()
    c0, s0 = time.process_time(), server_cpu() if server_cpu is not None else 0.0
    rates = []
    for _ in range(UTIL_ROUNDS):
        t = time.perf_counter()
        assert driver_run(client, UTIL_N) == UTIL_N
        rates.append(UTIL_N / (time.perf_counter() - t))
    wall = time.perf_counter() - w0
    n = UTIL_N * UTIL_ROUNDS
    client_us = (time.process_time() - c0) / n * 1e6
    server_us = (server_cpu() - s0) / n * 1e6 if server_cpu is not None else 0.0
    busy1, t1, engines = read()
    busy = (busy1 - busy0) / (engines * (t1 - t0 if t1 > t0 else wall))
    return statistics.median(rates) / CEILING_DEFAULT, busy, client_us, server_us


def _process_cpu(pid: int) -> Callable[[], float]:
    """CPU seconds (user + system, all threads) process ``pid`` has used so far, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")

    def read() -> float:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick

    return read


def test_wall_clock_utilisation_default_profile_tcp_and_in_process(
    timed, record_ratio, server_process
) -> None:
    start, stop = server_process
    proc, ready = start("default")
    try:
        control = ControlClient(ready["control"], token_file=ready.get("token_file"))

        def read_tcp() -> tuple[float, float, int]:
            st = control.stats()["emulator"]
            busy, engines = _card_busy(st["cards"], lambda c, k: c[k])
            return busy, st["time"], engines

        with apcrypto.connect(ready["data"]) as client:
            (tcp_rate, tcp_busy, tcp_cli, tcp_srv), _ = timed(
                _utilisation_run, client, read_tcp, _process_cpu(proc.pid), rounds=1, warmup_rounds=0
            )
        control.close()
    finally:
        stop(proc)
    emu = Emulator("default", clock="wall")
    try:

        def read_emu() -> tuple[float, float, int]:
            busy, engines = _card_busy(emu.stats().cards, getattr)
            return busy, emu.clock.now(), engines

        with apcrypto.connect("emu:", emulator=emu) as client:
            emu_rate, emu_busy, emu_cpu, _ = _utilisation_run(client, read_emu)
    finally:
        emu.close()
    record_ratio(
        "wall-clock utilisation, default profile, backlog, tcp:// server process: ops/s / 20,000", tcp_rate
    )
    record_ratio("  ... the cards' busy engine time / engine time available (tcp://)", tcp_busy)
    record_ratio("  ... CPU us per request (tcp://): client process", tcp_cli)
    record_ratio("  ... CPU us per request (tcp://): server process", tcp_srv)
    record_ratio(
        "wall-clock utilisation, default profile, backlog, in process (emu:): ops/s / 20,000", emu_rate
    )
    record_ratio("  ... CPU us per request (emu:): the one process", emu_cpu)
    record_ratio("  ... the cards' busy engine time / engine time available (emu:)", emu_busy)
