"""The journal (``connect(..., journal=PATH)``): the file, what it holds and when, and reconciliation
after a client's death, in process.

A client "dies" here the way SIGKILL leaves things, as far as the journal and the card can tell: its
runner stops between two turns and its SQLite connection goes without a commit (whatever was not
committed is rolled back), while the emulator it drove (built by the test) lives on with whatever
it holds.  The real thing, a process SIGKILLed over ``tcp://``, is tests/test_kill_client.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import stat
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import apcrypto
from apcrypto import cli
from apcrypto.errors import DeadlineExceeded
from apcrypto.journal import (
    Journal,
    JournalInUse,
    describe_request,
    parse_attempts,
    read_journal,
    restore_request,
)
from apcrypto.reconcile import Verdict
from apcrypto.requests import CounterIncrement, KeyRead, KeyStore, ModExpo, ModExpoCrt, RandomBytes
from apcrypto.testing import seeded_key
from apformats.results import Instr
from emulator import Emulator

KEY = seeded_key(1024, "journal")


@pytest.fixture
def emu() -> Any:
    e = Emulator("default", clock="wall", seed=3)
    yield e
    e.close()


def connect(emu: Any, path: Path, **kw: Any) -> apcrypto.Client:
    client = apcrypto.connect("emu:", emulator=emu, config="fast", journal=str(path), **kw)
    assert client.wait_ready(10)
    return client


def die(client: apcrypto.Client) -> None:
    """The client's process is gone: no more turns, no commit of what was pending."""
    client._runner.stop()
    assert client.journal is not None
    db = client.journal._db
    assert db is not None
    db.close()  # an open transaction is rolled back, as a killed process's is
    client.journal._db = None
    client._closed = True


def rows(path: Path) -> list[dict[str, Any]]:
    return read_journal(path)


def burst_then_die(emu: Any, client: apcrypto.Client, submit: Any, accepted: int) -> None:
    """Slow every engine, submit a burst in one runner turn, die once the cards accepted
    ``accepted`` of it (some done, most held: the replies wait on the cards), then heal."""
    for card in emu.cards():
        emu.control.slow_engines(card, 200.0)
    base = len(emu.execution_log.entries())
    with client._runner.core_lock:
        submit()
    deadline = time.monotonic() + 10
    while len(emu.execution_log.entries()) - base < accepted and time.monotonic() < deadline:
        time.sleep(0.005)  # bounded poll of the card's log
    assert len(emu.execution_log.entries()) - base >= accepted
    die(client)
    emu.control.clear()


# -- the file --------------------------------------------------------------------------------------------
def test_the_file_and_its_wal_are_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        j = Journal.open(tmp_path / "j.db")
        j.submitted(1, CounterIncrement(1), None, None)
        j.commit()
        files = [p for p in tmp_path.iterdir()]
        assert {p.name for p in files} >= {"j.db", "j.db-wal"}
        for p in files:
            assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
        j.close()
    finally:
        os.umask(old)
    (tmp_path / "k.db").write_bytes(b"")
    os.chmod(tmp_path / "k.db", 0o644)
    Journal.open(tmp_path / "k.db").close()  # an existing file is narrowed
    assert stat.S_IMODE((tmp_path / "k.db").stat().st_mode) == 0o600


def test_one_live_client_per_journal(tmp_path: Path) -> None:
    j = Journal.open(tmp_path / "j.db")
    with pytest.raises(JournalInUse):
        Journal.open(tmp_path / "j.db")
    with pytest.raises(JournalInUse):
        read_journal(tmp_path / "j.db")
    j.close()
    Journal.open(tmp_path / "j.db").close()  # the lock went with the connection


