"""The public clients on the wall clock: one scenario suite, run on both runners.

``rig`` is parametrised over the threaded client (``apcrypto.connect``) and the asyncio client
(``apcrypto.aio.connect``), both on an in-process emulator with a *wall* clock (its own pump thread,
short service times) and the ``fast`` driver timings.  Faults are triggered by the card's own
request count (``after_requests=``) or injected before the work, never timed with sleeps; every
wait is bounded; the emulator and the client are closed in teardown (the suite's autouse check
fails a test that leaks a thread).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import apcrypto
import apcrypto.aio
from apcrypto.audit import audit
from apcrypto.core.config import FAST
from apcrypto.errors import (
    BadRequest,
    ClientClosed,
    DeadlineExceeded,
    DeviceUnavailable,
    HostQueueFull,
    Indeterminate,
)
from apformats.codes import MachineFailureState as MF
from apformats.codes import ReplyCode as RY
from apformats.results import qid_of
from emulator import Emulator
from tests._fixtures_driver import E, expected_crt, expected_me, key

K = key(1024)
K2 = key(2048)
WAIT = 20.0  # bound on any single wait in this file (pytest-timeout is the outer bound)
RUNNERS = ["thread", "asyncio"]


class Rig:
    """A client of either kind over one wall-clock emulator, behind one blocking facade."""

    def __init__(self, kind: str, emu: Emulator, **options: Any) -> None:
        self.kind = kind
        self.emu = emu
        opts = {"emulator": emu, "config": "fast", **options}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.closed = False
        if kind == "thread":
            self.client: Any = apcrypto.connect("emu:", **opts)
        else:
            self.loop = asyncio.new_event_loop()
            self.client = self.loop.run_until_complete(apcrypto.aio.connect("emu:", **opts))

    # -- submitting and waiting --
    def submit(self, op: Callable[[Any], Any]) -> Any:
        """``op(client)`` returns the client's future (concurrent or asyncio)."""
        return op(self.client)

    def wait(self, futs: list[Any], timeout: float = WAIT) -> list[Any]:
        """Every future's result or exception, in order; fails if one is still pending."""
        if self.loop is None:
            _, pending = concurrent.futures.wait(futs, timeout)
        else:
            _, pending = self.loop.run_until_complete(asyncio.wait(futs, timeout=timeout))
        assert not pending, f"{len(pending)} of {len(futs)} requests not decided within {timeout} s"
        return [f.exception() if f.exception() is not None else f.result() for f in futs]

    def run(self, ops: list[Callable[[Any], Any]], timeout: float = WAIT) -> list[Any]:
        return self.wait([self.submit(op) for op in ops], timeout)

    # -- looking at the core --
    def core(self, fn: Callable[[Any], Any]) -> Any:
        """``fn(core)`` with a consistent view (the runner is not inside the core meanwhile)."""
        if self.loop is None:
            with self.client._runner.core_lock:
                return fn(self.client.core)
        return fn(self.client.core)

    def eventually(self, cond: Callable[[Any], bool], timeout: float = WAIT, what: str = "") -> None:
        """Let the client run until ``cond(core)`` holds (bounded; checked between short waits)."""
        deadline = time.monotonic() + timeout
        if self.loop is None:
            tick = threading.Event()
            while not self.core(cond):
                assert time.monotonic() < deadline, f"not reached within {timeout} s: {what}"
                tick.wait(0.002)
            return

        async def poll() -> None:
            while not cond(self.client.core):
                assert time.monotonic() < deadline, f"not reached within {timeout} s: {what}"
                await asyncio.sleep(0.002)

        self.loop.run_until_complete(poll())

    def in_service(self, qids: list[int] | None = None) -> None:
        want = set(self.emu.qids() if qids is None else qids)

        def ok(core: Any) -> bool:  # every wanted queue known to the core (runner started) and up
            up = {q.qid for q in core.queues.values() if q.state.in_service}
            return want <= up

        self.eventually(ok, what=f"queues {qids or 'all'} in service")

    def audit(self) -> Any:
        rep = self.core(lambda core: audit(core.ledger, self.emu.execution_log.entries()))
        assert rep.ok, rep.summary()
        return rep

    def close(self, timeout: float = 5.0) -> None:
        if self.closed:
            return
        self.closed = True
        if self.loop is None:
            self.client.close(timeout=timeout)
        else:
            self.client.close_timeout = timeout
            self.loop.run_until_complete(self.client.aclose())
            self.loop.close()


