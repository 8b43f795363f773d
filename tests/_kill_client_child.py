"""The client process the journal kill tests SIGKILL (tests/test_kill_client.py): a mixed workload
over ``tcp://`` with ``journal=``, as fast as the server takes it, until it is killed.

Usage: ``python tests/_kill_client_child.py URL JOURNAL PSMID_HI SEED OPERANDS CALLER_LOG``.

It prints ``READY`` once its queues are in service.  Its caller's view goes to ``CALLER_LOG``, one
line per event written with ``os.write`` (in the kernel when it returns: a SIGKILL loses none):
``sub FUNCTION`` before each submission, ``done FUNCTION OUTCOME JOURNAL_ID`` when a future ends
(written in the future's callback, on the runner thread, before the journal commits the request's
removal).
It exits by itself after 30 s (a bound, should nobody kill it).
"""

from __future__ import annotations

import os
import random
import sys
import threading
import time
from concurrent.futures import Future
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import apcrypto  # noqa: E402
from apcrypto.testing import seeded_key  # noqa: E402

KEY = seeded_key(1024, "kill-client")
OUTSTANDING = 120  # the most requests in flight at once


def main() -> int:
    url, journal, hi, seed, operands, caller_log = sys.argv[1:7]
    rng = random.Random(int(seed))
    fd = os.open(caller_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def note(line: str) -> None:
        os.write(fd, (line + "\n").encode())

    client = apcrypto.connect(
        url,
        config="fast",
        journal=journal,
        journal_operands=operands == "1",
        psmid_base=int(hi, 0) << 32,
        reconnect_delay_max=0.5,
    )
    if not client.wait_ready(15):
        return 3
    room = threading.Semaphore(OUTSTANDING)

    def submit(function: str, make: Any) -> None:
        room.acquire()
        note(f"sub {function}")
        fut: Future[Any] = make()

        def done(f: Future[Any], function: str = function) -> None:
            exc = f.exception()
            outcome = "completed" if exc is None else type(exc).__name__
            note(f"done {function} {outcome} {getattr(f, 'journal_id', 0)}")
            room.release()

        fut.add_done_callback(done)

    print("READY", flush=True)
    end = time.monotonic() + 30.0
    while time.monotonic() < end:
        pick = rng.random()
        if pick < 0.45:
            m = rng.randrange(2, KEY.n - 1)
            submit("MEX_1K", lambda m=m: client.mod_expo(m, KEY.e, KEY.n))
        elif pick < 0.85:
            submit("CPRB:CI", lambda: client.counter_increment(1))
        else:
            slot, key = rng.randrange(16), rng.randbytes(32)
            submit("CPRB:KS", lambda s=slot, k=key: client.key_store(s, k))
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
