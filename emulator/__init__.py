"""The software AP adapter emulator (DESIGN §4.5, docs/INTERNALS.md §3).

``Emulator`` models cards, domains, queues with their slots and engines shared per card, on a
virtual or a wall clock; ``emu.control`` injects faults; ``emu.execution_log`` records what actually
ran.  The servers (ZeroMQ, USB) put an ``Emulator`` behind a transport; in-process use needs none.
"""

import logging

from emulator.clock import ClockError, TimerHandle, VirtualClock, WallClock
from emulator.control import ControlPlane, TransportFaults
from emulator.core import Emulator
from emulator.execution_log import Execution, ExecutionLog
from emulator.faults import (
    Busy,
    Checkstop,
    Deconfigure,
    FailRequest,
    Fault,
    MachineFailure,
    ResetInProgress,
    SlowEngines,
)
from emulator.lifecycle import CardState, QueueState
from emulator.profile import Profile, ProfileError, bundled_profiles, load_profile
from emulator.stats import CardStats, EmulatorStats, QueueStats

# a library logs, the application decides where (logging HOWTO); no last-resort output on stderr
logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "Busy",
    "CardState",
    "CardStats",
    "Checkstop",
    "ClockError",
    "ControlPlane",
    "Deconfigure",
    "Emulator",
    "EmulatorStats",
    "Execution",
    "ExecutionLog",
    "FailRequest",
    "Fault",
    "MachineFailure",
    "Profile",
    "ProfileError",
    "QueueState",
    "QueueStats",
    "ResetInProgress",
    "SlowEngines",
    "TimerHandle",
    "TransportFaults",
    "VirtualClock",
    "WallClock",
    "bundled_profiles",
    "load_profile",
]
