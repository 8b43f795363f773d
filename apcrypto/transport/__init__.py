"""Transports chosen by URL scheme, imported lazily so an optional backend never breaks import."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
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
from apcrypto.transport.multi import CardOutOfBlock, UrlListError

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


def open_transport(url: str | Sequence[str], **options: Any) -> Transport:
    """Open the transport named by ``url``'s scheme.

    Several URLs (a list, or one string of comma-separated URLs) open one transport per URL, joined
    as one pool by :class:`apcrypto.transport.multi.MultiTransport` (card ids renumbered per server,
    see there); a one-entry list is that URL alone.
    """
    if not isinstance(url, str) or "," in url:
        from apcrypto.transport.multi import open_multi, split_urls

        urls = split_urls(url)
        if len(urls) > 1:
            return open_multi(urls, **options)
        url = urls[0]
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
    "CardOutOfBlock",
    "Command",
    "Completion",
    "Interrupt",
    "PeerRestored",
    "Transport",
    "TransportClosed",
    "TransportEvent",
    "TransportLost",
    "UnknownTransport",
    "UrlListError",
    "open_transport",
    "scheme_of",
]
