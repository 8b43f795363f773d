"""Shared helpers for the emulator tests: deterministic RSA keys, real requests, drain loops.

Keys come from fixed seeds (primes by ``gmpy2.next_prime``), so every run sends the same numbers;
results are checked with plain ``pow``, independently of the firmware under test.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from math import gcd

import gmpy2
import pytest

from apcrypto.testing import RsaKey, seeded_key
from apformats.codes import ResponseCode
from apformats.messages import build_cprb, build_crt, build_mex, parse_reply
from apformats.results import ApResult, qid_of
from emulator import Emulator

E = 65537
RC = ResponseCode

#: APQNs of the small profile (2 CEX8A cards x domains 0, 1; 2 engines per card).
Q00, Q01, Q10, Q11 = qid_of(0, 0), qid_of(0, 1), qid_of(1, 0), qid_of(1, 1)


Key = RsaKey


def key(bits: int = 1024, seed: int = 0) -> Key:
    return seeded_key(bits, f"emulator-{seed}")


def mex(x: int, k: Key | None = None) -> bytes:
    """A type 50 ME request: ``x ** e mod n``."""
    k = k or key()
    return build_mex(x, E, k.n)


def crt(x: int, k: Key | None = None) -> bytes:
    """A type 50 CRT request: ``x ** d mod n``."""
    k = k or key()
    return build_crt(x, k.p, k.q, k.dp, k.dq, k.qinv)


def counter_increment(domain: int, by: int = 1) -> bytes:
    """A CCA CPRB that increments the domain's counter (state-changing)."""
    return build_cprb("CI", domain, by.to_bytes(8, "big"))


def result_int(r: ApResult) -> int:
    rep = parse_reply(r.reply)
    assert rep.kind == "ok", rep
    return int.from_bytes(rep.result, "big")


def drain(emu: Emulator, qid: int) -> list[ApResult]:
    """DQAP until NO_PENDING_REPLY (or another RC); the final non-reply result is not included."""
    out = []
    while True:
        r = emu.dqap(qid)
        if r.status.rc != RC.NORMAL:
            return out
        out.append(r)


def fill(emu: Emulator, qid: int, psmids: range | list[int], k: Key | None = None) -> list[int]:
    """NQAP an ME request ``x = psmid + 2`` per psmid; returns the response codes."""
    return [emu.nqap(qid, p, mex(p + 2, k)).status.rc for p in psmids]


@pytest.fixture
def small() -> Emulator:
    return Emulator("small", seed=7)


@pytest.fixture
def small_exact() -> Emulator:
    """The small profile without jitter: service times are exactly the profile's."""
    from dataclasses import replace

    from emulator import load_profile

    p = load_profile("small")
    return Emulator(replace(p, timing=replace(p.timing, jitter=0.0)), seed=7)


@pytest.fixture
def default_emu() -> Emulator:
    return Emulator("default", seed=3)
