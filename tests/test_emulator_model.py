"""A Hypothesis state machine: random instructions, faults and clock steps against a plain model.

The execution log is the ground truth the driver is judged by, so this checks it is exact: every
accepted request ends in exactly one delivered reply or one ``discarded`` entry, replies match what
the log says happened (a real result, an error, in-process or request-pending), no queue holds more
than its slots, and no engine ever runs two requests at once.
"""

from __future__ import annotations

from collections import defaultdict
from itertools import pairwise

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from apformats.codes import MachineFailureState, ResponseCode
from apformats.messages import parse_reply
from apformats.results import qid_card
from emulator import Emulator
from tests._fixtures_emulator import E, key, mex

RC = ResponseCode
QIDS = (0x0000, 0x0001, 0x0100, 0x0101)
#: Fault rules act only when this draws 0, so the machine spends most steps doing work.
RARELY = st.integers(0, 5)


class EmulatorMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.emu = Emulator("small", seed=11)
        self.next_psmid = 1
        self.held: dict[int, set[int]] = {q: set() for q in QIDS}  # accepted, not yet dequeued/dropped
        self.delivered: dict[int, bytes] = {}
        self.dropped: set[int] = set()
        self.x: dict[int, int] = {}

    # --- instructions --------------------------------------------------------------------------

    @rule(q=st.sampled_from(QIDS), n=st.integers(1, 4))
    def nqap(self, q: int, n: int) -> None:
        for _ in range(n):
            p = self.next_psmid
            self.next_psmid += 1
            self.x[p] = p + 1
            before = len(self.held[q])
            rc = self.emu.nqap(q, p, mex(p + 1)).status.rc
            if rc == RC.NORMAL:
                self.held[q].add(p)
            else:
                assert rc != RC.Q_FULL or before == 8
                assert rc in (RC.Q_FULL, RC.BUSY, RC.CHECKSTOPPED, RC.RESET_IN_PROGRESS), rc

    @rule(q=st.sampled_from(QIDS))
    def dqap(self, q: int) -> None:
        while True:
            r = self.emu.dqap(q)
            if r.status.rc != RC.NORMAL:
                if r.status.rc == RC.Q_FULL:  # NO_PENDING_REPLY
                    assert r.status.queue_empty == (not self.held[q])
                return
            assert r.psmid in self.held[q] and r.psmid not in self.delivered
            self.held[q].discard(r.psmid)
            self.delivered[r.psmid] = r.reply

    @rule(q=st.sampled_from(QIDS), go=RARELY)
    def rapq(self, q: int, go: int) -> None:
        if go == 0 and self.emu.rapq(q).status.rc == RC.NORMAL:
            self.dropped |= self.held[q]
            self.held[q].clear()

    @rule(dt=st.sampled_from([0.0001, 0.0003, 0.001, 0.01]))
    def advance(self, dt: float) -> None:
        self.emu.clock.advance(dt)

    # --- faults ---------------------------------------------------------------------------------

    @rule(card=st.sampled_from([0, 1]), recovery=st.sampled_from([0.0005, 0.005]), go=RARELY)
    def machine_failure(self, card: int, recovery: float, go: int) -> None:
        if go == 0:
            self.emu.control.machine_failure(card, recovery)

    @rule(card=st.sampled_from([0, 1]), go=RARELY)
    def checkstop(self, card: int, go: int) -> None:
        if go != 0:
            return
        if self.emu.card_state(card).value in ("normal", "recovering"):
            for q in QIDS:
                if qid_card(q) == card:
                    self.dropped |= self.held[q]
                    self.held[q].clear()
        self.emu.control.checkstop(card)

    @precondition(lambda self: any(self.emu.card_state(c).value == "checkstopped" for c in (0, 1)))
    @rule()
    def restore(self) -> None:
        for c in (0, 1):
            self.emu.control.restore(c)

    @rule(q=st.sampled_from(QIDS), go=RARELY)
    def busy(self, q: int, go: int) -> None:
        if go == 0:
            self.emu.control.busy(q, 0.001)

    # --- invariants -----------------------------------------------------------------------------

    @invariant()
    def held_matches_the_model(self) -> None:
        s = self.emu.stats()
        for q in QIDS:
            assert s.queue(q).held == len(self.held[q]) <= 8

    def teardown(self) -> None:
        """Heal, finish everything, drain; then judge the log."""
        emu = self.emu
        emu.control.clear()
        emu.clock.run_until_idle()
        for q in QIDS:
            self.dqap(q)
        log = emu.execution_log
        entries = log.entries()
        assert {e.psmid for e in entries} == set(self.delivered) | self.dropped
        assert not (set(self.delivered) & self.dropped)
        k = key()
        for e in entries:
            assert e.outcome not in ("queued", "running"), e
            assert (e.engine is None) == (e.started is None) or e.outcome == "pending-failed", e
            if e.psmid in self.dropped:
                assert e.outcome == "discarded", e
                continue
            rep = parse_reply(self.delivered[e.psmid])
            if e.outcome == "completed":
                assert int.from_bytes(rep.result, "big") == pow(self.x[e.psmid], E, k.n)
            elif e.outcome == "in-process-failed":
                assert rep.mf_state == MachineFailureState.IN_PROCESS and rep.engine == e.engine
                assert e.started is not None
            elif e.outcome == "pending-failed":
                assert rep.mf_state == MachineFailureState.REQUEST_PENDING and e.started is None
            else:
                raise AssertionError(e)
        # No engine ever ran two requests at once; no card ran more than its engines.
        spans: dict[tuple[int, int], list[tuple[float, float]]] = defaultdict(list)
        for e in entries:
            if e.started is not None and e.ended is not None and e.engine is not None:
                spans[(qid_card(e.qid), e.engine)].append((e.started, e.ended))
        for (_card, engine), ss in spans.items():
            assert engine < 2
            ss.sort()
            for (_s0, e0), (s1, _e1) in pairwise(ss):
                assert s1 >= e0 - 1e-12, (engine, ss)


TestEmulatorMachine = EmulatorMachine.TestCase
TestEmulatorMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
