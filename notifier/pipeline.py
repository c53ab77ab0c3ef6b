"""The delivery pipeline as plain functions: accept an event, pump queues, deliver a lease, sweep.

Nothing here knows Celery. Where a step must start more work (a lease to send), it calls the
``send`` function it was given; ``tasks/`` passes one that publishes the delivery task.

The steps of one delivery are ``enrich -> render -> sign -> post -> judge``: each a plain
function, run here back to back in one task (one broker round trip per batch instead of one per
step; see the performance issue for the measurements).
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from config import Settings
from notifier import store
from notifier.db import Database
from notifier.enrich import additions, enrich, prefetch
from notifier.errors import TransientError
from notifier.models import DeliveryStatus
from notifier.queues import Lease, Queues
from notifier.reference import Lookups
from notifier.retry import next_attempt_at_ms
from notifier.schemas import EventCatalog, load_catalog
from notifier.sender import (
    HttpSender,
    OutboundRequest,
    Result,
    Sender,
    Verdict,
    classify,
    retry_after_seconds,
)
from notifier.signing import signature_headers
from notifier.vault import Vault, vault_for

__all__ = [
    "Services",
    "SweepReport",
    "accept",
    "accept_many",
    "build_services",
    "check_sla",
    "deliver",
    "judge",
    "pump",
    "rebuild",
    "render",
    "replay",
    "request_for",
    "sweep",
]

log = logging.getLogger(__name__)

SendLease = Callable[[Lease], None]
EXCERPT_BYTES = 1024
_OWN_HEADERS = frozenset({"content-type", "content-length", "host"})


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class Services:
    """What the pipeline runs on; one per process."""

    settings: Settings
    db: Database
    queues: Queues
    catalog: EventCatalog
    sender: Sender
    vault: Vault
    rng: random.Random = field(default_factory=random.Random)
    # Reference-data reads for enrichment, shared by this process's deliveries of one event.
    lookups: Lookups = field(init=False)

    def __post_init__(self) -> None:
        self.lookups = Lookups(self.db)

    @property
    def lease_ms(self) -> int:
        return round(self.settings.slot_lease_seconds * 1000)


def build_services(settings: Settings) -> Services:
    return Services(
        settings=settings,
        db=Database(settings.database_url),
        queues=Queues(settings.redis_url, settings.redis_prefix,
                      slow_ms=settings.slow_webhook_ms, linger_ms=settings.batch_linger_ms),
        catalog=load_catalog(),
        sender=HttpSender(timeout=settings.http_timeout,
                          max_response_bytes=settings.max_response_bytes,
                          allowed_networks=settings.allow_private_networks),
        vault=vault_for(settings.secret_keys, settings.data_dir),
    )


def _by_webhook(queued: Iterable[store.Queued]) -> dict[str, list[store.Queued]]:
    by_hook: dict[str, list[store.Queued]] = defaultdict(list)
    for item in queued:
        by_hook[item.webhook_id].append(item)
    return by_hook


def _enqueue(services: Services, queued: Iterable[store.Queued]) -> None:
    for webhook_id, items in _by_webhook(queued).items():
        services.queues.enqueue(webhook_id, items[0].limit,
                                [(i.delivery_id, i.score) for i in items])


def _offer(services: Services, queued: Iterable[store.Queued], send: SendLease) -> int:
    """Queue deliveries and send a lease for every free slot of their webhooks; returns how
    many leases were sent."""
    sent = 0
    for webhook_id, items in _by_webhook(queued).items():
        for lease in services.queues.offer(
                webhook_id, items[0].limit, [(i.delivery_id, i.score) for i in items],
                batch=services.settings.batch_size, lease_ms=services.lease_ms, now_ms=now_ms()):
            send(lease)
            sent += 1
    return sent


def accept(services: Services, envelope: Mapping[str, Any], send: SendLease, *,
           only_webhook: str | None = None) -> store.IngestOutcome:
    """Store, validate and fan out one event, queue its deliveries and send what can go now.

    ``only_webhook`` narrows the fan-out to one webhook (see ``store.ingest``).
    """
    return accept_many(services, [envelope], send, only_webhook=only_webhook)[0]


def accept_many(services: Services, envelopes: Sequence[Mapping[str, Any]], send: SendLease, *,
                only_webhook: str | None = None) -> list[store.IngestOutcome]:
    """``accept`` for several events: one transaction stores them all, and each webhook's new
    deliveries reach its queue in one call."""
    outcomes = store.ingest_many(services.db, services.catalog, envelopes, now_ms=now_ms(),
                                 only_webhook=only_webhook)
    _offer(services, [queued for outcome in outcomes for queued in outcome.queued], send)
    return outcomes


def pump(services: Services, webhook_ids: Iterable[str], send: SendLease) -> int:
    """Hand every free slot of these webhooks a batch of their queue; returns leases sent."""
    sent = 0
    for webhook_id in webhook_ids:
        for lease in services.queues.dispatch(
                webhook_id, batch=services.settings.batch_size, lease_ms=services.lease_ms,
                now_ms=now_ms()):
            send(lease)
            sent += 1
    return sent


def render(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def request_for(target: store.Target, delivery_id: str, body: bytes,
                timestamp: int) -> OutboundRequest:
    """The signed request: the webhook's own headers, then ours (which a webhook cannot override)."""
    headers = {name: value for name, value in target.headers.items()
               if name.lower() not in _OWN_HEADERS and not name.lower().startswith("webhook-")}
    headers["Content-Type"] = "application/json"
    headers.update(signature_headers(target.secrets, delivery_id, timestamp, body))
    return OutboundRequest(target.url, headers, body)


