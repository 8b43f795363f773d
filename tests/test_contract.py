"""The driver's contract, run unchanged over every transport: emu:, tcp:// and usb://.

Same scenarios, same outcomes (DESIGN §5: "the same options and the same outcomes on every
transport"), each verdict checked against the emulator's execution log.  The emulator runs on a
wall clock here (the ZeroMQ server has no other), with the default profile's service times, so a
fault armed by request count lands while requests are both running and waiting.
"""

from __future__ import annotations

import concurrent.futures as cf

import pytest

from apcrypto.audit import audit
from apcrypto.errors import BadRequest, DeadlineExceeded, DeviceUnavailable, Indeterminate
from apcrypto.transport import open_transport
from apcrypto.transport.base import Command, Completion
from apformats.codes import ReplyCode, ResponseCode
from apformats.results import Instr, qid_card, qid_domain, qid_of
from tests._fixtures_contract import (  # fixtures
    Adapter,
    adapter,
    tcp_server,
    wait_until,
)
from tests._fixtures_zmq import E, collect, rsa_key

pytestmark = pytest.mark.timeout(60)

KEY = rsa_key(1024)


def settle(futs: list[cf.Future], timeout: float = 30.0) -> None:
    _done, pending = cf.wait(futs, timeout=timeout)
    assert not pending, f"{len(pending)} requests never resolved"


def check_audit(ad: Adapter, client, *, card_died_silently: bool = False):
    rep = audit(client.core.ledger, ad.executions())
    assert rep.ok, rep.summary()
    assert not rep.lost and not rep.ran_twice and not rep.completed_without_run
    if not card_died_silently:
        assert not rep.indeterminate_never_started, rep.summary()
    return rep


def test_normal_work_gives_correct_results(adapter: Adapter) -> None:
    c = adapter.connect()
    n = KEY.n
    me = [c.mod_expo(m.to_bytes(128, "big"), E, n) for m in range(2, 40)]
    crt = [
        c.mod_expo_crt(m.to_bytes(128, "big"), KEY.p, KEY.q, KEY.dp, KEY.dq, KEY.qinv) for m in range(2, 20)
    ]
    cnt = [c.counter_increment() for _ in range(12)]
    rnd = c.random_bytes(16)
    settle([*me, *crt, *cnt, rnd])
    assert [int.from_bytes(f.result(), "big") for f in me] == [pow(m, E, n) for m in range(2, 40)]
    assert [int.from_bytes(f.result(), "big") for f in crt] == [pow(m, KEY.d, n) for m in range(2, 20)]
    assert all(f.result() >= 1 for f in cnt) and len(rnd.result()) == 16
    rep = check_audit(adapter, c)
    assert rep.outcomes == {"completed": 38 + 18 + 12 + 1}


def test_machine_failure_splits_in_process_from_pending(adapter: Adapter) -> None:
    """Running counter increments come back Indeterminate; waiting ones are re-driven, once."""
    c = adapter.connect()
    adapter.control.machine_failure(2, recovery_time=0.03, after_requests=12)
    futs = [c.counter_increment() for _ in range(48)]
    settle(futs)
    indeterminate = [f for f in futs if isinstance(f.exception(), Indeterminate)]
    completed = [f for f in futs if f.exception() is None]
    assert len(indeterminate) + len(completed) == len(futs)
    mine = {a.psmid for r in c.core.ledger.records.values() for a in r.attempts}
    log = [e for e in adapter.executions() if e.psmid in mine]
    in_process = [e for e in log if e.outcome == "in-process-failed"]
    pending = [e for e in log if e.outcome == "pending-failed"]
    assert in_process and pending, "the failure must hit both running and waiting requests"
    assert len(indeterminate) == len(in_process)  # exactly the ones that had started
    assert all(qid_card(e.qid) == 2 for e in in_process + pending)
    rep = check_audit(adapter, c)
    assert rep.redriven == len(pending)  # every waiting one re-driven exactly once
    assert {f.exception().reason for f in indeterminate} == {"machine failure"}
    assert all(f.exception().qid is not None and qid_card(f.exception().qid) == 2 for f in indeterminate)


