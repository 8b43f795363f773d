"""The driver core is built by composition, each piece referring only to the pieces below it.

``DriverCore`` (driver.py) owns the queue machine (machine.py), which uses the verdicts
(verdicts.py), which use the dispatcher (dispatch.py), which uses the ledger, the outbox and the queue
records.  What a lower piece needs done above it comes back as a return value (a ``Consequence``,
the dispatcher's ``touched``/``rejected``), never as a call up.  Checked two ways: statically, on
the imports and names of each module (``ast``), and at run time, on the references each live piece
holds.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import apcrypto.core.machine as machine
from apcrypto.core.classifier import Classifier
from apcrypto.core.config import FAST
from apcrypto.core.dispatch import Dispatcher
from apcrypto.core.driver import DriverCore
from apcrypto.core.ledger import Ledger
from apcrypto.core.machine import HANDLERS, NEXT, TABLE, TIMERS, QueueMachine
from apcrypto.core.outbox import Outbox
from apcrypto.core.verdicts import Verdicts

CORE = Path(machine.__file__).parent

#: Each core module's rank: a module may import only core modules of a lower rank.
RANK = {
    "config": 0,
    "events": 0,
    "timers": 0,
    "formatter": 0,
    "classifier": 0,
    "ledger": 0,
    "actions": 1,
    "queue": 1,
    "outbox": 2,
    "dispatch": 3,
    "verdicts": 4,
    "machine": 5,
    "driver": 6,
}


def core_imports(name: str) -> set[str]:
    """The ``apcrypto.core.*`` modules ``name`` imports (at any level, TYPE_CHECKING included)."""
    tree = ast.parse((CORE / f"{name}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            mods = [node.module]
            if node.module == "apcrypto.core":
                mods = [f"apcrypto.core.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        else:
            continue
        for mod in mods:
            if mod.startswith("apcrypto.core."):
                found.add(mod.removeprefix("apcrypto.core.").split(".")[0])
            if mod.startswith(("apcrypto.transport", "apcrypto.runners", "apcrypto.client")):
                found.add(mod)  # the sans-I/O core imports nothing from the I/O side
    return found


def test_every_core_module_has_a_rank() -> None:
    modules = {p.stem for p in CORE.glob("*.py")} - {"__init__"}
    assert modules == set(RANK)


@pytest.mark.parametrize("name", sorted(RANK))
def test_a_piece_imports_only_pieces_below_it(name: str) -> None:
    for dep in core_imports(name):
        assert dep in RANK, f"{name}.py imports {dep} (outside the core or unknown)"
        assert RANK[dep] < RANK[name], f"{name}.py imports {dep}.py, which is not below it"


@pytest.mark.parametrize("name", ["ledger", "outbox", "dispatch", "verdicts"])
def test_lower_pieces_never_name_the_core_or_the_machine(name: str) -> None:
    """Not even in a string annotation or a TYPE_CHECKING import: no way to call up."""
    tree = ast.parse((CORE / f"{name}.py").read_text())
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    for forbidden in ("DriverCore", "QueueMachine"):
        assert forbidden not in names, (name, forbidden)
        assert not any(s.strip() == forbidden for s in strings), (name, forbidden)
    assert {"driver", "machine"}.isdisjoint(core_imports(name))


def test_live_pieces_hold_references_only_downwards() -> None:
    core = DriverCore(FAST, supports_interrupts=True)
    above: dict[type, tuple[type, ...]] = {
        Ledger: (DriverCore, QueueMachine, Verdicts, Dispatcher, Outbox),
        Outbox: (DriverCore, QueueMachine, Verdicts, Dispatcher),
        Dispatcher: (DriverCore, QueueMachine, Verdicts),
        Verdicts: (DriverCore, QueueMachine),
        QueueMachine: (DriverCore,),
    }
    pieces = [core.ledger, core.out, core.dispatch, core.verdicts, core.machine]
    assert [type(p) for p in pieces] == list(above)
    for piece in pieces:
        slots = getattr(type(piece), "__slots__", ())
        attrs = dict(vars(piece)) if hasattr(piece, "__dict__") else {}
        attrs.update({s: getattr(piece, s) for s in slots if hasattr(piece, s)})
        for attr, value in attrs.items():
            assert not isinstance(value, above[type(piece)]), (type(piece).__name__, attr)
    # the composition: each piece got the very objects below it
    assert core.machine.verdicts is core.verdicts and core.machine.dispatch is core.dispatch
    assert core.verdicts.dispatch is core.dispatch and core.verdicts.out is core.out
    assert core.dispatch.ledger is core.ledger and core.dispatch.out is core.out
    assert isinstance(core.verdicts.clf, Classifier) and core.machine.clf is core.verdicts.clf


def test_machine_cells_are_typed_callables_not_names() -> None:
    """Every cell of every table of the machine is a function of the machine (no string looked up
    with getattr), and the machine looks nothing up by name but configuration fields."""
    cells = [c for row in TABLE.values() for c in row.values()]
    cells += [*HANDLERS.values(), *TIMERS.values(), *NEXT.values()]
    for cell in cells:
        assert callable(cell) and not isinstance(cell, str)
        assert cell.__module__ == "apcrypto.core.machine" and cell.__qualname__.startswith("QueueMachine.")
    tree = ast.parse((CORE / "machine.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr":
            assert ast.unparse(node.args[0]) == "self.cfg", ast.unparse(node)


def test_only_the_machine_writes_queue_state() -> None:
    """``Queue.state`` is assigned in machine.py only (by ``_enter`` and ``_become``); ``self.state``
    (an exception's field) is not a queue's."""
    writers: dict[str, list[str]] = {}
    for path in CORE.glob("*.py"):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef):
                continue
            for node in ast.walk(fn):
                targets = node.targets if isinstance(node, ast.Assign) else []
                for t in targets:
                    if isinstance(t, ast.Attribute) and t.attr == "state" and ast.unparse(t.value) != "self":
                        writers.setdefault(path.stem, []).append(fn.name)
    assert writers == {"machine": ["_enter", "_become"]}


def test_driver_core_is_importable_from_the_package() -> None:
    import apcrypto.core

    assert apcrypto.core.DriverCore is DriverCore
    with pytest.raises(AttributeError):
        _ = apcrypto.core.NoSuchThing  # type: ignore[attr-defined]
