"""Exceptions callers see.  Every request ends in a result or exactly one of these.

Each carries the APQN (``qid``, or None when the request never reached a queue), the psmid of the
attempt that decided it, and the codes that led to it (AP response code, reply code, machine-failure
state), so an operator can tie a caller's error to the card's log.
"""

from __future__ import annotations

from apformats.codes import ReplyCode, ResponseCode
from apformats.results import qid_str

#: What each error-reply code (type 82/88/86 ``reply_code``, reference §4.3) means to the caller, in
#: words.  Data, not code: the names come from :class:`apformats.codes.ReplyCode`; this adds why.
REPLY_MEANINGS: dict[int, str] = {
    ReplyCode.MACHINE_FAILURE: "the card suffered a machine failure while holding the request",
    ReplyCode.PREEMPT_FAILURE: "the card pre-empted the request; it may have run",
    ReplyCode.CHECKPT_FAILURE: "the card failed a checkpoint; the request may have run",
    ReplyCode.MESSAGE_TYPE: "the card does not accept this message type",
    ReplyCode.INVALID_COMM_CD: "the card does not know this command code",
    ReplyCode.MESSAGE_MALFORMD: "the message is malformed",
    ReplyCode.INVALID_MSG_LEN: "the message length is not valid for its type",
    ReplyCode.RESERVD_FIELD: "a reserved field of the message is not zero",
    ReplyCode.FORMAT_FIELD: "a format field of the message is not valid",
    ReplyCode.INVALID_COMMAND: "the card does not support this function",
    ReplyCode.KEY_TYPE: "the key type is not valid",
    ReplyCode.MALFORMED_MSG: "the message is malformed",
    ReplyCode.INVALID_SPECIAL_CMD: "the special-command flag is not valid here",
    ReplyCode.INVALID_DOMAIN_PRECHECK: "the request names a domain this queue does not serve",
    ReplyCode.RESERVED_FIELDO: "a reserved field of the message is not zero",
    ReplyCode.WORD_ALIGNMENT: "an operand is not word-aligned",
    ReplyCode.MESSAGE_LENGTH: "the message is longer or shorter than its fields say",
    ReplyCode.OPERAND_INVALID: "an operand is invalid (data not below the modulus, a zero or bad key part)",
    ReplyCode.OPERAND_SIZE: "an operand has a size the function does not support",
    ReplyCode.EVEN_MOD_IN_OPND: "the modulus is even (RSA needs an odd modulus)",
    ReplyCode.RESERVED_FIELD: "a reserved field of the message is not zero",
    ReplyCode.INVALID_DOMAIN_PENDING: "the request names a domain this queue does not serve",
    ReplyCode.FILTERED_BY_HYPERVISOR: "the hypervisor filtered the request out",
    ReplyCode.TRANSPORT_FAIL: "the card's internal transport failed; the request may have run",
    ReplyCode.PACKET_TRUNCATED: "the message was truncated",
    ReplyCode.ZERO_BUFFER_LEN: "a buffer length is zero",
}

#: What each AP response code (status word, reference §2.2) means, where a caller may meet it.
RESPONSE_MEANINGS: dict[int, str] = {
    ResponseCode.NORMAL: "accepted",
    ResponseCode.Q_NOT_AVAIL: "the queue is not available to this host",
    ResponseCode.RESET_IN_PROGRESS: "the queue is being reset",
    ResponseCode.DECONFIGURED: "the card is deconfigured",
    ResponseCode.CHECKSTOPPED: "the card is checkstopped",
    ResponseCode.BUSY: "the card is busy (machine-failure recovery or firmware work)",
    ResponseCode.INVALID_ADDRESS: "the card has no such domain",
    ResponseCode.OTHERWISE_CHANGED: "the queue state changed otherwise",
    ResponseCode.Q_FULL: "every slot of the queue is in use (or, for DQAP, no reply is pending)",
    ResponseCode.MESSAGE_TOO_BIG: "the message exceeds the card's maximum size",
    ResponseCode.REQ_FAC_NOT_INST: "the requested facility is not installed",
    ResponseCode.INVALID_DOMAIN: "this domain accepts no requests (control-only domain)",
}


def _code_name(enum: type[ReplyCode] | type[ResponseCode], code: int) -> str:
    try:
        return enum(code).name
    except ValueError:
        return "unknown code"


def describe_reply_code(code: int) -> str:
    """``"0x82 OPERAND_INVALID: an operand is invalid (...)"``: the number, its name, what it means.
    0 is no error reply at all: a normal reply, whose own codes (a CCA CPRB's rc/rs) say what failed."""
    if code == 0:
        return (
            "0x00 none: a normal reply, not an error reply (its own return and reason codes say what failed)"
        )
    meaning = REPLY_MEANINGS.get(code, "not a code this driver knows")
    return f"{code:#04x} {_code_name(ReplyCode, code)}: {meaning}"


def describe_response_code(code: int) -> str:
    """``"0x05 BUSY: the card is busy (...)"``: an AP response code, its name and what it means."""
    meaning = RESPONSE_MEANINGS.get(code, "not a code this driver knows")
    return f"{code:#04x} {_code_name(ResponseCode, code)}: {meaning}"


