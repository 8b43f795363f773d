"""The one exception type every decoder in :mod:`apformats` raises for bad bytes."""

from __future__ import annotations


class FormatError(ValueError):
    """Bytes that do not form a valid message or frame (truncated, corrupted, wrong type or length).

    Raised by every parser in :mod:`apformats`, whether the construct definition or a verified fast
    path did the work, so callers catch exactly one type.  ``offset`` is where the problem was
    found when known; ``kind`` is a short machine-readable label (``"truncated"``, ``"type"``, ...).
    """

    def __init__(self, message: str, *, kind: str = "malformed", offset: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.offset = offset
