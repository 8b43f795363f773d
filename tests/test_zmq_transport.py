"""The ``tcp://`` transport against a real server process: instructions, real RSA, pipelining, interrupts,
transport faults and reconnection."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest

from apcrypto.transport import (
    Command,
    Completion,
    Interrupt,
    PeerRestored,
    TransportClosed,
    TransportLost,
    open_transport,
)
from apcrypto.transport.zmq_client import ServerUnreachable, ZmqTransport
from apformats.codes import NO_PENDING_REPLY, ResponseCode
from apformats.messages import build_crt, build_mex, parse_reply
from apformats.results import Instr, qid_of
from emulator.control_client import ControlClient
from tests._fixtures_zmq import E, ServerProcess, collect, control, rsa_key, server_factory, zmq_server

__all__ = ["control", "server_factory", "zmq_server"]  # fixtures, imported for pytest

RC = ResponseCode
Q00, Q01, Q10, Q11 = qid_of(0, 0), qid_of(0, 1), qid_of(1, 0), qid_of(1, 1)


@pytest.fixture
def transport(zmq_server: ServerProcess) -> Iterator[ZmqTransport]:
    t = open_transport(zmq_server.data, timeout=2.0, domains=[0, 1])  # every APQN of the small profile
    assert isinstance(t, ZmqTransport)
    try:
        yield t
    finally:
        t.close()


def done(tags: set[int]):
    """``until`` predicate: every tag has completed."""
    return lambda evs: tags <= {e.tag for e in evs if isinstance(e, Completion)}


def run(t: ZmqTransport, *cmds: Command, timeout: float = 5.0) -> dict[int, Completion]:
    t.submit(cmds)
    evs = collect(t, done({c.tag for c in cmds}), timeout)
    return {e.tag: e for e in evs if isinstance(e, Completion)}


def drain(t: ZmqTransport, qid: int, want: int, tag0: int, timeout: float = 5.0) -> dict[int, bytes]:
    """DQAP ``qid`` until ``want`` replies came back (bounded by ``timeout``); psmid -> reply."""
    replies: dict[int, bytes] = {}
    tag = tag0
    deadline = time.monotonic() + timeout
    while len(replies) < want:
        assert time.monotonic() < deadline, f"only {len(replies)} of {want} replies within {timeout} s"
        res = run(t, Command(tag, Instr.DQAP, qid))[tag].result
        tag += 1
        if res.status.rc == RC.NORMAL:
            replies[res.psmid] = res.reply
        else:
            assert res.status.rc == NO_PENDING_REPLY, res
            assert t.poll(0.005) == []  # a bounded wait for the engines; nothing else is in flight
    return replies


def test_handshake_lists_qids_and_tapq_reads_hwinfo(transport: ZmqTransport) -> None:
    assert transport.qids() == [Q00, Q01, Q10, Q11]
    assert transport.supports_interrupts
    res = run(transport, Command(1, Instr.TAPQ, Q00, flag=True))[1].result
    assert res.status.rc == RC.NORMAL and res.hwinfo is not None
    assert res.hwinfo.slots == 8 and res.hwinfo.mode == "accel"
    assert run(transport, Command(2, Instr.TAPQ, Q00, flag=False))[2].result.hwinfo is None
    assert transport.outstanding() == []


def test_rsa_mex_and_crt_results_are_real(transport: ZmqTransport) -> None:
    k = rsa_key(1024)
    data = [0x1234567, k.n - 2, 42]
    cmds = [
        Command(10 + i, Instr.NQAP, Q01, psmid=100 + i, message=build_mex(x, E, k.n))
        for i, x in enumerate(data)
    ]
    cmds.append(
        Command(20, Instr.NQAP, Q01, psmid=200, message=build_crt(data[0], k.p, k.q, k.dp, k.dq, k.qinv))
    )
    for c in run(transport, *cmds).values():
        assert c.result.status.rc == RC.NORMAL
    replies = drain(transport, Q01, 4, tag0=30)
    for i, x in enumerate(data):
        r = parse_reply(replies[100 + i])
        assert r.kind == "ok" and int.from_bytes(r.result, "big") == pow(x, E, k.n)
    assert int.from_bytes(parse_reply(replies[200]).result, "big") == pow(data[0], k.d, k.n)


def test_pipelining_fills_every_slot(zmq_server: ServerProcess) -> None:
    """Eight NQAPs in flight at once (one submit, no waiting); the ninth finds the queue full.  Without
    read-ahead: with it, the server takes finished replies off the card with the NQAPs' answers,
    which frees their slots (see test_readahead_*)."""
    transport = open_transport(zmq_server.data, timeout=2.0, domains=[0, 1], readahead=False)
    assert isinstance(transport, ZmqTransport)
    try:
        _pipelining_fills_every_slot(transport)
    finally:
        transport.close()


def _pipelining_fills_every_slot(transport: ZmqTransport) -> None:
    assert transport.welcome is not None and transport.welcome.version == 1
    k = rsa_key(1024)
    cmds = [
        Command(100 + i, Instr.NQAP, Q10, psmid=1000 + i, message=build_mex(i + 2, E, k.n)) for i in range(8)
    ]
    transport.submit(cmds)
    assert len(transport.outstanding()) == 8
    comps = {e.tag: e for e in collect(transport, done({c.tag for c in cmds})) if isinstance(e, Completion)}
    assert all(comps[c.tag].result.status.rc == RC.NORMAL for c in cmds)
    full = run(transport, Command(200, Instr.NQAP, Q10, psmid=2000, message=build_mex(3, E, k.n)))[200]
    assert full.result.status.rc == RC.Q_FULL
    replies = drain(transport, Q10, 8, tag0=300)
    assert {p: int.from_bytes(parse_reply(r).result, "big") for p, r in replies.items()} == {
        1000 + i: pow(i + 2, E, k.n) for i in range(8)
    }


def test_interrupts_are_delivered_and_notify_fires(transport: ZmqTransport) -> None:
    fired = threading.Event()
    transport.set_notify(fired.set)
    aqic = run(transport, Command(1, Instr.AQIC, Q11, flag=True))[1].result
    assert aqic.status.rc == RC.NORMAL and aqic.status.irq_enabled
    fired.clear()
    k = rsa_key(1024)
    transport.submit([Command(2, Instr.NQAP, Q11, psmid=5, message=build_mex(7, E, k.n))])
    evs = collect(transport, lambda evs: Interrupt(Q11) in evs)
    assert fired.is_set()
    assert {e.tag for e in evs if isinstance(e, Completion)} == {2}
    assert drain(transport, Q11, 1, tag0=3)
    off = run(transport, Command(9, Instr.AQIC, Q11, flag=False))[9].result
    assert not off.status.irq_enabled


def test_rapq_discards_held_work(transport: ZmqTransport) -> None:
    k = rsa_key(1024)
    run(
        transport,
        *(Command(i, Instr.NQAP, Q00, psmid=50 + i, message=build_mex(5, E, k.n)) for i in range(3)),
    )
    assert run(transport, Command(10, Instr.RAPQ, Q00))[10].result.status.rc == RC.NORMAL
    tag = 11
    while True:  # wait out the reset (5 ms on the small profile) without sleeping
        res = run(transport, Command(tag, Instr.TAPQ, Q00, flag=True))[tag].result
        tag += 1
        if res.status.rc != RC.RESET_IN_PROGRESS:
            break
    assert res.status.rc == RC.NORMAL and res.status.queue_empty
    assert run(transport, Command(tag, Instr.DQAP, Q00))[tag].result.status.rc == NO_PENDING_REPLY


def test_domain_isolation_through_the_transport(zmq_server: ServerProcess, control: ControlClient) -> None:
    with open_transport(zmq_server.data, domains=[1]) as t:
        assert t.qids() == [Q01, Q11]
        k = rsa_key(1024)
        res = run(t, Command(1, Instr.NQAP, Q00, psmid=0xD0D0, message=build_mex(2, E, k.n)))[1].result
        assert res.status.rc == RC.Q_NOT_AVAIL
        for instr in (Instr.DQAP, Instr.TAPQ, Instr.AQIC, Instr.RAPQ, Instr.ZAPQ):
            assert run(t, Command(2, instr, Q10, flag=True))[2].result.status.rc == RC.Q_NOT_AVAIL
    assert control.execution_log(psmid=0xD0D0) == []


def test_dropped_and_corrupted_answers_end_their_tag(transport: ZmqTransport, control: ControlClient) -> None:
    transport.timeout = 0.3  # the reply deadline of later commands
    control.drop_frames(1)
    transport.submit([Command(1, Instr.TAPQ, Q00)])
    evs = collect(transport, lambda evs: any(isinstance(e, TransportLost) for e in evs))
    lost = next(e for e in evs if isinstance(e, TransportLost))
    assert lost.tags == (1,) and not lost.permanent and lost.qids == (Q00,)
    assert transport.outstanding() == []
    control.corrupt_frames(1)
    transport.submit([Command(2, Instr.TAPQ, Q00)])
    evs = collect(transport, lambda evs: any(isinstance(e, TransportLost) for e in evs))
    assert [e.tags for e in evs if isinstance(e, TransportLost)] == [(2,)]
    assert transport.counters["corrupt_rx"] == 1
    assert run(transport, Command(3, Instr.TAPQ, Q00))[3].result.status.rc == RC.NORMAL
    assert control.transport_faults() == {"drop": 0, "corrupt": 0, "disconnect": 0}


def test_disconnect_fault_reconnects(transport: ZmqTransport, control: ControlClient) -> None:
    assert control.disconnect() >= 1
    evs = collect(transport, lambda evs: any(isinstance(e, TransportLost) for e in evs))
    lost = next(e for e in evs if isinstance(e, TransportLost))
    assert not lost.permanent and lost.tags == ()
    # commands submitted while the link is down are held, then sent after the new handshake
    assert run(transport, Command(1, Instr.TAPQ, Q00))[1].result.status.rc == RC.NORMAL
    assert transport.counters["reconnects"] == 1


def test_machine_failure_from_the_control_plane(transport: ZmqTransport, control: ControlClient) -> None:
    """Slow engines keep three requests held; the card fails with them: two had started, one had not."""
    k = rsa_key(1024)
    control.slow_engines(1, 1000.0)  # 300 us -> 0.3 s: nothing completes before the failure
    fault = control.machine_failure(1, recovery_time=0.3, after_requests=3)
    assert fault["type"] == "MachineFailure" and fault["card"] == 1
    cmds = [Command(i, Instr.NQAP, Q10, psmid=700 + i, message=build_mex(9, E, k.n)) for i in range(3)]
    assert all(c.result.status.rc == RC.NORMAL for c in run(transport, *cmds).values())
    busy = run(transport, Command(5, Instr.NQAP, Q10, psmid=799, message=build_mex(9, E, k.n)))[5]
    assert busy.result.status.rc == RC.BUSY  # recovering: BUSY on all but DQAP
    replies = drain(transport, Q10, 3, tag0=10)
    states = {p: parse_reply(r).mf_state for p, r in replies.items()}
    assert sorted(s.name for s in states.values() if s is not None) == [
        "IN_PROCESS",
        "IN_PROCESS",
        "REQUEST_PENDING",
    ]
    outcomes = {e["psmid"]: e["outcome"] for e in control.execution_log() if 700 <= e["psmid"] < 800}
    expect = {"IN_PROCESS": "in-process-failed", "REQUEST_PENDING": "pending-failed"}
    assert outcomes == {p: expect[s.name] for p, s in states.items() if s is not None}


def test_close_is_idempotent_and_submit_after_close_raises(zmq_server: ServerProcess) -> None:
    t = open_transport(zmq_server.data)
    t.close()
    t.close()
    assert t.poll(0.1) == []
    with pytest.raises(TransportClosed):
        t.submit([Command(1, Instr.TAPQ, Q00)])


def test_open_fails_fast_without_a_server() -> None:
    with pytest.raises(ServerUnreachable):
        open_transport("tcp://127.0.0.1:9", timeout=0.3)


def test_round_trip_cost(transport: ZmqTransport) -> None:
    """Measured, not asserted tightly: one NQAP + one DQAP over loopback (printed with -s)."""
    k = rsa_key(1024)
    msg = build_mex(3, E, k.n)
    n, tag = 200, 1
    t0 = time.perf_counter()
    for i in range(n):
        run(transport, Command(tag, Instr.NQAP, Q01, psmid=9000 + i, message=msg))
        run(transport, Command(tag + 1, Instr.DQAP, Q01))
        tag += 2
    per = (time.perf_counter() - t0) / n
    print(f"\nNQAP+DQAP over tcp loopback: {per * 1e6:.0f} us")
    assert per < 0.05


def test_driver_over_tcp_survives_a_machine_failure(
    zmq_server: ServerProcess, control: ControlClient
) -> None:
    """The public client on this transport: real results, and a card failure mid-run costs no request."""
    import apcrypto

    k = rsa_key(1024)
    with apcrypto.connect(zmq_server.data) as client:
        control.machine_failure(0, recovery_time=0.2, after_requests=5)
        futures = [client.mod_expo(i + 2, E, k.n) for i in range(60)]
        results = [f.result(timeout=20) for f in futures]
    assert results == [pow(i + 2, E, k.n).to_bytes(128, "big") for i in range(60)]
    card0 = {
        e["outcome"] for e in control.execution_log() if e["qid"] >> 8 == 0
    }  # only this test fails card 0
    assert card0 & {"in-process-failed", "pending-failed"}


def test_a_server_back_after_the_peer_deadline_is_found_again(
    server_factory: Callable[..., ServerProcess],
) -> None:
    """Past ``peer_deadline`` the server is declared gone (one permanent loss; submits bounce at once,
    never held), but the transport keeps knocking: a server restarted on the same port serves again."""
    srv = server_factory("--profile", "small")
    opts = {"peer_deadline": 0.5, "reconnect_delay": 0.05, "reconnect_delay_max": 0.2}
    with open_transport(srv.data, timeout=1.0, **opts) as t:
        assert isinstance(t, ZmqTransport)
        srv.kill()
        evs = collect(t, lambda evs: any(isinstance(e, TransportLost) and e.permanent for e in evs), 5)
        assert t.state == "gone" and not any(isinstance(e, PeerRestored) for e in evs)
        t.submit([Command(1, Instr.TAPQ, Q00)])
        (bounced,) = collect(t, bool, 1)
        assert isinstance(bounced, TransportLost) and bounced.permanent and bounced.unsent == (1,)
        time.sleep(0.5)  # well past the deadline: a lost-for-good transport would stop here
        server_factory("--profile", "small", "--bind", srv.data)
        back = collect(t, lambda evs: bool(evs), 5)  # nothing to say until the handshake
        assert [type(e) for e in back] == [PeerRestored] and t.state == "up"
        assert run(t, Command(2, Instr.TAPQ, Q00))[2].result.status.rc == RC.NORMAL
        assert t.counters["peer_gone"] == 1 and t.counters["restored"] == 1
        assert sum(isinstance(e, TransportLost) and e.permanent for e in evs) == 1


def test_backoff_doubles_to_its_cap_with_bounded_jitter() -> None:
    import random

    from apcrypto.transport.framed import Backoff

    plain = Backoff(0.1, 1.0)
    assert [round(plain.next(), 6) for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    plain.reset()
    assert plain.next() == 0.1
    jittered = Backoff(0.1, 1.0, jitter=0.5, rng=random.Random(3))
    pauses = [jittered.next() for _ in range(40)]
    bases = [min(1.0, 0.1 * 2**i) for i in range(40)]
    assert all(b / 2 <= p <= b for p, b in zip(pauses, bases, strict=True))
    assert len({round(p, 9) for p in pauses[5:]}) > 30  # the jitter spreads the capped pauses
    for bad in ({"first": 0.0, "cap": 1.0}, {"first": 0.1, "cap": 1.0, "jitter": 1.0}):
        with pytest.raises(ValueError):
            Backoff(**bad)  # type: ignore[arg-type]


def test_give_up_after_makes_the_loss_final(server_factory: Callable[..., ServerProcess]) -> None:
    """Only a caller who asks for it gets a transport that stops trying."""
    srv = server_factory("--profile", "small")
    opts = {"peer_deadline": 0.3, "give_up_after": 0.8, "reconnect_delay": 0.05, "reconnect_delay_max": 0.1}
    with open_transport(srv.data, timeout=1.0, **opts) as t:
        assert isinstance(t, ZmqTransport)
        srv.kill()
        killed = time.monotonic()
        evs = collect(t, lambda evs: any(isinstance(e, TransportLost) and e.permanent for e in evs), 5)
        assert t.state == "gone"  # past peer_deadline, still knocking
        deadline = time.monotonic() + 5
        while t.state != "lost":
            assert time.monotonic() < deadline, "the transport never gave up"
            evs += t.poll(0.05)
        assert time.monotonic() - killed >= 0.8 - 0.05
        server_factory("--profile", "small", "--bind", srv.data)
        handshakes = t.counters["handshakes"]
        evs += t.poll(0.5)  # several back-off periods: nobody knocks any more
        assert t.state == "lost" and t.counters["handshakes"] == handshakes
        assert not any(isinstance(e, PeerRestored) for e in evs)
        t.submit([Command(1, Instr.TAPQ, Q00)])
        (bounced,) = collect(t, bool, 1)
        assert isinstance(bounced, TransportLost) and bounced.permanent and bounced.unsent == (1,)


def test_a_submit_while_the_io_thread_sleeps_leaves_on_the_submitting_thread(
    zmq_server: ServerProcess,
) -> None:
    """The I/O thread asleep in its poll is not woken to send: the submit sends, under the I/O lock."""
    with open_transport(zmq_server.data, domains=[0], heartbeat=5.0, timeout=10.0) as t:
        assert isinstance(t, ZmqTransport)
        for tag in range(1, 21):
            deadline = time.monotonic() + 5
            while not t._io_asleep or t._io_lock.locked():  # the I/O thread back asleep in its poll
                assert time.monotonic() < deadline, "the I/O thread never went to sleep"
                time.sleep(0.001)
            sent = t.counters["sent"]
            t.submit([Command(tag, Instr.TAPQ, Q00)])
            assert t.counters["sent"] == sent + 1  # on the wire before submit() returned
            evs = collect(t, done({tag}))
            assert [e.tag for e in evs if isinstance(e, Completion)] == [tag]
        assert t.counters["direct_sends"] >= 1
        assert t.outstanding() == []


def test_submitting_threads_and_the_io_thread_share_the_socket_without_losing_an_answer(
    zmq_server: ServerProcess,
) -> None:
    """Four threads submit while answers stream in (each send may take the socket's signal of an
    answer that came meanwhile): every tag is answered exactly once, none waits out a timer (the
    heartbeat and the reply deadline are long: a missed wake-up would stall for a second)."""
    per_thread, threads = 150, 4
    qids = [Q00, Q01]
    with open_transport(zmq_server.data, domains=[0], heartbeat=5.0, timeout=30.0) as t:
        assert isinstance(t, ZmqTransport)

        def submitter(base: int) -> None:
            for i in range(per_thread):
                if i % 10 == 0:  # now and then a quiet link: the I/O thread asleep, nothing in flight
                    deadline = time.monotonic() + 2.0
                    while t._inflight and time.monotonic() < deadline:
                        time.sleep(0.0002)
                t.submit([Command(base + i, Instr.TAPQ, qids[i % 2])])

        workers = [threading.Thread(target=submitter, args=(1 + k * 1000,)) for k in range(threads)]
        started = time.monotonic()
        for w in workers:
            w.start()
        tags = {1 + k * 1000 + i for k in range(threads) for i in range(per_thread)}
        evs = collect(t, done(tags), timeout=20.0)
        for w in workers:
            w.join(10)
        answered = [e.tag for e in evs if isinstance(e, Completion)]
        assert sorted(answered) == sorted(tags)  # each exactly once
        assert not [e for e in evs if isinstance(e, TransportLost)]
        assert t.poll(0.05) == [] and t.outstanding() == []
        assert t.counters["direct_sends"] > 0
        assert time.monotonic() - started < 10.0


def test_a_send_can_take_the_signal_of_a_message_waiting_to_be_read() -> None:
    """Why the I/O loop and a submitting thread ask the socket (``EVENTS``) before anyone sleeps: a
    ZeroMQ socket's descriptor signals news once, and a send after the command throttle (~1 ms)
    consumes it -- with the message still unread.  A poll on the descriptor alone would sleep."""
    import select

    import zmq

    ctx = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    try:
        port = router.bind_to_random_port("tcp://127.0.0.1")
        dealer.connect(f"tcp://127.0.0.1:{port}")
        dealer.send(b"hello")
        ident, _ = router.recv_multipart()
        with pytest.raises(zmq.Again):
            dealer.recv(zmq.NOBLOCK)  # read dry: the next message will be signalled
        fd = select.poll()
        fd.register(dealer.getsockopt(zmq.FD), select.POLLIN)
        router.send_multipart([ident, b"answer"])
        deadline = time.monotonic() + 5
        while not fd.poll(0):
            assert time.monotonic() < deadline, "the answer was never signalled"
            time.sleep(0.001)
        time.sleep(0.01)  # past the throttle: the next send processes the socket's commands
        dealer.send(b"another request")
        assert fd.poll(0) == []  # the signal is gone ...
        assert dealer.getsockopt(zmq.EVENTS) & zmq.POLLIN  # ... and the answer still waits
        assert dealer.recv(zmq.NOBLOCK) == b"answer"
    finally:
        dealer.close(0)
        router.close(0)
        ctx.term()