class ApcryptoError(Exception):
    """Base of every apcrypto error."""

    def __init__(
        self,
        message: str,
        *,
        qid: int | None = None,
        psmid: int | None = None,
        response_code: int | None = None,
        reply_code: int | None = None,
        mf_state: int | None = None,
    ) -> None:
        self.message = message
        self.qid = qid
        self.psmid = psmid
        self.response_code = response_code
        self.reply_code = reply_code
        self.mf_state = mf_state
        super().__init__(self._render())

    @property
    def apqn(self) -> str | None:
        """The APQN in sysfs spelling (``XX.YYYY``), if the error belongs to a queue."""
        return None if self.qid is None else qid_str(self.qid)

    @property
    def meaning(self) -> str | None:
        """What the card's codes mean, in words (None when no code led to this error)."""
        said = []
        if self.reply_code is not None:
            said.append(describe_reply_code(self.reply_code))
        if self.response_code is not None:
            said.append(describe_response_code(self.response_code))
        return "; ".join(said) or None

    def _render(self) -> str:
        # a message that ends in ":" had nothing to add after it; the code's meaning says what happened
        parts = [self.message.rstrip().rstrip(":")]
        if self.reply_code is not None:
            parts.append(f"[reply code {describe_reply_code(self.reply_code)}]")
        elif self.response_code is not None:
            parts.append(f"[response code {describe_response_code(self.response_code)}]")
        if self.qid is not None:
            parts.append(f"apqn={qid_str(self.qid)}")
        if self.psmid is not None:
            parts.append(f"psmid={self.psmid:#x}")
        if self.response_code is not None:
            parts.append(f"rc={self.response_code:#04x}")
        if self.reply_code is not None:
            parts.append(f"ry={self.reply_code:#04x}")
        if self.mf_state is not None:
            parts.append(f"mf_state={self.mf_state}")
        return " ".join(parts)

    def __reduce__(self):  # keep the codes when pickled (errors cross process boundaries)
        return (
            _rebuild,
            (
                type(self),
                self.message,
                self.qid,
                self.psmid,
                self.response_code,
                self.reply_code,
                self.mf_state,
                dict(self.__dict__),
            ),
        )


def _rebuild(
    cls: type[ApcryptoError],
    message: str,
    qid: int | None,
    psmid: int | None,
    rc: int | None,
    ry: int | None,
    mf: int | None,
    state: dict[str, object],
) -> ApcryptoError:
    obj = cls.__new__(cls)
    ApcryptoError.__init__(obj, message, qid=qid, psmid=psmid, response_code=rc, reply_code=ry, mf_state=mf)
    obj.__dict__.update(state)
    return obj


class BadRequest(ApcryptoError):
    """The request itself is bad (operand invalid, message too big, wrong domain, unknown function).

    Outcome ``failed``: retrying it anywhere gives the same answer.
    """


class TargetNotHeld(BadRequest, ValueError):
    """``apqn=`` / ``card=`` named a queue this client does not hold (not among its APQNs, or a
    malformed target).  Raised at submit, before anything is sent; a ``ValueError`` too, since it
    is the argument that is wrong.  ``qid`` is the APQN asked for, when it was one."""


class Indeterminate(ApcryptoError):
    """The request may or may not have run: it was in process on a card that failed, or sent to a card
    that died without replying.  It is never retried automatically unless marked idempotent."""

    def __init__(self, message: str, *, reason: str = "", **kw: int | None) -> None:
        self.reason = reason
        super().__init__(message, **kw)


class DeviceUnavailable(ApcryptoError):
    """No healthy queue of the kind the request needs is left (outcome ``unavailable``)."""


class ApqnInUse(DeviceUnavailable):
    """The server refused the session: the APQNs asked for (or every one this client may have) are
    assigned to other sessions.  An emulator server gives each APQN to one session at a time, as
    vfio-ap gives it to one guest; ask for other domains, or none (any free one), or wait for the
    holder to leave (a dropped holder's APQNs are freed when its grace ends).  Raised by ``connect``
    (``tcp://``); ``code`` is the handshake's ERROR code, the message names the APQNs.
    """

    def __init__(self, message: str, *, code: int = 0, **kw: int | None) -> None:
        self.code = code
        super().__init__(message, **kw)


class DeadlineExceeded(ApcryptoError):
    """The caller's deadline expired before an outcome was known (outcome ``unavailable``).

    ``may_have_run`` is True when the request had already been handed to a card: its reply, if one
    comes, is counted as late and dropped, never delivered, and the request is never re-driven.
    """

    def __init__(self, message: str, *, may_have_run: bool = False, **kw: int | None) -> None:
        self.may_have_run = may_have_run
        super().__init__(message, **kw)


class HostQueueFull(ApcryptoError):
    """``submit(..., block=False)`` found the host-side queue at its bound; nothing was queued."""


class ClientClosed(ApcryptoError):
    """The client was closed; the request was not accepted (or was cut off by ``close``)."""


class CoreMisuse(RuntimeError):
    """A runner called the sans-I/O core in a way its contract forbids: always a bug, never the card."""


__all__ = [
    "ApcryptoError",
    "ApqnInUse",
    "BadRequest",
    "ClientClosed",
    "CoreMisuse",
    "DeadlineExceeded",
    "DeviceUnavailable",
    "HostQueueFull",
    "Indeterminate",
    "TargetNotHeld",
]
