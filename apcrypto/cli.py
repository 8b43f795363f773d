"""``apcrypto``: list cards and queues (lszcrypt), interval statistics (zcryptstats), the demo, a load
generator (bench), the verdicts a journal holds (recovered).  Every error is one line on stderr and
exit status 1."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from apformats.results import qid_str


def _functions(fac: int) -> str:
    """lszcrypt's FUNCTIONS column: letters for fac bits 0-9, '-' when off."""
    letters = "SMCDAXNHFR"
    return "".join(ch if fac & (0x80000000 >> i) else "-" for i, ch in enumerate(letters))


_TYPE_NAMES = {10: "CEX4", 11: "CEX5", 12: "CEX6", 13: "CEX7", 14: "CEX8"}
_MODE_NAMES = {"accel": "Accelerator", "cca": "CCA-Coproc", "ep11": "EP11-Coproc"}
#: lszcrypt's STATUS for a card the card side reports dead; otherwise the driver says online/offline
_CARD_STATUS = {"checkstopped": "chkstop", "deconfigured": "deconfig"}


def _targets(words: Sequence[str]) -> tuple[str | list[str] | None, list[tuple[int, int | None]]]:
    """Split ``apcrypto list`` words into a URL (has a ':') and lszcrypt filters ``CARD[.DOMAIN]``
    (hex, as lszcrypt and sysfs spell them).  Several URLs are one pool of servers (server *i*'s
    card *c* listed as card ``16*i + c``, :mod:`apcrypto.transport.multi`)."""
    urls: list[str] = []
    filters: list[tuple[int, int | None]] = []
    for word in words:
        if ":" in word:
            urls.append(word)
            continue
        card, _, dom = word.partition(".")
        try:
            c, d = int(card, 16), (int(dom, 16) if dom else None)
        except ValueError:
            raise ValueError(f"not a URL nor a CARD[.DOMAIN] filter: {word!r} (e.g. 02 or 02.0003)") from None
        if not 0 <= c <= 0xFF or (d is not None and not 0 <= d <= 0xFF):
            raise ValueError(f"{word!r}: card and domain are 00..ff")
        filters.append((c, d))
    return (urls[0] if len(urls) == 1 else urls or None), filters


def _open_for_listing(url: str | list[str] | None, timeout: float, *, virtual: bool = True) -> Any:
    """A client for looking: short bring-up timings; an embedded emulator on a virtual clock (a
    listing needs no real time to pass) unless ``virtual`` is False (interval statistics)."""
    import apcrypto

    opts: dict[str, Any] = {"config": "fast"}
    chosen = url or os.environ.get("APCRYPTO_URL") or "emu:"
    if virtual and isinstance(chosen, str) and chosen.startswith("emu:") and "," not in chosen:
        opts["clock"] = "virtual"
    client = apcrypto.connect(url, **opts)
    client.wait_ready(timeout)
    return client


def listing(client: Any, card_side: Any, filters: Sequence[tuple[int, int | None]] = ()) -> dict[str, Any]:
    """The data of ``apcrypto list``: cards, each with its queues, REQUESTS and PENDING as the card
    counts them when ``card_side`` is given (else this client's own, and ``requests_source`` says so)."""
    snap = card_side.snapshot() if card_side is not None else None
    card_rows = {c["card"]: c for c in snap["cards"]} if snap else {}
    queue_rows = {q["qid"]: q for q in snap["queues"]} if snap else {}
    by_card: dict[int, list[Any]] = {}
    for q in client.core.queues.values():
        by_card.setdefault(q.card, []).append(q)

    def wanted(card: int, domain: int | None) -> bool:
        if not filters:
            return True
        return any(c == card and (d is None or domain is None or d == domain) for c, d in filters)

    cards = []
    for card, qs in sorted(by_card.items()):
        if not wanted(card, None):
            continue
        hw = next((q.hw for q in qs if q.hw is not None), None)
        mode = qs[0].mode
        tname = (
            (_TYPE_NAMES.get(hw.at, f"T{hw.at}") + {"accel": "A", "cca": "C", "ep11": "P"}.get(mode, ""))
            if hw
            else "-"
        )
        side = card_rows.get(card)
        dead = _CARD_STATUS.get(side["state"]) if side else None
        queues = []
        for q in sorted(qs, key=lambda q: q.qid):
            if not wanted(card, q.domain):
                continue
            qside = queue_rows.get(q.qid)
            queues.append(
                {
                    "name": qid_str(q.qid),
                    "card": card,
                    "domain": q.domain,
                    "type": tname,
                    "mode": _MODE_NAMES.get(q.mode, "Unknown"),
                    "status": dead or ("online" if q.state.in_service else "offline"),
                    "state": q.state.value,
                    "requests": qside["requests"] if qside else q.requests_total,
                    "pending": qside["held"] if qside else q.held,
                    "hwtype": q.hw.at if q.hw else None,
                    "depth": q.hw.slots if q.hw else None,
                    "functions": _functions(q.hw.fac) if q.hw else None,
                    "driver": "apcrypto",
                }
            )
        cards.append(
            {
                "name": f"{card:02x}",
                "card": card,
                "type": side["type"] if side else tname,
                "mode": _MODE_NAMES.get(mode, "Unknown"),
                "status": dead or ("online" if any(q.state.in_service for q in qs) else "offline"),
                "requests": side["requests"] if side else sum(q.requests_total for q in qs),
                "pending": side["held"] if side else sum(q.held for q in qs),
                "hwtype": hw.at if hw else None,
                "depth": hw.slots if hw else None,
                "functions": _functions(hw.fac) if hw else None,
                "driver": "apcrypto",
                "queues": queues,
            }
        )
    return {"requests_source": "card" if snap else "client", "cards": cards}


