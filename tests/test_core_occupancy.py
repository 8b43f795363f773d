"""The slot-occupancy integral (``stats()`` ``slot_seconds``), held against a brute-force walk.

The core integrates each queue's messages held over the runner's clock lazily: just before its
``held`` changes and when the figure is read (``Queue.occ_to``), not by walking every queue on
every entry point.  The reference here is that walk, written in the test: at the start of every
entry point (``QueueMachine.advance``, which each one calls first, before anything changes) it adds
``held * dt`` for every queue, reading ``held`` from the live dictionaries.  It shares nothing with
the core's hooks, so a change of ``held`` the core forgets to integrate before shows up as a
difference that never goes away.  It is only compared at the end of a run: comparing on the way
would integrate every queue and hide a missed hook.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from apcrypto.core.machine import QueueMachine
from apcrypto.core.queue import Queue
from apcrypto.runners.sim import SimRunner
from apformats.codes import ResponseCode as RC
from apformats.messages import build_type80
from apformats.results import Instr, qid_of, qid_str
from tests._fixtures_driver import HW_ACCEL, PROBE_REPLY, Script, key, me_request, res


def _held(q: Queue) -> int:
    return len(q.on_card) + len(q.sending) + (1 if q.probe_sent else 0)


class Walk:
    """The brute-force integral: every queue, every entry point."""

    def __init__(self) -> None:
        self.integral: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.entries = 0

    def observe(self, machine: QueueMachine, now: float) -> None:
        self.entries += 1
        for q in machine.queues.values():
            t = self.last.get(q.qid, q.t0)
            if now > t:
                self.integral[q.qid] = self.integral.get(q.qid, 0.0) + _held(q) * (now - t)
                self.last[q.qid] = now

    def assert_matches(self, core: Any) -> None:
        self.observe(core.machine, core.out.now)  # no time passes: brings queues added late in
        stats = core.stats()["queues"]
        assert stats, "no queues"
        for qid in core.queues:
            got = stats[qid_str(qid)]["slot_seconds"]
            assert got == pytest.approx(self.integral.get(qid, 0.0), rel=1e-9, abs=1e-12), qid_str(qid)


@pytest.fixture
def walk(monkeypatch: pytest.MonkeyPatch) -> Iterator[Walk]:
    w = Walk()
    original = QueueMachine.advance

    def advance(self: QueueMachine, now: float) -> None:
        w.observe(self, now)
        original(self, now)

    monkeypatch.setattr(QueueMachine, "advance", advance)
    yield w


@pytest.mark.parametrize("seed", range(0, 400, 25))
def test_campaign_runs_match_the_walk(seed: int, walk: Walk, monkeypatch: pytest.MonkeyPatch) -> None:
    """Seeded campaign runs (machine failures, checkstops, resets, busy, refused and failed
    requests, then healing): the lazy integral equals the walk's at the end of each run."""
    from tests import test_sim_campaign as campaign

    checked: list[float] = []
    original = SimRunner.shutdown

    def shutdown(self: SimRunner, *a: Any, **kw: Any) -> Any:
        walk.assert_matches(self.core)
        checked.append(sum(walk.integral.values()))
        return original(self, *a, **kw)

    monkeypatch.setattr(SimRunner, "shutdown", shutdown)
    campaign.run_seed(seed)
    assert checked and checked[0] > 0, "the run held no message at all"
    assert walk.entries > 100


Q0 = qid_of(0, 0)
Q1 = qid_of(1, 0)
K = key(1024)


