"""What the journal (``connect(..., journal=PATH)``) costs: requests per second with and without it,
the same work on the same kind of adapter, in one run (median against median, 3 rounds each).

The ``overhead`` profile (zero service times, echo math) makes the driver itself the limit, so the
journal's share is as large as it can be; on real service times it is smaller.  Both settings of
``journal_sync`` are measured: ``normal`` (a commit survives the process's death) and ``full`` (also
a power loss: an fsync per group commit).  Each journalled round starts from a fresh file.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import apcrypto
from apcrypto.bench import driver_run
from emulator import Emulator

N = 1500
ROUNDS = 3


@pytest.fixture
def emu() -> Iterator[Any]:
    e = Emulator("overhead", clock="wall")
    yield e
    e.close()


def _by_hand(fn: Any, *args: Any, rounds: int = ROUNDS, warmup_rounds: int = 1) -> tuple[Any, float]:
    """``(result, median seconds)`` over ``rounds`` calls after ``warmup_rounds``: the same figure
    pytest-benchmark's pedantic mode gives, for the second side of a ratio (one benchmark per test)."""
    for _ in range(warmup_rounds):
        fn(*args)
    times, res = [], None
    for _ in range(rounds):
        t = time.perf_counter()
        res = fn(*args)
        times.append(time.perf_counter() - t)
    return res, statistics.median(times)


def _rate(measure: Any, emu: Any, **journal: Any) -> tuple[float, int]:
    with apcrypto.connect("emu:", emulator=emu, health_probe=False, **journal) as client:
        assert client.wait_ready(10)
        ops, median = measure(driver_run, client, N, rounds=ROUNDS, warmup_rounds=1)
        commits = client.journal.commits if client.journal is not None else 0
    assert ops == N
    return N / median, commits


@pytest.mark.parametrize("sync", ["normal", "full"])
def test_journal_over_no_journal(timed: Any, record_ratio: Any, emu: Any, tmp_path: Path, sync: str) -> None:
    """Requests per second with the journal over without it; one run, same emulator, medians."""
    bare, _ = _rate(_by_hand, emu)
    journalled, commits = _rate(timed, emu, journal=str(tmp_path / "j.db"), journal_sync=sync)
    requests = N * (ROUNDS + 1)
    record_ratio(
        f"journal (sync={sync}) / no journal, emu: overhead profile, medians"
        f"  ({journalled:,.0f} vs {bare:,.0f} ops/s; {requests / max(commits, 1):.1f} requests per commit)",
        journalled / bare,
    )
