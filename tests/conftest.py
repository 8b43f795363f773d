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
