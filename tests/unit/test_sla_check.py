"""Beat's SLA pass (pipeline.check_sla): batch after batch while they come back full, for at
most half the interval, each batch's breaches counted once."""

from __future__ import annotations

import itertools
import random
import time
from collections import Counter
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import pytest

from config import load_settings
from notifier import alerts, pipeline, store
from notifier.pipeline import Services


class _Counts:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def add_counts(self, counts: Counter[str]) -> None:
        self.counts.update(counts)


def _services(batch: int, interval: float) -> Services:
    settings = replace(load_settings({}), sla_check_batch_size=batch, sla_check_interval=interval)
    return Services(settings=settings, db=None, queues=_Counts(),  # type: ignore[arg-type]
                    catalog=None, sender=None, vault=None,  # type: ignore[arg-type]
                    rng=random.Random(0))


def _breaches(n: int) -> list[store.Breach]:
    return [store.Breach(f"msg_{i}", "hook", 1000) for i in range(n)]


def _store_returning(monkeypatch: pytest.MonkeyPatch, sizes: list[int]) -> list[int]:
    """Make the store's check return batches of ``sizes``; returns the batch limits asked."""
    asked: list[int] = []
    results = iter(sizes)

    def flag(db: Any, *, now_ms: int, batch: int,
             within: store.WithBreaches | None = None) -> list[store.Breach]:
        asked.append(batch)
        stamped = _breaches(next(results))
        if within is not None:  # in the stamps' transaction (no database here)
            within(None, stamped)  # type: ignore[arg-type]
        return stamped

    monkeypatch.setattr(store, "flag_sla_breaches", flag)
    return asked


def _alerted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the breaches of each slaBreached raise (one per batch; none kept here)."""
    raised: list[int] = []

    def sla_breached(connection: Any, breaches: Any, *, now_ms: int) -> list[Any]:
        raised.append(len(list(breaches)))
        return []

    monkeypatch.setattr(alerts, "sla_breached", sla_breached)
    return raised


def test_a_pass_goes_on_while_batches_come_back_full_and_counts_each_breach(
        monkeypatch: pytest.MonkeyPatch) -> None:
    asked = _store_returning(monkeypatch, [5, 5, 2, 5])
    alerted = _alerted(monkeypatch)
    services = _services(batch=5, interval=3600)

    assert pipeline.check_sla(services, lambda lease: None) == 12

    assert asked == [5, 5, 5]  # stopped at the short batch
    assert alerted == [5, 5, 2]  # each batch's breaches raise their alerts
    assert services.queues.counts["sla_breaches"] == 12  # type: ignore[attr-defined]


def test_a_pass_stops_after_half_the_interval_and_leaves_the_rest_to_the_next(
        monkeypatch: pytest.MonkeyPatch) -> None:
    asked = _store_returning(monkeypatch, [5] * 100)
    clock = itertools.count(0.0, 1.0)  # each look at the clock is a second later
    monkeypatch.setattr(pipeline, "time", SimpleNamespace(monotonic=lambda: next(clock),
                                                          time_ns=time.time_ns))
    services = _services(batch=5, interval=5)  # 2.5 s: past it at the third batch's end

    _alerted(monkeypatch)
    assert pipeline.check_sla(services, lambda lease: None) == 15
    assert asked == [5, 5, 5]
