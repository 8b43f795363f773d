"""The emulator server as a shared service, against a real ``python -m emulator serve`` process: APQN
ownership (no theft, forgery or key theft by another client; no widening by a second HELLO), sessions that
survive a reconnect within the grace and are zeroized after it, and eight client processes sharing one
server fairly.

Every verdict about what ran is checked against the server's execution log, read through its control
plane, never against the driver's own belief.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import wait
from pathlib import Path
from typing import Any

import pytest
import zmq

import apcrypto
from apcrypto.errors import ApqnInUse
from apcrypto.transport import Command, Completion, open_transport
from apcrypto.transport.base import Transport
from apformats.codes import NO_PENDING_REPLY, ResponseCode
from apformats.frames import ErrorCode, ErrorFrame, Welcome, decode_frame, encode_command, encode_hello
from apformats.messages import build_cprb, build_mex, parse_reply
from apformats.results import ApResult, Instr, qid_domain, qid_of
from tests._fixtures_zmq import ROOT, E, ServerProcess, collect, counter_effects, rsa_key, server_factory

__all__ = ["server_factory"]  # fixture, imported for pytest

RC = ResponseCode
T = 10.0  # handshake and answer patience: the test machine may be loaded
CCA0, CCA0_D1 = qid_of(2, 0), qid_of(2, 1)


def run(t: Transport, *cmds: Command, timeout: float = 5.0) -> dict[int, ApResult]:
    t.submit(cmds)
    want = {c.tag for c in cmds}
    evs = collect(t, lambda evs: want <= {e.tag for e in evs if isinstance(e, Completion)}, timeout)
    return {e.tag: e.result for e in evs if isinstance(e, Completion)}


def dqap_one(t: Transport, qid: int, tag: int, timeout: float = 5.0) -> ApResult:
    """DQAP until a reply comes (bounded polls: the engine needs a few ms)."""
    deadline = time.monotonic() + timeout
    while True:
        res = run(t, Command(tag, Instr.DQAP, qid))[tag]
        if res.status.rc != NO_PENDING_REPLY:
            return res
        assert time.monotonic() < deadline, "no reply"
        t.poll(0.005)


def sessions(srv: ServerProcess) -> list[dict[str, Any]]:
    return srv.control_client(timeout=5.0).sessions()


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.02)


# --- ownership --------------------------------------------------------------------------------------


def test_second_client_can_neither_steal_nor_forge_replies_nor_touch_keys(
    server_factory: Callable[..., ServerProcess],
) -> None:
    srv = server_factory("--profile", "default", "--seed", "3")
    k = rsa_key(1024)
    with open_transport(srv.data, timeout=T) as victim, open_transport(srv.data, timeout=T) as thief:
        mine, theirs = set(victim.qids()), set(thief.qids())
        assert mine and theirs and mine.isdisjoint(theirs)
        assert {qid_domain(q) for q in mine} == {0} and {qid_domain(q) for q in theirs} == {1}
        # the victim stores a key in its CCA domain and leaves work on its accelerator queue
        assert (
            run(victim, Command(1, Instr.NQAP, CCA0, 11, build_cprb("KS", 0, b"\x05secret-key")))[1].status.rc
            == 0
        )
        assert parse_reply(dqap_one(victim, CCA0, 2).reply).kind == "ok"
        acc = qid_of(0, 0)
        work = [Command(10 + i, Instr.NQAP, acc, 100 + i, build_mex(i + 2, E, k.n)) for i in range(6)]
        assert all(r.status.rc == 0 for r in run(victim, *work).values())
        # the thief: every instruction on the victim's APQNs is refused before it reaches the card
        tries = [
            Command(20, Instr.DQAP, acc),  # reply theft
            Command(21, Instr.NQAP, acc, 103, build_mex(9, E, k.n)),  # forgery under the victim's next psmid
            Command(22, Instr.NQAP, CCA0, 77, build_cprb("KR", 0, b"\x05")),  # key theft
            Command(23, Instr.ZAPQ, CCA0),  # key wipe
            Command(24, Instr.RAPQ, acc),  # throwing the victim's work away
            Command(25, Instr.TAPQ, acc, flag=True),
        ]
        assert {t: r.status.rc for t, r in run(thief, *tries).items()} == dict.fromkeys(
            range(20, 26), RC.Q_NOT_AVAIL
        )
        # ... and naming the victim's domain in a CPRB on its own queue reads nothing
        assert (
            run(thief, Command(30, Instr.NQAP, CCA0_D1, 78, build_cprb("KR", 0, b"\x05")))[30].status.rc == 0
        )
        assert parse_reply(dqap_one(thief, CCA0_D1, 31).reply).kind == "error"
        # the victim gets exactly its own six results, right, and its key is intact
        got = {}
        tag = 40
        while len(got) < 6:
            res = dqap_one(victim, acc, tag)
            tag += 1
            got[res.psmid] = int.from_bytes(parse_reply(res.reply).result, "big")
        assert got == {100 + i: pow(i + 2, E, k.n) for i in range(6)}
        run(victim, Command(50, Instr.NQAP, CCA0, 12, build_cprb("KR", 0, b"\x05")))
        assert parse_reply(dqap_one(victim, CCA0, 51).reply).result == b"secret-key"
        # asking for the victim's domain by name is refused with a specific error the client reports
        with pytest.raises(ApqnInUse) as ei:
            apcrypto.connect(srv.data, domains=[0], config="fast", timeout=T)
        assert ei.value.code == ErrorCode.APQN_IN_USE and "00.0000" in str(ei.value)
        with pytest.raises(ApqnInUse):  # the asyncio client reports it the same way
            asyncio.run(_aio_connect(srv.data, domains=[0]))
    log = srv.control_client(timeout=5.0).execution_log()
    assert {e["psmid"] for e in log if e["qid"] == acc} == {100 + i for i in range(6)}  # nothing forged ran


async def _aio_connect(url: str, **options: Any) -> None:
    async with apcrypto.aio.connect(url, config="fast", **options):
        pass


def test_a_second_hello_cannot_widen_a_session(server_factory: Callable[..., ServerProcess]) -> None:
    srv = server_factory("--profile", "small")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(srv.data)

    def ask(frame: bytes) -> Any:
        sock.send(frame)
        assert sock.poll(5000), "no answer"
        return decode_frame(sock.recv())

    try:
        first = ask(encode_hello([1]))
        assert isinstance(first, Welcome) and first.qids == (qid_of(0, 1), qid_of(1, 1))
        wider = ask(encode_hello([0, 1]))
        assert isinstance(wider, ErrorFrame) and wider.code == ErrorCode.DOMAIN_DENIED
        again = ask(encode_hello())
        assert isinstance(again, Welcome) and again.qids == first.qids and again.token == first.token
        res = ask(encode_command(1, Instr.TAPQ, qid_of(0, 0)))
        assert res.to_result().status.rc == RC.Q_NOT_AVAIL
        # domain 0 is still free for somebody else
        with open_transport(srv.data, domains=[0], timeout=T) as other:
            assert other.qids() == [qid_of(0, 0), qid_of(1, 0)]
    finally:
        sock.close(linger=0)
        ctx.term()


def test_curve_matrix_bounds_each_key_and_a_token_serves_only_its_key(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    from apcrypto.transport.framed import HandshakeRefused
    from emulator.cli import main as cli_main
    from emulator.control_client import curve_options

    keys = tmp_path / "keys"
    assert cli_main(["keygen", str(keys), "--client", "alice", "--client", "bob"]) == 0
    matrix = tmp_path / "matrix.toml"
    matrix.write_text("[clients.alice]\ndomains = [0]\n[clients.bob]\ncards = [1]\ndomains = [1]\n")
    srv = server_factory(
        "--profile", "small", "--curve-dir", str(keys), "--apqn-matrix", str(matrix), "--session-grace", "30"
    )
    alice, bob = curve_options(keys, "alice"), curve_options(keys, "bob")
    with open_transport(srv.data, timeout=T, **alice) as a:
        assert a.qids() == [qid_of(0, 0), qid_of(1, 0)]
        with pytest.raises(HandshakeRefused) as ei:  # bob's key may never have domain 0
            open_transport(srv.data, domains=[0], timeout=T, **bob)
        assert ei.value.code == ErrorCode.DOMAIN_DENIED
        with open_transport(srv.data, timeout=T, **bob) as b:
            assert b.qids() == [qid_of(1, 1)]
        # alice's token in a HELLO signed with bob's key gets bob a session of his own, not alice's
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.linger = 0
        sock.curve_serverkey = bob["curve_server_key"]
        sock.curve_publickey, sock.curve_secretkey = bob["curve_keypair"]
        try:
            sock.connect(srv.data)
            assert a.resume_token is not None
            sock.send(encode_hello(token=a.resume_token))
            assert sock.poll(5000)
            w = decode_frame(sock.recv())
            assert isinstance(w, Welcome) and not w.resumed and w.qids == (qid_of(1, 1),)
        finally:
            sock.close(linger=0)


def test_serve_refuses_a_matrix_without_curve_or_a_bad_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from emulator.cli import main as cli_main

    matrix = tmp_path / "m.toml"
    matrix.write_text("[clients.nobody]\ndomains = [0]\n")
    assert cli_main(["serve", "--apqn-matrix", str(matrix)]) == 2
    assert "--curve-dir" in capsys.readouterr().err
    assert cli_main(["keygen", str(tmp_path / "keys")]) == 0
    assert cli_main(["serve", "--apqn-matrix", str(matrix), "--curve-dir", str(tmp_path / "keys")]) == 2
    assert "no certificate" in capsys.readouterr().err


# --- sessions that survive a reconnect --------------------------------------------------------------


def test_driver_does_not_reset_for_silence_while_the_link_is_down() -> None:
    """Sans-I/O: the reply timeout must not reset a queue while the link is down (a resumed session
    would come back to queues whose replies the reset threw away); once answers flow again, a card
    that stays silent is reset as before."""
    from apcrypto.core.queue import QState
    from apformats.messages import build_type80
    from tests._fixtures_driver import Script, expected_me, key, me_request, res

    k = key(1024)
    q = qid_of(0, 0)
    s = Script()
    s.bring_up(q)
    rid = s.submit(me_request(2, k), idempotent=False)
    nq = s.one(Instr.NQAP, q)
    s.answer(nq, res(irq=True))  # on the card
    s.lose_transport(permanent=False)  # the connection drops; the transport reconnects meanwhile
    for _ in range(4):
        s.fire(("reply", q))
    assert not s.cmds(Instr.RAPQ) and not s.cmds(Instr.ZAPQ) and rid not in s.resolved
    assert s.core.ledger.counters["reply_timeouts_deferred"] >= 3 and s.state(q).in_service
    # the session is resumed: the AQIC re-registration is answered, then the kept reply is drained
    s.answer(s.one(Instr.AQIC, q), res(irq=True))
    s.interrupt(q)
    s.answer(
        s.one(Instr.DQAP, q), res(psmid=nq.psmid, reply=build_type80(expected_me(2, k)), empty=True, irq=True)
    )
    assert s.resolved[rid].error is None and s.resolved[rid].value == expected_me(2, k)
    # with the link up, a card that holds work and says nothing is still reset
    rid2 = s.submit(me_request(3, k), idempotent=False)
    s.answer(s.one(Instr.NQAP, q), res(irq=True))
    for _ in range(2):
        s.fire(("reply", q))
    assert s.cmds(Instr.RAPQ, q) and s.state(q) is QState.RESET_START
    assert isinstance(s.resolved[rid2].error, Exception)  # decided from the ledger: may have run


def test_reconnect_within_the_grace_drains_replies_and_verdicts_match_the_log(
    server_factory: Callable[..., ServerProcess],
) -> None:
    """The victim's connection is cut while its state-changing work runs; an intruder connects meanwhile
    with default options.  The victim resumes its session, drains what its queues hold, and every request
    ends completed with the value the card's log says it produced."""
    srv = server_factory("--profile", "default", "--seed", "5", "--session-grace", "30")
    ctl = srv.control_client(timeout=5.0)
    # the outage (3.5 s: the victim's first reconnect attempt) outlasts two reply timeouts, so a driver
    # that took the link's silence for the card's would reset the queues and lose what they kept
    victim = apcrypto.connect(
        srv.data,
        config="fast",
        reply_timeout=1.5,
        reconnect_delay=3.5,
        timeout=T,
        reconnect_jitter=0.0,
        peer_deadline=20.0,
    )
    intruder = None
    try:
        assert victim.wait_ready(10)
        for card in (2, 3):
            ctl.slow_engines(card, 100.0, 3.0)  # CI: 0.4 s each, so work is in process when the link goes
        futs = [victim.counter_increment() for _ in range(16)]
        wait_for(lambda: sum(e["outcome"] == "running" for e in ctl.execution_log()) >= 4, 5, "work running")
        (mine,) = [s for s in ctl.sessions() if s["established"]]
        assert ctl.disconnect(mine["client"]) == 1
        # meanwhile another client comes with default options: it gets other APQNs and resets only those
        intruder = apcrypto.connect(srv.data, config="fast", timeout=T)
        assert intruder.wait_ready(10)
        assert {qid_domain(q) for q in intruder.transport.qids()} == {1}
        _, pending = wait(futs, timeout=30)
        assert not pending
        values = [f.result() for f in futs]  # raises if any ended Indeterminate (or anything else)
        assert victim.transport.counters["resumed"] == 1
        records = [r for r in victim.core.ledger.records.values() if r.attempts]
        log = ctl.execution_log()
        effects = counter_effects(log)
        by_psmid = {r.attempts[-1].psmid: r for r in records}
        assert len(records) == 16 and all(len(r.attempts) == 1 for r in records)  # nothing re-driven
        assert sorted(effects[p] for p in by_psmid) == sorted(values)
        ran = [e for e in log if e["psmid"] in by_psmid]
        assert len(ran) == 16 and {e["outcome"] for e in ran} == {"completed"}  # each ran once, none lost
        counters = victim.stats()["counters"]
        assert counters.get("external_resets", 0) == 0 and counters.get("reply_timeouts", 0) == 0
    finally:
        if intruder is not None:
            intruder.close()
        victim.close()


