"""Exceptions callers see.  Every request ends in a result or exactly one of these.

Each carries the APQN (``qid``, or None when the request never reached a queue), the psmid of the
attempt that decided it, and the codes that led to it (AP response code, reply code, machine-failure
state), so an operator can tie a caller's error to the card's log.
"""

from __future__ import annotations

from apformats.results import qid_str


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

    def _render(self) -> str:
        parts = [self.message]
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
]
