"""The documentation stays true: its Python examples run, its links resolve inside the repository,
and its catalogues (options, faults, CLI) name everything the code has."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest

from apcrypto import config
from apcrypto.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: contributor pages whose ``python`` blocks list signatures, not examples to run
SIGNATURES_ONLY = {"docs/INTERNALS.md"}
_BLOCK = re.compile(r"(<!--[^\n]*-->\n)?```python\n(.*?)```", re.S)


def _examples() -> list[tuple[str, int, str]]:
    out = []
    for page in PAGES:
        text = page.read_text()
        for m in _BLOCK.finditer(text):
            if m.group(1) and "pytester" in m.group(1):
                continue  # a test file, run by tests/test_plugin.py
            if page.relative_to(ROOT).as_posix() in SIGNATURES_ONLY:
                continue
            line = text[: m.start(2)].count("\n") + 1
            out.append((page.relative_to(ROOT).as_posix(), line, m.group(2)))
    return out


EXAMPLES = _examples()


def test_the_docs_have_examples_on_every_user_page() -> None:
    pages = {p for p, _, _ in EXAMPLES}
    assert {
        "README.md",
        "docs/outcomes.md",
        "docs/transports.md",
        "docs/faults.md",
        "docs/profiles.md",
    } <= pages
    assert "docs/cli.md" in pages


@pytest.mark.parametrize(("page", "line", "code"), EXAMPLES, ids=[f"{p}:{n}" for p, n, _ in EXAMPLES])
def test_python_example_runs(
    page: str, line: int, code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # nothing an example writes lands in the repository
    for var in ("APCRYPTO_URL", "APCRYPTO_OPTIONS", "APCRYPTO_CONFIG_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    exec(compile(code, f"{page}:{line}", "exec"), {"__name__": "__docs__"})


def test_links_resolve_inside_the_repository() -> None:
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            path = (page.parent / target).resolve()
            assert path.is_relative_to(ROOT), f"{page.name} points outside the repository: {target}"
            assert path.exists(), f"{page.name} links to a missing file: {target}"
    assert "../" not in (ROOT / "README.md").read_text()


def test_every_connect_option_is_documented() -> None:
    text = (ROOT / "docs" / "transports.md").read_text()
    missing = sorted(o for o in config.valid_options() if f"`{o}`" not in text)
    assert not missing, f"docs/transports.md does not describe {missing}"


def test_every_fault_and_argument_is_in_the_catalogue() -> None:
    import emulator.faults as faults
    from emulator.control import ControlPlane, TransportFaults

    text = (ROOT / "docs" / "faults.md").read_text()
    for name in faults.__all__:
        cls = getattr(faults, name)
        if not dataclasses.is_dataclass(cls):
            continue
        method = re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower()
        assert hasattr(ControlPlane, method), method
        row = next((ln for ln in text.splitlines() if ln.startswith(f"| `{method}(")), None)
        assert row is not None, f"docs/faults.md has no row for {method}"
        for f in dataclasses.fields(cls):
            assert (
                f"`{f.name}`" in row or f"{f.name}=" in row or f"({f.name}" in row or f" {f.name}," in row
            ), f"{method}: argument {f.name} not described"
    for name in ("drop_frames", "corrupt_frames", "disconnect"):
        assert hasattr(TransportFaults, name) and f"`{name}(" in text
    for name in ("restore", "clear", "faults", "state", "inject"):
        assert hasattr(ControlPlane, name) and f"`{name}(" in text


def test_every_profile_key_is_described() -> None:
    from emulator import profile

    text = (ROOT / "docs" / "profiles.md").read_text()
    for table in ("_TOP", "_TIMING", "_EXECUTION", "_CARD_TYPE", "_CARD"):
        for key in getattr(profile, table, {}):
            assert f"`{key}`" in text, f"docs/profiles.md does not describe {table} key {key!r}"
    assert all(f"`{fc}`" in text or f'`"{fc}"`' in text for fc in profile.FUNCTION_CLASSES)


def _options(parser: argparse.ArgumentParser, command: str) -> list[str]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return [o for a in sub.choices[command]._actions for o in a.option_strings if o not in ("-h", "--help")]


@pytest.mark.parametrize("command", ["list", "stats", "bench"])
def test_every_cli_option_is_documented(command: str) -> None:
    text = (ROOT / "docs" / "cli.md").read_text()
    section = text.split(f"## apcrypto {command}", 1)[1].split("\n## ", 1)[0]
    missing = [
        o for o in _options(build_parser(), command) if f"`{o}" not in section and f" {o}" not in section
    ]
    assert not missing, f"docs/cli.md, apcrypto {command}: {missing}"