def test_a_restarted_server_does_not_resume_and_the_client_says_so(
    server_factory: Callable[..., ServerProcess],
) -> None:
    """A token the server does not know (it restarted) gets a new session: not ``resumed``, counted as
    ``sessions_lost``; the same default grant as before, since the new server has nobody else."""
    srv = server_factory("--profile", "small")
    with open_transport(srv.data, peer_deadline=10.0, reconnect_delay=0.05, reconnect_delay_max=0.2) as t:
        first = t.welcome
        assert first is not None and first.token is not None and not first.resumed
        srv.kill()
        server_factory("--profile", "small", "--bind", srv.data)
        wait_for(lambda: t.counters["reconnects"] == 1, 10, "reconnected")
        assert t.welcome is not None and not t.welcome.resumed
        assert t.counters["sessions_lost"] == 1 and t.counters["resumed"] == 0
        assert t.qids() == list(first.qids)


def test_after_the_grace_the_apqns_are_zeroized_and_free(
    server_factory: Callable[..., ServerProcess],
) -> None:
    grace = 0.5
    srv = server_factory("--profile", "default", "--session-grace", str(grace))
    ctl = srv.control_client(timeout=5.0)
    # a client that will not come back in time (its first reconnect attempt is 30 s away)
    gone = open_transport(srv.data, domains=[0], timeout=T, reconnect_delay=30.0, peer_deadline=60.0)
    try:
        run(gone, Command(1, Instr.NQAP, CCA0, 1, build_cprb("KS", 0, b"\x07left-behind")))
        assert parse_reply(dqap_one(gone, CCA0, 2).reply).kind == "ok"
        run(
            gone, Command(3, Instr.NQAP, CCA0, 2, build_cprb("CI", 0, (1).to_bytes(8, "big")))
        )  # reply left waiting
        (s,) = [s for s in ctl.sessions() if s["established"]]
        assert ctl.disconnect(s["client"]) == 1
        dropped = time.monotonic()
        with pytest.raises(ApqnInUse):  # reserved for its client during the grace
            open_transport(srv.data, domains=[0], timeout=T)
        waiting = [x for x in ctl.sessions() if x["client"] is None]  # detached, kept for the grace
        assert [x["apqns"] for x in waiting] == [[qid_of(c, 0) for c in range(4)]]
        deadline = time.monotonic() + 10
        while True:
            try:
                heir = open_transport(srv.data, domains=[0], timeout=T)
                break
            except ApqnInUse:
                assert time.monotonic() < deadline, "APQNs not freed after the grace"
                time.sleep(0.05)
        assert time.monotonic() - dropped >= grace
        with heir:
            assert heir.qids() == [qid_of(c, 0) for c in range(4)]
            # zeroized: the reply the last holder left is gone, and so is its key
            wait_for(lambda: run(heir, Command(9, Instr.TAPQ, CCA0))[9].status.rc == 0, 2, "reset over")
            assert run(heir, Command(10, Instr.DQAP, CCA0))[10].status.queue_empty
            run(heir, Command(11, Instr.NQAP, CCA0, 5, build_cprb("KR", 0, b"\x07")))
            assert parse_reply(dqap_one(heir, CCA0, 12).reply).kind == "error"  # slot empty
        left = [e for e in ctl.execution_log() if e["psmid"] == 2]
        assert [e["outcome"] for e in left] == ["discarded"]
    finally:
        gone.close()


