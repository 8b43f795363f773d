"""Helpers for the driver tests: a hand-driven core, simulations on the emulator, result checks.

* :class:`Script` drives a bare :class:`~apcrypto.core.driver.DriverCore` with hand-made
  :class:`~apformats.results.ApResult` values: it collects the commands, timers and resolutions the
  core emits so a test can answer each instruction exactly as it wants (no emulator, no clock).
* :func:`make_sim` builds an emulator and a :class:`~apcrypto.runners.sim.SimRunner` on one virtual
  clock and brings every queue into service.
* :func:`expected_me` / :func:`expected_crt` compute RSA results with plain ``pow``, independently
  of the firmware under test; :func:`check_audit` holds the ledger against the execution log.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any

from apcrypto.audit import AuditReport, audit
from apcrypto.core.actions import Action, ArmTimer, CancelTimer, Execute, Resolve
from apcrypto.core.config import FAST, DriverConfig
from apcrypto.core.driver import DriverCore
from apcrypto.core.ledger import Outcome
from apcrypto.core.queue import QState
from apcrypto.core.verdicts import _PROBE_EXPECT
from apcrypto.requests import ModExpo, ModExpoCrt
from apcrypto.runners.sim import SimRunner
from apcrypto.transport.base import Command
from apformats.codes import ResponseCode
from apformats.messages import build_type80
from apformats.results import ApResult, Instr, qid_of
from apformats.status import HwInfo, QueueStatus
from emulator import Emulator, load_profile
from tests._fixtures_emulator import E, Key, key

__all__ = [
    "HW_ACCEL",
    "HW_CCA",
    "PROBE_REPLY",
    "E",
    "Key",
    "Script",
    "check_audit",
    "crt_request",
    "exact_profile",
    "expected_crt",
    "expected_me",
    "key",
    "make_sim",
    "me_request",
    "res",
    "st",
]

RC = ResponseCode

#: TAPQ hardware info of a CEX8A accelerator / a CEX8C coprocessor with ``qd = 7`` (8 slots).
HW_ACCEL = HwInfo(at=14, nd=85, ml=3, qd=7, accel=True, mex4k=True, crt4k=True, class_=0x80)
HW_CCA = HwInfo(at=14, nd=85, ml=3, qd=7, cca=True, apsc=True, class_=0x80)

#: The type 80 reply a healthy accelerator gives to the driver's known-answer probe.
PROBE_REPLY = build_type80(_PROBE_EXPECT)


def st(
    rc: int = RC.NORMAL,
    *,
    empty: bool = False,
    replies: bool = False,
    full: bool = False,
    irq: bool = False,
) -> QueueStatus:
    """A status word with the given response code and bits."""
    return QueueStatus(rc, queue_empty=empty, replies_waiting=replies, queue_full=full, irq_enabled=irq)


def res(
    rc: int = RC.NORMAL,
    *,
    psmid: int = 0,
    reply: bytes = b"",
    hw: HwInfo | None = None,
    **bits: bool,
) -> ApResult:
    """An instruction result: status word (``bits`` as for :func:`st`), psmid, reply, GR2."""
    return ApResult(st(rc, **bits), psmid=psmid, reply=reply, hwinfo=hw)


@dataclass
class Emitted:
    """Everything one call into the core produced."""

    commands: list[Command]
    armed: dict[tuple[Any, ...], float]
    cancelled: list[tuple[Any, ...]]
    resolved: list[Resolve]


class Script:
    """Drive a :class:`DriverCore` by hand.

    Every emitted command waits in :attr:`pending` (by tag) until the test answers it with
    :meth:`answer`; timers the core armed are in :attr:`timers` and fire only through :meth:`fire`;
    every ``Resolve`` lands in :attr:`resolved` -- a second one for the same request fails the test
    at once.  :attr:`history` keeps every command ever emitted, in order.
    """

    def __init__(
        self,
        config: DriverConfig = FAST,
        *,
        interrupts: bool = True,
        psmid_base: int = 0,
    ) -> None:
        self.core = DriverCore(config, psmid_base=psmid_base, supports_interrupts=interrupts)
        self.pending: dict[int, Command] = {}
        self.history: list[Command] = []
        self.timers: dict[tuple[Any, ...], float] = {}
        self.resolved: dict[int, Resolve] = {}
        self.now = 0.0
        self.last = Emitted([], {}, [], [])

    # -- feeding the core --
    def _take(self, actions: list[Action]) -> Emitted:
        em = Emitted([], {}, [], [])
        for a in actions:
            if isinstance(a, Execute):
                for c in a.commands:
                    assert c.tag not in self.pending, f"tag {c.tag} emitted twice"
                    self.pending[c.tag] = c
                    self.history.append(c)
                    em.commands.append(c)
            elif isinstance(a, ArmTimer):
                assert a.at >= self.now, a  # absolute deadlines, never in the past
                self.timers[a.key] = a.at
                em.armed[a.key] = a.at - self.now
            elif isinstance(a, CancelTimer):
                self.timers.pop(a.key, None)
                em.cancelled.append(a.key)
            elif isinstance(a, Resolve):
                assert a.rid not in self.resolved, f"request {a.rid} resolved twice: {a}"
                self.resolved[a.rid] = a
                em.resolved.append(a)
            else:  # pragma: no cover - the action set is closed
                raise AssertionError(f"unknown action {a!r}")
        self.last = em
        return em

    def add_queue(self, qid: int) -> Emitted:
        return self._take(self.core.add_queue(qid, self.now))

    def submit(self, request: Any, **kw: Any) -> int:
        rid, actions = self.core.submit(request, now=self.now, **kw)
        self._take(actions)
        return rid

    def answer(self, cmd: Command, result: ApResult) -> Emitted:
        assert cmd.tag in self.pending, f"{cmd} is not pending"
        del self.pending[cmd.tag]
        return self._take(self.core.on_completion(cmd.tag, result, self.now))

    def fire(self, key: tuple[Any, ...]) -> Emitted:
        """Fire the armed timer ``key`` now (time moves to its due time if that is later)."""
        assert key in self.timers, f"timer {key} is not armed (armed: {sorted(self.timers, key=str)})"
        self.now = max(self.now, self.timers.pop(key))
        return self._take(self.core.on_timer(key, self.now))

    def advance(self) -> tuple[Any, ...]:
        """Fire the timer due first (ties: the one armed first); returns its key."""
        key = min(self.timers, key=lambda k: self.timers[k])
        self.fire(key)
        return key

    def interrupt(self, qid: int) -> Emitted:
        return self._take(self.core.on_interrupt(qid, self.now))

    def lose_transport(self, *, permanent: bool = True, reason: str = "test") -> Emitted:
        tags = list(self.pending)
        self.pending.clear()  # the core settles every lost tag, permanent loss or not
        return self._take(self.core.on_transport_lost(tags, permanent=permanent, reason=reason, now=self.now))

    # -- looking at what is pending --
    def cmds(self, instr: Instr | None = None, qid: int | None = None) -> list[Command]:
        return [
            c
            for c in self.pending.values()
            if (instr is None or c.instr is instr) and (qid is None or c.qid == qid)
        ]

    def one(self, instr: Instr, qid: int | None = None) -> Command:
        found = self.cmds(instr, qid)
        assert len(found) == 1, f"expected one pending {instr.name}, got {found} (all: {self.pending})"
        return found[0]

    def state(self, qid: int) -> QState:
        return self.core.queues[qid].state

    def outstanding(self, qid: int) -> int:
        """NQAPs of requests the card holds or that are in flight to it (what the slots bound)."""
        q = self.core.queues[qid]
        return len(q.on_card) + len(q.sending)

    # -- canned sequences --
    def bring_up(self, qid: int, hw: HwInfo = HW_ACCEL, *, irq: bool = True) -> list[Instr]:
        """Answer the bring-up of ``qid`` with a healthy card; returns the instructions seen, in
        order, until the queue is idle."""
        seen: list[Instr] = []

        def take(instr: Instr) -> Command:
            c = self.one(instr, qid)
            seen.append(instr)
            return c

        em = self.add_queue(qid)
        assert [c.instr for c in em.commands] == [Instr.RAPQ]
        self.answer(take(Instr.RAPQ), res())
        assert self.state(qid) is QState.RESET_WAIT
        assert not self.cmds(qid=qid), "nothing is issued before the reset-wait poll"
        self.fire(("poll", qid))
        self.answer(take(Instr.TAPQ), res(hw=hw, empty=True))
        if irq:
            assert self.state(qid) is QState.SETIRQ_WAIT
            self.answer(take(Instr.AQIC), res(empty=True))
            self.fire(("poll", qid))
            self.answer(take(Instr.TAPQ), res(hw=hw, empty=True, irq=True))
        assert self.state(qid) is QState.PROBE
        probe = take(Instr.NQAP)
        self.answer(probe, res(irq=irq))
        if irq:
            self.interrupt(qid)
        else:
            self.fire(("poll", qid))
        dq = take(Instr.DQAP)
        reply = PROBE_REPLY if hw.mode == "accel" else _cca_probe_reply()
        self.answer(dq, res(psmid=probe.psmid, reply=reply, empty=True, irq=irq))
        assert self.state(qid) is QState.IDLE, self.state(qid)
        assert not self.cmds(qid=qid)
        return seen


def _cca_probe_reply() -> bytes:
    from apformats.messages import build_cprb_reply

    return build_cprb_reply("RL", bytes(8))


# --- RSA helpers -------------------------------------------------------------------------------


def me_request(x: int, k: Key) -> ModExpo:
    return ModExpo(x.to_bytes(k.size, "big"), E, k.n)


def crt_request(x: int, k: Key) -> ModExpoCrt:
    return ModExpoCrt(x.to_bytes(k.size, "big"), k.p, k.q, k.dp, k.dq, k.qinv)


def expected_me(x: int, k: Key) -> bytes:
    return pow(x, E, k.n).to_bytes(k.size, "big")


def expected_crt(x: int, k: Key) -> bytes:
    return pow(x, k.d, k.n).to_bytes(k.size, "big")


# --- simulations -------------------------------------------------------------------------------


def exact_profile(name: str = "small", **timing: Any) -> Any:
    """A bundled profile without jitter (and with any other timing field replaced)."""
    p = load_profile(name)
    return replace(p, timing=replace(p.timing, **{"jitter": 0.0, **timing}))


#: ``FAST`` with a ledger that remembers every request of a test run (the default keeps only the
#: newest 1,000 decided ones): an audit of part of a run would prove nothing.
FAST_AUDITED = FAST.with_(ledger_history=1_000_000)


def make_sim(
    profile: Any = "small",
    *,
    seed: int = 0,
    config: DriverConfig = FAST_AUDITED,
    settle: float = 0.05,
    **kw: Any,
) -> tuple[Emulator, SimRunner]:
    """An emulator and a simulation runner on its virtual clock, every queue in service."""
    emu = Emulator(profile, seed=seed)
    sim = SimRunner(emu, config, **kw)
    sim.run(sim.now() + settle)
    states = {q.qid: q.state for q in sim.core.queues.values()}
    assert all(s.in_service for s in states.values()), f"bring-up did not finish: {states}"
    return emu, sim


def outcome_of(fut: Future[Any]) -> Any:
    """The result of a done future, or its exception (never raises)."""
    assert fut.done()
    exc = fut.exception()
    return exc if exc is not None else fut.result()


def check_audit(sim: SimRunner, emu: Emulator) -> AuditReport:
    """Audit the ledger against the execution log; fail with the report on any safety breach."""
    report = audit(sim.core.ledger, emu.execution_log.entries())
    assert report.ok, report.summary()
    assert report.requests == sim.core.ledger.counters["submitted"], "the ledger forgot requests"
    return report


def queue_ids(profile: str = "small") -> list[int]:
    p = load_profile(profile)
    return sorted(qid_of(c.id, d) for c in p.cards for d in c.usage_domains)


def psmids_of(sim: SimRunner, rids: Iterable[int]) -> list[int]:
    """Every attempt's psmid of the given requests."""
    recs = sim.core.ledger.records
    return [a.psmid for r in rids for a in recs[r].attempts]


