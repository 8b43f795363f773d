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
