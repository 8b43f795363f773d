"""What actually ran on the emulated cards: the ground truth the driver's verdicts are checked against.

One :class:`Execution` per accepted NQAP (a psmid sent twice, to one queue or two, has two entries).
The card model owns the mutable ``_Entry`` records and updates them in place as a message moves on
(queued → running → completed/error/…); readers get frozen snapshots.  Lookups by psmid are a dict
hit, so the NQAP/DQAP hot paths never scan the log.

**Bounded.**  The log keeps the last ``capacity`` entries in memory (a ring; default
:data:`DEFAULT_CAPACITY`), so a server that runs for days holds a fixed amount of it.  Entries that
fall out of the ring are gone from :meth:`ExecutionLog.entries` and :meth:`ExecutionLog.for_psmid`;
:meth:`ExecutionLog.page` says how many a reader missed.

**Spill.**  :meth:`ExecutionLog.configure` with ``spill=PATH`` also writes every entry, and every change
to it, to an SQLite file (standard library ``sqlite3``, WAL journal, ``synchronous=NORMAL``).  Writes
are batched: a background thread commits every ``flush_interval`` seconds (default
:data:`DEFAULT_FLUSH_INTERVAL`), and :meth:`ExecutionLog.flush` commits now (the ZeroMQ server calls it
before it sends each batch of answers, so whatever a client has been told is on disk first).  A
committed transaction survives a SIGKILL of the process (WAL frames are in the file once ``write``
returned; ``synchronous=NORMAL`` gives up only power-loss durability), so after a SIGKILL the file
holds every entry as it was at the last commit: at most ``flush_interval`` (plus one commit) stale, and
never behind an answer the server sent.  :func:`read_execution_log` reads it back as the same
:class:`Execution` records, from another process, while the server runs or after it died.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import operator
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

__all__ = [
    "DEFAULT_CAPACITY",
    "DEFAULT_FLUSH_INTERVAL",
    "OUTCOMES",
    "Execution",
    "ExecutionLog",
    "LogPage",
    "Outcome",
    "SpillRun",
    "read_execution_log",
    "read_spill_runs",
]

log = logging.getLogger(__name__)

Outcome = Literal[
    "queued", "running", "completed", "error", "in-process-failed", "pending-failed", "discarded"
]

#: Every outcome, in lifecycle order.  ``queued`` and ``running`` are the two not-yet-final ones.
OUTCOMES: Final = (
    "queued",
    "running",
    "completed",
    "error",
    "in-process-failed",
    "pending-failed",
    "discarded",
)
FINAL_OUTCOMES: Final = frozenset(OUTCOMES[2:])


@dataclass(frozen=True, slots=True)
class Execution:
    """A snapshot of one message's life on a card.

    ``engine`` and ``started`` are set once an engine picked it up (a ``discarded`` entry with
    ``started`` set *had run*: its effect, if any, happened).  ``ended`` is when it reached its final
    outcome (reply formatted, or dropped).  ``reply_code`` is the type 82 reply code of an error or
    machine-failure reply, 0 for a normal reply, None while none exists.  ``effect`` is the state
    change the firmware applied (``"CI"``, ``"KS"``, …) or None.  ``dequeued`` is when the host took
    the reply with DQAP.
    """

    psmid: int
    qid: int
    engine: int | None
    function: str
    enqueued: float
    started: float | None
    ended: float | None
    outcome: Outcome
    reply_code: int | None
    effect: str | None = None
    dequeued: float | None = None
    seq: int = 0

    @property
    def ran(self) -> bool:
        """True if an engine started it (its effect may have happened)."""
        return self.started is not None


class _Entry:
    """The mutable record behind an :class:`Execution` (owned by the card model)."""

    __slots__ = (
        "dequeued",
        "effect",
        "ended",
        "engine",
        "enqueued",
        "function",
        "outcome",
        "psmid",
        "qid",
        "reply_code",
        "seq",
        "started",
    )

    def __init__(self, seq: int, psmid: int, qid: int, function: str, enqueued: float) -> None:
        self.seq = seq
        self.psmid = psmid
        self.qid = qid
        self.function = function
        self.enqueued = enqueued
        self.engine: int | None = None
        self.started: float | None = None
        self.ended: float | None = None
        self.outcome: Outcome = "queued"
        self.reply_code: int | None = None
        self.effect: str | None = None
        self.dequeued: float | None = None

    def snapshot(self) -> Execution:
        return Execution(
            psmid=self.psmid,
            qid=self.qid,
            engine=self.engine,
            function=self.function,
            enqueued=self.enqueued,
            started=self.started,
            ended=self.ended,
            outcome=self.outcome,
            reply_code=self.reply_code,
            effect=self.effect,
            dequeued=self.dequeued,
            seq=self.seq,
        )


#: Entries an :class:`ExecutionLog` keeps in memory unless told otherwise (about 0.5 KiB each).
DEFAULT_CAPACITY: Final = 1_000_000
#: Largest ``capacity`` accepted (a typo such as 1e12 is refused, not allocated).
MAX_CAPACITY: Final = 100_000_000
#: Seconds between background commits of the spill file (the staleness bound after a SIGKILL).
DEFAULT_FLUSH_INTERVAL: Final = 0.05
#: Most entries one :meth:`ExecutionLog.page` returns.
MAX_PAGE: Final = 10_000

#: The record's fields, in order: the spill file's columns, and what :class:`_Entry` must carry.
FIELDS: Final = tuple(f.name for f in dataclasses.fields(Execution))
_row = operator.attrgetter(*FIELDS)
_I_SEQ, _I_PSMID = FIELDS.index("seq"), FIELDS.index("psmid")
_I_OUTCOME, _I_DEQUEUED = FIELDS.index("outcome"), FIELDS.index("dequeued")
_U64, _I64 = 1 << 64, 1 << 63


def _settled(row: tuple[Any, ...]) -> bool:
    """No further change can come to this entry: final, and its reply taken or thrown away."""
    outcome = row[_I_OUTCOME]
    return outcome in FINAL_OUTCOMES and (row[_I_DEQUEUED] is not None or outcome == "discarded")


def _check_capacity(capacity: int | None) -> int | None:
    if capacity is None:
        return None
    if type(capacity) is not int or not 1 <= capacity <= MAX_CAPACITY:
        raise ValueError(f"capacity must be an int in [1, {MAX_CAPACITY}] or None, got {capacity!r}")
    return capacity


def _check_interval(interval: float) -> float:
    if not isinstance(interval, int | float) or not math.isfinite(interval) or not 0.001 <= interval <= 60:
        raise ValueError(f"flush_interval must be a number of seconds in [0.001, 60], got {interval!r}")
    return float(interval)


@dataclass(frozen=True, slots=True)
class LogPage:
    """One page of the log, in seq order.

    ``entries`` start at the cursor asked for (or at ``oldest`` if the ring no longer holds it and no
    spill file does either: then ``missed`` says how many entries were skipped).  ``next`` is the cursor
    for the following page; ``end`` is the seq the next accepted request will get, so a reader that
    reached ``next == end`` has everything that existed when the page was taken.
    """

    entries: list[Execution]
    next: int
    oldest: int
    end: int
    missed: int = 0


@dataclass(frozen=True, slots=True)
class SpillRun:
    """One process that wrote to a spill file: its entries have seq ``first_seq`` and up."""

    run: int
    pid: int
    first_seq: int
    started: float  # wall-clock time (time.time()) the run attached the file


_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (run INTEGER PRIMARY KEY, pid INTEGER, first_seq INTEGER, started REAL);
CREATE TABLE IF NOT EXISTS executions (seq INTEGER PRIMARY KEY);
"""