KILLED_CLIENT = r"""
import sys, time
from apcrypto.transport import Command, open_transport
from apformats.messages import build_cprb
from apformats.results import Instr, qid_of
t = open_transport(sys.argv[1], domains=[0], timeout=10.0)
t.submit([Command(1, Instr.NQAP, qid_of(2, 0), 0xDEAD, build_cprb("CI", 0, (1).to_bytes(8, "big")))])
while not t.poll(1.0):
    pass
print("READY", flush=True)
time.sleep(600)
"""


def test_a_client_killed_without_a_word_is_detached_within_seconds(
    server_factory: Callable[..., ServerProcess],
) -> None:
    """SIGKILL: no BYE, and the server is never told.  It probes sessions that fell silent, finds the
    connection gone, and starts the grace; then the APQNs are zeroized and free -- seconds, not the
    minute of ``--session-idle``."""
    srv = server_factory("--profile", "default", "--session-grace", "0.5")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    client = subprocess.Popen(
        [sys.executable, "-c", KILLED_CLIENT, srv.data], stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env
    )
    try:
        assert client.stdout is not None and client.stdout.readline().strip() == "READY"
        client.kill()
        client.wait(10)
        killed = time.monotonic()
        with pytest.raises(ApqnInUse):
            open_transport(srv.data, domains=[0], timeout=T)
        while True:
            try:
                heir = open_transport(srv.data, domains=[0], timeout=T)
                break
            except ApqnInUse:
                assert time.monotonic() - killed < 15, "the dead client's APQNs were not freed"
                time.sleep(0.1)
        heir.close()
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(10)
        if client.stdout is not None:
            client.stdout.close()
    log = srv.control_client(timeout=5.0).execution_log(psmid=0xDEAD)
    assert [e["outcome"] for e in log] == ["discarded"]  # its reply was zeroized with the APQN


