"""A firmware worker process: requests in on stdin, replies out on stdout, nothing else.

``python -m firmware_stubs.worker`` is what :class:`emulator.engines.ProcessEngines` starts for a
card's engines, so the Python around the math (parsing, checks, the reply) and the math itself run
outside the emulator's process and its GIL.  It stays pure like the rest of this package: only
requests whose answer depends on nothing but their bytes and the static context are sent here
(RSA; never a CPRB that changes a domain's store or draws from the seeded RNG).

Wire: :class:`multiprocessing.connection.Connection` framing (length-prefixed pickles) on the two
pipes; a job is ``(job_id, request, domain, max_mod_bytes, mode, compute, arithmetic)``, a result
``(job_id, reply, function, ok, reply_code, effect)``, one result per job, in order.  Only the
parent that started the worker holds the other ends of its pipes (``close_fds``), so both are
trusted and private.

A worker never outlives its emulator: end of input (the parent closed the pipe, or died) ends it,
and a watchdog thread ends it within :data:`PARENT_POLL` seconds of its parent going away even
while it is computing.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
import threading
import time
from multiprocessing.connection import Connection

from firmware_stubs.context import DomainStore, FirmwareContext
from firmware_stubs.dispatch import execute

__all__ = ["PARENT_POLL", "main", "serve"]

#: Seconds between the watchdog's looks at the parent process.
PARENT_POLL = 0.2


def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(PARENT_POLL)
        if os.getppid() != parent:
            os._exit(0)


def serve(jobs: Connection, results: Connection) -> None:
    """Answer jobs until end of input.  Contexts are cached per static part (a card has few)."""
    contexts: dict[tuple[int, int, str, str, str], FirmwareContext] = {}
    while True:
        try:
            job_id, request, domain, max_mod_bytes, mode, compute, arithmetic = jobs.recv()
        except EOFError:
            return
        key = (domain, max_mod_bytes, mode, compute, arithmetic)
        ctx = contexts.get(key)
        if ctx is None:
            # The store and RNG are stand-ins: RSA reads neither (the parent sends nothing else).
            ctx = contexts[key] = FirmwareContext(
                domain, DomainStore(), random.Random(0), max_mod_bytes, mode, compute, arithmetic
            )
        res = execute(request, ctx)
        results.send((job_id, res.reply, res.function, res.ok, res.reply_code, res.effect))


def main() -> None:
    parent = os.getppid()
    threading.Thread(target=_watch_parent, args=(parent,), name="parent-watch", daemon=True).start()
    out_fd = os.dup(1)
    os.dup2(2, 1)  # a stray print must not corrupt the result stream
    jobs = Connection(sys.stdin.fileno(), writable=False)
    results = Connection(out_fd, readable=False)
    with contextlib.suppress(BrokenPipeError, KeyboardInterrupt):  # the parent is gone or stopping us
        serve(jobs, results)


if __name__ == "__main__":
    main()