def test_a_refused_second_open_keeps_the_live_clients_lock(tmp_path: Path) -> None:
    """Closing any descriptor of a file drops this process's POSIX locks on it: a second open that
    touched the file before being refused unlocked the live client's journal for every other
    process, which then re-drove its requests while it ran them too."""
    import subprocess
    import sys

    path = tmp_path / "j.db"
    probe = (
        "import sys\nfrom apcrypto.journal import Journal, JournalInUse\n"
        "try:\n    Journal.open(sys.argv[1]).close(); print('opened')\n"
        "except JournalInUse:\n    print('refused')\n"
    )

    def other_process() -> str:
        out = subprocess.run(
            [sys.executable, "-c", probe, str(path)], capture_output=True, text=True, timeout=60
        )
        return out.stdout.strip()

    j = Journal.open(path)
    try:
        assert other_process() == "refused"
        for _ in range(2):
            with pytest.raises(JournalInUse):
                Journal.open(path)  # in this process, beside the live client
        assert other_process() == "refused"  # still locked
    finally:
        j.close()
    assert other_process() == "opened"


def test_not_a_journal_and_bad_options_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(apcrypto.journal.JournalError):
        Journal.open(bad)
    with pytest.raises(ValueError, match="journal_sync"):
        Journal.open(tmp_path / "j.db", sync="sometimes")
    with pytest.raises(TypeError, match="journal_operands"):
        Journal.open(tmp_path / "j.db", operands="yes")  # type: ignore[arg-type]


def test_verdicts_are_kept_ten_runs_then_the_file_forgets_them(tmp_path: Path) -> None:
    from apcrypto.reconcile import Drained, decide

    path = tmp_path / "j.db"
    j = Journal.open(path)
    j.submitted(1, CounterIncrement(1), None, None)
    j.close()  # died with it open
    j = Journal.open(path)
    opened = j.open_requests()
    assert [o.row.function for o in opened] == ["CPRB:CI"] and opened[0].row.attempts == ()
    j.record_verdicts(decide([o.row for o in opened], Drained(False)), {})
    j.close()
    for _ in range(9):
        Journal.open(path).close()
        assert [r["verdict"] for r in read_journal(path)] == ["never-ran"]
    Journal.open(path).close()
    assert read_journal(path) == []
    db = sqlite3.connect(path)
    assert db.execute("SELECT count(*) FROM lives").fetchone()[0] <= 11  # bounded too
    db.close()


@pytest.mark.parametrize(
    "request_",
    [
        ModExpo(b"\x05", KEY.e, KEY.n),
        ModExpoCrt(b"\x05", KEY.p, KEY.q, KEY.dp, KEY.dq, KEY.qinv),
        RandomBytes(16),
        CounterIncrement(3),
        KeyStore(4, b"k" * 32),
        KeyRead(4),
    ],
    ids=lambda r: type(r).__name__,
)
def test_every_request_kind_is_rebuilt_from_its_row(request_: Any) -> None:
    kind, meta, ops = describe_request(request_)
    json.dumps(meta)  # what the row holds is JSON
    full = restore_request(kind, meta, ops)
    assert full is not None and type(full) is type(request_)
    assert full.message(2) == request_.message(2) and full.function == request_.function
    bare = restore_request(kind, meta, None)  # without operands: decodes, cannot be sent
    assert bare is not None and not any(hasattr(bare, f) for f in ("_msg", "payload"))
    assert restore_request("SomethingElse", meta, ops) is None


# -- what is written, and when ---------------------------------------------------------------------------
def test_every_nqap_is_committed_before_it_is_sent(emu: Any, tmp_path: Path) -> None:
    client = connect(emu, tmp_path / "j.db")
    journal = client.journal
    assert journal is not None
    seen: list[int] = []
    send = client.transport._send

    def checked(commands: Any) -> None:
        for c in commands:
            if c.instr is Instr.NQAP and client.core.ledger.by_psmid.get(c.psmid) is not None:
                db = journal._c
                assert not db.in_transaction, "an NQAP left the host with its journal row uncommitted"
                texts = [t for (t,) in db.execute("SELECT attempts FROM requests")]
                assert f"{c.psmid:x}@{c.qid:x}" in " ".join(texts)
                seen.append(c.psmid)
        send(commands)

    client.transport._send = checked  # type: ignore[method-assign]
    futs = [client.counter_increment(1) for _ in range(40)] + [
        client.mod_expo(7, KEY.e, KEY.n) for _ in range(40)
    ]
    assert all(f.exception(10) is None for f in futs)
    assert len(seen) >= 80
    client.close()
    assert rows(tmp_path / "j.db") == []  # every request ended: nothing left to reconcile


