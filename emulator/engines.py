"""Where a card's engines compute: outside the emulator's lock and, with worker processes, its GIL.

The emulator (:mod:`emulator.core`) decides *when* a message starts and ends on an engine; a backend
here only computes *what* the firmware answers, for the requests whose answer depends on nothing
but their bytes and the static part of the firmware context (:func:`offloaded`: RSA ME and CRT).
State-changing CPRBs, the RNG and injected failures stay inline, in order, in the emulator.

* :class:`ThreadEngines` -- ``workers`` threads per card.  The math releases the GIL (OpenSSL
  through cffi always; gmpy2 with ``allow_release_gil``, set in each worker thread), so two cores
  compute; the firmware's Python around the math still takes turns on the GIL.  A computation
  that raises (the firmware answers bad input; this is a library failing) fails the card.
* :class:`ProcessEngines` -- ``workers`` worker processes per card (``python -m
  firmware_stubs.worker``), started when the card first computes.  Parsing, checks and math all
  run there.  A worker that dies (killed, crashed) is reported through ``on_lost(card)``, which the
  emulator turns into a machine failure of that card: its held messages get the firmware's
  machine-failure replies (in-process / request-pending) instead of waiting forever.  Workers end
  with :meth:`close`, with the emulator being collected, and by themselves when the emulator's
  process dies (end of input and a parent watchdog in the worker).

Both call ``on_done([(token, FirmwareResult), ...])`` from their own thread, without any lock held
(a process backend's reader hands over every result already waiting in the pipe at once, so a burst
costs the emulator one lock and one interrupt flush); the emulator takes its lock there and drops a
result whose engine was reset or failed meanwhile.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import queue
import subprocess
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any, Protocol

from firmware_stubs import FirmwareContext, FirmwareResult, execute
from firmware_stubs.arithmetic import prepare_thread
from firmware_stubs.worker import FrameReader, frame, write_all

__all__ = ["EngineBackend", "ProcessEngines", "ThreadEngines", "make_engines", "offloaded"]

log = logging.getLogger(__name__)

Done = Callable[[list[tuple[Any, FirmwareResult]]], None]
Lost = Callable[[int], None]

#: Most jobs one worker process holds.  Its results then fit in a pipe's buffer (64 KiB on Linux;
#: a reply is at most ~520 bytes), so a worker never blocks writing while the emulator, holding
#: its lock, blocks writing it a job: no deadlock whatever a profile's engine count.  Past it a
#: card computes inline.
MAX_OUTSTANDING = 64
#: How a worker process is started (a list, no shell).
WORKER_COMMAND = [sys.executable, "-m", "firmware_stubs.worker"]
#: Seconds :meth:`ProcessEngines.close` waits for a worker to end by itself before killing it.
CLOSE_GRACE = 2.0


def offloaded(function: str) -> bool:
    """Whether a request of this op class may be computed away from the emulator: RSA only, whose
    answer is a pure function of the request bytes and the static context."""
    return function.startswith(("MEX_", "CRT_"))


class EngineBackend(Protocol):
    name: str

    def submit(self, card: int, token: Any, request: bytes, ctx: FirmwareContext) -> bool:
        """Take the job (True: ``on_done`` will follow, or ``on_lost`` for the card), or refuse it
        (False: closed, or no worker could be started): the caller then computes it inline."""
        ...

    def close(self) -> None: ...


class ThreadEngines:
    """``workers`` threads per card, started on the card's first job."""

    name = "threads"

    def __init__(self, workers: int, on_done: Done, on_lost: Lost) -> None:
        self._workers = workers
        self._on_done = on_done
        self._on_lost = on_lost
        self.lost = 0  # jobs whose computation raised (each a machine failure of its card)
        self._queues: dict[int, queue.SimpleQueue[Any]] = {}
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, card: int, token: Any, request: bytes, ctx: FirmwareContext) -> bool:
        q = self._queues.get(card)
        if q is None:
            with self._lock:
                if self._closed:
                    return False
                q = self._queues.get(card)
                if q is None:
                    q = self._queues[card] = queue.SimpleQueue()
                    for i in range(self._workers):
                        t = threading.Thread(
                            target=self._run, args=(card, q), name=f"engines-card{card}-{i}", daemon=True
                        )
                        t.start()
                        self._threads.append(t)
        q.put((token, request, ctx))
        return True

    def _run(self, card: int, q: queue.SimpleQueue[Any]) -> None:
        prepare_thread()
        while True:
            job = q.get()
            if job is None:
                return
            token, request, ctx = job
            try:
                result = execute(request, ctx)
            except Exception:  # the firmware never raises for input: this is the engine failing
                log.exception("engine thread of card %d failed: machine failure", card)
                self.lost += 1
                self._on_lost(card)
                continue
            self._on_done([(token, result)])

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for q in self._queues.values():
                for _ in range(self._workers):
                    q.put(None)
            threads = list(self._threads)
        for t in threads:
            if t is not threading.current_thread():
                t.join(CLOSE_GRACE)


def _static(ctx: FirmwareContext) -> tuple[int, int, str, str, str]:
    """What a worker needs of a context: everything but the store and the RNG (RSA reads neither)."""
    return ctx.domain, ctx.max_mod_bytes, ctx.mode, ctx.compute, ctx.arithmetic


