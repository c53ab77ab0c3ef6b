"""Prometheus metrics: counted by the workers into Redis, served by the API at ``/metrics``.

Workers run on many hosts, in many processes (prefork children, the slow lane's threads), and
come and go; so what they count goes to one Redis hash (``Queues.add_counts``), one call per
task, and the API turns it into metric families at scrape time, beside gauges read then from
Redis and the database. One scrape of any API process sees the whole service. A Redis that
loses its state starts the counters again from zero, which Prometheus reads as a counter reset.

Counters: events by outcome, deliveries made by the fan-out, attempts by webhook and outcome,
delivery tasks and the leases they carried, SLA breaches flagged, failing webhooks deactivated;
histograms: the webhook's response time, and the time from ingest to delivery. Gauges:
deliveries waiting in each webhook's queue, retries parked, re-checks parked (no retries), slots
held, webhooks in the slow lane, unfinished deliveries by status (the database's count), and
the messages waiting in each broker queue that no worker consumes.
"""

from __future__ import annotations

import bisect
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from notifier.consumers import QUEUES
from notifier.db import Database
from notifier.models import DeadLetter, Delivery, DeliveryStatus
from notifier.queues import Queues

__all__ = ["DELIVERED_BUCKETS_MS", "RESPONSE_BUCKETS_MS", "ServiceCollector", "Tally"]

# Upper bounds in milliseconds; one more bucket holds what is above the last.
RESPONSE_BUCKETS_MS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000)
DELIVERED_BUCKETS_MS = (50, 100, 250, 500, 1000, 5000, 30_000, 60_000, 300_000, 1_800_000,
                        3_600_000, 21_600_000, 86_400_000)
_OPEN = (DeliveryStatus.PENDING, DeliveryStatus.IN_FLIGHT, DeliveryStatus.RETRYING)


class Tally:
    """What one task counts, for one ``Queues.add_counts`` call at its end.

    The fields of the Redis hash: ``events|<outcome>``, ``fanned_out``, ``attempts|<webhook>|
    <outcome>``, ``<histogram>|<bucket index>`` with ``<histogram>|sum_ms``, ``sla_breaches``,
    ``webhooks_disabled``, ``delivery_tasks``, ``delivery_task_leases``, ``ingest_batches``.
    """

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def event(self, outcome: str, deliveries: int = 0) -> None:
        self.counts[f"events|{outcome}"] += 1
        if deliveries:
            self.counts["fanned_out"] += deliveries

    def attempt(self, webhook_id: str, outcome: str, response_ms: int,
                delivered_after_ms: int | None) -> None:
        """An attempt's outcome and response time; ``delivered_after_ms`` when it delivered."""
        self.counts[f"attempts|{webhook_id}|{outcome}"] += 1
        self._observe("response", RESPONSE_BUCKETS_MS, response_ms)
        if delivered_after_ms is not None:
            self._observe("delivered", DELIVERED_BUCKETS_MS, delivered_after_ms)

    def ingest_batch(self) -> None:
        """Events were stored together, in one transaction (``pipeline.accept_many``)."""
        self.counts["ingest_batches"] += 1

    def delivery_task(self, leases: int) -> None:
        """A delivery task ran, sent with ``leases`` leases (a webhook's slot each)."""
        self.counts["delivery_tasks"] += 1
        self.counts["delivery_task_leases"] += leases

    def webhook_disabled(self) -> None:
        self.counts["webhooks_disabled"] += 1

    def sla_breaches(self, count: int) -> None:
        if count:
            self.counts["sla_breaches"] += count

    def _observe(self, name: str, bounds: Sequence[int], ms: int) -> None:
        ms = max(0, ms)
        self.counts[f"{name}|{bisect.bisect_left(bounds, ms)}"] += 1
        self.counts[f"{name}|sum_ms"] += ms


