"""The execution log as a bounded ring with an SQLite spill: eviction, paged reads, the spill file read
back as the same records (also after the server process was SIGKILLed), and refused configurations."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import pytest

from apcrypto.transport import Command, Completion, open_transport
from apformats.codes import ResponseCode
from apformats.messages import build_mex, parse_reply
from apformats.results import Instr, qid_of
from emulator import Emulator, Execution
from emulator.execution_log import ExecutionLog, read_execution_log, read_spill_runs
from tests._fixtures_emulator import Q00, Q01, Q10, drain, fill, small_exact
from tests._fixtures_zmq import E, collect, rsa_key, server_factory

__all__ = ["server_factory", "small_exact"]

RC = ResponseCode


def run_all(emu: Emulator, psmids: list[int]) -> None:
    """Send ``psmids`` over three queues, let the engines finish, take every reply."""
    for i, p in enumerate(psmids):
        q = (Q00, Q01, Q10)[i % 3]
        assert fill(emu, q, [p]) == [RC.NORMAL]
        if i % 6 == 5:
            emu.clock.run_until_idle()
            for q in (Q00, Q01, Q10):
                drain(emu, q)
    emu.clock.run_until_idle()
    for q in (Q00, Q01, Q10):
        drain(emu, q)


def twin(capacity: int | None, **configure: object) -> Emulator:
    """The small profile, seed 7, with its log configured; two twins run identically."""
    emu = Emulator("small", seed=7)
    emu.execution_log.configure(capacity=capacity, **configure)  # type: ignore[arg-type]
    return emu


def test_the_ring_keeps_the_newest_entries_and_forgets_the_rest() -> None:
    full, ring = twin(None), twin(4)
    psmids = list(range(100, 111))
    run_all(full, psmids)
    run_all(ring, psmids)
    everything = full.execution_log.entries()
    assert len(everything) == 11 and [e.seq for e in everything] == list(range(11))
    log = ring.execution_log
    assert log.entries() == everything[-4:]
    assert (len(log), log.total, log.oldest, log.end) == (4, 11, 7, 11)
    assert log.for_psmid(100) == [] and not log.started(100)  # evicted: gone from the index too
    assert log.for_psmid(110) == full.execution_log.for_psmid(110)
    assert sum(log.by_outcome().values()) == 4


def test_shrinking_the_ring_keeps_the_newest() -> None:
    emu = twin(None)
    run_all(emu, list(range(10)))
    before = emu.execution_log.entries()
    emu.execution_log.configure(capacity=3)
    assert emu.execution_log.entries() == before[-3:]
    run_all(emu, [50, 51])
    assert [e.psmid for e in emu.execution_log.entries()] == [9, 50, 51]


def test_pages_walk_the_log_in_order_and_say_what_was_missed() -> None:
    emu = twin(5)
    run_all(emu, list(range(12)))
    log = emu.execution_log
    first = log.page(0, 2)
    assert first.missed == 7 and [e.seq for e in first.entries] == [7, 8] and first.next == 9
    rest = log.page(first.next, 100)
    assert [e.seq for e in rest.entries] == [9, 10, 11] and rest.next == rest.end == 12
    assert first.entries + rest.entries == log.entries()
    assert log.page(12, 10).entries == [] and log.page(500, 10).entries == []
    for bad in ({"cursor": -1}, {"limit": 0}, {"limit": 10_001}, {"cursor": 1.5}):
        with pytest.raises(ValueError):
            log.page(**bad)  # type: ignore[arg-type]


def test_the_spill_file_holds_every_entry_in_its_final_state(tmp_path: Path) -> None:
    db = tmp_path / "exec.sqlite"
    full, spilled = twin(None), twin(3, spill=db, flush_interval=30.0)  # commits only when asked
    psmids = [1, 2, 3, 4, 5, 6, (1 << 64) - 1, 1 << 63]  # the top bit does not fit SQLite's signed int
    run_all(full, psmids)
    run_all(spilled, psmids)
    assert spilled.execution_log.page(0, 100).entries == full.execution_log.entries()  # from the file
    spilled.execution_log.close()
    assert read_execution_log(db) == full.execution_log.entries()
    assert read_execution_log(db, since=6) == full.execution_log.entries()[6:]


def test_a_spill_commit_catches_changes_to_open_entries(tmp_path: Path, small_exact: Emulator) -> None:
    emu, db = small_exact, tmp_path / "e.sqlite"
    emu.execution_log.configure(spill=db, flush_interval=30.0)
    fill(emu, Q00, [1, 2, 3])
    assert emu.execution_log.flush() == 3
    assert [e.outcome for e in read_execution_log(db)] == ["running", "running", "queued"]
    assert emu.execution_log.flush() == 0  # nothing changed, nothing written
    emu.clock.run_until_idle()
    assert emu.execution_log.flush() == 3
    assert [e.outcome for e in read_execution_log(db)] == ["completed"] * 3
    drain(emu, Q00)
    emu.execution_log.flush()
    assert read_execution_log(db) == emu.execution_log.entries()
    assert all(e.dequeued is not None for e in read_execution_log(db))
    emu.execution_log.close()


def test_the_background_thread_commits_within_its_interval(tmp_path: Path) -> None:
    db = tmp_path / "e.sqlite"
    emu = twin(None, spill=db, flush_interval=0.01)
    try:
        run_all(emu, [1, 2, 3])
        want = emu.execution_log.entries()
        deadline = time.monotonic() + 5.0
        while read_execution_log(db) != want:
            assert time.monotonic() < deadline, "the spill thread did not commit within 5 s"
            time.sleep(0.01)
    finally:
        emu.execution_log.close()


def test_a_reused_spill_file_continues_its_numbering(tmp_path: Path) -> None:
    db = tmp_path / "e.sqlite"
    first = twin(None, spill=db)
    run_all(first, [1, 2])
    first.execution_log.close()
    second = twin(None, spill=db)
    run_all(second, [3])
    assert [e.seq for e in second.execution_log.entries()] == [2]
    second.execution_log.close()
    assert [(e.seq, e.psmid) for e in read_execution_log(db)] == [(0, 1), (1, 2), (2, 3)]
    runs = read_spill_runs(db)
    assert [r.first_seq for r in runs] == [0, 2] and [r.run for r in runs] == [1, 2]


def test_bad_configurations_are_refused(tmp_path: Path, small_exact: Emulator) -> None:
    log = ExecutionLog()
    for cap in (0, -1, 10**12, 1.5, True):
        with pytest.raises(ValueError, match="capacity"):
            log.configure(capacity=cap)  # type: ignore[arg-type]
    for interval in (0.0, math.inf, math.nan, 61):
        with pytest.raises(ValueError, match="flush_interval"):
            log.configure(flush_interval=interval)
    fill(small_exact, Q00, [1])
    with pytest.raises(ValueError, match="before the first request"):
        small_exact.execution_log.configure(spill=tmp_path / "late.sqlite")
    with pytest.raises(FileNotFoundError):
        read_execution_log(tmp_path / "missing.sqlite")
    assert not (tmp_path / "missing.sqlite").exists()


def test_execution_records_and_spill_columns_agree() -> None:
    """The spill writes ``_Entry`` attributes named after ``Execution``'s fields: a field added to one
    and not the other would break the file silently, so it breaks here instead."""
    from emulator.execution_log import _Entry

    names = [f.name for f in dataclasses.fields(Execution)]
    assert set(names) <= set(_Entry.__slots__)


def _call(t, cmd: Command):
    """Submit one command and wait (bounded) for its completion."""
    t.submit([cmd])
    evs = collect(t, lambda evs: any(isinstance(e, Completion) and e.tag == cmd.tag for e in evs))
    return next(e.result for e in evs if isinstance(e, Completion) and e.tag == cmd.tag)


def test_what_a_client_was_told_is_on_disk_after_a_sigkill(server_factory, tmp_path: Path) -> None:
    """Replies received, then SIGKILL at once: the file shows each of them completed and taken."""
    db = tmp_path / "kill.sqlite"
    # a long interval: only the commit-before-answer rule can have put the last replies on disk
    srv = server_factory("--profile", "small", "--exec-log", str(db), "--exec-log-flush", "60")
    k = rsa_key(1024)
    q = qid_of(0, 1)
    received: dict[int, int] = {}
    tags = iter(range(1, 10_000))
    with open_transport(srv.data, timeout=2.0, domains=[1]) as t:
        for batch in (range(500, 506), range(506, 512), range(512, 518)):
            for psmid in batch:
                msg = build_mex(psmid, E, k.n)
                assert _call(t, Command(next(tags), Instr.NQAP, q, psmid=psmid, message=msg)).status.rc == 0
            deadline = time.monotonic() + 10.0
            while not set(batch) <= set(received):
                assert time.monotonic() < deadline, f"replies missing: {set(batch) - set(received)}"
                res = _call(t, Command(next(tags), Instr.DQAP, q))
                if res.status.rc == RC.NORMAL:
                    received[res.psmid] = int.from_bytes(parse_reply(res.reply).result, "big")
        srv.kill()
    assert received == {p: pow(p, E, k.n) for p in range(500, 518)}
    rows = {e.psmid: e for e in read_execution_log(db)}
    assert set(rows) == set(received)
    assert all(e.outcome == "completed" and e.ran and e.dequeued is not None for e in rows.values())
    assert [r.pid for r in read_spill_runs(db)] == [srv.proc.pid]


def test_the_fast_json_of_a_log_page_matches_the_generic_one() -> None:
    """Pages are serialised on the serving thread by a fast path; it must say what the generic
    dataclass walk says (field names, values, the type tag), for every outcome and a 64-bit psmid."""
    from emulator.server import _executions

    emu = twin(None)
    run_all(emu, [1, 2, (1 << 64) - 1])
    fill(emu, Q00, [9])  # still running or queued: None fields
    entries = emu.execution_log.entries()
    generic = [
        {"type": "Execution", **{f.name: getattr(e, f.name) for f in dataclasses.fields(e)}} for e in entries
    ]
    assert _executions(entries) == generic


def test_control_answers_encode_to_the_same_json_either_way() -> None:
    """The server encodes answers with orjson, falling back to the standard encoder for what orjson
    refuses; either way a reader decodes the same data."""
    import json

    from emulator.server import _dumps, jsonable

    emu = twin(None)
    run_all(emu, [1, (1 << 64) - 1])
    rows, nxt, oldest, end, _ = emu.execution_log.page_rows(0, 10)
    page = {"id": 3, "ok": True, "result": {"rows": rows, "next": nxt, "oldest": oldest, "end": end}}
    listing = {"id": 4, "ok": True, "result": jsonable(emu.execution_log.entries())}
    huge = {"id": 5, "ok": True, "result": 1 << 70}  # beyond orjson: the fallback
    for answer in (page, listing, huge):
        assert json.loads(_dumps(answer)) == json.loads(json.dumps(answer))


def test_the_psmid_index_follows_eviction_of_repeated_psmids() -> None:
    """A psmid sent several times keeps exactly its entries still in the ring, in order."""
    log = ExecutionLog(capacity=3)
    for qid in (1, 2, 3):
        log._add(7, qid, "MEX_1K", 0.0)
    assert [e.qid for e in log.for_psmid(7)] == [1, 2, 3]
    log._add(8, 4, "MEX_1K", 0.0)
    assert [e.qid for e in log.for_psmid(7)] == [2, 3]
    log._add(9, 5, "MEX_1K", 0.0)
    assert [e.qid for e in log.for_psmid(7)] == [3]
    log._add(7, 6, "MEX_1K", 0.0)  # evicts the last old 7 and adds a new one
    assert [e.qid for e in log.for_psmid(7)] == [6] and [e.qid for e in log.for_psmid(8)] == [4]
    log._add(10, 7, "MEX_1K", 0.0)
    log._add(11, 8, "MEX_1K", 0.0)
    assert [e.qid for e in log.for_psmid(7)] == [6] and log.for_psmid(8) == []
    log._add(12, 9, "MEX_1K", 0.0)
    assert log.for_psmid(7) == [] and not log.started(7) and log.starts(7) == 0
    assert [e.psmid for e in log.entries()] == [10, 11, 12]
    assert log._by_psmid.keys() == {10, 11, 12}  # nothing of the evicted psmids lingers
