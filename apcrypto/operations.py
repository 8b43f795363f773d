"""The operations every client offers, written once for the threaded and the asyncio client.

A client supplies ``_submit(request, idempotent, deadline, block)`` (returning its kind of future)
and ``_failed(error)`` (a future already failed with ``error``); this mixin turns each operation into
a :class:`~apcrypto.requests.Request`.  Arguments that cannot be encoded at all (data longer than
the modulus, a modulus over 512 bytes) become a future failed with ``BadRequest``, the same outcome
the card gives for an operand it rejects; arguments of the wrong type raise ``TypeError`` at once.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from apcrypto.errors import BadRequest
from apcrypto.requests import CounterIncrement, KeyRead, KeyStore, ModExpo, ModExpoCrt, RandomBytes, Request

#: What each client returns for a result of bytes, int, None and any type: ``Future[bytes]`` ... for
#: the threaded client, ``asyncio.Future[bytes]`` ... for the asyncio one, so that a type checker
#: sees ``client.mod_expo(...)`` as the future it is (``py.typed``).
FBytes = TypeVar("FBytes", covariant=True)
FInt = TypeVar("FInt", covariant=True)
FNone = TypeVar("FNone", covariant=True)
FAny = TypeVar("FAny", covariant=True)


class Operations(Generic[FBytes, FInt, FNone, FAny]):
    """Mixin: ``mod_expo``, ``mod_expo_crt``, ``random_bytes``, ``counter_increment``, ``key_store``,
    ``key_read`` and ``submit``.  ``deadline`` is seconds from now; ``block`` says what to do when the
    host-side queue is at its bound (wait, or raise ``HostQueueFull``)."""

    def mod_expo(
        self,
        data: bytes,
        exponent: int | bytes,
        modulus: int | bytes,
        *,
        idempotent: bool = True,
        deadline: float | None = None,
        block: bool = True,
    ) -> FBytes:
        """RSA ME (``data ** exponent mod modulus``); the result is bytes of the modulus length."""
        return self._request(ModExpo, (data, exponent, modulus), idempotent, deadline, block)

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
    ) -> FBytes:
        """RSA with CRT key parts (``qinv`` = q⁻¹ mod p); idempotent by default."""
        return self._request(ModExpoCrt, (data, p, q, dp, dq, qinv), idempotent, deadline, block)

    def random_bytes(self, n: int, *, deadline: float | None = None, block: bool = True) -> FBytes:
        return self._request(RandomBytes, (n,), None, deadline, block)

    def counter_increment(self, by: int = 1, *, deadline: float | None = None, block: bool = True) -> FInt:
        """State-changing: never run twice; may end ``Indeterminate`` if a card fails under it."""
        return self._request(CounterIncrement, (by,), None, deadline, block)

    def key_store(self, slot: int, key: bytes, *, deadline: float | None = None, block: bool = True) -> FNone:
        return self._request(KeyStore, (slot, key), None, deadline, block)

    def key_read(self, slot: int, *, deadline: float | None = None, block: bool = True) -> FBytes:
        return self._request(KeyRead, (slot,), None, deadline, block)

    def submit(
        self,
        request: Request,
        idempotent: bool = False,
        *,
        deadline: float | None = None,
        block: bool = True,
    ) -> FAny:
        """Submit any :class:`~apcrypto.requests.Request`; not idempotent unless the caller says so."""
        if not isinstance(request, Request):
            raise TypeError(f"submit takes an apcrypto.requests.Request, not {type(request).__name__}")
        return self._submit(request, idempotent, deadline, block)

    # -- what a client supplies --
    def _submit(self, request: Request, idem: bool | None, deadline: float | None, block: bool) -> Any:
        raise NotImplementedError

    def _failed(self, error: BaseException) -> Any:
        raise NotImplementedError

    def _request(
        self,
        cls: type[Request],
        args: tuple[Any, ...],
        idem: bool | None,
        deadline: float | None,
        block: bool,
    ) -> Any:
        try:
            request = cls(*args)
        except ValueError as exc:
            return self._failed(BadRequest(f"invalid {cls.__name__}: {exc}"))
        return self._submit(request, idem, deadline, block)