class _Worker:
    """One worker process and the thread that reads its results."""

    __slots__ = ("card", "dead", "jobs", "proc", "reader", "recv", "send", "send_lock", "send_open")

    def __init__(self, card: int) -> None:
        self.card = card
        self.proc = subprocess.Popen(
            WORKER_COMMAND,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        # Raw fds (copies; the file objects Popen made are closed at once): frames, see worker.py.
        self.send = os.dup(self.proc.stdin.fileno())
        self.recv = FrameReader(os.dup(self.proc.stdout.fileno()))
        self.proc.stdin.close()
        self.proc.stdout.close()
        self.send_open = True
        self.send_lock = threading.Lock()  # closing the job pipe happens once, from either side
        self.jobs: dict[int, Any] = {}
        self.dead = False
        self.reader: threading.Thread | None = None

    def close_send(self) -> None:
        """End the worker's input (it then exits); once, whoever calls first."""
        with self.send_lock:
            if self.send_open:
                self.send_open = False
                with contextlib.suppress(OSError):
                    os.close(self.send)


def _stop_workers(workers: list[_Worker]) -> None:
    """Close every worker's input, wait a little, then kill; reap all.  Used by close and by the
    finaliser of a backend nobody closed."""
    for w in workers:
        w.close_send()
    for w in workers:
        try:
            w.proc.wait(CLOSE_GRACE)
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.proc.wait()


class ProcessEngines:
    """``workers`` worker processes per card; see the module docstring."""

    name = "processes"

    def __init__(self, workers: int, on_done: Done, on_lost: Lost) -> None:
        self._workers = workers
        self._on_done = on_done
        self._on_lost = on_lost
        self._pools: dict[int, list[_Worker]] = {}
        self._all: list[_Worker] = []
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._closing = False
        self.lost = 0  # workers that died while in service
        self._finalizer = weakref.finalize(self, _stop_workers, self._all)

    def pids(self, card: int) -> list[int]:
        """Process ids of the card's live workers (for tests and operators)."""
        with self._lock:
            return [w.proc.pid for w in self._pools.get(card, []) if not w.dead]

    def submit(self, card: int, token: Any, request: bytes, ctx: FirmwareContext) -> bool:
        with self._lock:
            if self._closing:
                return False
            pool = self._pools.setdefault(card, [])
            try:
                while len(pool) < self._workers:
                    pool.append(self._spawn(card))
            except OSError:
                log.exception("cannot start an engine worker for card %d: computing inline", card)
                if not pool:
                    return False
            w = min(pool, key=lambda w: len(w.jobs))
            if len(w.jobs) >= MAX_OUTSTANDING:
                return False  # computed inline: see MAX_OUTSTANDING
            job_id = next(self._ids)
            w.jobs[job_id] = token
        try:
            with w.send_lock:  # never a write to an fd number the reader closed and the OS reused
                if w.send_open:
                    write_all(w.send, frame((job_id, request, *_static(ctx))))
        except OSError:
            # The worker is gone; its reader sees end of input and reports the card lost, which
            # fails this message with the rest of the card's (it is on an engine: in-process).
            with self._lock:
                w.dead = True
                if w in pool:
                    pool.remove(w)
        return True

    def _spawn(self, card: int) -> _Worker:
        w = _Worker(card)
        w.reader = threading.Thread(target=self._read, args=(w,), name=f"worker-card{card}", daemon=True)
        self._all.append(w)
        w.reader.start()
        return w

    def _read(self, w: _Worker) -> None:
        on_done, read = self._on_done, w.recv.read
        while True:
            try:
                results = read()  # everything the worker has written so far: one read
            except (EOFError, OSError, ValueError):
                break
            with self._lock:
                done = [
                    (w.jobs.pop(job_id), FirmwareResult(reply, function, ok, code, effect))
                    for job_id, reply, function, ok, code, effect in results
                    if job_id in w.jobs
                ]
            if done:
                on_done(done)
        with self._lock:
            w.dead = True
            pool = self._pools.get(w.card, [])
            if w in pool:
                pool.remove(w)
            w.jobs.clear()
            closing = self._closing
        os.close(w.recv.fd)
        if not closing:
            # Gone, or talking nonsense (a frame over the bound): either way it serves no more.
            w.proc.kill()
            code = w.proc.wait()
            with self._lock:
                if w in self._all:
                    self._all.remove(w)
                self.lost += 1
            w.close_send()
            log.warning(
                "engine worker %d of card %d ended (exit %s): machine failure", w.proc.pid, w.card, code
            )
            self._on_lost(w.card)

    def close(self) -> None:
        """Stop every worker (input closed, then killed after :data:`CLOSE_GRACE`) and reap it."""
        with self._lock:
            self._closing = True
            workers = list(self._all)
        self._finalizer.detach()
        _stop_workers(workers)
        for w in workers:
            if w.reader is not None and w.reader is not threading.current_thread():
                w.reader.join(CLOSE_GRACE)


def make_engines(backend: str, workers: int, on_done: Done, on_lost: Lost) -> EngineBackend | None:
    """The backend a profile names (``execution.backend``); None for ``inline``."""
    if backend == "threads":
        return ThreadEngines(workers, on_done, on_lost)
    if backend == "processes":
        return ProcessEngines(workers, on_done, on_lost)
    if backend == "inline":
        return None
    raise ValueError(f"unknown engine backend {backend!r}")
