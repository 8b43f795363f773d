"""Transports chosen by URL scheme, imported lazily so an optional backend never breaks import."""

from __future__ import annotations

import importlib
from typing import Any

from apcrypto.transport.base import (
    Command,
    Completion,
    Interrupt,
    PeerRestored,
    Transport,
    TransportClosed,
    TransportEvent,
    TransportLost,
)

#: scheme -> (module, factory).  The factory is called as ``factory(url, **options)``.
TRANSPORTS: dict[str, tuple[str, str]] = {
    "emu": ("apcrypto.transport.inproc", "open_inproc"),
    "tcp": ("apcrypto.transport.zmq_client", "open_tcp"),
    "usb": ("apcrypto.transport.usb", "open_usb"),
}


class UnknownTransport(ValueError):
    """The URL names no registered transport scheme."""


def scheme_of(url: str) -> str:
    scheme, sep, _ = url.partition(":")
    if not sep or not scheme:
        raise UnknownTransport(
            f"not a transport URL: {url!r} (expected emu:, tcp://HOST:PORT or usb://VID:PID)"
        )
    return scheme.lower()


def open_transport(url: str, **options: Any) -> Transport:
    """Open the transport named by ``url``'s scheme."""
    scheme = scheme_of(url)
    try:
        module_name, attr = TRANSPORTS[scheme]
    except KeyError:
        raise UnknownTransport(
            f"unknown transport scheme {scheme!r} in {url!r}; known: {sorted(TRANSPORTS)}"
        ) from None
    factory = getattr(importlib.import_module(module_name), attr)
    return factory(url, **options)


__all__ = [
    "TRANSPORTS",
    "Command",
    "Completion",
    "Interrupt",
    "PeerRestored",
    "Transport",
    "TransportClosed",
    "TransportEvent",
    "TransportLost",
    "UnknownTransport",
    "open_transport",
    "scheme_of",
]
