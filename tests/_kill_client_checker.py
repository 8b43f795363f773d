"""An independent judge of the journal's verdicts after a client process was SIGKILLed.

It imports nothing from ``apcrypto`` and shares no code with it: its inputs are plain data (the
journal file's rows as SQLite gives them, the verdicts the restarted client reported, the emulator
server's execution log, and what the dead client's caller wrote down as it went) and it states the
promises of docs/journal.md in its own words:

* **nothing journalled is left without a verdict**: every request row in the journal file carries a
  verdict after the restart, and the restarted client reported exactly one verdict per row;
* **every verdict matches the execution log** (what actually ran):
  ``completed`` - one of its psmids completed on a card; ``failed`` - one got an error reply;
  ``never-ran`` - none of its psmids started; ``re-driven`` - for a state-changing request, none of
  its psmids started (only then may it be sent again), and the re-drive has an outcome;
  ``indeterminate`` - anything (that is what it says);
* **no state-changing request ran twice**: at most one start among a request's psmids; no psmid
  starts twice; every state-changing start of the dead client is accounted for: by a journalled
  request's psmid, or by a request its caller saw end whose row is gone (those its caller saw
  complete ran once; those it saw fail ran at most once), so a run under a psmid the journal does not
  know (sent before it was committed) shows as one start too many; the restarted client's
  state-changing starts are no more than the state-changing re-drives it made, and no fewer than
  those that completed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: the functions whose double execution changes a card's state
STATE_CHANGING = frozenset({"CPRB:CI", "CPRB:KS"})
#: type 82 reply codes of a message rejected before an engine ran it (zcrypt.md §4.3)
REJECTED_UNRUN = frozenset({0x20, 0x21})
VERDICTS = frozenset({"completed", "failed", "indeterminate", "re-driven", "never-ran"})


@dataclass(frozen=True)
class Run:
    """One line of an execution log, reduced to what the judge reads."""

    psmid: int
    function: str
    outcome: str
    started: bool
    reply_code: int | None = None
    effect: str | None = None

    @property
    def ran(self) -> bool:
        """An engine executed it (a rejection before execution is no run)."""
        if not self.started:
            return False
        return not (self.outcome == "error" and self.reply_code in REJECTED_UNRUN and self.effect is None)


@dataclass(frozen=True)
class Reported:
    """One verdict as the restarted client reported it."""

    id: int
    function: str
    idempotent: bool
    verdict: str
    psmids: tuple[int, ...]
    redrive_outcome: str | None = None  # "completed", an exception's name, or None (no re-drive)


@dataclass
class Caller:
    """What the dead client's caller wrote as it went: submissions by function, and each request it
    saw end: journal id -> (function, outcome: ``completed`` or an exception's name)."""

    submitted: Counter[str] = field(default_factory=Counter)
    done: dict[int, tuple[str, str]] = field(default_factory=dict)


def runs_from(entries: Iterable[Any], his: Iterable[int]) -> list[Run]:
    """Execution-log entries (anything with the emulator's field names) of the psmid ranges whose
    high 32 bits are in ``his``."""
    wanted = set(his)
    return [
        Run(e.psmid, e.function, e.outcome, e.started is not None, e.reply_code, e.effect)
        for e in entries
        if e.psmid >> 32 in wanted
    ]


def check(
    journal_rows: Mapping[int, str | None],
    reported: Sequence[Reported],
    dead_runs: Sequence[Run],
    restart_runs: Sequence[Run],
    caller: Caller,
) -> list[str]:
    """Every broken promise found (empty: the run is judged good).

    ``journal_rows``: request id -> verdict (None: none) of every row the journal file holds after
    the restart.  ``dead_runs`` / ``restart_runs``: the execution log of the dead client's psmids and
    of the restarted client's (its only work is the re-drives).
    """
    problems: list[str] = []
    by_psmid: dict[int, list[Run]] = {}
    for r in [*dead_runs, *restart_runs]:
        by_psmid.setdefault(r.psmid, []).append(r)
    for psmid, rs in by_psmid.items():
        if sum(r.ran for r in rs) > 1:
            problems.append(f"psmid {psmid:#x} ran {sum(r.ran for r in rs)} times")

    # nothing journalled without a verdict, one verdict per row
    ids = Counter(v.id for v in reported)
    for jid, verdict in journal_rows.items():
        if verdict is None:
            problems.append(f"journal row #{jid} has no verdict")
        if ids[jid] != 1:
            problems.append(f"journal row #{jid} got {ids[jid]} reported verdicts")
    for jid in ids:
        if jid not in journal_rows:
            problems.append(f"a verdict for #{jid}, which the journal does not hold")

    sc_redrives = sc_redrives_done = 0
    for v in reported:
        runs = [r for p in v.psmids for r in by_psmid.get(p, ())]
        ran = [r for r in runs if r.ran]
        what = f"#{v.id} {v.function} {v.verdict}"
        if v.verdict not in VERDICTS:
            problems.append(f"{what}: not a verdict")
        if journal_rows.get(v.id, v.verdict) not in (v.verdict, None):
            problems.append(f"{what}: the journal says {journal_rows[v.id]}")
        if v.verdict == "completed" and not any(r.outcome == "completed" for r in runs):
            problems.append(f"{what}: no psmid of it completed on a card")
        if v.verdict == "failed" and not any(r.outcome == "error" for r in runs):
            problems.append(f"{what}: no psmid of it got an error reply")
        if v.verdict == "never-ran" and ran:
            problems.append(f"{what}: psmid {ran[0].psmid:#x} ran")
        if v.verdict == "re-driven":
            if v.redrive_outcome is None:
                problems.append(f"{what}: no outcome for the re-drive")
            if not v.idempotent and ran:
                problems.append(f"{what}: re-driven, but psmid {ran[0].psmid:#x} had run")
            if v.function in STATE_CHANGING:
                sc_redrives += 1
                sc_redrives_done += v.redrive_outcome == "completed"
        elif v.redrive_outcome is not None:
            problems.append(f"{what}: a re-drive outcome without a re-drive")
        if not v.idempotent and len(ran) > 1:
            problems.append(f"{what}: ran {len(ran)} times")

    dead_sc = [r for r in dead_runs if r.ran and r.function in STATE_CHANGING]
    submitted = sum(caller.submitted[f] for f in STATE_CHANGING)
    if len(dead_sc) > submitted:
        problems.append(
            f"state-changing work ran {len(dead_sc)} times, but {submitted} requests were submitted"
        )
    journalled = {p for v in reported for p in v.psmids}
    unattributed = sum(1 for r in dead_sc if r.psmid not in journalled)
    gone = [o for jid, (f, o) in caller.done.items() if f in STATE_CHANGING and jid not in journal_rows]
    gone_completed = sum(o == "completed" for o in gone)
    if not gone_completed <= unattributed <= len(gone):
        problems.append(
            f"{unattributed} state-changing runs under psmids the journal does not hold, but the caller saw "
            f"{len(gone)} such requests end ({gone_completed} completed)"
        )
    restart_sc = sum(1 for r in restart_runs if r.ran and r.function in STATE_CHANGING)
    if not sc_redrives_done <= restart_sc <= sc_redrives:
        problems.append(
            f"after the restart state-changing work ran {restart_sc} times for {sc_redrives} re-drives "
            f"({sc_redrives_done} completed)"
        )
    return problems
