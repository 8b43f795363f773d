"""Configuration: unknown options are refused by name; URL and options come from the argument, then
the environment, then a config file (python-can's order); ``connect()`` says what it chose."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from pathlib import Path

import pytest

import apcrypto
from apcrypto import config
from apcrypto.transport.framed import LinkOptions


@pytest.mark.parametrize("url", ["emu:", "tcp://127.0.0.1:9", "usb://1209:0a70"])
def test_a_misspelled_option_is_a_type_error_on_every_transport(url: str) -> None:
    with pytest.raises(TypeError) as info:
        apcrypto.connect(url, reply_timout=5)
    text = str(info.value)
    assert "unknown option 'reply_timout' (did you mean 'reply_timeout'?)" in text
    assert "valid options:" in text and "backlog_limit" in text and "peer_deadline" in text


def test_the_asyncio_client_refuses_unknown_options_too() -> None:
    async def run() -> None:
        with pytest.raises(TypeError, match="'bogus'"):
            await apcrypto.aio.connect("emu:", bogus=1)

    asyncio.run(run())


def test_the_option_table_matches_the_transports() -> None:
    """A transport that grows an option must be listed, or connect() would refuse it."""
    from apcrypto.transport import TRANSPORTS

    for scheme, (module, attr) in TRANSPORTS.items():
        factory = getattr(__import__(module, fromlist=[attr]), attr)
        named = {
            p.name
            for p in inspect.signature(factory).parameters.values()
            if p.kind is p.KEYWORD_ONLY and not p.name.startswith("_")
        }
        assert named <= config.TRANSPORT_OPTIONS[scheme], (scheme, named - config.TRANSPORT_OPTIONS[scheme])
    assert set(LinkOptions.__annotations__) <= config.TRANSPORT_OPTIONS["tcp"]
    assert set(LinkOptions.__annotations__) <= config.TRANSPORT_OPTIONS["usb"]


def _file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "apcrypto.toml"
    path.write_text(text)
    return path


def test_argument_beats_environment_beats_file_per_key(tmp_path: Path) -> None:
    _file(tmp_path, 'url = "tcp://file:1"\n[options]\nreply_timeout = 1.0\nmax_redrives = 1\nseed = 9\n')
    env = {config.URL_ENV: "tcp://env:2", config.OPTIONS_ENV: json.dumps({"max_redrives": 2, "seed": 8})}
    r = config.resolve(None, {"seed": 7}, env=env, cwd=tmp_path)
    assert r.url == "tcp://env:2" and r.source == "$APCRYPTO_URL"
    assert r.options == {"reply_timeout": 1.0, "max_redrives": 2, "seed": 7}
    r = config.resolve("emu:fast", {}, env={}, cwd=tmp_path)
    assert (r.url, r.source) == ("emu:fast", "argument")
    assert r.options == {"reply_timeout": 1.0, "max_redrives": 1, "seed": 9}
    r = config.resolve(None, {}, env={}, cwd=tmp_path)
    assert r.url == "tcp://file:1" and r.source.startswith("file ")
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    r = config.resolve(None, {}, env={"XDG_CONFIG_HOME": str(empty)}, cwd=empty)
    assert (r.url, r.source, r.options) == ("emu:", "default", {})


def test_the_file_can_be_named_or_found_under_xdg(tmp_path: Path) -> None:
    named = tmp_path / "named.toml"
    named.write_text('url = "emu:small"\n')
    assert config.resolve(None, {}, env={config.FILE_ENV: str(named)}, cwd=tmp_path).url == "emu:small"
    xdg = tmp_path / "xdg" / "apcrypto"
    xdg.mkdir(parents=True)
    (xdg / "apcrypto.toml").write_text('url = "emu:fast"\n')
    r = config.resolve(None, {}, env={"XDG_CONFIG_HOME": str(tmp_path / "xdg")}, cwd=tmp_path)
    assert r.url == "emu:fast"
    with pytest.raises(FileNotFoundError, match="APCRYPTO_CONFIG_FILE"):
        config.resolve(None, {}, env={config.FILE_ENV: str(tmp_path / "nope.toml")}, cwd=tmp_path)


@pytest.mark.parametrize(
    ("text", "exc", "match"),
    [
        ("url = 5\n", ValueError, "url must be a string"),
        ("uri = 'emu:'\n", ValueError, "unknown keys \\['uri'\\]"),
        ("[options]\nreply_timout = 1\n", TypeError, "did you mean 'reply_timeout'"),
        ("url = \n", ValueError, "config file"),
    ],
)
def test_a_bad_config_file_is_named_in_the_error(
    tmp_path: Path, text: str, exc: type[Exception], match: str
) -> None:
    _file(tmp_path, text)
    with pytest.raises(exc, match=match):
        config.resolve(None, {}, env={}, cwd=tmp_path)


def test_bad_environment_options_are_refused() -> None:
    with pytest.raises(ValueError, match="not JSON"):
        config.resolve(None, {}, env={config.OPTIONS_ENV: "{"})
    with pytest.raises(TypeError, match="APCRYPTO_OPTIONS got unknown option 'speed'"):
        config.resolve(None, {}, env={config.OPTIONS_ENV: '{"speed": 1}'})


def test_connect_without_url_logs_its_choice(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.setenv(config.URL_ENV, "emu:small")
    caplog.set_level(logging.INFO, logger="apcrypto.config")
    with apcrypto.connect(config="fast", clock="virtual") as client:
        assert client.wait_ready(10)
        small = len(client.core.queues)
    assert "using 'emu:small' (from $APCRYPTO_URL)" in caplog.text
    monkeypatch.delenv(config.URL_ENV)
    caplog.clear()
    with apcrypto.connect(config="fast", clock="virtual") as client:
        assert client.wait_ready(10)
        assert len(client.core.queues) != small  # the default profile, not the small one
    assert "using 'emu:' (from default)" in caplog.text
