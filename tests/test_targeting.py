"""Targeting: ``apqn=(card, domain)`` / ``card=`` pin a request to its queue(s), with no failover.

State lives per card and domain (the counters and key slots of the firmware stubs), so only a
targeted request can read back what an earlier one stored.  Every check of *where* a request ran is
made against the emulator's execution log (what actually ran), read here with the log's own API,
not through the driver's ledger alone.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from typing import Any

import pytest

import apcrypto
from apcrypto.core.queue import QState
from apcrypto.errors import BadRequest, DeviceUnavailable, Indeterminate, TargetNotHeld
from apcrypto.requests import CounterIncrement
from apcrypto.runners.sim import SimClient, SimRunner
from apformats.results import qid_of
from emulator import Emulator
from tests._fixtures_driver import exact_profile, make_sim
from tests._fixtures_zmq import ServerProcess, server_factory

Q21, Q32 = qid_of(2, 1), qid_of(3, 2)  # CCA queues of the default profile (cards 2-3, domains 0-3)


@pytest.fixture
def cca() -> tuple[Emulator, SimRunner, SimClient]:
    emu, sim = make_sim(exact_profile("default"), seed=5)
    yield emu, sim, SimClient(sim)
    sim.shutdown()


def psmids_of(sim: SimRunner, fut_count: int) -> list[list[int]]:
    """Every psmid each of the last ``fut_count`` requests was sent under (all attempts)."""
    recs = sorted(sim.core.ledger.records.values(), key=lambda r: r.rid)[-fut_count:]
    return [[a.psmid for a in r.attempts] for r in recs]


def ran_on(emu: Emulator, psmids: list[int]) -> set[int]:
    """The queues the emulator's log says these psmids ran (or were held) on."""
    return {e.qid for p in psmids for e in emu.execution_log.for_psmid(p)}


def test_key_store_then_key_read_on_the_same_apqn(cca) -> None:
    emu, sim, c = cca
    keys = {(2, 1): b"\x21" * 32, (3, 2): b"\x32" * 32}
    for apqn, key in keys.items():
        c.settle([c.key_store(5, key, apqn=apqn)])
    reads = [c.key_read(5, apqn=apqn) for apqn in keys for _ in range(10)]
    c.settle(reads)
    assert [f.result() for f in reads] == [keys[(2, 1)]] * 10 + [keys[(3, 2)]] * 10
    per_request = psmids_of(sim, 20)
    assert all(ran_on(emu, p) == {Q21} for p in per_request[:10])
    assert all(ran_on(emu, p) == {Q32} for p in per_request[10:])
    # the slot is per APQN: another domain of the same card has no key in slot 5
    other = c.key_read(5, apqn=(2, 2))
    c.settle([other])
    assert isinstance(other.exception(), BadRequest)


def test_eight_increments_on_one_apqn_count_one_to_eight(cca) -> None:
    emu, sim, c = cca
    seq = []
    for _ in range(4):  # one at a time ...
        f = c.counter_increment(1, apqn=(2, 1))
        c.settle([f])
        seq.append(f.result())
    burst = [c.counter_increment(1, apqn=(2, 1)) for _ in range(4)]  # ... and four at once
    c.settle(burst)
    assert seq + sorted(f.result() for f in burst) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert emu.stores[(2, 1)].counter == 8
    assert ran_on(emu, [p for ps in psmids_of(sim, 4) for p in ps]) == {Q21}


def test_targeted_work_does_not_hold_up_or_spill_to_other_queues(cca) -> None:
    """More targeted work than its queue has slots, with untargeted work behind it: the untargeted
    work runs elsewhere meanwhile, and not one targeted request leaves its APQN."""
    emu, sim, c = cca
    pinned = [c.counter_increment(1, apqn=(3, 2)) for _ in range(30)]
    free = [c.submit(CounterIncrement(1)) for _ in range(30)]
    c.settle(pinned + free)
    assert sorted(f.result() for f in pinned) == list(range(1, 31))
    assert all(isinstance(f.result(), int) for f in free)
    recs = sorted(sim.core.ledger.records.values(), key=lambda r: r.rid)[-60:]
    pinned_ran = ran_on(emu, [a.psmid for r in recs[:30] for a in r.attempts])
    free_ran = ran_on(emu, [a.psmid for r in recs[30:] for a in r.attempts])
    assert pinned_ran == {Q32}
    assert len(free_ran - {Q32}) >= 2  # spread over the other CCA queues


