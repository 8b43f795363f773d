"""apformats.status: the int fast paths (``word``/``from_word``) agree with the construct BitStructs."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apformats.codes import ResponseCode
from apformats.errors import FormatError
from apformats.status import (
    HwInfo,
    QueueStatus,
    build_hwinfo_word,
    build_status_word,
    parse_hwinfo_word,
    parse_status_word,
)

EXHAUSTIVE = settings(max_examples=300, derandomize=True, database=None, deadline=None)

STATUS_DEFINED_BITS = 0xE3FF0000  # E R F, async, I, response code
HWINFO_DEFINED_BITS = 0xFFFFC000FFFF0F0F


@EXHAUSTIVE
@given(st.integers(0, 2**32 - 1))
def test_status_word_int_path_equals_construct(word: int) -> None:
    status = QueueStatus.from_word(word)
    assert status == parse_status_word(word.to_bytes(4, "big"))
    assert status.word == word & STATUS_DEFINED_BITS  # reserved bits are dropped
    assert build_status_word(status) == status.word.to_bytes(4, "big")
    assert QueueStatus.from_word(status.word) == status


@EXHAUSTIVE
@given(st.integers(0, 2**64 - 1))
def test_hwinfo_word_int_path_equals_construct(word: int) -> None:
    info = HwInfo.from_word(word)
    assert info == parse_hwinfo_word(word.to_bytes(8, "big"))
    assert info.word == word & HWINFO_DEFINED_BITS
    assert build_hwinfo_word(info) == info.word.to_bytes(8, "big")
    assert HwInfo.from_word(info.word) == info


@pytest.mark.parametrize("bit", range(32))
def test_each_status_bit_lands_in_the_same_field(bit: int) -> None:
    word = 1 << bit
    assert QueueStatus.from_word(word) == parse_status_word(word.to_bytes(4, "big"))


@pytest.mark.parametrize("bit", range(64))
def test_each_hwinfo_bit_lands_in_the_same_field(bit: int) -> None:
    word = 1 << bit
    assert HwInfo.from_word(word) == parse_hwinfo_word(word.to_bytes(8, "big"))


def test_status_word_known_values() -> None:
    # DQAP "no reply pending" with queue empty and IRQ on: E=1, I=1, RC 0x10.
    status = QueueStatus.from_word(0x81100000)
    assert (status.queue_empty, status.irq_enabled, status.rc) == (True, True, ResponseCode.Q_FULL)
    assert status.rc_name() == "Q_FULL"
    assert QueueStatus(response_code=0x99).rc_name() == "response code 0x99"


def test_hwinfo_known_values() -> None:
    info = HwInfo(at=13, nd=85, ml=3, qd=7, accel=True, mex4k=True, crt4k=True)
    assert info.word == 0x6800_0000_0D55_0307
    assert (info.slots, info.max_msg_size, info.mode, info.fac) == (8, 12288, "accel", 0x68000000)
    assert HwInfo().max_msg_size == 12 * 1024
    assert HwInfo(cca=True, accel=True).mode == "cca"


@pytest.mark.parametrize("bad", [b"", b"\x00" * 3, b"\x00" * 5])
def test_status_bytes_of_wrong_size(bad: bytes) -> None:
    with pytest.raises(FormatError):
        parse_status_word(bad)
    with pytest.raises(FormatError):
        parse_hwinfo_word(bad + bytes(4) if len(bad) == 5 else bad)


@pytest.mark.parametrize("word", [-1, 2**32])
def test_status_word_out_of_range(word: int) -> None:
    with pytest.raises(FormatError):
        QueueStatus.from_word(word)


@pytest.mark.parametrize("word", [-1, 2**64])
def test_hwinfo_word_out_of_range(word: int) -> None:
    with pytest.raises(FormatError):
        HwInfo.from_word(word)
