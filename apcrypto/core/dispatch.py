"""The dispatcher: work waiting on the host, and the choice of queue for it (DESIGN §4.1).

It holds the backlog (new requests per card mode, FIFO) and the retry queue (bounced and re-driven
requests, served first), the weighted load per queue and per card, and which queues are candidates
for which mode.  ``fill`` hands waiting work to the in-service queue with the lowest weighted load
and a free slot (zcrypt's weights, with its penalties for the queue and card a re-drive failed on)
and emits the NQAP through the outbox.  It decides nothing about a queue's state: the queues it gave
work to are left in ``touched`` and the requests it could not encode in ``rejected``, for the queue
machine to settle (state and reply timer) and the verdicts to resolve (a lower piece hands its
consequences back; it never calls up).  ``dirty`` says that waiting work may have been left with no
timer (it went back to the host, or a kind's service changed): the verdicts' ``check_parked`` looks.

References only the pieces below it: the ledger, the outbox and the queue records.
"""

from __future__ import annotations

from collections import deque

from apcrypto.core.ledger import Ledger, Phase, Record
from apcrypto.core.outbox import Outbox
from apcrypto.core.queue import QState, Queue
from apcrypto.core.timers import TimerKey
from apcrypto.errors import BadRequest
from apformats.results import Instr


