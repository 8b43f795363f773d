"""Counters an lszcrypt-style listing needs: per card and per queue, on the emulator's clock.

Utilisation is engine busy time over engine time available since the emulator was built, measured
on its clock, so on a :class:`~emulator.clock.VirtualClock` it is exact and repeatable (DESIGN §7).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from apformats.results import qid_str

if TYPE_CHECKING:
    from emulator.core import Emulator
    from emulator.model import Card

__all__ = ["CardStats", "EmulatorStats", "QueueStats", "collect_stats"]


@dataclass(frozen=True, slots=True)
class QueueStats:
    qid: int
    name: str  # sysfs spelling, "02.0003"
    card: int
    domain: int
    usage: bool  # False: control-only domain
    state: str  # "operating" | "resetting" | "busy"
    irq_enabled: bool
    requests: int  # NQAPs accepted (request_count)
    held: int  # slots in use: waiting + running + replies + stored
    slots: int
    waiting: int
    running: int
    replies: int  # available to DQAP
    stored: int  # machine-failure replies held until recovery completes
    functions: dict[str, int] = field(default_factory=dict)  # NQAPs accepted per function name


@dataclass(frozen=True, slots=True)
class CardStats:
    card: int
    name: str  # "02"
    type: str  # "CEX8A"
    mode: str  # "accel" | "cca"
    state: str  # "normal" | "recovering" | "checkstopped" | "deconfigured"
    engines: int
    engines_busy: int
    requests: int
    held: int
    busy_time: float  # engine-seconds spent on requests
    utilisation: float  # busy_time / (engines x elapsed), 0 when no time has passed
    functions: dict[str, int] = field(default_factory=dict)  # NQAPs accepted per function name


@dataclass(frozen=True, slots=True)
class EmulatorStats:
    time: float
    elapsed: float
    cards: tuple[CardStats, ...]
    queues: tuple[QueueStats, ...]
    functions: dict[str, int] = field(default_factory=dict)  # NQAPs accepted per function, all cards

    @property
    def utilisation(self) -> float:
        """Over all cards: engine busy time / engine time available."""
        engines = sum(c.engines for c in self.cards)
        if not engines or self.elapsed <= 0:
            return 0.0
        return sum(c.busy_time for c in self.cards) / (engines * self.elapsed)

    def lszcrypt(self) -> str:
        """The listing in the manner of ``lszcrypt -V``: one line per card, then its usage queues."""

        def row(*cols: object) -> str:
            return "{:<9} {:<6} {:<12} {:<12} {:>9} {:>8} {:>6}".format(*cols)

        mode_name = {"accel": "Accelerator", "cca": "CCA-Coproc"}
        head = row("CARD.DOM", "TYPE", "MODE", "STATUS", "REQUESTS", "PENDING", "QDEPTH")
        lines = [head, "-" * len(head)]
        for c in self.cards:
            status = "online" if c.state == "normal" else c.state
            mode = mode_name.get(c.mode, c.mode)
            queues = [q for q in self.queues if q.card == c.card and q.usage]
            depth = queues[0].slots if queues else 0
            lines.append(row(c.name, c.type, mode, status, c.requests, c.held, depth))
            for q in queues:
                qstatus = status if q.state == "operating" else q.state
                lines.append(row(q.name, c.type, mode, qstatus, q.requests, q.held, q.slots))
        return "\n".join(lines)

    def card(self, card: int) -> CardStats:
        for c in self.cards:
            if c.card == card:
                return c
        raise KeyError(card)

    def queue(self, qid: int) -> QueueStats:
        for q in self.queues:
            if q.qid == qid:
                return q
        raise KeyError(qid)


def collect_stats(emu: Emulator, cards: Iterable[Card], now: float, t0: float) -> EmulatorStats:
    """Snapshot (called under the emulator lock)."""
    elapsed = now - t0
    per_queue: dict[int, dict[str, int]] = {}
    per_card: dict[int, dict[str, int]] = {}
    overall: dict[str, int] = {}
    for (qid, function), n in emu.execution_log.function_counts().items():
        for bucket in (
            per_queue.setdefault(qid, {}),
            per_card.setdefault((qid >> 8) & 0xFF, {}),
            overall,
        ):
            bucket[function] = bucket.get(function, 0) + n
    card_stats: list[CardStats] = []
    queue_stats: list[QueueStats] = []
    for card in cards:
        busy = 0.0
        running = 0
        for e in card.engines:
            busy += e.busy_time
            if e.message is not None:
                running += 1
                busy += now - e.busy_since
        n = len(card.engines)
        card_stats.append(
            CardStats(
                card=card.id,
                name=f"{card.id:02x}",
                type=card.type.name,
                mode=card.type.mode,
                state=card.state.value,
                engines=n,
                engines_busy=running,
                requests=card.accepted,
                held=card.held,
                busy_time=busy,
                utilisation=busy / (n * elapsed) if elapsed > 0 else 0.0,
                functions=per_card.get(card.id, {}),
            )
        )
        for q in card.queues.values():
            queue_stats.append(
                QueueStats(
                    qid=q.qid,
                    name=qid_str(q.qid),
                    card=card.id,
                    domain=q.domain,
                    usage=q.usage,
                    state=q.state.value,
                    irq_enabled=q.irq,
                    requests=q.accepted,
                    held=q.held,
                    slots=q.slots,
                    waiting=len(q.waiting),
                    running=len(q.running),
                    replies=len(q.replies),
                    stored=len(q.stored),
                    functions=per_queue.get(q.qid, {}),
                )
            )
    return EmulatorStats(
        time=now, elapsed=elapsed, cards=tuple(card_stats), queues=tuple(queue_stats), functions=overall
    )