def test_a_burst_of_submissions_shares_commits(emu: Any, tmp_path: Path) -> None:
    client = connect(emu, tmp_path / "j.db")
    journal = client.journal
    assert journal is not None
    before = journal.commits
    with client._runner.core_lock:  # the runner finishes its turn; the burst waits in its inbox
        futs = [client.mod_expo(7, KEY.e, KEY.n) for _ in range(300)]
    assert all(f.exception(20) is None for f in futs)
    client.close()
    assert journal.commits - before < 100, journal.commits - before  # not one per request


def test_operands_are_stored_only_when_asked(emu: Any, tmp_path: Path) -> None:
    secret = KEY.p.to_bytes(64, "big")
    for operands, name in ((False, "plain.db"), (True, "ops.db")):
        client = connect(emu, tmp_path / name, journal_operands=operands)
        burst_then_die(
            emu, client, lambda c=client: c.mod_expo_crt(b"\x05", KEY.p, KEY.q, KEY.dp, KEY.dq, KEY.qinv), 1
        )
        db = sqlite3.connect(tmp_path / name)
        (ops,) = db.execute("SELECT operands FROM requests").fetchone()
        db.close()
        raw = b"".join(p.read_bytes() for p in tmp_path.glob(name + "*"))
        assert (ops is not None) is operands
        assert (secret in raw) is operands, "key parts on disk only with journal_operands=True"


# -- reconciliation -------------------------------------------------------------------------------------
def _judge(emu: Any, records: list[apcrypto.Recovered]) -> Counter[str]:
    """Each verdict against the emulator's execution log (what actually ran)."""
    log = emu.execution_log
    counts: Counter[str] = Counter()
    for r in records:
        runs = [e for p, _ in r.attempts for e in log.for_psmid(p) if e.started is not None]
        counts[r.verdict.value] += 1
        if r.verdict is Verdict.COMPLETED:
            assert any(e.outcome == "completed" for p, _ in r.attempts for e in log.for_psmid(p)), r
        if r.verdict in (Verdict.REDRIVEN, Verdict.NEVER_RAN) and not r.idempotent:
            assert not runs, f"{r.line()}: judged never run, but the card ran it"
        if r.verdict is Verdict.REDRIVEN:
            assert r.redrive is not None and r.redrive.done()
            if not r.idempotent:
                assert r.redrive.exception() is None, r.redrive.exception()
        if not r.idempotent:
            redrive_runs = 0
            if r.redrive is not None and r.redrive.exception() is None:
                redrive_runs = 1
            assert len(runs) + redrive_runs <= 1, f"{r.line()}: ran twice"
    return counts


@pytest.mark.parametrize("operands", [True, False])
def test_a_dead_clients_open_requests_all_get_verdicts_that_match_the_card(
    emu: Any, tmp_path: Path, operands: bool
) -> None:
    path = tmp_path / "j.db"
    first = connect(emu, path, journal_operands=operands)

    futs: list[Any] = []

    def burst() -> None:
        for _ in range(40):
            futs.append(first.counter_increment(1))
            futs.append(first.mod_expo(9, KEY.e, KEY.n))

    burst_then_die(emu, first, burst, 40)
    left = [r["id"] for r in rows(path)]
    ids = {f.journal_id: f for f in futs}  # what a caller keeps to match verdicts to its own records
    assert len(ids) == len(futs) and set(left) <= set(ids)
    assert left and all(r["verdict"] is None for r in rows(path))
    second = connect(emu, path, journal_operands=operands)
    records = second.recovered(20)
    assert sorted(r.id for r in records) == sorted(left)  # every one journalled, one verdict each
    assert all(r.function == ("CPRB:CI" if "Counter" in r.kind else "MEX_1K") for r in records)
    assert all((r.kind == "CounterIncrement") is (ids[r.id] in futs[::2]) for r in records)
    counts = _judge(emu, records)
    assert counts["completed"] > 0  # the cards still held replies: the drain found them
    if not operands:
        assert counts["re-driven"] == 0
    for r in records:
        if r.verdict is Verdict.COMPLETED and r.function == "CPRB:CI":
            assert isinstance(r.value, int) and r.value >= 1
        if r.verdict is Verdict.COMPLETED and r.function.startswith("MEX"):
            assert r.value == pow(9, KEY.e, KEY.n).to_bytes(128, "big")
    second.close()
    after = rows(path)
    assert {r["id"] for r in after if r["verdict"] is not None} == set(left)
    assert all(r["verdict"] is not None for r in after)  # the re-drives ended: their rows went