def _bus(client: Any) -> list[str]:
    """``lszcrypt -b``: the bus attributes, as this driver has them."""
    cfg = client.config
    domains = sorted({q.domain for q in client.core.queues.values()})
    irq = client.transport.supports_interrupts and cfg.use_interrupts
    return [
        f"ap_domain={f'{domains[0]:#x}' if domains else '-'}",
        f"ap_max_domain_id={f'{max(domains):#x}' if domains else '-'}",
        f"ap_interrupts are {'enabled' if irq else 'disabled'}",
        f"config_time={cfg.offline_probe_max:g} (seconds)",
        "poll_thread is disabled",
        f"poll_timeout={round(cfg.poll_high * 1e9)} (nanoseconds)",
    ]


def cmd_list(args: argparse.Namespace) -> int:
    from apcrypto.cardstats import CardSide

    url, filters = _targets(args.targets)
    url = args.url or url
    kinds = {"accel": args.accelonly, "cca": args.ccaonly, "ep11": args.ep11only}
    with _open_for_listing(url, args.timeout) as client:
        if args.bus:
            print("\n".join(_bus(client)))
            return 0
        side = CardSide.for_client(client, args.control)
        try:
            data = listing(client, side, filters)
        finally:
            if side is not None:
                side.close()
        if any(kinds.values()):
            data["cards"] = [
                c for c in data["cards"] if any(on and c["mode"] == _MODE_NAMES[k] for k, on in kinds.items())
            ]
        if data["requests_source"] == "client":
            print(
                "apcrypto: note: REQUESTS and PENDING count this client's requests only; "
                "give --control tcp://HOST:PORT for the card's counts",
                file=sys.stderr,
            )
        if args.json:
            if args.cardonly:
                for c in data["cards"]:
                    c.pop("queues")
            elif args.queueonly:
                data["queues"] = [q for c in data["cards"] for q in c["queues"]]
                del data["cards"]
            print(json.dumps(data, indent=2))
            return 0
        cols = [
            ("name", "CARD.DOM", "<10"),
            ("type", "TYPE", "<7"),
            ("mode", "MODE", "<12"),
            ("status", "STATUS", "<9"),
            ("requests", "REQUESTS", ">9"),
        ]
        if args.verbose:
            cols += [
                ("pending", "PENDING", ">8"),
                ("hwtype", "HWTYPE", ">7"),
                ("depth", "QDEPTH", ">7"),
                ("functions", "FUNCTIONS", ">11"),
                ("driver", "DRIVER", ">9"),
            ]

        def line(row: dict[str, Any]) -> str:
            return " ".join(f"{'-' if row[k] is None else row[k]:{fmt}}" for k, _, fmt in cols).rstrip()

        print(" ".join(f"{h:{fmt}}" for _, h, fmt in cols).rstrip())
        print("-" * (sum(int(fmt[1:]) + 1 for _, _, fmt in cols) - 1))
        for c in data["cards"]:
            if not args.queueonly:
                print(line(c))
            if not args.cardonly:
                for q in c["queues"]:
                    print(line(q))
    return 0


