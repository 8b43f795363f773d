"""``python -m emulator serve ...`` and the ``apcrypto-emulator`` console script.

Both go through :func:`main`, which turns any error into one line on stderr and a non-zero exit
status (a missing profile, a port in use), and a closed stdout pipe (``... | head``) into a quiet
exit.  ``--log-level debug`` still logs the traceback for a bug report.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    from emulator.cli import main as cli_main

    if list(sys.argv[1:] if argv is None else argv)[:1] == ["--version"]:
        from importlib.metadata import version

        print(f"apcrypto-emulator {version('apcrypto')}")
        return 0
    try:
        rc = int(cli_main(argv))
        sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at interpreter exit
        return rc
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader went away: stop writing (and let the interpreter's final flush hit /dev/null)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except Exception as exc:
        logging.getLogger("emulator.cli").debug("apcrypto-emulator failed", exc_info=True)
        print(f"apcrypto-emulator: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
