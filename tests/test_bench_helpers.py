"""The bench helpers measure what their names say: the raw transport loop really runs on interrupts
when asked (and only then), the naive client really waits for each reply, and "firmware alone"
executes with the profile's arithmetic.  Small counts: these are correctness checks, not timings."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

import apcrypto
from apcrypto.bench import driver_run, firmware_loop, naive_run, raw_transport_loop, workload
from apcrypto.transport import open_transport
from apcrypto.transport.base import Interrupt
from emulator import Emulator


@pytest.mark.timeout(60)
@pytest.mark.parametrize("interrupts", [False, True])
def test_raw_transport_loop_uses_interrupts_only_when_asked(interrupts: bool) -> None:
    emu = Emulator("overhead", clock="wall")
    transport = open_transport("emu:", emulator=emu)
    seen = 0
    poll = transport.poll

    def counting_poll(timeout: float = 0.0) -> list[Any]:
        nonlocal seen
        events = poll(timeout)
        seen += sum(isinstance(ev, Interrupt) for ev in events)
        return events

    transport.poll = counting_poll  # type: ignore[method-assign]
    try:
        assert raw_transport_loop(transport, 64, interrupts=interrupts) == 64
    finally:
        transport.close()
        emu.close()
    assert (seen > 0) is interrupts


def _overlaps(run: Any, n: int) -> int:
    """Run ``run(client, n)`` on ``emu:default`` (0.4 ms per ME-2048); count executions that started
    before the previous one ended, from the emulator's execution log."""
    emu = Emulator("default", clock="wall")
    with apcrypto.connect("emu:", emulator=emu) as client:
        assert client.wait_ready(10)
        assert run(client, n) == n
    spans = sorted((e.started, e.ended) for e in emu.execution_log.entries() if e.function == "MEX_2K")
    emu.close()
    assert len(spans) == n
    return sum(start < prev_end for (_, prev_end), (start, _) in itertools.pairwise(spans))


@pytest.mark.timeout(60)
def test_naive_run_has_one_request_in_flight_at_a_time() -> None:
    assert _overlaps(naive_run, 20) == 0
    assert _overlaps(driver_run, 20) > 0  # the same check sees the driver's parallelism


def test_firmware_loop_follows_the_compute_mode() -> None:
    reqs = workload(5)
    assert firmware_loop(reqs) == firmware_loop(reqs, "echo") == 5
    with pytest.raises(ValueError, match="compute"):
        firmware_loop(reqs, "nope")


def test_core_alone_bench_runs_every_request_through_every_slot() -> None:
    """``benches/cpu_per_request.py``'s instant card: every request is placed, accepted, answered
    and resolved exactly once, never more in flight on a queue than its slots, and work spreads
    over every queue (what its CPU-per-request figure claims to time)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benches"))
    try:
        import cpu_per_request as bench
    finally:
        sys.path.pop(0)

    peak: dict[int, int] = {}
    answer = bench.InstantCard.answer

    def watching(self: Any, cmds: tuple[Any, ...]) -> list[Any]:
        out = answer(self, cmds)
        for qid, held in self.held.items():
            peak[qid] = max(peak.get(qid, 0), len(held))
        return out

    bench.InstantCard.answer = watching  # type: ignore[method-assign]
    try:
        cpu, done = bench.core_round(500, queues=4)
    finally:
        bench.InstantCard.answer = answer  # type: ignore[method-assign]
    assert done == 500 and cpu > 0
    assert len(peak) == 4 and all(1 <= n <= bench.HW.slots for n in peak.values()), peak
