"""The durable ledger: what a restarted client needs to give every request of a dead one a verdict.

``apcrypto.connect(url, journal="path.db")`` keeps one SQLite file (standard library ``sqlite3``,
WAL journal) that survives the death of the process (SIGKILL, a crash, an OOM kill).  docs/journal.md
is the user's page; this module is the writer.

What is stored, and when (the order is the guarantee):

* **at submit** (written with the next commit; a request that ends before it never touches the
  file): a row per request: its kind (the request class), its function (``MEX_2K``,
  ``CPRB:CI``...), the idempotent flag, the APQNs it is pinned to, the few numbers needed to decode
  its reply (``mod_len``, ``n``) and -- only with ``journal_operands=True`` -- its operand bytes (the
  AP message, or the CPRB payload), which a re-drive after a restart needs;
* **before its NQAP leaves the host**: the psmid and APQN of the attempt.  The runner hands each
  batch of actions to :meth:`Journal.carry` before the transport sees it, and the batch is committed
  there, once (a *group commit*: one transaction per batch, not per request).  So a psmid a card may
  hold is always in the file; a request with no psmid in the file never reached a card;
* **when it ends**: its row is deleted, once the caller's callback has its outcome (never before:
  a row gone while its outcome is undelivered would be a request lost); nothing is left to reconcile.
  Deletions ride on the next batch's commit, or on the commit the runner makes when it goes idle;
* **after a restart**: the reply facts a drain found (``ok``, ``unrun:0x10/2``..., never the result
  bytes) and each open request's verdict and reason, and the re-drives made for them.

Not stored: results, replies' bytes, keys (unless they are operands and ``journal_operands=True``).
The server session's resume token *is* stored: a restarted client needs it to get its session (and
the replies its cards hold) back; it is as sensitive as the session itself.  The file and its
``-wal`` file are created owner-only (0600).  The connection holds SQLite's exclusive lock for the
client's life, so a second client cannot open (and reconcile) a journal in use
(:class:`JournalInUse`); the lock goes with the process.

Durability: ``synchronous=NORMAL`` (the default) makes a commit survive the death of the process,
since WAL frames are in the file once ``write`` returned, but not a power loss or a kernel crash;
``journal_sync="full"`` fsyncs every commit and survives those too, at a price the bench shows.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from apcrypto.core.actions import Action, Execute
from apcrypto.core.events import Completion, TransportLost
from apcrypto.reconcile import UNRUN, AttemptRow, Decision, RequestRow
from apcrypto.requests import CounterIncrement, KeyRead, KeyStore, ModExpo, ModExpoCrt, RandomBytes, Request
from apformats.results import Instr

__all__ = [
    "SCHEMA_VERSION",
    "SYNC_MODES",
    "Journal",
    "JournalError",
    "JournalInUse",
    "OpenRequest",
    "describe_request",
    "restore_request",
]

SCHEMA_VERSION = 1
#: Verdicts are kept this many runs of the client after the one that recorded them (``apcrypto
#: recovered --offline`` shows them), then deleted with the runs that have no row left.
KEEP_LIVES = 10
#: ``journal_sync`` values -> the SQLite ``synchronous`` setting
SYNC_MODES: dict[str, str] = {"normal": "NORMAL", "full": "FULL"}

#: The request classes a journal can rebuild (a caller's own Request subclass is journalled by name
#: only: it can be judged after a restart, never re-sent).
KINDS: dict[str, type[Request]] = {
    cls.__name__: cls for cls in (ModExpo, ModExpoCrt, RandomBytes, CounterIncrement, KeyStore, KeyRead)
}
#: The attributes of a request that hold its operands (key parts, data, payload): stored only with
#: ``journal_operands=True``.  Everything else a built-in request keeps is a small number or name.
OPERAND_FIELDS = ("_msg", "payload")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS lives(
    life INTEGER PRIMARY KEY, started REAL NOT NULL, pid INTEGER NOT NULL, url TEXT,
    psmid_base INTEGER, token BLOB);
CREATE TABLE IF NOT EXISTS requests(
    id INTEGER PRIMARY KEY, life INTEGER NOT NULL, kind TEXT NOT NULL, function TEXT NOT NULL,
    idempotent INTEGER NOT NULL, meta TEXT NOT NULL, operands BLOB, target TEXT,
    attempts TEXT NOT NULL DEFAULT '',
    redrive_of INTEGER, verdict TEXT, evidence TEXT, reason TEXT, decided_in INTEGER, redrive INTEGER);
"""
# ``attempts``: one token per attempt, in the order sent: ``PSMID@QID`` (hex), ``=FACT`` appended when
# a reply fact is known (``6b0000001a@0200=unrun:0x10/2``).  One row per request, so the hot path
# is one INSERT (with its first attempt) and one DELETE per request, a few statements per commit.