class Dispatcher:
    def __init__(self, ledger: Ledger, out: Outbox, queues: dict[int, Queue], grace: float = 30.0) -> None:
        self.ledger = ledger
        self.out = out
        self.queues = queues
        self.grace = grace  # DriverConfig.unavailable_grace: how long a targeted request waits for its APQN
        self.backlog: dict[str, deque[int]] = {}  # new requests per card mode, FIFO
        self.retry: dict[str, deque[int]] = {}  # bounced / re-driven requests, served first
        # Targeted requests (``rec.target``), FIFO per target: they wait for their own APQN(s), so
        # they sit apart (one waiting for a busy APQN must not hold up the rest); a fill looks at each
        # distinct target once, not at each request.
        self.pinned: dict[str, dict[frozenset[int], deque[int]]] = {}
        self.size = 0  # live requests waiting on the host (the bound callers' submit is checked against)
        self.card_load: dict[int, int] = {}
        self.by_mode: dict[str, list[Queue]] = {}  # dispatch candidates per card mode
        self.serving: dict[str, int] = {}  # queues in service per mode (a cheap "kind served" check)
        self.mf_cards: dict[int, int] = {}  # card -> its queues in machine-failure recovery
        self.touched: list[Queue] = []  # queues given work since the core last settled them
        self.rejected: list[tuple[Record, BadRequest]] = []  # requests that could not be encoded
        self.dirty = False  # waiting work may sit with no timer: the verdicts' check_parked looks

    # -- waiting work --
    def enqueue(self, rec: Record) -> None:
        """A new request waits on the host (behind the work already waiting)."""
        if rec.target is None:
            backlog = self.backlog.get(rec.mode)
            if backlog is None:  # (not setdefault: that builds a deque on every call)
                backlog = self.backlog[rec.mode] = deque()
            backlog.append(rec.rid)
        else:
            self._pin(rec)
            self.out.arm_after(TimerKey.target(rec.rid), self.grace, force=True)
        self.size += 1
        rec.parked_at = self.out.now
        if not self.serving.get(rec.mode):
            self.dirty = True

    def requeue_front(self, rec: Record) -> None:
        """Back to the host, ahead of new work (it has waited already), in the order it bounced.
        A targeted request goes back to its own APQN(s) only, within a new grace."""
        rec.phase = Phase.QUEUED
        if rec.target is None:
            self.retry.setdefault(rec.mode, deque()).append(rec.rid)
        else:
            self._pin(rec)
            self.out.arm_after(TimerKey.target(rec.rid), self.grace, force=True)
        self.size += 1
        rec.parked_at = self.out.now
        self.dirty = True

    def _pin(self, rec: Record) -> None:
        assert rec.target is not None
        self.pinned.setdefault(rec.mode, {}).setdefault(rec.target, deque()).append(rec.rid)

    def _deques(self, mode: str) -> list[deque[int]]:
        """Every deque of ``mode``'s waiting work, in the order it is served."""
        out = [dq for dq in (self.retry.get(mode),) if dq is not None]
        out.extend(self.pinned.get(mode, {}).values())
        backlog = self.backlog.get(mode)
        if backlog is not None:
            out.append(backlog)
        return out

    def waiting_ahead(self, mode: str) -> bool:
        return bool(self.retry.get(mode) or self.backlog.get(mode))

    def has_waiting(self, mode: str) -> bool:
        """Some undecided request of ``mode`` waits (deques also hold decided ones, skipped lazily)."""
        records = self.ledger.records
        for dq in self._deques(mode):
            if dq:
                for rid in dq:
                    rec = records.get(rid)
                    if rec is not None and not rec.resolved:
                        return True
        return False

    def modes(self) -> list[str]:
        return list(dict.fromkeys([*self.retry, *self.pinned, *self.backlog]))

    def take_all(self, mode: str) -> list[Record]:
        """Remove and return every undecided request of ``mode`` waiting on the host."""
        taken: list[Record] = []
        for dq in self._deques(mode):
            while dq:
                rec = self.ledger.records.get(dq.popleft())
                if rec is not None and not rec.resolved:
                    self.size -= 1
                    taken.append(rec)
        return taken

    def expire(self, mode: str, since: float, grace: float, now: float) -> tuple[list[Record], float | None]:
        """Remove the requests of ``mode`` whose grace (counted from when they last went back to
        the host, or from ``since``) is up; returns them and the next due time of the rest."""
        records = self.ledger.records
        expired: list[Record] = []
        nxt: float | None = None
        for dq in self._deques(mode):
            if not dq:
                continue
            keep: deque[int] = deque()
            for rid in dq:
                rec = records.get(rid)
                if rec is None or rec.resolved:
                    continue  # decided while it waited (deadline): no longer counted
                due = max(rec.parked_at, since) + grace
                if due <= now + 1e-9:
                    self.size -= 1
                    expired.append(rec)
                else:
                    keep.append(rid)
                    nxt = due if nxt is None else min(nxt, due)
            dq.clear()
            dq.extend(keep)
        return expired, nxt

    # -- which queues serve which kind --
    def mode_alive(self, mode: str) -> bool:
        """Some queue could still serve ``mode``: not offline, and of that mode or not yet known."""
        for q in self.queues.values():
            if q.state is not QState.OFFLINE and (q.mode == mode or q.mode == "unknown"):
                return True
        return False

    def mode_exists(self, mode: str) -> bool:
        """Some queue, in any state (offline too: it may come back), is of ``mode`` or not yet known."""
        return any(q.mode == mode or q.mode == "unknown" for q in self.queues.values())

    def service_changed(self, mode: str, entering: bool) -> None:
        self.serving[mode] = self.serving.get(mode, 0) + (1 if entering else -1)
        self.dirty = True

    def learn_mode(self, q: Queue, mode: str) -> None:
        if q in self.by_mode.get(q.mode, ()):
            self.by_mode[q.mode].remove(q)
        q.mode = mode
        self.by_mode.setdefault(mode, []).append(q)
        self.backlog.setdefault(mode, deque())

    def mf_enter(self, card: int) -> None:
        self.mf_cards[card] = self.mf_cards.get(card, 0) + 1

    def mf_leave(self, card: int) -> None:
        left = self.mf_cards[card] - 1
        if left:
            self.mf_cards[card] = left
        else:
            del self.mf_cards[card]
        self.dirty = True

    # -- placing work --
    def pick(
        self, mode: str, avoid: int | None, weight: int, target: frozenset[int] | None = None
    ) -> Queue | None:
        best: Queue | None = None
        best_score = 0
        mf_cards = self.mf_cards
        card_load = self.card_load
        # The request's own weight adds the same to every queue's score, so it cannot change which
        # queue wins: it is left out.  The common case (no re-drive penalty, no target, no card in
        # machine-failure recovery) runs the same choice without the checks that cannot apply.
        if avoid is None and target is None and not mf_cards:
            for q in self.by_mode.get(mode, ()):
                if not q.state.in_service or q.full_hold or len(q.on_card) + len(q.sending) >= q.slots:
                    continue
                score = card_load.get(q.card, 0) + q.load
                if (
                    best is None
                    or score < best_score
                    or (score == best_score and q.requests_total < best.requests_total)
                ):
                    best, best_score = q, score
            return best
        for q in self.by_mode.get(mode, ()):
            if not q.state.in_service or q.full_hold or len(q.on_card) + len(q.sending) >= q.slots:
                continue
            if target is not None and q.qid not in target:
                continue  # a targeted request runs on its own APQN(s) or nowhere
            if mf_cards and q.card in mf_cards:
                continue  # its card had a machine failure: its other queues are going down too
            score = card_load.get(q.card, 0) + q.load
            if avoid is not None:
                if q.qid == avoid:
                    score += 10000  # zcrypt's TRACK_AGAIN_QUEUE_WEIGHT_PENALTY
                if q.card == (avoid >> 8):
                    score += 1000  # ...and its card penalty
            if (
                best is None
                or score < best_score
                or (score == best_score and q.requests_total < best.requests_total)
            ):
                best, best_score = q, score
        return best

    def fill(self, mode: str) -> None:
        retry = self.retry.get(mode)
        if retry:
            self._fill_from(mode, retry)
            if retry:
                return  # bounced and re-driven work goes first
        pinned = self.pinned.get(mode)
        if pinned:
            self._fill_pinned(mode, pinned)
        self._fill_from(mode, self.backlog.get(mode))

    def fill_queue(self, q: Queue) -> None:
        """A slot of ``q`` may have freed: give it waiting work.  Every other serving queue of its
        kind is full whenever work waits, so the weighted pick could only choose ``q``; re-driven
        work still goes through the pick, which steers it away from the queue it failed on."""
        if self.retry.get(q.mode) or self.pinned.get(q.mode):
            self.fill(q.mode)
            return
        if self.mf_cards and q.card in self.mf_cards:
            return  # its card had a machine failure: no new work until that card has recovered
        backlog = self.backlog.get(q.mode)
        records = self.ledger.records
        # (q.held written out: this loop places nearly every request)
        while (
            backlog
            and q.state.in_service
            and not q.full_hold
            and len(q.on_card) + len(q.sending) + q.probe_sent < q.slots
        ):
            rec = records.get(backlog.popleft())
            if rec is None or rec.outcome is not None:
                continue  # decided while it waited (deadline): no longer counted
            self.size -= 1
            self.send(q, rec)

    def _fill_from(self, mode: str, backlog: deque[int] | None) -> None:
        records = self.ledger.records
        while backlog:
            rec = records.get(backlog[0])
            if rec is None or rec.resolved:
                backlog.popleft()  # decided while it waited (deadline): no longer counted
                continue
            q = self.pick(mode, rec.avoid_qid, rec.weight)
            if q is None:
                return
            backlog.popleft()
            self.size -= 1
            self.send(q, rec)

    def _fill_pinned(self, mode: str, pinned: dict[frozenset[int], deque[int]]) -> None:
        """Place targeted requests, each target's in order, while one of its APQNs has a slot."""
        records = self.ledger.records
        for target in list(pinned):
            dq = pinned[target]
            while dq:
                rec = records.get(dq[0])
                if rec is None or rec.resolved:
                    dq.popleft()  # decided while it waited (deadline, grace): no longer counted
                    continue
                q = self.pick(mode, rec.avoid_qid, rec.weight, target)
                if q is None:
                    break  # its APQN(s) full or out of service: the next target may have room
                dq.popleft()
                self.size -= 1
                self.send(q, rec)
            if not dq:
                del pinned[target]

    def target_in_service(self, rec: Record) -> bool:
        """One of ``rec``'s target APQNs is in service (it may be busy: then the request waits)."""
        queues = self.queues
        return any(
            (q := queues.get(qid)) is not None and q.state.in_service and q.card not in self.mf_cards
            for qid in rec.target or ()
        )

    def send(self, q: Queue, rec: Record) -> None:
        att = self.ledger.new_attempt(rec, q.qid)
        try:
            message = rec.request.message(q.domain)
        except ValueError as exc:
            self.rejected.append((rec, BadRequest(f"cannot encode request: {exc}", qid=q.qid)))
            return
        tag = self.out.emit(q.qid, Instr.NQAP, att.psmid, message)
        q.occ_to(self.out.now)  # before held changes
        q.sending[tag] = rec.rid
        q.load += rec.weight
        self.card_load[q.card] = self.card_load.get(q.card, 0) + rec.weight
        self.touched.append(q)

    def unload(self, q: Queue, rec: Record) -> None:
        q.load -= rec.weight
        self.card_load[q.card] -= rec.weight