def _connect(path: Path, *, create: bool) -> sqlite3.Connection:
    if not create and not path.exists():
        raise FileNotFoundError(f"no execution-log spill file {path}")
    con = sqlite3.connect(
        f"file:{path}?mode={'rwc' if create else 'rw'}", uri=True, check_same_thread=False, timeout=10.0
    )
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=NORMAL")
    return con


def _columns(con: sqlite3.Connection) -> list[str]:
    return [r[1] for r in con.execute("PRAGMA table_info(executions)")]


class _Spill:
    """The SQLite side of a spilling log: the connection and what was last written per open entry."""

    def __init__(self, path: Path, interval: float) -> None:
        self.path = path
        self.interval = interval
        self.con = _connect(path, create=True)
        with self.con:
            self.con.executescript(_SCHEMA)
            have = set(_columns(self.con))
            for name in FIELDS:  # older files, or fields added to Execution later: add the columns
                if name not in have:
                    self.con.execute(f'ALTER TABLE executions ADD COLUMN "{name}"')
        (last,) = self.con.execute("SELECT MAX(seq) FROM executions").fetchone()
        self.base = 0 if last is None else last + 1
        with self.con:
            cur = self.con.execute(
                "INSERT INTO runs (pid, first_seq, started) VALUES (?, ?, ?)",
                (os.getpid(), self.base, time.time()),
            )
        self.run = cur.lastrowid
        cols = ", ".join(f'"{n}"' for n in FIELDS)
        self.insert = f"INSERT OR REPLACE INTO executions ({cols}) VALUES ({', '.join('?' * len(FIELDS))})"
        self.open: dict[int, tuple[_Entry, tuple[Any, ...]]] = {}  # seq -> (entry, row last written)
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.written = 0
        self.commits = 0

    def write(self, rows: list[tuple[Any, ...]]) -> None:
        out = []
        for r in rows:
            p = r[_I_PSMID]
            if p >= _I64:  # SQLite integers are signed 64-bit
                r = (*r[:_I_PSMID], p - _U64, *r[_I_PSMID + 1 :])
            out.append(r)
        with self.con:
            self.con.executemany(self.insert, out)
        self.written += len(out)
        self.commits += 1


