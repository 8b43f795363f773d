"""The error classifier: one table from every code the adapter can return to one action.

Rows are data (DESIGN §4.2).  Keys are ``(source, code)`` where ``source`` names what produced the
code: the response code of an instruction (``"NQAP"``, ``"DQAP"``, ``"TAPQ"``, ``"RESET"`` for
RAPQ/ZAPQ, ``"AQIC"``), the reply code of an error reply (``"REPLY"``), or the machine-failure state
carried by a machine-failure reply (``"MF"``).  Each row gives a :class:`Verdict` and, for replies,
whether the request *may have run* on the card -- the one fact the reply formatter needs to decide
between re-driving and reporting it indeterminate.

Kernel behaviour for each code is in ``reference/zcrypt.md`` §2.3 and §5.1-5.3; where we differ
(BUSY during the card's machine-failure recovery, unknown function, machine-failure states) the row
says why.  An unknown code never raises: it maps to the safe default of its source (take the queue
out of service, keep every request accounted for) and is logged once per (source, code) by each
:class:`Classifier` (one per driver core: no process-wide mutable state; the tables are read-only).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum

from apformats.codes import MachineFailureState as MF
from apformats.codes import ReplyCode as RY
from apformats.codes import ResponseCode as RC

log = logging.getLogger("apcrypto.classifier")


class Verdict(Enum):
    """What to do about one code.  The first three are the normal flow; the rest are DESIGN §4.2."""

    PROCEED = "proceed"  # the instruction did what was asked
    BACKPRESSURE = "backpressure"  # NQAP: no free slot / DQAP: no reply yet; not an error
    RETRY_SAME = "retry-same"  # transient (reset or recovery in progress): back off, try this queue again
    RETRY_ELSEWHERE = (
        "retry-elsewhere"  # the request did not complete here; re-drive on another queue if safe
    )
    FAIL_CALLER = "fail-caller"  # the request itself is bad: BadRequest, never retried
    MACHINE_FAILURE = (
        "machine-failure"  # the card failed under this request: formatter decides, queue recovers
    )
    RESET_QUEUE = "reset-queue"  # protocol state is suspect: drain what can be drained, RAPQ, probe
    TAKE_OFFLINE = "take-offline"  # the queue cannot serve: out of service, decide its work from the ledger


@dataclass(frozen=True, slots=True)
class Row:
    verdict: Verdict
    may_have_run: bool = False  # for error replies: could the card have executed (part of) the request?
    note: str = ""


P, BP, RS, RE, FC, MFV, RQ, OFF = (
    Verdict.PROCEED,
    Verdict.BACKPRESSURE,
    Verdict.RETRY_SAME,
    Verdict.RETRY_ELSEWHERE,
    Verdict.FAIL_CALLER,
    Verdict.MACHINE_FAILURE,
    Verdict.RESET_QUEUE,
    Verdict.TAKE_OFFLINE,
)

# Response codes shared by every instruction, unless a source overrides them below.
_COMMON_RC: dict[int, Row] = {
    RC.NORMAL: Row(P),
    RC.Q_NOT_AVAIL: Row(OFF, note="APQN not in this configuration"),
    RC.RESET_IN_PROGRESS: Row(RS, note="a reset (ours or external) is running"),
    RC.DECONFIGURED: Row(OFF, note="card configured off: no replies will come"),
    RC.CHECKSTOPPED: Row(OFF, note="card checkstopped: no replies will come"),
    RC.BUSY: Row(RS, note="card busy or in machine-failure recovery (patent claim 6): wait, keep draining"),
    RC.INVALID_ADDRESS: Row(OFF, note="the queue is not addressable as configured"),
    RC.OTHERWISE_CHANGED: Row(RQ),
    RC.INVALID_GISA: Row(RQ),
    RC.Q_BOUND_TO_ANOTHER: Row(OFF, note="SE: bound to another guest"),
    RC.STATE_CHANGE_IN_PROGRESS: Row(RS, note="SE: bind/association change running"),
    RC.Q_NOT_BOUND: Row(OFF, note="SE: not bound"),
    RC.Q_FULL: Row(BP),
    RC.INDEX_TOO_BIG: Row(OFF),
    RC.NO_FIRST_PART: Row(RQ, note="message part sequence broken"),
    RC.MESSAGE_TOO_BIG: Row(RQ, note="only meaningful for NQAP"),
    RC.REQ_FAC_NOT_INST: Row(RQ, note="only meaningful for NQAP"),
    RC.Q_BIND_ERROR: Row(OFF),
    RC.Q_NOT_AVAIL_FOR_ASSOC: Row(OFF),
    RC.Q_NOT_EMPTY: Row(RQ),
    RC.BIND_LIMIT_EXCEEDED: Row(OFF),
    RC.INVALID_ASSOC_SECRET: Row(OFF),
    RC.ASSOC_SECRET_NOT_UNIQUE: Row(OFF),
    RC.ASSOC_FAILED: Row(OFF),
    RC.INVALID_DOMAIN: Row(OFF, note="only meaningful for NQAP"),
}

_OVERRIDES: dict[str, dict[int, Row]] = {
    "NQAP": {
        RC.Q_FULL: Row(BP, note="no free slot: wait for a reply, the request stays on the host"),
        RC.MESSAGE_TOO_BIG: Row(FC, note="kernel: -EINVAL"),
        RC.REQ_FAC_NOT_INST: Row(FC, note="kernel: -EINVAL (special bit on a card without APSC)"),
        RC.INVALID_DOMAIN: Row(FC, note="kernel: -EINVAL, request for a domain that is not usable"),
    },
    "DQAP": {
        RC.Q_FULL: Row(BP, note="NO_PENDING_REPLY: nothing to read yet"),
    },
    "RESET": {
        RC.RESET_IN_PROGRESS: Row(P, note="the reset we asked for is running"),
    },
    "AQIC": {
        RC.OTHERWISE_CHANGED: Row(P, note="interrupt state already as asked"),
        RC.INVALID_ADDRESS: Row(P, note="no interrupts: fall back to polling"),
        RC.INVALID_GISA: Row(P, note="no interrupts: fall back to polling"),
    },
}

#: Safe default for an unknown response code, per source: out of service, work accounted for.
_RC_DEFAULT = Row(OFF, note="unknown response code: safe default")

# Error-reply codes (type 82/88/86 reply_code; reference §4.3, §5.1).
_REPLY: dict[int, Row] = {
    RY.MACHINE_FAILURE: Row(MFV, True, "state byte refines this (MF rows)"),
    RY.PREEMPT_FAILURE: Row(RE, True, "card preempted the request: outcome unknown"),
    RY.CHECKPT_FAILURE: Row(RE, True, "card checkpoint failure: outcome unknown"),
    RY.MESSAGE_TYPE: Row(RE, False, "card does not speak this message type: rejected before execution"),
    RY.INVALID_COMM_CD: Row(RE, False, "command code rejected before execution"),
    RY.MESSAGE_MALFORMD: Row(FC),
    RY.INVALID_MSG_LEN: Row(FC),
    RY.RESERVD_FIELD: Row(FC),
    RY.FORMAT_FIELD: Row(FC),
    RY.INVALID_COMMAND: Row(FC, note="unknown function (DESIGN §2: failed); kernel retries"),
    RY.KEY_TYPE: Row(FC),
    RY.MALFORMED_MSG: Row(FC),
    RY.INVALID_SPECIAL_CMD: Row(FC),
    RY.INVALID_DOMAIN_PRECHECK: Row(FC, note="wrong domain"),
    RY.RESERVED_FIELDO: Row(FC),
    RY.WORD_ALIGNMENT: Row(FC),
    RY.MESSAGE_LENGTH: Row(FC),
    RY.OPERAND_INVALID: Row(FC),
    RY.OPERAND_SIZE: Row(FC),
    RY.EVEN_MOD_IN_OPND: Row(FC),
    RY.RESERVED_FIELD: Row(FC),
    RY.INVALID_DOMAIN_PENDING: Row(FC, note="wrong domain"),
    RY.FILTERED_BY_HYPERVISOR: Row(FC),
    RY.TRANSPORT_FAIL: Row(RE, True, "card-internal transport failure: outcome unknown"),
    RY.PACKET_TRUNCATED: Row(FC),
    RY.ZERO_BUFFER_LEN: Row(FC),
}
_REPLY_DEFAULT = Row(OFF, True, "unknown reply code: safe default")

# Machine-failure state byte of our type 82 extension (DESIGN §6).
_MF: dict[int, Row] = {
    MF.IN_PROCESS: Row(MFV, True, "an engine had started it"),
    MF.REQUEST_PENDING: Row(MFV, False, "it never left its slot: safe to re-drive"),
    MF.UNKNOWN: Row(MFV, True, "plain machine-failure reply: assume it may have run"),
}
_MF_DEFAULT = Row(MFV, True, "unknown machine-failure state: assume it may have run")

SOURCES = ("NQAP", "DQAP", "TAPQ", "RESET", "AQIC")


def _unknown(source: str, code: int, row: Row, seen: set[tuple[str, int]] | None) -> Row:
    """Log an unknown code: once per ``seen`` set (a classifier's), every time without one."""
    key = (source, code)
    if seen is None or key not in seen:
        if seen is not None:
            seen.add(key)
        log.warning("unknown %s code %#04x: %s (%s)", source, code, row.verdict.value, row.note)
    return row


# Flattened lookup built once: the hot path is one dict.get.
_RC_TABLE: dict[tuple[str, int], Row] = {}
for _src in SOURCES:
    for _code, _row in _COMMON_RC.items():
        _RC_TABLE[(_src, int(_code))] = _row
    for _code, _row in _OVERRIDES.get(_src, {}).items():
        _RC_TABLE[(_src, int(_code))] = _row


def classify_rc(source: str, code: int, seen: set[tuple[str, int]] | None = None) -> Row:
    """Row for an AP response code returned by ``source`` (one of :data:`SOURCES`)."""
    row = _RC_TABLE.get((source, code))
    if row is None:
        if source not in SOURCES:
            raise ValueError(f"unknown classifier source {source!r}")
        return _unknown(source, code, _RC_DEFAULT, seen)
    return row


def classify_reply(
    reply_code: int, mf_state: int | None = None, seen: set[tuple[str, int]] | None = None
) -> Row:
    """Row for an error reply; a machine-failure reply is refined by its state byte."""
    if reply_code == RY.MACHINE_FAILURE:
        row = _MF.get(mf_state if mf_state is not None else MF.UNKNOWN)
        return row if row is not None else _unknown("MF", mf_state or 0, _MF_DEFAULT, seen)
    row = _REPLY.get(reply_code)
    return row if row is not None else _unknown("REPLY", reply_code, _REPLY_DEFAULT, seen)


def table() -> dict[tuple[str, int], Row]:
    """Every explicit row, for documentation and for the test that walks the whole table."""
    rows = dict(_RC_TABLE)
    rows.update({("REPLY", int(k)): v for k, v in _REPLY.items()})
    rows.update({("MF", int(k)): v for k, v in _MF.items()})
    return rows


DEFAULTS: dict[str, Row] = {"RC": _RC_DEFAULT, "REPLY": _REPLY_DEFAULT, "MF": _MF_DEFAULT}

# CCA application return codes of a type 86 reply whose AP-level reply_code is 0 (reference §4.4).
_CCA: dict[int, Row] = {
    8: Row(FC, note="CCA application error: the request is bad"),
    12: Row(RE, True, "CCA environment error: outcome unknown"),
    16: Row(OFF, True, "CCA severe error: card needs attention"),
}
_CCA_DEFAULT = Row(OFF, True, "unknown CCA return code: safe default")
DEFAULTS["CCA"] = _CCA_DEFAULT


def classify_cca(rtcode: int, seen: set[tuple[str, int]] | None = None) -> Row:
    """Row for a CPRB reply with CCA return code ``rtcode`` > 4 (0 ok, 4 warning are successes)."""
    row = _CCA.get(rtcode)
    return row if row is not None else _unknown("CCA", rtcode, _CCA_DEFAULT, seen)


class Classifier:
    """The classifier as one driver core uses it: the shared read-only tables, plus this core's
    memory of the unknown codes it has already logged (so each is logged once per client, and no
    process-wide set grows or leaks between clients and tests)."""

    __slots__ = ("unknown_seen",)

    def __init__(self) -> None:
        self.unknown_seen: set[tuple[str, int]] = set()

    def rc(self, source: str, code: int) -> Row:
        row = _RC_TABLE.get((source, code))
        return row if row is not None else classify_rc(source, code, self.unknown_seen)

    def reply(self, reply_code: int, mf_state: int | None = None) -> Row:
        return classify_reply(reply_code, mf_state, self.unknown_seen)

    def cca(self, rtcode: int) -> Row:
        return classify_cca(rtcode, self.unknown_seen)
