"""``apcrypto stats`` and ``stats()``: the card's side, per card/APQN/function, one JSON shape."""

from __future__ import annotations

import asyncio
import csv
import io
import json

import pytest

import apcrypto
from apcrypto.cardstats import CardSide, StatsSampler
from apcrypto.cli import main
from apcrypto.errors import BadRequest
from emulator import Emulator
from tests._fixtures_zmq import ServerProcess, zmq_server

MOD_1K = (1 << 1023) | 0x1D7
MOD_2K = (1 << 2047) | 0x1D7
SHAPE = {"outcomes", "errors", "counters", "states", "queues", "backlog", "in_flight", "card"}


def test_interval_counts_per_apqn_and_function_on_the_card_clock() -> None:
    emu = Emulator("default", clock="virtual")
    with apcrypto.connect("emu:", emulator=emu, config="fast") as client:
        assert client.wait_ready(10)
        sampler = StatsSampler(CardSide(emulator=emu))
        sampler.sample()  # baseline after bring-up (the health probes are before it)
        futs = [client.mod_expo(b"\x02", 3, MOD_1K) for _ in range(20)]
        futs += [client.mod_expo(b"\x02", 3, MOD_2K) for _ in range(12)]
        futs += [client.counter_increment(1) for _ in range(5)]
        for f in futs:
            f.result(10)
        report = sampler.sample()
    per_fn: dict[str, int] = {}
    for fns in report["queues"].values():
        for fn, row in fns.items():
            per_fn[fn] = per_fn.get(fn, 0) + int(row["ops"])
            assert row["avg_latency"] > 0 and row["errors"] == 0
    assert per_fn == {"MEX_1K": 20, "MEX_2K": 12, "CPRB:CI": 5}  # exactly what this test sent
    for name, card in report["cards"].items():
        # the engines' own busy-time accounting agrees with the per-request sums of the log
        fn_busy = sum(r["busy"] for q, fns in report["queues"].items() if q[:2] == name for r in fns.values())
        assert card["busy"] == pytest.approx(fn_busy, abs=1e-9)
    assert sum(c["ops"] for c in report["cards"].values()) == 37
    assert report["seconds"] > 0 and any(c["utilisation"] > 0 for c in report["cards"].values())
    json.dumps(report)


def test_client_stats_is_one_json_shape_with_errors_by_type() -> None:
    emu = Emulator("fast", clock="virtual")
    with apcrypto.connect("emu:", emulator=emu, config="fast") as client:
        assert client.wait_ready(10)
        client.mod_expo(b"\x02", 3, MOD_1K).result(10)
        with pytest.raises(BadRequest):
            client.mod_expo(b"\x01" * 4, 3, 1 << 31).result(10)  # even modulus: the card says no
        with pytest.raises(BadRequest):
            client.mod_expo(b"\x01" * 300, 3, MOD_1K).result(10)  # refused before any card
        st = client.stats()
    assert set(st) == SHAPE
    assert st["errors"] == {"BadRequest": 2}
    assert st["outcomes"]["completed"] == 1 and st["outcomes"]["failed"] == 2
    assert st["card"]["cards"][0]["requests"] >= 1 and "utilisation" in st["card"]
    assert json.loads(json.dumps(st)) == st

    async def run() -> dict[str, object]:
        async with apcrypto.aio.connect("emu:fast", config="fast") as ac:
            with pytest.raises(BadRequest):
                await ac.mod_expo(b"\x01" * 4, 3, 1 << 31)
            return ac.stats()

    ast = asyncio.run(run())
    assert set(ast) == SHAPE and ast["errors"] == {"BadRequest": 1}
    json.dumps(ast)


def test_over_tcp_the_card_side_comes_from_the_control_plane(zmq_server: ServerProcess) -> None:
    from emulator.control_client import ControlClient

    side = CardSide(control=ControlClient(zmq_server.control), owns_control=True)
    sampler = StatsSampler(side)
    with apcrypto.connect(zmq_server.data, config="fast") as client:
        assert client.wait_ready(10)
        sampler.sample()  # baseline after this client's bring-up probes
        for f in [client.mod_expo(b"\x02", 3, MOD_1K) for _ in range(25)]:
            f.result(10)
        st = client.stats()
    report = sampler.sample()
    side.close()
    ops = sum(r["ops"] for fns in report["queues"].values() for fn, r in fns.items() if fn == "MEX_1K")
    assert ops == 25
    assert set(st) == SHAPE and st["card"] is None and st["outcomes"]["completed"] == 25
    json.dumps(st)


@pytest.mark.parametrize("fmt", ["json", "csv", "table"])
def test_the_command_reports_count_times_in_each_format(
    capsys: pytest.CaptureFixture[str], zmq_server: ServerProcess, fmt: str
) -> None:
    argv = ["stats", zmq_server.data, "--control", zmq_server.control, "-i", "0.05", "-c", "2", "-o", fmt]
    assert main(argv) == 0
    out = capsys.readouterr().out
    if fmt == "json":
        reports = [json.loads(line) for line in out.splitlines()]
        assert [r["interval"] for r in reports] == [1, 2]
        assert all(
            r["seconds"] > 0 and r["cards"] and set(r["cards"]) == set(reports[0]["cards"]) for r in reports
        )
        assert all(c["ops"] >= 0 and 0 <= c["utilisation"] <= 1 for r in reports for c in r["cards"].values())
    elif fmt == "csv":
        rows = list(csv.DictReader(io.StringIO(out)))
        assert {r["interval"] for r in rows} == {"1", "2"} and rows[0]["function"] == "*"
        assert set(rows[0]) >= {"apqn", "function", "ops", "utilisation", "avg_latency_ms"}
    else:
        assert out.count("interval ") == 2 and "AVG_LAT_MS" in out and "(all)" in out


def test_without_a_card_side_the_command_says_what_is_missing(
    capsys: pytest.CaptureFixture[str], zmq_server: ServerProcess
) -> None:
    assert main(["stats", zmq_server.data, "-i", "0.01"]) == 1
    assert "give --control tcp://HOST:PORT" in capsys.readouterr().err
