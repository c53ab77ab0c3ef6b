"""When the next attempt falls: schedule steps, jitter, Retry-After and the horizon."""

from __future__ import annotations

import random
from typing import Any

from notifier.retry import next_attempt_at_ms

NOW = 1_750_000_000_000
DAY = 24 * 3600.0


def _next(**overrides: Any) -> int | None:
    arguments: dict[str, Any] = {
        "attempts_made": 1, "now_ms": NOW, "ingested_at_ms": NOW, "schedule": (10.0,),
        "jitter": 0.0, "horizon": DAY, "retry_after_max": DAY, "rng": random.Random(0)}
    arguments.update(overrides)
    return next_attempt_at_ms(**arguments)


def test_steps_are_used_in_order_and_the_last_repeats() -> None:
    delays = [_next(attempts_made=n, schedule=(1.0, 2.0, 3.0)) for n in range(1, 6)]

    assert [d - NOW for d in delays if d is not None] == [1000, 2000, 3000, 3000, 3000]


def test_jitter_stays_within_its_bounds_and_spreads() -> None:
    rng = random.Random(1234)

    delays = [_next(schedule=(100.0,), jitter=0.2, rng=rng) for _ in range(2000)]

    offsets = [d - NOW for d in delays if d is not None]
    assert len(offsets) == 2000
    assert all(80_000 <= o <= 120_000 for o in offsets)
    # Spread over most of the band, not stuck on the plain step.
    assert min(offsets) < 85_000 and max(offsets) > 115_000


def test_a_longer_retry_after_wins() -> None:
    assert _next(retry_after=60.0) == NOW + 60_000


def test_a_shorter_retry_after_does_not_shorten_the_step() -> None:
    assert _next(retry_after=2.0) == NOW + 10_000


def test_retry_after_is_capped() -> None:
    assert _next(retry_after=1e9, retry_after_max=3600.0) == NOW + 3_600_000


def test_past_the_horizon_is_none() -> None:
    assert _next(schedule=(100.0,), horizon=99.0) is None


def test_exactly_at_the_horizon_is_still_tried() -> None:
    assert _next(schedule=(100.0,), horizon=100.0) == NOW + 100_000


def test_the_horizon_counts_from_ingestion() -> None:
    ingested = NOW - 3_600_000

    assert _next(ingested_at_ms=ingested, schedule=(10.0,), horizon=3605.0) is None
    assert _next(ingested_at_ms=ingested, schedule=(10.0,), horizon=3610.0) == NOW + 10_000


def test_a_retry_after_past_the_horizon_is_none() -> None:
    assert _next(retry_after=3600.0, horizon=600.0) is None


class _Edge(random.Random):
    """A generator whose every draw is the top of its range."""

    def uniform(self, a: float, b: float) -> float:
        return b


def test_the_jitter_comes_from_the_generator_given() -> None:
    # The top of the band lengthens the step by the whole jitter; the generator passed decides.
    assert _next(schedule=(100.0,), jitter=0.2, rng=_Edge()) == NOW + 120_000
