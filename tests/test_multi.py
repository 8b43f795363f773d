"""One client over several servers (issue 11): the pool transport, its card numbering, its parsing
errors and configuration, with in-process emulators (``tests/test_multi_kill.py`` runs real server
processes and kills one).

Where a request ran is read from each emulator's own execution log (its API, not the driver's
ledger); the pool's APQN of a log entry is computed here from the documented rule (server *i*'s
card *c* is card ``16*i + c``), not with the transport's helpers.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

import apcrypto
from apcrypto import config
from apcrypto.client import Client
from apcrypto.core.config import FAST
from apcrypto.errors import DeviceUnavailable, TargetNotHeld
from apcrypto.transport import (
    CardOutOfBlock,
    Completion,
    Interrupt,
    PeerRestored,
    Transport,
    TransportEvent,
    TransportLost,
    UnknownTransport,
    UrlListError,
    open_transport,
)
from apcrypto.transport.base import Command
from apcrypto.transport.inproc import InprocTransport
from apcrypto.transport.multi import MultiTransport, driver_qid, server_qid, split_urls
from apformats.codes import ResponseCode
from apformats.results import Instr
from emulator import Emulator
from tests._fixtures_zmq import ServerProcess, zmq_server

M = (1 << 1023) + 1  # a 1024-bit odd modulus: ME-1024 needs no key
PSMID_HI = 0x3A17


def pool_qid(server: int, qid: int) -> int:
    """The documented rule, written out independently of apcrypto.transport.multi."""
    return ((server * 16 + (qid >> 8)) << 8) | (qid & 0xFF)


def ours(emu: Emulator) -> dict[int, set[int]]:
    """psmid -> the APQNs (as this emulator numbers them) it reached, for this test's client."""
    out: dict[int, set[int]] = {}
    for e in emu.execution_log.entries():
        if e.psmid >> 32 == PSMID_HI:
            out.setdefault(e.psmid, set()).add(e.qid)
    return out


@pytest.fixture
def two() -> Iterator[tuple[list[Emulator], Client]]:
    """A client over two in-process emulators on the wall clock (default profile: 2 CEX8A + 2 CEX8C
    each, domains 0-3)."""
    emus = [Emulator("default", clock="wall", seed=s) for s in (1, 2)]
    t = MultiTransport([InprocTransport(e) for e in emus], ["emu:a", "emu:b"])
    client = Client(t, FAST, psmid_base=PSMID_HI << 32)
    try:
        assert client.wait_ready(15)
        yield emus, client
    finally:
        client.close()
        for e in emus:
            e.close()


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("given", "urls"),
    [
        ("emu:", ["emu:"]),
        ("tcp://a:1, tcp://b:2", ["tcp://a:1", "tcp://b:2"]),
        (["tcp://a:1", "emu:fast"], ["tcp://a:1", "emu:fast"]),
        (("emu:",), ["emu:"]),
    ],
)
def test_url_lists_parse(given: str | Sequence[str], urls: list[str]) -> None:
    assert split_urls(given) == urls


@pytest.mark.parametrize(
    ("given", "says"),
    [
        ([], "empty list"),
        ("tcp://a:1,,tcp://b:2", "empty URL"),
        (["tcp://a:1", " "], "empty URL"),
        (["tcp://a:1", 5], "holds strings"),
        ({"tcp://a:1"}, "a string or a list"),
        ("tcp://a:1,tcp://a:1", "given twice"),
        ([f"tcp://h:{p}" for p in range(17)], "at most 16"),
    ],
)
def test_bad_url_lists_raise_url_list_error(given: object, says: str) -> None:
    with pytest.raises(UrlListError, match=says):
        split_urls(given)  # type: ignore[arg-type]
    with pytest.raises(UrlListError, match=says):
        apcrypto.connect(given, config="fast")  # type: ignore[arg-type]


def test_a_bad_scheme_in_a_list_is_refused_before_any_server_is_opened() -> None:
    with pytest.raises(UnknownTransport, match="bogus"):
        open_transport(["emu:", "bogus://x"])


def test_emulator_option_needs_exactly_one_emu_url() -> None:
    emu = Emulator("small", clock="wall")
    try:
        with pytest.raises(UrlListError, match="emulator= drives one emu: child"):
            apcrypto.connect(["emu:", "emu:small"], emulator=emu, config="fast")
    finally:
        emu.close()