class ServiceCollector(Collector):
    """The service's metrics, read from Redis and the database when scraped."""

    def __init__(self, queues: Queues, db: Database, *,
                 unconsumed: Callable[[], Mapping[str, int] | None] | None = None) -> None:
        """``unconsumed``: the broker's notifier queues with messages waiting and no worker
        consuming them, by length (None when the broker does not answer)."""
        self.queues = queues
        self.db = db
        self.unconsumed = unconsumed

    def collect(self) -> Iterator[Metric]:
        counts = self.queues.counts()
        yield _counter("notifier_events", "Events received, by outcome: accepted (stored and "
                       "fanned out), rejected (failed validation; kept), duplicate (an eventId "
                       "stored already).", counts, "events", ["outcome"])
        yield _single(CounterMetricFamily, "notifier_deliveries_created",
                      "Deliveries made by fanning events out to webhooks.",
                      counts.get("fanned_out", 0))
        yield _counter("notifier_delivery_attempts", "Delivery attempts (POSTs), by webhook and "
                       "the outcome they led to.", counts, "attempts", ["webhook", "outcome"])
        yield _histogram("notifier_webhook_response_seconds", "How long webhooks took to "
                         "answer a delivery (or to fail it).", counts, "response",
                         RESPONSE_BUCKETS_MS)
        yield _histogram("notifier_delivered_seconds", "From an event's ingest to its "
                         "delivery's success.", counts, "delivered", DELIVERED_BUCKETS_MS)
        yield _single(CounterMetricFamily, "notifier_ingest_batches", "Ingest runs, each "
                      "storing its events in one transaction: over notifier_events_total, how "
                      "many events a run takes.", counts.get("ingest_batches", 0))
        yield _single(CounterMetricFamily, "notifier_delivery_tasks", "Delivery tasks run "
                      "(a retry of one counts again).", counts.get("delivery_tasks", 0))
        yield _single(CounterMetricFamily, "notifier_delivery_task_leases", "Leases (a "
                      "webhook's slot each) the delivery tasks were sent with: over "
                      "notifier_delivery_tasks_total, how many webhooks a task serves.",
                      counts.get("delivery_task_leases", 0))
        yield _single(CounterMetricFamily, "notifier_webhooks_disabled", "Webhooks notifier "
                      "deactivated: every attempt failed for NOTIFIER_DISABLE_FAILING_AFTER.",
                      counts.get("webhooks_disabled", 0))
        yield _single(CounterMetricFamily, "notifier_sla_breaches", "Deliveries not delivered "
                      "within their webhook's SLA, each once: stamped by beat's SLA check or "
                      "by the attempt that ended late.",
                      counts.get("sla_breaches", 0))
        yield from self._gauges()

    def _gauges(self) -> Iterator[Metric]:
        state = self.queues.state(now_ms=time.time_ns() // 1_000_000)
        waiting = GaugeMetricFamily("notifier_deliveries_waiting", "Deliveries waiting in a "
                                    "webhook's queue for a slot.", labels=["webhook"])
        for webhook_id, count in sorted(state.waiting.items()):
            waiting.add_metric([webhook_id], count)
        yield waiting
        yield _single(GaugeMetricFamily, "notifier_retries_parked",
                      "Deliveries parked until their next attempt is due.", state.parked)
        yield _single(GaugeMetricFamily, "notifier_rechecks_parked", "Deliveries a task found "
                      "under another task's claim, parked to be looked at again when it would run "
                      "out (in case that task died); most were finished by then. No retries.",
                      state.rechecks)
        yield _single(GaugeMetricFamily, "notifier_slots_held",
                      "Connection slots held by delivery tasks (live leases).", state.slots_held)
        yield _single(GaugeMetricFamily, "notifier_webhooks_slow_lane", "Webhooks sent to by the "
                      "slow lane: their slowest recent answer took NOTIFIER_SLOW_WEBHOOK_MS or "
                      "more.", state.slow)
        open_ = GaugeMetricFamily("notifier_deliveries_open", "Unfinished deliveries in the "
                                  "database (the source of truth), by status.",
                                  labels=["status"])
        for status, count in self._open_deliveries():
            open_.add_metric([status], count)
        yield open_
        if self.unconsumed is not None:
            yield from self._unconsumed(self.unconsumed())
        yield _single(GaugeMetricFamily, "notifier_dead_letters", "Events kept as dead letters "
                      "(not storable, or failing past NOTIFIER_INGEST_RETRY_HORIZON) and not "
                      "replayed yet: notifier dead-letters list.", self._dead_letters())

    def _unconsumed(self, lengths: Mapping[str, int] | None) -> Iterator[Metric]:
        if lengths is None:  # the broker did not answer: no sample rather than a false 0
            return
        family = GaugeMetricFamily("notifier_queue_unconsumed_messages", "Messages waiting in a "
                                   "notifier broker queue that no worker consumes (none that "
                                   "answered within a moment): they are not delivered until one "
                                   "does. 0 for a queue consumed or empty.", labels=["queue"])
        for name in QUEUES:
            family.add_metric([name], lengths.get(name, 0))
        yield family

    def _dead_letters(self) -> int:
        with self.db.autocommit() as connection:
            return int(connection.scalar(select(func.count()).select_from(DeadLetter)
                                         .where(DeadLetter.replayed_at_ms.is_(None))) or 0)

    def _open_deliveries(self) -> list[tuple[str, int]]:
        with self.db.autocommit() as connection:
            rows = dict(connection.execute(
                select(Delivery.status, func.count()).where(Delivery.status.in_(_OPEN))
                .group_by(Delivery.status)).all())
        return [(status.value, int(rows.get(status, 0))) for status in _OPEN]


def _single(family: type[CounterMetricFamily] | type[GaugeMetricFamily], name: str,
            help_text: str, value: float) -> Metric:
    """A metric of one unlabelled sample."""
    made = family(name, help_text)
    made.add_metric([], value)
    return made


def _counter(name: str, help_text: str, counts: Mapping[str, int], prefix: str,
             labels: list[str]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, help_text, labels=labels)
    for values, count in sorted(_labelled(counts, prefix, len(labels))):
        family.add_metric(list(values), count)
    return family


def _labelled(counts: Mapping[str, int], prefix: str,
              arity: int) -> Iterable[tuple[tuple[str, ...], int]]:
    for field, count in counts.items():
        head, _, rest = field.partition("|")
        values = tuple(rest.split("|"))
        if head == prefix and len(values) == arity:
            yield values, count


def _histogram(name: str, help_text: str, counts: Mapping[str, int], prefix: str,
               bounds: Sequence[int]) -> HistogramMetricFamily:
    buckets: list[tuple[str, float]] = []
    total = 0
    for index, bound in enumerate([*bounds, None]):
        total += counts.get(f"{prefix}|{index}", 0)
        buckets.append(("+Inf" if bound is None else _seconds(bound), total))
    family = HistogramMetricFamily(name, help_text)
    family.add_metric([], buckets, sum_value=counts.get(f"{prefix}|sum_ms", 0) / 1000)
    return family


def _seconds(ms: int) -> str:
    return f"{ms / 1000:g}"
