"""Adapter profiles: the emulator's topology and timing, from a versioned TOML file.

A profile is data the tests, benchmarks and servers share, so a mistake in one must be loud: any
unknown key, missing key or bad value raises :class:`ProfileError` naming the key path
(``card_types.CEX8A.service_time.MEX_9K``), never a silent default.  The schema is a table here
(``_SCHEMA``), checked by one small walker, so adding a key is one line.

Service times are in seconds.  IBM publishes no per-card figures; the bundled profiles derive theirs
from zcrypt's relative speed ratings (``reference/zcrypt.md`` §5.4) times ``timing.rating_unit``,
which each profile states.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from apformats.status import DEFAULT_MAX_MSG_SIZE, ML_CHUNK, queue_slots
from firmware_stubs.arithmetic import ARITHMETIC_NAMES, unavailable_reason
from firmware_stubs.context import COMPUTE_MODES

__all__ = [
    "FUNCTION_CLASSES",
    "PROFILE_FORMAT",
    "CardSpec",
    "CardType",
    "Execution",
    "Profile",
    "ProfileError",
    "Timing",
    "bundled_profiles",
    "load_profile",
]

#: The one profile format this code reads.  Bump it when a key changes meaning.
PROFILE_FORMAT = 1

#: Function classes a service-time table may name (besides ``CPRB:<fc>`` and ``default``).
FUNCTION_CLASSES = ("MEX_1K", "MEX_2K", "MEX_4K", "CRT_1K", "CRT_2K", "CRT_4K", "RNG", "CPRB:*")
_CPRB_FC = re.compile(r"^CPRB:[A-Za-z0-9]{2}$")
MODES = ("accel", "cca")  # the modes the firmware stubs implement
#: Where a card's engines run the firmware's RSA math on a wall clock (emulator.engines).
ENGINE_BACKENDS = ("inline", "threads", "processes")

#: Where the bundled profiles live (installed as package data).
PROFILE_DIR = Path(__file__).with_name("profiles")


class ProfileError(ValueError):
    """A profile that cannot be used: the message names the file and the key path."""


@dataclass(frozen=True)
class Timing:
    """Card-independent timing.  ``jitter`` is a fraction: each service time is scaled by a seeded
    uniform factor in ``[1 - jitter, 1 + jitter]``.

    ``compute`` is the firmware's arithmetic: ``"real"`` (the default, and the only mode any
    correctness test may use) or ``"echo"``, where RSA requests pass every operand check and are
    answered with a correctly shaped type 80 that holds the *message itself*, not its modular
    exponentiation.  Echo exists for overhead benchmarks (the ``overhead`` profile) that must measure
    the software around the math, not gmpy2; its results are wrong on purpose and must never be read
    as RSA results.
    """

    rating_unit: float
    jitter: float
    reset_time: float
    recovery_time: float
    compute: str = "real"


@dataclass(frozen=True)
class Execution:
    """Where and with what the firmware's RSA arithmetic runs: speed only, never the results.

    ``backend``: ``"inline"`` computes when an engine starts a message, in the thread that started
    it, under the emulator lock (one core at a time); ``"threads"`` hands RSA requests to
    ``workers`` threads per card, whose math releases the GIL; ``"processes"`` to ``workers``
    worker processes per card (the Python around the math runs there too).  A worker process that
    dies is a machine failure of its card.  The backend applies on a wall clock only: on a virtual
    clock the math is always inline, so a simulation never depends on another thread's or
    process's timing (the service time comes from the model either way).

    ``arithmetic``: the library (:mod:`firmware_stubs.arithmetic`): ``"auto"``, ``"openssl"`` or
    ``"gmpy2"``.
    """

    backend: str = "inline"
    workers: int = 1
    arithmetic: str = "auto"


@dataclass(frozen=True)
class CardType:
    """What TAPQ reports for a card model, and how fast its engines are."""

    name: str
    at: int
    mode: str
    engines: int
    qd: int
    ml: int
    nd: int
    apsc: bool
    mex4k: bool
    crt4k: bool
    class_: int
    max_mod_bytes: int
    service_time: Mapping[str, float]

    @property
    def slots(self) -> int:
        return queue_slots(self.qd)

    @property
    def max_msg_size(self) -> int:
        return self.ml * ML_CHUNK if self.ml else DEFAULT_MAX_MSG_SIZE

    def base_service_time(self, function: str) -> float:
        """Seconds for ``function``: exact entry, else ``CPRB:*`` for CPRBs, else ``default``."""
        st = self.service_time
        if function in st:
            return st[function]
        if function.startswith("CPRB:") and "CPRB:*" in st:
            return st["CPRB:*"]
        return st["default"]


@dataclass(frozen=True)
class CardSpec:
    """One configured card: its id (APID), model, and domains."""

    id: int
    type: CardType
    usage_domains: tuple[int, ...]
    control_domains: tuple[int, ...]


@dataclass(frozen=True)
class Profile:
    format: int
    name: str
    description: str
    timing: Timing
    card_types: Mapping[str, CardType]
    cards: tuple[CardSpec, ...]
    source: str = "<memory>"
    execution: Execution = Execution()

    def card(self, card_id: int) -> CardSpec:
        for c in self.cards:
            if c.id == card_id:
                return c
        raise KeyError(card_id)


# --- schema ------------------------------------------------------------------------------------

Check = Callable[[Any], str | None]  # returns an error text, or None when the value is fine


def _int(lo: int, hi: int) -> Check:
    def check(v: Any) -> str | None:
        if type(v) is not int or not lo <= v <= hi:
            return f"must be an integer in {lo}..{hi}"
        return None

    return check


def _seconds(v: Any) -> str | None:
    if type(v) not in (int, float) or not math.isfinite(v) or v < 0:
        return "must be a finite number of seconds >= 0"
    return None


def _fraction(v: Any) -> str | None:
    if type(v) not in (int, float) or not 0 <= v < 1:
        return "must be a number in [0, 1)"
    return None


def _bool(v: Any) -> str | None:
    return None if type(v) is bool else "must be true or false"


def _str(v: Any) -> str | None:
    return None if isinstance(v, str) else "must be a string"


def _compute(v: Any) -> str | None:
    return None if v in COMPUTE_MODES else f"must be one of {', '.join(COMPUTE_MODES)}"


def _backend(v: Any) -> str | None:
    return None if v in ENGINE_BACKENDS else f"must be one of {', '.join(ENGINE_BACKENDS)}"


def _arithmetic(v: Any) -> str | None:
    if v not in ARITHMETIC_NAMES:
        return f"must be one of {', '.join(ARITHMETIC_NAMES)}"
    return unavailable_reason(v)


def _mode(v: Any) -> str | None:
    return None if v in MODES else f"must be one of {', '.join(MODES)}"


def _domain_list(v: Any) -> str | None:
    if not isinstance(v, list) or any(type(d) is not int or not 0 <= d <= 255 for d in v):
        return "must be a list of domain numbers 0..255"
    if len(set(v)) != len(v):
        return "must not repeat a domain"
    return None


_TOP = {"format": (True, _int(0, 1 << 31)), "name": (True, _str), "description": (False, _str)}
_TIMING = {
    "rating_unit": (True, _seconds),
    "jitter": (True, _fraction),
    "reset_time": (True, _seconds),
    "recovery_time": (True, _seconds),
    "compute": (False, _compute),
}
_EXECUTION = {
    "backend": (False, _backend),
    "workers": (False, _int(1, 64)),
    "arithmetic": (False, _arithmetic),
}
_CARD_TYPE = {
    "at": (True, _int(0, 255)),
    "mode": (True, _mode),
    "engines": (True, _int(1, 4096)),
    "qd": (True, _int(0, 15)),
    "ml": (True, _int(0, 15)),
    "nd": (True, _int(1, 255)),
    "apsc": (True, _bool),
    "mex4k": (True, _bool),
    "crt4k": (True, _bool),
    "class": (True, _int(0, 255)),
    "max_mod_bytes": (True, _int(1, 512)),
}
_CARD = {
    "id": (True, _int(0, 255)),
    "type": (True, _str),
    "usage_domains": (True, _domain_list),
    "control_domains": (False, _domain_list),
}


def _check_table(
    table: Any, schema: Mapping[str, tuple[bool, Check]], path: str, where: str, extra: tuple[str, ...] = ()
) -> None:
    if not isinstance(table, dict):
        raise ProfileError(f"{where}: '{path}' must be a table")
    prefix = f"{path}." if path else ""
    for key in table:
        if key not in schema and key not in extra:
            known = ", ".join(sorted([*schema, *extra]))
            raise ProfileError(f"{where}: unknown key '{prefix}{key}' (known keys: {known})")
    for key, (required, check) in schema.items():
        if key not in table:
            if required:
                raise ProfileError(f"{where}: missing key '{prefix}{key}'")
            continue
        err = check(table[key])
        if err:
            raise ProfileError(f"{where}: '{prefix}{key}' {err}, got {table[key]!r}")


def _service_times(table: Any, path: str, where: str) -> Mapping[str, float]:
    if not isinstance(table, dict):
        raise ProfileError(f"{where}: '{path}' must be a table")
    for key, value in table.items():
        if key not in FUNCTION_CLASSES and key != "default" and not _CPRB_FC.match(key):
            known = ", ".join([*FUNCTION_CLASSES, "CPRB:<fc>", "default"])
            raise ProfileError(f"{where}: unknown key '{path}.{key}' (known keys: {known})")
        err = _seconds(value)
        if err:
            raise ProfileError(f"{where}: '{path}.{key}' {err}, got {value!r}")
    if "default" not in table:
        raise ProfileError(f"{where}: missing key '{path}.default'")
    return MappingProxyType({k: float(v) for k, v in table.items()})


def parse_profile(data: Mapping[str, Any], *, source: str = "<memory>") -> Profile:
    """Validate a TOML document (already parsed) and build a :class:`Profile`."""
    where = f"profile {source}"
    _check_table(data, _TOP, "", where, extra=("timing", "execution", "card_types", "cards"))
    if data["format"] != PROFILE_FORMAT:
        raise ProfileError(
            f"{where}: 'format' is {data['format']}, this emulator reads format {PROFILE_FORMAT} only"
        )
    for key in ("timing", "card_types", "cards"):
        if key not in data:
            raise ProfileError(f"{where}: missing key '{key}'")

    _check_table(data["timing"], _TIMING, "timing", where)
    timing = Timing(
        **{k: float(data["timing"][k]) for k in _TIMING if k != "compute"},
        compute=data["timing"].get("compute", "real"),
    )

    exe_tbl = data.get("execution", {})
    _check_table(exe_tbl, _EXECUTION, "execution", where)
    execution = Execution(**exe_tbl)

    types_tbl = data["card_types"]
    if not isinstance(types_tbl, dict) or not types_tbl:
        raise ProfileError(f"{where}: 'card_types' must be a non-empty table")
    card_types: dict[str, CardType] = {}
    for name, tbl in types_tbl.items():
        path = f"card_types.{name}"
        _check_table(tbl, _CARD_TYPE, path, where, extra=("service_time",))
        if "service_time" not in tbl:
            raise ProfileError(f"{where}: missing key '{path}.service_time'")
        card_types[name] = CardType(
            name=name,
            at=tbl["at"],
            mode=tbl["mode"],
            engines=tbl["engines"],
            qd=tbl["qd"],
            ml=tbl["ml"],
            nd=tbl["nd"],
            apsc=tbl["apsc"],
            mex4k=tbl["mex4k"],
            crt4k=tbl["crt4k"],
            class_=tbl["class"],
            max_mod_bytes=tbl["max_mod_bytes"],
            service_time=_service_times(tbl["service_time"], f"{path}.service_time", where),
        )

    cards_tbl = data["cards"]
    if not isinstance(cards_tbl, list) or not cards_tbl:
        raise ProfileError(f"{where}: 'cards' must be a non-empty array of tables ([[cards]])")
    cards: list[CardSpec] = []
    seen: set[int] = set()
    for i, tbl in enumerate(cards_tbl):
        path = f"cards[{i}]"
        _check_table(tbl, _CARD, path, where)
        if tbl["id"] in seen:
            raise ProfileError(f"{where}: '{path}.id' repeats card {tbl['id']}")
        seen.add(tbl["id"])
        if tbl["type"] not in card_types:
            raise ProfileError(
                f"{where}: '{path}.type' names unknown card type {tbl['type']!r} "
                f"(card_types: {', '.join(card_types)})"
            )
        ctype = card_types[tbl["type"]]
        usage = tuple(sorted(tbl["usage_domains"]))
        control = tuple(sorted(tbl.get("control_domains", [])))
        if not usage:
            raise ProfileError(f"{where}: '{path}.usage_domains' must name at least one domain")
        for key, doms in (("usage_domains", usage), ("control_domains", control)):
            bad = [d for d in doms if d >= ctype.nd]
            if bad:
                raise ProfileError(
                    f"{where}: '{path}.{key}' has domain {bad[0]} >= nd={ctype.nd} of {ctype.name}"
                )
        both = set(usage) & set(control)
        if both:
            raise ProfileError(
                f"{where}: '{path}.control_domains' repeats usage domain {min(both)} "
                "(list control-only domains there)"
            )
        cards.append(CardSpec(tbl["id"], ctype, usage, control))

    return Profile(
        format=data["format"],
        name=data["name"],
        description=data.get("description", ""),
        timing=timing,
        card_types=MappingProxyType(card_types),
        cards=tuple(sorted(cards, key=lambda c: c.id)),
        source=source,
        execution=execution,
    )


def bundled_profiles() -> list[str]:
    """Names of the adapter profiles shipped in ``emulator/profiles/`` (``usb_*.toml`` files there
    describe USB devices, not adapters, and are not profiles)."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml") if not p.stem.startswith("usb_"))


def load_profile(name_or_path: str | Path) -> Profile:
    """Load a bundled profile by name (``"default"``) or a TOML file by path."""
    text: str
    source: str
    if isinstance(name_or_path, Path) or "/" in name_or_path or name_or_path.endswith(".toml"):
        path = Path(name_or_path)
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ProfileError(f"profile {source}: cannot read: {exc}") from exc
    else:
        res = PROFILE_DIR / f"{name_or_path}.toml"
        if not res.is_file():
            raise ProfileError(
                f"no bundled profile {name_or_path!r} (bundled: {', '.join(bundled_profiles())})"
            )
        source = f"{name_or_path}.toml"
        text = res.read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"profile {source}: not valid TOML: {exc}") from exc
    return parse_profile(data, source=source)
