"""The reconciliation decision after a restart: journal rows and drained replies in, verdicts out.

Pure on purpose (as the core is): no I/O, no clock, no entropy.  :mod:`apcrypto.recovery` reads the
journal, drains the cards and calls :func:`decide`; this module only says what the evidence proves.

What the driver can know about a request its previous life left open, and what it concludes (the
evidence, first that applies):

==========================  ==========================================================  ===============
evidence                    what it proves                                              verdict
==========================  ==========================================================  ===============
``REPLIED_OK``              a normal reply for one of its psmids was drained            completed
``REPLIED_ERROR``           the card refused its last attempt as bad (the classifier    failed
                            says fail-caller)
``REPLY_MAY_HAVE_RUN``      a machine-failure reply says an engine had started it (or   may have run
                            gives no state), or an error reply the classifier says may
                            have run (pre-empted, checkpoint, transport failure)
``REPLY_NOT_RUN``           a machine-failure reply says it never left its slot, or     never ran
                            the card rejected it before executing it
``NEVER_SENT``              journalled, but no attempt (no psmid) was ever journalled:  never ran
                            the journal commits an NQAP's psmid before it is sent
``NO_REPLY``                its queue was drained empty (or the session was lost) and   may have run
                            its psmid was not among the replies: the dead process may
                            have taken the reply, or the NQAP never arrived: no telling
``UNDRAINED``               its queue could not be drained to empty in time             may have run
==========================  ==========================================================  ===============

*Never ran* is re-driven (once) when its operands were journalled, else it ends ``never-ran``:
nothing happened and nothing can be re-sent.  *May have run* is ``indeterminate`` unless the request
is idempotent and restorable, then it is re-driven.  A request that is itself a re-drive after an
earlier restart is never re-driven again (one re-drive per request, ever).

Only a request's **last** attempt decides between never-ran and may-have-run: the core makes a new
attempt of a non-idempotent request only once the previous one is proven never to have run
(bounced, withdrawn, request-pending), so an earlier attempt of such a request did not run.  An
earlier attempt the card *reported* in process still counts (evidence beats the invariant).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum

from apcrypto.core.classifier import Verdict as ClassVerdict
from apcrypto.core.classifier import classify_cca, classify_reply

__all__ = [
    "RULES",
    "AttemptRow",
    "Decision",
    "Drained",
    "Evidence",
    "RequestRow",
    "Verdict",
    "decide",
    "evidence",
    "reply_fact",
]


class Evidence(Enum):
    """What the journal and the drained replies say about one request (see the module table)."""

    REPLIED_OK = "replied-ok"
    REPLIED_ERROR = "replied-error"
    REPLY_MAY_HAVE_RUN = "reply-may-have-run"
    REPLY_NOT_RUN = "reply-not-run"
    NEVER_SENT = "never-sent"
    NO_REPLY = "no-reply"
    UNDRAINED = "undrained"


class Verdict(Enum):
    """The end of a request its previous life left open."""

    COMPLETED = "completed"  # a normal reply was drained (the result, when it can be decoded)
    FAILED = "failed"  # an error reply was drained: the request is bad, the card said so
    INDETERMINATE = "indeterminate"  # it may have run; not re-driven (not idempotent, or not restorable)
    REDRIVEN = "re-driven"  # sent again, once: its outcome is the re-drive's
    NEVER_RAN = "never-ran"  # provably never ran, and not re-sent (no operands, or already a re-drive)


#: Reply facts, as the journal stores them per attempt (:func:`reply_fact` makes them): ``ok``, or
#: a prefix saying what an error reply proves, then its code (``failed:0x82``, ``unrun:0x10/2``...).
OK = "ok"
FAILED = "failed:"  # the request is bad: the card said so (classifier: fail-caller)
UNRUN = "unrun:"  # proven never executed (machine failure, request pending; rejected before execution)
MAYBE = "maybe:"  # may have run (machine failure in process or unknown; pre-empted, ...)


def reply_fact(kind: str, reply_code: int, mf_state: int | None = None, rtcode: int | None = None) -> str:
    """The fact a drained reply establishes, as a short string (what the journal keeps: never the
    result bytes).  Error replies are read with the driver's own classifier table (read-only data),
    so a restart judges a reply exactly as the running driver would: ``mf_state`` refines a
    machine-failure reply, ``rtcode`` a CCA reply whose AP reply code is 0."""
    if kind == "ok":
        return OK
    if reply_code == 0 and rtcode is not None:
        row = classify_cca(rtcode)
        code = f"cca{rtcode}"
    else:
        row = classify_reply(reply_code, mf_state)
        code = f"{reply_code:#04x}" + ("" if mf_state is None else f"/{int(mf_state)}")
    if row.verdict is ClassVerdict.FAIL_CALLER:
        return FAILED + code
    return (MAYBE if row.may_have_run else UNRUN) + code


@dataclass(frozen=True, slots=True)
class AttemptRow:
    """One journalled attempt: the psmid it was sent under, its APQN, and the reply fact a drain
    found for it (None: none yet)."""

    psmid: int
    qid: int
    reply: str | None = None


@dataclass(frozen=True, slots=True)
class RequestRow:
    """One journalled request its previous life left without an outcome.

    ``restorable``: its operands were journalled and its kind is one the driver can rebuild, so it
    can be re-sent.  ``redrive_of``: the request it re-drives (set for a re-drive made by an earlier
    reconciliation).  ``attempts`` in the order they were sent.
    """

    id: int
    function: str
    idempotent: bool
    restorable: bool
    attempts: tuple[AttemptRow, ...] = ()
    redrive_of: int | None = None
    target: frozenset[int] | None = None  # the APQNs it was pinned to (None: any of its kind)


@dataclass(frozen=True, slots=True)
class Drained:
    """What draining the resumed session found.

    ``resumed``: the server gave the old session back (its queues and the replies they held); False
    means whatever the cards held for it was discarded.  ``emptied``: APQNs drained until they held
    nothing of ours (every reply the session had is in ``replies``).  ``replies``: psmid -> reply
    fact, for every reply drained.  ``held``: the APQNs the new session holds, where a pinned
    request may be re-driven (None: not known, no pinned request is held back).
    """

    resumed: bool
    emptied: frozenset[int] = frozenset()
    replies: Mapping[int, str] = field(default_factory=dict)
    held: frozenset[int] | None = None  # the APQNs the new session holds (None: not known)


@dataclass(frozen=True, slots=True)
class Decision:
    """The verdict on one request, the evidence behind it and the attempt that decided it."""

    id: int
    verdict: Verdict
    evidence: Evidence
    reason: str
    psmid: int | None = None  # the attempt whose reply (or silence) decided it
    qid: int | None = None
    fact: str | None = None  # that attempt's reply fact

    @property
    def redrive(self) -> bool:
        return self.verdict is Verdict.REDRIVEN


def _fact(a: AttemptRow, drained: Drained) -> str | None:
    return a.reply if a.reply is not None else drained.replies.get(a.psmid)


def evidence(row: RequestRow, drained: Drained) -> tuple[Evidence, AttemptRow | None, str | None]:
    """The evidence on ``row`` (module table), with the attempt it rests on and that attempt's fact."""
    if not row.attempts:
        return Evidence.NEVER_SENT, None, None
    facts = [(a, _fact(a, drained)) for a in row.attempts]
    for a, f in facts:
        if f == OK:
            return Evidence.REPLIED_OK, a, f
    for a, f in facts[:-1]:  # the card's word on an earlier attempt beats the never-re-sent invariant
        if f is not None and f.startswith(MAYBE):
            return Evidence.REPLY_MAY_HAVE_RUN, a, f
    last, f = facts[-1]
    if f is not None:
        if f.startswith(FAILED):
            return Evidence.REPLIED_ERROR, last, f
        if f.startswith(UNRUN):
            return Evidence.REPLY_NOT_RUN, last, f
        return Evidence.REPLY_MAY_HAVE_RUN, last, f  # MAYBE, or a fact this version does not know
    if not drained.resumed or last.qid in drained.emptied:
        return Evidence.NO_REPLY, last, None
    return Evidence.UNDRAINED, last, None