def test_requests_the_cards_never_took_are_re_driven_once(emu: Any, tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    first = connect(emu, path, journal_operands=True)
    for card in (0, 1):  # every accelerator dead: RSA work waits on the host (its grace), unsent
        emu.control.checkstop(card)
    futs = [first.mod_expo(9, KEY.e, KEY.n) for _ in range(5)]
    committed = threading.Event()
    journal = first.journal
    assert journal is not None
    first._runner.call(lambda: (journal.commit(), committed.set()))  # after the submissions' turn
    assert committed.wait(5) and journal.open_count() == 5
    assert not any(f.done() for f in futs)
    die(first)
    emu.control.clear()  # the cards come back
    db = sqlite3.connect(path)  # each NQAP the dead cards refused is journalled as never run
    facts = [a.reply for (t,) in db.execute("SELECT attempts FROM requests") for a in parse_attempts(t)]
    db.close()
    assert any(f is not None for f in facts)  # (a refusal after the last commit died with the process)
    assert all(f is None or f.startswith("unrun:nqap-rc") for f in facts), facts
    second = connect(emu, path, journal_operands=True)
    records = second.recovered(20)
    assert [r.verdict for r in records] == [Verdict.REDRIVEN] * 5
    assert {r.evidence for r in records} <= {"never-sent", "reply-not-run", "no-reply"}
    assert [r.redrive.result() for r in records] == [pow(9, KEY.e, KEY.n).to_bytes(128, "big")] * 5
    second.close()
    assert {r["verdict"] for r in rows(path)} == {"re-driven"}  # the re-drives ended: their rows went


def test_a_second_death_during_the_re_drives_leaves_them_judged_too(emu: Any, tmp_path: Path) -> None:
    """Crash, restart (re-drives sent), crash again while they are on the cards, restart: the
    re-drives' own psmids were journalled before they left, so the third run judges them from the
    cards, and never re-drives them again."""
    path = tmp_path / "j.db"
    first = connect(emu, path, journal_operands=True)
    for card in (0, 1):
        emu.control.checkstop(card)
    futs = [first.mod_expo(9, KEY.e, KEY.n) for _ in range(6)]
    committed = threading.Event()
    journal = first.journal
    assert journal is not None
    first._runner.call(lambda: (journal.commit(), committed.set()))
    assert committed.wait(5) and not any(f.done() for f in futs)
    die(first)
    emu.control.clear()
    for card in emu.cards():
        emu.control.slow_engines(card, 200.0)
    # its re-drives go out as it starts (no known-answer probe: the slowed engines would fail it)
    second = connect(emu, path, journal_operands=True, health_probe=False)

    def on_card() -> int:
        with second._runner.core_lock:
            return sum(r.phase.value == "on-card" for r in second.core.ledger.records.values())

    deadline = time.monotonic() + 10
    while on_card() < 6 and time.monotonic() < deadline:
        time.sleep(0.005)  # bounded poll: the six re-drives are on the (slow) cards
    assert on_card() == 6
    die(second)
    emu.control.clear()
    redrives = {r["id"]: r for r in rows(path) if r["redrive_of"] is not None}
    assert len(redrives) == 6 and all(r["attempts"] for r in redrives.values())  # psmids before send
    third = connect(emu, path, journal_operands=True)
    records = {r.id: r for r in third.recovered(20)}
    assert set(records) == set(redrives)  # the originals were judged already: only the re-drives
    for r in records.values():
        assert r.verdict is not Verdict.REDRIVEN  # one re-drive per request, ever
        ran = any(e.started is not None for p, _ in r.attempts for e in emu.execution_log.for_psmid(p))
        assert r.verdict is not Verdict.NEVER_RAN or not ran
    assert any(r.verdict is Verdict.COMPLETED for r in records.values())
    third.close()
    originals = [r for r in rows(path) if r["redrive_of"] is None]
    assert [(r["verdict"], r["redrive"] in redrives) for r in originals] == [("re-driven", True)] * 6


def test_requests_whose_nqap_never_arrived_are_indeterminate(emu: Any, tmp_path: Path) -> None:
    """The psmid was committed before the send, and the send never happened: the driver cannot tell
    that from a reply the dead process took, so a state-changing request is in doubt."""
    path = tmp_path / "j.db"
    first = connect(emu, path, journal_operands=True)
    first.transport._send = lambda commands: None  # type: ignore[method-assign]  # nothing leaves
    futs = [first.counter_increment(1) for _ in range(5)]
    deadline = time.monotonic() + 5
    while len(first.core.ledger.by_psmid) < 5 and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.05)
    assert not any(f.done() for f in futs)
    die(first)
    second = connect(emu, path, journal_operands=True)
    records = second.recovered(20)
    assert len(records) == 5
    counts = _judge(emu, records)
    assert counts == {"indeterminate": 5}
    assert all(r.evidence == "no-reply" for r in records)
    second.close()