def test_a_virtual_clock_child_is_refused_and_the_opened_ones_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    from apcrypto.transport import TRANSPORTS

    wall, virtual = Emulator("small", clock="wall"), Emulator("small", clock="virtual")
    closed: list[Transport] = []

    class Watched(InprocTransport):
        def _close(self) -> None:
            closed.append(self)
            super()._close()

    # two schemes of this test's own, so that open_multi's own path opens them (its second child is
    # found on a virtual clock only after it opened)
    monkeypatch.setitem(TRANSPORTS, "wallemu", (__name__, "_open_watched"))
    monkeypatch.setitem(TRANSPORTS, "vemu", (__name__, "_open_watched"))
    monkeypatch.setattr(_WATCHED, "make", lambda url: Watched(wall if url.startswith("wallemu") else virtual))
    try:
        with pytest.raises(UrlListError, match="virtual clock"):
            open_transport(["wallemu:", "vemu:"])
        assert len(closed) == 2  # both children closed again
        with pytest.raises(UrlListError, match="virtual clock"):
            apcrypto.connect(["emu:small", "emu:fast"], clock="virtual", config="fast")
    finally:
        wall.close()
        virtual.close()


class _WATCHED:
    make: Any = None


def _open_watched(url: str, **_: object) -> Transport:
    return _WATCHED.make(url)  # type: ignore[no-any-return]


def test_card_numbering_rule() -> None:
    for server in (0, 1, 15):
        for qid in (0x0000, 0x0203, 0x0F55):
            assert driver_qid(server, qid) == pool_qid(server, qid)
            assert server_qid(pool_qid(server, qid)) == (server, qid)
    with pytest.raises(CardOutOfBlock, match="card 10"):
        driver_qid(1, 0x1001)


class Scripted(Transport):
    """A child that offers given APQNs and hands back the events a test scripts (to check the
    renumbering of every event kind; the real children are exercised by the other tests)."""

    def __init__(self, qids: list[int]) -> None:
        super().__init__()
        self._qids = qids
        self.sent: list[Command] = []
        self.script: list[TransportEvent] = []

    def qids(self) -> list[int]:
        return list(self._qids)

    def _send(self, commands: Sequence[Command]) -> None:
        self.sent.extend(commands)

    def _recv(self, timeout: float) -> list[TransportEvent]:
        out, self.script = self.script, []
        return out

    def _close(self) -> None:
        pass


def test_a_server_offering_card_16_is_refused_at_open() -> None:
    a, b = Scripted([0x0001]), Scripted([0x0001, 0x1001])
    with pytest.raises(CardOutOfBlock, match="server 1 offers card 10"):
        MultiTransport([a, b], ["x:a", "x:b"])


def test_commands_are_routed_and_events_renumbered_per_server() -> None:
    a, b = Scripted([0x0001, 0x0101]), Scripted([0x0001, 0x0302])
    t = MultiTransport([a, b], ["x:a", "x:b"])
    assert t.qids() == [0x0001, 0x0101, 0x1001, 0x1302]
    t.submit(
        [
            Command(1, Instr.NQAP, 0x0101, 7, b"m"),
            Command(2, Instr.NQAP, 0x1302, 8, b"n"),
            Command(3, Instr.DQAP, 0x2001),  # no server 2: answered as a card not configured
        ]
    )
    assert [(c.tag, c.qid) for c in a.sent] == [(1, 0x0101)]
    assert [(c.tag, c.qid, c.psmid) for c in b.sent] == [(2, 0x0302, 8)]
    first = t.poll()  # the unroutable command, answered as a card not configured
    assert [(e.tag, e.result.status.response_code) for e in first] == [(3, ResponseCode.Q_NOT_AVAIL)]  # type: ignore[union-attr]
    b.script = [
        Interrupt(0x0302),
        TransportLost("link down", (2,), True, (0x0302,), (), True),
        PeerRestored("back", resumed=True),
    ]
    events = t.poll()
    assert [c.tag for c in t.outstanding()] == [1]  # tag 2 ended by the loss, tag 3 answered
    assert Interrupt(0x1302) in events
    lost = next(e for e in events if isinstance(e, TransportLost))
    assert (lost.tags, lost.qids, lost.permanent, lost.resumable) == ((2,), (0x1302,), True, True)
    assert lost.reason.startswith("x:b: ")
    restored = next(e for e in events if isinstance(e, PeerRestored))
    assert restored.resumed and restored.reason.startswith("x:b: ")


def test_an_unroutable_command_completes_q_not_avail() -> None:
    t = MultiTransport([Scripted([0x0001]), Scripted([0x0001])], ["x:a", "x:b"])
    t.submit([Command(9, Instr.TAPQ, 0x2001)])
    events = t.poll()
    assert len(events) == 1 and isinstance(events[0], Completion) and events[0].tag == 9
    assert events[0].result.status.response_code == ResponseCode.Q_NOT_AVAIL
    assert t.outstanding() == []


