"""The journal kill tests' checker (tests/_kill_client_checker.py) against broken histories: each
promise it states is shown to catch the history that breaks it, and a good history passes."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Any

import pytest

from tests._kill_client_checker import Caller, Reported, Run, check, runs_from

DEAD, BACK = 0x6B000 << 32, 0x6B001 << 32
CI = "CPRB:CI"


def good() -> dict[str, Any]:
    """A consistent history: a completed counter increment the caller saw (row gone), one drained
    after the kill, one re-driven (never ran before; ran once after), one indeterminate that ran,
    one never-ran RSA request."""
    runs = [
        Run(DEAD + 1, CI, "completed", True),  # seen by the caller, its row deleted
        Run(DEAD + 2, CI, "completed", True),  # drained after the kill
        Run(DEAD + 3, CI, "completed", True),  # its reply taken by the dead process: indeterminate
        Run(DEAD + 4, CI, "pending-failed", False),  # a card refused to run it: re-driven
    ]
    reported = [
        Reported(10, CI, False, "completed", (DEAD + 2,)),
        Reported(11, CI, False, "indeterminate", (DEAD + 3,)),
        Reported(12, CI, False, "re-driven", (DEAD + 4,), "completed"),
        Reported(13, "MEX_1K", True, "never-ran", ()),
    ]
    return {
        "journal_rows": {10: "completed", 11: "indeterminate", 12: "re-driven", 13: "never-ran"},
        "reported": reported,
        "dead_runs": runs,
        "restart_runs": [Run(BACK + 1, CI, "completed", True)],
        "caller": Caller(Counter({CI: 4, "MEX_1K": 1}), {9: (CI, "completed")}),
    }


def problems(**changes: Any) -> list[str]:
    return check(**{**good(), **changes})


def test_a_good_history_passes() -> None:
    assert problems() == []


def test_a_journal_row_without_a_verdict() -> None:
    assert any("no verdict" in p for p in problems(journal_rows={**good()["journal_rows"], 14: None}))


def test_a_row_reported_twice_or_not_at_all_or_unknown() -> None:
    h = good()
    assert any("2 reported verdicts" in p for p in problems(reported=h["reported"] + [h["reported"][0]]))
    assert any("0 reported verdicts" in p for p in problems(reported=h["reported"][1:]))
    extra = Reported(99, CI, False, "never-ran", ())
    assert any("does not hold" in p for p in problems(reported=h["reported"] + [extra]))


def test_a_verdict_the_journal_contradicts() -> None:
    rows = {**good()["journal_rows"], 10: "failed"}
    assert any("the journal says failed" in p for p in problems(journal_rows=rows))


def test_never_ran_but_it_ran() -> None:
    h = good()
    reported = [*h["reported"][:1], replace(h["reported"][1], verdict="never-ran"), *h["reported"][2:]]
    rows = {**h["journal_rows"], 11: "never-ran"}
    assert any("never-ran: psmid" in p for p in problems(reported=reported, journal_rows=rows))


def test_a_state_changing_request_re_driven_after_it_ran() -> None:
    h = good()
    runs = [*h["dead_runs"][:3], Run(DEAD + 4, CI, "completed", True)]
    assert any("re-driven, but psmid" in p for p in problems(dead_runs=runs))


def test_completed_or_failed_without_the_card_saying_so() -> None:
    h = good()
    runs = [*h["dead_runs"][:1], Run(DEAD + 2, CI, "discarded", False), *h["dead_runs"][2:]]
    assert any("no psmid of it completed" in p for p in problems(dead_runs=runs))
    reported = [replace(h["reported"][0], verdict="failed"), *h["reported"][1:]]
    rows = {**h["journal_rows"], 10: "failed"}
    assert any("no psmid of it got an error" in p for p in problems(reported=reported, journal_rows=rows))


def test_a_request_that_ran_under_two_psmids() -> None:
    h = good()
    reported = [h["reported"][0], replace(h["reported"][1], psmids=(DEAD + 3, DEAD + 5)), *h["reported"][2:]]
    runs = [*h["dead_runs"], Run(DEAD + 5, CI, "completed", True)]
    assert any("ran 2 times" in p for p in problems(reported=reported, dead_runs=runs))


def test_a_psmid_that_ran_twice() -> None:
    runs = [*good()["dead_runs"], Run(DEAD + 2, CI, "completed", True)]
    assert any(f"psmid {DEAD + 2:#x} ran 2 times" in p for p in problems(dead_runs=runs))


def test_a_run_under_a_psmid_the_journal_never_held() -> None:
    """What a journal that sent before it committed leaves: a start nobody accounts for."""
    runs = [*good()["dead_runs"], Run(DEAD + 7, CI, "completed", True)]
    assert any("psmids the journal does not hold" in p for p in problems(dead_runs=runs))


def test_a_completion_the_caller_saw_that_never_ran() -> None:
    h = good()
    caller = Caller(h["caller"].submitted, {**h["caller"].done, 8: (CI, "completed")})
    assert any("psmids the journal does not hold" in p for p in problems(caller=caller))


def test_more_runs_than_submissions() -> None:
    assert any(
        "were submitted" in p for p in problems(caller=Caller(Counter({CI: 2}), {9: (CI, "completed")}))
    )


@pytest.mark.parametrize(
    ("restart", "why"),
    [
        ([], "0 times for 1 re-drives"),
        ([Run(BACK + 1, CI, "completed", True)] * 1 + [Run(BACK + 2, CI, "completed", True)], "2 times"),
    ],
)
def test_re_drives_that_ran_too_little_or_too_often(restart: list[Run], why: str) -> None:
    assert any(why in p for p in problems(restart_runs=restart))


def test_a_re_drive_without_an_outcome_and_an_outcome_without_a_re_drive() -> None:
    h = good()
    reported = [*h["reported"][:2], replace(h["reported"][2], redrive_outcome=None), h["reported"][3]]
    assert any("no outcome for the re-drive" in p for p in problems(reported=reported))
    reported = [replace(h["reported"][0], redrive_outcome="completed"), *h["reported"][1:]]
    assert any("without a re-drive" in p for p in problems(reported=reported))


def test_a_rejection_before_execution_is_no_run_and_runs_are_filtered_by_range() -> None:
    assert not Run(1, CI, "error", True, 0x20, None).ran
    assert Run(1, CI, "error", True, 0x82, None).ran

    class E:
        def __init__(self, psmid: int) -> None:
            self.psmid, self.function, self.outcome = psmid, CI, "completed"
            self.started, self.reply_code, self.effect = 1.0, 0, "CI"

    assert [r.psmid for r in runs_from([E(DEAD + 1), E(BACK + 1), E(5)], {DEAD >> 32})] == [DEAD + 1]
