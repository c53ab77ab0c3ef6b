"""What the pipeline reads and writes in the database: the source of truth for every delivery.

Each function is one short transaction. Claims are conditional updates, so two workers handed
the same delivery (a re-queue after a lost lease, a broker redelivery) never both send it.
"""

from __future__ import annotations

import ipaddress
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, func, insert, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from notifier import webhooks
from notifier.db import Database
from notifier.errors import InvalidEvent, InvalidInput, NotFound
from notifier.models import (
    FINAL_STATUSES,
    Attempt,
    Delivery,
    DeliveryStatus,
    Event,
    EventStatus,
    Org,
    SigningSecret,
    Webhook,
    WebhookSubscription,
)
from notifier.schemas import EventCatalog
from notifier.vault import Vault

__all__ = [
    "Claim",
    "Claimed",
    "Finished",
    "IngestOutcome",
    "Queued",
    "Target",
    "claim",
    "create_org",
    "create_webhook",
    "finish",
    "flag_sla_breaches",
    "ingest",
    "new_delivery_id",
    "normalize_envelope",
    "open_work",
    "release_claims",
    "replay",
    "target",
]


def new_delivery_id() -> str:
    return "msg_" + uuid.uuid4().hex


@dataclass(frozen=True)
class Queued:
    """A delivery that should be waiting in its webhook's queue."""

    webhook_id: str
    limit: int
    delivery_id: str
    score: int


@dataclass(frozen=True)
class IngestOutcome:
    event_id: str
    status: str
    created: bool
    error: str | None = None
    queued: tuple[Queued, ...] = ()


def normalize_envelope(envelope: Mapping[str, Any], now_ms: int) -> dict[str, Any]:
    """Fill in a missing ``eventId`` and ``createdAt``; check the fields idempotency rests on."""
    event = dict(envelope)
    if event.get("eventId") in (None, ""):
        event["eventId"] = str(uuid.uuid4())
    if not isinstance(event["eventId"], str) or len(event["eventId"]) > 100:
        raise InvalidEvent("$.eventId", "must be a string of at most 100 characters")
    if event.get("createdAt") is None:
        event["createdAt"] = now_ms
    org_id = event.get("orgId")
    if isinstance(org_id, bool) or not isinstance(org_id, int):
        raise InvalidEvent("$.orgId", "is required and must be an integer")
    return event


def ingest(db: Database, catalog: EventCatalog, envelope: Mapping[str, Any], *,
           now_ms: int, only_webhook: str | None = None) -> IngestOutcome:
    """Store an event (once per org and eventId), validate it, and fan it out to its webhooks.

    Everything happens in one transaction, so an event is never stored without its deliveries.
    A second ingest of the same event changes nothing and returns its unfinished deliveries, so
    a redelivered ingest task re-queues whatever a crash may have left out of Redis.
    ``only_webhook`` narrows the fan-out to that one webhook (a test send reaches only the
    webhook under test); by default every subscribed webhook gets the event.
    """
    try:
        _check_storable(envelope, "$")
        event = normalize_envelope(envelope, now_ms)
    except InvalidEvent as exc:
        return _store_unusable(db, _scrubbed(envelope), exc, now_ms)
    invalid: InvalidEvent | None = None
    try:
        catalog.validate(event)
    except InvalidEvent as exc:
        invalid = exc
    with db.session() as session:
        return _insert_and_fan_out(session, event, invalid, now_ms, only_webhook)


def _insert_once(session: Any, values: dict[str, Any]) -> int | None:
    """Insert an event unless its (org, eventId) is stored already: one statement, no race."""
    dialect_insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    statement = (dialect_insert(Event).values(**values)
                 .on_conflict_do_nothing(index_elements=["org_id", "event_id"])
                 .returning(Event.pk))
    pk = session.scalar(statement)
    return None if pk is None else int(pk)