def test_checkstop_with_work_outstanding_then_back_by_itself(adapter: Adapter) -> None:
    c = adapter.connect()
    adapter.control.checkstop(3, after_requests=10)
    futs = [c.counter_increment() for _ in range(40)] + [c.random_bytes(8) for _ in range(8)]
    settle(futs)
    rep = check_audit(adapter, c, card_died_silently=True)
    assert rep.outcomes.get("indeterminate", 0) >= 1  # sent, unanswered, state-changing
    for f in futs[40:]:  # idempotent: re-driven elsewhere, never indeterminate
        assert f.exception() is None and len(f.result()) == 8
    states = {k: v["state"] for k, v in c.stats()["queues"].items() if k.startswith("03.")}
    assert set(states.values()) == {"offline"}
    adapter.control.restore(3)
    wait_until(
        lambda: all(v["state"] == "idle" for k, v in c.stats()["queues"].items() if k.startswith("03.")),
        what="card 03 back in service",
    )
    assert c.counter_increment().result(timeout=10) >= 1


def test_card_error_reply_fails_the_caller(adapter: Adapter) -> None:
    c = adapter.connect()
    adapter.control.fail_request(ReplyCode.OPERAND_INVALID, nth=1)
    f = c.mod_expo(b"\x05", E, KEY.n)
    with pytest.raises(BadRequest) as ei:
        f.result(timeout=10)
    assert ei.value.reply_code == ReplyCode.OPERAND_INVALID
    ok = c.mod_expo(b"\x05", E, KEY.n).result(timeout=10)
    assert int.from_bytes(ok, "big") == pow(5, E, KEY.n)
    check_audit(adapter, c)


def test_busy_and_external_reset_lose_nothing(adapter: Adapter) -> None:
    c = adapter.connect()
    adapter.control.busy(qid_of(0, 0), 0.02, after_requests=3)
    adapter.control.reset_in_progress(qid_of(1, 1), 0.02, after_requests=3)
    futs = [c.mod_expo(m.to_bytes(128, "big"), E, KEY.n) for m in range(2, 80)]
    settle(futs)
    assert [int.from_bytes(f.result(), "big") for f in futs] == [pow(m, E, KEY.n) for m in range(2, 80)]
    check_audit(adapter, c, card_died_silently=True)


def test_deadline_expires_while_queued_and_on_card(adapter: Adapter) -> None:
    c = adapter.connect()
    adapter.control.slow_engines(0, 400.0)
    adapter.control.slow_engines(1, 400.0)
    futs = [c.mod_expo(b"\x07", E, KEY.n, deadline=0.05) for _ in range(80)]
    settle(futs)
    errors = [f.exception() for f in futs]
    assert all(isinstance(e, DeadlineExceeded) for e in errors)
    assert any(e.may_have_run for e in errors) and any(not e.may_have_run for e in errors)
    assert c.stats()["outcomes"] == {"unavailable": 80}


def test_all_queues_of_a_kind_lost_is_device_unavailable(adapter: Adapter) -> None:
    c = adapter.connect()
    adapter.control.checkstop(0)
    adapter.control.checkstop(1)
    futs = [c.mod_expo(b"\x02", E, KEY.n) for _ in range(5)]
    settle(futs)
    assert all(isinstance(f.exception(), DeviceUnavailable) for f in futs)
    assert c.counter_increment().result(timeout=10) >= 1  # the other kind still serves
    adapter.control.restore(0)
    adapter.control.restore(1)


def test_domain_isolation(adapter: Adapter) -> None:
    c = adapter.connect(domains=[1])
    assert {qid_domain(int(k.split(".")[1], 16)) for k in c.stats()["queues"]} == {1}
    futs = [c.mod_expo(b"\x03", E, KEY.n) for _ in range(10)] + [c.counter_increment() for _ in range(4)]
    settle(futs)
    mine = {a.psmid for r in c.core.ledger.records.values() for a in r.attempts}
    assert {qid_domain(e.qid) for e in adapter.executions() if e.psmid in mine} == {1}
    c.close()  # a USB interface has one claimant at a time
    # below the driver: a session for domain 1 cannot touch domain 0's queue
    t = open_transport(adapter.url, domains=[1], **{k: v for k, v in adapter.options.items()})
    try:
        assert {qid_domain(q) for q in t.qids()} == {1}
        t.submit([Command(1, Instr.NQAP, qid_of(0, 0), 77, b"\x00\x50")])
        events = collect(t, lambda evs: any(isinstance(e, Completion) for e in evs))
        res = [e for e in events if isinstance(e, Completion)]
        assert res[0].tag == 1 and res[0].result.status.response_code == ResponseCode.Q_NOT_AVAIL
    finally:
        t.close()
