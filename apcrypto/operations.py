"""The operations every client offers, written once for the threaded and the asyncio client.

A client supplies ``_submit(request, idempotent, deadline, block)`` (returning its kind of future)
and ``_failed(error)`` (a future already failed with ``error``); this mixin turns each operation into
a :class:`~apcrypto.requests.Request`.  Arguments that cannot be encoded at all (data longer than
the modulus, a modulus over 512 bytes) become a future failed with ``BadRequest``, the same outcome
the card gives for an operand it rejects; arguments of the wrong type raise ``TypeError`` at once.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any, Generic, TypeVar

from apcrypto.errors import BadRequest, TargetNotHeld
from apcrypto.futures import finished
from apcrypto.requests import CounterIncrement, KeyRead, KeyStore, ModExpo, ModExpoCrt, RandomBytes, Request
from apformats.results import qid_str

#: What each client returns for a result of bytes, int, None and any type: ``Future[bytes]`` ... for
#: the threaded client, ``asyncio.Future[bytes]`` ... for the asyncio one, so that a type checker
#: sees ``client.mod_expo(...)`` as the future it is (``py.typed``).
FBytes = TypeVar("FBytes", covariant=True)
FInt = TypeVar("FInt", covariant=True)
FNone = TypeVar("FNone", covariant=True)
FAny = TypeVar("FAny", covariant=True)


def failed_future(error: BaseException) -> Future[Any]:
    """A concurrent future already failed with ``error``: what a request refused before it reached
    the core (bad operands, a bad target) hands back, so every call still returns a future."""
    return finished(error=error)


class Operations(Generic[FBytes, FInt, FNone, FAny]):
    """Mixin: ``mod_expo``, ``mod_expo_crt``, ``random_bytes``, ``counter_increment``, ``key_store``,
    ``key_read`` and ``submit``.  ``deadline`` is seconds from now; ``block`` says what to do when the
    host-side queue is at its bound (wait, or raise ``HostQueueFull``).  ``apqn=(card, domain)`` or
    ``card=`` pins a request to that queue (or any held queue of that card): it runs there or ends
    ``DeviceUnavailable``, never on another card (docs/outcomes.md, "Targeting")."""

    def mod_expo(
        self,
        data: bytes,
        exponent: int | bytes,
        modulus: int | bytes,
        *,
        idempotent: bool = True,
        deadline: float | None = None,
        block: bool = True,
        apqn: tuple[int, int] | None = None,
        card: int | None = None,
    ) -> FBytes:
        """RSA ME (``data ** exponent mod modulus``); the result is bytes of the modulus length."""
        return self._request(ModExpo, (data, exponent, modulus), idempotent, deadline, block, apqn, card)

    def mod_expo_crt(
        self,
        data: bytes,
        p: int | bytes,
        q: int | bytes,
        dp: int | bytes,
        dq: int | bytes,
        qinv: int | bytes,
        *,
        idempotent: bool = True,
        deadline: float | None = None,
        block: bool = True,
        apqn: tuple[int, int] | None = None,
        card: int | None = None,
    ) -> FBytes:
        """RSA with CRT key parts (``qinv`` = q⁻¹ mod p); idempotent by default."""
        return self._request(ModExpoCrt, (data, p, q, dp, dq, qinv), idempotent, deadline, block, apqn, card)

    def random_bytes(
        self,
        n: int,
        *,
        idempotent: bool = True,
        deadline: float | None = None,
        block: bool = True,
        apqn: tuple[int, int] | None = None,
        card: int | None = None,
    ) -> FBytes:
        """``n`` random bytes from a CCA coprocessor; idempotent by default (asking again is harmless)."""
        return self._request(RandomBytes, (n,), idempotent, deadline, block, apqn, card)

    def counter_increment(
        self,
        by: int = 1,
        *,
        idempotent: bool = False,
        deadline: float | None = None,
        block: bool = True,
        apqn: tuple[int, int] | None = None,
        card: int | None = None,
    ) -> FInt:
        """State-changing: never run twice; may end ``Indeterminate`` if a card fails under it.
        ``idempotent=True`` is the caller's word that running it twice is acceptable: an increment
        a failing card may have applied is then retried instead of reported ``Indeterminate``."""
        return self._request(CounterIncrement, (by,), idempotent, deadline, block, apqn, card)

    def key_store(
        self,
        slot: int,
        key: bytes,
        *,
        idempotent: bool = False,
        deadline: float | None = None,
        block: bool = True,
        apqn: tuple[int, int] | None = None,
        card: int | None = None,
    ) -> FNone:
        """State-changing: the key lives in ``slot`` of one APQN (card and domain): read it back with
        ``key_read(slot, apqn=...)`` on the same APQN (docs/outcomes.md, "State per card and domain").
        Not idempotent by default; ``idempotent=True`` says storing it again is acceptable."""
        return self._request(KeyStore, (slot, key), idempotent, deadline, block, apqn, card)

    def key_read(
        self,
        slot: int,
        *,
        idempotent: bool = True,
        deadline: float | None = None,
        block: bool = True,
        apqn: tuple[int, int] | None = None,
        card: int | None = None,
    ) -> FBytes:
        """The key stored in ``slot`` of the APQN the request runs on (target it with ``apqn=``);
        idempotent by default (a read)."""
        return self._request(KeyRead, (slot,), idempotent, deadline, block, apqn, card)

    def submit(
        self,
        request: Request,
        idempotent: bool = False,
        *,
        deadline: float | None = None,
        block: bool = True,
        apqn: tuple[int, int] | None = None,
        card: int | None = None,
    ) -> FAny:
        """Submit any :class:`~apcrypto.requests.Request`; not idempotent unless the caller says so."""
        if not isinstance(request, Request):
            raise TypeError(f"submit takes an apcrypto.requests.Request, not {type(request).__name__}")
        return self._submit(request, idempotent, deadline, block, self._target(apqn, card))

    # -- what a client supplies --
    def _submit(
        self,
        request: Request,
        idem: bool | None,
        deadline: float | None,
        block: bool,
        target: frozenset[int] | None = None,
    ) -> Any:
        raise NotImplementedError

    def _held_qids(self) -> list[int]:
        """The APQNs (qids) this client holds: what ``apqn=`` / ``card=`` may name."""
        return list(self.transport.qids())  # type: ignore[attr-defined]

    def _failed(self, error: BaseException) -> Any:
        raise NotImplementedError

    def _request(
        self,
        cls: type[Request],
        args: tuple[Any, ...],
        idem: bool | None,
        deadline: float | None,
        block: bool,
        apqn: tuple[int, int] | None = None,
        card: int | None = None,
    ) -> Any:
        # a bad target raises at once, whatever the operands (no target: no call, the common case)
        target = None if apqn is None and card is None else self._target(apqn, card)
        try:
            request = cls(*args)
        except ValueError as exc:
            return self._failed(BadRequest(f"invalid {cls.__name__}: {exc}"))
        return self._submit(request, idem, deadline, block, target)

    def _target(self, apqn: tuple[int, int] | None, card: int | None) -> frozenset[int] | None:
        """The qids a request may run on: ``apqn=(card, domain)`` is that one queue, ``card=`` every
        queue of that card this client holds, neither: any queue of the request's kind (None).
        Raises :class:`~apcrypto.errors.TargetNotHeld` for a target that is malformed or not held."""
        if apqn is None and card is None:
            return None
        if apqn is not None and card is not None:
            raise TargetNotHeld("give apqn=(card, domain) or card=, not both")
        held = self._held_qids()
        if apqn is not None:
            if (
                not isinstance(apqn, tuple)
                or len(apqn) != 2
                or not all(type(x) is int and 0 <= x <= 0xFF for x in apqn)
            ):
                raise TargetNotHeld(f"apqn must be a (card, domain) tuple of ints 0..255, not {apqn!r}")
            qid = apqn[0] << 8 | apqn[1]
            if qid not in held:
                raise TargetNotHeld(
                    f"APQN {qid_str(qid)} is not one of this client's queues "
                    f"({', '.join(qid_str(q) for q in sorted(held)) or 'none'})",
                    qid=qid,
                )
            return frozenset((qid,))
        if type(card) is not int or not 0 <= card <= 0xFF:
            raise TargetNotHeld(f"card must be an int 0..255, not {card!r}")
        on_card = frozenset(q for q in held if q >> 8 == card)
        if not on_card:
            raise TargetNotHeld(f"card {card:02x} has none of this client's queues")
        return on_card
