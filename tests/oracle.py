"""A test oracle that judges a run from what the *cards* saw, independently of the driver.

Why it exists: a checker that shares code (or beliefs) with the code it checks proves nothing.  The
driver's own audit (``apcrypto.audit``) reads the driver's ledger; if the ledger is wrong, the audit
agrees with it.  This oracle never looks at the driver.  It judges a run from

* the **workload** the test submitted (:class:`Work`: what each request was, its kind, whether the
  caller marked it idempotent, its deadline) and what the caller got back (:class:`Outcome`);
* the emulator's **execution log** (:class:`LogEntry`, read from plain fields): what each card accepted,
  started, finished, failed or threw away, and when the host took each reply (``dequeued``);
* the **wire** (:class:`WireTap`): the message bytes of every NQAP the emulator was given and how it
  answered, so each log entry can be traced to the request it carries (by content, see
  :func:`content_id`) and NQAPs the card refused as full are counted;
* the test's own **fault plan** (:class:`PlannedFault`) and the **profile** TOML (:class:`Topology`:
  which queues exist, of which kind, with how many slots -- ``qd + 1``).

It imports nothing from ``apcrypto`` (nor from ``emulator``/``apformats``): the message layouts,
reply codes and the slot rule it needs are restated here from ``reference/zcrypt.md``, so a bug in
the product's copy of them cannot hide here too.

Rules (each violation names its rule; ``RULES`` lists them; the negative tests in
``tests/test_oracle_negative.py`` feed a broken history to each one):

``one-outcome``      every request ends in exactly one outcome (none lost, none decided twice)
``attribution``      every log entry traces to one NQAP message; psmids are never reused
``log-consistency``  the log agrees with itself (a *pending* failure never started, etc.)
``same-kind``        every attempt of a request went to a queue of the request's kind
``redrive-once``     a request-pending attempt the host read back is re-driven exactly once:
                     one later attempt, sent after the reply was read, never two at a time
``redrive-budget``   at most ``max_redrives`` re-drives (attempts - 1) per request
``ran-twice``        a request the caller did not mark idempotent starts at most once
``indeterminate``    ``Indeterminate`` only where an attempt started, or where the card went
                     silent on it for a reason in the fault plan (never for work the card said
                     never ran); idempotent work only once its re-drive budget is spent
``discard``          no accepted message is thrown away by a reset unless the fault plan explains
                     it (a reset before the stored replies are drained loses the card's verdicts)
``unavailable``      ``DeviceUnavailable`` only when every queue of that kind had been hit by a
                     fault by then, or the request's re-drive budget is spent on attempts that
                     provably never ran
``deadline``         ``DeadlineExceeded`` only after the caller's deadline; ``may_have_run=False``
                     only if no attempt ran (started and not refused unexecuted)
``failed``           ``BadRequest`` only with an error reply the card gave this request
``completed``        a completion is backed by this request's own last attempt, completed on a card
                     and read back no later than the caller got it, with the right result
``slots``            no queue ever holds more than ``qd + 1`` messages (the emulator's occupancy,
                     from the log), and no NQAP is refused as full on a queue no fault touched
``full``             while work of a kind waits on the host, every queue of that kind holds
                     ``qd + 1`` messages (checked until the first fault)
``probe``            after a machine-failure reply or a wrong probe answer, a queue gets work again
                     only after a known-answer probe on it came back completed (if probes are on)
"""

from __future__ import annotations

import itertools
import tomllib
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "KNOWN_BUGS",
    "RULES",
    "LogEntry",
    "Outcome",
    "PlannedFault",
    "QueueInfo",
    "Report",
    "Topology",
    "Violation",
    "WireTap",
    "Work",
    "content_id",
    "judge",
    "outcome_of",
]

RULES = (
    "one-outcome",
    "attribution",
    "log-consistency",
    "same-kind",
    "redrive-once",
    "redrive-budget",
    "ran-twice",
    "indeterminate",
    "discard",
    "unavailable",
    "deadline",
    "failed",
    "completed",
    "slots",
    "full",
    "probe",
)

PROFILE_DIR = Path(__file__).resolve().parents[1] / "emulator" / "profiles"