def _stats_rows(
    report: dict[str, Any], index: int, filters: Sequence[tuple[int, int | None]]
) -> list[dict[str, Any]]:
    """One interval as flat rows: a card total, then each APQN x function (the table and CSV rows)."""

    def wanted(card: int, domain: int | None) -> bool:
        return not filters or any(
            c == card and (d is None or domain is None or d == domain) for c, d in filters
        )

    rows: list[dict[str, Any]] = []
    for name, c in report["cards"].items():
        card = int(name, 16)
        if not wanted(card, None):
            continue
        rows.append(
            {
                "interval": index,
                "end": round(report["end"], 6),
                "seconds": round(report["seconds"], 6),
                "apqn": name,
                "function": "*",
                "ops": c["ops"],
                "errors": c["errors"],
                "ops_per_s": c["ops"] / report["seconds"] if report["seconds"] > 0 else 0.0,
                "utilisation": c["utilisation"],
                "avg_latency_ms": 0.0,  # per function only: a mean over functions would mix unlike costs
            }
        )
        for apqn, fns in report["queues"].items():
            if int(apqn[:2], 16) != card or not wanted(card, int(apqn[3:], 16)):
                continue
            for fn, r in fns.items():
                rows.append(
                    {
                        "interval": index,
                        "end": round(report["end"], 6),
                        "seconds": round(report["seconds"], 6),
                        "apqn": apqn,
                        "function": fn,
                        "ops": r["ops"],
                        "errors": r["errors"],
                        "ops_per_s": r["ops"] / report["seconds"] if report["seconds"] > 0 else 0.0,
                        "utilisation": r["utilisation"],
                        "avg_latency_ms": r["avg_latency"] * 1e3,
                    }
                )
    return rows


_STATS_FIELDS = [
    "interval",
    "end",
    "seconds",
    "apqn",
    "function",
    "ops",
    "errors",
    "ops_per_s",
    "utilisation",
    "avg_latency_ms",
]