# --- many clients, one server -----------------------------------------------------------------------

WORKER = r"""
import json, sys, time
from concurrent.futures import wait, FIRST_COMPLETED
import apcrypto
from apcrypto.errors import Indeterminate
from apcrypto.testing import seeded_key

url = sys.argv[1]
k = seeded_key(1024, "tenancy")
# default options (the server assigns the APQNs), but patient: eight interpreters start at once
c = apcrypto.connect(url, config="fast", timeout=15.0)
ok = c.wait_ready(30)
print("READY" if ok else "NOTREADY", flush=True)
start, duration = map(float, sys.stdin.readline().split()[1:3])
while time.time() < start:
    time.sleep(0.001)
end = start + duration
out = {"done": 0, "late": 0, "indeterminate": 0, "errors": 0, "wrong": 0}
inflight = {}
n = 0
def settle(f):
    x = inflight.pop(f)
    err = f.exception()
    if err is None:
        if int.from_bytes(f.result(), "big") != pow(x, 65537, k.n):
            out["wrong"] += 1
        elif time.time() <= end:
            out["done"] += 1
        else:
            out["late"] += 1
    elif isinstance(err, Indeterminate):
        out["indeterminate"] += 1
    else:
        out["errors"] += 1
while time.time() < end:
    while len(inflight) < 16:
        n += 1
        x = 2 + n
        inflight[c.mod_expo(x.to_bytes(128, "big"), 65537, k.n, idempotent=False)] = x
    fin, _ = wait(list(inflight), timeout=max(0.0, end - time.time()), return_when=FIRST_COMPLETED)
    for f in fin:
        settle(f)
fin, _ = wait(list(inflight), timeout=30)
for f in list(fin):
    settle(f)
out["unfinished"] = len(inflight)
psmids = [a.psmid for r in c.core.ledger.records.values() for a in r.attempts]
out["nonce"] = psmids[0] >> 32 if psmids else None
out["qids"] = c.transport.qids()
out["external_resets"] = c.stats()["counters"].get("external_resets", 0)
c.close()
print(json.dumps(out), flush=True)
"""


