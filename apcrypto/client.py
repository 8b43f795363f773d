"""The public client: futures in front of the threaded runner (DESIGN §5).

Every request submitted ends in exactly one outcome: a result, or one of the exceptions in
:mod:`apcrypto.errors`.  Submission never blocks on a card; it blocks (or raises, caller's choice)
only when the host-side queue is at its bound.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import Counter
from concurrent.futures import Future
from typing import Any

from apcrypto.cardstats import client_stats
from apcrypto.config import check_deadline
from apcrypto.core.config import DriverConfig
from apcrypto.core.driver import DriverCore
from apcrypto.errors import ApcryptoError, ClientClosed, HostQueueFull
from apcrypto.futures import LightFuture
from apcrypto.journal import Journal
from apcrypto.operations import Operations, failed_future
from apcrypto.recovery import Recovered, Recovery, start_redrives, wait_redrives
from apcrypto.requests import Request
from apcrypto.runners.threaded import ThreadedRunner
from apcrypto.transport.base import Transport


def new_psmid_base() -> int:
    """A psmid base for one client: a random 32-bit nonce in the high half, the counter below it.

    The kernel puts the pid there; a pid is guessable and repeats across restarts and containers,
    so a client restarted against a card that still holds the previous one's replies could take
    them for its own.  A nonce from :mod:`secrets` makes that (and collisions between the clients
    of one process) a 2**-32 event, and the ledger's 32-bit counter keeps every psmid unique for
    the client's lifetime (it refuses to wrap).
    """
    return secrets.randbits(32) << 32


class _RequestFuture(LightFuture[Any]):
    """The future of one submitted request, and its resolver (the runner calls it with
    ``(value, error)``): a failure is counted in its client's ``stats()`` before the caller can see
    it. One object per request: no closure, no Condition (:mod:`apcrypto.futures`)."""

    __slots__ = ("_client", "journal_id")
    journal_id: int  # with a journal: the id its verdict has after a crash (the caller may keep it)

    def __init__(self, client: Client) -> None:
        super().__init__(running=True)  # once submitted it runs to an outcome; cancel() is refused
        self._client: Client | None = client

    def __call__(self, value: Any, error: BaseException | None) -> None:
        client, self._client = self._client, None  # a future kept by the caller does not keep the client
        if error is not None:
            if client is not None:
                client._count_error(error)
            self.set_exception(error)
        else:
            self.set_result(value)


class Client(Operations["Future[bytes]", "Future[int]", "Future[None]", "Future[Any]"]):
    """A connection to a set of AP queues.  Thread-safe; use as a context manager."""

    def __init__(
        self,
        transport: Transport,
        config: DriverConfig,
        *,
        psmid_base: int = 0,
        close_timeout: float = 30.0,
        journal: Journal | None = None,
        recovery: Recovery | None = None,
    ) -> None:
        self.transport = transport
        self.config = config
        self.close_timeout = close_timeout
        self.core = DriverCore(
            config, psmid_base=psmid_base, supports_interrupts=transport.supports_interrupts
        )
        self._runner = ThreadedRunner(self.core, transport)
        self._lock = threading.Condition()
        self._closed = False
        self._local: Counter[str] = Counter()
        self._errors: Counter[str] = Counter()  # failed requests by exception class (stats())
        self.journal = journal
        self._runner.journal = journal  # before the runner starts: nothing is sent unjournalled
        self._recovery = recovery or Recovery()
        self._runner.start()
        start_redrives(self._recovery, lambda r, idem, target: self._submit(r, idem, None, True, target))

    # ---------------------------------------------------------------- plumbing
    def _failed(self, error: BaseException) -> Future[Any]:
        fut = failed_future(error)
        with self._lock:
            self._local["failed"] += 1
            self._errors[type(error).__name__] += 1
        return fut

    def _count_error(self, error: BaseException) -> None:
        with self._lock:
            self._errors[type(error).__name__] += 1

    def _submit(
        self,
        request: Request,
        idem: bool | None,
        deadline: float | None,
        block: bool,
        target: frozenset[int] | None = None,
    ) -> Future[Any]:
        deadline = check_deadline(deadline)
        if self._closed:
            raise ClientClosed("client is closed")
        runner = self._runner
        if runner.error is not None:
            raise ClientClosed(f"client runner failed: {runner.error!r}")
        if self.core.backlog_size + runner.inbox_size >= self.config.backlog_limit:
            self._wait_for_room(block)
        fut = _RequestFuture(self)
        journal = self.journal
        if journal is not None:  # the id its verdict has after a crash: the caller may keep it
            fut.journal_id = journal.claim(request)
        try:
            runner.submit(request, idem, deadline, fut, target)
        except RuntimeError:
            if journal is not None:
                journal.unclaim(request, fut.journal_id)
            raise ClientClosed("client is closed") from None
        return fut

    def _wait_for_room(self, block: bool) -> None:
        """The host-side queue is at its bound: raise, or wait (bounded polls) until there is room.
        A future's callback (it runs on a thread taking the runner's turn) never waits: only that
        turn could make room, so it gets ``HostQueueFull`` as if it had passed ``block=False``."""
        limit = self.config.backlog_limit
        if not block or self._runner.in_turn():
            raise HostQueueFull(f"host-side queue at its bound ({limit})")
        with self._lock:
            while self.core.backlog_size + self._runner.inbox_size >= limit:
                if self._closed:
                    raise ClientClosed("client closed while waiting for room")
                self._lock.wait(0.01)

    # ---------------------------------------------------------------- state
    def recovered(self, timeout: float | None = 30.0) -> list[Recovered]:
        """The verdict on every request a previous run of this client (same ``journal=``) left open
        (docs/journal.md); empty without a journal or when nothing was left open.  Waits, at most
        ``timeout`` seconds, for the re-drives to end, so each ``redrive`` future is done when it
        could be."""
        wait_redrives(self._recovery.records, timeout)
        return list(self._recovery.records)

    def stats(self) -> dict[str, Any]:
        """Counts per outcome and error type, per APQN state, utilisation: one JSON-serialisable
        shape on every transport (:func:`apcrypto.cardstats.client_stats` documents it)."""
        with self._runner.core_lock:
            st = self.core.stats()
        with self._lock:
            local, errors = dict(self._local), dict(self._errors)
        return client_stats(st, local, errors, getattr(self.transport, "emulator", None))

    def wait_ready(self, timeout: float = 10.0) -> bool:
        """Wait until every queue has left bring-up (in service or offline); False on timeout."""
        done = threading.Event()

        def ready() -> bool:
            if self.core.ready():
                done.set()
                return True
            return False

        try:
            self._runner.watch(ready)
        except RuntimeError:
            return False
        return done.wait(timeout)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, timeout: float | None = None) -> None:
        """Wait (bounded) for outstanding requests, resolve any left with ``ClientClosed``, release all.

        Called from a future's callback (which runs on a thread taking the runner's turn), it cannot
        wait for the runner it is part of: the client refuses new requests at once and the rest of
        the closing goes on in a thread of its own once the callback returns."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._lock.notify_all()
        limit = self.close_timeout if timeout is None else timeout
        if self._runner.in_turn():
            threading.Thread(target=self._finish_close, args=(limit,), name="apcrypto-close").start()
            return
        self._finish_close(limit)

    def _finish_close(self, limit: float) -> None:
        self._wait_settled(limit)
        done = threading.Event()

        def shutdown() -> None:
            self._runner.apply(self.core.shutdown(self._runner.now()))
            done.set()

        try:
            self._runner.call(shutdown)
            done.wait(limit if limit > 0 else 1.0)
        except RuntimeError:
            pass
        self._runner.stop()
        if self._runner.error is not None:  # what its death left undecided (usually nothing by now)
            self._runner.fail_undecided(ApcryptoError(f"runner failed: {self._runner.error!r}"))
        if self.journal is not None:
            self.journal.close()  # what ended meanwhile; the lock goes with the file
        self.transport.close()

    def _wait_settled(self, timeout: float) -> bool:
        """Wait until the core has no undecided request (checked on the runner thread)."""
        deadline = time.monotonic() + timeout
        while self._runner.alive and self._runner.error is None:
            settled = threading.Event()
            answered = threading.Event()

            def check(settled: threading.Event = settled, answered: threading.Event = answered) -> None:
                if self._runner.inbox_size == 0 and self.core.undecided() == 0:
                    settled.set()
                answered.set()

            try:
                self._runner.call(check)
            except RuntimeError:
                return False
            answered.wait(max(0.0, deadline - time.monotonic()))
            if settled.is_set():
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(0.005, remaining))  # library-side bounded poll while requests finish
        return False

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<apcrypto.Client {type(self.transport).__name__} queues={len(self.core.queue_states())}>"
