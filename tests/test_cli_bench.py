"""``apcrypto bench``: a load generator on any URL with percentiles, utilisation, JSON and a plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from apcrypto.bench import OPS, percentiles, run_bench
from apcrypto.cli import main


def test_depth_ranges_are_powers_of_two() -> None:
    from apcrypto.cli import _depths

    assert _depths("1-64") == [1, 2, 4, 8, 16, 32, 64]
    assert _depths("3-20") == [3, 6, 12]
    assert _depths("1,8, 64") == [1, 8, 64]


def test_percentiles_are_nearest_rank_in_milliseconds() -> None:
    got = percentiles([i / 1000 for i in range(100, 0, -1)])  # 100..1 ms, descending
    assert got == pytest.approx({"p50": 50.0, "p90": 90.0, "p99": 99.0, "max": 100.0, "mean": 50.5})


def test_a_sweep_writes_json_and_a_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    argv = ["bench", "--url", "emu:fast", "--op", "me-1k,counter", "--depth", "1,4", "--requests", "60"]
    assert main([*argv, "--json", str(out_json), "--plot", str(out_png), "--no-progress"]) == 0
    text = capsys.readouterr().out
    data = json.loads(out_json.read_text())
    assert [(p["op"], p["depth"]) for p in data["points"]] == [
        ("me-1k", 1), ("me-1k", 4), ("counter", 1), ("counter", 4)
    ]  # fmt: skip
    for p in data["points"]:
        assert p["completed"] == 60 and p["errors"] == {}
        lat = p["latency_ms"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert p["utilisation"]["source"] == "card" and p["utilisation"]["apqns"]
        assert all(0 < u <= 1 for u in p["utilisation"]["cards"].values())
    # the coprocessor serves counters, the accelerators ME: each point's cards are the ones that worked
    assert set(data["points"][0]["utilisation"]["cards"]) == {"00", "01"}
    assert set(data["points"][2]["utilisation"]["cards"]) == {"02", "03"}
    assert set(data["raw"]) == {"me-1k"}  # no raw loop for CPRB functions
    assert all(not c["comparable"] and c["driver_over_raw"] is None for c in data["comparisons"])
    assert "driver / raw loop not comparable for me-1k at depth 4" in text
    assert "me-1k depth 4 over depth 1 (the naive one-at-a-time driver)" in text
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_raw_comparison_is_given_where_both_fill_the_same_slots() -> None:
    res = run_bench("emu:fast", ["me-1k"], [64], 1, requests=300, progress=False)
    (cmp,) = res["comparisons"]
    assert res["raw"]["me-1k"]["slots"] == 64 and cmp["comparable"]
    assert cmp["driver_over_raw"] == pytest.approx(cmp["driver_ops_per_s"] / cmp["raw_ops_per_s"])


def test_duration_clients_and_every_op_name() -> None:
    assert set(OPS) == {
        "me-1k",
        "me-2k",
        "me-4k",
        "crt-1k",
        "crt-2k",
        "crt-4k",
        "rng",
        "counter",
        "key-store",
        "key-read",
    }
    res = run_bench("emu:fast", ["crt-1k"], [2], 3, duration=0.3, raw=False)
    (p,) = res["points"]
    assert p["clients"] == 3 and p["completed"] > 0 and p["errors"] == {} and 0.3 <= p["seconds"] < 30
    # each client drives its own domains (4 on this profile): all four carried work
    assert {q[3:] for q in p["utilisation"]["apqns"]} == {"0000", "0001", "0002", "0003"}
    with pytest.raises(ValueError, match="each client needs its own"):
        run_bench("emu:fast", ["me-1k"], [1], 5, requests=10, raw=False)


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--op", "me-3k"], "unknown --op ['me-3k']"),
        (["--depth", "0"], "--depth and --clients must be >= 1"),
        (["--depth", "0-64"], "give N, a list such as 1,8,64, or a range"),
        (["--depth", "fast"], "give N, a list such as 1,8,64, or a range"),
        (["--requests", "5", "--duration", "1"], "not both"),
    ],
)
def test_bad_bench_arguments_are_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], says: str
) -> None:
    assert main(["bench", "--no-progress", *argv]) == 1
    err = capsys.readouterr().err
    assert says in err and len(err.splitlines()) == 1