@pytest.fixture(params=RUNNERS)
def make_rig(request: pytest.FixtureRequest) -> Iterator[Callable[..., Rig]]:
    made: list[tuple[Rig, Emulator]] = []

    def make(profile: str = "default", seed: int = 21, **options: Any) -> Rig:
        emu = Emulator(profile, clock="wall", seed=seed)
        try:
            rig = Rig(request.param, emu, **options)
        except BaseException:
            emu.close()
            raise
        made.append((rig, emu))
        return rig

    yield make
    for rig, emu in made:
        try:
            rig.close()
        finally:
            emu.close()


@pytest.fixture
def rig(make_rig: Callable[..., Rig]) -> Rig:
    r = make_rig()
    r.in_service()
    return r


def me(x: int, k: Any = K, **kw: Any) -> Callable[[Any], Any]:
    return lambda c: c.mod_expo(x.to_bytes(k.size, "big"), E, k.n, **kw)


def crt(x: int, k: Any = K, **kw: Any) -> Callable[[Any], Any]:
    return lambda c: c.mod_expo_crt(x.to_bytes(k.size, "big"), k.p, k.q, k.dp, k.dq, k.qinv, **kw)


def ci(**kw: Any) -> Callable[[Any], Any]:
    return lambda c: c.counter_increment(1, **kw)


# --- normal work ---------------------------------------------------------------------------------


def test_normal_work_gives_correct_results(rig: Rig) -> None:
    ops = (
        [me(i + 2) for i in range(200)] + [crt(i + 2) for i in range(40)] + [me(i + 2, K2) for i in range(40)]
    )
    ops += [ci() for _ in range(16)] + [lambda c: c.random_bytes(24) for _ in range(8)]
    out = rig.run(ops)
    assert out[:200] == [expected_me(i + 2, K) for i in range(200)]
    assert out[200:240] == [expected_crt(i + 2, K) for i in range(40)]
    assert out[240:280] == [expected_me(i + 2, K2) for i in range(40)]
    counters = out[280:296]
    assert all(isinstance(v, int) for v in counters)
    assert sum(s.counter for s in rig.emu.stores.values()) == 16
    assert all(isinstance(v, bytes) and len(v) == 24 for v in out[296:])
    st = rig.client.stats()
    assert st["outcomes"].get("completed") == len(ops)
    rig.audit()


def test_bad_arguments_fail_the_caller_without_a_card(rig: Rig) -> None:
    (err,) = rig.run([lambda c: c.mod_expo(b"\x01" * 200, E, K.n)])  # data longer than the modulus
    assert isinstance(err, BadRequest)
    # an even modulus reaches the card, which rejects the operand: failed, never retried
    (err,) = rig.run([lambda c: c.mod_expo(b"\x02", E, K.n + 1)])
    assert isinstance(err, BadRequest) and err.reply_code == RY.EVEN_MOD_IN_OPND
    rig.audit()


# --- machine failure mid-run ---------------------------------------------------------------------


def test_machine_failure_mid_run(rig: Rig) -> None:
    # card 2 fails when it has accepted 12 more requests: 4 running (one per engine), 8 waiting
    rig.emu.control.machine_failure(2, recovery_time=0.05, after_requests=12)
    sc = [ci() for _ in range(40)]
    idem = [lambda c: c.submit(apcrypto.CounterIncrement(1), idempotent=True) for _ in range(24)]
    out = rig.run(sc + idem + [me(i + 2) for i in range(50)])
    log = rig.emu.execution_log.entries()
    by = Counter(e.outcome for e in log)
    # on the wall clock the split depends on how fast the NQAPs arrived; normally 4 and 8
    assert 1 <= by["in-process-failed"] <= 4 and by["pending-failed"] >= 1
    for v in out[:40]:
        if isinstance(v, Exception):
            assert isinstance(v, Indeterminate) and v.mf_state == MF.IN_PROCESS, v
            assert v.qid >> 8 == 2
        else:
            assert isinstance(v, int)
    assert all(isinstance(v, int) for v in out[40:64])  # idempotent: re-driven, never indeterminate
    assert out[64:] == [expected_me(i + 2, K) for i in range(50)]
    # exactly the state-changing requests the card reported in process are indeterminate
    assert sum(isinstance(v, Indeterminate) for v in out[:40]) == by["in-process-failed"]
    starts = sum(1 for e in log if e.function == "CPRB:CI" and e.started is not None)
    assert sum(s.counter for s in rig.emu.stores.values()) == starts
    rep = rig.audit()
    assert not rep.indeterminate_never_started
    assert rep.redriven >= by["pending-failed"]
    rig.in_service()  # the failed card's queues drained, reset and came back


