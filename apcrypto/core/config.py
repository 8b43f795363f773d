"""Every timing and bound of the driver core, in one frozen value.  Nothing waits forever."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True, slots=True)
class DriverConfig:
    """Timings in seconds (of whatever clock the runner drives the core with).

    Defaults follow the Linux driver where it has a number (poll frequencies, ap_queue.c) and are
    shorter where the kernel's are built for a different job (900 s request timeout).
    """

    poll_high: float = 0.00025  # replies outstanding, no interrupts: 4 kHz (kernel poll_high_timeout)
    poll_low: float = 0.04  # reset-wait, setirq-wait, recovery-wait: 25 Hz (kernel poll_low_timeout)
    irq_safety_poll: float = 0.5  # interrupts on: a slow poll in case one is lost
    reply_timeout: float = 30.0  # no reply at all for this long while work is on the card: reset
    reset_timeout: float = 2.0  # one reset attempt (RAPQ/ZAPQ until TAPQ clean) may take this long
    setirq_timeout: float = 0.5  # AQIC not confirmed by then: carry on polling
    probe_timeout: float = 2.0  # known-answer request must come back by then
    recovery_timeout: float = 60.0  # the card's machine-failure recovery may take this long
    max_reset_attempts: int = 3  # then offline (RAPQ, RAPQ, then ZAPQ)
    offline_probe_interval: float = 1.0  # an offline queue is probed again after this...
    offline_probe_max: float = 30.0  # ...doubling up to this
    max_redrives: int = 3  # safe re-drives of one request (only work that never ran, or idempotent)
    use_interrupts: bool = True
    health_probe: bool = True  # known-answer request before a queue (re-)enters service
    backlog_limit: int = 100_000  # host-side queue bound per client
    # Work that cannot be placed because no queue of its kind is in service (all of them resetting,
    # recovering, probing or offline) waits at most this long (or its deadline, if sooner), then
    # ends DeviceUnavailable; a queue of its kind back in service within it serves it.
    unavailable_grace: float = 30.0
    # Work the card held when a session-keeping peer (tcp://, zmq) was declared gone stays undecided
    # this long (the emulator server's --session-grace default): a resumed session drains its
    # replies; after it, or on a new session, the ledger decides it as lost.
    session_grace: float = 60.0
    # Decided requests the ledger still remembers (newest first out of it last), for audits
    # (apcrypto.audit, the pytest plugin's check) and to tell a late reply from a stray one.
    # Undecided requests are always kept; this bounds only the history, so a client's memory stays
    # flat however many requests it has run.  0 keeps none.
    ledger_history: int = 1_000

    def with_(self, **changes: object) -> DriverConfig:
        return replace(self, **changes)  # type: ignore[arg-type]


#: Short timings for tests and simulations (virtual or wall clock), still all bounded.
FAST = DriverConfig(
    poll_high=0.0002,
    poll_low=0.002,
    irq_safety_poll=0.05,
    reply_timeout=2.0,
    reset_timeout=0.2,
    setirq_timeout=0.05,
    probe_timeout=0.5,
    recovery_timeout=2.0,
    offline_probe_interval=0.05,
    offline_probe_max=0.4,
    unavailable_grace=1.0,
)
