"""A Hypothesis state machine over the simulation runner (reference/style.md §5, "system machine").

Rules act on the real system -- submit work, inject a fault through the emulator's control plane,
restore a card, let virtual time pass -- and Hypothesis draws the *schedule* (which fault, where,
when, between which submissions), so a failure shrinks to a short program.  After every step:
no queue holds more than its slots, no request has more than one outcome, no state-changing request
has run twice and every completion is backed by a run (the audit against the execution log), every
RSA result that came back is right.  At the end, faults healed: every request decided, every
verdict consistent with the execution log, every queue back in service.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from apcrypto.audit import audit
from apcrypto.requests import CounterIncrement, RandomBytes
from apcrypto.runners.sim import SimRunner
from apformats.codes import ReplyCode as RY
from apformats.results import qid_of
from emulator import Emulator
from tests._fixtures_driver import check_verdicts, expected_me, key, me_request

K = key(1024)
CARDS = (0, 1, 2, 3)
QIDS = [qid_of(c, d) for c in CARDS for d in range(4)]
FAIL_CODES = [RY.OPERAND_INVALID, RY.MACHINE_FAILURE, RY.TRANSPORT_FAIL, RY.MESSAGE_TYPE, 0xEE]


class DriverMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.emu = Emulator("default", seed=0)
        self.sim = SimRunner(self.emu)
        self.sim.run(self.sim.now() + 0.05)
        self.futs: list[tuple[Future[Any], Any]] = []  # (future, expected ME result or None)
        self.dead: set[int] = set()
        self.outcomes_seen = 0

    # -- rules --
    @rule(
        n=st.integers(1, 24),
        x=st.integers(2, 1 << 64),
        idempotent=st.booleans(),
        deadline=st.none() | st.floats(0.0005, 0.2),
    )
    def submit_me(self, n: int, x: int, idempotent: bool, deadline: float | None) -> None:
        for i in range(n):
            f = self.sim.submit(me_request(x + i, K), idempotent=idempotent, deadline=deadline)
            self.futs.append((f, expected_me(x + i, K)))

    @rule(n=st.integers(1, 12), idempotent=st.booleans(), rb=st.booleans())
    def submit_cca(self, n: int, idempotent: bool, rb: bool) -> None:
        for _ in range(n):
            req = RandomBytes(16) if rb else CounterIncrement(1)
            self.futs.append((self.sim.submit(req, idempotent=idempotent), None))

    @rule(card=st.sampled_from(CARDS), recovery=st.floats(0.001, 0.3), after=st.floats(0.0, 0.01))
    def machine_failure(self, card: int, recovery: float, after: float) -> None:
        self.emu.control.machine_failure(card, recovery_time=recovery, at=self.sim.now() + after)

    @rule(card=st.sampled_from(CARDS), deconfigure=st.booleans())
    def kill_card(self, card: int, deconfigure: bool) -> None:
        (self.emu.control.deconfigure if deconfigure else self.emu.control.checkstop)(card)
        self.dead.add(card)

    @rule(card=st.sampled_from(CARDS))
    def restore(self, card: int) -> None:
        self.emu.control.restore(card)  # harmless on a healthy card
        self.dead.discard(card)

    @rule(qid=st.sampled_from(QIDS), duration=st.floats(0.0005, 0.1), reset=st.booleans())
    def queue_fault(self, qid: int, duration: float, reset: bool) -> None:
        if reset:
            self.emu.control.reset_in_progress(qid, duration)
        else:
            self.emu.control.busy(qid, duration)

    @rule(code=st.sampled_from(FAIL_CODES), qid=st.none() | st.sampled_from(QIDS), nth=st.integers(1, 10))
    def fail_request(self, code: int, qid: int | None, nth: int) -> None:
        self.emu.control.fail_request(code, qid=qid, nth=nth)

    @rule(dt=st.floats(0.0, 0.05))
    def advance(self, dt: float) -> None:
        self.sim.run(self.sim.now() + dt)

    # -- invariants, after every step --
    @invariant()
    def slots_never_exceeded(self) -> None:
        for q in self.sim.core.queues.values():
            assert len(q.on_card) + len(q.sending) <= q.slots, hex(q.qid)

    @invariant()
    def one_outcome_per_request(self) -> None:
        ledger = self.sim.core.ledger
        decided = sum(ledger.outcomes.values())
        done = sum(f.done() for f, _ in self.futs)
        assert decided == done  # every decision reached its future, none twice (Future refuses)
        assert decided >= self.outcomes_seen  # outcomes never taken back
        self.outcomes_seen = decided

    @invariant()
    def host_backlog_counts_what_waits(self) -> None:
        waiting = sum(
            1
            for r in self.sim.core.ledger.records.values()
            if r.outcome is None and r.phase.value == "queued"
        )
        assert self.sim.core.backlog_size == waiting

    @invariant()
    def nothing_waits_without_a_timer(self) -> None:
        """Every undecided request is bounded by something armed: its deadline; the grace of its
        kind when no queue of that kind is in service; or, once handed to a queue, that queue's
        reply or state-limit timer, or the NQAP's own answer still to come."""
        core = self.sim.core
        armed = core.out.armed
        views = core.queue_states()
        served = {v.mode for v in views.values() if v.in_service}
        for r in core.ledger.records.values():
            if r.outcome is not None or r.has_deadline:
                continue
            if r.phase.value == "queued":
                assert r.mode in served or ("unavailable", r.mode) in armed, (r, views)
                continue
            att = r.current
            assert att is not None
            q = core.queues[att.qid]
            nqap_out = any(rid == r.rid for rid in q.sending.values())
            bounded = (
                ("reply", q.qid) in armed
                or ("limit", q.qid) in armed
                or ("grace", q.qid) in armed
                or nqap_out
            )
            assert bounded, (r, views[q.qid], {k: v for k, v in armed.items() if q.qid in k})

    @invariant()
    def safety_against_the_execution_log(self) -> None:
        rep = audit(self.sim.core.ledger, self.emu.execution_log.entries())
        assert not rep.ran_twice, rep.summary()
        assert not rep.completed_without_run, rep.summary()
        assert not rep.indeterminate_never_started, rep.summary()

    @invariant()
    def results_are_right(self) -> None:
        for f, want in self.futs:
            if want is not None and f.done() and f.exception() is None:
                assert f.result() == want

    def teardown(self) -> None:
        try:
            self.emu.control.clear()  # heal everything, then liveness
            self.dead.clear()
            self.sim.run_until_settled([f for f, _ in self.futs], max_time=30.0)
            check_verdicts(self.sim, self.emu, card_may_die=True)
            t = self.sim.now()
            while not all(q.state.in_service for q in self.sim.core.queues.values()):
                assert self.sim.step() and self.sim.now() - t < 3.0, "queues not back after healing"
        finally:
            self.sim.shutdown()


DriverMachine.TestCase.settings = settings(
    max_examples=120,
    stateful_step_count=40,
    deadline=None,
    derandomize=True,  # make test is deterministic; a failure prints the shrunk program
    suppress_health_check=[HealthCheck.too_slow],
)
TestDriverMachine = DriverMachine.TestCase
