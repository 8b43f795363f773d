"""The simulation runner: core and in-process emulator on one virtual clock, single-threaded.

Nothing happens between calls: ``run_until_idle`` / ``run(until=)`` step the shared
:class:`emulator.clock.VirtualClock` from event to event, feeding the driver core as they go, so a
whole faulted run is deterministic, replays from its seed and takes milliseconds of real time.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

from apcrypto.core.config import FAST, DriverConfig
from apcrypto.core.driver import DriverCore
from apcrypto.futures import LightFuture
from apcrypto.operations import Operations, failed_future
from apcrypto.requests import Request
from apcrypto.runners.base import RunnerBase
from apcrypto.transport.inproc import InprocTransport


class SimRunner(RunnerBase):
    """Drive ``DriverCore`` against ``emulator`` (which must run on a ``VirtualClock``)."""

    def __init__(
        self,
        emulator: Any,
        config: DriverConfig = FAST,
        *,
        psmid_base: int = 0x5A00_0000 << 32,
        domains: list[int] | None = None,
    ) -> None:
        transport = InprocTransport(emulator, domains=domains)
        clock = transport.virtual_clock
        if clock is None:
            raise ValueError("SimRunner needs an emulator on a VirtualClock")
        super().__init__(DriverCore(config, psmid_base=psmid_base, supports_interrupts=True), transport)
        self.emulator = emulator
        self.clock = clock
        self.start_queues()
        self.pump()

    def now(self) -> float:
        return self.clock.now()

    def arm(self, key: tuple[Any, ...], at: float) -> None:
        self.cancel(key)
        self._timers[key] = self.clock.call_at(at, lambda: self._fired(key))

    def _fired(self, key: tuple[Any, ...]) -> None:
        super()._fired(key)
        self.pump()  # what the timer's actions sent has answered already (in-process)

    # -- the caller's side --
    def submit(
        self,
        request: Any,
        *,
        idempotent: bool | None = None,
        deadline: float | None = None,
        target: frozenset[int] | None = None,
    ) -> Future[Any]:
        fut: LightFuture[Any] = LightFuture(running=True)  # its own resolver (apcrypto.futures)
        self.submit_now(request, idempotent, deadline, fut, target)
        self.pump()
        return fut

    def step(self) -> bool:
        """Advance to the next event (emulator or driver timer).  False when nothing is scheduled."""
        stepped = self.clock.step()
        self.pump()
        return stepped

    def run(self, until: float) -> None:
        """Run every event up to virtual time ``until``."""
        while True:
            nxt = self.clock.next_deadline()
            if nxt is None or nxt > until:
                break
            self.step()
        self.clock.run_until(max(until, self.clock.now()))
        self.pump()

    def run_until_settled(self, futures: list[Future[Any]], *, max_time: float = 600.0) -> None:
        """Step until every future is done (or ``max_time`` of virtual time passed: an error)."""
        limit = self.clock.now() + max_time
        while not all(f.done() for f in futures):
            nxt = self.clock.next_deadline()
            if nxt is None:
                raise RuntimeError("simulation stalled: futures pending and nothing scheduled")
            if nxt > limit:
                raise RuntimeError(f"simulation did not settle within {max_time} s of virtual time")
            self.step()

    def shutdown(self) -> None:
        self.apply(self.core.shutdown(self.now()))
        for h in self._timers.values():
            h.cancel()
        self._timers.clear()
        self.transport.close()


class SimClient(Operations):
    """The client's operations on a :class:`SimRunner`: same calls, same futures, no threads.

    Futures resolve only while the simulation runs: call :meth:`settle` (or step the runner).
    Because one thread submits and steps, a run replays exactly from its seeds.
    """

    def __init__(self, runner: SimRunner) -> None:
        self.runner = runner
        self.core = runner.core
        self.transport = runner.transport

    def _submit(
        self,
        request: Request,
        idem: bool | None,
        deadline: float | None,
        block: bool,
        target: frozenset[int] | None = None,
    ) -> Future[Any]:
        return self.runner.submit(request, idempotent=idem, deadline=deadline, target=target)

    def _failed(self, error: BaseException) -> Future[Any]:
        return failed_future(error)

    def settle(self, futures: list[Future[Any]], *, max_time: float = 600.0) -> None:
        self.runner.run_until_settled(futures, max_time=max_time)

    def stats(self) -> dict[str, Any]:
        return self.core.stats()

    def close(self) -> None:
        self.runner.shutdown()
