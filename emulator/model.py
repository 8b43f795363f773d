"""The card model's data: cards, their engines, queues (APQNs) and the messages they hold.

Plain mutable records with ``__slots__``; all behaviour lives in :mod:`emulator.core`, all state
rules in :mod:`emulator.lifecycle`.  A message holds one of its queue's slots from the NQAP that
accepted it until the DQAP that takes its reply (the kernel counts the same way), whichever list it
is on meanwhile: ``waiting`` (no engine yet), ``running`` (on an engine), ``replies`` (reply
available) or ``stored`` (machine-failure reply held until recovery completes).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from apformats.results import qid_of
from apformats.status import HwInfo
from emulator.clock import TimerHandle
from emulator.execution_log import _Entry
from emulator.lifecycle import CardState, QueueState
from emulator.profile import CardSpec, CardType

__all__ = ["Card", "Engine", "Message", "Queue", "hwinfo_for"]

Notify = Callable[[int], object]


class Message:
    """One accepted request message, from NQAP to DQAP."""

    __slots__ = (
        "computing",
        "engine",
        "entry",
        "fail_code",
        "function",
        "ok",
        "psmid",
        "queue",
        "reply",
        "request",
        "seq",
        "special",
    )

    def __init__(
        self, seq: int, queue: Queue, psmid: int, request: bytes, function: str, entry: _Entry
    ) -> None:
        self.seq = seq  # emulator-wide acceptance order: "oldest first" everywhere
        self.queue = queue
        self.psmid = psmid
        self.request = request
        self.function = function
        self.entry = entry
        self.special = False
        self.engine: int | None = None
        self.reply: bytes | None = None
        self.ok = False  # the firmware's verdict: a normal reply (True) or an error reply
        self.fail_code: int | None = None  # set by a FailRequest fault
        self.computing = False  # its firmware answer is being computed by an engine backend

    def __repr__(self) -> str:
        return f"<Message psmid={self.psmid:#x} qid={self.queue.qid:#06x} {self.entry.outcome}>"


class Queue:
    """One APQN: its slots and the messages in them."""

    __slots__ = (
        "accepted",
        "busy",
        "card",
        "domain",
        "fw_ctx",
        "in_ready",
        "irq",
        "irq_pending",
        "notify",
        "on_reset_done",
        "qid",
        "replies",
        "reset_timer",
        "resetting",
        "running",
        "slots",
        "stored",
        "usage",
        "waiting",
    )

    def __init__(self, card: Card, domain: int, usage: bool) -> None:
        self.card = card
        self.domain = domain
        self.qid = qid_of(card.id, domain)
        self.usage = usage  # False: a control-only domain (NQAP → INVALID_DOMAIN)
        self.slots = card.type.slots
        self.waiting: deque[Message] = deque()
        self.running: list[Message] = []
        self.replies: deque[Message] = deque()
        self.stored: list[Message] = []
        self.irq = False
        #: the queue's interruption is pending: raised for a reply and not yet answered by a DQAP of
        #: this queue, so later replies raise none (the host's read after the interrupt finds them)
        self.irq_pending = False
        self.notify: Notify | None = None
        self.resetting = False
        self.reset_timer: TimerHandle | None = None
        self.on_reset_done: list[Callable[[], None]] = []
        self.busy = 0  # number of active Busy faults
        self.in_ready = False  # on the card's round-robin list of queues with waiting work
        self.accepted = 0  # NQAPs accepted (lszcrypt's request_count)
        self.fw_ctx: Any = None  # the FirmwareContext for this domain, built once

    @property
    def held(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.replies) + len(self.stored)

    @property
    def state(self) -> QueueState:
        if self.resetting:
            return QueueState.RESETTING
        if self.busy:
            return QueueState.BUSY
        return QueueState.OPERATING

    def messages(self) -> list[Message]:
        """Everything held, oldest first."""
        return sorted([*self.waiting, *self.running, *self.replies, *self.stored], key=lambda m: m.seq)

    def __repr__(self) -> str:
        return f"<Queue {self.qid:#06x} {self.state.value} held={self.held}/{self.slots}>"


class Engine:
    """One of a card's crypto engines, shared by all its queues."""

    __slots__ = ("busy_since", "busy_time", "due", "index", "message", "timer")

    def __init__(self, index: int) -> None:
        self.index = index
        self.message: Message | None = None
        self.timer: TimerHandle | None = None
        self.busy_since = 0.0
        self.busy_time = 0.0  # accumulated, for utilisation
        self.due = 0.0  # when its message's service time is over, on the card's time

    def __repr__(self) -> str:
        return f"<Engine {self.index} {'busy' if self.message else 'idle'}>"


class Card:
    """One adapter: engines, queues per domain, lifecycle state."""

    __slots__ = (
        "accepted",
        "engines",
        "hwinfo",
        "id",
        "idle",
        "on_recovered",
        "on_revive",
        "queues",
        "ready",
        "recovery_timer",
        "slow",
        "spec",
        "state",
        "type",
    )

    def __init__(self, spec: CardSpec) -> None:
        self.spec = spec
        self.id = spec.id
        self.type: CardType = spec.type
        self.state = CardState.NORMAL
        self.hwinfo = hwinfo_for(spec.type)
        self.engines = [Engine(i) for i in range(spec.type.engines)]
        self.idle: list[int] = list(range(spec.type.engines))  # a heap: lowest free engine first
        self.queues: dict[int, Queue] = {}
        for d in spec.usage_domains:
            self.queues[d] = Queue(self, d, usage=True)
        for d in spec.control_domains:
            self.queues[d] = Queue(self, d, usage=False)
        self.queues = dict(sorted(self.queues.items()))
        self.ready: deque[Queue] = deque()  # queues with waiting messages, served round-robin
        self.accepted = 0
        self.recovery_timer: TimerHandle | None = None
        self.on_recovered: list[Callable[[], None]] = []
        self.on_revive: list[Callable[[], None]] = []
        self.slow: list[float] = []  # factors of active SlowEngines faults

    @property
    def slow_factor(self) -> float:
        f = 1.0
        for x in self.slow:
            f *= x
        return f

    @property
    def held(self) -> int:
        return sum(q.held for q in self.queues.values())

    def __repr__(self) -> str:
        return f"<Card {self.id} {self.type.name} {self.state.value}>"


def hwinfo_for(ctype: CardType) -> HwInfo:
    """The TAPQ GR2 word a card of this type reports (card-wide part; ``bs`` = usable)."""
    return HwInfo(
        at=ctype.at,
        nd=ctype.nd,
        ml=ctype.ml,
        qd=ctype.qd,
        apsc=ctype.apsc,
        mex4k=ctype.mex4k,
        crt4k=ctype.crt4k,
        cca=ctype.mode == "cca",
        accel=ctype.mode == "accel",
        ep11=ctype.mode == "ep11",
        apxa=ctype.nd > 16,
        class_=ctype.class_,
    )
