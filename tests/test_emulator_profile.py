"""Profiles: the bundled ones say what the brief says; a bad profile fails loudly, naming the key."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

import pytest

from emulator import Emulator, ProfileError, bundled_profiles, load_profile
from emulator.profile import PROFILE_DIR, Execution, parse_profile

#: zcrypt speed ratings (reference/zcrypt.md §5.4), the bundled profiles' service-time shape.
RATINGS = {
    "CEX8A": {"MEX_1K": 6, "MEX_2K": 8, "MEX_4K": 17, "CRT_1K": 15, "CRT_2K": 54, "CRT_4K": 362},
    "CEX8C": {"MEX_1K": 14, "MEX_2K": 16, "MEX_4K": 26, "CRT_1K": 23, "CRT_2K": 64, "CRT_4K": 376, "RNG": 23},
}


def test_bundled_profiles() -> None:
    names = set(bundled_profiles())
    assert {"default", "fast", "small"} <= names
    assert not {n for n in names if n.startswith("usb_")}  # USB device descriptions are not profiles
    for name in names:
        load_profile(name)  # every listed name loads as an adapter profile


def test_default_topology() -> None:
    p = load_profile("default")
    assert p.format == 1 and p.name == "default"
    assert [(c.id, c.type.name) for c in p.cards] == [(0, "CEX8A"), (1, "CEX8A"), (2, "CEX8C"), (3, "CEX8C")]
    for c in p.cards:
        assert c.usage_domains == (0, 1, 2, 3) and len(c.control_domains) == 1
        t = c.type
        assert (t.qd, t.slots, t.engines, t.ml, t.max_msg_size, t.nd, t.at) == (7, 8, 4, 3, 12288, 85, 14)
    assert p.card_types["CEX8A"].mode == "accel" and p.card_types["CEX8C"].mode == "cca"


def test_default_service_times_are_ratings_times_the_unit() -> None:
    p = load_profile("default")
    unit = p.timing.rating_unit
    assert unit == 50e-6
    for name, ratings in RATINGS.items():
        st = p.card_types[name].service_time
        for fn, rating in ratings.items():
            assert st[fn] == pytest.approx(rating * unit), (name, fn)
    cca = p.card_types["CEX8C"]
    assert cca.base_service_time("CPRB:CI") == pytest.approx(80 * unit)
    assert cca.base_service_time("CPRB:XY") == pytest.approx(800 * unit)  # CPRB:* default
    assert p.card_types["CEX8A"].base_service_time("INVALID") == pytest.approx(6 * unit)


def test_fast_has_the_default_topology_and_zero_service_times() -> None:
    fast, default = load_profile("fast"), load_profile("default")
    assert [(c.id, c.type.name, c.usage_domains) for c in fast.cards] == [
        (c.id, c.type.name, c.usage_domains) for c in default.cards
    ]
    for t in fast.card_types.values():
        assert set(t.service_time.values()) == {0.0}
    assert fast.timing.jitter == 0.0


def test_overhead_is_fast_with_echo_math_and_nothing_else_echoes() -> None:
    """``overhead`` differs from ``fast`` only in name, description and ``compute``; every other
    bundled profile does real math (a correctness run can only get echo by naming ``overhead``)."""
    fast, over = load_profile("fast"), load_profile("overhead")
    assert over.timing.compute == "echo"
    assert dataclasses.replace(over.timing, compute="real") == fast.timing
    assert over.cards == fast.cards
    assert "not RSA" in over.description
    assert {n: load_profile(n).timing.compute for n in bundled_profiles() if n != "overhead"} == {
        n: "real" for n in bundled_profiles() if n != "overhead"
    }


def test_parallel_profiles_are_fast_computing_in_workers() -> None:
    """``parallel`` (threads) and ``parallel-processes`` differ from ``fast`` only in name,
    description and ``execution``; every other bundled profile computes inline."""
    fast = load_profile("fast")
    par, procs = load_profile("parallel"), load_profile("parallel-processes")
    assert (par.timing, par.cards) == (procs.timing, procs.cards) == (fast.timing, fast.cards)
    assert par.execution == Execution(backend="threads", workers=1, arithmetic="auto")
    assert procs.execution == Execution(backend="processes", workers=1, arithmetic="auto")
    inline = [n for n in bundled_profiles() if not n.startswith("parallel")]
    assert {n: load_profile(n).execution for n in inline} == {n: Execution() for n in inline}
    assert Execution() == Execution(backend="inline", workers=1, arithmetic="auto")


def test_execution_keys_are_read(tmp_path: Path) -> None:
    doc = _small()
    doc["execution"] = {"backend": "threads", "workers": 3, "arithmetic": "gmpy2"}
    p = parse_profile(doc, source="t.toml")
    assert p.execution == Execution("threads", 3, "gmpy2")
    emu = Emulator(p)  # virtual clock: inline whatever the profile says, and the firmware is told
    assert emu.engines is None
    assert {q.fw_ctx.arithmetic for c in emu._cards.values() for q in c.queues.values() if q.usage} == {
        "gmpy2"
    }


def _me_result(profile: str, message: int, modulus: int) -> tuple[int, bytes]:
    """One ME-2048 straight through the emulator (NQAP then DQAP): the reply code and result bytes."""
    from apformats.messages import build_mex, parse_reply

    emu = Emulator(profile)
    try:
        q = next(q for q in emu.qids() if emu.tapq(q).hwinfo.accel)
        emu.nqap(q, 1, build_mex(message.to_bytes(256, "big"), 65537, modulus))
        r = emu.dqap(q)
        rep = parse_reply(r.reply)
        return rep.reply_code, bytes(rep.result or b"")[-256:]
    finally:
        emu.close()


def test_echo_math_answers_the_message_in_a_correct_shape() -> None:
    """Echo keeps the reply's shape (type 80, modulus-length result) and every operand check, and
    visibly is not RSA: the result is the message, where ``fast`` returns message^e mod n."""
    n = (1 << 2047) | 0x1D7
    m = 0x1234567
    code, real = _me_result("fast", m, n)
    assert code == 0 and int.from_bytes(real, "big") == pow(m, 65537, n)
    code, echo = _me_result("overhead", m, n)
    assert code == 0 and len(echo) == 256 and int.from_bytes(echo, "big") == m != pow(m, 65537, n)
    assert _me_result("overhead", n + 1, n)[0] == _me_result("fast", n + 1, n)[0] != 0  # operand >= modulus


def test_echo_crt_skips_the_math_and_keeps_the_checks() -> None:
    """CRT in echo mode: the message back, modulus-length; a bad operand still gets its reply code."""
    import random

    import firmware_stubs
    from apcrypto.testing import seeded_key
    from apformats.messages import build_crt, parse_reply

    k = seeded_key(1024)
    req = build_crt(12345, k.p, k.q, k.dp, k.dq, k.qinv)
    for compute, want in (("real", pow(12345, k.d, k.n)), ("echo", 12345)):
        store = firmware_stubs.DomainStore()
        ctx = firmware_stubs.FirmwareContext(0, store, random.Random(0), compute=compute)
        rep = parse_reply(firmware_stubs.execute(req, ctx).reply)
        assert rep.reply_code == 0 and len(rep.result) >= 128
        assert int.from_bytes(rep.result, "big") == want
        bad = firmware_stubs.execute(build_crt(12345, k.p, k.q, k.p + 1, k.dq, k.qinv), ctx)
        assert not bad.ok
    with pytest.raises(ValueError, match="compute"):
        firmware_stubs.FirmwareContext(0, firmware_stubs.DomainStore(), random.Random(0), compute="fast")


def test_no_correctness_test_uses_the_echo_profile() -> None:
    """Echo results are wrong on purpose: only this file and the bench tests may name the profile."""
    allowed = {"test_emulator_profile.py"}
    offenders = [
        p.name
        for p in Path(__file__).parent.rglob("*.py")
        if p.name not in allowed
        and not p.name.startswith("test_bench_")
        and any(f"{q}overhead{q}" in p.read_text() or "emu:overhead" in p.read_text() for q in "\"'")
    ]
    assert offenders == []


def test_small_topology() -> None:
    p = load_profile("small")
    assert [(c.id, c.type.name, c.usage_domains) for c in p.cards] == [
        (0, "CEX8A", (0, 1)),
        (1, "CEX8A", (0, 1)),
    ]
    assert p.card_types["CEX8A"].engines == 2


def test_profiles_are_frozen() -> None:
    p = load_profile("small")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.name = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        p.card_types["CEX8A"].service_time["MEX_1K"] = 1.0  # type: ignore[index]


def test_emulator_takes_a_path(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text((PROFILE_DIR / "small.toml").read_text().replace('name = "small"', 'name = "mine"'))
    assert Emulator(path).profile.name == "mine"
    assert Emulator(str(path)).profile.source == str(path)


# --- loud errors --------------------------------------------------------------------------------


def _small() -> dict[str, Any]:
    return tomllib.loads((PROFILE_DIR / "small.toml").read_text())


def _set(doc: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for part in parents:
        doc = doc[int(part)] if part.isdigit() else doc[part]
    if value is _DELETE:
        del doc[last]
    else:
        doc[last] = value


_DELETE = object()

BAD = [
    ("surprise", 1, r"unknown key 'surprise'"),
    ("timing.jiter", 0.1, r"unknown key 'timing\.jiter'"),
    ("card_types.CEX8A.engine", 2, r"unknown key 'card_types\.CEX8A\.engine'"),
    ("card_types.CEX8A.service_time.MEX_8K", 1.0, r"unknown key 'card_types\.CEX8A\.service_time\.MEX_8K'"),
    ("cards.0.domains", [0], r"unknown key 'cards\[0\]\.domains'"),
    ("timing.reset_time", _DELETE, r"missing key 'timing\.reset_time'"),
    ("card_types.CEX8A.qd", _DELETE, r"missing key 'card_types\.CEX8A\.qd'"),
    (
        "card_types.CEX8A.service_time.default",
        _DELETE,
        r"missing key 'card_types\.CEX8A\.service_time\.default'",
    ),
    ("cards.1.type", _DELETE, r"missing key 'cards\[1\]\.type'"),
    ("name", _DELETE, r"missing key 'name'"),
    ("format", 2, r"'format' is 2"),
    ("timing.jitter", 1.5, r"'timing\.jitter' must be a number in \[0, 1\)"),
    ("timing.recovery_time", -1, r"'timing\.recovery_time' must be a finite number"),
    ("card_types.CEX8A.qd", 16, r"'card_types\.CEX8A\.qd' must be an integer in 0\.\.15, got 16"),
    ("card_types.CEX8A.engines", 0, r"'card_types\.CEX8A\.engines' must be an integer"),
    ("card_types.CEX8A.engines", 2.0, r"'card_types\.CEX8A\.engines' must be an integer"),
    ("card_types.CEX8A.apsc", 1, r"'card_types\.CEX8A\.apsc' must be true or false"),
    ("card_types.CEX8A.mode", "ep11", r"'card_types\.CEX8A\.mode' must be one of accel, cca"),
    ("card_types.CEX8A.service_time.MEX_1K", "fast", r"'card_types\.CEX8A\.service_time\.MEX_1K' must be"),
    ("card_types.CEX8A.service_time.CRT_4K", float("inf"), r"service_time\.CRT_4K' must be a finite"),
    ("cards.0.type", "CEX9Z", r"'cards\[0\]\.type' names unknown card type 'CEX9Z'"),
    ("cards.1.id", 0, r"'cards\[1\]\.id' repeats card 0"),
    ("cards.0.usage_domains", [0, 85], r"'cards\[0\]\.usage_domains' has domain 85 >= nd=85"),
    ("cards.0.usage_domains", [1, 1], r"'cards\[0\]\.usage_domains' must not repeat"),
    ("cards.0.usage_domains", [], r"'cards\[0\]\.usage_domains' must name at least one"),
    ("cards.0.control_domains", [1], r"'cards\[0\]\.control_domains' repeats usage domain 1"),
    ("cards", [], r"'cards' must be a non-empty array"),
    ("timing", 3, r"'timing' must be a table"),
    ("timing.compute", "fast", r"'timing\.compute' must be one of real, echo"),
    ("execution", {"backend": "gpu"}, r"'execution\.backend' must be one of inline, threads, processes"),
    ("execution", {"workers": 0}, r"'execution\.workers' must be an integer in 1\.\.64"),
    ("execution", {"arithmetic": "fpga"}, r"'execution\.arithmetic' must be one of auto, openssl, gmpy2"),
    ("execution", {"threads": 2}, r"unknown key 'execution\.threads'"),
    ("execution", [], r"'execution' must be a table"),
]


@pytest.mark.parametrize(("path", "value", "message"), BAD, ids=[b[0] + "=" + repr(b[1])[:12] for b in BAD])
def test_bad_profiles_fail_loudly(path: str, value: Any, message: str) -> None:
    doc = _small()
    _set(doc, path, value)
    with pytest.raises(ProfileError, match=message):
        parse_profile(doc, source="t.toml")


def test_error_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("format = 1\nname = 'x'\n[timing]\nrating_unit = 1e-6\njitter = 0\nreset_time = 0\n")
    with pytest.raises(ProfileError, match=r"profile .*bad\.toml: missing key 'card_types'"):
        load_profile(bad)


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="cannot read"):
        load_profile(tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("format = = 1")
    with pytest.raises(ProfileError, match="not valid TOML"):
        load_profile(broken)
    bundled = (
        r"no bundled profile 'huge' \(bundled: default, fast, overhead, parallel, parallel-processes, small"
    )
    with pytest.raises(ProfileError, match=bundled):
        load_profile("huge")