# --- checkstop -----------------------------------------------------------------------------------


def test_checkstop_then_restore(rig: Rig) -> None:
    rig.emu.control.checkstop(0, after_requests=10)
    out = rig.run([me(i + 2, K2, idempotent=False) for i in range(100)])
    for i, v in enumerate(out):
        if isinstance(v, Exception):
            assert isinstance(v, Indeterminate) and v.qid >> 8 == 0, v  # sent, unanswered
        else:
            assert v == expected_me(i + 2, K2)
    assert any(isinstance(v, Indeterminate) for v in out)
    offline = rig.core(lambda core: {q.qid for q in core.queues.values() if q.state.value == "offline"})
    assert offline == {qid_of(0, d) for d in range(4)}
    rep = rig.audit()
    assert not rep.indeterminate_never_started
    rig.emu.control.restore(0)
    rig.in_service()  # back by itself: the offline re-probe finds it healthy
    t = rig.emu.clock.now()
    out = rig.run([me(i + 2) for i in range(200)])
    assert out == [expected_me(i + 2, K) for i in range(200)]
    assert any(e.qid >> 8 == 0 and e.enqueued >= t for e in rig.emu.execution_log.entries())


# --- deadlines ---------------------------------------------------------------------------------


def test_deadline_queued_and_on_card(rig: Rig) -> None:
    for card in (0, 1):
        rig.emu.control.slow_engines(card, 500.0)  # ME 1K: 150 ms, three deadlines
    # 8 accelerator queues x 8 slots: the first 64 go to the cards, the rest wait on the host.  The
    # deadline leaves a loaded box 50 ms (wall clock) to place the first 64, and expires long before
    # any of them can finish.
    out = rig.run([me(i + 2, deadline=0.05) for i in range(80)])
    assert all(isinstance(v, DeadlineExceeded) for v in out), out
    on_card = [v for v in out if v.may_have_run]
    queued = [v for v in out if not v.may_have_run]
    assert len(on_card) == 64 and len(queued) == 16
    assert all(v.psmid is not None for v in on_card) and all(v.qid is None for v in queued)
    # the late replies are counted and dropped, never delivered
    rig.eventually(lambda core: core.ledger.counters["late_replies"] == 64, what="late replies")
    assert rig.client.stats()["outcomes"].get("completed", 0) == 0
    rig.audit()


# --- all queues of a kind lost ---------------------------------------------------------------


def test_all_queues_of_a_kind_lost(rig: Rig) -> None:
    rig.emu.control.checkstop(0)
    rig.emu.control.checkstop(1)
    out = rig.run([me(i + 2) for i in range(100)] + [ci() for _ in range(4)])
    assert all(isinstance(v, DeviceUnavailable) for v in out[:100]), Counter(type(v) for v in out)
    assert all(isinstance(v, int) for v in out[100:])  # CCA cards unaffected
    (late,) = rig.run([me(7)])
    assert isinstance(late, DeviceUnavailable)
    rig.audit()
    rig.emu.control.restore(1)
    rig.in_service([qid_of(1, d) for d in range(4)])
    assert rig.run([me(7)]) == [expected_me(7, K)]


# --- host-side bound -------------------------------------------------------------------------


