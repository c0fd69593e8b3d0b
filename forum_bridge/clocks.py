"""The clocks the service and its parts read, and the one way the bridge writes a time in JSON.

Wall times (:data:`Clock`) are stored and shown; "how long since" is measured on a monotonic
clock (:data:`Monotonic`) so that a step of the wall clock neither frees nor keeps a licence.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

Clock = Callable[[], datetime]
Monotonic = Callable[[], float]


def utcnow() -> datetime:
    """The current time, aware, in UTC."""
    return datetime.now(UTC)


def iso(value: datetime | None) -> str | None:
    """ISO 8601 with a Z, as every JSON document of the bridge writes times."""
    if value is None:
        return None
    v = value.astimezone(UTC)
    # Formatted by hand: the status document formats one or two times per subscriber, and this is
    # twice as fast as isoformat(), with the same text.
    return "%04d-%02d-%02dT%02d:%02d:%02dZ" % (v.year, v.month, v.day, v.hour, v.minute, v.second)  # noqa: UP031
