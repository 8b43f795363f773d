"""Benchmarks report ratios measured in one run (DESIGN §7); this prints them after the table."""

from __future__ import annotations

from typing import Any

import pytest

RATIOS: dict[str, float] = {}


@pytest.fixture
def record_ratio() -> Any:
    def record(name: str, value: float) -> None:
        RATIOS[name] = value

    return record


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if RATIOS:
        terminalreporter.section("apcrypto ratios (measured in this run)")
        for name, value in RATIOS.items():
            terminalreporter.write_line(f"{name:<58} {value:8.3f}")


@pytest.fixture(scope="module")
def emulator_server() -> Any:
    """A real ``python -m emulator serve`` on the fast profile, on free loopback ports.  One client at
    a time, given every APQN (``--default-grant all``), as the ``emu:`` and ``usb:`` targets are."""
    import selectors
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "emulator", "serve", "--profile", "fast", "--default-grant", "all",
         "--bind", "tcp://127.0.0.1:0", "--control", "tcp://127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        assert sel.select(30), "emulator server did not start"
        line = proc.stdout.readline().split()
    data = dict(f.split("=", 1) for f in line[1:])["data"]
    try:
        yield data
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stdout.close()