def test_a_psmid_base_an_earlier_run_used_is_refused(emu: Any, tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    connect(emu, path, psmid_base=0x1234 << 32).close()
    with pytest.raises(ValueError, match="psmid_base"):
        connect(emu, path, psmid_base=(0x1234 << 32) + 5)
    connect(emu, path).close()  # a drawn one avoids it by itself


def test_the_cli_prints_the_verdicts(emu: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "j.db"
    first = connect(emu, path)
    burst_then_die(emu, first, lambda: [first.counter_increment(1) for _ in range(8)], 4)
    assert cli.main(["recovered", "--offline", "--journal", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.count("open (not reconciled yet)") == len(rows(path)) > 0
    # connect over a fresh emulator: the session is not resumed, everything sent is in doubt
    assert cli.main(["recovered", "--journal", str(path), "--json", "emu:"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed and {p["verdict"] for p in printed} <= {"indeterminate", "never-ran"}
    assert all(p["attempts"] or p["verdict"] == "never-ran" for p in printed)
    assert cli.main(["recovered", "--offline", "--journal", str(path)]) == 0
    assert "not reconciled" not in capsys.readouterr().out


def test_recovered_decides_where_the_journal_ran(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without a URL, ``apcrypto recovered`` connects to where the journal's client ran, never to an
    embedded emulator that would re-drive its requests on a card thrown away with it."""
    from apcrypto.journal import journal_url

    path = tmp_path / "j.db"
    j = Journal.open(path)
    j.begin("tcp://127.0.0.1:9", 0x77 << 32, None)  # a server nobody listens for now
    j.close()
    assert journal_url(path) == "tcp://127.0.0.1:9"
    assert cli.main(["recovered", "--journal", str(path)]) == 1
    err = capsys.readouterr().err
    assert "tcp://127.0.0.1:9" in err and "emu" not in err
    # named otherwise: it says where the journal's client ran, then decides where it was told
    assert cli.main(["recovered", "--journal", str(path), "--json", "emu:"]) == 0
    assert "ran on tcp://127.0.0.1:9; deciding on emu:" in capsys.readouterr().err


def test_each_submission_of_one_request_object_has_its_own_journal_id(emu: Any, tmp_path: Path) -> None:
    """Submitting one request object again is allowed: each submission's future carries the id its
    own row has in the file (they were all the first one's, while the rows had others)."""
    path = tmp_path / "j.db"
    first = connect(emu, path)
    req = CounterIncrement(1)
    futs: list[Any] = []
    burst_then_die(emu, first, lambda: futs.extend(first.submit(req) for _ in range(8)), 2)
    ids = [f.journal_id for f in futs]
    assert len(set(ids)) == 8
    assert sorted(r["id"] for r in rows(path)) == sorted(ids)  # every row is one of them


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_request_its_caller_was_told_never_ran_is_not_re_driven_after_a_crash(
    emu: Any, tmp_path: Path
) -> None:
    """A queued request ends ``DeadlineExceeded(may_have_run=False)`` and the process dies as its
    caller learns it, before the next commit.  The end was committed before the caller was told, so
    the restart does not re-drive what its caller may already have run again by itself."""
    path = tmp_path / "j.db"
    first = connect(emu, path)
    emu.control.slow_engines(2, 500.0, 5.0)  # card 2: 0.4 s a request, for 5 s
    busy = [first.counter_increment(1, apqn=(2, 0)) for _ in range(8)]  # the queue's 8 slots
    late = first.counter_increment(1, apqn=(2, 0), deadline=0.3)  # waits on the host behind them
    told: list[BaseException | None] = []

    def crash(f: Any) -> None:
        told.append(f.exception())
        die(first)  # the process is gone the moment its caller has the outcome

    late.add_done_callback(crash)
    for _ in range(1000):
        if told:
            break
        time.sleep(0.01)
    assert told and isinstance(told[0], DeadlineExceeded) and not told[0].may_have_run
    emu.control.clear()
    second = connect(emu, path)
    try:
        records = second.recovered(20)
        assert late.journal_id not in {r.id for r in records if r.verdict is Verdict.REDRIVEN}
        assert all(r.id in {f.journal_id for f in busy} for r in records)  # only those that were sent
        time.sleep(0.2)
        started = [
            e for e in emu.execution_log.entries() if e.function == "CPRB:CI" and e.started is not None
        ]
        assert len(started) <= len(busy)  # the late one never ran, then or since
    finally:
        second.close()


def test_docs_name_every_recovered_option() -> None:
    root = Path(__file__).resolve().parents[1]
    text = (root / "docs" / "cli.md").read_text().split("## apcrypto recovered", 1)[1].split("\n## ", 1)[0]
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    opts = [
        o for a in sub.choices["recovered"]._actions for o in a.option_strings if o not in ("-h", "--help")
    ]
    assert opts and all(f"`{o}" in text or f" {o}" in text for o in opts), opts


def test_the_asyncio_client_journals_and_reconciles(emu: Any, tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    first = connect(emu, path)
    burst_then_die(emu, first, lambda: [first.counter_increment(1) for _ in range(12)], 6)
    left = {r["id"] for r in rows(path)}

    async def main() -> list[apcrypto.Recovered]:
        async with apcrypto.aio.connect("emu:", emulator=emu, config="fast", journal=str(path)) as client:
            assert await client.wait_ready(10)
            fut = client.counter_increment(1)
            assert fut.journal_id > max(left)  # type: ignore[attr-defined]
            assert await fut >= 1  # journalled on the loop too
            return await client.recovered(10)

    records = asyncio.run(main())
    assert {r.id for r in records} == left
    _judge(emu, records)
    assert all(r["verdict"] is not None for r in rows(path))


def test_the_journal_comes_from_the_environment_or_the_config_file_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for var in ("APCRYPTO_URL", "APCRYPTO_OPTIONS", "APCRYPTO_CONFIG_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    (tmp_path / "apcrypto.toml").write_text('url = "emu:small"\n[options]\njournal = "from-file.db"\n')
    with apcrypto.connect(config="fast") as client:
        assert client.journal is not None and client.journal.path.name == "from-file.db"
    monkeypatch.setenv("APCRYPTO_OPTIONS", json.dumps({"journal": "from-env.db", "journal_sync": "full"}))
    with apcrypto.connect(config="fast") as client:  # the environment beats the file
        assert client.journal is not None and client.journal.path.name == "from-env.db"
        assert client.journal.sync == "full"
    with apcrypto.connect(
        config="fast", journal=str(tmp_path / "arg.db")
    ) as client:  # the argument beats both
        assert client.journal is not None and client.journal.path.name == "arg.db"
    assert stat.S_IMODE((tmp_path / "from-file.db").stat().st_mode) == 0o600
