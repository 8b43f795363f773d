"""firmware_stubs CPRB functions: RNG determinism, counter and key slots, CCA application errors."""

from __future__ import annotations

import random

import pytest
from _fixtures_firmware import context

from apformats import messages as m
from apformats.msgtypes import Reply
from firmware_stubs import CCA_STATUS, DomainStore, FirmwareContext, FirmwareResult, execute

DOMAIN = 5


def _run(ctx: FirmwareContext, fc: str, payload: bytes) -> tuple[FirmwareResult, Reply]:
    res = execute(m.build_cprb(fc, DOMAIN, payload), ctx)
    return res, m.parse_reply(res.reply)


def _u64(value: int) -> bytes:
    return value.to_bytes(8, "big")


def test_rng_is_deterministic_for_a_seeded_random() -> None:
    outputs = []
    for _ in range(2):
        ctx = context("cca", domain=DOMAIN, seed=42)
        outputs.append([_run(ctx, "RL", (n).to_bytes(2, "big"))[1].result for n in (16, 4096, 0)])
    assert outputs[0] == outputs[1]
    expected = random.Random(42)
    assert outputs[0] == [expected.randbytes(16), expected.randbytes(4096), b""]
    other = context("cca", domain=DOMAIN, seed=43)
    assert _run(other, "RL", b"\x00\x10")[1].result != outputs[0][0]


def test_rng_result_shape() -> None:
    ctx = context("cca", domain=DOMAIN)
    res, reply = _run(ctx, "RL", b"\x00\x20")
    assert (res.ok, res.function, res.reply_code, res.effect) == (True, "RNG", 0, None)
    assert (reply.kind, reply.msg_type, reply.rtcode, reply.rscode, len(reply.result)) == (
        "ok",
        0x86,
        0,
        0,
        32,
    )


def test_counter_double_execution_is_observable() -> None:
    ctx = context("cca", domain=DOMAIN)
    request = m.build_cprb("CI", DOMAIN, _u64(1))
    first, second = execute(request, ctx), execute(request, ctx)  # e.g. re-driven after a failure
    assert (first.effect, second.effect) == ("counter 0->1", "counter 1->2")
    assert [m.parse_reply(r.reply).result for r in (first, second)] == [_u64(1), _u64(2)]
    assert ctx.store.counter == 2 and ctx.store.changes == 2
    assert first.function == second.function == "CPRB:CI"


def test_counter_increment_by_n_and_zero() -> None:
    ctx = context("cca", domain=DOMAIN)
    res, reply = _run(ctx, "CI", _u64(40))
    assert (res.effect, reply.result) == ("counter 0->40", _u64(40))
    res, reply = _run(ctx, "CI", _u64(0))
    assert (res.ok, res.effect, reply.result, ctx.store.changes) == (True, None, _u64(40), 1)


def test_counter_never_wraps() -> None:
    ctx = context("cca", domain=DOMAIN)
    ctx.store.counter = 2**64 - 2
    assert _run(ctx, "CI", _u64(1))[1].result == _u64(2**64 - 1)
    res, reply = _run(ctx, "CI", _u64(1))
    assert (res.ok, res.reply_code, reply.kind, (reply.rtcode, reply.rscode)) == (
        False,
        0,
        "error",
        CCA_STATUS["value_range"],
    )
    assert ctx.store.counter == 2**64 - 1


def test_key_slot_store_read_and_zeroize_keeps_counter() -> None:
    ctx = context("cca", domain=DOMAIN)
    res, reply = _run(ctx, "KS", b"\x07" + b"K" * 32)
    assert (res.ok, res.effect, reply.result) == (True, "key slot 7 stored (32 bytes)", b"")
    res, reply = _run(ctx, "KR", b"\x07")
    assert (res.ok, res.function, reply.result) == (True, "CPRB:KR", b"K" * 32)
    _run(ctx, "CI", _u64(3))
    ctx.store.zeroize()
    assert ctx.store.key_slots == {} and ctx.store.counter == 3  # counters are monotonic hardware
    res, reply = _run(ctx, "KR", b"\x07")
    assert (res.ok, reply.kind, (reply.rtcode, reply.rscode)) == (False, "error", CCA_STATUS["slot_empty"])


def test_stores_are_per_context() -> None:
    a, b = context("cca", domain=DOMAIN), context("cca", domain=DOMAIN)
    _run(a, "CI", _u64(1))
    assert (a.store.counter, b.store.counter) == (1, 0)


@pytest.mark.parametrize(
    ("fc", "payload", "condition"),
    [
        ("RL", b"\x10", "payload_length"),
        ("RL", b"\x10\x01", "value_range"),  # 4097 > ZCRYPT_RNG_BUFFER_SIZE
        ("CI", _u64(1)[:7], "payload_length"),
        ("KS", b"\x01", "payload_length"),  # slot without key bytes
        ("KR", b"", "payload_length"),
        ("KR", b"\x01\x02", "payload_length"),
        ("KR", b"\x09", "slot_empty"),
    ],
)
def test_cca_application_errors(fc: str, payload: bytes, condition: str) -> None:
    ctx = context("cca", domain=DOMAIN)
    res, reply = _run(ctx, fc, payload)
    assert (res.ok, res.reply_code, res.effect) == (False, 0, None)
    assert (reply.msg_type, reply.kind, reply.reply_code) == (0x86, "error", 0)
    assert (reply.rtcode, reply.rscode) == CCA_STATUS[condition]
    assert ctx.store == DomainStore()  # nothing changed


def test_unknown_mode_is_rejected_when_the_context_is_made() -> None:
    with pytest.raises(ValueError):
        context("ep11")
