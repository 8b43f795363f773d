"""firmware_stubs.format_machine_failure: one reply per held message, in order, right state/engine."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from apformats import messages as m
from apformats.codes import NO_ENGINE, MachineFailureState, ReplyCode
from firmware_stubs import HeldMessage, format_machine_failure


def test_one_reply_per_held_message_in_order() -> None:
    held = [
        HeldMessage(0x1234_0000_0001, MachineFailureState.IN_PROCESS, 0),
        HeldMessage(0x1234_0000_0002, MachineFailureState.REQUEST_PENDING, None),
        HeldMessage(0x1234_0000_0003, MachineFailureState.IN_PROCESS, 5),
        HeldMessage(0x1234_0000_0004, MachineFailureState.REQUEST_PENDING, None),
    ]
    out = format_machine_failure(held)
    assert [psmid for psmid, _ in out] == [h.psmid for h in held]
    replies = [m.parse_reply(raw) for _, raw in out]
    assert [(r.mf_state, r.engine) for r in replies] == [
        (MachineFailureState.IN_PROCESS, 0),
        (MachineFailureState.REQUEST_PENDING, None),
        (MachineFailureState.IN_PROCESS, 5),
        (MachineFailureState.REQUEST_PENDING, None),
    ]
    assert all(len(raw) == 8 and raw[1] == 0x82 and raw[4] == ReplyCode.MACHINE_FAILURE for _, raw in out)
    assert out[1][1][6] == NO_ENGINE


def test_request_pending_never_names_an_engine() -> None:
    [(_, raw)] = format_machine_failure([HeldMessage(9, MachineFailureState.REQUEST_PENDING, 3)])
    assert raw[5:7] == bytes([MachineFailureState.REQUEST_PENDING, NO_ENGINE])


def test_in_process_with_unknown_engine() -> None:
    [(_, raw)] = format_machine_failure([HeldMessage(9, MachineFailureState.IN_PROCESS, None)])
    assert raw[5:7] == bytes([MachineFailureState.IN_PROCESS, NO_ENGINE])


def test_nothing_held_nothing_replied() -> None:
    assert format_machine_failure([]) == []


_held = st.builds(
    HeldMessage,
    st.integers(0, 2**64 - 1),
    st.sampled_from([MachineFailureState.IN_PROCESS, MachineFailureState.REQUEST_PENDING]),
    st.one_of(st.none(), st.integers(0, NO_ENGINE - 1)),
)


@settings(max_examples=100, derandomize=True, database=None, deadline=None)
@given(st.lists(_held, max_size=40))
def test_exactly_one_reply_each_even_with_duplicate_psmids(held: list[HeldMessage]) -> None:
    out = format_machine_failure(held)
    assert len(out) == len(held)
    for h, (psmid, raw) in zip(held, out, strict=True):
        reply = m.parse_reply(raw)
        assert psmid == h.psmid and reply.mf_state == h.state
        assert reply.engine == (h.engine if h.state == MachineFailureState.IN_PROCESS else None)
