"""Prometheus metrics: counted by the workers into Redis, served by the API at ``/metrics``.

Workers run on many hosts, in many processes (prefork children, the slow lane's threads), and
come and go; so what they count goes to one Redis hash (``Queues.add_counts``), one call per
task, and the API turns it into metric families at scrape time, beside gauges read then from
Redis and the database. One scrape of any API process sees the whole service. A Redis that
loses its state starts the counters again from zero, which Prometheus reads as a counter reset.

Counters: events by outcome, deliveries made by the fan-out, attempts by webhook and outcome,
delivery tasks and the leases they carried, SLA breaches flagged, failing webhooks deactivated,
operational alerts raised by kind; circuit breakers opened and closed;
histograms: the webhook's response time, and the time from ingest to delivery. Gauges:
deliveries waiting in each webhook's queue, retries parked, re-checks parked (no retries), slots
held, webhooks in the slow lane, circuit breakers by state (and, for the webhooks failing now,
their failures in a row and next probe), unfinished deliveries by status (the database's count), and
the messages waiting in each broker queue that no worker consumes.
"""

from __future__ import annotations

import bisect
import threading
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

from notifier import store
from notifier.clock import now_ms
from notifier.db import Database
from notifier.models import DeadLetter, Delivery, DeliveryStatus
from notifier.queues import BREAKER_STATES, Queues
from notifier.routes import QUEUES

__all__ = ["DELIVERED_BUCKETS_MS", "RESPONSE_BUCKETS_MS", "ServiceCollector", "Tally"]

# Upper bounds in milliseconds; one more bucket holds what is above the last.
RESPONSE_BUCKETS_MS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000)
DELIVERED_BUCKETS_MS = (50, 100, 250, 500, 1000, 5000, 30_000, 60_000, 300_000, 1_800_000,
                        3_600_000, 21_600_000, 86_400_000)
_OPEN = (DeliveryStatus.PENDING, DeliveryStatus.IN_FLIGHT, DeliveryStatus.RETRYING)


class Tally:
    """What one task counts, for one ``Queues.add_counts`` call at its end; the threads a
    delivery task sends from count into one.

    The fields of the Redis hash: ``events|<outcome>``, ``fanned_out``, ``attempts|<webhook>|
    <outcome>``, ``<histogram>|<bucket index>`` with ``<histogram>|sum_ms``, ``sla_breaches``,
    ``webhooks_disabled``, ``alerts|<kind>``, ``delivery_tasks``, ``delivery_task_leases``,
    ``delivery_task_boarders``, ``ingest_batches``.
    """

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def event(self, outcome: str, deliveries: int = 0) -> None:
        self._add((f"events|{outcome}", 1), ("fanned_out", deliveries))

    def attempt(self, webhook_id: str, outcome: str, response_ms: int,
                delivered_after_ms: int | None) -> None:
        """An attempt's outcome and response time; ``delivered_after_ms`` when it delivered."""
        self._add((f"attempts|{webhook_id}|{outcome}", 1),
                  *_observed("response", RESPONSE_BUCKETS_MS, response_ms),
                  *(() if delivered_after_ms is None else
                    _observed("delivered", DELIVERED_BUCKETS_MS, delivered_after_ms)))

    def ingest_batch(self) -> None:
        """Events were stored together, in one transaction (``pipeline.accept_many``)."""
        self._add(("ingest_batches", 1))

    def delivery_task(self, leases: int) -> None:
        """A delivery task ran, sent with ``leases`` leases (a webhook's slot each)."""
        self._add(("delivery_tasks", 1), ("delivery_task_leases", leases))

    def boarded(self, leases: int) -> None:
        """``leases`` more slots of a webhook were taken as a task started, for what waited to
        board its fast-lane lease (``Queues.take_many``)."""
        self._add(("delivery_task_boarders", leases))

    def webhook_disabled(self) -> None:
        self._add(("webhooks_disabled", 1))

    def alert(self, kind: str) -> None:
        """An operational alert was raised (``notifier.alerts``; once each)."""
        self._add((f"alerts|{kind}", 1))

    def breaker(self, state: str) -> None:
        """A webhook's circuit breaker opened, or closed after being open."""
        self._add((f"breakers|{state}", 1))

    def sla_breaches(self, count: int) -> None:
        self._add(("sla_breaches", count))

    def snapshot(self) -> Counter[str]:
        """What was counted so far (a thread of the task may still count meanwhile)."""
        with self._lock:
            return Counter(self.counts)

    def _add(self, *counts: tuple[str, int]) -> None:
        with self._lock:
            for name, count in counts:
                if count:
                    self.counts[name] += count


