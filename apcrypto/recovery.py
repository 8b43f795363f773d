"""Reconciliation on restart: reopen the journal, drain the resumed session, give every open request
of the dead client a verdict (docs/journal.md).

Runs inside ``connect(..., journal=...)``, after the transport is open (its HELLO presented the
journalled resume token) and **before** the driver core exists: the core's bring-up resets every
queue (RAPQ/ZAPQ), which would discard the replies the cards still hold, so the drain comes first
and speaks to the transport directly (DQAP, nothing else).  The decision itself is
:func:`apcrypto.reconcile.decide` (pure); this module is its I/O shell:

1. read the open requests of earlier lives from the journal;
2. if the server resumed the session, DQAP every APQN that holds one of their attempts until it
   answers "no reply pending" with nothing held (``queue_empty``), every psmid of ours has been
   answered, or the bound passes; each batch of reply facts is committed before the next DQAP;
3. decide, record every verdict (and the re-drives' rows) in one transaction;
4. once the client runs, send the re-drives (journalled as any request, under their rows).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from apcrypto.core.config import DriverConfig
from apcrypto.core.events import Command, Completion, TransportLost
from apcrypto.errors import ApcryptoError, BadRequest, ClientClosed, Indeterminate
from apcrypto.journal import Journal, OpenRequest, restore_request, sendable
from apcrypto.reconcile import FAILED, OK, Decision, Drained, Verdict, decide, reply_fact
from apcrypto.transport.base import Transport
from apformats.codes import NO_PENDING_REPLY, ResponseCode
from apformats.errors import FormatError
from apformats.messages import parse_reply
from apformats.results import Instr, qid_str

__all__ = ["Recovered", "Recovery", "drain", "reconcile_journal", "session_resumed"]

log = logging.getLogger("apcrypto.recovery")

#: DQAP answers that mean "not now, ask again" (no reply yet while work is held; the card busy)
_AGAIN = frozenset({int(NO_PENDING_REPLY), int(ResponseCode.BUSY), int(ResponseCode.RESET_IN_PROGRESS)})


@dataclass(frozen=True)
class Recovered:
    """The verdict on one request a previous life of this client left open (``client.recovered()``).

    ``id`` is its journal id; ``function``/``kind`` what it was; ``attempts`` the ``(psmid, qid)``
    of each attempt journalled before it was sent.  ``verdict`` (:class:`~apcrypto.reconcile.
    Verdict`) and ``reason`` say what the driver concluded and why (``evidence`` is the fact it
    rests on).  ``value``: the decoded result of a ``completed`` one (None when it cannot be
    decoded: its kind is not one the journal rebuilds).  ``error``: the exception a caller would have
    got (``BadRequest`` for failed, ``Indeterminate`` for indeterminate, ``ClientClosed`` for never-ran:
    cut off by the client's death before it ran).  ``redrive``:
    for ``re-driven``, the future of the re-drive (journalled as request ``redrive_id``), whose
    outcome is the request's.
    """

    id: int
    function: str
    kind: str
    idempotent: bool
    verdict: Verdict
    evidence: str
    reason: str
    attempts: tuple[tuple[int, int], ...]
    psmid: int | None = None
    qid: int | None = None
    value: Any = None
    error: ApcryptoError | None = None
    redrive: Any = None  # the re-drive's future (concurrent, or asyncio for apcrypto.aio)
    redrive_id: int | None = None

    def line(self) -> str:
        """One human-readable line (what ``apcrypto recovered`` prints)."""
        where = ", ".join(f"{p:#x}@{qid_str(q)}" for p, q in self.attempts) or "no attempt"
        out = f"#{self.id} {self.function} {self.verdict.value}: {self.reason} [{where}]"
        if self.redrive_id is not None:
            out += f" -> #{self.redrive_id}"
        return out


@dataclass
class Recovery:
    """What reconciliation decided, and the re-drives still to send once the client runs."""

    records: list[Recovered] = field(default_factory=list)
    #: (index in records, request object, idempotent, target) of each re-drive to send
    redrives: list[tuple[int, Any, bool, frozenset[int] | None]] = field(default_factory=list)
    resumed: bool = False
    drained: int = 0  # replies drained
    seconds: float = 0.0


def session_resumed(transport: Transport) -> bool:
    """Whether ``transport`` reaches what the previous life's session held: a frame transport whose
    WELCOME said ``resumed``, or an in-process emulator the caller built (it outlived the client)."""
    welcome = getattr(transport, "welcome", None)
    if welcome is not None:
        return bool(welcome.resumed)
    owns = getattr(transport, "_owns", None)  # apcrypto.transport.inproc: an emulator it built dies with it
    return owns is False


def drain(
    transport: Transport,
    wanted: Mapping[int, set[int]],
    *,
    bound: float,
    interval: float = 0.01,
    on_batch: Callable[[dict[int, bytes]], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[frozenset[int], dict[int, bytes]]:
    """DQAP each APQN of ``wanted`` (qid -> our psmids on it) until it holds nothing (``queue_empty``
    with no reply pending) or all our psmids are answered; at most ``bound`` seconds in all.

    Returns the APQNs emptied (nothing of ours left: they held nothing, or every psmid of ours there
    was answered) and psmid -> reply bytes for
    every reply taken (ours or not: a reply is only ever taken once, so the caller sees them all).
    ``on_batch`` gets each poll's replies before the next DQAP goes out (the journal commits them).
    """
    end = clock() + bound
    left = {q: set(ps) for q, ps in wanted.items() if ps}
    emptied: set[int] = set()
    replies: dict[int, bytes] = {}
    tags = iter(range(1 << 30, 1 << 31))
    inflight: dict[int, int] = {}  # tag -> qid
    again_at: dict[int, float] = dict.fromkeys(left, 0.0)  # qid -> when to DQAP next
    while left and clock() < end:
        now = clock()
        cmds = []
        for q, at in list(again_at.items()):
            if at <= now:
                tag = next(tags)
                inflight[tag] = q
                cmds.append(Command(tag, Instr.DQAP, q, 0, b"", False))
                del again_at[q]
        if cmds:
            transport.submit(cmds)
        batch: dict[int, bytes] = {}
        wait = min([max(0.0, at - clock()) for at in again_at.values()] + [interval])
        for ev in transport.poll(wait if inflight else min(wait, interval)):
            if isinstance(ev, TransportLost):
                for tag in ev.tags:
                    q = inflight.pop(tag, -1)
                    if q >= 0 and q in left:
                        again_at[q] = clock() + interval  # a DQAP answer lost in transit: its reply is gone
                continue
            if not isinstance(ev, Completion):
                continue  # an interrupt: the next DQAP finds the reply anyway
            q = inflight.pop(ev.tag, -1)
            if q < 0:
                continue
            st = ev.result.status
            rc = st.response_code
            if rc == ResponseCode.NORMAL:
                replies[ev.result.psmid] = batch[ev.result.psmid] = bytes(ev.result.reply)
                left.get(q, set()).discard(ev.result.psmid)
                if q in left and not left[q]:
                    del left[q]  # every psmid of ours there is answered: nothing of ours is left
                    emptied.add(q)
                else:
                    again_at[q] = clock()
            elif rc == NO_PENDING_REPLY and st.queue_empty:
                emptied.add(q)
                left.pop(q, None)
            elif rc in _AGAIN:
                again_at[q] = clock() + interval
            else:  # the queue cannot be drained (gone, checkstopped, not ours): what it held is unknown
                log.warning("drain: %s answers DQAP with rc %#04x; its replies are gone", qid_str(q), rc)
                left.pop(q, None)
        if batch and on_batch is not None:
            on_batch(batch)
    if inflight:  # bounded: wait a moment for DQAPs still out, so no reply is left unread in a socket
        stop = clock() + min(1.0, bound)
        while inflight and clock() < stop:
            batch = {}
            for ev in transport.poll(interval):
                if isinstance(ev, Completion) and inflight.pop(ev.tag, None) is not None:
                    if ev.result.status.response_code == ResponseCode.NORMAL:
                        replies[ev.result.psmid] = batch[ev.result.psmid] = bytes(ev.result.reply)
                elif isinstance(ev, TransportLost):
                    for tag in ev.tags:
                        inflight.pop(tag, None)
            if batch and on_batch is not None:
                on_batch(batch)
    return frozenset(emptied), replies


def _fact(raw: bytes) -> str:
    try:
        r = parse_reply(raw)
    except FormatError:
        return "maybe:unparsable"  # a reply we cannot read: it may have run
    return reply_fact(r.kind, r.reply_code, r.mf_state, r.rtcode if r.msg_type == 0x86 else None)


def reconcile_journal(journal: Journal, transport: Transport, *, bound: float) -> Recovery:
    """Steps 1-3 of the module doc: every open request of an earlier life gets its verdict, recorded
    in the journal before this returns.  The re-drives are in the returned plan, not yet sent."""
    t0 = time.monotonic()
    opened = journal.open_requests()
    resumed = session_resumed(transport)
    plan = Recovery(resumed=resumed)
    if not opened:
        return plan
    held = frozenset(transport.qids())
    wanted: dict[int, set[int]] = {}
    for o in opened:
        for a in o.row.attempts:
            if a.reply is None and a.qid in held:
                wanted.setdefault(a.qid, set()).add(a.psmid)
    replies: dict[int, bytes] = {}
    emptied: frozenset[int] = frozenset()
    if resumed and wanted:
        found: dict[int, str] = {}

        def commit(batch: dict[int, bytes]) -> None:
            found.update({p: _fact(raw) for p, raw in batch.items()})
            journal.record_facts(found, opened)  # every fact so far: a row's attempts are rewritten whole

        emptied, replies = drain(transport, wanted, bound=bound, on_batch=commit)
    facts = {p: _fact(raw) for p, raw in replies.items()}
    drained = Drained(resumed, emptied, facts, held)
    decisions = decide([o.row for o in opened], drained)
    redrive_rows = {d.id: o for d, o in zip(decisions, opened, strict=True) if d.redrive}
    made = journal.record_verdicts(decisions, redrive_rows)
    for d, o in zip(decisions, opened, strict=True):
        rec = _record(d, o, replies.get(d.psmid) if d.psmid is not None else None)
        if d.redrive:
            request = restore_request(o.kind, o.meta, o.operands)
            assert sendable(request)  # decide() re-drives only restorable rows
            rec = replace(rec, redrive_id=made[d.id])
            journal.preassign(request, made[d.id])  # type: ignore[arg-type]
            plan.redrives.append((len(plan.records), request, o.row.idempotent, o.target))
        plan.records.append(rec)
    plan.drained = len(replies)
    plan.seconds = time.monotonic() - t0
    log.info(
        "journal %s: %d open requests reconciled (%d replies drained, session %s) in %.2f s",
        journal.path,
        len(plan.records),
        plan.drained,
        "resumed" if resumed else "not resumed",
        plan.seconds,
    )
    return plan


def _record(d: Decision, o: OpenRequest, raw: bytes | None) -> Recovered:
    value: Any = None
    error: ApcryptoError | None = None
    kw: dict[str, Any] = {"qid": d.qid, "psmid": d.psmid}
    if d.verdict is Verdict.COMPLETED and raw is not None and d.fact == OK:
        decoder = restore_request(o.kind, o.meta, None)
        if decoder is not None:
            try:
                value = decoder.decode(parse_reply(raw))
            except (ValueError, FormatError):
                value = None
    elif d.verdict is Verdict.FAILED:
        code = _code(d.fact)
        error = BadRequest(f"request #{o.row.id} failed before the restart", reply_code=code, **kw)
    elif d.verdict is Verdict.NEVER_RAN:  # cut off by the client's death, provably before it ran
        error = ClientClosed(
            f"request #{o.row.id} ({o.row.function}) of a previous run never ran and was not re-sent",
            **kw,
        )
    elif d.verdict is Verdict.INDETERMINATE:
        error = Indeterminate(
            f"request #{o.row.id} ({o.row.function}) of a previous run: {d.verdict.value}",
            reason=d.reason,
            **kw,
        )
    return Recovered(
        o.row.id,
        o.row.function,
        o.kind,
        o.row.idempotent,
        d.verdict,
        d.evidence.value,
        d.reason,
        tuple((a.psmid, a.qid) for a in o.row.attempts),
        d.psmid,
        d.qid,
        value,
        error,
    )


def _code(fact: str | None) -> int | None:
    if fact is None or not fact.startswith(FAILED):
        return None
    text = fact[len(FAILED) :].split("/")[0]
    try:
        return int(text, 16) if text.startswith("0x") else None
    except ValueError:
        return None


def start_redrives(plan: Recovery, submit: Callable[[Any, bool, frozenset[int] | None], Any]) -> None:
    """Send the plan's re-drives through ``submit(request, idempotent, target)`` (the client's,
    journalled under their preassigned rows) and attach each future to its record."""
    for index, request, idem, target in plan.redrives:
        fut = submit(request, idem, target)
        plan.records[index] = replace(plan.records[index], redrive=fut)
    plan.redrives = []


def wait_redrives(records: Sequence[Recovered], timeout: float | None) -> bool:
    """Wait (bounded) for every re-drive's future; True if all are done."""
    from concurrent.futures import wait

    futs = [r.redrive for r in records if r.redrive is not None]
    if not futs:
        return True
    _, pending = wait(futs, timeout=timeout)
    return not pending