#: reference/zcrypt.md §4.3: error replies by which a card refuses a message *before* executing it
#: (message type, command code).  Any other error reply from a started message may have run.
REJECTED_UNRUN = frozenset({0x20, 0x21})
#: reference/zcrypt.md §4.3: error replies that say the request itself is bad (the caller's fault).
CALLER_FAULT = frozenset(
    {0x22, 0x23, 0x24, 0x29, 0x30, 0x34, 0x40, 0x41, 0x42, 0x50, 0x60, 0x80, 0x82, 0x84, 0x85, 0x88}
)
#: The machine-failure reply code (reference §4.3, DESIGN §6).
MACHINE_FAILURE = 0x10
#: NQAP response code "queue full" (reference §2.3: AP_RESPONSE_Q_FULL, 0x10).
RC_Q_FULL = 0x10
#: Faults after which a card may legitimately never answer for what it held: dead cards, resets
#: under the driver, engines too slow for the reply timeout.  A machine failure is *not* one: the
#: card answers for every held message (DESIGN §1).
SILENCING = frozenset({"checkstop", "deconfigure", "reset", "slow"})
FINAL = frozenset({"completed", "error", "in-process-failed", "pending-failed", "discarded"})

EPS = 1e-9
INF = float("inf")

#: Driver bugs a caller may ask the oracle to excuse while they are being fixed, each only in its
#: exact shape.  ``deadline-after-redrive``: ``DeadlineExceeded(may_have_run=False)`` for a request
#: whose earlier attempt started, when the deadline found it back on the host (issue 8 §1).
#: ``redrive-into-recovering-queue``: work accepted by a queue in the very instant the host read its
#: card's machine-failure replies, before the queue's reset and probe (issue 8 §1, first defect).
KNOWN_BUGS = frozenset({"deadline-after-redrive", "redrive-into-recovering-queue"})


# ---------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class QueueInfo:
    qid: int
    card: int
    mode: str  # "accel" | "cca"
    slots: int  # qd + 1


@dataclass(frozen=True)
class Topology:
    """The usage queues of a profile, read from its TOML file (not through the emulator's parser)."""

    queues: Mapping[int, QueueInfo]

    @classmethod
    def from_profile(cls, name_or_path: str | Path) -> Topology:
        path = Path(name_or_path)
        if not path.suffix:
            path = PROFILE_DIR / f"{name_or_path}.toml"
        doc = tomllib.loads(path.read_text())
        queues = {}
        for card in doc["cards"]:
            ctype = doc["card_types"][card["type"]]
            for dom in card.get("usage_domains", ()):
                qid = (card["id"] << 8) | dom
                queues[qid] = QueueInfo(qid, card["id"], ctype["mode"], ctype["qd"] + 1)
        return cls(queues)

    def of_mode(self, mode: str) -> list[QueueInfo]:
        return [q for q in self.queues.values() if q.mode == mode]


@dataclass(frozen=True)
class Work:
    """One request as the test submitted it.  ``content`` is what :func:`content_id` reads from its
    NQAP message; ``check`` judges a completed value (True = right)."""

    index: int
    mode: str
    content: tuple[Any, ...]
    idempotent: bool
    submitted: float
    deadline: float | None = None  # relative to ``submitted``
    check: Callable[[Any], bool] | None = None


@dataclass(frozen=True)
class Outcome:
    """What the caller got: ``kind`` is ``completed`` or the exception class name; ``at`` is when."""

    kind: str
    at: float
    value: Any = None
    qid: int | None = None
    psmid: int | None = None
    reply_code: int | None = None
    may_have_run: bool | None = None
    calls: int = 1


def outcome_of(fut: Any, at: float, calls: int = 1) -> Outcome:
    """Read a finished future's outcome from plain attributes (no exception classes imported)."""
    err = fut.exception()
    if err is None:
        return Outcome("completed", at, fut.result(), calls=calls)
    return Outcome(
        type(err).__name__,
        at,
        value=err,
        qid=getattr(err, "qid", None),
        psmid=getattr(err, "psmid", None),
        reply_code=getattr(err, "reply_code", None),
        may_have_run=getattr(err, "may_have_run", None),
        calls=calls,
    )


@dataclass(frozen=True)
class LogEntry:
    """One execution-log entry, copied field by field (any object with these attributes will do)."""

    psmid: int
    qid: int
    enqueued: float
    outcome: str
    started: float | None = None
    ended: float | None = None
    reply_code: int | None = None
    effect: str | None = None
    dequeued: float | None = None
    seq: int = 0
    engine: int | None = None
    function: str = ""

    @classmethod
    def read(cls, e: Any) -> LogEntry:
        return cls(
            psmid=e.psmid,
            qid=e.qid,
            enqueued=e.enqueued,
            outcome=e.outcome,
            started=e.started,
            ended=e.ended,
            reply_code=e.reply_code,
            effect=getattr(e, "effect", None),
            dequeued=getattr(e, "dequeued", None),
            seq=getattr(e, "seq", 0),
            engine=getattr(e, "engine", None),
            function=getattr(e, "function", ""),
        )

    @property
    def ran(self) -> bool:
        """An engine started it and did not refuse it unexecuted: its effect may have happened."""
        if self.started is None:
            return False
        return not (self.outcome == "error" and self.reply_code in REJECTED_UNRUN and self.effect is None)