def _insert_and_fan_out(session: Any, event: dict[str, Any], invalid: InvalidEvent | None,
                        now_ms: int, only_webhook: str | None = None) -> IngestOutcome:
    event_name = str(event.get("eventName", ""))[:100]
    status = EventStatus.REJECTED if invalid else EventStatus.DISPATCHED
    pk = _insert_once(session, {
        "event_id": event["eventId"], "event_name": event_name, "org_id": event["orgId"],
        "ref_id": _short(event.get("refId")), "api_request_id": _short(event.get("apiRequestId")),
        "created_at_ms": _as_int(event.get("createdAt"), now_ms), "received_at_ms": now_ms,
        "payload": event, "status": status,
        "error_message": str(invalid) if invalid else None,
        "error_path": invalid.field if invalid else None})
    if pk is None:
        existing = session.scalar(select(Event).where(
            Event.org_id == event["orgId"], Event.event_id == event["eventId"]))
        return IngestOutcome(existing.event_id, existing.status, False,
                             existing.error_message, _unfinished(session, existing.pk))
    if invalid:
        return IngestOutcome(event["eventId"], status, True, str(invalid))
    subscribers = (
        select(Webhook.id, Webhook.max_allowed_connections)
        .join(WebhookSubscription, WebhookSubscription.webhook_id == Webhook.id)
        .where(_listeners(session, event["orgId"]),  # an int: normalize_envelope checked it
               Webhook.active.is_(True), WebhookSubscription.event_name == event_name))
    if only_webhook is not None:
        subscribers = subscribers.where(Webhook.id == only_webhook)
    hooks = session.execute(subscribers.order_by(Webhook.id)).all()
    queued = tuple(Queued(hook_id, limit, new_delivery_id(), now_ms) for hook_id, limit in hooks)
    if queued:
        session.execute(insert(Delivery), [
            {"id": q.delivery_id, "event_pk": pk, "webhook_id": q.webhook_id,
             "status": DeliveryStatus.PENDING, "attempt_count": 0, "ingested_at_ms": now_ms}
            for q in queued])
    return IngestOutcome(event["eventId"], status, True, queued=queued)


def _listeners(session: Any, org_id: int) -> Any:
    """Webhooks that hear an org's events: its own, and its parent's that listen to children."""
    parent_id = session.scalar(select(Org.parent_id).where(Org.id == org_id))
    if parent_id is None:
        return Webhook.org_id == org_id
    return or_(Webhook.org_id == org_id,
               and_(Webhook.org_id == parent_id, Webhook.listen_to_child_events.is_(True)))


def _store_unusable(db: Database, envelope: Mapping[str, Any], exc: InvalidEvent,
                    now_ms: int) -> IngestOutcome:
    # An envelope whose orgId or eventId is unusable cannot be keyed for idempotency; it is
    # still kept, rejected, under a fresh id, so that nothing sent to notifier is lost.
    event_id = str(uuid.uuid4())
    org_id = envelope.get("orgId")
    with db.session() as session:
        session.add(Event(
            event_id=event_id, event_name=str(envelope.get("eventName", ""))[:100],
            org_id=org_id if isinstance(org_id, int) and not isinstance(org_id, bool) else None,
            ref_id=_short(envelope.get("refId")), api_request_id=_short(envelope.get("apiRequestId")),
            created_at_ms=_as_int(envelope.get("createdAt"), now_ms), received_at_ms=now_ms,
            payload=dict(envelope), status=EventStatus.REJECTED, error_message=str(exc),
            error_path=exc.field))
    return IngestOutcome(event_id, EventStatus.REJECTED, True, str(exc))


def _bad_text(text: str) -> bool:
    # PostgreSQL's JSON cannot hold NUL, and no UTF-8 can hold an unpaired surrogate.
    if text.isascii():
        return "\x00" in text
    return "\x00" in text or any("\ud800" <= c <= "\udfff" for c in text)


