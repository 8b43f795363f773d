"""A firmware worker process: requests in on stdin, replies out on stdout, nothing else.

``python -m firmware_stubs.worker`` is what :class:`emulator.engines.ProcessEngines` starts for a
card's engines, so the Python around the math (parsing, checks, the reply) and the math itself run
outside the emulator's process and its GIL.  It stays pure like the rest of this package: only
requests whose answer depends on nothing but their bytes and the static context are sent here
(RSA; never a CPRB that changes a domain's store or draws from the seeded RNG).

Wire: frames of a u32 big-endian length and a pickle (:func:`frame`, :class:`FrameReader`) on the
two pipes; a job is ``(job_id, request, domain, max_mod_bytes, mode, compute, arithmetic)``, a
result ``(job_id, reply, function, ok, reply_code, effect)``, one result per job, in order.  Only
the parent that started the worker holds the other ends of its pipes (``close_fds``), so both are
trusted and private.  Why not :class:`multiprocessing.connection.Connection`: it spends two reads
per message and a poll to find the next, and these syscalls were most of the parent's cost per
request; a :class:`FrameReader` takes everything waiting in one read.

A worker never outlives its emulator: end of input (the parent closed the pipe, or died) ends it,
and a watchdog thread ends it within :data:`PARENT_POLL` seconds of its parent going away even
while it is computing.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import struct
import sys
import threading
import time
from typing import Any

from firmware_stubs.context import DomainStore, FirmwareContext
from firmware_stubs.dispatch import execute

__all__ = ["MAX_FRAME", "PARENT_POLL", "FrameReader", "frame", "main", "serve", "write_all"]

#: Seconds between the watchdog's looks at the parent process.
PARENT_POLL = 0.2
#: Largest frame either side accepts (a request is at most 12 KiB; this is a bound, not a size).
MAX_FRAME = 1 << 20

_LEN = struct.Struct(">I")


def frame(obj: Any) -> bytes:
    """One frame: length, then the pickle."""
    data = pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)
    return _LEN.pack(len(data)) + data


def write_all(fd: int, data: bytes) -> None:
    """Write every byte (a pipe may take a large frame in parts)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class FrameReader:
    """Frames from a pipe: :meth:`read` blocks until at least one is complete and returns every
    complete one (``EOFError`` at end of input, ``ValueError`` for a frame over the bound)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buf = bytearray()

    def read(self) -> list[Any]:
        while True:
            out = self._parse()
            if out:
                return out
            data = os.read(self.fd, 1 << 16)
            if not data:
                raise EOFError
            self._buf += data

    def _parse(self) -> list[Any]:
        buf, pos, out = self._buf, 0, []
        while len(buf) - pos >= 4:
            (size,) = _LEN.unpack_from(buf, pos)
            if size > MAX_FRAME:
                raise ValueError(f"frame of {size} bytes over the {MAX_FRAME}-byte bound")
            if len(buf) - pos - 4 < size:
                break
            out.append(pickle.loads(buf[pos + 4 : pos + 4 + size]))
            pos += 4 + size
        del buf[:pos]
        return out


def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(PARENT_POLL)
        if os.getppid() != parent:
            os._exit(0)


def serve(jobs: int, results: int) -> None:
    """Answer jobs from fd ``jobs`` on fd ``results`` until end of input, each as soon as it is
    computed.  Contexts are cached per static part (a card has few)."""
    contexts: dict[tuple[int, int, str, str, str], FirmwareContext] = {}
    reader = FrameReader(jobs)
    while True:
        try:
            batch = reader.read()
        except EOFError:
            return
        for job_id, request, domain, max_mod_bytes, mode, compute, arithmetic in batch:
            key = (domain, max_mod_bytes, mode, compute, arithmetic)
            ctx = contexts.get(key)
            if ctx is None:
                # The store and RNG are stand-ins: RSA reads neither (the parent sends nothing else).
                ctx = contexts[key] = FirmwareContext(
                    domain, DomainStore(), random.Random(0), max_mod_bytes, mode, compute, arithmetic
                )
            res = execute(request, ctx)
            write_all(results, frame((job_id, res.reply, res.function, res.ok, res.reply_code, res.effect)))


def main() -> None:
    parent = os.getppid()
    threading.Thread(target=_watch_parent, args=(parent,), name="parent-watch", daemon=True).start()
    out_fd = os.dup(1)
    os.dup2(2, 1)  # a stray print must not corrupt the result stream
    with contextlib.suppress(BrokenPipeError, KeyboardInterrupt):  # the parent is gone or stopping us
        serve(sys.stdin.fileno(), out_fd)


if __name__ == "__main__":
    main()