# ---------------------------------------------------------------- one pool


def test_requests_spread_over_both_servers_and_targeting_crosses_servers(two) -> None:
    emus, client = two
    spread = [client.mod_expo(b"\x02", 65537, M) for _ in range(200)]
    assert all(int.from_bytes(f.result(20), "big") == pow(2, 65537, M) for f in spread)
    ran = [ours(e) for e in emus]
    assert len(ran[0]) >= 40 and len(ran[1]) >= 40, [len(r) for r in ran]  # both did a fair share
    assert not set(ran[0]) & set(ran[1])  # no psmid on both

    before = [set(r) for r in ran]
    on_b = [client.mod_expo(b"\x03", 65537, M, card=0x11) for _ in range(30)]  # server 1's card 1
    on_a = [client.counter_increment(1, apqn=(0x02, 3)) for _ in range(10)]  # server 0's 02.0003
    on_b_apqn = [client.counter_increment(1, apqn=(0x12, 3)) for _ in range(5)]  # server 1's 02.0003
    assert [f.result(20) for f in on_a] == list(range(1, 11))
    assert [f.result(20) for f in on_b_apqn] == list(range(1, 6))  # its own counter: not server 0's
    assert all(f.result(20) for f in on_b)
    ran = [ours(e) for e in emus]
    new = [{p: q for p, q in r.items() if p not in b} for r, b in zip(ran, before, strict=True)]
    assert len(new[1]) == 35 and all(q <= {0x0100, 0x0101, 0x0102, 0x0103, 0x0203} for q in new[1].values())
    assert len(new[0]) == 10 and all(q == {0x0203} for q in new[0].values())
    # printable and unambiguous: each server's queues under its own block
    names = set(client.stats()["queues"])
    assert {"00.0000", "03.0003", "10.0000", "13.0003"} <= names and len(names) == 32
    assert client.transport.server_of(0x1302) == "emu:b"


def test_a_target_no_server_has_is_refused(two) -> None:
    _, client = two
    with pytest.raises(TargetNotHeld, match="card 20"):
        client.mod_expo(b"\x02", 65537, M, card=0x20)
    with pytest.raises(TargetNotHeld):
        client.mod_expo(b"\x02", 65537, M, apqn=(0x14, 0))


def test_a_dead_servers_card_is_like_an_offline_card_and_the_other_serves(two) -> None:
    """Server 1's cards checkstopped: a request pinned to one of them ends DeviceUnavailable after
    the grace, as for an offline card; untargeted work runs on server 0 only."""
    emus, client = two
    for card in range(4):
        emus[1].control.checkstop(card)
    pinned = client.mod_expo(b"\x02", 65537, M, card=0x10)
    with pytest.raises(DeviceUnavailable):
        pinned.result(30)
    before = set(ours(emus[1]))
    work = [client.mod_expo(b"\x05", 65537, M) for _ in range(50)]
    assert all(f.result(30) for f in work)
    assert set(ours(emus[1])) == before  # nothing more reached server 1
    emus[1].control.clear()


def test_domains_hold_on_every_server() -> None:
    emus = [Emulator("small", clock="wall", seed=s) for s in (1, 2)]
    t = MultiTransport([InprocTransport(e, domains=[1]) for e in emus], ["emu:a", "emu:b"])
    with Client(t, FAST, psmid_base=PSMID_HI << 32) as client:
        assert client.wait_ready(15)
        assert sorted(client.stats()["queues"]) == ["00.0001", "01.0001", "10.0001", "11.0001"]
        fs = [client.mod_expo(b"\x02", 65537, M) for _ in range(40)]
        assert all(f.result(20) for f in fs)
    for e in emus:
        assert {q & 0xFF for qs in ours(e).values() for q in qs} == {1}
        e.close()


def test_connect_with_a_list_and_with_a_comma_string(tmp_path: Path) -> None:
    for url in (["emu:small", "emu:fast"], "emu:small,emu:fast"):
        with apcrypto.connect(url, config="fast") as client:
            assert isinstance(client.transport, MultiTransport)
            assert client.transport.urls == ["emu:small", "emu:fast"]
            assert client.wait_ready(15)
            assert client.mod_expo(b"\x02", 65537, M, card=0x10).result(20)


