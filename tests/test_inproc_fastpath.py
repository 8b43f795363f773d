"""The in-process hot path (issue 11, "in process"): what was made cheaper still does the same thing.

* ``emu:`` on a wall clock raises the interrupts a batch of commands causes on the sending thread,
  when the batch is done (``WallClock.assisting``), not on the clock's pump thread: the completion
  and its interrupt are both waiting when ``submit`` returns.
* The core's per-entry occupancy integration (``QueueMachine.advance``, unrolled) adds exactly
  ``Queue.held x dt`` for every queue, as the property defines it.
"""

from __future__ import annotations

import threading

import pytest

from apcrypto.bench import workload
from apcrypto.transport.base import Command, Completion, Interrupt
from apcrypto.transport.inproc import InprocTransport
from apformats.codes import ResponseCode
from apformats.results import Instr, qid_str
from emulator import Emulator
from tests._fixtures_driver import exact_profile, key, make_sim, me_request

pytestmark = pytest.mark.timeout(30)


def test_inproc_interrupt_raised_on_the_sending_thread_with_the_batch() -> None:
    with Emulator("fast", clock="wall") as emu:  # zero service times: replies inline
        t = InprocTransport(emu)
        notified: list[int] = []
        t.set_notify(lambda: notified.append(threading.get_ident()))
        qid = next(q for q in t.qids() if emu.tapq(q).hwinfo.accel)
        t.submit([Command(1, Instr.AQIC, qid, flag=True)])
        assert [type(e) for e in t.poll()] == [Completion]
        reqs = workload(3)
        t.submit([Command(2 + i, Instr.NQAP, qid, psmid=10 + i, message=m) for i, m in enumerate(reqs)])
        events = t.poll()  # no wait: everything the batch caused is here already
        completions = [e for e in events if type(e) is Completion]
        assert [c.tag for c in completions] == [2, 3, 4]
        assert all(c.result.status.response_code == ResponseCode.NORMAL for c in completions)
        assert [e.qid for e in events if type(e) is Interrupt] == [qid]  # one per batch, not per reply
        assert notified and set(notified) == {threading.get_ident()}
        t.submit([Command(10 + i, Instr.DQAP, qid) for i in range(3)])
        replies = [e for e in t.poll() if type(e) is Completion]
        assert sorted(r.result.psmid for r in replies) == [10, 11, 12]
        t.close()


def test_occupancy_integrates_held_times_dt_for_every_queue() -> None:
    """Time passing with nothing changing adds ``held * dt`` to every queue's integral, read
    through ``stats()`` (the core integrates lazily: before a change of ``held`` and when read)."""
    _emu, sim = make_sim(exact_profile("small"), seed=5)
    try:
        k = key(1024)
        futs = [sim.submit(me_request(x, k)) for x in range(2, 40)]
        sim.run(sim.now() + 1e-4)  # part-way: some queues hold messages, some none
        core = sim.core
        queues = list(core.queues.values())
        held = {q.qid: q.held for q in queues}
        assert any(held.values()), "the test needs a queue holding messages"
        t0 = core.out.now
        before = {n: q["slot_seconds"] for n, q in core.stats()["queues"].items()}
        later = t0 + 0.25
        core.machine.advance(later)
        after = core.stats()["queues"]
        for q in queues:
            name = qid_str(q.qid)
            assert after[name]["slot_seconds"] == pytest.approx(before[name] + held[q.qid] * 0.25, abs=1e-12)
        again = core.stats()["queues"]  # no time passed: nothing added
        assert [v["slot_seconds"] for v in again.values()] == [v["slot_seconds"] for v in after.values()]
        sim.run_until_settled(futs, max_time=5.0)
        assert all(f.done() for f in futs)
    finally:
        sim.shutdown()


def test_a_runner_turn_over_a_wall_clock_emulator_assists_its_clock() -> None:
    """Each turn of the threaded runner over ``emu:`` on a wall clock is inside the clock's
    ``assisting()`` context, so the clock's pump stands down while the runner works the emulator
    (what falls due runs on the runner's thread at the turn's end); a virtual clock has none."""
    import apcrypto

    emu = Emulator("default", clock="wall")
    try:
        with apcrypto.connect("emu:", emulator=emu) as client:
            assert client.wait_ready(10)
            seen: list[tuple[int, int]] = []
            done = threading.Event()

            def look() -> None:
                seen.append((emu.clock._assist, threading.get_ident()))
                done.set()

            client._runner.call(look)  # runs in one of the runner's turns
            assert done.wait(10)
            assert seen[0][0] >= 1 and seen[0][1] != threading.get_ident()
            k = key()
            data = (5).to_bytes(k.size, "big")
            assert client.mod_expo(data, 65537, k.n).result(10) == pow(5, 65537, k.n).to_bytes(k.size, "big")
    finally:
        emu.close()
    assert InprocTransport(Emulator("default")).clock_assist is None  # virtual clock: nothing to assist