def shared_profile(tmp_path: Path, domains: int = 8, mex_1k: float = 4e-3) -> Path:
    """The default profile with ``domains`` usage domains per card (room for that many clients), and
    accelerators that take ``mex_1k`` seconds per 1024-bit ME: the cards, not the clients' share of
    a loaded machine's CPUs, then bound each client, so the fairness measured is the server's."""
    text = (ROOT / "emulator" / "profiles" / "default.toml").read_text()
    text = text.replace("MEX_1K = 300e-6", f"MEX_1K = {mex_1k!r}", 1)
    usage = ", ".join(str(d) for d in range(domains))
    text = text.replace("usage_domains = [0, 1, 2, 3]", f"usage_domains = [{usage}]")
    text = text.replace("control_domains = [4]", f"control_domains = [{domains}]")
    text = text.replace('name = "default"', 'name = "shared"')
    path = tmp_path / "shared.toml"
    path.write_text(text)
    return path


def jain(xs: list[float]) -> float:
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs)) if any(xs) else 0.0


def eight_clients(srv: ServerProcess, duration: float, n: int = 8) -> list[dict[str, Any]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    errs = [srv.log.with_name(f"client-{i}-{time.monotonic_ns()}.err") for i in range(n)]
    procs = []
    for err in errs:
        with err.open("w") as f:  # a file, not a pipe: nothing a client logs can block it
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", WORKER, srv.data],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=f,
                    text=True,
                    cwd=ROOT,
                    env=env,
                )
            )
    try:
        for p, err in zip(procs, errs, strict=True):
            assert p.stdout is not None
            line = p.stdout.readline().strip()
            if line != "READY":
                p.kill()
                p.wait(10)
                raise AssertionError(f"a client did not come up ({line!r}): {err.read_text()}")
        start = time.time() + 0.3
        for p in procs:
            assert p.stdin is not None
            p.stdin.write(f"GO {start} {duration}\n")
            p.stdin.flush()
        results = []
        for p, err in zip(procs, errs, strict=True):
            out, _ = p.communicate(timeout=duration + 60)
            assert p.returncode == 0, (out, err.read_text())
            results.append(json.loads(out.strip().splitlines()[-1]))
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)


