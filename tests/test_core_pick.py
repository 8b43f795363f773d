"""The dispatcher's choice of queue (``Dispatcher.pick``) against a reference written from its rule.

zcrypt's rule (DESIGN §4.1): among the in-service queues of the request's kind with a free slot (not
held full by Q_FULL), not on a card in machine-failure recovery and, for a targeted request, among
its target: the lowest card load + queue load + the request's weight, with a re-drive's penalties
(10,000 on the queue it failed on, 1,000 on that queue's card); ties go to the queue that has
accepted the fewest requests, then to the first.  The reference computes exactly that with ``min``
over every queue; the dispatcher has a fast path for the common case (no penalty, no target, no
card in recovery), so both paths are compared on random configurations.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apcrypto.core.dispatch import Dispatcher
from apcrypto.core.ledger import Ledger
from apcrypto.core.outbox import Outbox
from apcrypto.core.queue import QState, Queue
from apformats.results import qid_of

FAST = settings(
    max_examples=300,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@st.composite
def configurations(draw: st.DrawFn) -> tuple[Dispatcher, list[Queue], Any, int, Any]:
    queues: dict[int, Queue] = {}
    d = Dispatcher(Ledger(), Outbox(), queues)
    n = draw(st.integers(1, 12))
    cards = draw(st.integers(1, 4))
    order: list[Queue] = []
    for i in range(n):
        qid = qid_of(draw(st.integers(0, cards - 1)), i)
        if qid in queues:
            continue
        q = Queue(qid, mode="accel")
        q.state = draw(
            st.sampled_from([QState.IDLE, QState.WORKING, QState.QUEUE_FULL, QState.PROBE, QState.OFFLINE])
        )
        q.slots = draw(st.integers(1, 5))
        for k in range(draw(st.integers(0, 3))):
            q.on_card[1000 * i + k] = k
        q.full_hold = draw(st.integers(0, 4)) == 0
        q.load = draw(st.sampled_from([0, 0, 8, 54]))  # equal scores are common: the tie-break matters
        q.requests_total = draw(st.integers(0, 3))
        queues[qid] = q
        order.append(q)
    d.by_mode["accel"] = list(order)
    for q in order:
        d.card_load[q.card] = d.card_load.get(q.card, 0) + draw(st.sampled_from([0, 0, 0, 8, 100]))
    if draw(st.integers(0, 3)) == 0:
        d.mf_cards[draw(st.integers(0, cards - 1))] = 1
    avoid = draw(st.one_of(st.none(), st.sampled_from([q.qid for q in order])))
    weight = draw(st.sampled_from([6, 8, 54, 800]))
    target = draw(
        st.one_of(st.none(), st.sets(st.sampled_from([q.qid for q in order]), min_size=1).map(frozenset))
    )
    return d, order, avoid, weight, target


def reference(d: Dispatcher, order: list[Queue], avoid: Any, weight: int, target: Any) -> Queue | None:
    eligible = []
    for i, q in enumerate(order):
        free = not q.full_hold and len(q.on_card) + len(q.sending) < q.slots
        if not (q.state in (QState.IDLE, QState.WORKING, QState.QUEUE_FULL) and free):
            continue
        if target is not None and q.qid not in target:
            continue
        if q.card in d.mf_cards:
            continue
        score = d.card_load.get(q.card, 0) + q.load + weight
        if avoid is not None:
            score += 10_000 * (q.qid == avoid) + 1_000 * (q.card == avoid >> 8)
        eligible.append(((score, q.requests_total, i), q))
    return min(eligible, key=lambda e: e[0])[1] if eligible else None


@FAST
@given(configurations())
def test_pick_follows_the_rule(cfg: tuple[Dispatcher, list[Queue], Any, int, Any]) -> None:
    d, order, avoid, weight, target = cfg
    assert d.pick("accel", avoid, weight, target) is reference(d, order, avoid, weight, target)


@FAST
@given(configurations())
def test_pick_common_case_follows_the_rule(cfg: tuple[Dispatcher, list[Queue], Any, int, Any]) -> None:
    d, order, _avoid, weight, _target = cfg
    d.mf_cards.clear()
    assert d.pick("accel", None, weight) is reference(d, order, None, weight, None)