_INSERT = (
    "INSERT INTO requests(id, life, kind, function, idempotent, meta, operands, target, attempts) VALUES ",
    "(?, ?, ?, ?, ?, ?, ?, ?, ?)",
    ", ",
    "",
)
_DELETE = ("DELETE FROM requests WHERE id IN (", "?", ", ", ")")
_CHUNK = 400  # rows per statement (9 parameters each: well under SQLite's 32766)


def _many(db: sqlite3.Connection, sql: tuple[str, str, str, str], rows: Sequence[tuple[Any, ...]]) -> None:
    """One statement for many rows (``head + item, item, ... + tail``), not one per row as
    ``executemany`` runs: the sqlite3 module lets go of the GIL around every statement step, and
    under a busy caller thread each handover can cost the runner a whole switch interval."""
    head, item, sep, tail = sql
    for i in range(0, len(rows), _CHUNK):
        chunk = rows[i : i + _CHUNK]
        db.execute(head + sep.join([item] * len(chunk)) + tail, [v for r in chunk for v in r])


def format_attempts(attempts: Iterable[AttemptRow]) -> str:
    return " ".join(f"{a.psmid:x}@{a.qid:x}" + ("" if a.reply is None else f"={a.reply}") for a in attempts)


def parse_attempts(text: str) -> tuple[AttemptRow, ...]:
    out = []
    for token in text.split():
        where, _, fact = token.partition("=")
        p, _, q = where.partition("@")
        out.append(AttemptRow(int(p, 16), int(q, 16), fact or None))
    return tuple(out)


class JournalError(RuntimeError):
    """The journal file cannot be used (not ours, a newer schema, unreadable)."""


class JournalInUse(JournalError):
    """Another live client holds this journal (SQLite's exclusive lock); one client per journal."""


def _signed(psmid: int) -> int:
    """A 64-bit psmid as SQLite's signed INTEGER."""
    return psmid - (1 << 64) if psmid >= 1 << 63 else psmid


def _unsigned(value: int) -> int:
    return value + (1 << 64) if value < 0 else value


_META_TEXT: dict[tuple[tuple[str, Any], ...], str] = {}


def _meta_text(meta: dict[str, Any]) -> str:
    """``meta`` as JSON, memoised: a client sends the same few shapes (function, modulus length)."""
    key = tuple(meta.items())
    text = _META_TEXT.get(key)
    if text is None:
        text = json.dumps(meta, separators=(",", ":"))
        if len(_META_TEXT) < 4096:
            _META_TEXT[key] = text
    return text


def describe_request(request: Request) -> tuple[str, dict[str, Any], bytes | None]:
    """``(kind, meta, operands)`` of a request: its class name, the small values it decodes a reply
    with (JSON-able), and its operand bytes (None if it has none we know of)."""
    state = getattr(request, "__dict__", {})
    meta = {k: v for k, v in state.items() if k not in OPERAND_FIELDS and type(v) in (int, str, bool)}
    meta.setdefault("function", getattr(request, "function", "?"))
    operands = None
    for name in OPERAND_FIELDS:
        value = state.get(name)
        if isinstance(value, bytes):
            meta["operand_field"] = name
            operands = value
            break
    return type(request).__name__, meta, operands


def restore_request(kind: str, meta: Mapping[str, Any], operands: bytes | None) -> Request | None:
    """The request a row describes, rebuilt without its constructor (its checks ran at submit), or
    None when its kind is not one of :data:`KINDS`.  Without ``operands`` it can decode a reply
    (``mod_len``...) but not be sent: :func:`sendable` says which."""
    cls = KINDS.get(kind)
    if cls is None:
        return None
    obj = cls.__new__(cls)
    state = {k: v for k, v in meta.items() if k != "operand_field"}
    field = meta.get("operand_field")
    if operands is not None and isinstance(field, str) and field in OPERAND_FIELDS:
        state[field] = bytes(operands)
    obj.__dict__.update(state)
    return obj


