"""The verdicts: what a reply, a lost attempt or a deadline means for a request (DESIGN §4.3).

Deliver a reply, judge an error reply, decide an attempt that failed or a card that will never
answer (from the ledger: never sent never ran, sent and unanswered may have run), end a request at
its deadline or at the end of its grace, and resolve: every ``Resolve`` the core emits is written
here.  What a verdict means for the *queue* (recover from a machine failure, reset, drain then go
offline, go into service after a good probe) is not done here: it comes back as a
:class:`Consequence`, together with the requests to re-drive, and the queue machine
(:mod:`apcrypto.core.machine`) carries it out in the order that keeps the promise -- the queue
leaves service first, then the re-driven work goes back to the host, so a re-drive never lands on
the queue (or the batch) that is being taken down.

References only the pieces below it: the configuration, the ledger, the dispatcher (for the
accounting of waiting work and of queue load), the outbox and the classifier.  It reads a queue's
state and its bookkeeping of held messages (``on_card``, ``sending``); it never changes a queue's
state, and never refers to the machine or to ``DriverCore``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum
from typing import Any

from apcrypto.core.classifier import Classifier, Row, Verdict
from apcrypto.core.config import DriverConfig
from apcrypto.core.dispatch import Dispatcher
from apcrypto.core.formatter import Fate, decide
from apcrypto.core.ledger import Ledger, Outcome, Phase, Record
from apcrypto.core.outbox import Outbox
from apcrypto.core.queue import Queue
from apcrypto.core.timers import TimerKey
from apcrypto.errors import (
    ApcryptoError,
    BadRequest,
    ClientClosed,
    DeadlineExceeded,
    DeviceUnavailable,
    Indeterminate,
)
from apcrypto.requests import ModExpo, RandomBytes, Request
from apformats.codes import MachineFailureState
from apformats.errors import FormatError
from apformats.messages import parse_reply
from apformats.results import qid_str

log = logging.getLogger("apcrypto.core")

# Known-answer probe for accelerators: an odd 512-bit modulus and its expected ME result.
_PROBE_MOD = (1 << 511) + 0x2F
_PROBE_EXPECT = pow(2, 65537, _PROBE_MOD).to_bytes(64, "big")


def probe_request(mode: str) -> tuple[Request, Any] | None:
    """The health probe for a card of ``mode`` and its expected answer (None: length and type are
    checked); None when the mode has no probe."""
    if mode == "accel":
        return ModExpo(b"\x02", 65537, _PROBE_MOD), _PROBE_EXPECT
    if mode == "cca":
        return RandomBytes(8), None  # no known answer for random bytes: length and type are checked
    return None


class QueueNext(Enum):
    """What a verdict asks of the queue it came from (the machine maps each to one transition)."""

    NOTHING = "nothing"
    RECOVER_MF = "recover-mf"  # machine failure: drain the stored replies, no new work on its card
    DRAIN_THEN_OFFLINE = "drain-then-offline"  # the card answers but cannot serve: collect, then offline
    RESET = "reset"  # protocol state suspect: reset the queue (``why``)
    SERVICE = "service"  # the health probe answered right
    PROBE_FAILED = "probe-failed"  # the health probe answered wrong: a failed reset attempt


@dataclass(frozen=True, slots=True)
class Consequence:
    """A verdict's answer to the machine: the queue's next step and the requests to re-drive.

    ``redrive`` lists records the verdict decided to send again (their budget and ``avoid_qid`` are
    already updated); the machine puts them back on the host *after* the queue step, then places
    them.  ``why`` says why, for the queue's log and offline reason."""

    queue: QueueNext = QueueNext.NOTHING
    why: str = ""
    redrive: tuple[Record, ...] = ()


#: The common answer (a reply delivered, nothing for the queue to do): one shared value.
NOTHING = Consequence()


