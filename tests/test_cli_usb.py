"""The emulated USB adapter from the environment alone, in a fresh process (no ``plug()`` in code)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _list(**env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("APCRYPTO_")}
    full.update(env)
    return subprocess.run(
        [sys.executable, "-m", "apcrypto", "list", "usb://1209:0A70"],
        env=full,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _queues(out: str) -> list[str]:
    return [ln for ln in out.splitlines()[1:] if "." in ln.split()[0]]


def test_the_backend_variable_alone_gives_a_working_device() -> None:
    res = _list(APCRYPTO_USB_BACKEND="emulator.usb_backend")
    assert res.returncode == 0, res.stderr
    queues = _queues(res.stdout)
    assert len(queues) == 16 and all(" online " in q for q in queues)


def test_the_profile_comes_from_another_variable() -> None:
    res = _list(APCRYPTO_USB_BACKEND="emulator.usb_backend", APCRYPTO_USB_PROFILE="small")
    assert res.returncode == 0, res.stderr
    assert 0 < len(_queues(res.stdout)) < 16


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"APCRYPTO_USB_BACKEND": "emulator.usb_backend", "APCRYPTO_USB_PROFILE": "none"}, "usb"),
        ({"APCRYPTO_USB_BACKEND": "emulator.usb_backend", "APCRYPTO_USB_PROFILE": "nosuch"}, "nosuch"),
    ],
)
def test_no_device_is_one_clear_line(env: dict[str, str], says: str) -> None:
    res = _list(**env)
    assert res.returncode == 1 and res.stderr.startswith("apcrypto: error: usb") and says in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