def test_mixed_schemes_one_server_and_one_embedded_emulator(zmq_server: ServerProcess) -> None:
    emu = Emulator("small", clock="wall", seed=3)
    try:
        with apcrypto.connect(
            [zmq_server.data, "emu:"], emulator=emu, config="fast", psmid_base=PSMID_HI << 32
        ) as c:
            assert c.wait_ready(15)
            futs = [c.mod_expo(b"\x02", 65537, M) for _ in range(80)]
            futs += [c.mod_expo(b"\x02", 65537, M, card=0x11) for _ in range(10)]  # the emu: child's card 1
            assert all(int.from_bytes(f.result(20), "big") == pow(2, 65537, M) for f in futs)
            assert c.transport.states() == ["up", "up"]
            st = c.stats()["queues"]
            assert any(n.startswith("0") and q["requests"] for n, q in st.items())  # the server served too
        ran = ours(emu)
        assert len(ran) >= 10 and sum(1 for qs in ran.values() if {q >> 8 for q in qs} == {1}) >= 10
    finally:
        emu.close()


def test_aio_connect_takes_a_list() -> None:
    async def main() -> set[str]:
        async with apcrypto.aio.connect(["emu:small", "emu:fast"], config="fast") as client:
            assert await client.wait_ready(15)
            results = await asyncio.gather(*(client.mod_expo(b"\x02", 65537, M) for _ in range(60)))
            assert all(int.from_bytes(r, "big") == pow(2, 65537, M) for r in results)
            assert await client.mod_expo(b"\x02", 65537, M, card=0x11)
            st = client.stats()["queues"]
            return {name[0] for name, q in st.items() if q["requests"]}

    assert asyncio.run(main()) == {"0", "1"}  # both servers served


# ---------------------------------------------------------------- configuration


def test_config_file_and_environment_name_several_servers(tmp_path: Path) -> None:
    f = tmp_path / "apcrypto.toml"
    f.write_text('url = ["tcp://a:1", "tcp://b:2"]\n[options]\nreply_timeout = 5.0\n')
    chosen = config.resolve(None, {}, env={}, cwd=tmp_path)
    assert chosen.url == ["tcp://a:1", "tcp://b:2"] and chosen.options == {"reply_timeout": 5.0}
    chosen = config.resolve(None, {}, env={"APCRYPTO_URL": "tcp://a:1,tcp://b:2"}, cwd=tmp_path)
    assert split_urls(chosen.url) == ["tcp://a:1", "tcp://b:2"]
    chosen = config.resolve(["emu:", "emu:fast"], {}, env={}, cwd=tmp_path)
    assert chosen.url == ["emu:", "emu:fast"] and chosen.source == "argument"
    for bad in ("url = [1, 2]\n", "url = []\n", "url = 5\n"):
        f.write_text(bad)
        with pytest.raises(ValueError, match="url must be a string or a list of strings"):
            config.resolve(None, {}, env={}, cwd=tmp_path)


