"""The seam between the control plane and the card model (issue 8 §2): each acts on the other only
through a small interface (emulator.control.FaultTarget / AcceptHooks), never through private names."""

from __future__ import annotations

import ast
import random
import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from apformats.results import qid_of
from emulator.clock import VirtualClock
from emulator.control import ControlPlane
from emulator.lifecycle import CardEvent

ROOT = Path(__file__).resolve().parent.parent


def private_uses(path: Path, receivers: set[str]) -> list[str]:
    """``receiver._name`` and ``receiver.attr._name`` accesses in ``path`` for the given receiver names."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            names = []
            while isinstance(base, ast.Attribute):
                names.append(base.attr)
                base = base.value
            if isinstance(base, ast.Name):
                names.append(base.id)
            if receivers & set(names):
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_neither_side_reaches_into_the_other() -> None:
    assert private_uses(ROOT / "emulator" / "control.py", {"emu", "_emu"}) == []
    assert private_uses(ROOT / "emulator" / "core.py", {"control"}) == []


class FakeTarget:
    """A FaultTarget that records what the control plane asked of it (no card model at all)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.clock = VirtualClock()
        self.profile = SimpleNamespace(name="fake", timing=SimpleNamespace(recovery_time=0.5))
        queue = SimpleNamespace(qid=qid_of(1, 2))
        self.card = SimpleNamespace(id=1, accepted=0, queues={2: queue}, on_revive=[])
        self.calls: list[tuple[Any, ...]] = []
        self.ends: list[Callable[[], None]] = []

    def find_card(self, card_id: int) -> Any:
        return self.card if card_id == 1 else None

    def fault_card_event(self, card: Any, event: CardEvent, **kw: Any) -> bool:
        self.calls.append(("event", card.id, event, kw.get("recovery_time")))
        if "on_end" in kw:
            self.ends.append(kw["on_end"])
        return True

    def fault_reset_queue(self, q: Any, duration: float, *, on_end: Callable[[], None]) -> None:
        self.calls.append(("reset", q.qid, duration))
        self.ends.append(on_end)

    def fault_end_reset(self, q: Any) -> None:
        self.calls.append(("end_reset", q.qid))

    def fault_busy(self, q: Any, duration: float, *, on_end: Callable[[], None]) -> Callable[[], None]:
        self.calls.append(("busy", q.qid, duration))
        self.ends.append(on_end)
        return lambda: self.calls.append(("busy_over", q.qid))

    def fault_slow_engines(
        self, card: Any, factor: float, duration: float | None, *, on_end: Callable[[], None]
    ) -> Callable[[], None]:
        self.calls.append(("slow", card.id, factor, duration))
        return lambda: self.calls.append(("slow_over", card.id))

    def flush_interrupts(self) -> None:
        self.calls.append(("flush",))


def test_the_control_plane_works_on_any_fault_target() -> None:
    target = FakeTarget()
    control = ControlPlane(target, random.Random(1))
    q = qid_of(1, 2)
    busy = control.busy(q, 2.0)
    control.machine_failure(1, at=3.0)
    control.slow_engines(1, 4.0)
    assert target.calls == [("busy", q, 2.0), ("slow", 1, 4.0, None)]
    target.clock.run_until(3.0)
    assert target.calls[-2:] == [("event", 1, CardEvent.MACHINE_FAILURE, 0.5), ("flush",)]
    target.ends[0]()  # the card model says the busy period is over
    assert control.state(busy) == "done"
    control.clear()
    assert ("slow_over", 1) in target.calls and ("event", 1, CardEvent.RECOVERY_DONE, None) in target.calls
    with pytest.raises(ValueError, match="no card 0 in profile 'fake'"):
        control.checkstop(0)
