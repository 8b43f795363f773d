"""A library logs, the application decides: nothing reaches stderr unless the app configures logging."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import logging, sys
import apcrypto
from emulator import Emulator
from apcrypto.core.classifier import classify_reply

if sys.argv[1] == "configured":
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(message)s")
emu = Emulator("fast", clock="virtual")
with apcrypto.connect("emu:", emulator=emu, config="fast") as client:
    assert client.wait_ready(10)
    emu.control.checkstop(0)                   # card 0 dies: its queues go offline (warnings)
    for _ in range(8):
        client.mod_expo(b"\\x02", 3, 0xFFFF1).exception(10)
    classify_reply(0x77)                       # an unknown reply code: logged as a warning
logging.getLogger("emulator.core").warning("emulator warning")
print("done")
"""


def _run(mode: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=60, check=True
    )


def test_library_warnings_stay_off_stderr_until_the_app_configures_logging() -> None:
    quiet = _run("quiet")
    assert quiet.stdout.strip() == "done"
    assert quiet.stderr == ""
    loud = _run("configured")
    assert "unknown REPLY code 0x77:" in loud.stderr
    assert "queue 00.0000 offline" in loud.stderr  # the checkstop really produced warnings
    assert "emulator.core emulator warning" in loud.stderr