def _observed(name: str, bounds: Sequence[int], ms: int) -> tuple[tuple[str, int], ...]:
    """A histogram's fields for one observation of ``ms``: its bucket's count and the sum."""
    ms = max(0, ms)
    return (f"{name}|{bisect.bisect_left(bounds, ms)}", 1), (f"{name}|sum_ms", ms)


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
        yield _single(CounterMetricFamily, "notifier_delivery_task_boarders", "Leases taken "
                      "as a delivery task started, beside those it was sent with, for what "
                      "waited to board its webhook's fast-lane lease: sent in its process.",
                      counts.get("delivery_task_boarders", 0))
        yield _single(CounterMetricFamily, "notifier_webhooks_disabled", "Webhooks notifier "
                      "deactivated: every attempt failed for NOTIFIER_DISABLE_FAILING_AFTER.",
                      counts.get("webhooks_disabled", 0))
        yield _counter("notifier_circuit_breaker_transitions", "Webhooks' circuit breakers that "
                       "opened (NOTIFIER_BREAKER_FAILURES failed attempts in a row), or closed "
                       "after being open (the webhook recovered), by the state they went to.",
                       counts, "breakers", ["state"])
        yield _single(CounterMetricFamily, "notifier_sla_breaches", "Deliveries not delivered "
                      "within their webhook's SLA, each once: stamped by beat's SLA check or "
                      "by the attempt that ended late.",
                      counts.get("sla_breaches", 0))
        yield _counter("notifier_alerts", "Operational alerts raised (slaBreached: one per "
                       "webhook per minute), by kind; sent to the operations webhooks that "
                       "hear them.", counts, "alerts", ["kind"])
        yield from self._gauges()

    def _gauges(self) -> Iterator[Metric]:
        state = self.queues.state(now_ms=now_ms())
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
        yield from self._breakers()
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

    def _breakers(self) -> Iterator[Metric]:
        now = now_ms()
        breakers = self.queues.breakers(now_ms=now)
        states = Counter(breaker.state for breaker in breakers.values())
        family = GaugeMetricFamily("notifier_circuit_breakers", "Webhooks' circuit breakers by "
                                   "state: open (paused until its probe), halfOpen (its probe "
                                   "may go, or is out); closed counts only those with failed "
                                   "attempts in a row (the others are not kept).",
                                   labels=["state"])
        for state in BREAKER_STATES:
            family.add_metric([state], states.get(state, 0))
        yield family
        # Per webhook only for those failing now (as notifier_deliveries_waiting: those waiting).
        failures = GaugeMetricFamily("notifier_webhook_consecutive_failures", "Failed attempts "
                                     "in a row of a webhook with any (its circuit breaker opens "
                                     "at NOTIFIER_BREAKER_FAILURES).", labels=["webhook"])
        probes = GaugeMetricFamily("notifier_webhook_breaker_next_probe_timestamp_seconds",
                                   "When the probe of a webhook whose circuit breaker is open "
                                   "may go (Unix time).", labels=["webhook"])
        for webhook_id, breaker in sorted(breakers.items()):
            if breaker.consecutive_failures:
                failures.add_metric([webhook_id], breaker.consecutive_failures)
            if breaker.next_probe_at_ms is not None:
                probes.add_metric([webhook_id], breaker.next_probe_at_ms / 1000)
        yield failures
        yield probes

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
                                         .where(store.waiting_dead_letter())) or 0)

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