def sendable(request: Request | None) -> bool:
    """Whether a restored request carries its operands (can build its AP message)."""
    return request is not None and any(hasattr(request, f) for f in OPERAND_FIELDS)


@dataclass(frozen=True, slots=True)
class OpenRequest:
    """A request an earlier life left open: the pure reconciliation's row, and what it takes to
    decode a reply for it or send it again."""

    row: RequestRow
    kind: str
    meta: Mapping[str, Any]
    operands: bytes | None
    target: frozenset[int] | None
    life: int


class Journal:
    """One client's journal file.  Thread-safe (one lock); the runner thread writes on the hot path.

    Life cycle: :meth:`open` (creates owner-only, takes the exclusive lock, starts a new *life*),
    :meth:`open_requests` / :meth:`record_facts` / :meth:`record_verdicts` (the reconciliation),
    :meth:`begin` (this life's session), then :meth:`submitted` and :meth:`carry` from the runner,
    and :meth:`close`.
    """

    def __init__(self, path: Path, conn: sqlite3.Connection, *, operands: bool, sync: str) -> None:
        self.path = path
        self.operands = operands
        self.sync = sync
        self._db: sqlite3.Connection | None = conn
        self._lock = threading.Lock()
        self._rids: dict[int, int] = {}  # this life's core request id -> journal id
        # id(request object) -> (journal id, row already written): ids claimed at submit, re-drives
        self._preassigned: dict[int, tuple[int, bool]] = {}  # re-drives: id(request) -> (row, True)
        #: ids claimed at submit and not yet submitted, per request object (the same object may be
        #: submitted several times: each submission its own id, in the order they were claimed)
        self._claimed: dict[int, deque[int]] = {}
        self._rows: dict[int, list[Any]] = {}  # journal id -> the row to insert at the next commit
        self._open: dict[int, list[AttemptRow]] = {}  # journal id -> its attempts (open requests)
        self._changed: set[int] = set()  # written rows whose attempts changed since
        self._done: list[tuple[int]] = []  # journal ids whose outcome the caller has
        self._nqap_tags: dict[int, tuple[int, int]] = {}  # tag of a journalled NQAP in flight -> (jid, psmid)
        self._dirty = False
        self._token_of: Callable[[], bytes | None] | None = None
        self._token: bytes | None = None
        self.commits = 0
        (last,) = conn.execute("SELECT coalesce(max(life), 0) FROM lives").fetchone()
        (top,) = conn.execute("SELECT coalesce(max(id), 0) FROM requests").fetchone()
        self._next_id = int(top) + 1
        self.life = int(last) + 1
        conn.execute(
            "INSERT INTO lives(life, started, pid) VALUES (?, ?, ?)", (self.life, time.time(), os.getpid())
        )
        # bounded on disk: verdicts recorded more than KEEP_LIVES runs ago go, and runs with no row left
        conn.execute(
            "DELETE FROM requests WHERE verdict IS NOT NULL AND decided_in <= ?", (self.life - KEEP_LIVES,)
        )
        conn.execute(
            "DELETE FROM lives WHERE life <= ? AND life NOT IN (SELECT life FROM requests)",
            (self.life - KEEP_LIVES,),
        )
        conn.commit()  # the first write takes the exclusive lock (held for the connection's life)

    @property
    def _c(self) -> sqlite3.Connection:
        db = self._db
        if db is None:
            raise JournalError(f"journal {str(self.path)!r} is closed")
        return db

    # -- opening ---------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike[str], *, operands: bool = False, sync: str = "normal") -> Journal:
        """Open (or create, owner-only) the journal at ``path`` and start a new life in it.

        Raises :class:`JournalInUse` when another live client holds it, :class:`JournalError` when
        it is not a journal this version can use, ``ValueError`` for a bad ``sync``.
        """
        if sync not in SYNC_MODES:
            raise ValueError(f"journal_sync must be one of {sorted(SYNC_MODES)}, not {sync!r}")
        if not isinstance(operands, bool):
            raise TypeError(f"journal_operands must be True or False, not {operands!r}")
        p = Path(os.fspath(path)).expanduser()
        _create_owner_only(p)
        try:
            conn = sqlite3.connect(p, timeout=0.0, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise JournalError(f"journal {str(p)!r}: {exc}") from None
        try:
            conn.execute("PRAGMA locking_mode=EXCLUSIVE")  # before WAL: no -shm file, one client
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise JournalError(f"journal {str(p)!r}: SQLite refused WAL mode ({mode})")
            conn.execute(f"PRAGMA synchronous={SYNC_MODES[sync]}")
            conn.isolation_level = "DEFERRED"  # Python opens a transaction before each write batch
            conn.executescript(_SCHEMA)
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            if row is None:
                conn.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) != SCHEMA_VERSION:
                raise JournalError(
                    f"journal {str(p)!r} has schema {row[0]}; this apcrypto reads {SCHEMA_VERSION}"
                )
            conn.commit()
            journal = cls(p, conn, operands=operands, sync=sync)
        except sqlite3.OperationalError as exc:
            conn.close()
            if "locked" in str(exc):
                raise JournalInUse(f"journal {str(p)!r} is held by another live client") from None
            raise JournalError(f"journal {str(p)!r}: {exc}") from None
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise JournalError(f"journal {str(p)!r} is not a journal: {exc}") from None
        except BaseException:
            conn.close()
            raise
        _owner_only(p)  # the -wal file exists now
        return journal

    # -- the session -------------------------------------------------------------------------------
    def resume_token(self) -> bytes | None:
        """The server session token the latest earlier life used (None: none recorded)."""
        with self._lock:
            row = self._c.execute(
                "SELECT token FROM lives WHERE life < ? AND token IS NOT NULL ORDER BY life DESC LIMIT 1",
                (self.life,),
            ).fetchone()
        return None if row is None else bytes(row[0])

    def psmid_bases(self) -> set[int]:
        """The psmid bases of every earlier life (a new life must not reuse one)."""
        with self._lock:
            rows = self._c.execute("SELECT psmid_base FROM lives WHERE psmid_base IS NOT NULL").fetchall()
        return {_unsigned(int(r[0])) for r in rows}

    def begin(self, url: str, psmid_base: int, token_of: Callable[[], bytes | None] | None) -> None:
        """Record this life's URL, psmid base and session token (``token_of()`` is read again at
        every commit: a reconnect may be granted a new session)."""
        self._token_of = token_of
        self._token = token_of() if token_of is not None else None
        with self._lock:
            self._c.execute(
                "UPDATE lives SET url = ?, psmid_base = ?, token = ? WHERE life = ?",
                (url, _signed(psmid_base), self._token, self.life),
            )
            self._c.commit()
            self.commits += 1

    # -- the hot path (runner thread) ------------------------------------------------------------------
    def preassign(self, request: Request, jid: int) -> None:
        """The next :meth:`submitted` of this very object is the row ``jid`` already written (a
        re-drive the reconciliation recorded with its verdict, atomically)."""
        with self._lock:
            self._preassigned[id(request)] = (jid, True)

    def claim(self, request: Request) -> int:
        """The journal id this submission of ``request`` will have (called on the caller's thread at
        submit, so the caller can keep it with its own records: after a crash, its verdict carries
        this id).  Each submission gets its own, even of one request object submitted again."""
        with self._lock:
            pre = self._preassigned.get(id(request))
            if pre is not None:
                return pre[0]
            jid = self._next_id
            self._next_id += 1
            self._claimed.setdefault(id(request), deque()).append(jid)
            return jid

    def unclaim(self, request: Request, jid: int | None = None) -> None:
        """A claimed submission that did not happen after all (``jid``: its id; None: the latest)."""
        with self._lock:
            self._take_claim(request, jid, latest=True)

    def _take_claim(self, request: Request, jid: int | None, *, latest: bool = False) -> int | None:
        """Remove a claimed id of ``request`` (``jid``, else the oldest -- or ``latest``); call with
        the lock held."""
        ids = self._claimed.get(id(request))
        if not ids:
            return None
        if jid is None:
            jid = ids.pop() if latest else ids.popleft()
        else:
            with contextlib.suppress(ValueError):
                ids.remove(jid)
        if not ids:
            del self._claimed[id(request)]
        return jid

    def submitted(
        self,
        rid: int,
        request: Request,
        idempotent: bool | None,
        target: frozenset[int] | None,
        jid: int | None = None,
    ) -> None:
        """The core accepted ``request`` as ``rid``: its row goes in with the next commit, under
        ``jid`` (the id :meth:`claim` gave this submission; None: the oldest claimed for this object,
        else a new one)."""
        kind, meta, ops = describe_request(request)
        idem = request.idempotent_default if idempotent is None else bool(idempotent)
        with self._lock:
            pre = self._preassigned.pop(id(request), None)
            if pre is not None:  # a re-drive: its row is written; its attempts are not yet
                self._rids[rid] = pre[0]
                self._open[pre[0]] = []
                return
            jid = self._take_claim(request, jid)
            if jid is None:
                jid = self._next_id
                self._next_id += 1
            self._rids[rid] = jid
            self._open[jid] = []
            self._rows[jid] = [
                jid,
                self.life,
                kind,
                str(meta["function"]),
                int(idem),
                _meta_text(meta),
                ops if self.operands else None,
                None if target is None else json.dumps(sorted(target)),
            ]

    def carry(
        self, actions: Sequence[Action], rid_of: Callable[[int], int | None], *, commit: bool = True
    ) -> None:
        """Journal what ``actions`` mean, before the runner carries them out: every request NQAP's
        psmid and APQN (``rid_of(psmid)`` names its request; a health probe has none); and commit if
        a batch is about to leave the host (commit before send).  A runner that holds its sends back
        passes ``commit=False`` and commits once before it sends them.  Outcomes are journalled by
        :meth:`ended`, once delivered."""
        send = False
        for a in actions:
            t = type(a)
            if t is Execute:
                for c in a.commands:  # type: ignore[union-attr]
                    if c.instr is Instr.NQAP:
                        rid = rid_of(c.psmid)
                        jid = None if rid is None else self._rids.get(rid)
                        atts = None if jid is None else self._open.get(jid)
                        if atts is not None:
                            atts.append(AttemptRow(c.psmid, c.qid))
                            if jid not in self._rows:
                                self._changed.add(jid)  # type: ignore[arg-type]
                            self._nqap_tags[c.tag] = (jid, c.psmid)  # type: ignore[assignment]
                            send = True
        if send and commit:
            self.commit()

    def ended(self, rid: int) -> None:
        """Request ``rid``'s caller has its outcome (called *after* the caller's callback ran, so
        the row cannot be gone while the outcome is not yet delivered): the row goes with the next
        commit."""
        jid = self._rids.pop(rid, None)
        if jid is None:
            return
        self._open.pop(jid, None)
        self._changed.discard(jid)
        if self._rows.pop(jid, None) is None:  # never written: nothing to delete either
            self._done.append((jid,))

    def observe(self, events: Iterable[Any]) -> None:
        """Transport events, before the core sees them: an NQAP the card refused (any response code
        but NORMAL: it never took the message) or that provably never left the host (``unsent``)
        is journalled as never run, so a restart need not doubt it (it rides on the next commit)."""
        tags = self._nqap_tags
        if not tags:
            return
        for ev in events:
            t = type(ev)
            if t is Completion:
                entry = tags.pop(ev.tag, None)
                if entry is not None and ev.result.status.response_code != 0:
                    self._fact(*entry, f"{UNRUN}nqap-rc{ev.result.status.response_code:#04x}")
            elif t is TransportLost:
                unsent = set(ev.unsent)
                for tag in ev.tags:
                    entry = tags.pop(tag, None)
                    if entry is not None and tag in unsent:
                        self._fact(*entry, f"{UNRUN}unsent")

    def _fact(self, jid: int, psmid: int, fact: str) -> None:
        atts = self._open.get(jid)
        if atts is None:
            return
        for i, a in enumerate(atts):
            if a.psmid == psmid:
                atts[i] = AttemptRow(a.psmid, a.qid, fact)
                if jid not in self._rows:
                    self._changed.add(jid)

    def commit(self) -> None:
        """Write what is pending in one transaction (nothing to write: nothing happens)."""
        with self._lock:
            if not (self._rows or self._changed or self._done or self._dirty):
                return
            db = self._c
            if self._rows:
                opened = self._open
                _many(db, _INSERT, [(*r, format_attempts(opened[jid])) for jid, r in self._rows.items()])
                self._rows = {}
            if self._changed:
                db.executemany(
                    "UPDATE requests SET attempts = ? WHERE id = ?",
                    [(format_attempts(self._open[jid]), jid) for jid in self._changed],
                )
                self._changed = set()
            if self._done:
                _many(db, _DELETE, self._done)
                self._done = []
            if self._token_of is not None:
                token = self._token_of()
                if token != self._token:
                    self._token = token
                    db.execute("UPDATE lives SET token = ? WHERE life = ?", (token, self.life))
            db.commit()
            self._dirty = False
            self.commits += 1

    @property
    def dirty(self) -> bool:
        return self._dirty or bool(self._rows or self._changed or self._done)

    def open_count(self) -> int:
        """Requests of this life not yet ended (what the journal holds for them in memory)."""
        return len(self._rids)

    # -- reconciliation --------------------------------------------------------------------------------
    def open_requests(self) -> list[OpenRequest]:
        """Every request an earlier life left without an outcome or a verdict, oldest first."""
        with self._lock:
            reqs = self._c.execute(
                "SELECT id, life, kind, function, idempotent, meta, operands, target, redrive_of, attempts "
                "FROM requests WHERE life < ? AND verdict IS NULL ORDER BY id",
                (self.life,),
            ).fetchall()
        out = []
        for jid, life, kind, function, idem, meta_text, ops, target_text, redrive_of, atts in reqs:
            meta = json.loads(meta_text)
            restored = restore_request(kind, meta, None if ops is None else bytes(ops))
            target = None if target_text is None else frozenset(json.loads(target_text))
            row = RequestRow(
                int(jid),
                str(function),
                bool(idem),
                sendable(restored),
                parse_attempts(atts),
                None if redrive_of is None else int(redrive_of),
                target,
            )
            out.append(OpenRequest(row, kind, meta, None if ops is None else bytes(ops), target, int(life)))
        return out

    def record_facts(self, facts: Mapping[int, str], opened: Iterable[OpenRequest]) -> None:
        """What a drain found for each psmid (``reconcile.reply_fact``) on the ``opened`` requests'
        attempts, committed at once: a reply taken from a card is never only in memory."""
        updates = []
        for o in opened:
            if any(a.psmid in facts for a in o.row.attempts):
                atts = [AttemptRow(a.psmid, a.qid, facts.get(a.psmid, a.reply)) for a in o.row.attempts]
                updates.append((format_attempts(atts), o.row.id))
        if not updates:
            return
        with self._lock:
            self._c.executemany("UPDATE requests SET attempts = ? WHERE id = ?", updates)
            self._c.commit()
            self.commits += 1

    def record_verdicts(
        self, decisions: Iterable[Decision], redrives: Mapping[int, OpenRequest]
    ) -> dict[int, int]:
        """Each decision's verdict, and a new row for each re-drive (``redrives``: decision id ->
        the open request), in one transaction; returns decision id -> the re-drive's journal id."""
        made: dict[int, int] = {}
        with self._lock:
            db = self._c
            for d in decisions:
                db.execute(
                    "UPDATE requests SET verdict = ?, evidence = ?, reason = ?, decided_in = ? WHERE id = ?",
                    (d.verdict.value, d.evidence.value, d.reason, self.life, d.id),
                )
            for did, o in redrives.items():
                jid = self._next_id
                self._next_id += 1
                made[did] = jid
                db.execute("UPDATE requests SET redrive = ? WHERE id = ?", (jid, did))
                db.execute(
                    "INSERT INTO requests(id, life, kind, function, idempotent, meta, operands, target, "
                    "redrive_of) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        jid,
                        self.life,
                        o.kind,
                        o.row.function,
                        int(o.row.idempotent),
                        json.dumps(dict(o.meta), separators=(",", ":")),
                        o.operands if self.operands else None,
                        None if o.target is None else json.dumps(sorted(o.target)),
                        did,
                    ),
                )
            db.commit()
            self.commits += 1
        return made

    def verdicts(self) -> list[dict[str, Any]]:
        """Every recorded verdict (what ``apcrypto recovered --offline`` prints), oldest first."""
        return read_verdicts(self._c, self._lock)

    # -- the end ------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Commit what is pending and release the file (and its lock)."""
        if self._db is None:
            return
        try:
            self.commit()
        finally:
            with self._lock:
                db, self._db = self._db, None
            if db is not None:
                db.close()

    @property
    def closed(self) -> bool:
        return self._db is None


