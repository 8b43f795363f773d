"""The drain after a restart (``apcrypto.recovery.drain``), against a scripted transport and a fake
clock: what it takes from each queue, when it says a queue is emptied, and that it ends in bounded
time whatever the queue answers."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

from apcrypto.core.events import Command, Completion, TransportEvent, TransportLost
from apcrypto.recovery import drain
from apcrypto.transport.base import Transport
from apformats.codes import ResponseCode as RC
from apformats.results import ApResult, Instr
from apformats.status import QueueStatus

Q1, Q2 = 0x0200, 0x0301
Answer = Callable[[Command], TransportEvent]


def reply(psmid: int, *, more: bool = True) -> Answer:
    return lambda c: Completion(
        c.tag, ApResult(QueueStatus(RC.NORMAL, replies_waiting=more), psmid=psmid, reply=b"\x00\x80")
    )


def nothing(*, empty: bool) -> Answer:
    return lambda c: Completion(c.tag, ApResult(QueueStatus(RC.Q_FULL, queue_empty=empty)))


def rc(code: int) -> Answer:
    return lambda c: Completion(c.tag, ApResult(QueueStatus(code)))


def lost(c: Command) -> TransportEvent:
    return TransportLost("dropped", (c.tag,), permanent=False)


class Scripted(Transport):
    """Answers each DQAP of a queue with the next scripted answer (the last one repeats)."""

    def __init__(self, script: dict[int, list[Answer]], clock: list[float]) -> None:
        super().__init__()
        self.script = {q: deque(a) for q, a in script.items()}
        self.sent: list[Command] = []
        self.events: list[TransportEvent] = []
        self.clock = clock

    def qids(self) -> list[int]:
        return sorted(self.script)

    def _send(self, commands: Sequence[Command]) -> None:
        for c in commands:
            assert c.instr is Instr.DQAP, "a drain only ever DQAPs"
            self.sent.append(c)
            answers = self.script[c.qid]
            answer = answers.popleft() if len(answers) > 1 else answers[0]
            self.events.append(answer(c))

    def _recv(self, timeout: float) -> list[TransportEvent]:
        self.clock[0] += timeout  # the poll's wait passes on the fake clock
        out, self.events = self.events, []
        return out

    def _close(self) -> None:
        pass


def run(script: dict[int, list[Answer]], wanted: dict[int, set[int]], bound: float = 5.0):  # type: ignore[no-untyped-def]
    now = [0.0]
    t = Scripted(script, now)
    batches: list[dict[int, bytes]] = []
    emptied, replies = drain(
        t, wanted, bound=bound, interval=0.01, on_batch=batches.append, clock=lambda: now[0]
    )
    return emptied, replies, t, batches, now[0]


def test_replies_then_nothing_held_empties_the_queue() -> None:
    emptied, replies, _t, batches, _ = run({Q1: [reply(7), reply(99), nothing(empty=True)]}, {Q1: {7, 8}})
    assert emptied == {Q1} and set(replies) == {7, 99}  # a reply that is not ours is taken too
    assert {p for b in batches for p in b} == {7, 99}  # each handed over for the journal


def test_a_queue_still_working_is_asked_again_until_the_reply_comes() -> None:
    script = {Q1: [nothing(empty=False), nothing(empty=False), reply(7, more=False), nothing(empty=True)]}
    emptied, replies, t, _, _ = run(script, {Q1: {7}})
    assert set(replies) == {7} and emptied == {Q1}  # all of ours answered: done
    assert len(t.sent) == 3


def test_busy_and_lost_answers_are_retried() -> None:
    emptied, replies, _, _, _ = run({Q1: [rc(RC.BUSY), lost, reply(7), nothing(empty=True)]}, {Q1: {7, 8}})
    assert set(replies) == {7} and emptied == {Q1}


def test_a_queue_out_of_reach_is_not_emptied() -> None:
    emptied, replies, _, _, _ = run(
        {Q1: [rc(RC.Q_NOT_AVAIL)], Q2: [reply(5), nothing(empty=True)]}, {Q1: {7}, Q2: {5, 6}}
    )
    assert emptied == {Q2} and set(replies) == {5}


def test_it_ends_by_its_bound_on_a_queue_that_never_empties() -> None:
    emptied, replies, t, _, elapsed = run({Q1: [nothing(empty=False)]}, {Q1: {7}}, bound=0.5)
    assert emptied == frozenset() and replies == {}
    assert 0.5 <= elapsed < 2.0 and len(t.sent) < 100  # paced by its interval, not a busy loop
