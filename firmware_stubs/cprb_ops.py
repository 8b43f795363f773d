"""The CPRB functions of our CCA-mode card (type 6 in, type 86 out; layout in apformats.messages).

``RL`` random bytes (from the context's seeded ``random.Random``, so runs replay), ``CI`` counter
increment, ``KS`` key-slot store, ``KR`` key-slot read.  ``CI`` and ``KS`` change the
:class:`DomainStore`; that is what makes a double execution observable.  A payload the function
cannot use is a CCA application error (type 86, rtcode 8), not an AP-level reply code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

from apformats.messages import build_cprb_reply
from firmware_stubs.context import FirmwareContext, FirmwareResult
from firmware_stubs.reply_codes import CCA_STATUS

#: ``ZCRYPT_RNG_BUFFER_SIZE`` (reference/zcrypt.md §4.5): most random bytes one request returns.
RNG_MAX_BYTES = 4096

Handler = Callable[[bytes, FirmwareContext], FirmwareResult]


def _reply(fc: str, function: str, payload: bytes = b"", effect: str | None = None) -> FirmwareResult:
    return FirmwareResult(build_cprb_reply(fc, payload), function, True, 0, effect)


def _cca_error(fc: str, function: str, condition: str) -> FirmwareResult:
    rtcode, rscode = CCA_STATUS[condition]
    return FirmwareResult(build_cprb_reply(fc, rtcode=rtcode, rscode=rscode), function, False, 0, None)


def random_bytes(payload: bytes, ctx: FirmwareContext) -> FirmwareResult:
    """``RL``: payload u16 count → that many random bytes."""
    if len(payload) != 2:
        return _cca_error("RL", "RNG", "payload_length")
    count = int.from_bytes(payload, "big")
    if count > RNG_MAX_BYTES:
        return _cca_error("RL", "RNG", "value_range")
    return _reply("RL", "RNG", ctx.rng.randbytes(count))


def counter_increment(payload: bytes, ctx: FirmwareContext) -> FirmwareResult:
    """``CI``: payload u64 increment → u64 new counter value."""
    if len(payload) != 8:
        return _cca_error("CI", "CPRB:CI", "payload_length")
    try:
        old, new = ctx.store.increment(int.from_bytes(payload, "big"))
    except ValueError:
        return _cca_error("CI", "CPRB:CI", "value_range")
    effect = f"counter {old}->{new}" if new != old else None
    return _reply("CI", "CPRB:CI", new.to_bytes(8, "big"), effect)


def key_store(payload: bytes, ctx: FirmwareContext) -> FirmwareResult:
    """``KS``: payload u8 slot + key bytes (at least one) → empty reply."""
    if len(payload) < 2:
        return _cca_error("KS", "CPRB:KS", "payload_length")
    slot, key = payload[0], payload[1:]
    ctx.store.store_key(slot, key)
    return _reply("KS", "CPRB:KS", b"", f"key slot {slot} stored ({len(key)} bytes)")


def key_read(payload: bytes, ctx: FirmwareContext) -> FirmwareResult:
    """``KR``: payload u8 slot → the key bytes stored there."""
    if len(payload) != 1:
        return _cca_error("KR", "CPRB:KR", "payload_length")
    key = ctx.store.key_slots.get(payload[0])
    if key is None:
        return _cca_error("KR", "CPRB:KR", "slot_empty")
    return _reply("KR", "CPRB:KR", key)


HANDLERS: Mapping[str, Handler] = MappingProxyType(
    {"RL": random_bytes, "CI": counter_increment, "KS": key_store, "KR": key_read}
)
