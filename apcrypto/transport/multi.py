"""Several servers as one transport: ``connect(["tcp://a:1", "tcp://b:2"])``.

python-can and pymodbus put many devices behind one bus object; we do the same at the transport
seam.  :class:`MultiTransport` implements :class:`~apcrypto.transport.base.Transport` over N child
transports (one per URL, each opened by its own scheme's factory with the same options), so the
driver core sees one set of APQNs: their queues form one pool, dispatched and failed over as one,
and nothing above the seam knows there are several links.

**Card numbering.**  Every server numbers its cards from 0, so the composite gives server *i* (its
place in the URL list, from 0) the block of 16 card ids ``16*i .. 16*i+15``: server *i*'s card *c*
is the driver's card ``16*i + c``.  In the hex that ``lszcrypt``, ``qid_str`` and ``apcrypto list``
print, the first digit of the card is the server and the second the server's own card
(``12.0003`` is server 1, card 2, domain 3).  Server 0's cards keep their numbers.  A server
offering a card numbered 16 or more cannot be placed in its block and is refused at open
(:class:`CardOutOfBlock`); at most :data:`MAX_SERVERS` (16) URLs fit in the 8 bits of a card id.
Domains are not renumbered.  ``apqn=(card, domain)`` and ``card=`` targeting, ``stats()``,
``apcrypto list`` and the card statistics all use these driver card ids.

**Why the card, not a wider APQN.**  The core groups queues by card (load per card, a card in
machine-failure recovery takes no new work) from the APQN's card byte; a server index above the
16 APQN bits would make server 0's and server 1's card 0 one card to it.  Renumbering at the
transport boundary keeps every card distinct with no change to the core or to the 16-bit APQN
every printer and parser already understands.

**Failure, per server.**  Each child keeps its own link, heartbeat, reconnection and session
resumption.  Events pass through with their APQNs renumbered and their reason prefixed by the
server's URL: a lost server's :class:`TransportLost` names only the tags it held (permanent or not,
resumable or not, exactly as that transport alone would say it), so only its queues leave service
and only its work is decided; a command for one of its queues while it is gone bounces at once,
``unsent``, as from the lone transport.  When it answers a handshake again its
:class:`PeerRestored` reaches the core, which re-probes the offline queues and brings that server's
queues back.  A request targeted to a lost server's card waits and ends as one targeted to an
offline card.  Tenancy holds per server: each child says its own HELLO (with ``domains=`` if
given), and each server grants that client its own APQNs.

**Mixed schemes** (``["tcp://a:1", "emu:"]``) work: each child is whatever its URL names.  An
``emu:`` child must run on the wall clock (a virtual clock steps only when the runner steps it,
and a runner steps one clock), and ``emulator=`` can drive only one ``emu:`` child.

Parsing: a list (or tuple) of URLs, or one string of comma-separated URLs (how ``$APCRYPTO_URL``
spells several).  Bad lists raise :class:`UrlListError` before anything is opened.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

from apcrypto.transport.base import (
    Command,
    Completion,
    Interrupt,
    PeerRestored,
    Transport,
    TransportEvent,
    TransportLost,
)
from apformats.codes import ResponseCode
from apformats.results import ApResult, qid_card, qid_domain, qid_of
from apformats.status import QueueStatus

__all__ = [
    "CARD_BLOCK",
    "MAX_SERVERS",
    "CardOutOfBlock",
    "MultiTransport",
    "UrlListError",
    "driver_qid",
    "open_multi",
    "server_qid",
    "split_urls",
]

log = logging.getLogger(__name__)

#: card ids per server: server *i*'s card *c* is the driver's card ``CARD_BLOCK * i + c``
CARD_BLOCK = 16
#: how many servers fit in the 256 card ids of an APQN
MAX_SERVERS = 256 // CARD_BLOCK

_NOT_AVAIL = ApResult(QueueStatus(response_code=ResponseCode.Q_NOT_AVAIL))
#: the events every child reports, and what each worst one makes the composite's ``state``
_STATE_RANK = {"up": 0, "connecting": 1, "down": 2, "gone": 3, "lost": 4}


class UrlListError(ValueError):
    """A list of URLs that cannot name a pool of servers: empty, an empty or non-string entry, the
    same URL twice (one server would count twice and its tenancy refuse the second session), more
    than :data:`MAX_SERVERS`, ``emulator=`` with several ``emu:`` URLs, or an ``emu:`` URL on a
    virtual clock.  Raised before any server is reached (or, for a virtual clock, with every
    opened child closed again)."""


class CardOutOfBlock(ValueError):
    """A server of a pool offers a card numbered 16 or more, which its block of driver card ids
    (``16*i .. 16*i+15``) cannot hold.  Raised at open, with every child closed again."""


def split_urls(url: str | Sequence[str]) -> list[str]:
    """The URLs ``url`` names: a list or tuple of URLs, or one string of comma-separated URLs.

    Every entry is stripped; an entry that is empty or not a string, a repeated URL and more than
    :data:`MAX_SERVERS` entries raise :class:`UrlListError`.  One URL gives a one-entry list.
    """
    if isinstance(url, str):
        parts = url.split(",")
    elif isinstance(url, list | tuple):
        parts = list(url)
        for p in parts:
            if not isinstance(p, str):
                raise UrlListError(f"a URL list holds strings, not {type(p).__name__}: {p!r}")
    else:
        raise UrlListError(f"a URL is a string or a list of strings, not {type(url).__name__}: {url!r}")
    urls = [p.strip() for p in parts]
    if not urls:
        raise UrlListError("an empty list of URLs names no server")
    if any(not u for u in urls):
        raise UrlListError(f"empty URL in the list {url!r}")
    seen: set[str] = set()
    for u in urls:
        if u in seen:
            raise UrlListError(f"URL {u!r} is given twice in {url!r}: each server may be named once")
        seen.add(u)
    if len(urls) > MAX_SERVERS:
        raise UrlListError(
            f"{len(urls)} URLs: at most {MAX_SERVERS} servers fit in a pool "
            f"({CARD_BLOCK} card ids each in the 256 of an APQN)"
        )
    return urls


def driver_qid(server: int, qid: int) -> int:
    """The driver's APQN for ``qid`` as server number ``server`` of a pool numbers it."""
    card = qid_card(qid)
    if not 0 <= server < MAX_SERVERS:
        raise ValueError(f"server index {server} out of range 0..{MAX_SERVERS - 1}")
    if card >= CARD_BLOCK:
        raise CardOutOfBlock(
            f"server {server} offers card {card:02x}: a pool gives each server the card ids "
            f"{CARD_BLOCK * server:02x}..{CARD_BLOCK * server + CARD_BLOCK - 1:02x}, "
            f"so only its cards 00..{CARD_BLOCK - 1:02x} fit"
        )
    return qid_of(CARD_BLOCK * server + card, qid_domain(qid))


