"""What a caller hands the library, checked before it goes anywhere: deadlines, options, URLs.

A wrong value here would otherwise be read as something else (an absolute ``time.time()`` read as
fifty years from now, a misspelled option silently ignored), so each check raises at the call with
the value and what was expected.
"""

from __future__ import annotations

import math
from numbers import Real

#: The longest deadline a caller may give, in seconds from now (one week).  ``deadline=`` is always
#: *relative*: the request must end this many seconds after it is submitted.  Anything longer is far
#: more likely an absolute timestamp (``time.time() + 5`` is about 1.7e9) than a real wish, and would
#: otherwise be honoured as "decades from now" -- that is, no deadline at all.
MAX_DEADLINE = 7 * 24 * 3600.0

#: Values at or above this look like ``time.time()`` / ``time.monotonic()`` readings, not durations.
_LOOKS_ABSOLUTE = 1e8


def check_deadline(deadline: object) -> float | None:
    """Return ``deadline`` as float seconds from now, or raise.

    ``None`` means no deadline.  ``TypeError`` for a non-number (or a bool); ``ValueError`` for NaN,
    a negative value, or one above :data:`MAX_DEADLINE` (with a hint when it looks like an absolute
    time).  ``0`` is allowed: the request must already be done, so it ends ``DeadlineExceeded`` unless
    it can finish at once.
    """
    if deadline is None:
        return None
    if isinstance(deadline, bool) or not isinstance(deadline, Real):
        kind = type(deadline).__name__
        raise TypeError(f"deadline must be seconds from now (a number) or None, not {kind}")
    value = float(deadline)
    if math.isnan(value):
        raise ValueError("deadline is NaN; give seconds from now, or None for no deadline")
    if value < 0:
        raise ValueError(
            f"deadline={value!r}: deadline is seconds from now and must be >= 0 "
            "(an absolute time in the past, such as time.time() - 1, is not accepted)"
        )
    if value > MAX_DEADLINE:
        hint = (
            " -- this looks like an absolute time (time.time() or time.monotonic()); "
            "pass seconds from now, e.g. deadline=when - time.time()"
            if value >= _LOOKS_ABSOLUTE
            else ""
        )
        raise ValueError(
            f"deadline={value!r}: deadline is seconds from now, at most {MAX_DEADLINE:.0f} (one week){hint}"
        )
    return value


__all__ = ["MAX_DEADLINE", "check_deadline"]