def test_transport_losses_and_withdrawals_match_the_walk(walk: Walk) -> None:
    """The paths a campaign on the simulator does not take: a non-permanent loss (some NQAPs never
    sent), a reply before its status, a permanent loss, and a queue leaving service with NQAPs
    still in its batch; time moves between every step."""
    s = Script()
    for qid in (Q0, Q1):
        s.bring_up(qid)
        s.now += 0.01
    for x in range(2, 20):
        s.submit(me_request(x, K))
    s.now += 0.003
    first = s.cmds(Instr.NQAP)
    for c in first[:5]:
        s.answer(c, res(irq=True))
        s.now += 0.001
    # a reply whose NQAP status never came (the status frame lost)
    dq = None
    s.interrupt(Q0)
    for c in s.cmds(Instr.DQAP, Q0):
        dq = c
    assert dq is not None
    pending_q0 = s.cmds(Instr.NQAP, Q0)
    s.now += 0.002
    reply = build_type80(bytes(K.size))
    s.answer(dq, res(psmid=pending_q0[0].psmid, reply=reply, replies=True, irq=True))
    s.now += 0.004
    # a non-permanent loss: everything pending dies, the queues stay in service
    tags = list(s.pending)
    s.pending.clear()
    s._take(s.core.on_transport_lost(tags, permanent=False, reason="test", now=s.now, unsent=tags[::2]))
    s.now += 0.005
    for c in s.cmds(Instr.NQAP):
        s.answer(c, res(RC.Q_FULL if c.psmid % 3 == 0 else RC.NORMAL, irq=True))
        s.now += 0.0005
    s.now += 0.01
    s.lose_transport(permanent=True, reason="gone")
    s.now += 0.02
    walk.assert_matches(s.core)
    assert sum(walk.integral.values()) > 0


def test_reset_with_nqaps_in_the_batch_matches_the_walk(walk: Walk) -> None:
    """A queue reset while the NQAPs just placed on it are still in the unflushed batch (they are
    withdrawn) and a queue abandoned with work on the card."""
    s = Script()
    s.bring_up(Q0)
    s.now += 0.01
    for x in range(2, 12):
        s.submit(me_request(x, K))
    s.now += 0.002
    for c in s.cmds(Instr.NQAP)[:4]:
        s.answer(c, res(irq=True))
    s.now += 0.003
    # the card answers an NQAP with "reset in progress": the queue is reset, its batch withdrawn
    nq = s.cmds(Instr.NQAP)
    s.answer(nq[0], res(RC.RESET_IN_PROGRESS, irq=True))
    s.now += 0.004
    while s.timers:
        s.now += 0.001
        s.advance()
        for c in list(s.pending.values()):
            if c.instr in (Instr.RAPQ, Instr.ZAPQ, Instr.AQIC):
                s.answer(c, res(irq=True))
            elif c.instr is Instr.TAPQ:
                s.answer(c, res(RC.DECONFIGURED))
        if s.state(Q0).value == "offline":
            break
    s.now += 0.01
    walk.assert_matches(s.core)


def _slow_bring_up_to_probe(s: Script, qid: int) -> Any:
    """Bring ``qid`` up to its health probe with time moving at every step; returns the probe's
    NQAP, answered (accepted): the probe is held from here on."""
    s.add_queue(qid)
    s.now += 0.001
    s.answer(s.one(Instr.RAPQ, qid), res())
    s.fire(("poll", qid))
    s.answer(s.one(Instr.TAPQ, qid), res(hw=HW_ACCEL, empty=True))
    s.now += 0.001
    s.answer(s.one(Instr.AQIC, qid), res(empty=True))
    s.fire(("poll", qid))
    s.answer(s.one(Instr.TAPQ, qid), res(hw=HW_ACCEL, empty=True, irq=True))
    probe = s.one(Instr.NQAP, qid)
    s.now += 0.002
    s.answer(probe, res(irq=True))
    s.now += 0.003  # the probe is on the card
    return probe


def test_a_probe_held_then_answered_matches_the_walk(walk: Walk) -> None:
    s = Script()
    probe = _slow_bring_up_to_probe(s, Q0)
    s.interrupt(Q0)
    s.now += 0.004
    s.answer(s.one(Instr.DQAP, Q0), res(psmid=probe.psmid, reply=PROBE_REPLY, empty=True, irq=True))
    assert s.state(Q0).in_service
    s.now += 0.01
    walk.assert_matches(s.core)
    assert walk.integral[Q0] == pytest.approx(0.007)  # held from its acceptance to its reply


def test_a_probe_held_until_it_times_out_matches_the_walk(walk: Walk) -> None:
    s = Script()
    _slow_bring_up_to_probe(s, Q0)
    limit = ("limit", Q0)
    s.fire(limit)  # the probe never came back: the queue is reset
    assert s.state(Q0).value == "reset-start"
    s.now += 0.01
    walk.assert_matches(s.core)
    assert walk.integral[Q0] > 0.003