# -- the cells: evidence -> verdict ----------------------------------------------------------------
Cell = Callable[[RequestRow, Drained], tuple[Verdict, str]]


def _completed(row: RequestRow, drained: Drained) -> tuple[Verdict, str]:
    return Verdict.COMPLETED, "a normal reply was drained after the restart"


def _failed(row: RequestRow, drained: Drained) -> tuple[Verdict, str]:
    return Verdict.FAILED, "the card answered with an error reply"


def _no_redrive(row: RequestRow, drained: Drained) -> str | None:
    """Why ``row`` cannot be re-driven (None: it can)."""
    if row.redrive_of is not None:
        return f"already a re-drive of #{row.redrive_of}, not re-driven twice"
    if not row.restorable:
        return "its operands were not journalled, so it cannot be re-sent"
    if row.target is not None and drained.held is not None and not row.target & drained.held:
        return "the APQNs it is pinned to are not held by this session"
    return None


def _never_ran(why: str) -> Cell:
    def cell(row: RequestRow, drained: Drained) -> tuple[Verdict, str]:
        blocked = _no_redrive(row, drained)
        if blocked is not None:
            return Verdict.NEVER_RAN, f"{why}; {blocked}"
        return Verdict.REDRIVEN, f"{why}: re-driven once"

    return cell