def test_host_queue_bound_without_blocking(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(backlog_limit=10)
    rig.in_service()
    for card in (0, 1):
        rig.emu.control.slow_engines(card, 1000.0)  # ME 1K: 0.3 s: no slot frees up meanwhile
    futs = []
    with pytest.raises(HostQueueFull):
        for i in range(64 + 10 + 64):
            futs.append(rig.submit(me(i + 2, block=False)))
    assert 10 <= len(futs) <= 64 + 10
    rig.emu.control.clear()
    out = rig.wait(futs)
    assert out == [expected_me(i + 2, K) for i in range(len(futs))]  # nothing lost, nothing extra
    rig.audit()


def test_host_queue_bound_blocking_waits_for_room() -> None:
    emu = Emulator("small", clock="wall", seed=3)
    try:
        with apcrypto.connect("emu:", emulator=emu, config=FAST.with_(backlog_limit=5)) as client:
            assert client.wait_ready(WAIT)
            futs = [client.mod_expo(i.to_bytes(2, "big"), E, K.n) for i in range(2, 300)]
            _, pending = concurrent.futures.wait(futs, WAIT)
            assert not pending
            assert [f.result() for f in futs] == [expected_me(i, K) for i in range(2, 300)]
            assert client.core.backlog_size == 0
    finally:
        emu.close()


# --- lifecycle ---------------------------------------------------------------------------------


def test_close_resolves_everything(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig()
    rig.in_service()
    rig.emu.control.machine_failure(0, recovery_time=60.0)  # nothing will come back in time
    rig.emu.control.machine_failure(1, recovery_time=60.0)
    futs = [rig.submit(me(i + 2)) for i in range(20)]
    rig.close(timeout=0.1)
    out = [f.exception() for f in futs]
    assert all(isinstance(e, ClientClosed) for e in out), out
    with pytest.raises(ClientClosed):
        rig.submit(me(2))
    rig.emu.control.clear()


# --- the same clients on a virtual clock: autojump ---------------------------------------------


@pytest.mark.parametrize("kind", RUNNERS)
def test_virtual_clock_autojump_through_a_long_recovery(kind: str) -> None:
    """On a VirtualClock emulator the runner jumps time when it has nothing to do: a 30 s card
    recovery passes in well under a second of wall time, with the same outcomes."""
    emu = Emulator("default", seed=5)  # virtual clock
    rig = Rig(kind, emu, recovery_timeout=120.0)
    try:
        # the asyncio runner moves virtual time only while requests wait: warm up with work
        warm = rig.run([ci() for _ in range(16)] + [me(i + 2) for i in range(16)])
        assert all(not isinstance(v, Exception) for v in warm)
        assert rig.core(lambda core: all(q.state.in_service for q in core.queues.values()))
        rig.emu.control.machine_failure(2, recovery_time=30.0, after_requests=12)
        t_wall, t_virt = time.monotonic(), emu.clock.now()
        out = rig.run([ci() for _ in range(40)] + [me(i + 2) for i in range(20)])
        assert emu.clock.now() - t_virt >= 30.0
        assert time.monotonic() - t_wall < 10.0
        assert all(isinstance(v, int | Indeterminate) for v in out[:40])
        in_process = sum(e.outcome == "in-process-failed" for e in emu.execution_log.entries())
        assert 1 <= in_process <= 4
        assert sum(isinstance(v, Indeterminate) for v in out[:40]) == in_process
        assert out[40:] == [expected_me(i + 2, K) for i in range(20)]
        rep = rig.audit()
        assert not rep.indeterminate_never_started
    finally:
        try:
            rig.close()
        finally:
            emu.close()


def test_asyncio_client_on_a_virtual_clock_comes_up_while_idle() -> None:
    """Bring-up takes (virtual) time; an idle asyncio client must let it pass, not wait for work."""
    import apcrypto.aio
    from emulator import Emulator

    async def main() -> tuple[bool, set[str]]:
        emu = Emulator("small", seed=3)
        async with apcrypto.aio.connect("emu:", emulator=emu, config="fast") as c:
            ready = await c.wait_ready(5.0)
            states = {q["state"] for q in c.stats()["queues"].values()}
        emu.close()
        return ready, states

    ready, states = asyncio.run(main())
    assert ready and states == {"idle"}


# --- psmids -----------------------------------------------------------------------------------


def test_psmids_carry_a_random_nonce_not_the_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each client's psmids start from a nonce drawn from ``secrets`` (high 32 bits), never the pid;
    two clients of one process get different nonces and every psmid a client uses is unique."""
    import apcrypto.client as client_mod

    drawn: list[int] = []

    def randbits(k: int) -> int:
        assert k == 32
        drawn.append(0xC0FFEE00 + len(drawn))
        return drawn[-1]

    monkeypatch.setattr(client_mod.secrets, "randbits", randbits)
    emu = Emulator("small", seed=3)
    with (
        apcrypto.connect("emu:", emulator=emu, config="fast") as c1,
        apcrypto.connect("emu:", emulator=emu, config="fast") as c2,
    ):
        futs = [c.mod_expo(b"\x02", E, K.n) for c in (c1, c2) for _ in range(20)]
        for f in futs:
            f.result(timeout=30)
        mine = [{a.psmid for r in c.core.ledger.records.values() for a in r.attempts} for c in (c1, c2)]
    assert drawn == [0xC0FFEE00, 0xC0FFEE01]
    for nonce, psmids in zip(drawn, mine, strict=True):
        assert psmids and all(p >> 32 == nonce for p in psmids)
    assert not mine[0] & mine[1]
    # without the patch the nonce is random: two fresh bases differ (2**-32 chance of a false fail)
    monkeypatch.undo()
    assert client_mod.new_psmid_base() != client_mod.new_psmid_base()
