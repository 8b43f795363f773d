"""``apcrypto list``: lszcrypt's filters and columns, REQUESTS as the card counts them."""

from __future__ import annotations

import json
from collections import Counter

import pytest

import apcrypto
from apcrypto.cardstats import CardSide
from apcrypto.cli import listing, main
from apformats.results import qid_card, qid_str
from emulator import Emulator
from tests._fixtures_zmq import ServerProcess, control, zmq_server

MOD = (1 << 1023) | 0x1D7


def _out(capsys: pytest.CaptureFixture[str], *argv: str) -> list[str]:
    assert main(["list", *argv]) == 0
    return capsys.readouterr().out.splitlines()


def test_requests_are_the_cards_count_of_every_clients_work() -> None:
    emu = Emulator("default", clock="virtual")
    with (
        apcrypto.connect("emu:", emulator=emu, config="fast", domains=[0, 1]) as a,
        apcrypto.connect("emu:", emulator=emu, config="fast", domains=[2, 3]) as b,
    ):
        assert a.wait_ready(10) and b.wait_ready(10)
        futs = [a.mod_expo(b"\x02", 3, MOD) for _ in range(30)] + [b.counter_increment(1) for _ in range(7)]
        for f in futs:
            f.result(10)
        data = listing(a, CardSide(emulator=emu))
    # oracle: the execution log, one entry per request a card accepted, whoever sent it
    per_qid = Counter(e.qid for e in emu.execution_log.entries())
    per_card = Counter({c: sum(n for q, n in per_qid.items() if qid_card(q) == c) for c in {0, 1, 2, 3}})
    assert data["requests_source"] == "card"
    for card in data["cards"]:
        assert card["requests"] == per_card[card["card"]]
        for q in card["queues"]:
            assert q["requests"] == per_qid.get(_qid(q["name"]), 0)
    assert sum(c["requests"] for c in data["cards"]) >= 37  # both clients' work, not one client's
    own = sum(q.requests_total for q in a.core.queues.values())
    assert sum(c["requests"] for c in data["cards"]) > own


def _qid(name: str) -> int:
    card, dom = name.split(".")
    return (int(card, 16) << 8) | int(dom, 16)


def test_filters_and_only_options(capsys: pytest.CaptureFixture[str]) -> None:
    lines = _out(capsys, "02")
    names = [ln.split()[0] for ln in lines[2:]]
    assert names == ["02", "02.0000", "02.0001", "02.0002", "02.0003"]
    assert [ln.split()[0] for ln in _out(capsys, "01.0002", "03")[2:]] == ["01", "01.0002", "03"] + [
        qid_str(0x300 + d) for d in range(4)
    ]
    cards = _out(capsys, "--cardonly")
    assert [ln.split()[0] for ln in cards[2:]] == ["00", "01", "02", "03"]
    queues = _out(capsys, "--queueonly", "--accelonly")
    assert all("." in ln.split()[0] and "Accelerator" in ln for ln in queues[2:]) and len(queues) == 10
    assert all("CCA-Coproc" in ln for ln in _out(capsys, "--ccaonly")[2:])
    assert _out(capsys, "--ep11only")[2:] == []
    verbose = _out(capsys, "-V", "00")
    head = "CARD.DOM TYPE MODE STATUS REQUESTS PENDING HWTYPE QDEPTH FUNCTIONS DRIVER"
    assert verbose[0].split() == head.split()
    assert verbose[2].split()[6:9] == ["14", "8", "-MC-A-N-F-"]
    bus = _out(capsys, "-b")
    assert bus[0] == "ap_domain=0x0" and "ap_interrupts are enabled" in bus


def test_json_output(capsys: pytest.CaptureFixture[str]) -> None:
    data = json.loads("\n".join(_out(capsys, "--json", "--accelonly")))
    assert [c["name"] for c in data["cards"]] == ["00", "01"]
    assert all(len(c["queues"]) == 4 and c["type"] == "CEX8A" for c in data["cards"])
    only = json.loads("\n".join(_out(capsys, "--json", "--queueonly", "03")))
    assert [q["name"] for q in only["queues"]] == [qid_str(0x300 + d) for d in range(4)]


@pytest.mark.parametrize("bad", ["zz", "100", "02.zz"])
def test_a_bad_filter_is_one_line(capsys: pytest.CaptureFixture[str], bad: str) -> None:
    assert main(["list", bad]) == 1
    err = capsys.readouterr().err
    assert err.startswith("apcrypto: error:") and len(err.splitlines()) == 1


def test_over_tcp_requests_come_from_the_servers_control_plane(
    capsys: pytest.CaptureFixture[str], zmq_server: ServerProcess, control: object
) -> None:
    with apcrypto.connect(zmq_server.data, config="fast") as c:
        assert c.wait_ready(10)
        for f in [c.mod_expo(b"\x02", 3, MOD) for _ in range(25)]:
            f.result(10)
    data = json.loads("\n".join(_out(capsys, zmq_server.data, "--control", zmq_server.control, "--json")))
    truth = {c["card"]: c["requests"] for c in control.stats()["emulator"]["cards"]}  # type: ignore[attr-defined]
    assert data["requests_source"] == "card"
    assert {c["card"]: c["requests"] for c in data["cards"]} == truth
    assert sum(truth.values()) >= 25
    assert main(["list", zmq_server.data, "--json"]) == 0
    captured = capsys.readouterr()
    mine = json.loads(captured.out)
    assert "give --control tcp://HOST:PORT for the card's counts" in captured.err
    assert mine["requests_source"] == "client"  # a fresh client has sent next to nothing
    assert sum(c["requests"] for c in mine["cards"]) < sum(truth.values())
