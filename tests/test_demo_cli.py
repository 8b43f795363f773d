"""The demo and the ``apcrypto`` command line, end to end on the embedded emulator."""

from __future__ import annotations

import io

import pytest

from apcrypto.cli import main
from apcrypto.demo import run_demo


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