def _check_storable(value: Any, path: str) -> None:
    if isinstance(value, str) and _bad_text(value):
        raise InvalidEvent(path, "contains a NUL character or an unpaired surrogate")
    if isinstance(value, Mapping):
        for key, item in value.items():
            if _bad_text(str(key)):
                raise InvalidEvent(path, "has a key with a NUL character or an unpaired surrogate")
            _check_storable(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_storable(item, f"{path}[{index}]")


def _scrubbed(value: Any) -> Any:
    """``value`` with every unstorable character replaced by U+FFFD, to keep what can be kept."""
    if isinstance(value, str):
        return "".join("\ufffd" if c == "\x00" or "\ud800" <= c <= "\udfff" else c
                       for c in value)
    if isinstance(value, Mapping):
        return {_scrubbed(str(k)): _scrubbed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrubbed(item) for item in value]
    return value


def _short(value: Any) -> str | None:
    return None if value is None else str(value)[:200]


def _as_int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _unfinished(session: Any, event_pk: int) -> tuple[Queued, ...]:
    rows = session.execute(
        select(Delivery.webhook_id, Webhook.max_allowed_connections, Delivery.id,
               Delivery.ingested_at_ms)
        .join(Webhook, Webhook.id == Delivery.webhook_id)
        .where(Delivery.event_pk == event_pk, Delivery.status.not_in(FINAL_STATUSES))).all()
    return tuple(Queued(*row) for row in rows)


@dataclass(frozen=True)
class Claimed:
    """A delivery this worker now holds, with what it needs to send it."""

    id: str
    event: dict[str, Any]
    attempt_count: int
    ingested_at_ms: int
    lease_until_ms: int


@dataclass(frozen=True)
class Claim:
    claimed: tuple[Claimed, ...]
    # Deliveries that are not claimable yet (someone else's live lease, a retry not due):
    # park them until then rather than drop them, so they are never stranded.
    later: tuple[tuple[str, int], ...] = ()


def claim(db: Database, delivery_ids: Sequence[str], *, now_ms: int, lease_ms: int) -> Claim:
    """Take the deliveries that are free to send now; say when to look at the others again."""
    lease_until = now_ms + lease_ms
    with db.session() as session:
        taken = set(session.scalars(
            update(Delivery)
            .where(Delivery.id.in_(delivery_ids), or_(
                Delivery.status == DeliveryStatus.PENDING,
                and_(Delivery.status == DeliveryStatus.RETRYING,
                     Delivery.next_attempt_at_ms <= now_ms),
                and_(Delivery.status == DeliveryStatus.IN_FLIGHT,
                     Delivery.lease_until_ms < now_ms)))
            .values(status=DeliveryStatus.IN_FLIGHT, lease_until_ms=lease_until)
            .returning(Delivery.id)).all())
        rows = session.execute(
            select(Delivery.id, Delivery.status, Delivery.attempt_count, Delivery.ingested_at_ms,
                   Delivery.next_attempt_at_ms, Delivery.lease_until_ms, Event.payload)
            .join(Event, Event.pk == Delivery.event_pk)
            .where(Delivery.id.in_(delivery_ids))).all()
    order = {delivery_id: i for i, delivery_id in enumerate(delivery_ids)}
    claimed, later = [], []
    for row in sorted(rows, key=lambda r: order[r.id]):
        if row.id in taken:
            claimed.append(Claimed(row.id, row.payload, row.attempt_count, row.ingested_at_ms,
                                   lease_until))
        elif row.status == DeliveryStatus.IN_FLIGHT and row.lease_until_ms is not None:
            later.append((row.id, row.lease_until_ms + 1))
        elif row.status == DeliveryStatus.RETRYING and row.next_attempt_at_ms is not None:
            later.append((row.id, row.next_attempt_at_ms))
    return Claim(tuple(claimed), tuple(later))


def release_claims(db: Database, claimed: Iterable[Claimed]) -> None:
    """Hand back claims a task will not get to (its time budget ran out)."""
    with db.session() as session:
        for item in claimed:
            session.execute(
                update(Delivery)
                .where(Delivery.id == item.id, Delivery.lease_until_ms == item.lease_until_ms)
                .values(status=DeliveryStatus.PENDING, lease_until_ms=None))


@dataclass(frozen=True)
class Target:
    """A webhook as the sender needs it."""

    id: str
    url: str
    headers: Mapping[str, str]
    secrets: tuple[str, ...]
    active: bool
    sla_in_seconds: int
    max_allowed_connections: int
    options: Mapping[str, Any] = field(default_factory=dict)


def target(db: Database, vault: Vault, webhook_id: str, *, now_ms: int) -> Target:
    """The webhook ``webhook_id`` with its header values and live secrets opened."""
    with db.session() as session:
        hook = session.get(Webhook, webhook_id)
        if hook is None:
            raise NotFound(f"webhook {webhook_id} does not exist")
        live = session.scalars(
            select(SigningSecret.secret)
            .where(SigningSecret.webhook_id == webhook_id,
                   or_(SigningSecret.expires_at_ms.is_(None),
                       SigningSecret.expires_at_ms > now_ms))
            .order_by(SigningSecret.id.desc())).all()
        # The points balance also needs the org's operator-set gate, checked here too so that
        # turning the gate off stops it at once for webhooks that already ask for it.
        points_allowed = hook.available_points_balance_enrichment and bool(session.scalar(
            select(Org.available_points_balance_enrichment_enabled)
            .where(Org.id == hook.org_id)))
        options = {
            "tillDetailsEnrichmentEnabled": hook.till_details_enrichment,
            "storeDetailsEnrichmentEnabled": hook.store_details_enrichment,
            "customerIdentifiersToBeEnriched": tuple(hook.customer_identifiers_to_be_enriched or ()),
            "cardNumberEnrichmentEnabled": hook.card_number_enrichment,
            "awardedReferenceEnrichmentEnabled": hook.awarded_reference_enrichment,
            "availablePointsBalanceEnrichmentEnabled": points_allowed,
        }
        return Target(hook.id, hook.url,
                      {name: vault.open(value) for name, value in hook.headers.items()},
                      tuple(vault.open(s) for s in live), hook.active, hook.sla_in_seconds,
                      hook.max_allowed_connections, options)


@dataclass(frozen=True)
class Finished:
    """The outcome of one attempt at one claimed delivery."""

    claimed: Claimed
    started_at_ms: int
    latency_ms: int
    outcome: DeliveryStatus
    status_code: int | None = None
    error_class: str | None = None
    error_message: str | None = None
    response_excerpt: str | None = None
    next_attempt_at_ms: int | None = None
    # What was sent, when enrichment ran (None: the event as published), and what it left out.
    enriched_payload: dict[str, Any] | None = None
    enrichment_notes: str | None = None


def finish(db: Database, done: Sequence[Finished], *, sla_in_seconds: int) -> None:
    """Record attempts and move their deliveries on, in one transaction.

    A delivery whose lease was taken over meanwhile keeps its new holder's state; its attempt
    is still recorded, because it happened.
    """
    with db.session() as session:
        session.execute(insert(Attempt), [
            {"delivery_id": f.claimed.id, "number": f.claimed.attempt_count + 1,
             "started_at_ms": f.started_at_ms, "latency_ms": f.latency_ms,
             "status_code": f.status_code, "outcome": f.outcome, "error_class": f.error_class,
             "error_message": f.error_message, "response_excerpt": f.response_excerpt}
            for f in done])
        for f in done:
            ended = f.started_at_ms + f.latency_ms
            values: dict[str, Any] = {
                "status": f.outcome, "attempt_count": Delivery.attempt_count + 1,
                "lease_until_ms": None, "next_attempt_at_ms": f.next_attempt_at_ms,
                "started_at_ms": func.coalesce(Delivery.started_at_ms, f.started_at_ms),
                "last_status_code": f.status_code,
                "last_error": f.error_message,
            }
            if f.enriched_payload is not None or f.enrichment_notes is not None:
                values["enriched_payload"] = f.enriched_payload
                values["enrichment_notes"] = f.enrichment_notes
            if f.outcome in FINAL_STATUSES:
                values["ended_at_ms"] = ended
            if f.outcome == DeliveryStatus.DELIVERED and \
                    ended - f.claimed.ingested_at_ms > sla_in_seconds * 1000:
                values["sla_breach_at_ms"] = func.coalesce(
                    Delivery.sla_breach_at_ms, f.claimed.ingested_at_ms + sla_in_seconds * 1000)
            session.execute(update(Delivery).where(
                Delivery.id == f.claimed.id,
                Delivery.lease_until_ms == f.claimed.lease_until_ms).values(**values))


def open_work(db: Database) -> list[tuple[Queued, str, int | None]]:
    """Every unfinished delivery with its status and due time: what Redis must hold."""
    with db.session() as session:
        rows = session.execute(
            select(Delivery.webhook_id, Webhook.max_allowed_connections, Delivery.id,
                   Delivery.ingested_at_ms, Delivery.status, Delivery.next_attempt_at_ms)
            .join(Webhook, Webhook.id == Delivery.webhook_id)
            .where(Delivery.status.not_in(FINAL_STATUSES))).all()
    return [(Queued(r[0], r[1], r[2], r[3]), r[4], r[5]) for r in rows]


def flag_sla_breaches(db: Database, *, now_ms: int) -> int:
    """Stamp ``slaBreachTimestamp`` on deliveries not delivered within their webhook's SLA."""
    sla_ms = (select(Webhook.sla_in_seconds * 1000)
              .where(Webhook.id == Delivery.webhook_id).scalar_subquery())
    with db.session() as session:
        result = session.execute(
            update(Delivery)
            .where(Delivery.sla_breach_at_ms.is_(None),
                   Delivery.status != DeliveryStatus.DELIVERED,
                   Delivery.ingested_at_ms + sla_ms < now_ms)
            .values(sla_breach_at_ms=Delivery.ingested_at_ms + sla_ms)
            .execution_options(synchronize_session=False))
        return int(getattr(result, "rowcount", 0) or 0)


def create_org(db: Database, org_id: int, name: str, *, now_ms: int,
               parent_id: int | None = None) -> None:
    with db.session() as session:
        if session.get(Org, org_id) is not None:
            raise InvalidInput("orgId", f"org {org_id} exists already")
        session.add(Org(id=org_id, name=name, parent_id=parent_id, created_at_ms=now_ms))


def create_webhook(db: Database, catalog: EventCatalog, vault: Vault, *, org_id: int, name: str,
                   url: str, event_names: Sequence[str], now_ms: int,
                   headers: Mapping[str, str] | None = None, max_allowed_connections: int = 10,
                   sla_in_seconds: int = 3600, active: bool = True) -> tuple[str, str]:
    """Create a webhook with Python arguments; returns ``(webHookId, secret)``.

    A shorthand for ``notifier.webhooks.create``, which holds every rule. Private addresses are
    allowed here: callers (tests, tools) are trusted with their URLs.
    """
    context = webhooks.Context(db, catalog, vault, allowed_networks=_EVERY_NETWORK)
    saved = webhooks.create(context, org_id, {
        "name": name, "webHookUrl": url, "eventNames": list(event_names),
        "webHookHeaders": dict(headers or {}), "maxAllowedConnections": max_allowed_connections,
        "slaInSeconds": sla_in_seconds, "active": active}, now_ms=now_ms)
    assert saved.secret is not None
    return saved.view["webHookId"], saved.secret


_EVERY_NETWORK = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))


def replay(db: Database, delivery_ids: Sequence[str]) -> list[Queued]:
    """Make finished (or parked) deliveries pending again, keeping their ids (``webhook-id``).

    A delivery in flight is left alone: it is being sent right now.
    """
    with db.session() as session:
        known = set(session.scalars(select(Delivery.id).where(Delivery.id.in_(delivery_ids))))
        missing = [i for i in delivery_ids if i not in known]
        if missing:
            raise NotFound(f"no such delivery: {', '.join(missing)}")
        session.execute(
            update(Delivery)
            .where(Delivery.id.in_(delivery_ids), Delivery.status != DeliveryStatus.IN_FLIGHT)
            .values(status=DeliveryStatus.PENDING, next_attempt_at_ms=None, lease_until_ms=None,
                    ended_at_ms=None))
        rows = session.execute(
            select(Delivery.webhook_id, Webhook.max_allowed_connections, Delivery.id,
                   Delivery.ingested_at_ms)
            .join(Webhook, Webhook.id == Delivery.webhook_id)
            .where(Delivery.id.in_(delivery_ids),
                   Delivery.status == DeliveryStatus.PENDING)).all()
    return [Queued(*row) for row in rows]
