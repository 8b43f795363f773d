"""Suite-wide fixtures: autouse leak checks every test runs under.

A test that leaves a thread running or a transport open fails here, not three tests later.  Area
fixtures live in ``tests/_fixtures_<area>.py`` modules imported by the tests that need them, so
parallel work on different areas never edits this file.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from tests._leaks import SHARED_CHILDREN, children, describe_socket, socket_fds


def _live_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.is_alive()}


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves behind a thread it started (runners, pumps, I/O threads)."""
    before = _live_threads()
    yield
    deadline = time.monotonic() + 2.0
    leaked = _live_threads() - before
    while leaked and time.monotonic() < deadline:
        time.sleep(0.01)
        leaked = {t for t in leaked if t.is_alive()}
    assert not leaked, f"test leaked threads: {sorted(t.name for t in leaked)}"


@pytest.fixture(autouse=True)
def no_leaked_sockets_or_processes() -> Iterator[None]:
    """Fail a test that leaves a socket open or a child process (an emulator server) running.

    Function-scoped autouse fixtures are set up after wider-scoped ones, so a module's shared
    server is already in the "before" snapshot; one started lazily registers in SHARED_CHILDREN.
    """
    sockets, kids = socket_fds(), children()
    yield
    deadline = time.monotonic() + 3.0
    while True:
        leaked_s = socket_fds() - sockets
        leaked_k = children() - kids - SHARED_CHILDREN
        if (not leaked_s and not leaked_k) or time.monotonic() > deadline:
            break
        time.sleep(0.02)  # bounded: the kernel may still be tearing a socket down
    assert not leaked_s, f"test leaked sockets: {[(s, describe_socket(s)) for s in sorted(leaked_s)]}"
    assert not leaked_k, f"test leaked child processes: {sorted(leaked_k)}"