class Verdicts:
    def __init__(
        self,
        cfg: DriverConfig,
        ledger: Ledger,
        dispatch: Dispatcher,
        out: Outbox,
        clf: Classifier,
    ) -> None:
        self.cfg = cfg
        self.ledger = ledger
        self.dispatch = dispatch
        self.out = out
        self.clf = clf
        self._unplaced: dict[str, float] = {}  # mode -> since when no queue of it is in service

    # ---------------------------------------------------------------- outcomes
    def resolve(
        self, rec: Record, outcome: Outcome, *, value: Any = None, error: ApcryptoError | None = None
    ) -> None:
        """The one place a request is decided: ledger, its timers, and the ``Resolve`` action."""
        self.ledger.close(rec, outcome)
        if rec.has_deadline:
            self.out.disarm(TimerKey.deadline(rec.rid))
        if rec.target is not None:
            self.out.disarm(TimerKey.target(rec.rid))
        self.out.resolve(rec.rid, value, error)

    def fail_unavailable(self, rec: Record, why: str) -> None:
        self.resolve(rec, Outcome.UNAVAILABLE, error=DeviceUnavailable(why))

    def fail_backlog(self, mode: str, why: str) -> None:
        for rec in self.dispatch.take_all(mode):
            self.fail_unavailable(rec, why)

    def fail_dead_kinds(self) -> None:
        """Fail the waiting work of every kind that no queue can serve any more."""
        for mode in sorted(self.dispatch.modes()):
            if mode != "unknown" and not self.dispatch.mode_exists(mode):
                self.fail_backlog(mode, f"no queue of kind {mode!r}")
        self.dispatch.dirty = True  # kinds whose queues are all offline wait their grace

    def close_all(self) -> None:
        """The client closes: every undecided request ends ``ClientClosed`` (may-have-run if sent)."""
        for rec in list(self.ledger.in_flight()):
            sent = rec.phase in (Phase.SENDING, Phase.ON_CARD)
            err = ClientClosed(
                "client closed before the request was decided" + (" (it may have run)" if sent else ""),
                qid=rec.current.qid if rec.current else None,
                psmid=rec.current.psmid if rec.current else None,
            )
            self.resolve(rec, Outcome.UNAVAILABLE, error=err)

    # ---------------------------------------------------------------- replies
    def deliver(self, q: Queue, psmid: int, data: bytes) -> Consequence:
        """A reply dequeued from ``q`` (not the health probe's: the machine checks that first)."""
        q.occ_to(self.out.now)  # before held changes
        rid = q.on_card.pop(psmid, None)
        if rid is None:
            rid = self._reply_before_status(q, psmid)
        if rid is None:
            self.ledger.counters["stray_replies"] += 1
            log.warning("queue %s: reply for unknown psmid %#x dropped", qid_str(q.qid), psmid)
            return NOTHING
        rec = self.ledger.records.get(rid)
        if rec is None:
            self.ledger.counters["late_replies"] += 1
            return self.late_reply_says(q, data)
        self.dispatch.unload(q, rec)
        if rec.outcome is not None:  # rec.resolved
            self.ledger.counters["late_replies"] += 1
            log.info("queue %s: late reply for decided request %d dropped", qid_str(q.qid), rid)
            return self.late_reply_says(q, data)
        att = rec.attempts[-1]  # rec.current: it was on the card, so it has one
        assert att.psmid == psmid
        try:
            reply = parse_reply(data)
        except FormatError as exc:
            return self._protocol_anomaly(q, rec, f"malformed reply: {exc}")
        if reply.kind == "ok":
            try:
                value = rec.request.decode(reply)
            except ValueError as exc:
                return self._protocol_anomaly(q, rec, f"reply does not fit the request: {exc}")
            att.fate = "completed"
            self.resolve(rec, Outcome.COMPLETED, value=value)
            return NOTHING
        if reply.msg_type == 0x86 and reply.reply_code == 0:
            row = self.clf.cca(reply.rtcode or 0)
        else:
            row = self.clf.reply(reply.reply_code, reply.mf_state)
        return self._error_reply(q, rec, row, reply)

    def _error_reply(self, q: Queue, rec: Record, row: Row, reply: Any) -> Consequence:
        att = rec.current
        assert att is not None
        codes = {
            "qid": q.qid,
            "psmid": att.psmid,
            "reply_code": reply.reply_code,
            "mf_state": int(reply.mf_state) if reply.mf_state is not None else None,
        }
        v = row.verdict
        if v is Verdict.FAIL_CALLER:
            att.fate = "error"
            extra = f" (CCA rc {reply.rtcode}/rs {reply.rscode})" if reply.msg_type == 0x86 else ""
            self.resolve(
                rec,
                Outcome.FAILED,
                error=BadRequest(f"card rejected the request: {row.note}{extra}", **codes),
            )
            return NOTHING
        if v is Verdict.MACHINE_FAILURE:
            att.fate = (
                "mf-pending" if reply.mf_state == MachineFailureState.REQUEST_PENDING else "mf-in-process"
            )
            att.cleared = not row.may_have_run
            self.ledger.counters["mf_replies"] += 1
            # out of service first (and its card with it): the re-drive must find a queue that is
            # really in service, never this one nor its card's others, which are failing too
            redo = self._judge(rec, q, may_have_run=row.may_have_run, why="machine failure", codes=codes)
            return Consequence(QueueNext.RECOVER_MF, "machine failure", redo)
        att.fate = "error"
        # not cleared, even when the card says it refused the message unexecuted: the card took it
        # and an engine picked it up, so a later deadline says may_have_run=True (the contract of
        # DeadlineExceeded: "handed to a card"); only never-sent and request-pending attempts clear.
        # The queue's consequence comes first (the machine's order), so that a re-drive never picks
        # the queue it failed on.
        redo = self._judge(rec, q, may_have_run=row.may_have_run, why=f"error reply: {row.note}", codes=codes)
        if v is Verdict.RESET_QUEUE:
            return Consequence(QueueNext.RESET, row.note, redo)
        if v is Verdict.TAKE_OFFLINE:
            # the card still answers: collect what it holds for us first (no new work meanwhile),
            # then take the queue out of service; only the unreadable reply's request is in doubt
            return Consequence(QueueNext.DRAIN_THEN_OFFLINE, row.note, redo)
        return Consequence(redrive=redo) if redo else NOTHING

    def late_reply_says(self, q: Queue, data: bytes) -> Consequence:
        """A reply for a request already decided (its deadline came first) is not delivered, but
        what it says about the queue still counts: a machine-failure reply means the card failed
        and holds more such replies; the queue must not take new work until it has recovered
        (campaign seeds 369 and 10008).  A queue already out of service is being handled by its
        own machine."""
        if not q.state.in_service:
            return NOTHING
        try:
            reply = parse_reply(data)
        except FormatError:
            return NOTHING
        if reply.kind == "ok" or (reply.msg_type == 0x86 and reply.reply_code == 0):
            return NOTHING
        v = self.clf.reply(reply.reply_code, reply.mf_state).verdict
        if v is Verdict.MACHINE_FAILURE:
            self.ledger.counters["mf_replies"] += 1
            return Consequence(QueueNext.RECOVER_MF, "late machine-failure reply")
        if v is Verdict.RESET_QUEUE:
            return Consequence(QueueNext.RESET, "late error reply")
        if v is Verdict.TAKE_OFFLINE:
            return Consequence(QueueNext.DRAIN_THEN_OFFLINE, "late error reply: safe default")
        return NOTHING

    def _reply_before_status(self, q: Queue, psmid: int) -> int | None:
        """A reply for one of our requests whose NQAP status has not come (yet, or ever: the status
        frame was lost): the card took it, so it is ours to deliver.  Returns its request id."""
        rec = self.ledger.record_for_psmid(psmid)
        att = rec.current if rec is not None else None
        if rec is None or att is None or att.psmid != psmid or att.qid != q.qid:
            return None
        for tag, rid in q.sending.items():
            if rid == rec.rid:
                del q.sending[tag]
                self.ledger.counters["reply_before_status"] += 1
                q.requests_total += 1
                if not rec.resolved:
                    att.fate = "on-card"
                    rec.phase = Phase.ON_CARD
                return rid
        return None

    def _protocol_anomaly(self, q: Queue, rec: Record, why: str) -> Consequence:
        """The card answered something we cannot read: it ran the request, the result is lost."""
        self.ledger.counters["protocol_anomalies"] += 1
        att = rec.current
        if att is not None:
            att.fate = "error"
        return Consequence(QueueNext.RESET, why, self._judge(rec, q, may_have_run=True, why=why))

    def probe_says(self, mode: str, data: bytes) -> Consequence:
        """The health probe's reply: right (into service), wrong (a failed reset attempt), or a
        machine failure (recover)."""
        probe = probe_request(mode)
        try:
            reply = parse_reply(data)
            if reply.kind == "ok" and probe is not None:
                value = probe[0].decode(reply)
                if probe[1] is None or value == probe[1]:
                    return Consequence(QueueNext.SERVICE)
            elif reply.kind != "ok" and reply.reply_code == 0x10:
                return Consequence(QueueNext.RECOVER_MF, "machine failure under the health probe")
        except (FormatError, ValueError):
            pass
        return Consequence(QueueNext.PROBE_FAILED, "health probe answered wrong")

    # ---------------------------------------------------------------- attempts the card will not answer
    def attempt_failed(
        self,
        rec: Record,
        q: Queue,
        *,
        may_have_run: bool,
        why: str,
        codes: dict[str, Any] | None = None,
    ) -> Consequence:
        """One attempt of ``rec`` on ``q`` failed: re-drive it (in the consequence), or decide it."""
        redo = self._judge(rec, q, may_have_run=may_have_run, why=why, codes=codes)
        return Consequence(redrive=redo) if redo else NOTHING

    def _judge(
        self,
        rec: Record,
        q: Queue,
        *,
        may_have_run: bool,
        why: str,
        codes: dict[str, Any] | None = None,
    ) -> tuple[Record, ...]:
        """The reply formatter's rule on one failed attempt; returns ``(rec,)`` when it is to be
        re-driven (its budget and the queue to avoid updated), else decides it and returns ()."""
        if rec.resolved:
            return ()
        fate = decide(
            may_have_run=may_have_run,
            idempotent=rec.idempotent,
            redrives=rec.redrives,
            max_redrives=self.cfg.max_redrives,
        )
        codes = codes or {"qid": q.qid, "psmid": rec.current.psmid if rec.current else None}
        if fate is Fate.REDRIVE:
            rec.redrives += 1
            rec.avoid_qid = q.qid
            self.ledger.counters["redriven"] += 1
            return (rec,)
        if fate is Fate.INDETERMINATE:
            self.resolve(
                rec,
                Outcome.INDETERMINATE,
                error=Indeterminate(f"request may have run on a failed card ({why})", reason=why, **codes),
            )
        else:
            self.resolve(
                rec,
                Outcome.UNAVAILABLE,
                error=DeviceUnavailable(f"re-drive budget spent ({why})", **codes),
            )
        return ()

    def abandon_on_card(self, q: Queue, why: str) -> Consequence:
        """The card will never answer what it holds for us: decide each from the ledger."""
        if not q.on_card:
            return NOTHING
        held = list(q.on_card.items())
        q.occ_to(self.out.now)
        q.on_card.clear()
        redo: list[Record] = []
        for psmid, rid in held:
            rec = self.ledger.records.get(rid)
            if rec is None:
                continue
            self.dispatch.unload(q, rec)
            att = rec.current
            if att is not None and att.psmid == psmid and not rec.resolved:
                att.fate = "lost"
                redo.extend(self._judge(rec, q, may_have_run=True, why=why))
        return Consequence(redrive=tuple(redo)) if redo else NOTHING

    # ---------------------------------------------------------------- time limits of waiting work
    def on_deadline(self, rid: int) -> None:
        """A request's caller-given deadline: it ends ``DeadlineExceeded`` wherever it is."""
        rec = self.ledger.records.get(rid)
        if rec is None or rec.resolved:
            return
        rec.has_deadline = False
        sent = rec.phase in (Phase.SENDING, Phase.ON_CARD)
        if rec.phase is Phase.QUEUED:
            self.dispatch.size -= 1  # it stays in its deque, skipped lazily, but waits no more
        # every attempt counts, not only the current one: a request re-driven after an attempt that
        # may have run (idempotent work on a card that died) may have run, even if it waits now
        ran = rec.ran_somewhere()
        where = " after the request was handed to a card" if sent else " while queued"
        if ran is not None and not sent:
            where += " (an earlier attempt may have run)"
        self.resolve(
            rec,
            Outcome.UNAVAILABLE,
            error=DeadlineExceeded(
                "deadline expired" + where,
                may_have_run=ran is not None,
                qid=ran.qid if ran is not None else None,
                psmid=ran.psmid if ran is not None else None,
            ),
        )
        # a queued record stays in the backlog deque and is skipped lazily by the dispatcher

    def on_target_timer(self, rid: int) -> None:
        """A targeted request has waited ``unavailable_grace`` on the host: if none of its APQNs is
        in service it ends ``DeviceUnavailable`` (never failed over); if one is, it is only busy, so
        the request waits another grace (its deadline, if any, still bounds it)."""
        rec = self.ledger.records.get(rid)
        if rec is None or rec.resolved or rec.phase is not Phase.QUEUED or rec.target is None:
            return  # placed meanwhile (a later bounce re-arms) or decided
        if self.dispatch.target_in_service(rec):
            self.out.arm_after(TimerKey.target(rid), self.cfg.unavailable_grace, force=True)
            return
        self.dispatch.size -= 1  # it stays in its deque, skipped lazily, but waits no more
        grace = self.cfg.unavailable_grace
        names = ", ".join(qid_str(t) for t in sorted(rec.target))
        self.resolve(
            rec,
            Outcome.UNAVAILABLE,
            error=DeviceUnavailable(
                f"targeted APQN {names} did not come into service within {grace:g} s (no failover)",
                qid=min(rec.target),
            ),
        )

    def check_parked(self) -> None:
        """No record waits on the host without a timer.  Work of a kind no queue serves right now
        waits for one to come (back) into service, at most ``unavailable_grace``, also when every
        queue that could serve it is offline (it may come back: a re-probe, PeerRestored); only a
        kind no queue has at all ends at once."""
        dispatch = self.dispatch
        dispatch.dirty = False
        for mode in dispatch.modes():
            if dispatch.serving.get(mode) or not dispatch.has_waiting(mode):
                if self._unplaced.pop(mode, None) is not None:
                    self.out.disarm(TimerKey.unavailable(mode))
                continue
            if not dispatch.mode_exists(mode):
                if self._unplaced.pop(mode, None) is not None:
                    self.out.disarm(TimerKey.unavailable(mode))
                self.fail_backlog(mode, f"no queue of kind {mode!r}")
            elif mode not in self._unplaced:
                self._unplaced[mode] = self.out.now
                self.out.arm_after(TimerKey.unavailable(mode), self.cfg.unavailable_grace, force=True)

    def on_unavailable_timer(self, mode: str) -> None:
        """The grace of waiting work whose kind has no queue in service: end what has waited it out."""
        since = self._unplaced.get(mode)
        if since is None or self.dispatch.serving.get(mode):
            self._unplaced.pop(mode, None)
            return
        grace = self.cfg.unavailable_grace
        now = self.out.now
        expired, nxt = self.dispatch.expire(mode, since, grace, now)
        for rec in expired:
            self.fail_unavailable(rec, f"no queue of kind {mode!r} came back into service within {grace:g} s")
        if nxt is None:
            del self._unplaced[mode]
        else:
            self.out.arm_after(TimerKey.unavailable(mode), nxt - now, force=True)
