"""The sans-I/O driver core (see :mod:`apcrypto.core.driver` for how its pieces fit together).

``DriverCore`` is imported on first use, so that importing a leaf module (``apcrypto.core.config``)
does not load the whole core.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from apcrypto.core.driver import DriverCore

__all__ = ["DriverCore"]


def __getattr__(name: str) -> Any:
    if name == "DriverCore":
        from apcrypto.core.driver import DriverCore

        return DriverCore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