class ExecutionLog:
    """The emulator's record of accepted requests, in NQAP order: the last ``capacity`` in memory.

    Reads take the emulator's lock, so a test may read while a :class:`~emulator.clock.WallClock`
    pump thread completes requests.  ``capacity=None`` keeps everything (tests that want it all).
    """

    def __init__(
        self, lock: threading.RLock | None = None, *, capacity: int | None = DEFAULT_CAPACITY
    ) -> None:
        self._lock = lock if lock is not None else threading.RLock()
        self._capacity = _check_capacity(capacity)
        self._ring: list[_Entry] = []
        self._base = 0  # seq of this run's first entry (a reused spill file continues its numbering)
        self._next = 0  # seq of the next entry
        # psmid -> its entry, or a list of them when it was sent more than once: one object fewer per
        # entry for the cyclic GC to walk (a full collection over a 100k ring pauses the serving thread)
        self._by_psmid: dict[int, _Entry | list[_Entry]] = {}
        self._spill: _Spill | None = None
        self._fresh: list[_Entry] = []  # added since the last spill commit (only while spilling)
        self._flush_lock = threading.Lock()
        self._functions: dict[tuple[int, str], int] = {}  # (qid, function) -> accepted, never evicted

    def __repr__(self) -> str:
        spill = f" spill={str(self._spill.path)!r}" if self._spill is not None else ""
        return f"<ExecutionLog {len(self._ring)}/{self._capacity} next={self._next}{spill}>"

    # --- written by the card model (under the emulator lock) -----------------------------------

    def _add(self, psmid: int, qid: int, function: str, enqueued: float) -> _Entry:
        seq = self._next
        entry = _Entry(seq, psmid, qid, function, enqueued)
        self._next = seq + 1
        ring, cap = self._ring, self._capacity
        if cap is None or len(ring) < cap:
            ring.append(entry)
        else:
            i = (seq - self._base) % cap
            self._forget(ring[i])
            ring[i] = entry
        bucket = self._by_psmid.get(psmid)
        if bucket is None:
            self._by_psmid[psmid] = entry
        elif type(bucket) is list:
            bucket.append(entry)
        else:
            self._by_psmid[psmid] = [bucket, entry]  # type: ignore[list-item]
        if self._spill is not None:
            self._fresh.append(entry)
        key = (qid, function)
        self._functions[key] = self._functions.get(key, 0) + 1
        return entry

    def _forget(self, old: _Entry) -> None:
        bucket = self._by_psmid[old.psmid]
        if type(bucket) is not list:
            del self._by_psmid[old.psmid]
            return
        if bucket[0] is old:
            del bucket[0]
        else:
            bucket.remove(old)
        if len(bucket) == 1:
            self._by_psmid[old.psmid] = bucket[0]

    def _of(self, psmid: int) -> tuple[_Entry, ...] | list[_Entry]:
        bucket = self._by_psmid.get(psmid)
        if bucket is None:
            return ()
        return bucket if type(bucket) is list else (bucket,)  # type: ignore[return-value]

    def _ordered(self) -> list[_Entry]:
        ring, cap = self._ring, self._capacity
        if cap is None or len(ring) < cap:
            return ring
        i = (self._next - self._base) % cap
        return ring[i:] + ring[:i]

    # --- configuration -------------------------------------------------------------------------

    def configure(
        self,
        *,
        capacity: int | Literal["keep"] | None = "keep",
        spill: str | Path | None = None,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
    ) -> None:
        """Resize the ring (the newest entries are kept) and/or start spilling to ``spill``.

        A spill file must be attached while the log is still empty (before the first request); an
        existing file is continued (its runs table records each process that wrote to it, and seqs go
        on from its highest).  Refused with ``ValueError`` otherwise.
        """
        interval = _check_interval(flush_interval)
        with self._lock:
            if capacity != "keep":
                cap = _check_capacity(capacity)
                kept = self._ordered()
                if cap is not None and len(kept) > cap:
                    for old in kept[: len(kept) - cap]:
                        self._forget(old)
                    kept = kept[len(kept) - cap :]
                self._ring = list(kept)
                self._capacity = cap
                self._base = self._next - len(self._ring)
            if spill is not None:
                if self._spill is not None:
                    raise ValueError(f"already spilling to {self._spill.path}")
                if self._next != self._base or self._ring:
                    raise ValueError("attach the spill file before the first request is logged")
                sp = _Spill(Path(spill), interval)
                self._base = self._next = sp.base
                self._spill = sp
                sp.thread = threading.Thread(
                    target=self._flusher, args=(sp,), name="exec-log-spill", daemon=True
                )
                sp.thread.start()

    @property
    def capacity(self) -> int | None:
        return self._capacity

    @property
    def spill_path(self) -> Path | None:
        return None if self._spill is None else self._spill.path

    def _flusher(self, sp: _Spill) -> None:
        while not sp.stop.wait(sp.interval):
            try:
                self.flush()
            except Exception:  # a full disk must not kill the emulator; the next round retries
                log.exception("execution-log spill to %s failed", sp.path)

    def flush(self) -> int:
        """Commit every new entry and every change since the last commit to the spill file now.

        Returns the number of rows written (0 without a spill file).  Snapshots are taken under the
        emulator lock (microseconds per entry); the SQLite write happens outside it.
        """
        with self._flush_lock:
            sp = self._spill
            if sp is None:
                return 0
            rows = []
            with self._lock:
                fresh, self._fresh = self._fresh, []
                open_ = sp.open
                for seq, (entry, last) in list(open_.items()):
                    row = _row(entry)
                    if row != last:
                        rows.append(row)
                        if _settled(row):
                            del open_[seq]
                        else:
                            open_[seq] = (entry, row)
                for entry in fresh:
                    row = _row(entry)
                    rows.append(row)
                    if not _settled(row):
                        open_[entry.seq] = (entry, row)
            if rows:
                sp.write(rows)
            return len(rows)

    def close(self) -> None:
        """Stop the spill thread after a last commit, and close the file (idempotent)."""
        sp = self._spill
        if sp is None:
            return
        sp.stop.set()
        if sp.thread is not None and sp.thread is not threading.current_thread():
            sp.thread.join()
        try:
            self.flush()
        finally:
            with self._flush_lock:
                self._spill = None
                self._fresh = []
                sp.con.close()

    # --- read API ----------------------------------------------------------------------------

    def __len__(self) -> int:
        """Entries held in memory (at most ``capacity``)."""
        return len(self._ring)

    @property
    def total(self) -> int:
        """Entries logged by this emulator, including those the ring has dropped."""
        return self._next - self._base

    @property
    def end(self) -> int:
        """The seq the next accepted request will get."""
        return self._next

    @property
    def oldest(self) -> int:
        """The seq of the oldest entry still in memory (``end`` when the log is empty)."""
        return self._next - len(self._ring)

    def entries(self) -> list[Execution]:
        """Every execution still in memory, in the order the cards accepted them."""
        with self._lock:
            return [e.snapshot() for e in self._ordered()]

    def page(self, cursor: int = 0, limit: int = 1000) -> LogPage:
        """Up to ``limit`` entries with seq >= ``cursor``, oldest first (the control plane's paged read).

        Entries the ring has dropped are read from the spill file when there is one; without one the
        page starts at the oldest entry held and ``missed`` counts what was skipped.
        """
        rows, nxt, oldest, end, missed = self.page_rows(cursor, limit)
        return LogPage([Execution(*r) for r in rows], nxt, oldest, end, missed)

    def page_rows(
        self, cursor: int = 0, limit: int = 1000
    ) -> tuple[list[tuple[Any, ...]], int, int, int, int]:
        """:meth:`page` as ``(rows, next, oldest, end, missed)``, each row a tuple in :data:`FIELDS`
        order: the cheapest snapshot (the server serialises pages on its serving thread)."""
        if type(cursor) is not int or cursor < 0:
            raise ValueError(f"cursor must be an int >= 0, got {cursor!r}")
        if type(limit) is not int or not 1 <= limit <= MAX_PAGE:
            raise ValueError(f"limit must be an int in [1, {MAX_PAGE}], got {limit!r}")
        with self._lock:
            oldest, end = self.oldest, self._next
            if cursor >= oldest or self._spill is None:
                start = max(cursor, oldest)
                ring, cap = self._ring, self._capacity
                stop = max(start, min(end, start + limit))
                if cap is None or len(ring) < cap:
                    chosen = ring[start - self._base : stop - self._base]
                else:
                    chosen = [ring[(s - self._base) % cap] for s in range(start, stop)]
                return list(map(_row, chosen)), stop, oldest, end, max(0, oldest - cursor)
        # older than the ring: from the spill file (committed first, so nothing is in between)
        self.flush()
        sp = self._spill
        with self._flush_lock:
            if sp is None or self._spill is not sp:
                raise ValueError("the spill file was closed")
            entries = _read(sp.con, "WHERE seq >= ? ORDER BY seq LIMIT ?", (cursor, limit))
        nxt = entries[-1].seq + 1 if entries else oldest
        return list(map(_row, entries)), nxt, oldest, end, 0 if entries else oldest - cursor

    def for_psmid(self, psmid: int) -> list[Execution]:
        """Every execution of ``psmid`` still in memory (more than one if it was sent more than once)."""
        with self._lock:
            return [e.snapshot() for e in self._of(psmid)]

    def started(self, psmid: int) -> bool:
        """True if any execution of ``psmid`` was started by an engine."""
        with self._lock:
            return any(e.started is not None for e in self._of(psmid))

    def starts(self, psmid: int) -> int:
        """How many times an engine started ``psmid``: more than 1 means it ran twice."""
        with self._lock:
            return sum(e.started is not None for e in self._of(psmid))

    def executions_started(self, psmids: Iterable[int]) -> int:
        """Total engine starts over ``psmids`` (each psmid counted as often as it ran)."""
        with self._lock:
            return sum(e.started is not None for p in psmids for e in self._of(p))

    def function_counts(self) -> dict[tuple[int, str], int]:
        """Requests accepted per ``(qid, function)`` since the emulator was built (not bounded by the
        ring: one counter per pair that occurred)."""
        with self._lock:
            return dict(self._functions)

    def by_outcome(self) -> dict[str, int]:
        """Counts per outcome over the entries in memory (every outcome present, zeros included)."""
        counts = dict.fromkeys(OUTCOMES, 0)
        with self._lock:
            for e in self._ring:
                counts[e.outcome] += 1
        return counts