def test_config_file_list_reaches_connect(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "apcrypto.toml"
    f.write_text('url = ["emu:small", "emu:fast"]\n')
    monkeypatch.setenv("APCRYPTO_CONFIG_FILE", str(f))
    monkeypatch.delenv("APCRYPTO_URL", raising=False)
    monkeypatch.setenv("APCRYPTO_OPTIONS", json.dumps({"config": "fast"}))
    with apcrypto.connect() as client:
        assert isinstance(client.transport, MultiTransport) and len(client.transport.children) == 2


# ---------------------------------------------------------------- listings and card statistics


def test_list_and_card_stats_name_each_servers_cards_by_the_pool_numbering(two) -> None:
    from apcrypto.cardstats import CardSide, PoolCardSide, StatsSampler
    from apcrypto.cli import listing

    emus, client = two
    work = [client.mod_expo(b"\x02", 65537, M) for _ in range(60)]
    work += [client.counter_increment(1) for _ in range(9)]
    assert all(f.result(20) is not None for f in work)
    side = CardSide.for_client(client)
    assert isinstance(side, PoolCardSide)
    data = listing(client, side)
    # oracle: each emulator's own log, renumbered by the documented rule
    per_qid: dict[int, int] = {}
    for i, e in enumerate(emus):
        for x in e.execution_log.entries():
            q = pool_qid(i, x.qid)
            per_qid[q] = per_qid.get(q, 0) + 1
    assert data["requests_source"] == "card"
    assert [c["name"] for c in data["cards"]] == ["00", "01", "02", "03", "10", "11", "12", "13"]
    for card in data["cards"]:
        for q in card["queues"]:
            qid = int(q["name"][:2], 16) << 8 | int(q["name"][3:], 16)
            assert q["requests"] == per_qid.get(qid, 0), q["name"]
    assert sum(c["requests"] for c in data["cards"][4:]) > 0  # server 1 counted under its own cards

    report = StatsSampler(side).sample()
    assert set(report["cards"]) == {"00", "01", "02", "03", "10", "11", "12", "13"}
    ops = {apqn: sum(int(r["ops"]) for r in fns.values()) for apqn, fns in report["queues"].items()}
    for i, e in enumerate(emus):
        ended = [x for x in e.execution_log.entries() if x.ended is not None]
        assert sum(n for apqn, n in ops.items() if int(apqn[0], 16) == i) == len(ended)


def test_pool_card_side_needs_one_control_plane_per_server() -> None:
    from apcrypto.cardstats import PoolCardSide

    with pytest.raises(ValueError, match="one control endpoint per server"):
        PoolCardSide.for_children([object(), object()], "tcp://127.0.0.1:1")
    assert PoolCardSide.for_children([object(), object()], None) is None  # no card side: say so


def test_cli_list_takes_several_urls(capsys: pytest.CaptureFixture[str]) -> None:
    from apcrypto.cli import main

    assert main(["list", "--json", "emu:small", "emu:fast"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [c["name"] for c in data["cards"]] == ["00", "01", "10", "11", "12", "13"]
    assert data["requests_source"] == "card"  # each in-process server's own counters
    assert main(["list", "emu:small", "emu:fast", "01", "12.0003"]) == 0
    names = [ln.split()[0] for ln in capsys.readouterr().out.splitlines()[2:]]
    assert names == ["01", "01.0000", "01.0001", "12", "12.0003"]  # lszcrypt filters, pool card ids
    assert main(["stats", "emu:small,emu:fast", "-i", "0.05", "-c", "1", "-o", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["cards"]) == {"00", "01", "10", "11", "12", "13"}  # each server on its own clock


def test_a_servers_loss_and_return_carry_its_own_queues_as_scope() -> None:
    """The pool fills ``scope`` on the core's TransportLost and PeerRestored with that server's
    queues only (renumbered into its block), so the core keeps each server's to itself."""
    a, b = Scripted([0x0001]), Scripted([0x0001, 0x0302])
    t = MultiTransport([a, b], ["x:a", "x:b"])
    b.script = [TransportLost("gone", (), True, (0x0302,)), PeerRestored("back", resumed=False)]
    lost, back = t.poll()
    assert isinstance(lost, TransportLost) and lost.scope == (0x1001, 0x1302) and lost.qids == (0x1302,)
    assert isinstance(back, PeerRestored) and back.scope == (0x1001, 0x1302) and back.reason == "x:b: back"


def test_a_server_that_does_not_answer_fails_the_open_with_its_own_error() -> None:
    from apcrypto.transport.zmq_client import ServerUnreachable

    dead = ["tcp://127.0.0.1:9", "tcp://127.0.0.1:7"]  # nothing listens on discard/echo here
    with pytest.raises(ServerUnreachable, match=r"127\.0\.0\.1:9\b"):  # the first failure in URL order
        apcrypto.connect(["emu:small", *dead], timeout=0.3, config="fast")


def test_a_server_reconfigured_with_a_card_outside_its_block_is_logged_not_fatal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b = Scripted([0x0001]), Scripted([0x0001])
    t = MultiTransport([a, b], ["x:a", "x:b"])
    b._qids = [0x0001, 0x1001]  # restarted with a 17th card since the pool opened
    b.script = [Interrupt(0x1001), Interrupt(0x0001)]
    with caplog.at_level("WARNING", logger="apcrypto.transport.multi"):
        assert t.qids() == [0x0001, 0x1001]  # server 1's card 0; its card 0x10 cannot be numbered
        assert t.poll() == [Interrupt(0x1001)]  # only the queue the pool can name
    assert sum("offers card 10" in r.getMessage() for r in caplog.records) == 1  # once


def test_a_journal_over_a_pool_is_refused_and_everything_closed(tmp_path: Path) -> None:
    # A journal keeps one server session's identity: over a pool it could resume only one server's
    # held work after a crash, so it is refused, and the pool it opened is closed again.
    with pytest.raises(UrlListError, match="journal= keeps one server session"):
        apcrypto.connect(["emu:small", "emu:fast"], config="fast", journal=str(tmp_path / "j.db"))
    # the journal was closed too: a client may open it at once (one live client per journal)
    apcrypto.connect("emu:small", config="fast", journal=str(tmp_path / "j.db")).close()