def server_qid(qid: int) -> tuple[int, int]:
    """``(server, qid as that server numbers it)`` for a driver APQN of a pool."""
    card = qid_card(qid)
    return card // CARD_BLOCK, qid_of(card % CARD_BLOCK, qid_domain(qid))


class MultiTransport(Transport):
    """One transport over several servers (see the module doc).  Build it with :func:`open_multi`."""

    def __init__(self, children: Sequence[Transport], urls: Sequence[str]) -> None:
        super().__init__()
        if len(children) != len(urls) or not children:
            raise ValueError("one child transport per URL, at least one")
        if len(children) > MAX_SERVERS:
            raise UrlListError(f"at most {MAX_SERVERS} servers fit in a pool, not {len(children)}")
        self.children = list(children)
        self.urls = list(urls)
        # the core reads this once, when it is built: AQIC only if every server has interrupts
        self.supports_interrupts = all(c.supports_interrupts for c in self.children)
        self._ready = threading.Event()  # a child has something for poll (its notify fired)
        self._events: deque[TransportEvent] = deque()  # the composite's own (unroutable commands)
        self._unmapped: set[tuple[int, int]] = set()  # (server, qid) outside its block, logged once
        for i, child in enumerate(self.children):
            for q in child.qids():
                driver_qid(i, q)  # CardOutOfBlock now, not at the first command
            child.set_notify(self._child_ready)

    def __repr__(self) -> str:
        return f"<MultiTransport {', '.join(self.urls)} state={self.state}>"

    # -- what a caller may read --------------------------------------------------------------------
    @property
    def state(self) -> str:
        """The worst of the children's states (``up`` < ``connecting`` < ``down`` < ``gone`` <
        ``lost``); a child without a link (``emu:``) counts as ``up``."""
        worst = "up"
        for s in self.states():
            if _STATE_RANK.get(s, 0) > _STATE_RANK[worst]:
                worst = s
        return worst

    def states(self) -> list[str]:
        """Each server's state, in URL order (``up`` for a child without a link)."""
        return [str(getattr(c, "state", "up")) for c in self.children]

    def server_of(self, qid: int) -> str:
        """The URL of the server that holds the driver APQN ``qid``."""
        return self.urls[server_qid(qid)[0]]

    # -- Transport -----------------------------------------------------------------------------------
    def qids(self) -> list[int]:
        out = []
        for i, child in enumerate(self.children):
            out += self._mapped(i, child.qids())
        return sorted(out)

    def _mapped(self, i: int, qids: Sequence[int]) -> list[int]:
        """Server ``i``'s APQNs as the pool numbers them.  All fit at open (else CardOutOfBlock); a
        server restarted with a card 16 or above since cannot be reached through the pool, which
        logs it (once per APQN) instead of failing the running client."""
        out = []
        for q in qids:
            if qid_card(q) < CARD_BLOCK:
                out.append(driver_qid(i, q))
            elif (i, q) not in self._unmapped:
                self._unmapped.add((i, q))
                log.warning(
                    "%s offers card %02x, outside its block of the pool: not used", self.urls[i], qid_card(q)
                )
        return out

    def _send(self, commands: Sequence[Command]) -> None:
        n = len(self.children)
        per: list[list[Command]] = [[] for _ in range(n)]
        unroutable = []
        for c in commands:
            card = c.qid >> 8 & 0xFF
            i = card // CARD_BLOCK
            if i < n:
                per[i].append(c._replace(qid=((card % CARD_BLOCK) << 8) | (c.qid & 0xFF)))
            else:  # a card no server of this pool has: the answer of a card not configured
                unroutable.append(Completion(c.tag, _NOT_AVAIL))
        if unroutable:
            self._events.extend(unroutable)
            self._child_ready()
        for child, cmds in zip(self.children, per, strict=True):
            if cmds:
                child.submit(cmds)

    def _recv(self, timeout: float) -> list[TransportEvent]:
        self._ready.clear()
        out = self._gather()
        if not out and timeout > 0:
            self._ready.wait(timeout)
            out = self._gather()
        return out

    def wakeup(self) -> None:
        self._ready.set()

    def _close(self) -> None:
        errors = []
        for child in self.children:
            try:
                child.close()
            except Exception as exc:  # close every one, whatever one of them does
                errors.append(exc)
        if errors:
            raise errors[0]

    # -- inside ------------------------------------------------------------------------------------
    def _child_ready(self) -> None:
        self._ready.set()
        self._notify_ready()

    def _gather(self) -> list[TransportEvent]:
        out: list[TransportEvent] = []
        own = self._events
        while own:
            out.append(own.popleft())
        for i, child in enumerate(self.children):
            events = child.poll(0.0)
            if events:
                out.extend(self._renumber(i, events))
        return out

    def _renumber(self, i: int, events: list[TransportEvent]) -> list[TransportEvent]:
        """A child's events with its APQNs as the driver numbers them (tags are the driver's own,
        unique across the pool, so completions pass through untouched)."""
        if all(type(ev) is Completion for ev in events):
            return events  # the hot path
        out: list[TransportEvent] = []
        url = self.urls[i]
        for ev in events:
            if isinstance(ev, Completion):
                out.append(ev)
            elif isinstance(ev, Interrupt):
                out += [Interrupt(q) for q in self._mapped(i, (ev.qid,))]  # none: a queue we never use
            elif isinstance(ev, TransportLost):
                qids = tuple(self._mapped(i, ev.qids))  # always all: they come from our own commands
                scope = self._scope(i)
                out.append(dataclasses.replace(ev, reason=f"{url}: {ev.reason}", qids=qids, **scope))
            elif isinstance(ev, PeerRestored):
                out.append(self._restored(i, ev))
            else:
                out.append(ev)
        return out

    def _restored(self, i: int, ev: PeerRestored) -> PeerRestored:
        """Server ``i`` is back (see :meth:`_scope` for what the core makes of it)."""
        return PeerRestored(f"{self.urls[i]}: {ev.reason}", resumed=ev.resumed, **self._scope(i))

    def _scope(self, i: int) -> dict[str, Any]:
        """``{"scope": server i's APQNs}``: the queues of the one peer a loss or a return is about.

        With it the core keeps each server's to itself: a server that comes back has only its own
        offline queues re-probed and its own kept-session queues drained or decided, a loss that
        can no longer resume decides only that server's held work, and an answer from one server
        clears the link suspicion of that server's queues only (another may be stopped).
        """
        return {"scope": tuple(self._mapped(i, self.children[i].qids()))}


