"""``python -m apcrypto ...``: the same as the ``apcrypto`` console script."""

import sys

from apcrypto.cli import main

if __name__ == "__main__":
    sys.exit(main())
