"""Time as notifier stores and shows it: epoch milliseconds, and ISO 8601 in UTC.

One definition for every layer (the write side, the read side, the faces), so that none of them
imports another just to tell the time.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

__all__ = ["iso_ms", "now_ms"]


def now_ms() -> int:
    """The time now, in epoch milliseconds (the unit of every ``*_ms`` column)."""
    return time.time_ns() // 1_000_000


def iso_ms(ms: int | None) -> str | None:
    """Epoch milliseconds as ``2025-03-05T15:43:43.549Z``; None stays None."""
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")
