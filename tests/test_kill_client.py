"""Kill tests for the journal: the *client* process SIGKILLed at a random (seeded) point of a run over
``tcp://`` against a real emulator server process, then a new client on the same journal.

Each run: a child process (tests/_kill_client_child.py) drives a mixed workload (RSA, counter
increments, key stores) with ``journal=`` as fast as the server takes it, and is SIGKILLed a seeded
0.02-0.5 s after it is in service.  This process then connects with the same journal, which resumes
the dead client's server session, drains what its cards hold and gives every open request a verdict.
An independent checker (tests/_kill_client_checker.py, no code shared with apcrypto) holds those
verdicts against the server's execution log (its SQLite spill) and the dead caller's own notes:
every journalled request has a verdict that matches the log, no state-changing request ran twice,
nothing journalled is left without a verdict.  ``make test`` runs 10 seeds, ``make soak`` 100.
"""

from __future__ import annotations

import random
import selectors
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import apcrypto
from emulator.execution_log import read_execution_log
from tests._fixtures_zmq import ROOT, ServerProcess, start_server
from tests._kill_client_checker import Caller, Reported, check, runs_from

CHILD = ROOT / "tests" / "_kill_client_child.py"
FINAL = frozenset({"completed", "error", "in-process-failed", "pending-failed", "discarded"})
TOTALS: Counter[str] = Counter()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    """One server for every run (each run's client gets its own domain, and frees it when done)."""
    d = tmp_path_factory.mktemp("kill-client")
    log = d / "exec.sqlite"
    srv = start_server(
        "--profile", "default", "--seed", "5", "--exec-log", str(log), "--exec-log-flush", "0.02", log_dir=d
    )
    try:
        yield srv, log
    finally:
        srv.proc.stdout.close()  # type: ignore[union-attr]
        srv.stop()
        if TOTALS:
            print(f"\nKILL-CLIENT-REPORT totals: {', '.join(f'{k} {v}' for k, v in sorted(TOTALS.items()))}")


@dataclass
class Outcome:
    open_rows: int
    counts: Counter[str]
    problems: list[str]
    resumed: bool


def _caller(path: Path) -> Caller:
    c = Caller()
    for line in path.read_text().splitlines() if path.exists() else ():
        parts = line.split()
        if parts[0] == "sub":
            c.submitted[parts[1]] += 1
        elif parts[0] == "done" and len(parts) == 4:
            c.done[int(parts[3])] = (parts[1], parts[2])
    return c


def _redrive_outcome(fut: Any) -> str | None:
    if fut is None:
        return None
    if not fut.done():
        return "pending"
    exc = fut.exception()
    return "completed" if exc is None else type(exc).__name__


def _final_log(log: Path, his: set[int], since: int, timeout: float = 5.0) -> list[Any]:
    """The spilled log of our psmids once none of them is still queued or running (bounded poll:
    the server commits its spill every 20 ms)."""
    stop = time.monotonic() + timeout
    while True:
        ours = [e for e in read_execution_log(log, since=since) if e.psmid >> 32 in his]
        if all(e.outcome in FINAL for e in ours) or time.monotonic() > stop:
            return ours
        time.sleep(0.02)


def run_once(srv: ServerProcess, log: Path, tmp: Path, seed: int) -> Outcome:
    rng = random.Random(seed)
    hi_dead, hi_back = 0x6B000 + 2 * seed, 0x6B000 + 2 * seed + 1
    journal, caller_log = tmp / f"journal-{seed}.db", tmp / f"caller-{seed}.log"
    operands = seed % 3 != 0  # a third of the runs keep no operands: nothing can be re-sent
    since = max((e.seq for e in read_execution_log(log)), default=0) + 1
    with (tmp / f"child-{seed}.err").open("w") as err:
        child = subprocess.Popen(
            [sys.executable, str(CHILD), srv.data, str(journal), hex(hi_dead), str(seed), str(int(operands)),
             str(caller_log)],
            stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT,
        )  # fmt: skip
    assert child.stdout is not None
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(child.stdout, selectors.EVENT_READ)
            assert sel.select(30), "the child never got ready"
            assert child.stdout.readline().strip() == "READY", (tmp / f"child-{seed}.err").read_text()
        time.sleep(rng.uniform(0.02, 0.5))  # the seeded kill point
        assert child.poll() is None, "the child ended before it was killed"
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        child.stdout.close()
    with apcrypto.connect(srv.data, config="fast", journal=str(journal), psmid_base=hi_back << 32) as client:
        records = client.recovered(30)
        resumed = client._recovery.resumed
    reported = [
        Reported(
            r.id,
            r.function,
            r.idempotent,
            r.verdict.value,
            tuple(p for p, _ in r.attempts),
            _redrive_outcome(r.redrive),
        )
        for r in records
    ]
    for r in records:  # a drained counter reply decodes to the counter's new value
        if r.verdict.value == "completed" and r.function == "CPRB:CI":
            assert isinstance(r.value, int) and r.value >= 1, r
    db = sqlite3.connect(journal)
    try:
        journal_rows = {int(i): v for i, v in db.execute("SELECT id, verdict FROM requests")}
    finally:
        db.close()
    entries = _final_log(log, {hi_dead, hi_back}, since)
    problems = check(
        journal_rows,
        reported,
        runs_from(entries, {hi_dead}),
        runs_from(entries, {hi_back}),
        _caller(caller_log),
    )
    counts = Counter(v.verdict for v in reported)
    print(
        f"\nKILL-CLIENT seed {seed}: {len(reported)} open at the kill"
        f"{' (operands not stored)' if not operands else ''}: "
        f"{', '.join(f'{k} {v}' for k, v in sorted(counts.items())) or 'none'}"
        f"; session {'resumed' if resumed else 'NOT resumed'}"
    )
    return Outcome(len(reported), counts, problems, resumed)


def _judge(o: Outcome) -> None:
    TOTALS.update(o.counts)
    TOTALS["runs"] += 1
    assert not o.problems, o.problems
    assert o.resumed, "the restarted client did not get the dead one's session back"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", range(10))
def test_client_sigkilled_mid_run_every_journalled_request_gets_a_true_verdict(
    server: tuple[ServerProcess, Path], tmp_path: Path, seed: int
) -> None:
    srv, log = server
    _judge(run_once(srv, log, tmp_path, seed))


def test_the_runs_exercised_the_verdicts() -> None:
    """Across the 10 runs above: work was open at the kills, and replies were drained from the cards.
    (Runs after them in this module; alone it has nothing to look at.)"""
    if TOTALS["runs"] < 10:
        pytest.skip("needs the 10 kill runs of this module")
    assert TOTALS["completed"] > 0, TOTALS
    assert TOTALS["indeterminate"] + TOTALS["re-driven"] + TOTALS["never-ran"] > 0, TOTALS


@pytest.mark.soak
@pytest.mark.timeout(3000)
def test_soak_client_sigkilled_at_100_random_points(
    server: tuple[ServerProcess, Path], tmp_path: Path
) -> None:
    for seed in range(1000, 1100):
        _judge(run_once(server[0], server[1], tmp_path, seed))
