"""The demo and the ``apcrypto`` command line, end to end on the embedded emulator."""

from __future__ import annotations

import io
import re

import pytest

from apcrypto.cli import main
from apcrypto.demo import ordinal, run_demo


def _demo(**kw: object) -> tuple[int, str]:
    out = io.StringIO()
    rc = run_demo(out=out, **kw)  # type: ignore[arg-type]
    return rc, out.getvalue()


def test_demo_checks_every_verdict_and_passes() -> None:
    rc, text = _demo(seed=3, requests=400)
    assert rc == 0
    assert "lost: 0, ran twice: 0, indeterminate that never started: 0  -> OK" in text
    assert "results checked: 0 wrong" in text
    assert "<- machine failure" in text  # the failure really was injected on a card


def test_simulated_demo_replays_exactly_from_its_seed() -> None:
    runs = [_demo(seed=5, requests=400, sim=True) for _ in range(2)]
    assert all(rc == 0 for rc, _ in runs)
    strip = [[ln for ln in text.splitlines() if "s wall)" not in ln] for _, text in runs]
    assert strip[0] == strip[1]
    assert any("Indeterminate" in ln for ln in strip[0])  # the outcome table is there
    other_seed = [ln for ln in _demo(seed=6, requests=400, sim=True)[1].splitlines() if "s wall)" not in ln]
    assert other_seed != strip[0]


def _figures(text: str) -> dict[str, object]:
    """What a demo printed, read back: outcome table, windows, utilisation percentages."""
    lines = text.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.split()[:1] == ["kind"])
    cols = lines[head].split()[1:]
    table = {}
    for ln in lines[head + 1 :]:
        if not ln.strip():
            break
        name, *nums = ln.split()
        table[name] = dict(zip(cols, map(int, nums), strict=True))
    done_ln = [ln for ln in lines if " done " in ln][-1]
    window = [ln for ln in lines if "utilisation over" in ln]
    return {
        "table": table,
        "progress_ms": float(re.search(r"in ([0-9.]+) ms of virtual time", done_ln).group(1)),  # type: ignore[union-attr]
        "summary_ms": float(window[0].split("utilisation over ")[1].split()[0]) if window else None,
        "percents": [float(p) for p in re.findall(r"(-?[0-9.]+)%", text)],
        "negatives": re.findall(r"(?<![\w.])-\d", text),  # a minus sign that is not ME-1024's
    }


@pytest.mark.parametrize(("seed", "requests"), [(1, 1), (2, 3), (6, 10), (7, 40)])
def test_small_demos_never_crash_and_every_figure_adds_up(seed: int, requests: int) -> None:
    """Small runs are where the old wait crashed (StopIteration) and the figures went wrong."""
    rc, text = _demo(seed=seed, requests=requests)
    assert rc == 0, text
    f = _figures(text)
    table = f["table"]
    assert sum(sum(row.values()) for row in table.values()) == requests  # type: ignore[attr-defined]
    assert f"{requests}/{requests} done in" in text
    assert f["progress_ms"] == f["summary_ms"]  # one window, said twice the same
    assert all(0 <= p <= 100 for p in f["percents"])  # type: ignore[attr-defined]
    assert f["negatives"] == []
    assert "th request" not in text or re.search(r"\b(1|2|3)th\b", text) is None


def test_the_machine_failure_line_says_whether_it_fired() -> None:
    fired = _demo(seed=3, requests=400)[1]
    assert "machine failure on card 02 fired" in fired and "<- machine failure" in fired
    for seed in range(1, 30):  # a tiny run where no request reaches the failing card
        rc, text = _demo(seed=seed, requests=1, sim=True)
        if "did not fire" in text:
            break
    else:
        raise AssertionError("no tiny run missed the failing card")
    assert rc == 0 and "(the card took only 0 requests)" in text and "<- machine failure" not in text
    assert "machine-failure replies 0" in text


def test_only_a_simulated_run_claims_to_replay_exactly() -> None:
    threaded = _demo(seed=3, requests=20)[1]
    assert "replays this run exactly" not in threaded
    assert (
        "thread timing varies the details" in threaded
        and "`apcrypto demo --sim --seed 3 --requests 20`" in threaded
    )
    simulated = _demo(seed=3, requests=20, sim=True)[1]
    assert "`apcrypto demo --sim --seed 3 --requests 20` replays this run exactly" in simulated


