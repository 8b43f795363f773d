"""Request objects: what a caller can ask of a card, and how each is encoded and decoded.

A request knows the card mode it needs (``"accel"`` speaks type 50/80, ``"cca"`` speaks our type 6
CPRB), its operation class (which sets its dispatch weight, as zcrypt's speed ratings do), whether
it is idempotent by default, how to build its message for a domain and how to read a success reply.
Nothing here does I/O.
"""

from __future__ import annotations

import struct
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from apformats import messages as msgs
from apformats.msgtypes import Reply

#: Dispatch weights per operation class: zcrypt's CEX8A / CEX8C speed ratings (reference §5.4);
#: CPRBs weigh ``speed_idx_cca`` MEDIUM (100) × the SECKEY rating (8).
WEIGHTS: dict[str, int] = {
    "MEX_1K": 6,
    "MEX_2K": 8,
    "MEX_4K": 17,
    "CRT_1K": 15,
    "CRT_2K": 54,
    "CRT_4K": 362,
    "RNG": 23,
    "CPRB": 800,
}


def _to_bytes(value: int | bytes | bytearray, name: str, length: int | None = None) -> bytes:
    if isinstance(value, bool) or not isinstance(value, int | bytes | bytearray):
        raise TypeError(f"{name} must be int or big-endian bytes, not {type(value).__name__}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{name} must not be negative")
        n = length if length is not None else max(1, (value.bit_length() + 7) // 8)
        try:
            return value.to_bytes(n, "big")
        except OverflowError:
            raise ValueError(f"{name} does not fit in {n} bytes") from None
    return bytes(value)


def _length(value: int | bytes | bytearray, name: str, *, significant: bool = True) -> int:
    """Length in bytes of a key part or operand (without leading zeros when ``significant``),
    computed without converting an int to bytes: this runs once per request."""
    if isinstance(value, bytes | bytearray):
        return len(value.lstrip(b"\0")) if significant else len(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"{name} must not be negative")
        return (value.bit_length() + 7) // 8
    raise TypeError(f"{name} must be int or big-endian bytes, not {type(value).__name__}")


def _class(kind: str, mod_len: int) -> str:
    return f"{kind}_{'1K' if mod_len <= 128 else '2K' if mod_len <= 256 else '4K'}"


class Request(ABC):
    """Base of every request.  Subclasses set ``mode``, ``function`` and ``idempotent_default``."""

    mode: ClassVar[str]
    idempotent_default: ClassVar[bool]
    function: str

    @property
    def weight(self) -> int:
        return WEIGHTS.get(self.function, WEIGHTS["CPRB"])

    @abstractmethod
    def message(self, domain: int) -> bytes:
        """The AP message for ``domain`` (type 50 ignores it; a CPRB names its target domain)."""

    @abstractmethod
    def decode(self, reply: Reply) -> Any:
        """The caller's value from a success reply; ``ValueError`` if the reply cannot carry it."""


class ModExpo(Request):
    """RSA modular exponentiation (ME): ``data ** exponent mod modulus``.  Pure, hence idempotent."""

    mode = "accel"
    idempotent_default = True

    def __init__(self, data: bytes, exponent: int | bytes, modulus: int | bytes) -> None:
        if isinstance(modulus, bytes | bytearray):
            modulus = bytes(modulus).lstrip(b"\0")  # the variant follows the significant length
        self.mod_len = _length(modulus, "modulus")
        if not 1 <= self.mod_len <= 512:
            raise ValueError(f"modulus must be 1..512 bytes and nonzero, got {self.mod_len} bytes")
        if _length(data, "data", significant=False) > self.mod_len:
            raise ValueError(f"data is longer than the {self.mod_len}-byte modulus")
        _length(exponent, "exponent")
        self.function = _class("MEX", self.mod_len)
        self._msg = msgs.build_mex(data, exponent, modulus)

    def message(self, domain: int) -> bytes:
        return self._msg

    def decode(self, reply: Reply) -> bytes:
        res = reply.result
        if len(res) < self.mod_len:
            raise ValueError(
                f"type 80 result of {len(res)} bytes is shorter than the modulus ({self.mod_len})"
            )
        return bytes(res[-self.mod_len :])


class ModExpoCrt(Request):
    """RSA with the Chinese Remainder Theorem: ``data ** d mod p*q`` from p, q, dp, dq, qinv."""

    mode = "accel"
    idempotent_default = True

    def __init__(
        self,
        data: bytes,
        p: int | bytes,
        q: int | bytes,
        dp: int | bytes,
        dq: int | bytes,
        qinv: int | bytes,
    ) -> None:
        pi = int.from_bytes(_to_bytes(p, "p"), "big")
        qi = int.from_bytes(_to_bytes(q, "q"), "big")
        if pi <= 1 or qi <= 1:
            raise ValueError("p and q must be greater than 1")
        self.mod_len = ((pi * qi).bit_length() + 7) // 8
        if self.mod_len > 512:
            raise ValueError(f"modulus of {self.mod_len} bytes exceeds 512")
        d = _to_bytes(data, "data")
        if len(d) > self.mod_len:
            raise ValueError(f"data is {len(d)} bytes, longer than the {self.mod_len}-byte modulus")
        self.function = _class("CRT", self.mod_len)
        self._msg = msgs.build_crt(d, p, q, dp, dq, qinv)

    def message(self, domain: int) -> bytes:
        return self._msg

    decode = ModExpo.decode


class Cprb(Request):
    """A CPRB for a CCA coprocessor; subclasses fix the function code and payload layout."""

    mode = "cca"
    idempotent_default = False
    fc: ClassVar[str]

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.function = "RNG" if self.fc == "RL" else f"CPRB:{self.fc}"

    def message(self, domain: int) -> bytes:
        return msgs.build_cprb(self.fc, domain, self.payload)

    def decode(self, reply: Reply) -> Any:
        return bytes(reply.result)


class RandomBytes(Cprb):
    """``n`` random bytes from the card (``RL``).  Idempotent: asking again is harmless."""

    fc = "RL"
    idempotent_default = True

    def __init__(self, n: int) -> None:
        if not 1 <= n <= 4096:
            raise ValueError("random byte count must be 1..4096 (ZCRYPT_RNG_BUFFER_SIZE)")
        self.n = n
        super().__init__(struct.pack(">H", n))

    def decode(self, reply: Reply) -> bytes:
        if len(reply.result) != self.n:
            raise ValueError(f"asked for {self.n} random bytes, got {len(reply.result)}")
        return bytes(reply.result)


class CounterIncrement(Cprb):
    """Add ``by`` to the domain's monotonic counter (``CI``); returns the new value.

    State-changing: running it twice moves the counter twice, so it is never retried unless the
    driver can prove it never ran.
    """

    fc = "CI"

    def __init__(self, by: int = 1) -> None:
        if not 0 <= by < (1 << 64):
            raise ValueError(f"the counter only moves forward: by must be 0..2**64-1, got {by}")
        super().__init__(struct.pack(">Q", by))

    def decode(self, reply: Reply) -> int:
        if len(reply.result) != 8:
            raise ValueError(f"counter reply carries {len(reply.result)} bytes, expected 8")
        return int.from_bytes(reply.result, "big")


class KeyStore(Cprb):
    """Store ``key`` in the domain's key slot ``slot`` (``KS``).  State-changing."""

    fc = "KS"

    def __init__(self, slot: int, key: bytes) -> None:
        if not 0 <= slot <= 255:
            raise ValueError("key slot must be 0..255")
        super().__init__(bytes([slot]) + bytes(key))

    def decode(self, reply: Reply) -> None:
        return None


class KeyRead(Cprb):
    """Read the key in slot ``slot`` (``KR``).  Idempotent."""

    fc = "KR"
    idempotent_default = True

    def __init__(self, slot: int) -> None:
        if not 0 <= slot <= 255:
            raise ValueError("key slot must be 0..255")
        super().__init__(bytes([slot]))
