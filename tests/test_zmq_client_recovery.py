"""The public client over tcp:// after the server drops its session: interrupts come back.

A new session holds none of the old one's AQIC registrations.  With the safety poll set to 30 s,
work submitted after the reconnect finishes promptly only if the driver registered interrupts again.
"""

from __future__ import annotations

import concurrent.futures as cf

import apcrypto
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