def judge(services: Services, claimed: store.Claimed, result: Result,
          started_at_ms: int) -> store.Finished:
    """Turn one POST's result into the delivery's next state."""
    verdict = classify(result)
    outcome = {Verdict.DELIVERED: DeliveryStatus.DELIVERED,
               Verdict.FAILED: DeliveryStatus.FAILED}.get(verdict, DeliveryStatus.RETRYING)
    due = None
    if verdict is Verdict.RETRY:
        settings = services.settings
        due = next_attempt_at_ms(
            attempts_made=claimed.attempt_count + 1, now_ms=now_ms(),
            ingested_at_ms=claimed.ingested_at_ms, schedule=settings.retry_schedule,
            jitter=settings.retry_jitter, horizon=settings.retry_horizon,
            retry_after=retry_after_seconds(result, time.time()),
            retry_after_max=settings.retry_after_max, rng=services.rng)
        if due is None:
            outcome = DeliveryStatus.DEAD
    error = result.error
    return store.Finished(
        claimed=claimed, started_at_ms=started_at_ms, latency_ms=result.latency_ms,
        outcome=outcome, status_code=result.status_code,
        error_class=type(error).__name__ if error else None,
        error_message=str(error)[:2000] if error else None,
        response_excerpt=result.body_excerpt[:EXCERPT_BYTES].decode("utf-8", "replace"),
        next_attempt_at_ms=due)


def deliver(services: Services, lease: Lease) -> list[Lease]:
    """Send a lease's deliveries one after another over one connection slot, give it back, and
    return the webhook's next leases to send (what queued while this one was out).

    Deliveries already finished or held by someone else are skipped (at-least-once, never the
    same delivery twice at once); those not due yet are parked until they are. If this raises,
    the slot is kept: a retry carries on with it, or it expires and the sweeper re-queues what
    it carried.
    """
    budget_ends = time.monotonic() + services.settings.batch_time_budget
    batch, lease_ms = services.settings.batch_size, services.lease_ms
    held = services.queues.take(lease, batch=batch, now_ms=now_ms())
    if held is None:
        return services.queues.dispatch(lease.webhook_id, batch=batch, lease_ms=lease_ms,
                                        now_ms=now_ms())
    took_ms = _deliver_lease(services, held, budget_ends)
    return services.queues.release(held, took_ms=took_ms, batch=batch, lease_ms=lease_ms,
                                   now_ms=now_ms()).leases


