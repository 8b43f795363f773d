"""The public client over tcp:// after the server drops its session: interrupts come back; and the
asyncio client never blocks its event loop, whether the server is there or not.

A new session holds none of the old one's AQIC registrations.  With the safety poll set to 30 s,
work submitted after the reconnect finishes promptly only if the driver registered interrupts again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import itertools
import time

import pytest

import apcrypto
import apcrypto.aio
from apcrypto.transport.zmq_client import ServerUnreachable
from tests._fixtures_zmq import E, rsa_key, zmq_server  # fixtures

KEY = rsa_key(1024)


def _batch(client: apcrypto.Client, start: int) -> list[cf.Future]:
    return [client.mod_expo(m.to_bytes(128, "big"), E, KEY.n) for m in range(start, start + 24)]


def test_interrupts_are_registered_again_after_a_reconnect(zmq_server) -> None:
    ctl = zmq_server.control_client()
    zmq_server.clients.remove(ctl)  # closed by this test, not at module teardown
    with (
        ctl,
        apcrypto.connect(zmq_server.data, config="fast", irq_safety_poll=30.0, reconnect_delay=0.01) as c,
    ):
        assert c.wait_ready(10)
        first = _batch(c, 2)
        assert [int.from_bytes(f.result(timeout=10), "big") for f in first] == [
            pow(m, E, KEY.n) for m in range(2, 26)
        ]
        assert ctl.disconnect() >= 1  # the server forgets the session; the client reconnects
        second = _batch(c, 100)
        _done, pending = cf.wait(second, timeout=8)
        assert not pending, "replies after the reconnect waited for the 30 s safety poll"
        expect = [pow(m, E, KEY.n) for m in range(100, 124)]
        assert [int.from_bytes(f.result(), "big") for f in second] == expect
        assert c.stats()["counters"]["irq_reenabled"] >= 1


class Ticker:
    """A task that ticks every 10 ms: the gaps between its ticks show how long the loop was blocked."""

    def __init__(self) -> None:
        self.ticks: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.ticks.append(time.monotonic())
            await asyncio.sleep(0.01)

    def __enter__(self) -> Ticker:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()

    def longest_gap(self, since: float) -> float:
        ts = [t for t in self.ticks if t >= since]
        return max((b - a for a, b in itertools.pairwise(ts)), default=float("inf"))


def test_aio_connect_to_an_absent_server_leaves_the_loop_free() -> None:
    """Waiting for a handshake that never comes takes ``timeout`` (+1 s); the loop serves other tasks
    all along (on main it was blocked for the whole wait: one tick at most)."""

    async def main() -> tuple[float, Ticker]:
        with Ticker() as ticker:
            await asyncio.sleep(0.02)
            t0 = time.monotonic()
            with pytest.raises(ServerUnreachable):
                await apcrypto.aio.connect("tcp://127.0.0.1:9", timeout=0.5)
            return time.monotonic() - t0, ticker

    waited, ticker = asyncio.run(main())
    assert waited >= 0.5
    during = [t for t in ticker.ticks if t >= ticker.ticks[0] + 0.02]
    assert len(during) >= 10, f"{len(during)} ticks in {waited:.2f} s: the loop was blocked"
    assert ticker.longest_gap(ticker.ticks[0]) < waited / 2


def test_aio_client_over_tcp_never_blocks_the_loop(zmq_server, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """connect, wait_ready, work and close, with a transport whose close is slow (an I/O thread that
    takes its time to stop): a ticker task keeps its pace throughout."""
    from apcrypto.transport.zmq_client import ZmqTransport

    slow_close = ZmqTransport.close

    def close(self: ZmqTransport) -> None:
        time.sleep(0.4)
        slow_close(self)

    monkeypatch.setattr(ZmqTransport, "close", close)

    async def main() -> tuple[list[bytes], float, Ticker]:
        with Ticker() as ticker:
            await asyncio.sleep(0.02)
            async with apcrypto.aio.connect(zmq_server.data, config="fast") as c:
                assert await c.wait_ready(10)
                results = await asyncio.gather(
                    *[c.mod_expo(m.to_bytes(128, "big"), E, KEY.n) for m in range(2, 10)]
                )
                t_close = time.monotonic()
            closed_in = time.monotonic() - t_close
            await asyncio.sleep(0.02)
            return results, closed_in, ticker

    results, closed_in, ticker = asyncio.run(main())
    assert [int.from_bytes(r, "big") for r in results] == [pow(m, E, KEY.n) for m in range(2, 10)]
    assert closed_in >= 0.4  # the slow close really ran, awaited
    assert ticker.longest_gap(ticker.ticks[0]) < 0.3, "the loop was blocked"