def open_multi(urls: Sequence[str], **options: Any) -> MultiTransport:
    """Open every URL of ``urls`` (each by its own scheme, all with the same ``options``) and join
    them in one :class:`MultiTransport`.

    The children open at the same time (one thread each), so a pool opens in the time of its
    slowest server, and an unreachable one costs one handshake timeout, not one per server.  Every
    server must answer at open: if any does not, every child that opened is closed again and the
    first failure in URL order is raised (the transport's own error: ``ServerUnreachable``, ...)."""
    from apcrypto.transport import TRANSPORTS, UnknownTransport, open_transport, scheme_of

    urls = split_urls(list(urls))
    schemes = [scheme_of(u) for u in urls]  # UnknownTransport for a bad one, before opening any
    for u, s in zip(urls, schemes, strict=True):
        if s not in TRANSPORTS:
            raise UnknownTransport(f"unknown transport scheme {s!r} in {u!r}; known: {sorted(TRANSPORTS)}")
    opts = dict(options)
    emulator = opts.pop("emulator", None)
    if emulator is not None and schemes.count("emu") != 1:
        raise UrlListError(
            f"emulator= drives one emu: child, but the list {urls!r} has {schemes.count('emu')} emu: URLs"
        )

    def open_one(u: str, s: str) -> Transport:
        child_opts = {**opts, "emulator": emulator} if s == "emu" and emulator is not None else opts
        return open_transport(u, **child_opts)

    with ThreadPoolExecutor(len(urls), thread_name_prefix="apcrypto-pool-open") as pool:
        futures = [pool.submit(open_one, u, s) for u, s in zip(urls, schemes, strict=True)]
        wait(futures)
    children = [f.result() for f in futures if f.exception() is None]
    try:
        for f in futures:
            err = f.exception()
            if err is not None:
                raise err
        for u, child in zip(urls, children, strict=True):
            if getattr(child, "virtual_clock", None) is not None:
                raise UrlListError(
                    f"{u!r} runs on a virtual clock: in a pool of servers every emu: child must run on "
                    "the wall clock (clock='wall'), since the runner can step only one clock"
                )
        return MultiTransport(children, urls)
    except BaseException:
        for c in children:
            c.close()
        raise