def _deliver_lease(services: Services, lease: Lease, budget_ends: float) -> int:
    """POST what the lease carries; returns the slowest response's milliseconds (-1: none).

    A batch ends early when its time budget is spent, or, in the fast lane, as soon as the
    webhook answers slowly: the rest goes back to the queue and on by the slow lane.
    """
    claim = store.claim(services.db, lease.delivery_ids, now_ms=now_ms(),
                        lease_ms=services.lease_ms)
    services.queues.park([(lease.webhook_id, i, due) for i, due in claim.later])
    slowest = -1
    if not claim.claimed:
        return slowest
    target = store.target(services.db, services.vault, lease.webhook_id, now_ms=now_ms())
    if target.active:
        # The reference data the whole batch needs, one query per kind.
        prefetch([c.event for c in claim.claimed], target.options, services.lookups)
    for index, claimed in enumerate(claim.claimed):
        too_slow = not lease.slow and slowest >= services.settings.slow_webhook_ms
        if index > 0 and (too_slow or time.monotonic() > budget_ends):
            _give_back(services, lease.webhook_id, target, claim.claimed[index:])
            break
        finished = _attempt(services, target, claimed)
        slowest = max(slowest, finished.latency_ms)
        store.finish(services.db, [finished], sla_in_seconds=target.sla_in_seconds)
        if finished.next_attempt_at_ms is not None:
            services.queues.park([(lease.webhook_id, claimed.id, finished.next_attempt_at_ms)])
    return slowest


def _attempt(services: Services, target: store.Target, claimed: store.Claimed) -> store.Finished:
    """enrich -> render -> sign -> post -> judge, for one claimed delivery."""
    started = now_ms()
    if not target.active:
        return store.Finished(claimed, started, 0, DeliveryStatus.FAILED,
                              error_class="WebhookInactive",
                              error_message="the webhook was deactivated")
    try:
        enriched = enrich(claimed.event, target.options, services.lookups)
        body = render(enriched.payload)
        result = services.sender.send(request_for(target, claimed.id, body, started // 1000))
        finished = judge(services, claimed, result, started)
        if not enriched.enriched:
            return finished
        return replace(finished, enrichment=additions(claimed.event, enriched.payload),
                       enrichment_notes="; ".join(enriched.notes) or None)
    except TransientError:
        raise
    except Exception as exc:
        # A bug in a step must not crash the worker and resend forever: record it as a failed
        # attempt (replayable once fixed) and carry on with the batch.
        log.exception("delivery %s failed in notifier itself", claimed.id)
        return store.Finished(claimed, started, now_ms() - started, DeliveryStatus.FAILED,
                              error_class=type(exc).__name__, error_message=str(exc)[:2000])


def _give_back(services: Services, webhook_id: str, target: store.Target,
               rest: Iterable[store.Claimed]) -> None:
    rest = list(rest)
    store.release_claims(services.db, rest)
    services.queues.enqueue(webhook_id, target.max_allowed_connections,
                            [(c.id, c.ingested_at_ms) for c in rest])


@dataclass(frozen=True)
class SweepReport:
    rebuilt: int = 0
    promoted: int = 0
    expired: int = 0
    leases_sent: int = 0


def rebuild(services: Services) -> int:
    """Put every unfinished delivery of the database back into Redis; returns how many."""
    work = store.open_work(services.db)
    parked = [(q.webhook_id, q.delivery_id, due) for q, status, due in work
              if status == DeliveryStatus.RETRYING and due is not None]
    services.queues.park(parked)
    _enqueue(services, [q for q, status, due in work
                        if not (status == DeliveryStatus.RETRYING and due is not None)])
    return len(work)


def sweep(services: Services, send: SendLease) -> SweepReport:
    """Beat's frequent pass: rebuild a flushed Redis, bring back due retries and lost leases,
    and pump every queue with work waiting."""
    rebuilt = 0
    if services.queues.claim_epoch():
        try:
            rebuilt = rebuild(services)
        except BaseException:
            services.queues.forget_epoch()
            raise
    now = now_ms()
    promoted = services.queues.promote_due(now)
    expired = services.queues.expire_leases(now)
    sent = pump(services, services.queues.queued_webhooks(), send)
    return SweepReport(rebuilt, len(promoted), len(expired), sent)


def replay(services: Services, delivery_ids: Iterable[str], send: SendLease) -> int:
    """Send deliveries again with their original ``webhook-id``; returns how many were queued."""
    queued = store.replay(services.db, list(delivery_ids))
    _offer(services, queued, send)
    return len(queued)


def check_sla(services: Services) -> int:
    """Beat's SLA pass: stamp deliveries that missed their webhook's SLA; returns how many."""
    return store.flag_sla_breaches(services.db, now_ms=now_ms())
