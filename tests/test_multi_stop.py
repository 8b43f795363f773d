"""One of a pool's two servers SIGSTOPped for less than ``peer_deadline``: its link is down, its
session kept, and the other server keeps answering.  The other server's answers must not vouch for
the stopped one's link: its queues' reply timers wait for the link (deferred) instead of resetting
queues whose replies the resumed session still holds, as for a lone server."""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

import apcrypto
from emulator.execution_log import read_execution_log
from tests._fixtures_kill import PSMID_BASE, check, submit_mixed, wait_all
from tests._fixtures_zmq import ServerProcess, server_factory

__all__ = ["server_factory"]

STALL = 5.0  # seconds: twice FAST's reply_timeout (2 s), well within peer_deadline (8 s here)


def test_one_of_two_servers_sigstopped_keeps_its_queues_waiting_for_its_link(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    rng = random.Random(5)
    logs = [tmp_path / "a.sqlite", tmp_path / "b.sqlite"]
    a = server_factory("--profile", "default", "--seed", "1", "--exec-log", str(logs[0]))
    b = server_factory("--profile", "default", "--seed", "2", "--exec-log", str(logs[1]))
    opts = {"config": "fast", "psmid_base": PSMID_BASE, "peer_deadline": 8.0}
    with apcrypto.connect([a.data, b.data], **opts) as client:
        assert client.wait_ready(15)
        wave = submit_mixed(client, 300, rng)
        # stop server 1 while its cards hold our work (else no reply timer runs in the stall and
        # the test would prove nothing): a bounded poll of the client's public stats
        t0 = time.monotonic()
        while not any(q["held"] for n, q in client.stats()["queues"].items() if n.startswith("1")):
            assert time.monotonic() - t0 < 10, "server 1 never held any of the wave"
            time.sleep(0.001)
        b.freeze()
        t_stop = time.monotonic()
        during = []
        while time.monotonic() - t_stop < STALL:  # past FAST's reply_timeout (2 s), within peer_deadline
            during += submit_mixed(client, 4, rng)
            time.sleep(0.1)
        b.proc.send_signal(signal.SIGCONT)
        b.killed = False
        unresolved = wait_all(wave + during, 60)
        counters = client.stats()["counters"]
    a.stop()
    b.stop()
    v = check(wave + during, [read_execution_log(p) for p in logs], t_stop + 2.0)
    print(f"\nKILL-REPORT multi stop {STALL:g}s: {v.line()}; counters {counters}")
    assert unresolved == 0 and not v.problems, v.problems
    # no queue reset for the link's silence: its reply timers waited for the link instead (the core
    # test test_one_peers_answers_do_not_vouch_for_another_peers_link pins the same rule sans-I/O)
    assert counters.get("reply_timeouts", 0) == 0, counters
    assert counters.get("reply_timeouts_deferred", 0) > 0, counters