def cmd_stats(args: argparse.Namespace) -> int:
    """zcryptstats: every ``-i`` seconds, ``-c`` times, what the cards did, per card and APQN and function."""
    import csv
    import time

    from apcrypto.cardstats import CardSide, StatsSampler

    url, filters = _targets(args.targets)
    url = args.url or url
    if args.interval <= 0 or args.count <= 0:
        raise ValueError("--interval and --count must be > 0")
    with _open_for_listing(url, args.timeout, virtual=False) as client:
        side = CardSide.for_client(client, args.control)
        if side is None:
            raise ValueError(
                f"no card-side counters for {client.transport!r}: give --control tcp://HOST:PORT "
                "(the server's control plane)"
            )
        try:
            sampler = StatsSampler(side)
            sampler.sample()  # the baseline: each report covers one interval after it
            writer = csv.DictWriter(sys.stdout, _STATS_FIELDS) if args.output == "csv" else None
            if writer is not None:
                writer.writeheader()
            for i in range(1, args.count + 1):
                time.sleep(args.interval)
                report = sampler.sample()
                rows = _stats_rows(report, i, filters)
                if args.output == "json":
                    print(json.dumps({"interval": i, **report}), flush=True)
                elif writer is not None:
                    for row in rows:
                        writer.writerow(
                            {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
                        )
                    sys.stdout.flush()
                else:
                    span, end = report["seconds"], report["end"]
                    print(f"interval {i} of {args.count}: {span:.3f} s of card time ending at {end:.3f}")
                    heads = ("CARD.DOM", "FUNCTION", "OPS", "ERRORS", "OPS/S", "UTIL%", "AVG_LAT_MS")
                    print("{:<9} {:<10} {:>8} {:>7} {:>10} {:>7} {:>11}".format(*heads))
                    for r in rows:
                        lat = f"{r['avg_latency_ms']:11.3f}" if r["function"] != "*" else f"{'-':>11}"
                        name = r["apqn"]
                        fn = r["function"] if r["function"] != "*" else "(all)"
                        print(
                            f"{name:<9} {fn:<10} {r['ops']:>8} {r['errors']:>7} {r['ops_per_s']:>10.1f} "
                            f"{r['utilisation'] * 100:>7.2f} {lat}"
                        )
                    print(flush=True)
        finally:
            side.close()
    return 0


def _at_least_one(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def cmd_demo(args: argparse.Namespace) -> int:
    from apcrypto.demo import run_demo

    return run_demo(seed=args.seed, requests=args.requests, sim=args.sim)


def _depths(text: str) -> list[int]:
    """``--depth 1,4,16`` or ``--depth 1-64`` (powers of two between) -> a sweep."""
    try:
        if "-" in text:
            lo, hi = (int(x) for x in text.split("-", 1))
            if not 1 <= lo <= hi:
                raise ValueError
            out, d = [], lo
            while d <= hi:
                out.append(d)
                d *= 2
            return out
        depths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(
            f"--depth {text!r}: give N, a list such as 1,8,64, or a range such as 1-64"
        ) from None
    if not depths:
        raise ValueError("--depth: give at least one depth")
    return depths


def cmd_bench(args: argparse.Namespace) -> int:
    from apcrypto.bench import plot, render_table, run_bench

    if args.duration is None and args.requests is None:
        args.requests = 2000
    if args.duration is not None and args.requests is not None:
        raise ValueError("give --duration or --requests, not both")
    url = args.url or os.environ.get("APCRYPTO_URL") or "emu:fast"
    result = run_bench(
        url,
        [o.strip() for o in args.op.split(",")],
        _depths(args.depth),
        args.clients,
        requests=args.requests,
        duration=args.duration,
        control=args.control,
        raw=not args.no_raw,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    print(render_table(result))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    if args.plot:
        plot(result, args.plot)
    return 0


def _recovered_row(r: Any) -> dict[str, Any]:
    """One verdict of ``client.recovered()`` as JSON (results are not printed: they may be secret)."""
    row: dict[str, Any] = {
        "id": r.id,
        "function": r.function,
        "kind": r.kind,
        "idempotent": r.idempotent,
        "verdict": r.verdict.value,
        "evidence": r.evidence,
        "reason": r.reason,
        "attempts": [{"psmid": f"{p:#x}", "apqn": qid_str(q)} for p, q in r.attempts],
        "redrive": r.redrive_id,
    }
    if r.redrive is not None:
        if not r.redrive.done():
            row["redrive_outcome"] = "pending"
        else:
            exc = r.redrive.exception()
            row["redrive_outcome"] = "completed" if exc is None else type(exc).__name__
    return row


def cmd_recovered(args: argparse.Namespace) -> int:
    """The verdicts on the requests a dead client left open in its journal: reconcile them (connect
    with the journal: resume the session, drain, decide, re-drive) or, ``--offline``, print what the
    journal already says."""
    from apcrypto.journal import read_journal

    if args.offline:
        rows = read_journal(args.journal)
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        for row in rows:
            where = ", ".join(f"{a['psmid']}@{a['apqn']}" for a in row["attempts"]) or "no attempt"
            verdict = row["verdict"] or "open (not reconciled yet)"
            redrive = f" -> #{row['redrive']}" if row["redrive"] is not None else ""
            print(f"#{row['id']} {row['function']} {verdict}: {row['reason'] or '-'} [{where}]{redrive}")
        return 0
    import apcrypto
    from apcrypto.journal import journal_url

    # its requests are decided where they ran: the URL the journal recorded, unless one is named
    # (an embedded emulator would "re-drive" them on a card that is thrown away with it)
    recorded = journal_url(args.journal)
    url = args.url or recorded
    if args.url and recorded and args.url != recorded:
        print(f"apcrypto: the journal's client ran on {recorded}; deciding on {args.url}", file=sys.stderr)
    options: dict[str, Any] = {"journal": args.journal}
    with apcrypto.connect(url, **options) as client:
        records = client.recovered(args.timeout)
        if args.json:
            print(json.dumps([_recovered_row(r) for r in records], indent=2))
        else:
            for r in records:
                row = _recovered_row(r)
                tail = f" ({row['redrive_outcome']})" if "redrive_outcome" in row else ""
                print(r.line() + tail)
            print(f"{len(records)} request(s) left open by an earlier run", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The ``apcrypto`` command: every error is one line on stderr and a non-zero exit status.

    A reader that goes away (``apcrypto list | head -2``) ends the command quietly.  The traceback
    of an unexpected error is still logged at DEBUG (``apcrypto -v debug ...``) for a bug report.
    """
    try:
        rc = _main(argv)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at interpreter exit
        return rc
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # stdout's reader is gone: point stdout at /dev/null so the interpreter's last flush is quiet
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except Exception as exc:
        logging.getLogger("apcrypto.cli").debug("apcrypto failed", exc_info=True)
        print(f"apcrypto: error: {exc}", file=sys.stderr)
        return 1


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING))
    return int(args.func(args))


def build_parser() -> argparse.ArgumentParser:
    """The ``apcrypto`` argument parser (docs/cli.md is checked against it)."""
    from apcrypto import __version__

    parser = argparse.ArgumentParser(prog="apcrypto", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--log-level", default="WARNING", help="logging level (default WARNING)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "list",
        help="list cards and queues (lszcrypt style)",
        description="List cards and APQNs in the manner of lszcrypt.  REQUESTS and PENDING are the "
        "card's own counts (all clients): the in-process emulator's for emu:, the server's control "
        "plane for tcp:// (--control).",
    )
    p.add_argument(
        "targets",
        nargs="*",
        metavar="URL|CARD[.DOMAIN]",
        help="a transport URL (default: $APCRYPTO_URL, the config file, else emu:) and/or lszcrypt "
        "filters such as 02 or 02.0003 (hex)",
    )
    p.add_argument("--url", help="transport URL (same as giving it among the targets)")
    p.add_argument(
        "--control",
        help="the server's control plane (tcp://HOST:PORT) for card-side counts; "
        "for several servers one per server, comma-separated in URL order",
    )
    p.add_argument("-V", "--verbose", action="store_true", help="more columns: PENDING HWTYPE QDEPTH ...")
    p.add_argument("-b", "--bus", action="store_true", help="show the bus attributes only")
    only = p.add_mutually_exclusive_group()
    only.add_argument("--cardonly", action="store_true", help="cards only, no queues")
    only.add_argument("--queueonly", action="store_true", help="queues only, no cards")
    p.add_argument("--accelonly", action="store_true", help="accelerator cards only")
    p.add_argument("--ccaonly", action="store_true", help="CCA coprocessor cards only")
    p.add_argument("--ep11only", action="store_true", help="EP11 coprocessor cards only")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for bring-up")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser(
        "stats",
        help="interval statistics per card, APQN and function (zcryptstats style)",
        description="Every --interval seconds, --count times, what the cards did (all clients' work, "
        "read on the card's side): per card and APQN, per function, ops, errors, ops/s, utilisation "
        "(engine time used over engine time available) and average latency (enqueue to end).",
    )
    p.add_argument("targets", nargs="*", metavar="URL|CARD[.DOMAIN]", help="as for 'apcrypto list'")
    p.add_argument("--url", help="transport URL")
    p.add_argument(
        "--control",
        help="the server's control plane (tcp://HOST:PORT); needed for tcp:// "
        "(several servers: one per server, comma-separated in URL order)",
    )
    p.add_argument("-i", "--interval", type=float, default=10.0, help="seconds per report (default 10)")
    p.add_argument("-c", "--count", type=int, default=1, help="number of reports (default 1)")
    p.add_argument("-o", "--output", choices=["table", "json", "csv"], default="table")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for bring-up")
    p.set_defaults(func=cmd_stats)
    p = sub.add_parser("demo", help="mixed workload with a machine failure on the embedded emulator")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--requests", type=_at_least_one, default=3000)
    p.add_argument("--sim", action="store_true", help="simulation runner: the same seed replays exactly")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser(
        "bench",
        help="load generator: throughput, latency percentiles, utilisation per APQN",
        description="Drive any URL with --clients connections, each keeping --depth requests outstanding "
        "(a list is a sweep; depth 1 is the naive one-at-a-time baseline), for --requests requests or "
        "--duration seconds.  Reports ops/s, latency p50/p90/p99/max and utilisation per APQN (the "
        "card's measure), and the driver over a raw NQAP/DQAP loop where the two are comparable.",
    )
    p.add_argument("--url", help="transport URL (default $APCRYPTO_URL, else emu:fast)")
    p.add_argument("--control", help="the server's control plane (tcp://HOST:PORT) for utilisation")
    p.add_argument(
        "--op",
        default="me-2k",
        help="comma-separated: me-1k me-2k me-4k crt-1k crt-2k crt-4k rng counter "
        "key-store key-read (default me-2k)",
    )
    p.add_argument("--requests", type=int, help="requests per point (default 2000)")
    p.add_argument("--duration", type=float, help="seconds per point, instead of --requests")
    p.add_argument("--depth", default="64", help="outstanding per client: N, a list 1,8,64 or a range 1-64")
    p.add_argument("--clients", type=int, default=1, help="client connections (threads)")
    p.add_argument("--json", metavar="FILE", help="write every figure as JSON")
    p.add_argument(
        "--plot", metavar="FILE.png", help="plot throughput and latency against depth (matplotlib)"
    )
    p.add_argument("--no-raw", action="store_true", help="skip the raw NQAP/DQAP loop comparison")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser(
        "recovered",
        help="verdicts on the requests a dead client left open in its journal",
        description="Connect with a client's journal (docs/journal.md): resume its session, drain the "
        "replies the cards hold, and print a verdict for every request it left open.",
    )
    p.add_argument(
        "url",
        nargs="?",
        help="transport URL (default: the one the journal recorded, else $APCRYPTO_URL, ...)",
    )
    p.add_argument("--journal", required=True, help="the journal file the dead client used")
    p.add_argument("--offline", action="store_true", help="do not connect: print what the journal says")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for re-drives (default 30)")
    p.set_defaults(func=cmd_recovered)
    return parser


if __name__ == "__main__":
    sys.exit(main())