@dataclass(frozen=True)
class PlannedFault:
    """One fault of the test's plan, in absolute clock time.  ``kind``: ``machine_failure``,
    ``checkstop``, ``deconfigure``, ``busy``, ``reset``, ``slow`` (``card`` or ``qid``), or
    ``fail_request`` (``code``; its victim is found in the log by that reply code)."""

    kind: str
    at: float
    card: int | None = None
    qid: int | None = None
    code: int | None = None

    def touches(self, qid: int) -> bool:
        if self.card is not None:
            return self.card == qid >> 8
        return self.qid == qid


@dataclass(frozen=True)
class Sent:
    """One NQAP as the emulator got it: when, where, what, and its response code."""

    at: float
    qid: int
    psmid: int
    message: bytes
    rc: int


class WireTap:
    """Records every NQAP an emulator is given (message bytes and response code).

    Installed on the instance (``emu.nqap``), so whatever path the driver's transport takes to the
    card, the record is the card's side of the wire.  :meth:`check_coverage` fails loudly if the
    tap missed messages the log shows (e.g. if a refactor routes NQAP around ``emu.nqap``).
    """

    def __init__(self, emu: Any) -> None:
        self.sent: list[Sent] = []
        self._emu = emu
        inner = emu.nqap
        clock = emu.clock
        sent = self.sent

        def nqap(qid: int, psmid: int, message: bytes, *args: Any, **kw: Any) -> Any:
            res = inner(qid, psmid, message, *args, **kw)
            sent.append(Sent(clock.now(), qid, psmid, bytes(message), int(res.status.rc)))
            return res

        emu.nqap = nqap

    def by_psmid(self) -> dict[int, list[Sent]]:
        out: dict[int, list[Sent]] = defaultdict(list)
        for s in self.sent:
            out[s.psmid].append(s)
        return out


# ----------------------------------------------------------------------------- message content

#: reference/zcrypt.md §4.1: total length of each type 50 variant -> (operation, data length).  The
#: data (the message to exponentiate) is the last field, right-justified: its integer is the tail.
_TYPE50 = {
    400: ("me", 128),
    784: ("me", 256),
    1552: ("me", 512),
    464: ("crt", 128),
    912: ("crt", 256),
    1808: ("crt", 512),
}


def content_id(message: bytes) -> tuple[Any, ...] | None:
    """What a request *is*, read from its NQAP message, the same on every attempt and every queue:
    ``("me"|"crt", data)`` for type 50, ``("cprb", function, payload)`` for our type 6 (the domain
    field, which a re-drive to another queue changes, is left out).  None if unreadable."""
    if len(message) < 16:
        return None
    if message[1] == 0x50:
        shape = _TYPE50.get(len(message))
        if shape is None:
            return None
        op, n = shape
        return (op, int.from_bytes(message[-n:], "big"))
    if message[1] == 0x06:
        plen = int.from_bytes(message[12:16], "big")
        return (
            "cprb",
            message[8:10].decode("ascii", "replace"),
            int.from_bytes(message[16 : 16 + plen], "big"),
        )
    return None


# ---------------------------------------------------------------------------------------- verdict


@dataclass(frozen=True)
class Violation:
    rule: str
    subject: str  # "request #i", "queue 0x0001", "psmid 0x..."
    detail: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.subject}: {self.detail}"


