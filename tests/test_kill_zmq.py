"""Kill tests over ``tcp://``: a real ``apcrypto-emulator serve`` process SIGKILLed and restarted on
the same port, or SIGSTOPped and continued, while about 600 mixed requests are in flight and more
keep coming during the outage.

For each scenario: every future resolves (bounded wait, counted); every verdict matches the execution
log of the server instance that ran it (each instance spills its log to its own SQLite file, which
survives the SIGKILL); the client comes back by itself and new requests succeed.  ``make test`` runs
the short variants (kill + 1 s, stop 5 s); ``make soak`` the long ones (kill + 8 s and 30 s, stop
30 s).  Each test prints one ``KILL-REPORT`` line with the counts per outcome (``pytest -s``).
"""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import apcrypto
from emulator.execution_log import read_execution_log
from tests._fixtures_kill import PSMID_BASE, check, submit_mixed, wait_all, wait_in_service
from tests._fixtures_zmq import ServerProcess, server_factory

__all__ = ["server_factory"]  # fixtures used here

HEARTBEAT = 0.5  # the tcp:// transport's default: a silent link is down after 3 of them
SETTLE = 60.0  # bound on the wait for every outcome once the server is back
#: the client's options: the driver's short test timings; link defaults but for a quicker back-off
CLIENT = {"config": "fast", "psmid_base": PSMID_BASE, "reconnect_delay_max": 0.5}


def _serve(factory: Callable[..., ServerProcess], log: Path, *extra: str) -> ServerProcess:
    return factory("--profile", "default", "--seed", "11", "--exec-log", str(log), *extra)


def run_scenario(
    factory: Callable[..., ServerProcess], tmp_path: Path, *, fault: str, outage: float, seed: int
) -> None:
    rng = random.Random(seed)
    logs = [tmp_path / "exec-1.sqlite"]
    first = _serve(factory, logs[0])
    servers = [first]
    with apcrypto.connect(first.data, **CLIENT) as client:
        assert client.wait_ready(15)
        warm = submit_mixed(client, 20, rng)
        assert wait_all(warm, 20) == 0
        assert all(r.fut.exception() is None for r in warm), "the healthy server failed requests"

        wave = submit_mixed(client, 600, rng)  # a burst: most still queued or on the cards at the fault
        wait_all(wave[:1], 10)
        if fault == "kill":
            first.kill()
        else:
            first.freeze()
        t_fault = time.monotonic()
        # a SIGKILL resets the connection at once; a stopped server is noticed by the heartbeat
        doubt_until = t_fault + (0.5 if fault == "kill" else 4 * HEARTBEAT)
        during = []
        while time.monotonic() - t_fault < outage:  # work keeps arriving while the server is away
            during += submit_mixed(client, 4, rng)
            time.sleep(0.25)
        if fault == "kill":
            logs.append(tmp_path / "exec-2.sqlite")
            servers.append(_serve(factory, logs[1], "--bind", first.data))
        else:
            first.proc.send_signal(signal.SIGCONT)
            first.killed = False  # it lives on: stopped cleanly (SIGTERM, exit 0) at the end
        back_in = wait_in_service(client, 30)
        unresolved = wait_all(wave + during, SETTLE)
        after = submit_mixed(client, 60, rng)
        after_unresolved = wait_all(after, 30)
    for srv in servers:
        srv.stop()  # its spill is complete once it exited (a SIGKILLed one's was cut at the kill)
    entries = [read_execution_log(p) for p in logs]

    v = check(warm + wave + during + after, entries, doubt_until)  # every request this client made
    a = check(after, entries)
    print(
        f"\nKILL-REPORT tcp {fault} {outage:g}s: requests {len(wave) + len(during)} "
        f"({len(during)} during the outage): {check(wave + during, entries, doubt_until).line()}; "
        f"back in service after {back_in if back_in is None else round(back_in, 2)} s; after: {a.line()}"
    )
    assert unresolved == 0 and not v.problems, v.problems
    assert back_in is not None, "the client did not bring its queues back by itself"
    assert after_unresolved == 0 and a.counts == {"completed": len(after)}, a.line()


def test_server_sigkilled_and_restarted_after_1s(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    run_scenario(server_factory, tmp_path, fault="kill", outage=1.0, seed=1)


def test_server_sigstopped_for_5s(server_factory: Callable[..., ServerProcess], tmp_path: Path) -> None:
    run_scenario(server_factory, tmp_path, fault="stop", outage=5.0, seed=2)


@pytest.mark.soak
@pytest.mark.timeout(300)
@pytest.mark.parametrize("outage", [8.0, 30.0])
def test_soak_server_sigkilled_and_restarted_late(
    server_factory: Callable[..., ServerProcess], tmp_path: Path, outage: float
) -> None:
    run_scenario(server_factory, tmp_path, fault="kill", outage=outage, seed=int(outage))


@pytest.mark.soak
@pytest.mark.timeout(300)
def test_soak_server_sigstopped_for_30s(server_factory: Callable[..., ServerProcess], tmp_path: Path) -> None:
    run_scenario(server_factory, tmp_path, fault="stop", outage=30.0, seed=30)
