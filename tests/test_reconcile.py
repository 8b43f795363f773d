"""The reconciliation decision (``apcrypto.reconcile``), driven directly: journal rows and drained
replies in, verdicts out.  Pure: no I/O, no clock; every evidence of the module table has a case,
and hypothesis holds the promises over arbitrary journals (never re-drive what may have run unless
idempotent, never twice, one decision per row)."""

from __future__ import annotations

import ast
import inspect

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import apcrypto.reconcile as rc
from apcrypto.reconcile import AttemptRow, Drained, Evidence, RequestRow, Verdict, decide, reply_fact
from apformats.codes import MachineFailureState as MF
from apformats.codes import ReplyCode as RY

Q1, Q2 = 0x0200, 0x0301


def row(*attempts: AttemptRow, idem: bool = False, restorable: bool = True, **kw: object) -> RequestRow:
    return RequestRow(7, "CPRB:CI", idem, restorable, tuple(attempts), **kw)  # type: ignore[arg-type]


def one(r: RequestRow, d: Drained) -> rc.Decision:
    (out,) = decide([r], d)
    return out


RESUMED = Drained(True, frozenset({Q1}), {})


# -- reply facts: the driver's classifier table, read the same way ------------------------------------
@pytest.mark.parametrize(
    ("kind", "code", "mf", "rt", "fact"),
    [
        ("ok", 0, None, None, "ok"),
        ("error", RY.MACHINE_FAILURE, MF.REQUEST_PENDING, None, "unrun:0x10/2"),
        ("error", RY.MACHINE_FAILURE, MF.IN_PROCESS, None, "maybe:0x10/1"),
        ("error", RY.MACHINE_FAILURE, MF.UNKNOWN, None, "maybe:0x10/0"),
        ("error", RY.OPERAND_INVALID, None, None, "failed:0x82"),
        ("error", RY.MESSAGE_TYPE, None, None, "unrun:0x20"),  # rejected before execution
        ("error", RY.TRANSPORT_FAIL, None, None, "maybe:0x90"),
        ("error", 0, None, 8, "failed:cca8"),  # CCA application error
        ("error", 0, None, 12, "maybe:cca12"),
        ("error", 0xEE, None, None, "maybe:0xee"),  # an unknown code: the safe side
    ],
)
def test_reply_facts(kind: str, code: int, mf: int | None, rt: int | None, fact: str) -> None:
    assert reply_fact(kind, code, mf, rt) == fact


# -- the table, one case per evidence --------------------------------------------------------------------
def test_a_drained_normal_reply_completes_it_even_after_an_earlier_attempt() -> None:
    r = row(AttemptRow(1, Q1, "unrun:0x10/2"), AttemptRow(2, Q2))
    d = one(r, Drained(True, frozenset(), {2: "ok"}))
    assert (d.verdict, d.evidence, d.psmid, d.qid) == (Verdict.COMPLETED, Evidence.REPLIED_OK, 2, Q2)


def test_an_error_reply_that_says_the_request_is_bad_fails_it() -> None:
    d = one(row(AttemptRow(1, Q1)), Drained(True, frozenset({Q1}), {1: "failed:0x82"}))
    assert (d.verdict, d.evidence, d.fact) == (Verdict.FAILED, Evidence.REPLIED_ERROR, "failed:0x82")


def test_request_pending_is_re_driven_once_when_restorable() -> None:
    d = one(row(AttemptRow(1, Q1)), Drained(True, frozenset({Q1}), {1: "unrun:0x10/2"}))
    assert (d.verdict, d.evidence) == (Verdict.REDRIVEN, Evidence.REPLY_NOT_RUN) and d.redrive


def test_never_sent_is_re_driven_or_never_ran_without_operands() -> None:
    assert one(row(), RESUMED).verdict is Verdict.REDRIVEN
    d = one(row(restorable=False), RESUMED)
    assert (d.verdict, d.evidence) == (Verdict.NEVER_RAN, Evidence.NEVER_SENT)
    assert "operands were not journalled" in d.reason


def test_a_re_drive_is_never_re_driven_again() -> None:
    d = one(row(redrive_of=3), RESUMED)
    assert d.verdict is Verdict.NEVER_RAN and "#3" in d.reason
    d = one(row(AttemptRow(1, Q1), idem=True, redrive_of=3), RESUMED)
    assert d.verdict is Verdict.INDETERMINATE


def test_in_process_is_indeterminate_unless_idempotent() -> None:
    drained = Drained(True, frozenset({Q1}), {1: "maybe:0x10/1"})
    assert one(row(AttemptRow(1, Q1)), drained).verdict is Verdict.INDETERMINATE
    assert one(row(AttemptRow(1, Q1), idem=True), drained).verdict is Verdict.REDRIVEN
    d = one(row(AttemptRow(1, Q1), idem=True, restorable=False), drained)
    assert d.verdict is Verdict.INDETERMINATE and "not journalled" in d.reason