def read_verdicts(db: sqlite3.Connection, lock: threading.Lock | None = None) -> list[dict[str, Any]]:
    """The requests a journal holds with their verdicts (or ``None``: not reconciled yet)."""
    query = (
        "SELECT r.id, r.life, r.kind, r.function, r.idempotent, r.verdict, r.evidence, r.reason, "
        "r.redrive_of, r.decided_in, r.attempts, r.redrive FROM requests r ORDER BY r.id"
    )
    if lock is not None:
        with lock:
            rows = db.execute(query).fetchall()
    else:
        rows = db.execute(query).fetchall()
    keys = (
        "id",
        "life",
        "kind",
        "function",
        "idempotent",
        "verdict",
        "evidence",
        "reason",
        "redrive_of",
        "decided_in",
        "attempts",
        "redrive",
    )
    out = []
    for r in rows:
        d = dict(zip(keys, r, strict=True))
        d["idempotent"] = bool(d["idempotent"])
        d["attempts"] = [
            {"psmid": f"{a.psmid:#x}", "apqn": f"{a.qid >> 8:02x}.{a.qid & 0xFF:04x}", "reply": a.reply}
            for a in parse_attempts(d["attempts"])
        ]
        out.append(d)
    return out


_T = TypeVar("_T")


def read_journal(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a journal no client holds (read-only): every row it keeps, with its verdict or None."""
    return _reading(path, read_verdicts, exclusive=True)


def journal_url(path: str | os.PathLike[str]) -> str | None:
    """The transport URL the journal's latest client ran on (None if it never connected), read
    without taking the journal: where its open requests must be decided."""

    def latest(db: sqlite3.Connection) -> str | None:
        row = db.execute("SELECT url FROM lives WHERE url IS NOT NULL ORDER BY life DESC LIMIT 1").fetchone()
        return None if row is None else str(row[0])

    return _reading(path, latest, exclusive=False)


def _reading(
    path: str | os.PathLike[str], read: Callable[[sqlite3.Connection], _T], *, exclusive: bool
) -> _T:
    """``read`` a journal no client holds, its errors named as the journal's: ``exclusive`` takes the
    file for the read (no client may start meanwhile), else it is opened read-only."""
    p = Path(os.fspath(path))
    if not p.is_file():
        raise FileNotFoundError(f"no journal at {str(p)!r}")
    try:
        if exclusive:
            db = sqlite3.connect(p, timeout=0.0)
        else:
            db = sqlite3.connect(f"{p.resolve().as_uri()}?mode=ro", uri=True, timeout=0.0)
    except sqlite3.Error as exc:
        raise JournalError(f"journal {str(p)!r}: {exc}") from None
    try:
        if exclusive:
            db.execute("PRAGMA locking_mode=EXCLUSIVE")
        return read(db)
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc):
            raise JournalInUse(f"journal {str(p)!r} is held by a live client") from None
        raise JournalError(f"journal {str(p)!r}: {exc}") from None
    except sqlite3.DatabaseError as exc:
        raise JournalError(f"journal {str(p)!r} is not a journal: {exc}") from None
    finally:
        db.close()


def _create_owner_only(path: Path) -> None:
    """Create ``path`` (and its ``-wal``) owner-only before SQLite opens it: SQLite gives the -wal
    file its database's mode, so 0600 here is 0600 there; an existing file is narrowed to 0600.

    An existing file is never opened here, only chmod-ed by name: closing any descriptor of a file
    drops every POSIX lock this process holds on it, and a live client of this process may hold the
    journal's (a second open would then unlock it for other processes, before being refused)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        os.chmod(path, 0o600)
    else:
        os.close(fd)  # a file just made: no lock on it to lose
    _owner_only(path)


def _owner_only(path: Path) -> None:
    for extra in ("-wal", "-shm", "-journal"):
        side = path.with_name(path.name + extra)
        if side.exists():
            os.chmod(side, 0o600)
