"""What a caller hands the library, checked before it goes anywhere: deadlines, options, URLs.

A wrong value here would otherwise be read as something else (an absolute ``time.time()`` read as
fifty years from now, a misspelled option silently ignored), so each check raises at the call with
the value and what was expected.

Where ``connect()`` takes its URL and options from, python-can's precedence (per key, first wins):

1. the arguments of ``connect(url, **options)``;
2. the environment: ``APCRYPTO_URL`` (the URL) and ``APCRYPTO_OPTIONS`` (a JSON object of options);
3. a TOML file: ``$APCRYPTO_CONFIG_FILE`` if set, else ``./apcrypto.toml``, else
   ``$XDG_CONFIG_HOME/apcrypto/apcrypto.toml`` (``~/.config/...``), the first that exists::

       url = "tcp://127.0.0.1:5555"
       [options]
       reply_timeout = 5.0

4. the default, ``emu:`` (an emulator in this process).

Several servers form one pool (:mod:`apcrypto.transport.multi`): a list of URLs as the argument
or in the file (``url = ["tcp://a:5555", "tcp://b:5555"]``), or comma-separated in one string
(``APCRYPTO_URL=tcp://a:5555,tcp://b:5555``).  A file's ``url`` that is neither a string nor a
list of strings is a ``ValueError``; a bad list (empty entry, a URL twice, ...) raises
:class:`apcrypto.transport.multi.UrlListError` when ``connect`` opens it.

``connect()`` logs (logger ``apcrypto.config``, INFO) which URL it chose and from where whenever
the caller gave none.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from numbers import Real
from pathlib import Path
from typing import Any

from apcrypto.core.config import DriverConfig
from apcrypto.transport.framed import LinkOptions
from apcrypto.transport.multi import split_urls

log = logging.getLogger(__name__)

URL_ENV = "APCRYPTO_URL"
OPTIONS_ENV = "APCRYPTO_OPTIONS"
FILE_ENV = "APCRYPTO_CONFIG_FILE"
FILE_NAME = "apcrypto.toml"
DEFAULT_URL = "emu:"

#: Options of the driver (every transport): ``config`` and each :class:`DriverConfig` field.
DRIVER_OPTIONS = frozenset({"config"} | {f.name for f in fields(DriverConfig)})
#: Options of the client object itself.
CLIENT_OPTIONS = frozenset({"psmid_base", "close_timeout", "journal", "journal_operands", "journal_sync"})
#: the link options every frame-carrying transport takes, read from their one definition
_LINK = frozenset(LinkOptions.__annotations__)
#: Options of each transport, by URL scheme (a test holds this against the factories' signatures).
TRANSPORT_OPTIONS: dict[str, frozenset[str]] = {
    "emu": frozenset({"emulator", "seed", "clock", "domains"}),
    "tcp": _LINK | {"heartbeat", "curve_server_key", "curve_keypair", "readahead"},
    "usb": _LINK | {"backend"},
}


def valid_options() -> frozenset[str]:
    """Every option name ``connect`` accepts.  One set of options serves every transport (a config
    file or a test fixture can name ``backend=`` and still connect over ``tcp://``), so an option of
    another transport is accepted and left unused; a name no layer knows is an error."""
    out = DRIVER_OPTIONS | CLIENT_OPTIONS
    for names in TRANSPORT_OPTIONS.values():
        out |= names
    return out


def check_options(options: Mapping[str, Any], *, where: str = "connect()") -> None:
    """Raise ``TypeError`` naming each unknown option, the closest valid name and all valid ones."""
    valid = valid_options()
    unknown = sorted(k for k in options if k not in valid)
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, valid, n=1)
        hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise TypeError(
        f"{where} got unknown option{'s' if len(unknown) > 1 else ''} {', '.join(hints)}; "
        f"valid options: {', '.join(sorted(valid))}"
    )


@dataclass(frozen=True)
class Resolved:
    """The URL and options ``connect`` will use, and where the URL came from."""

    url: str | list[str]  # several: one pool of servers (apcrypto.transport.multi)
    options: dict[str, Any]
    source: str  # "argument" | "$APCRYPTO_URL" | "file PATH" | "default"
    files: tuple[Path, ...] = field(default=())


def config_file(env: Mapping[str, str] | None = None, cwd: Path | None = None) -> Path | None:
    """The configuration file in force, or None (see the module docstring for the search order)."""
    env = os.environ if env is None else env
    named = env.get(FILE_ENV)
    if named:
        path = Path(named).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"${FILE_ENV} names {str(path)!r}, which is not a file")
        return path
    here = (cwd or Path.cwd()) / FILE_NAME
    if here.is_file():
        return here
    xdg = Path(env.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "apcrypto" / FILE_NAME
    return xdg if xdg.is_file() else None


def load_file(path: Path) -> tuple[str | list[str] | None, dict[str, Any]]:
    """``(url, options)`` from a config file; ``ValueError`` for malformed content."""
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"config file {str(path)!r}: {exc}") from None
    extra = sorted(set(data) - {"url", "options"})
    if extra:
        raise ValueError(f"config file {str(path)!r}: unknown keys {extra} (expected 'url' and [options])")
    url = data.get("url")
    if isinstance(url, list) and url and all(isinstance(u, str) for u in url):
        url = list(url)  # several servers, one pool
    elif url is not None and not isinstance(url, str):
        raise ValueError(f"config file {str(path)!r}: url must be a string or a list of strings")
    options = data.get("options", {})
    if not isinstance(options, dict):
        raise ValueError(f"config file {str(path)!r}: [options] must be a table")
    check_options(options, where=f"config file {str(path)!r}")
    return url, dict(options)


def _env_options(env: Mapping[str, str]) -> dict[str, Any]:
    text = env.get(OPTIONS_ENV)
    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"${OPTIONS_ENV} is not JSON: {exc}") from None
    if not isinstance(options, dict):
        raise ValueError(f"${OPTIONS_ENV} must be a JSON object of options")
    check_options(options, where=f"${OPTIONS_ENV}")
    return options


def resolve(
    url: str | Sequence[str] | None,
    options: Mapping[str, Any],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Resolved:
    """Merge argument, environment and file, per key, in that order of precedence."""
    env = os.environ if env is None else env
    check_options(options)
    path = config_file(env, cwd)
    file_url, file_opts = load_file(path) if path is not None else (None, {})
    merged = {**file_opts, **_env_options(env), **options}
    chosen: str | list[str]
    if url is not None:
        chosen, source = (url if isinstance(url, str) else split_urls(url)), "argument"
    elif env.get(URL_ENV):
        chosen, source = env[URL_ENV], f"${URL_ENV}"
    elif file_url is not None:
        chosen, source = file_url, f"file {path}"
    else:
        chosen, source = DEFAULT_URL, "default"
    if url is None:
        log.info("connect: no URL given; using %r (from %s)", chosen, source)
    return Resolved(chosen, merged, source, (path,) if path is not None else ())


#: The longest deadline a caller may give, in seconds from now (one week).  ``deadline=`` is always
#: *relative*: the request must end this many seconds after it is submitted.  Anything longer is far
#: more likely an absolute timestamp (``time.time() + 5`` is about 1.7e9) than a real wish, and would
#: otherwise be honoured as "decades from now" -- that is, no deadline at all.
MAX_DEADLINE = 7 * 24 * 3600.0

#: Values at or above this look like ``time.time()`` / ``time.monotonic()`` readings, not durations.
_LOOKS_ABSOLUTE = 1e8


def check_deadline(deadline: object) -> float | None:
    """Return ``deadline`` as float seconds from now, or raise.

    ``None`` means no deadline.  ``TypeError`` for a non-number (or a bool); ``ValueError`` for NaN,
    a negative value, or one above :data:`MAX_DEADLINE` (with a hint when it looks like an absolute
    time).  ``0`` is allowed: the request must already be done, so it ends ``DeadlineExceeded`` unless
    it can finish at once.
    """
    if deadline is None:
        return None
    if isinstance(deadline, bool) or not isinstance(deadline, Real):
        kind = type(deadline).__name__
        raise TypeError(f"deadline must be seconds from now (a number) or None, not {kind}")
    value = float(deadline)
    if math.isnan(value):
        raise ValueError("deadline is NaN; give seconds from now, or None for no deadline")
    if value < 0:
        raise ValueError(
            f"deadline={value!r}: deadline is seconds from now and must be >= 0 "
            "(an absolute time in the past, such as time.time() - 1, is not accepted)"
        )
    if value > MAX_DEADLINE:
        hint = (
            " -- this looks like an absolute time (time.time() or time.monotonic()); "
            "pass seconds from now, e.g. deadline=when - time.time()"
            if value >= _LOOKS_ABSOLUTE
            else ""
        )
        raise ValueError(
            f"deadline={value!r}: deadline is seconds from now, at most {MAX_DEADLINE:.0f} (one week){hint}"
        )
    return value


__all__ = [
    "MAX_DEADLINE",
    "TRANSPORT_OPTIONS",
    "Resolved",
    "check_deadline",
    "check_options",
    "config_file",
    "load_file",
    "resolve",
    "valid_options",
]
