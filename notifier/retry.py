"""When to try a failed delivery again: exponential steps with jitter, ``Retry-After``, a horizon."""

from __future__ import annotations

import random
from collections.abc import Sequence

__all__ = ["next_attempt_at_ms"]


def next_attempt_at_ms(
    *,
    attempts_made: int,
    now_ms: int,
    ingested_at_ms: int,
    schedule: Sequence[float],
    jitter: float,
    horizon: float,
    retry_after: float | None = None,
    retry_after_max: float,
    rng: random.Random | None = None,
) -> int | None:
    """The time of the next attempt, or None when it would fall past the retry horizon.

    The delay after attempt ``n`` is ``schedule[n-1]`` (the last step repeats), spread by
    ``jitter`` so that receivers that failed together are not retried together. A
    ``Retry-After`` longer than that delay wins, cut to ``retry_after_max``.
    """
    step = schedule[min(attempts_made, len(schedule)) - 1]
    delay = step * (1 + (rng or random).uniform(-jitter, jitter))
    if retry_after is not None:
        delay = max(delay, min(retry_after, retry_after_max))
    due = now_ms + round(delay * 1000)
    if due > ingested_at_ms + horizon * 1000:
        return None
    return due