#: ``connect`` options of the journal (client options; docs/journal.md)
JOURNAL_OPTIONS = frozenset({"journal", "journal_operands", "journal_sync"})


def open_journal(
    client_opts: dict[str, Any], transport_opts: dict[str, Any], *, explicit_base: bool
) -> Journal | None:
    """Take the journal options out of ``client_opts`` and open the journal (None without
    ``journal=``).  Adds the journalled session token to ``transport_opts`` (``resume_token``) and
    makes sure this run's psmids cannot be taken for an earlier run's: ``ValueError`` for an
    explicit ``psmid_base`` whose range overlaps one the journal has seen, a fresh draw otherwise."""
    path = client_opts.pop("journal", None)
    operands = client_opts.pop("journal_operands", False)
    sync = client_opts.pop("journal_sync", "normal")
    if path is None:
        return None
    journal = Journal.open(path, operands=operands, sync=sync)
    try:
        token = journal.resume_token()
        if token is not None and transport_opts.get("resume_token") is None:
            transport_opts["resume_token"] = token
        used = journal.psmid_bases()

        def clash(base: int) -> bool:
            return any(abs(base - b) < 1 << 32 for b in used)

        if clash(client_opts["psmid_base"]):
            if explicit_base:
                raise ValueError(
                    f"psmid_base {client_opts['psmid_base']:#x} overlaps the psmids an earlier run of "
                    f"journal {str(journal.path)!r} used; give another (or none: a fresh one is drawn)"
                )
            from apcrypto.client import new_psmid_base

            while clash(client_opts["psmid_base"]):
                client_opts["psmid_base"] = new_psmid_base()
    except BaseException:
        journal.close()
        raise
    return journal


