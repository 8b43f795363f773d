"""The public client: futures in front of the threaded runner (DESIGN §5).

Every request submitted ends in exactly one outcome: a result, or one of the exceptions in
:mod:`apcrypto.errors`.  Submission never blocks on a card; it blocks (or raises, caller's choice)
only when the host-side queue is at its bound.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import Future
from typing import Any

from apcrypto.core.config import DriverConfig
from apcrypto.core.driver import DriverCore
from apcrypto.errors import ApcryptoError, BadRequest, ClientClosed, HostQueueFull
from apcrypto.requests import (
    CounterIncrement,
    KeyRead,
    KeyStore,
    ModExpo,
    ModExpoCrt,
    RandomBytes,
    Request,
)
from apcrypto.runners.threaded import ThreadedRunner
from apcrypto.transport.base import Transport


class Client:
    """A connection to a set of AP queues.  Thread-safe; use as a context manager."""

    def __init__(
        self,
        transport: Transport,
        config: DriverConfig,
        *,
        psmid_base: int = 0,
        close_timeout: float = 30.0,
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
        self._runner.start()

    # ---------------------------------------------------------------- the operations
    def mod_expo(
        self,
        data: bytes,
        exponent: int | bytes,
        modulus: int | bytes,
        *,
        idempotent: bool = True,
        deadline: float | None = None,
        block: bool = True,
    ) -> Future[bytes]:
        """RSA ME; the result is bytes of the modulus length."""
        return self._build_and_submit(ModExpo, (data, exponent, modulus), idempotent, deadline, block)

    def mod_expo_crt(
        self,
        data: bytes,
        p: int | bytes,
        q: int | bytes,
        dp: int | bytes,
        dq: int | bytes,
        qinv: int | bytes,
        *,
        idempotent: bool = True,
        deadline: float | None = None,
        block: bool = True,
    ) -> Future[bytes]:
        """RSA with CRT key parts (``qinv`` = q⁻¹ mod p); idempotent by default."""
        return self._build_and_submit(ModExpoCrt, (data, p, q, dp, dq, qinv), idempotent, deadline, block)

    def random_bytes(self, n: int, *, deadline: float | None = None) -> Future[bytes]:
        return self._build_and_submit(RandomBytes, (n,), None, deadline, True)

    def counter_increment(self, by: int = 1, *, deadline: float | None = None) -> Future[int]:
        """State-changing: never run twice; may end ``Indeterminate`` if a card fails under it."""
        return self._build_and_submit(CounterIncrement, (by,), None, deadline, True)

    def key_store(self, slot: int, key: bytes, *, deadline: float | None = None) -> Future[None]:
        return self._build_and_submit(KeyStore, (slot, key), None, deadline, True)

    def key_read(self, slot: int, *, deadline: float | None = None) -> Future[bytes]:
        return self._build_and_submit(KeyRead, (slot,), None, deadline, True)

    def submit(
        self,
        request: Request,
        idempotent: bool = False,
        *,
        deadline: float | None = None,
        block: bool = True,
    ) -> Future[Any]:
        """Submit any :class:`~apcrypto.requests.Request`; not idempotent unless the caller says so.

        ``deadline``: seconds from now (``DeadlineExceeded`` after it).  ``block``: when the
        host-side queue is full, wait for room (True) or raise :class:`HostQueueFull` (False).
        """
        if not isinstance(request, Request):
            raise TypeError(f"submit takes an apcrypto.requests.Request, not {type(request).__name__}")
        return self._submit(request, idempotent, deadline, block)

    # ---------------------------------------------------------------- plumbing
    def _build_and_submit(
        self,
        cls: type[Request],
        args: tuple[Any, ...],
        idem: bool | None,
        deadline: float | None,
        block: bool,
    ) -> Future[Any]:
        try:
            request = cls(*args)
        except ValueError as exc:
            fut: Future[Any] = Future()
            fut.set_running_or_notify_cancel()
            fut.set_exception(BadRequest(f"invalid {cls.__name__}: {exc}"))
            with self._lock:
                self._local["failed"] += 1
            return fut
        return self._submit(request, idem, deadline, block)

    def _submit(
        self, request: Request, idem: bool | None, deadline: float | None, block: bool
    ) -> Future[Any]:
        if deadline is not None and deadline < 0:
            raise ValueError("deadline must be >= 0 seconds from now")
        if self._closed:
            raise ClientClosed("client is closed")
        runner = self._runner
        if runner.error is not None:
            raise ClientClosed(f"client runner failed: {runner.error!r}")
        if self.core.backlog_size + runner.inbox_size >= self.config.backlog_limit:
            self._wait_for_room(block)
        fut: Future[Any] = Future()
        fut.set_running_or_notify_cancel()  # once submitted it runs to an outcome; cancel() is refused

        def resolved(value: Any, error: BaseException | None) -> None:
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(value)

        try:
            runner.submit(request, idem, deadline, resolved)
        except RuntimeError:
            raise ClientClosed("client is closed") from None
        return fut

    def _wait_for_room(self, block: bool) -> None:
        """The host-side queue is at its bound: raise, or wait (bounded polls) until there is room."""
        limit = self.config.backlog_limit
        if not block:
            raise HostQueueFull(f"host-side queue at its bound ({limit})")
        with self._lock:
            while self.core.backlog_size + self._runner.inbox_size >= limit:
                if self._closed:
                    raise ClientClosed("client closed while waiting for room")
                self._lock.wait(0.01)

    # ---------------------------------------------------------------- state
    def stats(self) -> dict[str, Any]:
        """Counts per outcome, per APQN state, utilisation; plus the emulator's engine view if local."""
        with self._runner.core_lock:
            st = self.core.stats()
        for k, v in self._local.items():
            st["outcomes"][k] = st["outcomes"].get(k, 0) + v
        emu = getattr(self.transport, "emulator", None)
        if emu is not None and hasattr(emu, "stats"):
            st["emulator"] = emu.stats()
        return st

    def wait_ready(self, timeout: float = 10.0) -> bool:
        """Wait until every queue has left bring-up (in service or offline)."""
        done = threading.Event()

        def check() -> None:
            if all(q.state.in_service or q.state.value == "offline" for q in self.core.queues.values()):
                done.set()
            elif not done.is_set() and not self._closed:
                self._runner.arm(("client-ready",), 0.001)

        # piggy-back on the runner's timer: the key is unknown to the core, so intercept it
        orig_fire = self._runner.fire

        def fire(key: tuple[Any, ...]) -> None:
            if key == ("client-ready",):
                check()
            else:
                orig_fire(key)

        self._runner.fire = fire  # type: ignore[method-assign]
        try:
            self._runner.call(check)
            return done.wait(timeout)
        finally:
            self._runner.fire = orig_fire  # type: ignore[method-assign]

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, timeout: float | None = None) -> None:
        """Wait (bounded) for outstanding requests, resolve any left with ``ClientClosed``, release all."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._lock.notify_all()
        limit = self.close_timeout if timeout is None else timeout
        self._wait_settled(limit)
        done = threading.Event()
        try:
            self._runner.call(
                lambda: (self._runner.apply(self.core.shutdown(self._runner.now())), done.set())
            )
            done.wait(limit if limit > 0 else 1.0)
        except RuntimeError:
            pass
        self._runner.stop()
        if self._runner.error is not None:
            err = ApcryptoError(f"runner failed: {self._runner.error!r}")
            for cb in list(self._runner.resolvers.values()):
                cb(None, err)
            self._runner.resolvers.clear()
        self.transport.close()

    def _wait_settled(self, timeout: float) -> bool:
        """Wait until the core has no undecided request (checked on the runner thread)."""
        deadline = time.monotonic() + timeout
        while self._runner.alive and self._runner.error is None:
            settled = threading.Event()
            answered = threading.Event()

            def check(settled: threading.Event = settled, answered: threading.Event = answered) -> None:
                ledger = self.core.ledger
                if self._runner.inbox_size == 0 and ledger.counters["submitted"] == sum(
                    ledger.outcomes.values()
                ):
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
        return f"<apcrypto.Client {type(self.transport).__name__} queues={len(self.core.queues)}>"
