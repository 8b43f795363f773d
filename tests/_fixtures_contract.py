"""One adapter, three ways in: the contract suite's fixture (python-can's back2back idea).

``adapter`` is parametrised over ``emu`` (in process), ``tcp`` (a real ``python -m emulator serve``
process) and ``usb`` (real pyusb over the emulator's software backend).  Each gives the same
handles: ``connect(**options)`` for a client, ``control`` (the emulator's control plane, in process
or over ZeroMQ, with the same method names) and ``executions()`` (the execution log as objects with
``psmid``, ``qid``, ``started``, ``outcome``), so a scenario is written once and must give the same
outcomes on every transport.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import apcrypto
from emulator import Emulator
from emulator.usb_backend import EmulatorUsbBackend, VirtualBus
from tests._fixtures_zmq import ServerProcess, start_server
from tests._leaks import SHARED_CHILDREN

PROFILE = "default"  # 2 CEX8A accelerators (cards 0, 1) + 2 CEX8C coprocessors (cards 2, 3)
TRANSPORTS = ["emu", "tcp", "usb"]


@dataclass
class Adapter:
    kind: str
    url: str
    control: Any
    executions_fn: Callable[[], list[Any]]
    options: dict[str, Any] = field(default_factory=dict)
    clients: list[apcrypto.Client] = field(default_factory=list)

    def connect(self, **options: Any) -> apcrypto.Client:
        opts = {"config": "fast", **self.options, **options}
        client = apcrypto.connect(self.url, **opts)
        self.clients.append(client)
        assert client.wait_ready(10.0), f"{self.kind}: queues did not come up"
        return client

    def executions(self) -> list[Any]:
        return self.executions_fn()

    def close(self) -> None:
        for c in self.clients:
            c.close(timeout=10.0)
        self.clients.clear()


@pytest.fixture(scope="module")
def tcp_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    # one client at a time, seeing every APQN as the emu: and usb: adapters do (same outcomes everywhere)
    srv = start_server(
        "--profile",
        PROFILE,
        "--seed",
        "11",
        "--default-grant",
        "all",
        log_dir=tmp_path_factory.mktemp("contract"),
    )
    SHARED_CHILDREN.add(srv.proc.pid)
    try:
        yield srv
    finally:
        SHARED_CHILDREN.discard(srv.proc.pid)
        if srv.proc.stdout is not None:
            srv.proc.stdout.close()
        srv.stop()


def _as_objects(rows: list[dict[str, Any]]) -> list[Any]:
    return [SimpleNamespace(**r) for r in rows]


@pytest.fixture(params=TRANSPORTS)
def adapter(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Adapter]:
    kind = request.param
    if kind == "tcp":
        srv: ServerProcess = request.getfixturevalue("tcp_server")
        ctl = srv.control_client()
        ctl.clear()
        for card in (0, 1, 2, 3):
            ctl.restore(card)
        ad = Adapter(kind, srv.data, ctl, lambda: _as_objects(ctl.execution_log()))
        try:
            yield ad
        finally:
            ad.close()
            ctl.clear()
            srv.clients.remove(ctl)
            ctl.close()
        return
    emu = Emulator(PROFILE, clock="wall", seed=11)
    bus = None
    try:
        if kind == "emu":
            ad = Adapter(kind, "emu:", emu.control, emu.execution_log.entries, {"emulator": emu})
        else:
            bus = VirtualBus()
            bus.plug(emu)
            ad = Adapter(
                kind,
                "usb://1209:0a70",
                emu.control,
                emu.execution_log.entries,
                {"backend": EmulatorUsbBackend(bus)},
            )
        yield ad
        ad.close()
    finally:
        if bus is not None:
            bus.clear()
        emu.close()


def wait_until(pred: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Bounded poll for a condition a real server or device reaches on its own time."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)
