"""``apcrypto``: list queues (lszcrypt style), run the demo, run a throughput benchmark."""

from __future__ import annotations

import argparse
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


def cmd_list(args: argparse.Namespace) -> int:
    import apcrypto

    opts: dict[str, Any] = {"config": "fast"}
    if args.url.startswith("emu:"):
        opts["clock"] = "virtual"
    with apcrypto.connect(args.url, **opts) as client:
        client.wait_ready(args.timeout)
        core = client.core
        header = f"{'CARD.DOM':<10} {'TYPE':<7} {'MODE':<12} {'STATUS':<14} {'REQUESTS':>8}"
        if args.verbose:
            header += f" {'PENDING':>7} {'HWTYPE':>6} {'QDEPTH':>6} {'FUNCTIONS':>10}"
        print(header)
        cards: dict[int, list[Any]] = {}
        for q in core.queues.values():
            cards.setdefault(q.card, []).append(q)
        for card, qs in sorted(cards.items()):
            hw = next((q.hw for q in qs if q.hw is not None), None)
            mode = {"accel": "Accelerator", "cca": "CCA-Coproc", "ep11": "EP11-Coproc"}.get(
                qs[0].mode, "Unknown"
            )
            tname = (
                (_TYPE_NAMES.get(hw.at, f"T{hw.at}") + {"accel": "A", "cca": "C"}.get(qs[0].mode, ""))
                if hw
                else "-"
            )
            online = any(q.state.in_service for q in qs)
            rows = [
                (
                    f"{card:02x}",
                    tname,
                    mode,
                    "online" if online else "offline",
                    sum(q.requests_total for q in qs),
                    hw,
                    qs,
                )
            ]
            rows += [
                (
                    qid_str(q.qid),
                    tname,
                    mode,
                    "online" if q.state.in_service else q.state.value,
                    q.requests_total,
                    q.hw,
                    [q],
                )
                for q in sorted(qs, key=lambda q: q.qid)
            ]
            for name, t, m, status, reqs, h, group in rows:
                line = f"{name:<10} {t:<7} {m:<12} {status:<14} {reqs:>8}"
                if args.verbose:
                    pending = sum(q.held for q in group)
                    at, depth, funcs = (h.at, h.slots, _functions(h.fac)) if h else ("-", "-", "-")
                    line += f" {pending:>7} {at:>6} {depth:>6} {funcs:>10}"
                print(line)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from apcrypto.demo import run_demo

    return run_demo(seed=args.seed, requests=args.requests, sim=args.sim)


def cmd_bench(args: argparse.Namespace) -> int:
    from apcrypto.bench import compare

    res = compare(args.requests, profile=args.profile)
    for r in res["rates"]:
        print(f"{r.name:<22} {r.ops:>7} ops in {r.seconds:7.3f} s = {r.per_second:10.0f} ops/s")
    print(f"driver / raw loop      {res['driver_over_raw']:.2f}")
    print(f"driver / firmware      {res['driver_over_firmware']:.2f}")
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
    from apcrypto import __version__

    parser = argparse.ArgumentParser(prog="apcrypto", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--log-level", default="WARNING", help="logging level (default WARNING)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="list cards and queues (lszcrypt style)")
    p.add_argument("url", nargs="?", default="emu:", help="transport URL (default: embedded emulator)")
    p.add_argument("-V", "--verbose", action="store_true", help="more columns")
    p.add_argument("--timeout", type=float, default=10.0)
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("demo", help="mixed workload with a machine failure on the embedded emulator")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--sim", action="store_true", help="simulation runner: the same seed replays exactly")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("bench", help="driver throughput against the raw NQAP/DQAP loop and the firmware")
    p.add_argument("--requests", type=int, default=4000)
    p.add_argument("--profile", default="fast")
    p.set_defaults(func=cmd_bench)
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING))
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
