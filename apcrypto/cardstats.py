"""Counters as the card keeps them: what ``apcrypto list`` and ``apcrypto stats`` show.

A client only knows its own requests; the card (here: the emulator) counts everybody's.  So, like
``lszcrypt`` reading sysfs ``request_count`` and ``zcryptstats`` reading the adapter's measurement
counters, the command line reads the card's side:

* ``emu:`` -- the emulator in this process: ``emu.stats()`` and ``emu.execution_log``;
* ``tcp://`` -- the server's control plane (``--control tcp://HOST:PORT``): its ``stats`` and
  ``execution_log`` ops.  Without a control endpoint there is no card-side view; callers fall back to
  the client's own counts and say so.

Everything returned here is plain JSON data (dicts, lists, numbers, strings).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from apcrypto.transport.multi import CARD_BLOCK, driver_qid
from apformats.results import qid_card, qid_str

__all__ = ["CardSide", "PoolCardSide", "StatsSampler", "client_stats", "function_table", "plain"]


#: the class names the control plane tags its dataclasses with (a card's own ``type`` is kept)
_CLASS_TAGS = frozenset({"EmulatorStats", "CardStats", "QueueStats", "Execution"})


def plain(obj: Any) -> Any:
    """JSON data from an emulator value or a control-plane answer: dataclasses become dicts (the
    control plane's ``"type"`` tags dropped), tuples lists, enums their names."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): plain(v) for k, v in obj.items() if not (k == "type" and v in _CLASS_TAGS)}
    if isinstance(obj, list | tuple):
        return [plain(v) for v in obj]
    if hasattr(obj, "name") and hasattr(obj, "value") and not isinstance(obj, str | int | float):
        return obj.name
    return obj


class CardSide:
    """The card's counters, read in process (``emulator=``) or over a control plane (``control=``,
    an :class:`emulator.control_client.ControlClient` or anything with ``stats()`` and
    ``execution_log()`` of the same shape)."""

    def __init__(self, *, emulator: Any = None, control: Any = None, owns_control: bool = False) -> None:
        if (emulator is None) == (control is None):
            raise ValueError("CardSide needs exactly one of emulator= and control=")
        self.emulator = emulator
        self.control = control
        self._owns = owns_control

    @classmethod
    def for_client(
        cls, client: Any, control: str | None = None, **control_options: Any
    ) -> CardSide | PoolCardSide | None:
        """The card side behind ``client``: its in-process emulator, else the control plane at
        ``control`` (a ``tcp://`` URL), else None.  For a pool of servers
        (:class:`apcrypto.transport.multi.MultiTransport`) a :class:`PoolCardSide`: ``control``
        then names one control plane per server, comma-separated in the pool's URL order."""
        children = getattr(client.transport, "children", None)
        if children is not None:
            return PoolCardSide.for_children(children, control, **control_options)
        emu = getattr(client.transport, "emulator", None)
        if emu is not None:
            return cls(emulator=emu)
        if control:
            from emulator.control_client import ControlClient

            return cls(control=ControlClient(control, **control_options), owns_control=True)
        return None

    def snapshot(self) -> dict[str, Any]:
        """``{"time", "elapsed", "utilisation", "cards": [...], "queues": [...]}`` on the card's clock.

        Each card: ``card, name, type, mode, state, engines, engines_busy, requests, held,
        busy_time, utilisation``; each queue: ``qid, name, card, domain, usage, state, irq_enabled,
        requests, held, slots, waiting, running, replies, stored`` (see :mod:`emulator.stats`)."""
        if self.emulator is not None:
            st = self.emulator.stats()
            out = plain(st)
            out["utilisation"] = st.utilisation
            return dict(out)
        answer = self.control.stats()
        out = plain(answer.get("emulator", answer))
        if "utilisation" not in out:
            out["utilisation"] = answer.get("utilisation")
        return dict(out)

    def executions(self) -> list[dict[str, Any]]:
        """The execution log as plain records (``psmid, qid, function, enqueued, started, ended,
        outcome, reply_code``, ...)."""
        if self.emulator is not None:
            return [plain(e) for e in self.emulator.execution_log.entries()]
        return [plain(e) for e in self.control.execution_log()]

    def close(self) -> None:
        if self._owns and self.control is not None:
            self.control.close()


class PoolCardSide:
    """The card sides of a pool of servers, read as one, with the pool's card numbering (server
    *i*'s card *c* is card ``16*i + c``, :mod:`apcrypto.transport.multi`), so that a card and an
    APQN name one thing in ``apcrypto list`` and ``apcrypto stats`` as in the client's own stats.

    Every server keeps its own clock: :meth:`snapshot` reports server 0's ``time`` and ``elapsed``
    (and each server's under ``servers``), and :class:`StatsSampler` samples each server over its
    own interval before merging (an execution log's times mean nothing on another server's clock).
    """

    def __init__(self, sides: list[CardSide]) -> None:
        if not sides:
            raise ValueError("a pool has at least one server")
        self.sides = sides

    @classmethod
    def for_children(
        cls, children: list[Any], control: str | None, **control_options: Any
    ) -> PoolCardSide | None:
        """One side per child: its in-process emulator, else its control plane from ``control``
        (comma-separated, one per server in URL order); None when a server has neither."""
        controls = [c.strip() for c in control.split(",")] if control else []
        if controls and len(controls) != len(children):
            raise ValueError(
                f"a pool of {len(children)} servers needs one control endpoint per server, "
                f"comma-separated in the order of its URLs, not {len(controls)}"
            )
        sides: list[CardSide] = []
        for i, child in enumerate(children):
            emu = getattr(child, "emulator", None)
            if emu is not None:
                sides.append(CardSide(emulator=emu))
            elif controls:
                from emulator.control_client import ControlClient

                sides.append(
                    CardSide(control=ControlClient(controls[i], **control_options), owns_control=True)
                )
            else:
                for s in sides:
                    s.close()
                return None
        return cls(sides)

    def snapshot(self) -> dict[str, Any]:
        """As :meth:`CardSide.snapshot`, every server's cards and queues renumbered into one list;
        ``utilisation`` is over every engine of the pool; ``servers`` holds each one's clock."""
        snaps = [s.snapshot() for s in self.sides]
        cards: list[dict[str, Any]] = []
        queues: list[dict[str, Any]] = []
        busy = engines = 0.0
        for i, snap in enumerate(snaps):
            for c in snap["cards"]:
                card = CARD_BLOCK * i + int(c["card"])
                cards.append({**c, "card": card, "name": f"{card:02x}"})
                engines += float(c["engines"])
                busy += float(c.get("utilisation") or 0.0) * float(c["engines"])
            for q in snap["queues"]:
                qid = driver_qid(i, int(q["qid"]))
                queues.append({**q, "qid": qid, "name": qid_str(qid), "card": qid_card(qid)})
        return {
            "time": snaps[0]["time"],
            "elapsed": snaps[0]["elapsed"],
            "utilisation": busy / engines if engines else 0.0,
            "cards": cards,
            "queues": queues,
            "servers": [
                {"time": s["time"], "elapsed": s["elapsed"], "utilisation": s["utilisation"]} for s in snaps
            ],
        }

    def executions(self) -> list[dict[str, Any]]:
        """Every server's execution log, ``qid`` renumbered (times stay on each server's clock)."""
        return [
            {**e, "qid": driver_qid(i, int(e["qid"]))}
            for i, s in enumerate(self.sides)
            for e in s.executions()
        ]

    def close(self) -> None:
        for s in self.sides:
            s.close()


def function_table(
    executions: Iterable[Mapping[str, Any]], t0: float, t1: float, engines: Mapping[int, int]
) -> dict[str, dict[str, dict[str, float | int]]]:
    """Per APQN and function, what the card did in the interval ``(t0, t1]`` of its clock.

    ``ops``: requests that ended in the interval; ``errors``: those of them that did not complete
    normally (error reply, machine failure, discarded); ``busy``: engine-seconds spent in the
    interval (requests running across a boundary count only their part inside it);
    ``utilisation``: ``busy`` over the card's engine time in the interval (engines x seconds);
    ``avg_latency``: mean enqueue-to-end time of the ops, seconds (0 when none).
    """
    span = t1 - t0
    acc: dict[tuple[int, str], dict[str, float]] = defaultdict(
        lambda: {"ops": 0, "errors": 0, "busy": 0.0, "latency": 0.0}
    )
    for e in executions:
        started, ended = e.get("started"), e.get("ended")
        if started is None:
            continue
        stop = t1 if ended is None else min(ended, t1)
        inside = stop - max(started, t0)
        done = ended is not None and t0 < ended <= t1
        if inside <= 0 and not done:
            continue
        row = acc[(int(e["qid"]), str(e["function"]))]
        row["busy"] += max(inside, 0.0)
        if done:
            row["ops"] += 1
            row["latency"] += ended - (e.get("enqueued") or started)
            row["errors"] += e.get("outcome") != "completed"
    out: dict[str, dict[str, dict[str, float | int]]] = {}
    for (qid, function), row in sorted(acc.items()):
        card_engines = engines.get(qid_card(qid), 1) or 1
        ops = int(row["ops"])
        out.setdefault(qid_str(qid), {})[function] = {
            "ops": ops,
            "errors": int(row["errors"]),
            "busy": row["busy"],
            "utilisation": row["busy"] / (card_engines * span) if span > 0 else 0.0,
            "avg_latency": row["latency"] / ops if ops else 0.0,
        }
    return out


def client_stats(
    core_stats: dict[str, Any], local: Mapping[str, int], errors: Mapping[str, int], emulator: Any = None
) -> dict[str, Any]:
    """The one shape of ``Client.stats()`` and ``AsyncClient.stats()``, on every transport (plain JSON):

    * ``outcomes``: requests per final outcome (``completed``, ``failed``, ``indeterminate``,
      ``unavailable``), this client's;
    * ``errors``: the failed ones by exception class (``BadRequest``, ``Indeterminate``,
      ``DeviceUnavailable``, ``DeadlineExceeded``, ``ClientClosed``, ...);
    * ``counters``: the driver's event counters (re-drives, machine-failure replies, late replies...);
    * ``states``: queues per state; ``queues``: per APQN (``"02.0003"``) its ``state``, ``mode``,
      ``slots``, ``held``, ``requests``, ``load``, ``slot_seconds``, ``slot_utilisation``,
      ``offline_reason``;
    * ``backlog``, ``in_flight``: requests waiting on the host, and not yet decided;
    * ``card``: the card's own counters (:meth:`CardSide.snapshot`) when the card is in this
      process (``emu:``), else None (read them over the control plane: ``apcrypto stats``).
    """
    st = dict(core_stats)
    outcomes = dict(st.get("outcomes", {}))
    for k, v in local.items():
        outcomes[k] = outcomes.get(k, 0) + v
    st["outcomes"] = outcomes
    st["errors"] = dict(sorted(errors.items()))
    st["card"] = CardSide(emulator=emulator).snapshot() if emulator is not None else None
    return st


class StatsSampler:
    """Interval statistics in the manner of ``zcryptstats``: each :meth:`sample` reports what the
    card did since the previous one, per card and per APQN and function, on the card's clock."""

    def __init__(self, side: CardSide | PoolCardSide) -> None:
        self.side = side
        self._last: dict[str, Any] | None = None
        # a pool: one sampler per server, each on its own clock, merged by sample()
        self._parts = [StatsSampler(s) for s in side.sides] if isinstance(side, PoolCardSide) else []

    def sample(self) -> dict[str, Any]:
        """``{"start", "end", "seconds", "cards": {"02": {utilisation, ops, errors, busy}},
        "queues": {"02.0003": {"MEX_2K": {ops, errors, busy, utilisation, avg_latency}}}}``; the
        first call reports the interval since the card started.  For a pool, each server's
        interval on its own clock, renumbered (``start``/``end``/``seconds``: server 0's)."""
        if self._parts:
            return self._sample_pool()
        snap = self.side.snapshot()
        t1 = float(snap["time"])
        prev = self._last
        t0 = float(prev["time"]) if prev is not None else t1 - float(snap["elapsed"])
        engines = {int(c["card"]): int(c["engines"]) for c in snap["cards"]}
        per_queue = function_table(self.side.executions(), t0, t1, engines)
        busy0 = {c["card"]: c["busy_time"] for c in prev["cards"]} if prev is not None else {}
        cards: dict[str, dict[str, Any]] = {}
        span = t1 - t0
        for c in snap["cards"]:
            busy = float(c["busy_time"]) - float(busy0.get(c["card"], 0.0))
            rows = [r for q, fns in per_queue.items() if int(q[:2], 16) == c["card"] for r in fns.values()]
            cards[str(c["name"])] = {
                "type": c["type"],
                "state": c["state"],
                "ops": sum(int(r["ops"]) for r in rows),
                "errors": sum(int(r["errors"]) for r in rows),
                "busy": busy,
                "utilisation": busy / (c["engines"] * span) if span > 0 and c["engines"] else 0.0,
            }
        self._last = snap
        return {"start": t0, "end": t1, "seconds": span, "cards": cards, "queues": per_queue}

    def _sample_pool(self) -> dict[str, Any]:
        reports = [p.sample() for p in self._parts]
        cards: dict[str, dict[str, Any]] = {}
        queues: dict[str, dict[str, dict[str, float | int]]] = {}
        for i, r in enumerate(reports):
            for name, c in r["cards"].items():
                cards[f"{CARD_BLOCK * i + int(name, 16):02x}"] = c
            for apqn, fns in r["queues"].items():
                queues[qid_str(driver_qid(i, int(apqn[:2], 16) << 8 | int(apqn[3:], 16)))] = fns
        first = reports[0]
        return {"start": first["start"], "end": first["end"], "seconds": first["seconds"], "cards": cards,
                "queues": queues}  # fmt: skip