def begin(
    journal: Journal, transport: Transport, url: str | Sequence[str], psmid_base: int, *, bound: float
) -> Recovery:
    """Record this run (URL, psmid base, session token) and reconcile what earlier runs left open.

    A journal keeps one server session's identity, so a pool of servers (several URLs) cannot be
    journalled yet: :class:`~apcrypto.transport.UrlListError` rather than a journal that could not
    resume the sessions of all but one server after a crash."""
    from apcrypto.transport.multi import UrlListError, split_urls

    urls = split_urls(url)
    if len(urls) != 1:
        raise UrlListError(
            f"journal= keeps one server session; it cannot journal a pool of {len(urls)} servers"
        )
    url = urls[0]
    journal.begin(url, psmid_base, lambda: getattr(transport, "resume_token", None))
    return reconcile_journal(journal, transport, bound=bound)


def open_link(
    url: str | Sequence[str],
    cfg: DriverConfig,
    client_opts: dict[str, Any],
    transport_opts: dict[str, Any],
    *,
    explicit_base: bool,
    open_transport: Callable[..., Transport],
) -> tuple[Transport, Journal | None, Recovery | None]:
    """What every client's ``connect`` opens, in the order the journal needs: the journal first
    (its session token goes into the transport's HELLO), then the transport, then the
    reconciliation of what an earlier run left open (it drains the resumed session before the
    driver's bring-up could reset a queue).  Blocking; anything opened is closed again if a later
    step raises.  ``open_transport`` is the caller's (so tests and runners may substitute it)."""
    journal = open_journal(client_opts, transport_opts, explicit_base=explicit_base)
    try:
        transport = open_transport(url, **transport_opts)
    except BaseException:
        if journal is not None:
            journal.close()
        raise
    try:
        recovery = None
        if journal is not None:
            # the drain bound: held work ends within a reply timeout, or a machine-failure
            # recovery on top (docs/journal.md)
            bound = cfg.reply_timeout + cfg.recovery_timeout
            recovery = begin(journal, transport, url, client_opts["psmid_base"], bound=bound)
    except BaseException:
        transport.close()
        if journal is not None:
            journal.close()
        raise
    return transport, journal, recovery