def check_eight(srv: ServerProcess, results: list[dict[str, Any]]) -> float:
    assert all(r["unfinished"] == 0 for r in results), results
    assert sum(r["indeterminate"] for r in results) == 0, results
    assert sum(r["errors"] + r["wrong"] for r in results) == 0, results
    assert all(r["external_resets"] == 0 for r in results), results
    qids = [set(r["qids"]) for r in results]
    assert all(len(q) == 4 for q in qids)  # one queue on every card: both kinds of card
    assert len(set().union(*qids)) == sum(len(q) for q in qids)  # pairwise disjoint
    # no client's request ran on another's queue, and no queue was reset under work (nothing discarded)
    owner = {r["nonce"]: set(r["qids"]) for r in results}
    log = srv.control_client(timeout=10.0).execution_log()
    mine = [e for e in log if e["psmid"] >> 32 in owner]
    assert len(mine) >= sum(r["done"] for r in results)
    assert all(e["qid"] in owner[e["psmid"] >> 32] for e in mine)
    assert [e for e in mine if e["outcome"] == "discarded"] == []
    fairness = jain([float(r["done"]) for r in results])
    assert fairness >= 0.95, ([r["done"] for r in results], fairness)
    return fairness


@pytest.mark.timeout(180)
def test_eight_client_processes_share_one_server_fairly(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    srv = server_factory("--profile", str(shared_profile(tmp_path)), "--seed", "8")
    check_eight(srv, eight_clients(srv, duration=2.0))


@pytest.mark.soak
@pytest.mark.timeout(600)
def test_eight_client_processes_share_one_server_fairly_long(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    srv = server_factory("--profile", str(shared_profile(tmp_path)), "--seed", "9")
    check_eight(srv, eight_clients(srv, duration=30.0))
