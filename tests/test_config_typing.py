"""Types a user sees: mypy infers ``Future[bytes]`` / ``bytes`` for a script using the public clients."""

from __future__ import annotations

from pathlib import Path

import pytest

SCRIPT = """
import asyncio
import apcrypto

with apcrypto.connect("emu:") as client:
    fut = client.mod_expo(b"\\\\x02", 65537, 0xFFFF1)
    reveal_type(fut)
    reveal_type(fut.result())
    reveal_type(client.mod_expo_crt(b"\\\\x02", 3, 5, 1, 1, 2))
    reveal_type(client.counter_increment(1).result())
    reveal_type(client.key_read(3))
    reveal_type(client.stats())

async def main() -> None:
    async with apcrypto.aio.connect("emu:") as aclient:
        reveal_type(aclient)
        reveal_type(await aclient.mod_expo(b"\\\\x02", 3, 0xFFFF1))
        reveal_type(await aclient.random_bytes(8))
    other = await apcrypto.aio.connect("emu:")
    reveal_type(other)

client.mod_expo(b"x", 3, 5).result() + 1   # a user's mistake: bytes + int
"""


@pytest.mark.timeout(180)
def test_mypy_infers_the_result_types_in_a_users_script(tmp_path: Path) -> None:
    from mypy import api

    script = tmp_path / "user_script.py"
    script.write_text(SCRIPT)
    out, err, status = api.run(
        [str(script), "--follow-imports=silent", "--cache-dir", str(tmp_path / "cache"), "--no-error-summary"]
    )
    revealed = [
        line.split("Revealed type is ", 1)[1].strip('"') for line in out.splitlines() if "Revealed" in line
    ]
    assert revealed == [
        "concurrent.futures._base.Future[bytes]",
        "bytes",
        "concurrent.futures._base.Future[bytes]",
        "int",
        "concurrent.futures._base.Future[bytes]",
        "dict[str, Any]",
        "apcrypto.aio.AsyncClient",
        "bytes",
        "bytes",
        "apcrypto.aio.AsyncClient",
    ], out + err
    assert 'Unsupported operand types for + ("bytes" and "int")' in out  # the types are really checked
    assert status == 1