def check_verdicts(sim: SimRunner, emu: Emulator, *, card_may_die: bool = False) -> dict[str, int]:
    """Every decided request's verdict against the execution log (what actually ran).

    * completed: its last attempt completed on a card;
    * indeterminate: some attempt may have run -- the card said *in-process* or the card went silent
      (checkstop, reset, lost transport) holding it; never for work the card reported *pending*;
    * a *request-pending* machine-failure reply the driver received is followed by another attempt
      (re-driven), unless the caller's deadline decided the request first;
    * an *in-process* reply for state-changing work is never followed by another attempt;
    * no state-changing request started twice (the audit).

    ``card_may_die`` allows indeterminate verdicts for work that never started when a card died
    silently (the ledger must assume the worst).  Returns counts per log outcome seen.
    """
    report = audit(sim.core.ledger, emu.execution_log.entries())
    assert report.ok, report.summary()
    assert report.requests == sim.core.ledger.counters["submitted"], "the ledger forgot requests"
    assert not report.indeterminate_never_started, report.summary()
    if not card_may_die:
        assert not report.indeterminate_card_silent, report.summary()
    seen: dict[str, int] = {}
    log = emu.execution_log
    for rec in sim.core.ledger.records.values():
        assert rec.outcome is not None, f"request {rec.rid} has no outcome"
        execs = [(i, e) for i, a in enumerate(rec.attempts) for e in log.for_psmid(a.psmid)]
        for _, e in execs:
            seen[e.outcome] = seen.get(e.outcome, 0) + 1
        for i, e in execs:
            later = [a for a in rec.attempts[i + 1 :] if a.fate != "bounced"]
            # the card's request-pending reply reached the driver (not: it gave up on the queue
            # first, or the caller's deadline came first): re-driven
            told = rec.attempts[i].fate == "mf-pending"
            if e.outcome == "pending-failed" and told and rec.outcome is not Outcome.UNAVAILABLE:
                assert len(later) >= 1, f"pending request {rec.rid} not re-driven: {rec}"
            if e.outcome == "in-process-failed" and not rec.idempotent:
                # indeterminate -- or unavailable, when the caller's deadline came first
                assert rec.outcome in (Outcome.INDETERMINATE, Outcome.UNAVAILABLE), (rec, e)
                assert not later, f"state-changing request {rec.rid} re-driven after it ran: {rec}"
        if rec.outcome is Outcome.COMPLETED:
            last = rec.attempts[-1]
            assert any(e.outcome == "completed" for e in log.for_psmid(last.psmid)), rec
    return seen
