"""``python -m emulator serve ...``: the same as the ``apcrypto-emulator`` console script."""

from emulator.cli import main

raise SystemExit(main())
