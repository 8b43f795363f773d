"""Request objects: what a caller can ask of a card, and how each is encoded and decoded.

A request knows the card mode it needs (``"accel"`` speaks type 50/80, ``"cca"`` speaks our type 6
CPRB), its operation class (which sets its dispatch weight, as zcrypt's speed ratings do), whether
it is idempotent by default, how to build its message for a domain and how to read a success reply.
Nothing here does I/O.
"""

from __future__ import annotations

import struct
from abc import ABC, abstractmethod
from functools import lru_cache
from typing import Any, ClassVar

from apformats import messages as msgs
from apformats.msgtypes import VARIANT_BY_KEYBLOCK, Reply

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


#: Keys whose encoded head (header and key fields) each request kind keeps, newest first: a server
#: signs with a handful of keys, so the fields that do not change are laid out once per key, not
#: once per request.  Bounded, so memory stays flat whatever keys callers pass.
KEY_CACHE_SIZE = 64


def _me_checked(data: bytes, exponent: int | bytes, modulus: int | bytes) -> tuple[int, str, bytes]:
    """ME's checks and encoding in the order callers see their errors: modulus, data, exponent."""
    if isinstance(modulus, bytes | bytearray):
        modulus = bytes(modulus).lstrip(b"\0")  # the variant follows the significant length
    mod_len = _length(modulus, "modulus")
    if not 1 <= mod_len <= 512:
        raise ValueError(f"modulus must be 1..512 bytes and nonzero, got {mod_len} bytes")
    if _length(data, "data", significant=False) > mod_len:
        raise ValueError(f"data is longer than the {mod_len}-byte modulus")
    _length(exponent, "exponent")
    return mod_len, _class("MEX", mod_len), msgs.build_mex(data, exponent, modulus)


@lru_cache(maxsize=KEY_CACHE_SIZE, typed=True)
def _me_key(exponent: int | bytes, modulus: int | bytes) -> tuple[int, str, bytes, int]:
    """One key's (mod_len, function, encoded head, message field size): the message built for empty
    data cut before its message field.  Raises (and caches nothing) for a key that cannot be
    encoded; the caller then takes the checked path, which raises what it always did."""
    mod_len, function, msg = _me_checked(b"", exponent, modulus)
    return (mod_len, function, *_head(msg))


def _head(msg: bytes) -> tuple[bytes, int]:
    """A type 50 message cut before its message field (the last field), and that field's size."""
    field = VARIANT_BY_KEYBLOCK[int.from_bytes(msg[8:10], "big")].mod_size
    return msg[: len(msg) - field], field


def _operand(data: object, limit: int) -> bytes | None:
    """``data`` as the bytes its field right-justifies (ints minimal, bytes as given), or None when
    it is not a plain operand of at most ``limit`` bytes (the checked path then says why)."""
    t = type(data)
    if t is bytes:
        return data if len(data) <= limit else None  # type: ignore[arg-type,return-value]
    if t is int and data >= 0:  # type: ignore[operator]
        n = (data.bit_length() + 7) // 8  # type: ignore[attr-defined]
        return data.to_bytes(n, "big") if n <= limit else None  # type: ignore[attr-defined]
    return None


class ModExpo(Request):
    """RSA modular exponentiation (ME): ``data ** exponent mod modulus``.  Pure, hence idempotent.

    The type 50 head of a key (header, exponent and modulus fields) is encoded once per key and kept
    in a bounded LRU (:data:`KEY_CACHE_SIZE`); a request copies it and lays out its data.  The bytes
    are those :func:`apformats.messages.build_mex` builds (``tests/test_request_encoding.py``)."""

    mode = "accel"
    idempotent_default = True

    def __init__(self, data: bytes, exponent: int | bytes, modulus: int | bytes) -> None:
        if type(modulus) is bytes:
            modulus = modulus.lstrip(b"\0")  # the variant follows the significant length
        try:
            mod_len, function, head, field = _me_key(exponent, modulus)
            d = _operand(data, mod_len)
        except (TypeError, ValueError):  # unhashable or not encodable: the checked path says why
            d = None
        if d is None:
            self.mod_len, self.function, self._msg = _me_checked(data, exponent, modulus)
            return
        self.mod_len = mod_len
        self.function = function
        self._msg = head + bytes(field - len(d)) + d if len(d) < field else head + d

    def message(self, domain: int) -> bytes:
        return self._msg

    def decode(self, reply: Reply) -> bytes:
        res = reply.result
        n = len(res)
        if n < self.mod_len:
            raise ValueError(f"type 80 result of {n} bytes is shorter than the modulus ({self.mod_len})")
        if n == self.mod_len and type(res) is bytes:
            return res  # already the caller's bytes: no copy
        return bytes(res[-self.mod_len :])


def _crt_checked(
    data: bytes, p: int | bytes, q: int | bytes, dp: int | bytes, dq: int | bytes, qinv: int | bytes
) -> tuple[int, str, bytes]:
    """CRT's checks and encoding in the order callers see their errors: p and q, data, the rest."""
    pi = int.from_bytes(_to_bytes(p, "p"), "big")
    qi = int.from_bytes(_to_bytes(q, "q"), "big")
    if pi <= 1 or qi <= 1:
        raise ValueError("p and q must be greater than 1")
    mod_len = ((pi * qi).bit_length() + 7) // 8
    if mod_len > 512:
        raise ValueError(f"modulus of {mod_len} bytes exceeds 512")
    d = _to_bytes(data, "data")
    if len(d) > mod_len:
        raise ValueError(f"data is {len(d)} bytes, longer than the {mod_len}-byte modulus")
    return mod_len, _class("CRT", mod_len), msgs.build_crt(d, p, q, dp, dq, qinv)


@lru_cache(maxsize=KEY_CACHE_SIZE, typed=True)
def _crt_key(
    p: int | bytes, q: int | bytes, dp: int | bytes, dq: int | bytes, qinv: int | bytes
) -> tuple[int, str, bytes, int]:
    """One CRT key's (mod_len, function, encoded head, message field size); as :func:`_me_key`."""
    mod_len, function, msg = _crt_checked(b"", p, q, dp, dq, qinv)
    return (mod_len, function, *_head(msg))


def clear_key_cache() -> None:
    """Forget every cached key head.  The cache holds key material (a CRT key's private parts) for
    as long as a key stays among the newest :data:`KEY_CACHE_SIZE`; a process that retires a key
    and wants no copy of it left behind calls this."""
    _me_key.cache_clear()
    _crt_key.cache_clear()


class ModExpoCrt(Request):
    """RSA with the Chinese Remainder Theorem: ``data ** d mod p*q`` from p, q, dp, dq, qinv.

    The key's head is encoded once per key, as for :class:`ModExpo`."""

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
        try:
            mod_len, function, head, field = _crt_key(p, q, dp, dq, qinv)
            d = _operand(data, mod_len)
        except (TypeError, ValueError):  # unhashable or not encodable: the checked path says why
            d = None
        if d is None:
            self.mod_len, self.function, self._msg = _crt_checked(data, p, q, dp, dq, qinv)
            return
        self.mod_len = mod_len
        self.function = function
        self._msg = head + bytes(field - len(d)) + d if len(d) < field else head + d

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
