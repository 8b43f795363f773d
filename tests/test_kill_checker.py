"""The kill tests' checker fed broken histories: each broken promise must be reported, and a clean
history must pass (otherwise a green kill test proves nothing)."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from apcrypto.errors import DeadlineExceeded, DeviceUnavailable, Indeterminate
from tests._fixtures_kill import KEYS, PSMID_BASE, Req, check

P1, P2, P3 = PSMID_BASE + 1, PSMID_BASE + 2, PSMID_BASE + 3
K = KEYS[1024]


@dataclass(frozen=True)
class Entry:
    """What the checker reads of an execution-log entry."""

    psmid: int
    function: str = "CPRB:CI"
    started: float | None = 1.0
    outcome: str = "completed"
    reply_code: int | None = 0
    effect: str | None = "CI"


def _fut(value: Any = None, error: BaseException | None = None, done: bool = True) -> Future[Any]:
    f: Future[Any] = Future()
    if done:
        f.set_exception(error) if error is not None else f.set_result(value)
    return f


def _counter(value: Any = 1, error: BaseException | None = None, t: float = 100.0) -> Req:
    return Req("counter+1", _fut(value, error), t=t)


def test_a_clean_history_passes_and_is_counted() -> None:
    reqs = [
        _counter(1),
        _counter(error=Indeterminate("x", psmid=P2)),
        _counter(error=DeviceUnavailable("none left")),
        Req("ME-1024", _fut(pow(5, K.e, K.n).to_bytes(128, "big")), pow(5, K.e, K.n), K),
    ]
    log = [Entry(P1), Entry(P2, outcome="discarded"), Entry(P3, function="MEX_1K", effect=None)]
    v = check(reqs, [log])
    assert v.problems == []
    assert v.counts == {"completed": 2, "Indeterminate (started)": 1, "DeviceUnavailable": 1}


def test_state_changing_work_run_twice_is_caught() -> None:
    """One request completed, but two of its attempts started (two psmids)."""
    v = check([_counter(1)], [[Entry(P1, outcome="discarded"), Entry(P2)]])
    assert any("1 unaccounted" in p for p in v.problems)


def test_work_that_ran_while_the_caller_was_told_unavailable_is_caught() -> None:
    v = check([_counter(error=DeviceUnavailable("gone"))], [[Entry(P1)]])
    assert any("unaccounted" in p for p in v.problems)


def test_the_same_psmid_started_twice_is_caught() -> None:
    v = check([_counter(1)], [[Entry(P1)], [Entry(P1)]])  # two server instances ran one message
    assert any("started 2 times" in p for p in v.problems)


def test_indeterminate_for_work_that_never_left_the_host_is_caught() -> None:
    late = _counter(error=Indeterminate("x", psmid=P3), t=100.0)
    assert any("never reached a card" in p for p in check([late], [[]], doubt_until=50.0).problems)
    # submitted before the client could know the peer was gone: allowed, and counted apart
    v = check([late], [[]], doubt_until=150.0)
    assert v.problems == [] and v.counts == {"Indeterminate (sent into the outage, in no log)": 1}


def test_unresolved_futures_and_wrong_results_are_caught() -> None:
    pending = Req("counter+1", _fut(done=False))
    wrong = Req("ME-1024", _fut((7).to_bytes(128, "big")), pow(5, K.e, K.n), K)
    v = check([pending, wrong], [[Entry(P1, function="MEX_1K", effect=None)]])
    assert "1 futures never resolved" in v.problems and any("wrong result" in p for p in v.problems)


def test_deadline_saying_never_ran_for_work_that_ran_is_caught() -> None:
    r = Req("ME-1024", _fut(error=DeadlineExceeded("late", psmid=P1, may_have_run=False)))
    v = check([r], [[Entry(P1, function="MEX_1K", effect=None)]])
    assert any("may_have_run=False" in p for p in v.problems)


def test_a_rejection_before_execution_is_no_run() -> None:
    """An engine that rejected a message unexecuted (type 82 code 0x20) did not run it."""
    rejected = Entry(P1, outcome="error", reply_code=0x20, effect=None)
    v = check([_counter(1)], [[rejected, Entry(P2)]])
    assert v.problems == []
