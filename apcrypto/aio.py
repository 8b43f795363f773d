"""apcrypto for asyncio: the same client, with awaitables instead of futures.

>>> async with apcrypto.aio.connect("emu:") as client:
...     result = await client.mod_expo(data, 65537, modulus)

``connect`` takes exactly the options of :func:`apcrypto.connect`.  The driver core runs on the
event loop (no runner thread); transports that need one (ZeroMQ, USB) keep their own I/O thread.

Nothing here blocks the loop: opening a transport (which waits for the peer's handshake, up to
``timeout`` and more) and closing one (which joins its I/O thread) run on a short-lived helper
thread while the loop serves other tasks; ``wait_ready`` is a future the runner resolves.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import Counter
from collections.abc import Callable, Generator, Sequence
from typing import Any, TypeVar

from apcrypto import split_options
from apcrypto.cardstats import client_stats
from apcrypto.config import check_deadline, resolve
from apcrypto.core.config import DriverConfig
from apcrypto.core.driver import DriverCore
from apcrypto.errors import ClientClosed, HostQueueFull
from apcrypto.journal import Journal
from apcrypto.operations import Operations
from apcrypto.recovery import Recovered, Recovery, open_link, start_redrives
from apcrypto.requests import Request
from apcrypto.runners.aio import AsyncioRunner
from apcrypto.transport import open_transport
from apcrypto.transport.base import Transport

T = TypeVar("T")


async def _off_loop(fn: Callable[[], T], name: str, orphan: Callable[[T], None] | None = None) -> T:
    """``fn()`` on a thread of its own, awaited without blocking the loop.

    A thread per call rather than the loop's default executor: the thread ends with the call, so
    nothing outlives the client, whichever loop (or ``asyncio.run``) ran it.  If the awaiting task
    is cancelled, or its loop is gone, before ``fn`` returns, ``orphan(result)`` releases what ``fn``
    built (a transport nobody will close otherwise).
    """
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def settle(value: T | None, error: BaseException | None) -> None:  # on the loop
        if fut.done():  # the awaiting task was cancelled meanwhile
            if error is None and orphan is not None:
                orphan(value)  # type: ignore[arg-type]
        elif error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(value)  # type: ignore[arg-type]

    def work() -> None:
        value: T | None = None
        error: BaseException | None = None
        try:
            value = fn()
        except BaseException as exc:  # handed to the awaiting task
            error = exc
        try:
            loop.call_soon_threadsafe(settle, value, error)
        except RuntimeError:  # the loop is closed: nobody awaits this any more
            if error is None and orphan is not None:
                orphan(value)  # type: ignore[arg-type]

    threading.Thread(target=work, name=name, daemon=True).start()
    return await fut


class AsyncClient(
    Operations["asyncio.Future[bytes]", "asyncio.Future[int]", "asyncio.Future[None]", "asyncio.Future[Any]"]
):
    """Asyncio twin of :class:`apcrypto.Client`; create it with :func:`connect`."""

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
        self.loop = asyncio.get_running_loop()
        self.transport = transport
        self.config = config
        self.close_timeout = close_timeout
        self.core = DriverCore(
            config, psmid_base=psmid_base, supports_interrupts=transport.supports_interrupts
        )
        self._runner = AsyncioRunner(self.core, transport, self.loop)
        self._pending: set[asyncio.Future[Any]] = set()
        self._local: Counter[str] = Counter()
        self._errors: Counter[str] = Counter()  # failed requests by exception class (stats())
        self._closed = False
        self.journal = journal
        self._runner.journal = journal  # before the queues start: nothing is sent unjournalled
        self._recovery = recovery or Recovery()
        self._runner.start_queues()
        self._runner.schedule()
        start_redrives(self._recovery, lambda r, idem, target: self._submit(r, idem, None, True, target))

    # ---------------------------------------------------------------- plumbing
    def _failed(self, error: BaseException) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = self.loop.create_future()
        fut.set_exception(error)
        self._local["failed"] += 1
        self._errors[type(error).__name__] += 1
        return fut

    def _submit(
        self,
        request: Request,
        idem: bool | None,
        deadline: float | None,
        block: bool = True,
        target: frozenset[int] | None = None,
    ) -> asyncio.Future[Any]:
        """``block`` has no meaning on an event loop: a full host-side queue raises HostQueueFull."""
        deadline = check_deadline(deadline)
        if self._closed:
            raise ClientClosed("client is closed")
        if self.core.backlog_size >= self.config.backlog_limit:
            raise HostQueueFull(f"host-side queue at its bound ({self.config.backlog_limit})")
        fut: asyncio.Future[Any] = self.loop.create_future()
        self._pending.add(fut)

        def resolved(value: Any, error: BaseException | None) -> None:
            self._pending.discard(fut)
            if error is not None:
                self._errors[type(error).__name__] += 1
            if fut.cancelled():
                return
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(value)

        if self.journal is not None:  # the id its verdict has after a crash: the caller may keep it
            fut.journal_id = self.journal.claim(request)  # type: ignore[attr-defined]
        self._runner.submit_now(request, idem, deadline, resolved, target)
        self._runner.schedule()
        return fut

    # ---------------------------------------------------------------- state
    async def recovered(self, timeout: float | None = 30.0) -> list[Recovered]:
        """As :meth:`apcrypto.Client.recovered`: the verdicts on what a previous run left open, after
        waiting (bounded) for the re-drives, whose ``redrive`` is an asyncio future here."""
        futs = [r.redrive for r in self._recovery.records if r.redrive is not None]
        if futs:
            await asyncio.wait(futs, timeout=timeout)
        return list(self._recovery.records)

    def stats(self) -> dict[str, Any]:
        """The same shape as :meth:`apcrypto.Client.stats` (see :func:`apcrypto.cardstats.client_stats`)."""
        return client_stats(
            self.core.stats(), self._local, self._errors, getattr(self.transport, "emulator", None)
        )

    async def wait_ready(self, timeout: float = 10.0) -> bool:
        """Wait until every queue has left bring-up (in service or offline); False on timeout."""
        waiter: asyncio.Future[bool] = self.loop.create_future()
        self._runner.ready_waiters.append(waiter)
        self._runner.schedule()
        try:
            return await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            return False

    async def aclose(self) -> None:
        """Wait (bounded) for outstanding requests, resolve the rest with ``ClientClosed``, release all."""
        if self._closed:
            return
        self._closed = True
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=self.close_timeout)
        self._runner.apply(self.core.shutdown(self._runner.now()))
        self._runner.close()
        if self.journal is not None:
            self.journal.close()
        await _off_loop(self.transport.close, "apcrypto-aio-close")  # joins the I/O thread

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class _Connect:
    """``await connect(...)`` or ``async with connect(...) as client``."""

    def __init__(self, url: str | Sequence[str] | None, options: dict[str, Any]) -> None:
        self._url = url
        self._options = options
        self._client: AsyncClient | None = None

    async def _open(self) -> AsyncClient:
        chosen = resolve(self._url, self._options)
        cfg, client_opts, transport_opts = split_options(chosen.options)
        url = chosen.url
        explicit = "psmid_base" in chosen.options

        def opening() -> tuple[Transport, Journal | None, Recovery | None]:
            # the journal's reconciliation drains the session: blocking I/O, off the loop too
            return open_link(
                url, cfg, client_opts, transport_opts, explicit_base=explicit, open_transport=open_transport
            )

        transport, journal, recovery = await _off_loop(opening, "apcrypto-aio-open", _close_quietly)
        try:
            return AsyncClient(transport, cfg, journal=journal, recovery=recovery, **client_opts)
        except BaseException:
            if journal is not None:
                journal.close()
            await _off_loop(transport.close, "apcrypto-aio-close")
            raise

    def __await__(self) -> Generator[Any, None, AsyncClient]:
        return self._open().__await__()

    async def __aenter__(self) -> AsyncClient:
        self._client = await self._open()
        return self._client

    async def __aexit__(self, *exc: object) -> None:
        if self._client is not None:
            await self._client.aclose()


def _close_quietly(opened: tuple[Transport, Journal | None, Recovery | None]) -> None:
    transport, journal, _ = opened
    with contextlib.suppress(Exception):
        transport.close()
    if journal is not None:
        with contextlib.suppress(Exception):
            journal.close()


def connect(url: str | Sequence[str] | None = None, **options: Any) -> _Connect:
    """Open an :class:`AsyncClient`; same URL (or URLs: one pool of servers) and options as
    :func:`apcrypto.connect`."""
    return _Connect(url, options)


__all__ = ["AsyncClient", "connect"]
