"""apcrypto: keep AP crypto adapters' queues full, and never lose or double a request.

>>> import apcrypto
>>> with apcrypto.connect("emu:") as client:          # embedded emulator, default profile
...     fut = client.mod_expo(b"\\x02", 65537, (1 << 1023) + 1)

The transport is chosen by URL (``emu:[PROFILE]``, ``tcp://HOST:PORT``, ``usb://VID:PID[/SERIAL]``);
every transport takes the same driver options and gives the same outcomes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from apcrypto import errors
from apcrypto.client import Client, new_psmid_base
from apcrypto.config import check_options, resolve
from apcrypto.core.config import FAST, DriverConfig
from apcrypto.errors import (
    ApcryptoError,
    BadRequest,
    DeadlineExceeded,
    DeviceUnavailable,
    HostQueueFull,
    Indeterminate,
    TargetNotHeld,
)
from apcrypto.recovery import Recovered, open_link
from apcrypto.requests import (
    CounterIncrement,
    KeyRead,
    KeyStore,
    ModExpo,
    ModExpoCrt,
    RandomBytes,
    Request,
)
from apcrypto.transport import open_transport

__version__ = "0.1.0"

# A library logs; the application decides where it goes (logging HOWTO, "Configuring Logging for a
# Library").  Without a handler, Python's last-resort handler would print our warnings on stderr.
logging.getLogger(__name__).addHandler(logging.NullHandler())

_CONFIG_FIELDS = {f.name for f in fields(DriverConfig)}
_CLIENT_OPTIONS = {"psmid_base", "close_timeout", "journal", "journal_operands", "journal_sync"}


def split_options(options: dict[str, Any]) -> tuple[DriverConfig, dict[str, Any], dict[str, Any]]:
    """Split ``connect`` keyword options into driver config, client options and transport options.

    ``config=`` gives a whole :class:`DriverConfig` (``"fast"`` for short test timings); any config
    field given by name overrides it.  Everything else goes to the transport.
    """
    check_options(options)
    opts = dict(options)
    base = opts.pop("config", None)
    if base is None or base == "default":
        cfg = DriverConfig()
    elif base == "fast":
        cfg = FAST
    elif isinstance(base, DriverConfig):
        cfg = base
    else:
        raise TypeError(f"config must be a DriverConfig, 'default' or 'fast', not {base!r}")
    changes = {k: opts.pop(k) for k in list(opts) if k in _CONFIG_FIELDS}
    if changes:
        cfg = cfg.with_(**changes)
    client_opts = {k: opts.pop(k) for k in list(opts) if k in _CLIENT_OPTIONS}
    # psmids unique per client: a random nonce (not the pid) above the ledger's counter
    if "psmid_base" not in client_opts:
        client_opts["psmid_base"] = new_psmid_base()
    return cfg, client_opts, opts


def connect(url: str | Sequence[str] | None = None, **options: Any) -> Client:
    """Open a client on the adapter(s) behind ``url``.

    Several URLs (a list, or one comma-separated string) make one pool of servers: their cards are
    dispatched and failed over as one, server *i*'s card *c* numbered ``16*i + c``
    (:mod:`apcrypto.transport.multi`).

    ``url`` and each option come from the argument, else the environment (``APCRYPTO_URL``,
    ``APCRYPTO_OPTIONS``), else a config file (``apcrypto.toml``), else ``"emu:"``; see
    :mod:`apcrypto.config`.  An option no layer knows raises ``TypeError`` naming it.

    Driver options (same on every transport): ``config``, and any :class:`DriverConfig` field
    (``reply_timeout``, ``max_redrives``, ``use_interrupts``, ``backlog_limit``, ...);
    ``psmid_base``, ``close_timeout``; ``journal=PATH`` (a durable ledger: after a crash, the next
    ``connect`` with the same journal gives every request left open a verdict, ``client.recovered()``;
    docs/journal.md), ``journal_operands``, ``journal_sync``.  Transport options: ``emulator=``
    (``emu:``: drive an emulator you built), ``seed``, ``clock`` (``emu:``), ``domains=``
    (restrict to these domains), ``timeout``, ``reconnect_delay``, ``reconnect_delay_max``, ``peer_deadline`` (``tcp://``,
    ``usb://``), ``heartbeat``, CURVE keys (``tcp://``), ``backend=`` (``usb://``).
    """
    chosen = resolve(url, options)
    cfg, client_opts, transport_opts = split_options(chosen.options)
    transport, journal, recovery = open_link(
        chosen.url,
        cfg,
        client_opts,
        transport_opts,
        explicit_base="psmid_base" in chosen.options,
        open_transport=open_transport,
    )
    try:
        return Client(transport, cfg, journal=journal, recovery=recovery, **client_opts)
    except BaseException:
        transport.close()
        if journal is not None:
            journal.close()
        raise


# ``apcrypto.aio`` is part of the public surface (DESIGN §5): reachable after a bare ``import
# apcrypto``.  Imported last: it builds on ``split_options`` above.
from apcrypto import aio  # noqa: E402

__all__ = [
    "ApcryptoError",
    "BadRequest",
    "Client",
    "CounterIncrement",
    "DeadlineExceeded",
    "DeviceUnavailable",
    "DriverConfig",
    "HostQueueFull",
    "Indeterminate",
    "KeyRead",
    "KeyStore",
    "ModExpo",
    "ModExpoCrt",
    "RandomBytes",
    "Recovered",
    "Request",
    "TargetNotHeld",
    "__version__",
    "aio",
    "connect",
    "errors",
]
