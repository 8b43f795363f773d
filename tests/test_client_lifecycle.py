"""The threaded client's edges: a future's callback that calls back into the client, ``close``
racing a submit, and a runner that dies.  Every request still ends, in bounded time, with one
outcome.  (Found by a review that drove each case into a hang; each test fails with its fix taken
out.)  The emulator runs on a virtual clock: deadlines and slow engines cost no wall time."""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future, wait
from typing import Any

import pytest

import apcrypto
from apcrypto.errors import ApcryptoError, ClientClosed, DeadlineExceeded, HostQueueFull
from apcrypto.testing import seeded_key
from emulator import Emulator

KEY = seeded_key(1024, "lifecycle")
DATA = (2).to_bytes(KEY.size, "big")


def _client(**options: Any) -> tuple[apcrypto.Client, Emulator]:
    emu = Emulator("default", clock="virtual", seed=1)
    client = apcrypto.connect("emu:", emulator=emu, **options)
    assert client.wait_ready(10)
    return client, emu


def _ended(futures: list[Future[Any]], timeout: float = 10.0) -> None:
    _, pending = wait(futures, timeout)
    assert not pending, f"{len(pending)} of {len(futures)} requests never ended"


def test_a_callback_submitting_into_a_full_host_queue_gets_host_queue_full() -> None:
    """Only the runner's turn makes room in the host-side queue, and a callback runs in that turn:
    waiting there would stop the client for good.  It gets ``HostQueueFull`` instead, and every
    other request goes on to its end.  On a wall clock (about 3 s): the callback must come after
    the host queue has filled, which a virtual clock's autojump would not wait for."""
    limit = 4
    emu = Emulator("default", clock="wall", seed=1)
    client = apcrypto.connect("emu:", emulator=emu, backlog_limit=limit)
    try:
        assert client.wait_ready(10)
        emu.control.slow_engines(0, 1e5)  # card 0: 40 s a request
        emu.control.slow_engines(1, 3000)  # card 1: 1.2 s
        seen: list[BaseException | None] = []

        def follow_up(_: Future[Any]) -> None:
            try:
                client.mod_expo(DATA, KEY.e, KEY.n)  # block=True, the default
                seen.append(None)
            except BaseException as exc:
                seen.append(exc)

        first = client.mod_expo(DATA, KEY.e, KEY.n, apqn=(1, 0))  # done in 1.2 s: its callback then
        first.add_done_callback(follow_up)
        pinned: list[Future[Any]] = []
        for _ in range(5000):  # card 0's queue: its 8 slots, then the host queue up to its bound
            if client.core.backlog_size >= limit:
                break
            try:
                pinned.append(client.mod_expo(DATA, KEY.e, KEY.n, apqn=(0, 0), deadline=3, block=False))
            except HostQueueFull:  # the runner has not taken its inbox yet
                time.sleep(0.001)
        assert client.core.backlog_size >= limit and not first.done()
        _ended([first, *pinned])
        assert first.result() and len(seen) == 1 and isinstance(seen[0], HostQueueFull), seen
        assert any(isinstance(f.exception(), DeadlineExceeded) for f in pinned)
    finally:
        client.close()
        emu.close()


def test_close_from_a_callback_returns_and_every_request_ends() -> None:
    client, emu = _client(close_timeout=3.0)
    try:
        emu.control.slow_engines(0, 3000)
        slow = [client.mod_expo(DATA, KEY.e, KEY.n, apqn=(0, 0), deadline=30) for _ in range(12)]
        took: list[float] = []

        def close_now(_: Future[Any]) -> None:
            t = time.monotonic()
            client.close()
            took.append(time.monotonic() - t)

        first = client.mod_expo(DATA, KEY.e, KEY.n, apqn=(1, 0))
        first.add_done_callback(close_now)
        _ended([first, *slow])
        assert took and took[0] < 1.0  # it did not wait for the runner it was called from
        assert client.closed and client._runner.error is None
        for f in slow:  # completed, or cut off by the close: never left without an outcome
            assert f.exception() is None or isinstance(f.exception(), ClientClosed), f.exception()
        with pytest.raises(ClientClosed):
            client.mod_expo(DATA, KEY.e, KEY.n)
        for _ in range(500):  # the close goes on in a thread of its own, and ends
            if not client._runner.alive:
                break
            time.sleep(0.01)
        assert not client._runner.alive
    finally:
        client.close()
        emu.close()


def test_a_submit_racing_close_gets_an_outcome() -> None:
    """The submitter is switched out between the runner's stop check and its append to the inbox,
    and comes back only once the runner has gone, if it can go (forced: the append waits for that,
    at most a second).  The append and the runner's decision to leave are one step now, so the
    runner cannot go meanwhile: the request runs (or is refused); it never lands in the inbox of a
    runner that has gone, with no outcome ever."""
    client, emu = _client()
    runner = client._runner

    class LateAppend(deque):  # type: ignore[type-arg]
        def append(self, item: Any) -> None:
            if threading.current_thread().name == "submitter":
                runner._thread.join(1.0)  # until the runner has gone (or cannot go)
            super().append(item)

    runner._inbox = LateAppend(runner._inbox)
    out: dict[str, Any] = {}

    def submitter() -> None:
        try:
            out["fut"] = client.mod_expo(DATA, KEY.e, KEY.n)
        except ClientClosed as exc:
            out["refused"] = exc

    t = threading.Thread(target=submitter, name="submitter")
    t.start()
    time.sleep(0.05)  # the submitter is inside the append
    client.close(timeout=1.0)
    t.join(10)
    try:
        assert not t.is_alive()
        if "fut" in out:
            _ended([out["fut"]])  # it ran (or was cut off): an outcome either way
        else:
            assert isinstance(out["refused"], ClientClosed)
    finally:
        emu.close()


def test_a_submit_that_meets_a_shut_down_core_ends_client_closed() -> None:
    client, emu = _client()
    try:
        runner = client._runner
        done = threading.Event()
        runner.call(lambda: (runner.apply(client.core.shutdown(runner.now())), done.set()))
        assert done.wait(10)
        fut = client.mod_expo(DATA, KEY.e, KEY.n)  # the client is open; its core is not
        _ended([fut])
        assert isinstance(fut.exception(), ClientClosed)
        assert runner.error is None and runner.alive  # not a runner crash
    finally:
        client.close()
        emu.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_runner_that_dies_ends_the_requests_it_held() -> None:
    """A bug in a turn (here the transport's poll raising) kills the runner: the requests in the
    core end at once, not when someone calls close."""
    client, emu = _client()
    try:
        emu.control.slow_engines(0, 1e5)
        emu.control.slow_engines(1, 1e5)
        futs = [client.mod_expo(DATA, KEY.e, KEY.n, deadline=60) for _ in range(20)]
        real_poll = client.transport.poll

        def bad_poll(timeout: float = 0.0) -> Any:
            client.transport.poll = real_poll  # type: ignore[method-assign]
            raise RuntimeError("a planted bug in a turn")

        client.transport.poll = bad_poll  # type: ignore[method-assign]
        runner = client._runner
        runner.call(lambda: None)  # a turn: it polls
        _ended(futs)
        runner._thread.join(10)
        assert isinstance(runner.error, RuntimeError) and not runner.alive
        for f in futs:
            assert type(f.exception()) is ApcryptoError and "runner failed" in str(f.exception())
        with pytest.raises(ClientClosed):
            client.mod_expo(DATA, KEY.e, KEY.n)
    finally:
        client.close()
        emu.close()