def _may_have_run(why: str) -> Cell:
    def cell(row: RequestRow, drained: Drained) -> tuple[Verdict, str]:
        if not row.idempotent:
            return Verdict.INDETERMINATE, f"{why}; not idempotent, so not re-driven"
        blocked = _no_redrive(row, drained)
        if blocked is not None:
            return Verdict.INDETERMINATE, f"{why}; idempotent, but {blocked}"
        return Verdict.REDRIVEN, f"{why}; idempotent: re-driven"

    return cell


def _session_lost(row: RequestRow, drained: Drained) -> tuple[Verdict, str]:
    why = (
        "the server did not resume the session, so what its cards held is gone, and it may have run"
        if not drained.resumed
        else "its queue was drained and held no reply for it: the dead process may have taken the "
        "reply, or the NQAP never arrived"
    )
    return _may_have_run(why)(row, drained)


#: evidence -> the function that turns it into a verdict (data: one cell per evidence, checked
#: complete at import)
RULES: dict[Evidence, Cell] = {
    Evidence.REPLIED_OK: _completed,
    Evidence.REPLIED_ERROR: _failed,
    Evidence.REPLY_MAY_HAVE_RUN: _may_have_run("the card's error reply says it may have run"),
    Evidence.REPLY_NOT_RUN: _never_ran("the card's error reply says it never ran"),
    Evidence.NEVER_SENT: _never_ran("journalled, but never given a psmid: it never reached a card"),
    Evidence.NO_REPLY: _session_lost,
    Evidence.UNDRAINED: _may_have_run("its queue could not be drained in time, and no reply came"),
}
assert set(RULES) == set(Evidence), "every evidence needs a rule"


def decide(rows: Iterable[RequestRow], drained: Drained) -> list[Decision]:
    """One :class:`Decision` per row, in the order given."""
    out = []
    for row in rows:
        ev, att, fact = evidence(row, drained)
        verdict, reason = RULES[ev](row, drained)
        out.append(
            Decision(
                row.id,
                verdict,
                ev,
                reason,
                None if att is None else att.psmid,
                None if att is None else att.qid,
                fact,
            )
        )
    return out
