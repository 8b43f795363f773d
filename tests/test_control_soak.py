"""Long measurements of the server as a shared service (``make soak``): resident memory over a million
requests, and paged execution-log reads against a full ring while the data plane is in use.

Figures are printed (``-s``) and bounded loosely: these are regressions guards against the failures of
issue 9 (an execution log that grew without end, 0.49 KiB a request; a log read that serialised the
whole log on the serving thread, stalling the data plane for 1-2 s), not speed tests.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import apcrypto
from tests._fixtures_zmq import ROOT, ServerProcess, server_factory

__all__ = ["server_factory"]

MOD_1K = (1 << 1023) | 0x1D7
#: Requests of the RSS soak (override with APCRYPTO_SOAK_REQUESTS for a quicker look).
REQUESTS = int(os.environ.get("APCRYPTO_SOAK_REQUESTS", "1000000"))
WINDOW = 256

#: A control-plane reader that pages through the whole log again and again until SIGINT, then prints
#: each page's round-trip time (seconds).
READER = """
import sys, time
from emulator.control_client import ControlClient
times = []
with ControlClient(sys.argv[1], timeout=30, token_file=sys.argv[2]) as c:
    print("reading", flush=True)
    try:
        while True:
            cursor = 0
            while True:
                t0 = time.perf_counter()
                page = c.execution_log_page(cursor, 1000)
                times.append(time.perf_counter() - t0)
                if not page["entries"]:
                    break
                cursor = page["next"]
    except KeyboardInterrupt:
        pass
print(" ".join(map(str, times)))
"""


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def run_requests(client: apcrypto.Client, n: int) -> None:
    """``n`` RSA requests, ``WINDOW`` in flight at a time; each must complete."""
    done = 0
    while done < n:
        batch = min(WINDOW, n - done)
        futs = [client.mod_expo(b"\x02", 3, MOD_1K) for _ in range(batch)]
        for f in futs:
            assert len(f.result(60)) == 128
        done += batch


@pytest.mark.soak
@pytest.mark.timeout(3000)
def test_server_rss_is_flat_over_a_million_requests(server_factory: Callable[..., ServerProcess]) -> None:
    srv = server_factory("--profile", "small")  # default ring: 100,000 log entries
    samples: list[tuple[int, float]] = [(0, rss_mib(srv.proc.pid))]
    step = max(REQUESTS // 10, 1)
    started = time.monotonic()
    with apcrypto.connect(srv.data, config="fast") as client:
        assert client.wait_ready(30)
        for i in range(1, 11):
            run_requests(client, step)
            samples.append((i * step, rss_mib(srv.proc.pid)))
    seconds = time.monotonic() - started
    with srv.control_client(timeout=30) as c:
        st = c.stats()
    total = sum(q["requests"] for q in st["emulator"]["queues"])
    print(f"\nserver RSS MiB by requests: {[(n, round(m, 1)) for n, m in samples]}")
    print(f"{10 * step} requests in {seconds:.0f} s ({10 * step / seconds:.0f}/s); log {st['execution_log']}")
    assert total >= 10 * step
    assert st["execution_log"]["held"] == min(100_000, st["execution_log"]["end"])
    # once the ring is full (100k entries, by 30% of the run), memory stays flat
    settled = [m for n, m in samples if n >= 3 * step]
    growth = max(settled) - settled[0]
    print(f"growth after the ring filled: {growth:.1f} MiB")
    assert growth < 16.0, samples


@pytest.mark.soak
@pytest.mark.timeout(1200)
def test_paged_log_reads_do_not_stall_the_data_plane(server_factory: Callable[..., ServerProcess]) -> None:
    """A full 100,000-entry ring read page by page while a client runs: page latency, and the data
    plane's request latency with and without a reader."""
    srv = server_factory("--profile", "small")
    with apcrypto.connect(srv.data, config="fast") as client:
        assert client.wait_ready(30)
        run_requests(client, 100_000)

        def latencies(n: int) -> list[float]:
            out = []
            for _ in range(n):
                t0 = time.perf_counter()
                client.mod_expo(b"\x02", 3, MOD_1K).result(30)
                out.append(time.perf_counter() - t0)
            return out

        quiet = latencies(2000)
        # the reader is another process (as an operator's would be), so it takes no GIL from the client
        reader = subprocess.Popen(
            [sys.executable, "-c", READER, srv.control, str(srv.token_file)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        try:
            assert reader.stdout is not None
            assert reader.stdout.readline().strip() == "reading"
            busy = latencies(2000)
        finally:
            reader.send_signal(signal.SIGINT)
            out, _ = reader.communicate(timeout=60)
        pages = [float(x) for x in out.split()]

    def q(xs: list[float], p: float) -> float:
        return sorted(xs)[min(len(xs) - 1, int(p * len(xs)))] * 1000

    print(
        f"\npage of 1000 entries: median {statistics.median(pages) * 1000:.1f} ms, "
        f"p99 {q(pages, 0.99):.1f} ms, max {max(pages) * 1000:.1f} ms over {len(pages)} pages"
    )
    print(
        f"request latency quiet: median {statistics.median(quiet) * 1000:.2f} ms p99 {q(quiet, 0.99):.1f} ms "
        f"max {max(quiet) * 1000:.1f} ms; while paging: median {statistics.median(busy) * 1000:.2f} ms "
        f"p99 {q(busy, 0.99):.1f} ms max {max(busy) * 1000:.1f} ms"
    )
    assert len(pages) >= 100  # the whole ring was read at least once
    assert q(busy, 0.99) < 200.0  # ms: no stall of the order the one-shot read caused (1-2 s)
