"""Work a gone peer's session still holds survives an outage longer than ``peer_deadline`` (issue 9).

A session-keeping peer (the emulator server, ``--session-grace``) keeps a dropped session's APQNs and
the replies its cards hold.  When the transport declares the peer gone (``TransportLost(permanent=True,
resumable=True)``), the core keeps what the card holds undecided, bounded by
``DriverConfig.session_grace``; ``PeerRestored(resumed=True)`` drains the stored replies before the
reset that brings the queue back.  A new session (``resumed=False``) or the grace ending decides them
from the ledger, as a non-resumable loss does at once.

The sans-I/O tests drive the core by hand (tests/_fixtures_driver.Script); the last test does it
against a real server with a real outage (control-plane ``disconnect``), judged by the execution log.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from concurrent.futures import wait
from dataclasses import replace
from typing import Any

import apcrypto
from apcrypto.core.config import FAST
from apcrypto.core.events import PeerRestored, TransportLost
from apcrypto.core.queue import QState
from apcrypto.errors import Indeterminate
from apformats.codes import ResponseCode as RC
from apformats.messages import build_type80
from apformats.results import Instr, qid_of
from tests._fixtures_driver import HW_ACCEL, Script, expected_me, key, me_request, res
from tests._fixtures_zmq import ServerProcess, counter_effects, server_factory

__all__ = ["server_factory"]  # fixture, imported for pytest

Q0 = qid_of(0, 0)
K = key(1024)
CFG = replace(FAST, session_grace=5.0)


def held_on_card(n: int) -> tuple[Script, list[int], list[int]]:
    """A queue in service holding ``n`` accepted non-idempotent requests, a DQAP in flight."""
    s = Script(CFG)
    s.bring_up(Q0, HW_ACCEL)
    rids = [s.submit(me_request(2 + i, K), idempotent=False) for i in range(n)]
    psmids = []
    for nq in s.cmds(Instr.NQAP):
        psmids.append(nq.psmid)
        s.answer(nq, res(irq=True))
    s.interrupt(Q0)
    assert s.cmds(Instr.DQAP)
    return s, rids, psmids


def gone(s: Script, *, resumable: bool) -> None:
    tags = list(s.pending)
    s.pending.clear()
    s._take(s.core.on_events([TransportLost("peer gone", tuple(tags), True, (), (), resumable)], s.now))


def restored(s: Script, *, resumed: bool) -> None:
    s._take(s.core.on_events([PeerRestored("back", resumed=resumed)], s.now))


def test_resumed_session_drains_the_replies_before_the_reset() -> None:
    s, rids, psmids = held_on_card(2)
    gone(s, resumable=True)
    assert s.state(Q0) is QState.OFFLINE
    assert not s.resolved, "a resumable loss decides nothing yet"
    assert ("grace", Q0) in s.timers  # bounded: nothing parked without a timer
    # the offline re-probe would reset the queue and wipe the replies: it is held off
    s.fire(("poll", Q0))
    assert not s.cmds(), s.pending
    restored(s, resumed=True)
    assert s.state(Q0) is QState.RECOVERY_WAIT
    assert ("grace", Q0) not in s.timers
    assert not s.cmds(Instr.RAPQ) and not s.cmds(Instr.ZAPQ)
    s.answer(s.one(Instr.DQAP), res(psmid=psmids[1], reply=build_type80(expected_me(3, K)), replies=True))
    s.answer(s.one(Instr.DQAP), res(psmid=psmids[0], reply=build_type80(expected_me(2, K)), empty=True))
    assert s.resolved[rids[0]].value == expected_me(2, K)
    assert s.resolved[rids[1]].value == expected_me(3, K)
    # the drain's last look finds the queue empty: now the reset and bring-up, as after any outage
    if not s.cmds(Instr.DQAP):
        s.fire(("poll", Q0))
    dq = s.cmds(Instr.DQAP)
    if dq:
        s.answer(dq[0], res(RC.Q_FULL, empty=True))
    assert s.state(Q0) is QState.RESET_START
    assert s.one(Instr.RAPQ)
    assert s.core.ledger.counters["session_drains"] == 1


def test_what_the_drain_does_not_find_is_decided_by_the_ledger() -> None:
    s, rids, psmids = held_on_card(2)
    gone(s, resumable=True)
    restored(s, resumed=True)
    s.answer(s.one(Instr.DQAP), res(psmid=psmids[0], reply=build_type80(expected_me(2, K))))
    assert rids[1] not in s.resolved
    s.fire(("poll", Q0))
    s.answer(s.one(Instr.DQAP), res(RC.Q_FULL, empty=True))
    assert s.resolved[rids[0]].value == expected_me(2, K)
    assert isinstance(s.resolved[rids[1]].error, Indeterminate)
    assert s.state(Q0) is QState.RESET_START


def test_a_new_session_decides_at_once_and_reprobes() -> None:
    s, rids, _ = held_on_card(2)
    gone(s, resumable=True)
    restored(s, resumed=False)
    assert all(isinstance(s.resolved[r].error, Indeterminate) for r in rids)
    assert ("grace", Q0) not in s.timers
    assert s.one(Instr.TAPQ)  # re-probed at once, as after any permanent loss


def test_the_session_grace_decides_when_nothing_comes_back() -> None:
    s, rids, _ = held_on_card(1)
    gone(s, resumable=True)
    assert s.timers[("grace", Q0)] == s.now + CFG.session_grace
    s.fire(("grace", Q0))
    assert isinstance(s.resolved[rids[0]].error, Indeterminate)
    assert s.one(Instr.TAPQ)  # the re-probes held off during the grace start again
    # a late PeerRestored(resumed=True) finds nothing held: an ordinary re-probe, no drain
    restored(s, resumed=True)
    assert s.core.ledger.counters["session_drains"] == 0


def test_a_later_loss_that_cannot_resume_decides_what_was_kept() -> None:
    """The transport gives up (or is closed) while a session is kept: nothing will resume it."""
    s, rids, _ = held_on_card(1)
    gone(s, resumable=True)
    assert rids[0] not in s.resolved
    gone(s, resumable=False)
    assert isinstance(s.resolved[rids[0]].error, Indeterminate)
    assert ("grace", Q0) not in s.timers


def test_a_loss_that_cannot_resume_decides_at_once_as_before() -> None:
    s, rids, _ = held_on_card(2)
    gone(s, resumable=False)
    assert all(isinstance(s.resolved[r].error, Indeterminate) for r in rids)
    assert ("grace", Q0) not in s.timers


# --- a real server, a real outage longer than peer_deadline ------------------------------------------


def _wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.02)


def test_outage_longer_than_peer_deadline_resumes_and_drains(
    server_factory: Callable[..., ServerProcess],
) -> None:
    """The link is cut while state-changing work runs and stays down ~3 s, past ``peer_deadline``
    (1 s): the transport declares the peer gone.  The server keeps the session (grace 30 s); the
    reconnect resumes it, the core drains the replies before resetting, and every increment ends
    completed with the value the card's execution log says it produced: no Indeterminate."""
    srv = server_factory("--profile", "default", "--seed", "5", "--session-grace", "30")
    ctl = srv.control_client(timeout=5.0)
    client = apcrypto.connect(
        srv.data,
        config="fast",
        reply_timeout=1.5,
        recovery_timeout=10.0,
        reconnect_delay=3.0,
        reconnect_jitter=0.0,
        peer_deadline=1.0,
        timeout=10.0,
    )
    try:
        assert client.wait_ready(10)
        for card in (2, 3):
            ctl.slow_engines(card, 100.0, 3.0)  # CI: 0.4 s each, so work is on the card when the link goes
        futs = [client.counter_increment() for _ in range(12)]
        _wait_for(lambda: sum(e["outcome"] == "running" for e in ctl.execution_log()) >= 4, 5, "work running")
        (mine,) = [s for s in ctl.sessions() if s["established"]]
        assert ctl.disconnect(mine["client"]) == 1
        _, pending = wait(futs, timeout=40)
        assert not pending
        values = [f.result() for f in futs]  # raises if any ended Indeterminate (or anything else)
        assert client.transport.counters["restored"] >= 1  # the peer was declared gone, then came back
        assert client.transport.counters["resumed"] >= 1
        counters = client.stats()["counters"]
        assert counters.get("session_drains", 0) >= 1
        records = [r for r in client.core.ledger.records.values() if r.attempts]
        log = ctl.execution_log()
        effects = counter_effects(log)
        by_psmid = {r.attempts[-1].psmid: r for r in records}
        ran = [e for e in log if e["psmid"] in by_psmid]
        assert {e["outcome"] for e in ran} == {"completed"}, ran  # nothing lost or abandoned on the card
        assert len(records) == 12 and all(len(r.attempts) == 1 for r in records)  # nothing re-driven
        assert len(ran) == 12  # each ran once
        assert sorted(effects[p] for p in by_psmid) == sorted(values)
    finally:
        client.close()
