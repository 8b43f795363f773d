"""Card and queue lifecycles as tables, in the style of zcrypt's ``ap_queue.c`` jump table.

Two kinds of table live here, and nothing else decides state:

* ``CARD_TRANSITIONS[state][event] -> (next state, action)``: every cell is filled (a test checks
  it), ``None`` as the action means "nothing happens".  The action names a method of the card model
  (``_act_<name>``) that moves the messages; the table alone says where the card goes.
* ``CARD_GATE`` / ``QUEUE_GATE``: the response code an instruction gets before the queue looks at its
  messages, per state (``None`` = let it through).  The patent's behaviour during machine-failure
  recovery (US 11,593,208 claims 6-7: BUSY on everything but DQAP, DQAP answered normally from what
  the card still has) is the ``RECOVERING`` row.

Card lifecycle::

    NORMAL ──machine failure──► RECOVERING ──recovery done──► NORMAL
       │                             │
       ├──checkstop──► CHECKSTOPPED ◄┤ (stored replies lost)
       └──deconfigure─► DECONFIGURED ◄┘      both ──restore──► NORMAL (queues empty, reset)

A queue's own state is derived, most binding first: ``RESETTING`` (RAPQ/ZAPQ or an externally
initiated reset, for the profile's reset time) over ``BUSY`` (an injected busy period) over
``OPERATING``.
"""

from __future__ import annotations

from enum import Enum
from typing import Final

from apformats.codes import ResponseCode as RC
from apformats.results import Instr

__all__ = [
    "CARD_GATE",
    "CARD_TRANSITIONS",
    "HWINFO_TRUSTED",
    "QUEUE_GATE",
    "CardEvent",
    "CardState",
    "QueueState",
]


class CardState(Enum):
    NORMAL = "normal"
    RECOVERING = "recovering"  # machine-failure recovery: stored replies wait for its end
    CHECKSTOPPED = "checkstopped"
    DECONFIGURED = "deconfigured"


class CardEvent(Enum):
    MACHINE_FAILURE = "machine-failure"
    RECOVERY_DONE = "recovery-done"
    CHECKSTOP = "checkstop"
    DECONFIGURE = "deconfigure"
    RESTORE = "restore"


class QueueState(Enum):
    OPERATING = "operating"
    RESETTING = "resetting"
    BUSY = "busy"


_S, _E = CardState, CardEvent

#: state → event → (next state, action).  Actions: ``fail`` formats one machine-failure reply per held
#: message and starts the recovery timer; ``recover`` makes the stored replies available; ``kill``
#: discards everything the card holds; ``revive`` gives back empty, reset queues.
CARD_TRANSITIONS: Final[dict[CardState, dict[CardEvent, tuple[CardState, str | None]]]] = {
    _S.NORMAL: {
        _E.MACHINE_FAILURE: (_S.RECOVERING, "fail"),
        _E.RECOVERY_DONE: (_S.NORMAL, None),  # stale timer
        _E.CHECKSTOP: (_S.CHECKSTOPPED, "kill"),
        _E.DECONFIGURE: (_S.DECONFIGURED, "kill"),
        _E.RESTORE: (_S.NORMAL, None),
    },
    _S.RECOVERING: {
        _E.MACHINE_FAILURE: (_S.RECOVERING, None),  # already failed: nothing new is held
        _E.RECOVERY_DONE: (_S.NORMAL, "recover"),
        _E.CHECKSTOP: (_S.CHECKSTOPPED, "kill"),
        _E.DECONFIGURE: (_S.DECONFIGURED, "kill"),
        _E.RESTORE: (_S.RECOVERING, None),  # restore ends checkstop/deconfigure only
    },
    _S.CHECKSTOPPED: {
        _E.MACHINE_FAILURE: (_S.CHECKSTOPPED, None),
        _E.RECOVERY_DONE: (_S.CHECKSTOPPED, None),
        _E.CHECKSTOP: (_S.CHECKSTOPPED, None),
        _E.DECONFIGURE: (_S.DECONFIGURED, None),
        _E.RESTORE: (_S.NORMAL, "revive"),
    },
    _S.DECONFIGURED: {
        _E.MACHINE_FAILURE: (_S.DECONFIGURED, None),
        _E.RECOVERY_DONE: (_S.DECONFIGURED, None),
        _E.CHECKSTOP: (_S.DECONFIGURED, None),
        _E.DECONFIGURE: (_S.DECONFIGURED, None),
        _E.RESTORE: (_S.NORMAL, "revive"),
    },
}

_ALL = tuple(Instr)


def _row(rc: int | None, **overrides: int | None) -> dict[Instr, int | None]:
    row: dict[Instr, int | None] = dict.fromkeys(_ALL, rc)
    for name, value in overrides.items():
        row[Instr[name]] = value
    return row


#: Card state → instruction → response code (None: the card lets it through to the queue).
CARD_GATE: Final[dict[CardState, dict[Instr, int | None]]] = {
    CardState.NORMAL: _row(None),
    CardState.RECOVERING: _row(RC.BUSY, DQAP=None),  # patent claims 6-7
    CardState.CHECKSTOPPED: _row(RC.CHECKSTOPPED),
    CardState.DECONFIGURED: _row(RC.DECONFIGURED),
}

#: Queue state → instruction → response code (None: the instruction runs).
QUEUE_GATE: Final[dict[QueueState, dict[Instr, int | None]]] = {
    QueueState.OPERATING: _row(None),
    QueueState.RESETTING: _row(RC.RESET_IN_PROGRESS),  # TAPQ too, as the kernel's reset-wait expects
    QueueState.BUSY: _row(None, NQAP=RC.BUSY, DQAP=RC.BUSY, TAPQ=RC.BUSY),  # work continues meanwhile
}

#: TAPQ response codes for which GR2 (hardware info) is meaningful (``ap_queue_info``).
HWINFO_TRUSTED: Final = frozenset(
    {RC.NORMAL, RC.RESET_IN_PROGRESS, RC.DECONFIGURED, RC.CHECKSTOPPED, RC.BUSY}
)