def test_an_earlier_attempt_reported_in_process_beats_a_later_request_pending() -> None:
    r = row(AttemptRow(1, Q1, "maybe:0x10/1"), AttemptRow(2, Q2))
    d = one(r, Drained(True, frozenset(), {2: "unrun:0x10/2"}))
    assert (d.verdict, d.evidence, d.psmid) == (Verdict.INDETERMINATE, Evidence.REPLY_MAY_HAVE_RUN, 1)


def test_no_reply_on_an_emptied_queue_may_have_run() -> None:
    d = one(row(AttemptRow(1, Q1)), RESUMED)
    assert (d.verdict, d.evidence) == (Verdict.INDETERMINATE, Evidence.NO_REPLY)
    assert "dead process may have taken the reply" in d.reason


def test_a_session_not_resumed_leaves_everything_sent_in_doubt() -> None:
    d = one(row(AttemptRow(1, Q1)), Drained(False))
    assert (d.verdict, d.evidence) == (Verdict.INDETERMINATE, Evidence.NO_REPLY)
    assert "did not resume" in d.reason
    assert one(row(), Drained(False)).verdict is Verdict.REDRIVEN  # never sent: still safe


def test_an_undrained_queue_may_have_run() -> None:
    d = one(row(AttemptRow(1, Q2), idem=True), RESUMED)
    assert (d.verdict, d.evidence) == (Verdict.REDRIVEN, Evidence.UNDRAINED)


def test_a_pinned_request_is_not_re_driven_where_its_queues_are_not_held() -> None:
    drained = Drained(True, frozenset({Q1}), {}, held=frozenset({Q1}))
    assert one(row(target=frozenset({Q1})), drained).verdict is Verdict.REDRIVEN
    d = one(row(target=frozenset({Q2})), drained)
    assert d.verdict is Verdict.NEVER_RAN and "pinned" in d.reason


def test_every_evidence_has_a_cell_and_the_module_is_pure() -> None:
    assert set(rc.RULES) == set(Evidence) and all(callable(c) for c in rc.RULES.values())
    tree = ast.parse(inspect.getsource(rc))
    imported = {
        n.module if isinstance(n, ast.ImportFrom) else a.name
        for n in ast.walk(tree)
        if isinstance(n, ast.Import | ast.ImportFrom)
        for a in n.names
    }
    assert imported <= {"__future__", "collections.abc", "dataclasses", "enum", "apcrypto.core.classifier"}


# -- properties over arbitrary journals ------------------------------------------------------------------
FACTS = st.sampled_from(
    [None, "ok", "failed:0x82", "unrun:0x10/2", "unrun:0x20", "maybe:0x10/1", "maybe:0x90"]
)
QIDS = st.sampled_from([Q1, Q2, 0x0400])


@st.composite
def journals(draw: st.DrawFn) -> tuple[list[RequestRow], Drained]:
    psmids = iter(range(1, 10_000))
    rows = []
    for i in range(draw(st.integers(0, 8))):
        atts = tuple(
            AttemptRow(next(psmids), draw(QIDS), draw(FACTS)) for _ in range(draw(st.integers(0, 3)))
        )
        rows.append(
            RequestRow(
                i,
                "X",
                draw(st.booleans()),
                draw(st.booleans()),
                atts,
                draw(st.sampled_from([None, 99])),
                draw(st.sampled_from([None, frozenset({Q1}), frozenset({0x0400})])),
            )
        )
    all_psmids = [a.psmid for r in rows for a in r.attempts]
    replies = {p: f for p in all_psmids if (f := draw(FACTS)) is not None and draw(st.booleans())}
    drained = Drained(
        draw(st.booleans()),
        frozenset(draw(st.sets(QIDS))),
        replies,
        draw(st.sampled_from([None, frozenset({Q1, Q2})])),
    )
    return rows, drained


def _facts(r: RequestRow, d: Drained) -> list[str | None]:
    return [a.reply if a.reply is not None else d.replies.get(a.psmid) for a in r.attempts]


@settings(max_examples=300, deadline=None)
@given(journals())
def test_the_promises_hold_for_any_journal(case: tuple[list[RequestRow], Drained]) -> None:
    rows, drained = case
    out = decide(rows, drained)
    assert [d.id for d in out] == [r.id for r in rows]  # one decision per row, in order
    assert decide(rows, drained) == out  # deterministic
    for r, d in zip(rows, out, strict=True):
        facts = _facts(r, drained)
        assert (d.verdict is Verdict.COMPLETED) == ("ok" in facts)
        if d.redrive:
            assert r.restorable and r.redrive_of is None  # never twice, never without operands
            if r.target is not None and drained.held is not None:
                assert r.target & drained.held
            if not r.idempotent:  # state-changing: only with proof it never ran
                assert d.evidence in (Evidence.NEVER_SENT, Evidence.REPLY_NOT_RUN)
                assert not any(f is not None and f.startswith("maybe:") for f in facts)
        if d.verdict is Verdict.NEVER_RAN:
            assert d.evidence in (Evidence.NEVER_SENT, Evidence.REPLY_NOT_RUN)
        if d.evidence is Evidence.NEVER_SENT:
            assert not r.attempts
        if d.verdict is Verdict.INDETERMINATE and r.idempotent:
            assert not r.restorable or r.redrive_of is not None or r.target is not None