def test_a_demo_without_requests_is_refused_clearly(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ei:
        main(["demo", "--requests", "0"])
    assert ei.value.code == 2 and "--requests: must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="at least one request"):
        _demo(requests=0)


def test_ordinals() -> None:
    words = [ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 23, 101, 111, 112)]
    assert words == [
        "1st",
        "2nd",
        "3rd",
        "4th",
        "11th",
        "12th",
        "13th",
        "21st",
        "22nd",
        "23rd",
        "101st",
        "111th",
        "112th",
    ]


@pytest.mark.soak
@pytest.mark.timeout(3000)
def test_soak_200_default_demos() -> None:
    """The issue's bar: 200 consecutive default runs (3,000 requests each), 0 failures."""
    failures = []
    for i in range(200):
        rc, text = _demo(seed=1000 + i)
        f = _figures(text)
        if rc != 0 or f["progress_ms"] != f["summary_ms"] or not all(0 <= p <= 100 for p in f["percents"]):  # type: ignore[attr-defined]
            failures.append((1000 + i, text))
    assert not failures, failures[:3]


@pytest.mark.soak
@pytest.mark.timeout(1500)
def test_soak_200_small_demos() -> None:
    """200 runs with 1-10 requests (where the old wait crashed in 20-40 % of runs), 0 failures."""
    failures = []
    for i in range(200):
        rc, text = _demo(seed=2000 + i, requests=1 + i % 10)
        f = _figures(text)
        if (
            rc != 0
            or f["progress_ms"] != f["summary_ms"]
            or f["negatives"]
            or not all(0 <= p <= 100 for p in f["percents"])
        ):  # type: ignore[attr-defined]
            failures.append((2000 + i, text))
    assert not failures, failures[:3]


def test_list_shows_every_queue(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "-V"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:5] == ["CARD.DOM", "TYPE", "MODE", "STATUS", "REQUESTS"]
    queues = [ln for ln in lines[1:] if "." in ln.split()[0]]
    assert len(queues) == 16 and all(" online " in ln for ln in queues)
    assert any("CEX8A" in ln and "Accelerator" in ln for ln in queues)
    assert any("CEX8C" in ln and "CCA-Coproc" in ln for ln in queues)


def test_bench_prints_the_ratios(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--requests", "200"]) == 0
    out = capsys.readouterr().out
    ratio = float(out.split("driver / raw loop")[1].split()[0])
    assert 0 < ratio < 5  # measured, not asserted against a target (benches/ reports it)


def test_unknown_url_scheme_is_a_clear_error() -> None:
    import apcrypto
    from apcrypto.transport import UnknownTransport

    with pytest.raises(UnknownTransport, match="unknown transport scheme 'bogus'"):
        apcrypto.connect("bogus://x")


def test_public_surface_from_a_fresh_interpreter() -> None:
    """DESIGN §5 as an outside caller writes it, in a new process so no earlier import helps."""
    import subprocess
    import sys

    code = """
import asyncio, apcrypto
from emulator import Emulator
n = (1 << 1023) | 0x1D7
with apcrypto.connect("emu:") as client:
    r = client.mod_expo(bytes([5]), 65537, n).result(timeout=10)
    assert len(r) == 128 and int.from_bytes(r, "big") == pow(5, 65537, n)
    assert client.submit(apcrypto.CounterIncrement(1), idempotent=False).result(timeout=10) >= 1
    assert {"outcomes", "states", "queues"} <= set(client.stats())
emu = Emulator()
with apcrypto.connect("emu:", emulator=emu) as c:
    crt = c.mod_expo_crt(bytes([7]), 61, 53, 53, 49, 38).result(timeout=10)  # toy key: d = 2753
    assert int.from_bytes(crt, "big") == pow(7, 2753, 61 * 53)
assert emu.execution_log.entries() and emu.control is not None
for name in ("BadRequest", "Indeterminate", "DeviceUnavailable", "DeadlineExceeded"):
    assert issubclass(getattr(apcrypto.errors, name), apcrypto.errors.ApcryptoError)
async def main():
    async with apcrypto.aio.connect("emu:") as c:
        assert len(await c.mod_expo(bytes([5]), 65537, n)) == 128
asyncio.run(main())
print("surface ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "surface ok" in out.stdout
