"""Per-APQN state: what the driver believes one AP queue holds, and the vocabulary of its machine.

The machine has the shape of Linux ``ap_queue.c``'s jump table: ``machine.TABLE[state][event]`` is
the step function to run, and each step returns a :class:`Wait` hint ordered by urgency, so
combining two steps is ``min()``.  Unlike the kernel, a step never executes an instruction inline:
it asks the outbox to *emit* one, and the instruction's completion arrives later as its own event.
That keeps the queue machine pure and lets pipelined transports keep many instructions in flight.

The steps, the table and every decision about a queue's next state live in
:mod:`apcrypto.core.machine`; this module holds the data: states, events, waits and the queue record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, IntEnum

from apcrypto.core.timers import TimerKey
from apformats.results import qid_card, qid_domain
from apformats.status import HwInfo


class QState(Enum):
    RESET_START = "reset-start"  # about to RAPQ (ZAPQ after repeated failures)
    RESET_WAIT = "reset-wait"  # RAPQ issued; TAPQ until the reset is done
    SETIRQ_WAIT = "setirq-wait"  # AQIC issued; TAPQ until the irq bit shows
    PROBE = "probe"  # health probe: a known-answer request must come back right
    IDLE = "idle"  # in service, nothing on the card
    WORKING = "working"  # in service, work on the card, free slots
    QUEUE_FULL = "queue-full"  # in service, every slot taken (or the card said Q_FULL)
    RECOVERY_WAIT = "recovery-wait"  # card in machine-failure recovery: drain stored replies, no NQAP
    OFFLINE = "offline"  # out of service; probed again later, comes back by itself

    # Set for every member below the class: plain attributes, because Enum.__hash__ is a Python
    # function and the hot path must not pay for it on every lookup.
    in_service: bool
    idx: int  # the state's row in machine.JUMP (its position in this class)


_IN_SERVICE = frozenset({QState.IDLE, QState.WORKING, QState.QUEUE_FULL})


class QEvent(Enum):
    KICK = "kick"  # something changed: new work or a completion (replies are read on the status
    # bits, interrupts and poll ticks, never eagerly on a kick: that would double the instructions)
    TIMEOUT = "timeout"  # the queue's poll timer fired


class Wait(IntEnum):
    """How soon the queue wants to be looked at again; smaller is more urgent (kernel order)."""

    AGAIN = 0
    HIGH = 1  # fast poll (replies outstanding, no interrupts)
    LOW = 2  # slow poll (reset, irq, recovery waits)
    INTERRUPT = 3  # an interrupt will come (slow safety poll), or fast poll without interrupts
    NONE = 4


for _i, _st in enumerate(QState):
    _st.in_service = _st in _IN_SERVICE
    _st.idx = _i

#: Bound on the time a queue may spend in a state before the driver escalates (config attribute).
STATE_LIMITS: dict[QState, str] = {
    QState.RESET_START: "reset_timeout",
    QState.RESET_WAIT: "reset_timeout",
    QState.SETIRQ_WAIT: "setirq_timeout",
    QState.PROBE: "probe_timeout",
    QState.RECOVERY_WAIT: "recovery_timeout",
}


@dataclass(slots=True, eq=False)
class Queue:
    """The driver's view of one APQN."""

    qid: int
    state: QState = QState.RESET_START
    hw: HwInfo | None = None
    slots: int = 1  # learned from TAPQ: qd + 1
    max_msg: int = 12 * 1024
    mode: str = "unknown"
    irq: bool = False  # the card's status says interrupts are on
    irq_wanted: bool = True
    irq_reissued: bool = False  # AQIC re-sent because a status showed interrupts off
    on_card: dict[int, int] = field(default_factory=dict)  # psmid -> rid (NQAP accepted, no reply yet)
    sending: dict[int, int] = field(default_factory=dict)  # tag -> rid (NQAP issued, status not seen)
    probe_psmid: int | None = None
    probe_sent: bool = False
    dqap_inflight: bool = False
    ctl_inflight: bool = False  # one of TAPQ/RAPQ/ZAPQ/AQIC is in flight
    full_hold: bool = False  # the card said Q_FULL: no NQAP until a reply frees a slot
    card_recovered: bool = False  # in RECOVERY_WAIT: the card answers again (not BUSY)
    mf_recovery: bool = False  # in RECOVERY_WAIT because of a machine failure (its card is suspect)
    session_held: bool = False  # OFFLINE by a resumable loss: on_card kept until resumed or its grace
    reprobe_due: bool = False  # OFFLINE: a re-probe is owed (skipped while a control instruction ran)
    reset_attempts: int = 0
    offline_backoff: float = 0.0
    offline_reason: str = ""
    offline_after_drain: str = ""  # go offline (not reset) once the stored replies are drained
    load: int = 0  # sum of dispatch weights on this queue
    requests_total: int = 0  # accepted by the card over the queue's life
    progress: int = 0  # bumped on every reply; the reply-timeout check compares it
    progress_seen: int = -1
    gen: int = 0  # bumped on every state change; the state-limit timer checks it
    issued_gen: int = -1  # the state entry in which the *_once step last issued its instruction
    limit_gen: int = -1
    # utilisation on the runner's clock: integral of (messages held) dt
    occ_integral: float = 0.0
    occ_t: float = 0.0
    t0: float = 0.0

    card: int = -1  # set from qid (plain attributes: read on every dispatch decision)
    domain: int = -1

    # its timer keys, built once (the poll and reply keys are looked up on every instruction)
    poll_key: TimerKey = field(init=False)
    limit_key: TimerKey = field(init=False)
    reply_key: TimerKey = field(init=False)

    def __post_init__(self) -> None:
        self.card = qid_card(self.qid)
        self.domain = qid_domain(self.qid)
        self.poll_key = TimerKey.poll(self.qid)
        self.limit_key = TimerKey.limit(self.qid)
        self.reply_key = TimerKey.reply(self.qid)

    @property
    def held(self) -> int:
        """Messages the card holds (or may hold) for us: accepted, in flight and the probe."""
        return len(self.on_card) + len(self.sending) + (1 if self.probe_sent else 0)

    def has_free_slot(self) -> bool:
        return not self.full_hold and self.held < self.slots

    def occ_to(self, now: float) -> None:
        """Integrate the messages held up to ``now`` (``occ_integral``).  The core calls this
        just before every change of ``held`` (and before reading the integral), never after: the
        ``held`` since ``occ_t`` is then the one integrated, so the integral is exact, and a queue
        whose ``held`` does not change costs nothing however many entry points pass."""
        dt = now - self.occ_t
        if dt > 0:
            held = len(self.on_card) + len(self.sending) + self.probe_sent
            if held:
                self.occ_integral += held * dt
            self.occ_t = now
