"""Benchmarks report ratios measured in one run (DESIGN §7); this prints them after the table."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

RATIOS: dict[str, float] = {}


def median_s(benchmark: Any, fn: Callable[..., Any], *args: Any, **pedantic: Any) -> tuple[Any, float]:
    """Run ``fn`` under ``benchmark`` (``benchmark.pedantic`` when ``pedantic`` options are given);
    return its result and the median seconds per call.  Under ``--benchmark-disable`` (a quick
    correctness pass: pytest-benchmark then calls ``fn`` once and keeps no stats) the one call's
    own duration stands in, so every bench runs either way."""
    t = time.perf_counter()
    res = benchmark.pedantic(fn, args=args, **pedantic) if pedantic else benchmark(fn, *args)
    elapsed = time.perf_counter() - t
    stats = getattr(benchmark, "stats", None)
    return res, (stats.stats.median if stats is not None else elapsed)


@pytest.fixture
def timed(benchmark: Any) -> Callable[..., tuple[Any, float]]:
    """``timed(fn, *args, **pedantic)`` -> ``(result, median seconds)``: see :func:`median_s`."""
    return lambda fn, *args, **pedantic: median_s(benchmark, fn, *args, **pedantic)


@pytest.fixture
def record_ratio() -> Any:
    def record(name: str, value: float) -> None:
        RATIOS[name] = value

    return record


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if RATIOS:
        terminalreporter.section("apcrypto ratios (measured in this run)")
        width = max(len(name) for name in RATIOS)
        for name, value in RATIOS.items():
            terminalreporter.write_line(f"{name:<{width}} {value:10.3f}")


def start_emulator_server(profile: str, *extra: str) -> tuple[Any, dict[str, str]]:
    """``python -m emulator serve --profile PROFILE --default-grant all`` on free loopback ports, in its
    own process: ``(process, READY fields)`` (``data``, ``control``, ``token_file``).  The caller
    terminates it."""
    import selectors
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "emulator", "serve", "--profile", profile, "--default-grant", "all",
         "--bind", "tcp://127.0.0.1:0", "--control", "tcp://127.0.0.1:0", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(30):
            proc.kill()
            proc.wait(10)
            raise AssertionError("emulator server did not start")
        line = proc.stdout.readline().split()
    return proc, dict(f.split("=", 1) for f in line[1:])


def stop_emulator_server(proc: Any) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    finally:
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.fixture(scope="module")
def server_process() -> Any:
    """``(start_emulator_server, stop_emulator_server)`` for a bench that needs its own server."""
    return start_emulator_server, stop_emulator_server


@pytest.fixture(scope="module")
def emulator_server() -> Any:
    """A real ``python -m emulator serve`` on the ``overhead`` profile (zero service times, echo
    math: the server's engines and gmpy2 are not the limit, so the figure is the software's), on free
    loopback ports.  One client at a time, given every APQN (``--default-grant all``), as the
    ``emu:`` and ``usb:`` targets are."""
    proc, ready = start_emulator_server("overhead")
    try:
        yield ready["data"]
    finally:
        stop_emulator_server(proc)