def _read(con: sqlite3.Connection, where: str, params: Sequence[Any]) -> list[Execution]:
    have = _columns(con)
    names = [n for n in FIELDS if n in have]
    cols = ", ".join(f'"{n}"' for n in names)
    out = []
    for values in con.execute(f"SELECT {cols} FROM executions {where}", params):
        rec = dict(zip(names, values, strict=True))
        if rec["psmid"] < 0:
            rec["psmid"] += _U64
        out.append(Execution(**rec))
    return out


def read_execution_log(path: str | Path, *, since: int = 0) -> list[Execution]:
    """The entries of a spill file (seq >= ``since``), in seq order, as :class:`Execution` records.

    Works from another process while the server runs (WAL readers do not block the writer) and after
    it was killed: a SIGKILLed server's file holds everything committed before the kill (see the
    module docstring for the bound).  ``FileNotFoundError`` if there is no such file.
    """
    con = _connect(Path(path), create=False)
    try:
        return _read(con, "WHERE seq >= ? ORDER BY seq", (since,))
    finally:
        con.close()


def read_spill_runs(path: str | Path) -> list[SpillRun]:
    """Each process that wrote to the spill file, oldest first (a restarted server adds one)."""
    con = _connect(Path(path), create=False)
    try:
        rows = con.execute("SELECT run, pid, first_seq, started FROM runs ORDER BY run").fetchall()
    finally:
        con.close()
    return [SpillRun(*r) for r in rows]
