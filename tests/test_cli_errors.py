"""Errors that say what happened: card rejections name their code, bad arguments say what was
expected, deadlines are checked, and the command lines print one line instead of a traceback."""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
import time

import pytest

import apcrypto
from apcrypto.config import MAX_DEADLINE, check_deadline
from apcrypto.errors import BadRequest, describe_reply_code
from apformats.codes import ReplyCode
from emulator import Emulator


@pytest.fixture
def client() -> apcrypto.Client:
    emu = Emulator("fast", clock="virtual")
    with apcrypto.connect("emu:", emulator=emu, config="fast") as c:
        assert c.wait_ready(10)
        yield c


def test_every_reply_code_has_a_name_and_a_meaning() -> None:
    for code in ReplyCode:
        text = describe_reply_code(code)
        assert text.startswith(f"{int(code):#04x} {code.name}: ")
        assert "not a code this driver knows" not in text
    assert "unknown code" in describe_reply_code(0x77)
    assert describe_reply_code(0).startswith("0x00 none: a normal reply")  # a CCA error's reply code


def test_a_cca_application_error_says_its_rc_and_rs_not_an_unknown_reply_code(
    client: apcrypto.Client,
) -> None:
    fut = client.key_read(7, apqn=(2, 0))  # a key slot nothing was stored in
    with pytest.raises(BadRequest) as info:
        fut.result(10)
    text = str(info.value)
    assert "CCA rc 8/rs " in text and "unknown code" not in text and "0x00 none: a normal reply" in text


def test_card_rejection_names_the_reply_code_and_its_meaning(client: apcrypto.Client) -> None:
    fut = client.mod_expo(b"\xff" * 4, 3, (1 << 31) + 1)  # data not below the modulus
    with pytest.raises(BadRequest) as info:
        fut.result(10)
    text = str(info.value)
    assert "0x82 OPERAND_INVALID" in text and "data not below the modulus" in text
    assert ":  " not in text and "ry=0x82" in text and "apqn=" in text
    assert info.value.meaning is not None and "OPERAND_INVALID" in info.value.meaning
    even = client.mod_expo(b"\x01" * 4, 3, 1 << 31)
    with pytest.raises(BadRequest, match="EVEN_MOD_IN_OPND: the modulus is even"):
        even.result(10)


def test_negative_counter_increment_says_why(client: apcrypto.Client) -> None:
    with pytest.raises(BadRequest, match=r"only moves forward: by must be 0\.\.2\*\*64-1, got -5"):
        client.counter_increment(-5).result(5)


@pytest.mark.parametrize(
    ("value", "exc", "match"),
    [
        (-1.0, ValueError, "must be >= 0"),
        (time.time() - 1, ValueError, "looks like an absolute time"),
        (time.time() + 5, ValueError, "looks like an absolute time"),
        (MAX_DEADLINE + 1, ValueError, "at most"),
        (math.nan, ValueError, "NaN"),
        (True, TypeError, "a number"),
        ("5", TypeError, "a number"),
    ],
)
def test_implausible_deadlines_are_refused(value: object, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        check_deadline(value)


def test_plausible_deadlines_are_seconds_from_now() -> None:
    assert check_deadline(None) is None
    assert check_deadline(0) == 0.0
    assert check_deadline(2) == 2.0
    assert check_deadline(MAX_DEADLINE) == MAX_DEADLINE


def test_both_clients_check_the_deadline_at_the_call(client: apcrypto.Client) -> None:
    with pytest.raises(ValueError, match="absolute time"):
        client.mod_expo(b"\x02", 3, 0xFFFF1, deadline=time.time() - 1)
    assert client.mod_expo(b"\x02", 3, 0xFFFF1, deadline=5).result(10) == (8).to_bytes(3, "big")

    async def run() -> None:
        emu = Emulator("fast", clock="virtual")
        async with apcrypto.aio.connect("emu:", emulator=emu, config="fast") as ac:
            with pytest.raises(ValueError, match="absolute time"):
                ac.random_bytes(8, deadline=time.time())

    asyncio.run(run())


def _run(cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("cmd", "says"),
    [
        ("-m apcrypto list bogus://x", "apcrypto: error: unknown transport scheme 'bogus'"),
        ("-m emulator serve --profile nosuch", "apcrypto-emulator: error: no bundled profile 'nosuch'"),
    ],
)
def test_command_line_errors_are_one_line_and_non_zero(cmd: str, says: str) -> None:
    res = _run(f"{sys.executable} {cmd}")
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [res.stderr.strip()]
    assert res.stderr.startswith(says), res.stderr


def test_a_closed_pipe_ends_the_listing_quietly() -> None:
    # ``true`` exits at once, long before the interpreter has started: every write meets a closed pipe
    res = subprocess.run(
        ["bash", "-c", f"{sys.executable} -m apcrypto list -V | true; echo status=${{PIPESTATUS[0]}}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Traceback" not in res.stderr and "BrokenPipe" not in res.stderr, res.stderr
    assert "status=1" in res.stdout
    head = _run(f"{sys.executable} -m apcrypto list -V | head -2")
    assert len(head.stdout.splitlines()) == 2 and "Traceback" not in head.stderr


def test_both_commands_tell_their_version() -> None:
    import apcrypto

    for cmd, name in (("-m apcrypto --version", "apcrypto"), ("-m emulator --version", "apcrypto-emulator")):
        res = _run(f"{sys.executable} {cmd}")
        assert res.returncode == 0 and res.stdout.strip() == f"{name} {apcrypto.__version__}"