def test_card_target_uses_only_that_cards_domains(cca) -> None:
    emu, sim, c = cca
    futs = [c.counter_increment(1, card=3) for _ in range(24)]
    c.settle(futs)
    assert all(isinstance(f.result(), int) for f in futs)
    where = ran_on(emu, [p for ps in psmids_of(sim, 24) for p in ps])
    assert where and {q >> 8 for q in where} == {3}
    assert sum(emu.stores[(3, d)].counter for d in range(4)) == 24
    assert sum(emu.stores[(2, d)].counter for d in range(4)) == 0


def test_offline_target_ends_unavailable_after_the_grace_and_runs_nowhere(cca) -> None:
    emu, sim, c = cca
    grace = sim.core.cfg.unavailable_grace
    emu.control.checkstop(2)
    first = c.random_bytes(8, apqn=(2, 1))  # the driver learns of the checkstop by using the card
    c.settle([first])
    assert isinstance(first.exception(), DeviceUnavailable)  # idempotent: re-driven on Q21 only
    first_rec = max(sim.core.ledger.records.values(), key=lambda r: r.rid)
    assert first_rec.attempts and {a.qid for a in first_rec.attempts} == {Q21}
    assert ran_on(emu, [a.psmid for a in first_rec.attempts]) <= {Q21}
    assert sim.core.queues[Q21].state is QState.OFFLINE
    n_log = len(emu.execution_log.entries())
    t0 = sim.now()
    fut = c.counter_increment(1, apqn=(2, 1))
    c.settle([fut])
    err = fut.exception()
    assert isinstance(err, DeviceUnavailable) and err.qid == Q21, err
    assert sim.now() - t0 == pytest.approx(grace, abs=0.01)
    rec = max(sim.core.ledger.records.values(), key=lambda r: r.rid)
    assert rec.attempts == []  # never handed to any queue
    assert emu.execution_log.entries()[n_log:] == []  # nothing ran anywhere meanwhile
    assert all(emu.stores[(3, d)].counter == 0 for d in range(4))
    assert sim.core.queues[Q32].state.in_service  # ... though card 3 could have run it


def test_a_deadline_shorter_than_the_grace_wins(cca) -> None:
    emu, sim, c = cca
    emu.control.checkstop(2)
    c.settle([c.random_bytes(8, apqn=(2, 1))])
    t0 = sim.now()
    fut = c.counter_increment(1, apqn=(2, 1), deadline=0.1)
    c.settle([fut])
    assert isinstance(fut.exception(), apcrypto.DeadlineExceeded)
    assert sim.now() - t0 == pytest.approx(0.1, abs=0.01)


def test_machine_failure_redrive_returns_to_the_same_apqn(cca) -> None:
    """Request-pending work on a card that has a machine failure is re-driven after the card's
    recovery, on the same APQN (the grace, 1 s here, outlasts the 0.1 s recovery)."""
    emu, sim, c = cca
    emu.control.machine_failure(2, 0.1, at=sim.now() + 0.0005)
    futs = [c.counter_increment(1, apqn=(2, 1)) for _ in range(40)]
    c.settle(futs)
    done = [f.result() for f in futs if f.exception() is None]
    lost = [f.exception() for f in futs if f.exception() is not None]
    assert all(isinstance(e, Indeterminate) for e in lost)  # in-process: may have run, never re-run
    assert sorted(done) == sorted(set(done)) and len(done) >= 30
    recs = sorted(sim.core.ledger.records.values(), key=lambda r: r.rid)[-40:]
    assert any(r.redrives for r in recs), "the failure should have caught request-pending work"
    assert ran_on(emu, [a.psmid for r in recs for a in r.attempts]) == {Q21}
    assert {a.qid for r in recs for a in r.attempts} == {Q21}
    assert all(emu.stores[(3, d)].counter == 0 for d in range(4))