@dataclass
class Report:
    violations: list[Violation] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # outcomes, for the record
    #: each request's attempts as the log shows them (by work index), and the driver's own
    #: messages (probes) per queue: for tests that look closer at a scenario
    attempts: dict[int, list[LogEntry]] = field(default_factory=dict)
    others: dict[int, list[LogEntry]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.violations

    def rules(self) -> set[str]:
        return {v.rule for v in self.violations}

    def add(self, rule: str, subject: str, detail: str) -> None:
        self.violations.append(Violation(rule, subject, detail))

    def __str__(self) -> str:
        head = f"oracle: {len(self.violations)} violation(s); outcomes {self.counts}"
        shown = [str(v) for v in self.violations[:25]]
        more = len(self.violations) - len(shown)
        return "\n  ".join([head, *shown] + ([f"... and {more} more"] if more > 0 else []))


def judge(
    topology: Topology,
    work: Sequence[Work],
    outcomes: Mapping[int, Outcome],
    log: Iterable[Any],
    sent: Iterable[Sent],
    faults: Sequence[PlannedFault] = (),
    *,
    max_redrives: int,
    probes: bool = True,
    counters: Mapping[tuple[int, int], int] | None = None,
    known: frozenset[str] = frozenset(),
) -> Report:
    """Judge one run.  ``outcomes`` maps a work index to what its caller got (missing: never ended);
    ``log`` is the execution log (entries of any type with the :class:`LogEntry` fields);
    ``counters`` (optional) is each (card, domain)'s counter as the firmware left it, the evidence
    of every counter increment that ran, whatever the log says.  ``known`` names known driver
    bugs to excuse, each in its one narrow shape (:data:`KNOWN_BUGS`); empty by default."""
    unknown = known - KNOWN_BUGS
    if unknown:
        raise ValueError(f"no such known bug: {sorted(unknown)}")
    rep = Report()
    entries = sorted((e if isinstance(e, LogEntry) else LogEntry.read(e) for e in log), key=lambda e: e.seq)
    sends = list(sent)
    by_content = {w.content: w for w in work}
    if len(by_content) != len(work):
        raise ValueError("the oracle needs every request's content to be unique in its workload")

    # --- attribution: log entry -> message -> request -----------------------------------------
    if [e.seq for e in entries] != list(range(len(entries))):
        rep.add("attribution", "execution log", "not the whole log (entries missing or renumbered)")
    msg_of: dict[int, bytes] = {}
    for s in sends:
        if s.rc != 0:
            continue
        old = msg_of.get(s.psmid)
        if old is not None and old != s.message:
            rep.add("attribution", f"psmid {s.psmid:#x}", "reused for a different message")
        msg_of[s.psmid] = s.message
    of_req: dict[int, list[LogEntry]] = defaultdict(list)
    probes_on: dict[int, list[LogEntry]] = defaultdict(list)
    for e in entries:
        if e.qid not in topology.queues:
            rep.add("attribution", f"psmid {e.psmid:#x}", f"on queue {e.qid:#06x}, not a usage queue")
            continue
        msg = msg_of.get(e.psmid)
        if msg is None:
            rep.add("attribution", f"psmid {e.psmid:#x}", "in the log but no accepted NQAP carried it")
            continue
        w = by_content.get(content_id(msg))  # type: ignore[arg-type]
        if w is None:
            probes_on[e.qid].append(e)  # the driver's own message (health probe)
        else:
            of_req[w.index].append(e)
    seen_psmid: dict[int, int] = {}
    for idx, es in of_req.items():
        for e in es:
            if seen_psmid.setdefault(e.psmid, idx) != idx:
                rep.add("attribution", f"psmid {e.psmid:#x}", "carries two different requests")

    rep.attempts, rep.others = dict(of_req), dict(probes_on)
    _log_consistency(rep, entries)
    silent_after = _silencing_times(faults, entries, topology)
    tainted_at = _taint_times(faults, entries, topology)

    # --- per request --------------------------------------------------------------------------
    counts: dict[str, int] = defaultdict(int)
    for w in work:
        subj = f"request #{w.index}"
        es = of_req.get(w.index, [])
        oc = outcomes.get(w.index)
        if oc is None:
            rep.add("one-outcome", subj, "never ended")
            continue
        counts[oc.kind] += 1
        if oc.calls != 1:
            rep.add("one-outcome", subj, f"ended {oc.calls} times")
        _per_request(rep, subj, w, oc, es, topology, silent_after, tainted_at, max_redrives, known)
    rep.counts = dict(counts)

    _counters(rep, entries, msg_of, of_req, work, outcomes, counters)
    _discards(rep, entries, silent_after)
    _slots(rep, entries, sends, topology, tainted_at)
    _full(rep, entries, work, outcomes, of_req, topology, faults)
    if probes:
        _probe_rule(rep, entries, of_req, probes_on, topology, known)
    return rep


def _log_consistency(rep: Report, entries: list[LogEntry]) -> None:
    for e in entries:
        subj = f"psmid {e.psmid:#x}"
        if e.outcome == "pending-failed" and e.started is not None:
            rep.add("log-consistency", subj, "reported request-pending although an engine started it")
        if e.outcome == "in-process-failed" and e.started is None:
            rep.add("log-consistency", subj, "reported in-process although no engine started it")
        if e.outcome in ("completed", "error") and (e.started is None or e.ended is None):
            rep.add("log-consistency", subj, f"{e.outcome} without a start and an end")
        if e.dequeued is not None and e.outcome not in FINAL - {"discarded"}:
            rep.add("log-consistency", subj, f"read back by the host but {e.outcome}")
        if e.started is not None and e.started < e.enqueued - EPS:
            rep.add("log-consistency", subj, "started before it was accepted")


def _injected_victims(faults: Sequence[PlannedFault], entries: list[LogEntry]) -> list[LogEntry]:
    codes = {f.code for f in faults if f.kind == "fail_request"}
    return [e for e in entries if e.outcome == "error" and e.reply_code in codes and e.effect is None]


def _silencing_times(
    faults: Sequence[PlannedFault], entries: list[LogEntry], topo: Topology
) -> dict[int, float]:
    """Per queue: the earliest time from which the card may legitimately go silent on it."""
    out: dict[int, float] = {}
    for q in topo.queues:
        ts = [f.at for f in faults if f.kind in SILENCING and f.touches(q)]
        if ts:
            out[q] = min(ts)
    # an injected error reply may make the driver reset or drop the queue it came from
    for e in _injected_victims(faults, entries):
        out[e.qid] = min(out.get(e.qid, float("inf")), e.enqueued)
    return out


def _taint_times(faults: Sequence[PlannedFault], entries: list[LogEntry], topo: Topology) -> dict[int, float]:
    """Per queue: the earliest time any fault of the plan touched it (after that it may be out of
    service for as long as the driver needs; before it, it is healthy)."""
    out: dict[int, float] = {}
    for q in topo.queues:
        ts = [f.at for f in faults if f.kind != "fail_request" and f.touches(q)]
        if ts:
            out[q] = min(ts)
    for e in _injected_victims(faults, entries):
        out[e.qid] = min(out.get(e.qid, float("inf")), e.enqueued)
    return out


def _silent(e: LogEntry, silent_after: Mapping[int, float]) -> bool:
    """The host never got this attempt's reply, and the fault plan says the card may have gone
    silent on it (for a message discarded while still queued or running, ``ended`` is when)."""
    if e.dequeued is not None:
        return False
    t = silent_after.get(e.qid)
    if t is None:
        return False
    if e.outcome == "discarded" and e.reply_code is None and e.ended is not None:
        return t <= e.ended + EPS
    return True


def _per_request(
    rep: Report,
    subj: str,
    w: Work,
    oc: Outcome,
    es: list[LogEntry],
    topo: Topology,
    silent_after: Mapping[int, float],
    tainted_at: Mapping[int, float],
    max_redrives: int,
    known: frozenset[str],
) -> None:
    for e in es:
        q = topo.queues[e.qid]
        if q.mode != w.mode:
            rep.add("same-kind", subj, f"{w.mode} request sent to {q.mode} queue {e.qid:#06x}")
    if len(es) - 1 > max_redrives:
        rep.add("redrive-budget", subj, f"{len(es)} attempts, at most {max_redrives} re-drives allowed")
    runs = [e for e in es if e.ran]
    if not w.idempotent and len(runs) > 1:
        rep.add("ran-twice", subj, f"state-changing request started {len(runs)} times")
    if oc.at < w.submitted - EPS:
        rep.add("one-outcome", subj, "ended before it was submitted")

    # re-drives: one attempt at a time; each later attempt follows a failure the host learned of
    for a, b in itertools.pairwise(es):
        if a.outcome == "completed" and a.dequeued is not None:
            rep.add("redrive-once", subj, f"sent again ({b.psmid:#x}) after {a.psmid:#x} completed")
        elif a.dequeued is not None:
            if b.enqueued < a.dequeued - EPS:
                rep.add("redrive-once", subj, f"{b.psmid:#x} sent before {a.psmid:#x}'s reply was read")
        elif not w.idempotent:
            # the card never answered for ``a``: for all the host knows it ran
            rep.add(
                "redrive-once",
                subj,
                f"state-changing request re-sent ({b.psmid:#x}) after "
                f"{a.psmid:#x} went unanswered ({a.outcome})",
            )
    final_kinds = {"DeadlineExceeded", "DeviceUnavailable"}
    if es and oc.kind not in final_kinds:
        e = es[-1]
        if e.outcome == "pending-failed" and e.dequeued is not None:
            rep.add("redrive-once", subj, f"card said {e.psmid:#x} never ran; not re-driven ({oc.kind})")

    if oc.kind == "completed":
        last = es[-1] if es else None
        if last is None or last.outcome != "completed" or last.dequeued is None:
            rep.add("completed", subj, "completed without a completed run of its own last attempt")
        elif last.dequeued > oc.at + EPS:
            rep.add("completed", subj, "completed before its reply was read from the card")
        if w.check is not None and not w.check(oc.value):
            rep.add("completed", subj, f"wrong result {oc.value!r:.60}")
        return
    psmids = {e.psmid for e in es}
    if oc.psmid is not None and oc.kind != "DeviceUnavailable" and oc.psmid not in psmids:
        rep.add("attribution", subj, f"{oc.kind} names psmid {oc.psmid:#x}, not one of its attempts")
    if oc.kind == "Indeterminate":
        if not any(e.ran or _silent(e, silent_after) for e in es):
            rep.add(
                "indeterminate", subj, "indeterminate, but no attempt started and the card answered for all"
            )
        if w.idempotent and len(es) < max_redrives + 1:
            rep.add("indeterminate", subj, f"idempotent, indeterminate after only {len(es)} attempt(s)")
    elif oc.kind == "DeviceUnavailable":
        spent = (
            len(es) == max_redrives + 1
            and es[-1].dequeued is not None
            and es[-1].dequeued <= oc.at + EPS
            and not es[-1].ran
        )
        kind_dead = all(tainted_at.get(q.qid, float("inf")) <= oc.at + EPS for q in topo.of_mode(w.mode))
        if not (spent or kind_dead):
            healthy = [
                hex(q.qid) for q in topo.of_mode(w.mode) if tainted_at.get(q.qid, float("inf")) > oc.at
            ]
            rep.add(
                "unavailable", subj, f"unavailable at {oc.at:.6f} while {healthy} were untouched by faults"
            )
    elif oc.kind == "DeadlineExceeded":
        if w.deadline is None:
            rep.add("deadline", subj, "deadline exceeded without a deadline")
        elif oc.at < w.submitted + w.deadline - 1e-6:
            rep.add(
                "deadline", subj, f"deadline exceeded at {oc.at - w.submitted:.6f} s, before {w.deadline} s"
            )
        if oc.may_have_run is False and any(e.ran for e in es):
            # known: the driver forgets earlier attempts when the deadline finds the request back
            # on the host awaiting its re-drive (issue 8 §1); excused only in that shape, on request
            back_on_host = all(_release(e) <= oc.at + EPS for e in es)
            if not ("deadline-after-redrive" in known and back_on_host):
                rep.add("deadline", subj, "may_have_run=False, but an attempt ran")
    elif oc.kind == "BadRequest":
        told = [
            e
            for e in es
            if e.outcome == "error"
            and e.dequeued is not None
            and e.dequeued <= oc.at + EPS
            and e.reply_code == oc.reply_code
            and (e.reply_code in CALLER_FAULT or e.reply_code == 0)
        ]
        if not told:
            rep.add("failed", subj, f"BadRequest (reply code {oc.reply_code}) the card never gave it")
    else:
        rep.add("one-outcome", subj, f"unexpected outcome {oc.kind}: {oc.value!r:.80}")


def _counters(
    rep: Report,
    entries: list[LogEntry],
    msg_of: Mapping[int, bytes],
    of_req: Mapping[int, list[LogEntry]],
    work: Sequence[Work],
    outcomes: Mapping[int, Outcome],
    counters: Mapping[tuple[int, int], int] | None,
) -> None:
    """Counter increments (our CPRB ``CI``): the firmware's counters moved by exactly the increments
    of the runs the log shows, and a completed increment returns the counter after it ran (its own
    increment on top of every increment that started before it on that domain)."""
    ran: dict[int, list[tuple[float, int, int]]] = defaultdict(list)  # qid -> (started, seq, by)
    for e in entries:
        if e.effect is None or e.started is None:
            continue
        cid = content_id(msg_of.get(e.psmid, b""))
        if cid is not None and cid[:2] == ("cprb", "CI"):
            ran[e.qid].append((e.started, e.seq, cid[2]))
    if counters is not None:
        for (card, dom), value in counters.items():
            total = sum(by for _, _, by in ran.get((card << 8) | dom, ()))
            if value != total:
                rep.add(
                    "ran-twice",
                    f"queue {(card << 8) | dom:#06x}",
                    f"counter at {value}, the log's runs add to {total}",
                )
    for w in work:
        oc = outcomes.get(w.index)
        es = of_req.get(w.index)
        if oc is None or oc.kind != "completed" or not es or w.content[:2] != ("cprb", "CI"):
            continue
        last = es[-1]
        if last.started is None or not isinstance(oc.value, int):
            continue
        runs = ran.get(last.qid, [])
        before = sum(by for t, seq, by in runs if t < last.started - EPS)
        same = [by for t, seq, by in runs if abs(t - last.started) <= EPS and seq != last.seq]
        rest = oc.value - w.content[2] - before
        sums = {0}
        for by in same:
            sums |= {x + by for x in sums}
        if rest not in sums:
            rep.add(
                "completed", f"request #{w.index}", f"counter increment returned {oc.value}, not what ran"
            )


def _discards(rep: Report, entries: list[LogEntry], silent_after: Mapping[int, float]) -> None:
    """A reset discards what a queue holds.  Legitimate only for a queue the plan silenced (dead
    card, external reset, engines too slow, an injected failure there); otherwise the driver threw
    away work -- or the card's stored machine-failure verdicts -- with its own reset."""
    for e in entries:
        if e.outcome != "discarded":
            continue
        t = silent_after.get(e.qid)
        when = e.ended if e.reply_code is None and e.ended is not None else None
        if t is None or (when is not None and t > when + EPS):
            what = "its stored machine-failure reply" if e.reply_code == MACHINE_FAILURE else "it"
            rep.add(
                "discard",
                f"psmid {e.psmid:#x}",
                f"queue {e.qid:#06x} reset discarded {what}, no fault explains it",
            )


def _release(e: LogEntry) -> float:
    """When ``e`` stopped holding a slot, as far as the log can tell (a lower bound for a reply
    discarded after it was produced: the reset came at or after ``ended``)."""
    if e.dequeued is not None:
        return e.dequeued
    if e.outcome == "discarded" and e.ended is not None:
        return e.ended
    return float("inf")


def _slots(
    rep: Report,
    entries: list[LogEntry],
    sends: list[Sent],
    topo: Topology,
    tainted_at: Mapping[int, float],
) -> None:
    per_q: dict[int, list[tuple[float, int]]] = defaultdict(list)
    for e in entries:
        per_q[e.qid].append((e.enqueued, 1))
        r = _release(e)
        if r != float("inf"):
            per_q[e.qid].append((r, -1))
    for qid, evs in per_q.items():
        q = topo.queues.get(qid)
        if q is None:
            continue
        held = 0
        for t, d in sorted(evs):  # at one instant releases (-1) sort before acceptances
            held += d
            if held > q.slots:
                rep.add("slots", f"queue {qid:#06x}", f"held {held} messages at {t:.6f}, slots {q.slots}")
                break
    for s in sends:
        if s.rc == RC_Q_FULL and s.at < tainted_at.get(s.qid, float("inf")):
            rep.add("slots", f"queue {s.qid:#06x}", f"NQAP refused as full at {s.at:.6f} (driver overfilled)")
            break


def _full(
    rep: Report,
    entries: list[LogEntry],
    work: Sequence[Work],
    outcomes: Mapping[int, Outcome],
    of_req: Mapping[int, list[LogEntry]],
    topo: Topology,
    faults: Sequence[PlannedFault],
) -> None:
    """Until the first fault shows (planned, or in the log as anything but a clean completion),
    every queue of a kind is full at the end of every instant at which work of that kind waits on
    the host (submitted, not decided, on no card).  One sweep over the instants."""
    if not work:
        return
    t_end = min([f.at for f in faults if f.kind != "fail_request"], default=float("inf"))
    for e in entries:  # any failure but a plain "bad request" reply changes what the host may do
        if e.outcome not in ("completed", "queued", "running", "error") or (
            e.reply_code not in (None, 0) and e.reply_code not in CALLER_FAULT
        ):
            t_end = min(t_end, e.enqueued)
    t_start = min(w.submitted for w in work)
    owner = {e.seq: idx for idx, es in of_req.items() for e in es}
    # (time, delta, qid, work index or -1): acceptances/releases of slots, submissions, decisions
    evs: list[tuple[float, int, int, int]] = []
    for e in entries:
        idx = owner.get(e.seq, -1)
        evs.append((e.enqueued, 1, e.qid, idx))
        r = _release(e)
        if r != float("inf"):
            evs.append((r, -1, e.qid, idx))
    for w in work:
        evs.append((w.submitted, 2, -1, w.index))
        oc = outcomes.get(w.index)
        if oc is not None:
            evs.append((oc.at, -2, -1, w.index))
    evs.sort(key=lambda v: v[0])
    mode_of = {w.index: w.mode for w in work}
    held = dict.fromkeys(topo.queues, 0)
    on_card: dict[int, int] = defaultdict(int)
    state: dict[int, int] = {}  # 1 submitted, 2 decided
    n_wait: dict[str, int] = defaultdict(int)
    short = {mode: {q.qid for q in topo.of_mode(mode)} for mode in {q.mode for q in topo.queues.values()}}

    def waiting(i: int) -> bool:
        return state.get(i) == 1 and on_card[i] == 0

    i, n = 0, len(evs)
    while i < n:
        t = evs[i][0]
        while i < n and evs[i][0] <= t + EPS:
            _, d, qid, idx = evs[i]
            i += 1
            before = idx >= 0 and waiting(idx)
            if d in (1, -1):
                if qid in held:
                    held[qid] += d
                    q = topo.queues[qid]
                    (short[q.mode].discard if held[qid] >= q.slots else short[q.mode].add)(qid)
                if idx >= 0:
                    on_card[idx] += d
            elif d == 2:
                state.setdefault(idx, 1)
            else:
                state[idx] = 2
            if idx >= 0 and idx in mode_of and waiting(idx) != before:
                n_wait[mode_of[idx]] += 1 if not before else -1
        if not (t_start - EPS <= t < t_end):
            continue
        for mode, k in n_wait.items():
            if k > 0 and short.get(mode):
                free = sorted((hex(q), held[q]) for q in short[mode])
                rep.add(
                    "full", f"{mode} queues", f"at {t:.6f} {k} request(s) wait while {free} have free slots"
                )
                return


def _probe_rule(
    rep: Report,
    entries: list[LogEntry],
    of_req: Mapping[int, list[LogEntry]],
    probes_on: Mapping[int, list[LogEntry]],
    topo: Topology,
    known: frozenset[str],
) -> None:
    """After the card told the host a queue failed (a machine-failure reply the host read, or an
    error reply to the host's own known-answer probe), the next work on that queue must follow a
    probe there that completed (DESIGN §4.4: the recovery routine probes health with a
    known-answer request before the queue re-enters service)."""
    work_entries = {e.seq for es in of_req.values() for e in es}
    per_q: dict[int, list[LogEntry]] = defaultdict(list)
    for e in entries:
        per_q[e.qid].append(e)
    for qid, es in per_q.items():
        if qid not in topo.queues:
            continue
        disrupted_at: float | None = None
        good_probe_at: float | None = None
        drained_at: float | None = None  # when the host read the card's failure replies here
        for e in es:  # in acceptance order
            is_work = e.seq in work_entries
            if disrupted_at is not None and e.enqueued > disrupted_at + EPS:
                if not is_work:
                    ok = e.outcome == "completed" and e.reply_code in (0, None) and e.dequeued is not None
                    good_probe_at = e.dequeued if ok else None
                    continue
                if good_probe_at is None or good_probe_at > e.enqueued + EPS:
                    if (
                        "redrive-into-recovering-queue" in known
                        and drained_at is not None
                        and abs(e.enqueued - drained_at) <= EPS
                    ):
                        continue  # the known shape: sent in the very batch that drained the queue
                    rep.add(
                        "probe",
                        f"queue {qid:#06x}",
                        f"work {e.psmid:#x} accepted at {e.enqueued:.6f} without a good probe since "
                        f"the disruption at {disrupted_at:.6f}",
                    )
                    break
                disrupted_at = None
                good_probe_at = None
            # did the card tell the host it failed (a machine-failure reply the host read)?
            # (a card-wide failure: from the failure on, the card refused all work until its
            # recovery ended, so anything it accepted later came after the host could know)
            t_fail: float | None = None
            if e.dequeued is not None and not is_work and e.outcome == "error":
                t_fail = e.dequeued  # the known-answer probe answered wrong: not healthy either
            elif e.dequeued is not None and e.outcome in ("pending-failed", "in-process-failed"):
                t_fail = e.ended if e.ended is not None else e.dequeued
            elif e.dequeued is not None and e.reply_code == MACHINE_FAILURE:
                t_fail = e.dequeued
            if t_fail is not None:
                disrupted_at = t_fail if disrupted_at is None else max(disrupted_at, t_fail)
                good_probe_at = None
                drained_at = e.dequeued
