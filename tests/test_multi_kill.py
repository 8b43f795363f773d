"""One client over two real ``apcrypto-emulator serve`` processes, one of them SIGKILLed mid-run and
restarted on its port (issue 11, "one client over several servers").

The verdicts are checked by the kill checker of ``tests/_fixtures_kill.py`` (it shares nothing with
the driver: futures, the psmids exceptions name, and the servers' execution logs, each spilled to
its own SQLite file that survives the SIGKILL).  On top of its checks (every future resolves, every
result is right, state-changing work accounted for exactly, no psmid runs twice), this test asks
what a pool promises:

* requests spread over both servers (both logs hold this client's work);
* the survivor's work is unaffected: every request pinned to its card completes, no failed request
  names a psmid the survivor ran, and work submitted once the killed server is declared gone all
  completes (on the survivor);
* a request pinned to the dead server's card ends ``DeviceUnavailable`` after the grace, as one
  pinned to an offline card;
* after the restart the dead server's queues serve again (pinned work lands in the new instance's
  log).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import apcrypto
from apcrypto.cardstats import CardSide
from apcrypto.cli import listing
from apcrypto.errors import DeviceUnavailable
from emulator.execution_log import read_execution_log
from tests._fixtures_kill import (
    IN_SERVICE,
    KEYS,
    PSMID_BASE,
    PSMID_HI,
    Req,
    check,
    submit_mixed,
    wait_all,
)
from tests._fixtures_zmq import ServerProcess, server_factory

__all__ = ["server_factory"]  # fixtures used here

#: the driver's short test timings; a server silent 1 s is gone; quick reconnection
CLIENT = {"config": "fast", "psmid_base": PSMID_BASE, "reconnect_delay_max": 0.3, "peer_deadline": 1.0}
KEY = KEYS[1024]
OTHER = 0x7E57 << 32  # the second client's psmids: not this client's, so the checker leaves them out


def _serve(factory: Callable[..., ServerProcess], log: Path, seed: int, *extra: str) -> ServerProcess:
    return factory("--profile", "default", "--seed", str(seed), "--exec-log", str(log), *extra)


def _pinned(client: apcrypto.Client, card: int, n: int, rng: random.Random) -> list[Req]:
    out = []
    for _ in range(n):
        m = rng.randrange(2, KEY.n - 1)
        out.append(Req("ME-1024", client.mod_expo(m, KEY.e, KEY.n, card=card), pow(m, KEY.e, KEY.n), KEY))
    return out


def _until(cond: Callable[[], bool], timeout: float) -> bool:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            return False
        time.sleep(0.05)  # a bounded poll of a public read-out
    return True


def _server1_in_service(client: apcrypto.Client) -> bool:
    qs = client.stats()["queues"]
    mine = [q["state"] for name, q in qs.items() if name.startswith("1")]
    return bool(mine) and all(s in IN_SERVICE for s in mine)


@pytest.mark.timeout(120)
def test_one_of_two_servers_sigkilled_and_restarted(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    rng = random.Random(41)
    logs = {name: tmp_path / f"exec-{name}.sqlite" for name in ("a", "b1", "b2")}
    a = _serve(server_factory, logs["a"], 21)
    b = _serve(server_factory, logs["b1"], 22)
    with apcrypto.connect([a.data, b.data], **CLIENT) as client:
        assert client.wait_ready(15)
        warm = submit_mixed(client, 60, rng)
        assert wait_all(warm, 20) == 0
        assert all(r.fut.exception() is None for r in warm), "healthy servers failed requests"
        # spread: both servers ran a fair share of the warm-up (each one's log, read over its control plane)
        spread = [
            sum(1 for e in srv.control_client().execution_log() if e["psmid"] >> 32 == PSMID_HI)
            for srv in (a, b)
        ]
        assert min(spread) >= len(warm) // 5, spread
        # tenancy holds per server: a second pool client over the same servers gets other APQNs
        with apcrypto.connect([a.data, b.data], **{**CLIENT, "psmid_base": OTHER}) as other:
            assert other.wait_ready(15)
            mine, theirs = set(client.transport.qids()), set(other.transport.qids())
            assert mine and theirs and not mine & theirs, (mine, theirs)
            assert {q >> 12 for q in mine} == {q >> 12 for q in theirs} == {0, 1}  # on both servers
            m = rng.randrange(2, KEY.n - 1)
            assert other.mod_expo(m, KEY.e, KEY.n, card=0x10).result(10) == pow(m, KEY.e, KEY.n).to_bytes(
                KEY.size, "big"
            )

        wave = submit_mixed(client, 300, rng)  # a burst, most still queued or on the cards at the kill
        pinned_a = _pinned(client, 0x00, 40, rng)  # server 0's card 0 only
        wait_all(wave[:1], 10)
        b.kill()
        t_kill = time.monotonic()
        doubt_until = t_kill + 0.5  # work sent before the client could know may be lost in the socket
        during = []
        while client.transport.states()[1] != "gone" and time.monotonic() - t_kill < 10:
            during += submit_mixed(client, 4, rng)
            time.sleep(0.1)
        assert client.transport.states() == ["up", "gone"], client.transport.states()
        survivor = submit_mixed(client, 60, rng)  # the pool is server 0 alone now
        dead_card = client.mod_expo(2, KEY.e, KEY.n, card=0x10)
        with pytest.raises(DeviceUnavailable):
            dead_card.result(20)  # FAST's unavailable_grace: 1 s
        assert wait_all(survivor + pinned_a, 30) == 0

        b2 = _serve(server_factory, logs["b2"], 23, "--bind", b.data)
        assert _until(lambda: _server1_in_service(client), 30), client.stats()["queues"]
        pinned_b = _pinned(client, 0x11, 20, rng)  # the restarted server's card 1
        after = submit_mixed(client, 60, rng)
        unresolved = wait_all(warm + wave + during + survivor + pinned_a + pinned_b + after, 60)
        # apcrypto list over the pool, card-side counts from both control planes
        side = CardSide.for_client(client, f"{a.control},{b2.control}")
        assert side is not None
        try:
            listed = listing(client, side)
        finally:
            side.close()
    for srv in (a, b2):
        srv.stop()
    entries = {name: read_execution_log(p) for name, p in logs.items()}
    ran = {name: {e.psmid for e in log if e.psmid >> 32 == PSMID_HI} for name, log in entries.items()}

    everything = warm + wave + during + survivor + [Req("ME-1024", dead_card)] + pinned_a + pinned_b + after
    v = check([r for r in everything if r.fut is not dead_card], list(entries.values()), doubt_until)
    print(
        f"\nKILL-REPORT multi: 2 servers, one killed; {len(wave) + len(during)} around the kill: "
        f"{check(wave + during, list(entries.values()), doubt_until).line()}; psmids per log: "
        + ", ".join(f"{k} {len(s)}" for k, s in ran.items())
    )
    assert unresolved == 0 and not v.problems, v.problems
    assert ran["a"] and ran["b1"] and ran["b2"], {k: len(s) for k, s in ran.items()}
    # the survivor's work is unaffected
    assert all(r.fut.exception() is None for r in pinned_a + survivor)
    for r in everything:
        exc = r.fut.exception()
        psmid = getattr(exc, "psmid", None)
        assert psmid is None or psmid not in ran["a"], f"{r.kind}: {exc!r} names work the survivor ran"
    # after the restart: the restarted server's queues serve again
    assert all(r.fut.exception() is None for r in pinned_b + after)
    assert len(ran["b2"]) >= len(pinned_b)
    assert listed["requests_source"] == "card"
    cards = {c["name"]: c for c in listed["cards"]}
    assert sorted(cards) == ["00", "01", "02", "03", "10", "11", "12", "13"]
    assert all(c["status"] == "online" for c in cards.values())
    # the restarted server's counters, under its own card ids: it ran pinned_b on its card 1
    assert cards["11"]["requests"] >= len(pinned_b)
    assert cards["11"]["requests"] == sum(1 for e in entries["b2"] if e.qid >> 8 == 1)


@pytest.mark.soak
@pytest.mark.timeout(300)
@pytest.mark.parametrize("stagger", [0.0, 3.0])
def test_soak_both_servers_killed_restarted_one_after_the_other(
    server_factory: Callable[..., ServerProcess], tmp_path: Path, stagger: float
) -> None:
    """Both servers SIGKILLed at once (``stagger`` 0) or 3 s apart, under a steady stream of mixed
    work; server 0 restarted first, server 1 two seconds later.  While one server is back and the
    other still gone, the one that came back must not decide or disturb the other's work wrongly:
    the kill checker judges every verdict against all four execution logs."""
    rng = random.Random(int(stagger) + 100)
    logs = [tmp_path / f"exec-{n}.sqlite" for n in ("a1", "b1", "a2", "b2")]
    a, b = _serve(server_factory, logs[0], 31), _serve(server_factory, logs[1], 32)
    reqs: list[Req] = []
    with apcrypto.connect([a.data, b.data], **{**CLIENT, "unavailable_grace": 30.0}) as client:
        assert client.wait_ready(15)
        reqs += submit_mixed(client, 300, rng)
        wait_all(reqs[:1], 10)
        a.kill()
        t_fault = time.monotonic()
        t_end = t_fault + stagger + 8.0
        b_killed = a2 = b2 = None
        while time.monotonic() < t_end:
            now = time.monotonic()
            if b_killed is None and now - t_fault >= stagger:
                b.kill()
                b_killed = now
            if a2 is None and b_killed is not None and now - b_killed >= 2.0:
                a2 = _serve(server_factory, logs[2], 33, "--bind", a.data)
            if b2 is None and b_killed is not None and now - b_killed >= 4.0:
                b2 = _serve(server_factory, logs[3], 34, "--bind", b.data)
            reqs += submit_mixed(client, 4, rng)
            time.sleep(0.1)
        assert a2 is not None and b2 is not None and b_killed is not None
        doubt = [(t_fault, t_fault + 0.5), (b_killed, b_killed + 0.5)]
        assert _until(lambda: client.transport.state == "up" and _server1_in_service(client), 30)
        unresolved = wait_all(reqs, 90)
        after = submit_mixed(client, 60, rng)
        after_unresolved = wait_all(after, 30)
    for srv in (a2, b2):
        srv.stop()
    entries = [read_execution_log(p) for p in logs]
    v = check(reqs + after, entries, max(hi for _, hi in doubt))
    a_ = check(after, entries)
    print(f"\nKILL-REPORT multi both killed, stagger {stagger:g}s: {v.line()}; after: {a_.line()}")
    assert unresolved == 0 and not v.problems, v.problems
    assert after_unresolved == 0 and a_.counts == {"completed": len(after)}, a_.line()


def test_at_the_seam_a_killed_servers_loss_names_only_its_own_commands(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """The pool transport alone (no driver): after a SIGKILL of server 1, every ``TransportLost``
    names only commands sent to server 1 and only its APQNs (as the pool numbers them), while
    server 0 answers as before; after the restart a ``PeerRestored`` says server 1 is back and its
    queues answer again."""
    from apcrypto.transport import Completion, PeerRestored, TransportLost, open_transport
    from apcrypto.transport.base import Command
    from apformats.results import Instr
    from tests._fixtures_zmq import collect

    a = server_factory("--profile", "small", "--seed", "1")
    b = server_factory("--profile", "small", "--seed", "2")
    t = open_transport([a.data, b.data], peer_deadline=0.5, reconnect_delay_max=0.2)
    try:
        qids = t.qids()
        on_a = [q for q in qids if q >> 12 == 0]
        on_b = [q for q in qids if q >> 12 == 1]
        assert on_a and on_b and len(on_a) == len(on_b)
        b.kill()
        tags = iter(range(1, 10_000))
        sent: dict[int, int] = {}  # tag -> pool qid
        events: list[Any] = []

        def ask() -> None:
            cmds = [Command(next(tags), Instr.TAPQ, q, flag=True) for q in (on_a[0], on_b[0])]
            sent.update({c.tag: c.qid for c in cmds})
            t.submit(cmds)

        def gone(evs: list[Any]) -> bool:
            if not any(isinstance(e, TransportLost) and e.permanent for e in evs):
                ask()  # keep asking both servers until server 1 is declared gone
                return False
            return True

        ask()
        events += collect(t, gone, timeout=10)
        for ev in events:
            if isinstance(ev, TransportLost):
                assert ev.reason.startswith(b.data), ev.reason
                assert all(sent[tag] in on_b for tag in ev.tags), ev
                assert all(q in on_b for q in ev.qids), ev
            elif isinstance(ev, Completion) and sent[ev.tag] in on_a:
                assert ev.result.status.response_code == 0
        answered_a = [e for e in events if isinstance(e, Completion) and sent[e.tag] in on_a]
        assert answered_a, "server 0 stopped answering while server 1 was down"

        server_factory("--profile", "small", "--seed", "3", "--bind", b.data)
        back = collect(t, lambda evs: any(isinstance(e, PeerRestored) for e in evs), timeout=15)
        restored = [e for e in back if isinstance(e, PeerRestored)]
        assert restored[0].reason.startswith(b.data)
        t.submit([Command(99_999, Instr.TAPQ, on_b[0], flag=True)])
        answer = collect(t, lambda evs: any(isinstance(e, Completion) and e.tag == 99_999 for e in evs))
        (done,) = [e for e in answer if isinstance(e, Completion) and e.tag == 99_999]
        assert done.result.status.response_code == 0  # server 1's queue answers again
    finally:
        t.close()