@pytest.mark.parametrize(
    ("kw", "qid"),
    [
        ({"apqn": (9, 9)}, qid_of(9, 9)),  # not a queue of this client
        ({"apqn": (2, 4)}, qid_of(2, 4)),  # control-only domain: not a usage queue
        ({"apqn": (2,)}, None),
        ({"apqn": [2, 1]}, None),
        ({"apqn": (2, 256)}, None),
        ({"card": 7}, None),
        ({"card": "2"}, None),
        ({"apqn": (2, 1), "card": 2}, None),
    ],
)
def test_bad_targets_raise_at_submit(cca, kw: dict[str, Any], qid: int | None) -> None:
    _emu, sim, c = cca
    before = len(sim.core.ledger.records)
    for call in (
        lambda: c.counter_increment(1, **kw),
        lambda: c.key_read(5, **kw),
        lambda: c.submit(CounterIncrement(1), **kw),
        lambda: c.counter_increment(-5, **kw),  # the target is checked before the operands
    ):
        with pytest.raises(TargetNotHeld) as info:
            call()
        assert isinstance(info.value, BadRequest) and isinstance(info.value, ValueError)
        assert info.value.qid == qid
    assert len(sim.core.ledger.records) == before  # nothing reached the driver


def test_core_fails_an_unheld_target_it_is_given_directly(cca) -> None:
    """A runner that skips the client's check still gets one clear outcome, never a failover."""
    _emu, sim, _c = cca
    fut: Future[Any] = sim.submit(CounterIncrement(1), target=frozenset({qid_of(9, 9)}))
    assert isinstance(fut.exception(), TargetNotHeld)
    assert fut.exception().qid == qid_of(9, 9)
    fut = sim.submit(CounterIncrement(1), target=frozenset())
    assert isinstance(fut.exception(), TargetNotHeld)
    recs = sorted(sim.core.ledger.records.values(), key=lambda r: r.rid)[-2:]
    assert [r.attempts for r in recs] == [[], []]  # failed at once, never placed anywhere


# --- the real clients -------------------------------------------------------------------------------


def sent_psmids(client: Any) -> set[int]:
    """The psmids of every attempt of this client's requests (not its health probes)."""
    return {a.psmid for r in client.core.ledger.records.values() for a in r.attempts}


def _store_read_count(client: Any, apqn: tuple[int, int]) -> None:
    key = bytes(range(32))
    client.key_store(7, key, apqn=apqn).result(timeout=10)
    assert [client.key_read(7, apqn=apqn).result(timeout=10) for _ in range(5)] == [key] * 5
    assert [client.counter_increment(1, apqn=apqn).result(timeout=10) for _ in range(8)] == list(range(1, 9))


@pytest.mark.timeout(60)
def test_threaded_client_on_emu() -> None:
    emu = Emulator(exact_profile("default"), clock="wall", seed=3)
    try:
        with apcrypto.connect("emu:", emulator=emu) as client:
            assert client.wait_ready(10)
            _store_read_count(client, (3, 1))
            with pytest.raises(TargetNotHeld):
                client.mod_expo(b"\x02", 3, 2**1023 + 1, apqn=(0, 9))
    finally:
        emu.close()
    mine = sent_psmids(client)
    assert len(mine) == 14
    assert {e.qid for e in emu.execution_log.entries() if e.psmid in mine} == {qid_of(3, 1)}


@pytest.mark.timeout(60)
def test_asyncio_client_on_emu() -> None:
    async def main() -> list[int]:
        async with apcrypto.aio.connect("emu:default") as client:
            assert await client.wait_ready(10)
            with pytest.raises(TargetNotHeld):
                client.counter_increment(1, card=99)
            return [await client.counter_increment(1, apqn=(2, 3)) for _ in range(8)]

    assert asyncio.run(main()) == list(range(1, 9))


@pytest.mark.timeout(90)
def test_over_tcp_with_a_real_server(server_factory) -> None:
    srv: ServerProcess = server_factory("--profile", "default", "--seed", "4")
    with apcrypto.connect(srv.data) as client:
        assert client.wait_ready(10)
        held = sorted(q for q in client.transport.qids() if q >> 8 in (2, 3))
        assert held, "the server gave this client no CCA queue"
        card, dom = held[0] >> 8, held[0] & 0xFF
        _store_read_count(client, (card, dom))
        with pytest.raises(TargetNotHeld):
            client.counter_increment(1, apqn=(card, 200))
    mine = sent_psmids(client)
    assert len(mine) == 14
    with srv.control_client(timeout=5.0) as ctl:
        ran = {e["qid"] for e in ctl.execution_log() if e["psmid"] in mine}
    assert ran == {held[0]}
