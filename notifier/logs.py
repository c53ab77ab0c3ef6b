"""Delivery logs, metrics and test events, as the InTouch v3 event-log and consumer-group APIs.

Who sees what: an org sees the deliveries made to its own webhooks, and its own events. A
parent org's webhook that listens to child events (``listenToChildEvents``) therefore shows the
child's events in its logs, while the child sees its event but not the parent's delivery.
Anything else does not exist for the caller (``NotFound``), as in :mod:`notifier.webhooks`.

One log record is one delivery (one event to one webhook), with InTouch's field names::

    refId, requestId, eventName, eventId, consumerGroupId, eventIngestionTimestamp,
    eventStartTimestamp, eventEndTimestamp, slaBreachTimestamp, consumerResponse,
    status, webHookId, deliveryId, attemptCount

Timestamps are ISO 8601 in UTC with milliseconds (``2025-03-05T15:43:43.549Z``) or null.
InTouch writes them in the org's time zone; notifier keeps no org time zone, and UTC with an
explicit ``Z`` parses the same way. ``consumerResponse`` is ``{statusCode, body, error}`` of the
last attempt (``body``: the first KiB of the response), or null before any attempt: InTouch
documents the field's name but not its shape.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Select, and_, case, func, literal, or_, select
from sqlalchemy.orm import Session

from notifier.clock import iso_ms
from notifier.db import Database
from notifier.enrich import overlay
from notifier.errors import InvalidEvent, InvalidInput, NotFound
from notifier.models import (
    Attempt,
    Delivery,
    DeliveryStatus,
    Event,
    EventStatus,
    Webhook,
    WebhookSubscription,
)
from notifier.schemas import EventCatalog

__all__ = [
    "DEFAULT_WINDOW_MS",
    "MAX_PAGE_SIZE",
    "SORTS",
    "consumer_group_logs",
    "consumer_group_metrics",
    "delivery_detail",
    "event_details",
    "event_log",
    "example_event",
    "iso_ms",
    "require_delivery",
    "test_event",
]

DEFAULT_WINDOW_MS = 30 * 24 * 3600 * 1000  # InTouch's logs and metrics look back 30 days
MAX_PAGE_SIZE = 200
# Epoch ms beyond this is no date (year 2255) and would overflow a BIGINT in page arithmetic.
_MAX_MS = 9_000_000_000_000
_MAX_PAGE = 1_000_000

_ingested = Delivery.ingested_at_ms
_webhook_duration = Delivery.ended_at_ms - Delivery.started_at_ms
# Unfinished deliveries have no duration: they sort last either way, on both databases
# (PostgreSQL puts NULL first when descending; SQLite puts it first when ascending).
_no_duration = case((_webhook_duration.is_(None), 1), else_=0)
SORTS: Mapping[str, tuple[Any, ...]] = {
    "ingestion:desc": (_ingested.desc(), Delivery.id.desc()),
    "ingestion:asc": (_ingested.asc(), Delivery.id.asc()),
    "webhookDuration:desc": (_no_duration, _webhook_duration.desc(), _ingested.desc(),
                             Delivery.id.desc()),
    "webhookDuration:asc": (_no_duration, _webhook_duration.asc(), _ingested.desc(),
                            Delivery.id.desc()),
    "eventType:asc": (Event.event_name.asc(), _ingested.desc(), Delivery.id.desc()),
    "eventType:desc": (Event.event_name.desc(), _ingested.desc(), Delivery.id.desc()),
}
_STATUSES = frozenset(DeliveryStatus)


def _last_excerpt() -> Any:
    return (select(Attempt.response_excerpt).where(Attempt.delivery_id == Delivery.id)
            .order_by(Attempt.id.desc()).limit(1).scalar_subquery())


def _records_query() -> Select[*tuple[Any, ...]]:
    """Deliveries with their event and webhook: the columns of one log record."""
    return (select(Event.ref_id, Event.api_request_id, Event.event_name, Event.event_id,
                   Webhook.consumer_group_id, Delivery.ingested_at_ms, Delivery.started_at_ms,
                   Delivery.ended_at_ms, Delivery.sla_breach_at_ms, Delivery.last_status_code,
                   Delivery.last_error, _last_excerpt().label("excerpt"), Delivery.status,
                   Delivery.webhook_id, Delivery.id, Delivery.attempt_count)
            .select_from(Delivery)
            .join(Event, Event.pk == Delivery.event_pk)
            .join(Webhook, Webhook.id == Delivery.webhook_id))


def _record(row: Any) -> dict[str, Any]:
    response = None
    if row.attempt_count or row.last_status_code is not None or row.last_error is not None:
        response = {"statusCode": row.last_status_code, "body": row.excerpt,
                    "error": row.last_error}
    return {
        "refId": row.ref_id,
        "requestId": row.api_request_id,
        "eventName": row.event_name,
        "eventId": row.event_id,
        "consumerGroupId": row.consumer_group_id,
        "eventIngestionTimestamp": iso_ms(row.ingested_at_ms),
        "eventStartTimestamp": iso_ms(row.started_at_ms),
        "eventEndTimestamp": iso_ms(row.ended_at_ms),
        "slaBreachTimestamp": iso_ms(row.sla_breach_at_ms),
        "consumerResponse": response,
        "status": row.status,
        "webHookId": row.webhook_id,
        "deliveryId": row.id,
        "attemptCount": row.attempt_count,
    }


def _event_only_record(event: Event) -> dict[str, Any]:
    """An event of the caller's with no delivery to the caller's webhooks.

    ``status`` is the event's own: ``rejected`` (with the validator's message as the error) or
    ``dispatched`` (accepted, but no active webhook of the org was subscribed to it).
    """
    response = None
    if event.status == EventStatus.REJECTED:
        response = {"statusCode": None, "body": None, "error": event.error_message}
    return {
        "refId": event.ref_id, "requestId": event.api_request_id, "eventName": event.event_name,
        "eventId": event.event_id, "consumerGroupId": None,
        "eventIngestionTimestamp": iso_ms(event.received_at_ms), "eventStartTimestamp": None,
        "eventEndTimestamp": None, "slaBreachTimestamp": None, "consumerResponse": response,
        "status": event.status, "webHookId": None, "deliveryId": None, "attemptCount": 0,
    }


def _usable_text(value: str) -> bool:
    # PostgreSQL text cannot hold NUL: such an id or key can match nothing, so say so early
    # rather than let the driver fail.
    return "\x00" not in value and not any("\ud800" <= c <= "\udfff" for c in value)


def event_log(db: Database, org_id: int, *, event_id: str | None = None,
              ref_id: str | None = None, request_id: str | None = None) -> list[dict[str, Any]]:
    """The log records of the events with this eventId, refId or apiRequestId (give one).

    One record per delivery to the caller's webhooks, oldest first; an event of the caller's
    that has none gets one record of its own. Nothing visible: ``NotFound``.
    """
    given = [(name, value) for name, value in
             (("eventId", event_id), ("refId", ref_id), ("requestId", request_id))
             if value is not None]
    if len(given) != 1:
        raise ValueError("give exactly one of event_id, ref_id, request_id")
    ((name, value),) = given
    column = {"eventId": Event.event_id, "refId": Event.ref_id,
              "requestId": Event.api_request_id}[name]
    if not _usable_text(value):
        raise NotFound(f"{name} {value!r} does not exist")
    with db.session() as session:
        rows = session.execute(
            _records_query().where(column == value, Webhook.org_id == org_id)
            .order_by(Delivery.ingested_at_ms, Event.pk, Delivery.webhook_id)).all()
        records = [_record(row) for row in rows]
        seen = {record["eventId"] for record in records}
        own = session.scalars(select(Event).where(column == value, Event.org_id == org_id)
                              .order_by(Event.received_at_ms, Event.pk)).all()
        records += [_event_only_record(event) for event in own if event.event_id not in seen]
    if not records:
        raise NotFound(f"{name} {value!r} does not exist")
    return records


def _webhook_of_group(session: Session, org_id: int, consumer_group_id: str) -> Webhook:
    hook = None
    if _usable_text(consumer_group_id):
        hook = session.scalar(select(Webhook).where(
            Webhook.consumer_group_id == consumer_group_id))
    if hook is None or hook.org_id != org_id:
        raise NotFound(f"consumerGroupId {consumer_group_id} is invalid")
    return hook


def _window(start_ms: int | None, end_ms: int | None, now_ms: int) -> tuple[int, int]:
    """``[startDate, endDate]`` in epoch ms; by default the last 30 days."""
    for name, value in (("startDate", start_ms), ("endDate", end_ms)):
        if value is not None and not 0 <= value <= _MAX_MS:
            raise InvalidInput(name, "must be epoch milliseconds")
    end = now_ms if end_ms is None else end_ms
    start = end - DEFAULT_WINDOW_MS if start_ms is None else start_ms
    if start > end:
        raise InvalidInput("endDate", "must not be before startDate")
    return max(start, 0), end


def _statuses(status: str | None) -> list[str]:
    if status is None:
        return []
    wanted = [s.strip().lower() for s in status.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in _STATUSES]
    if unknown or not wanted:
        raise InvalidInput("status", f"must be one or more (comma-separated) of "
                                     f"{', '.join(sorted(_STATUSES))}")
    return wanted


def _search(key: str) -> Any:
    """The event's ids, its ``eventSearchKey``, or its customer id; in SQL on both databases.

    The JSON paths compile to ``#>>`` on PostgreSQL and ``JSON_EXTRACT`` on SQLite, cast to
    text so that a numeric customerId matches its digits. They are not indexed: the search is
    bounded by the webhook and the date window, which are.
    """
    payload = Event.payload
    return or_(Event.ref_id == key, Event.api_request_id == key, Event.event_id == key,
               payload[("eventSearchKey",)].as_string() == key,
               payload[("data", "customerIdentifiers", "customerId")].as_string() == key)


def consumer_group_logs(db: Database, org_id: int, consumer_group_id: str, *, now_ms: int,
                        page: int = 0, size: int = 20, event_type: str | None = None,
                        status: str | None = None, start_ms: int | None = None,
                        end_ms: int | None = None, search_key: str | None = None,
                        sort: str | None = None, sla_breached: bool | None = None
                        ) -> dict[str, Any]:
    """One page (0-based, as Spring's ``Page``) of a webhook's delivery records.

    Filters combine with AND: ``eventType`` (event name), ``status`` (one or more delivery
    statuses, comma-separated), the ingestion window (default the last 30 days),
    ``eventSearchKey`` and ``slaBreached`` (true: those with a ``slaBreachTimestamp`` only;
    false: those without). Errors name the query parameter (``sortBy``, ``size``, ...).
    """
    if not 1 <= size <= MAX_PAGE_SIZE:
        raise InvalidInput("size", f"must be between 1 and {MAX_PAGE_SIZE}")
    if not 0 <= page <= _MAX_PAGE:
        raise InvalidInput("page", f"must be between 0 and {_MAX_PAGE} (pages count from 0)")
    order = SORTS.get(sort or "ingestion:desc")
    if order is None:
        raise InvalidInput("sortBy", f"must be one of {', '.join(SORTS)}")
    statuses = _statuses(status)
    start, end = _window(start_ms, end_ms, now_ms)
    for name, text in (("eventType", event_type), ("eventSearchKey", search_key)):
        if text is not None and not _usable_text(text):
            raise InvalidInput(name, "contains a NUL character or an unpaired surrogate")
    with db.session() as session:
        hook = _webhook_of_group(session, org_id, consumer_group_id)
        conditions = [Delivery.webhook_id == hook.id, Delivery.ingested_at_ms >= start,
                      Delivery.ingested_at_ms <= end]
        if statuses:
            conditions.append(Delivery.status.in_(statuses))
        if event_type:
            conditions.append(Event.event_name == event_type)
        if search_key:
            conditions.append(_search(search_key))
        if sla_breached is not None:
            stamped = Delivery.sla_breach_at_ms
            conditions.append(stamped.is_not(None) if sla_breached else stamped.is_(None))
        total = session.scalar(
            select(func.count()).select_from(Delivery)
            .join(Event, Event.pk == Delivery.event_pk).where(*conditions)) or 0
        rows = session.execute(_records_query().where(*conditions).order_by(*order)
                               .limit(size).offset(page * size)).all()
    return {"content": [_record(row) for row in rows], "page": page, "size": size,
            "totalElements": total, "totalPages": math.ceil(total / size)}


def _count(*statuses: str) -> Any:
    return func.coalesce(func.sum(case((Delivery.status.in_(statuses), 1), else_=0)), 0)


def consumer_group_metrics(db: Database, org_id: int, consumer_group_id: str, *, now_ms: int,
                           start_ms: int | None = None, end_ms: int | None = None
                           ) -> dict[str, Any]:
    """Counts by state and the mean delivery time (ingested to delivered, ms) in the window.

    ``failedEvents`` counts failed for good and dead (retries exhausted); ``pendingEvents``
    counts those waiting for a slot and those being sent right now; ``heldEvents`` those held
    for the webhook while inactive (not failed: never tried while it was).
    ``slaBreachedEvents`` counts those not delivered within the SLA (stamped with a
    ``slaBreachTimestamp``), ``slaMetEvents`` those delivered within it, and ``slaMetPercent``
    is the share of these decided ones that met it (null while none is decided: a delivery
    still on its way within its SLA counts in neither).
    """
    start, end = _window(start_ms, end_ms, now_ms)
    with db.session() as session:
        hook = _webhook_of_group(session, org_id, consumer_group_id)
        delivered = Delivery.status == DeliveryStatus.DELIVERED
        row = session.execute(
            select(func.count().label("total"),
                   _count(DeliveryStatus.DELIVERED).label("delivered"),
                   _count(DeliveryStatus.FAILED, DeliveryStatus.DEAD).label("failed"),
                   _count(DeliveryStatus.RETRYING).label("retrying"),
                   _count(DeliveryStatus.PENDING, DeliveryStatus.IN_FLIGHT).label("pending"),
                   _count(DeliveryStatus.HELD).label("held"),
                   func.count(Delivery.sla_breach_at_ms).label("breached"),
                   func.coalesce(func.sum(case(
                       (and_(delivered, Delivery.sla_breach_at_ms.is_(None)), 1), else_=0)),
                       0).label("met"),
                   func.avg(case((delivered, Delivery.ended_at_ms - Delivery.ingested_at_ms),
                                 else_=literal(None))).label("average"))
            .where(Delivery.webhook_id == hook.id, Delivery.ingested_at_ms >= start,
                   Delivery.ingested_at_ms <= end)).one()
    return {"totalEvents": int(row.total), "deliveredEvents": int(row.delivered),
            "failedEvents": int(row.failed), "retryingEvents": int(row.retrying),
            "pendingEvents": int(row.pending), "heldEvents": int(row.held),
            "averageDeliveryTime": 0 if row.average is None else round(float(row.average)),
            "slaBreachedEvents": int(row.breached), "slaMetEvents": int(row.met),
            "slaMetPercent": _percent(int(row.met), int(row.met) + int(row.breached)),
            "startDate": start, "endDate": end}


def _percent(part: int, whole: int) -> float | None:
    return round(100 * part / whole, 2) if whole else None


def _owned(session: Session, org_id: int | None, delivery_id: str) -> Any:
    """The delivery's record row, if it went to one of ``org_id``'s webhooks (None: the
    operator's command line, which sees every org's)."""
    row = None
    if _usable_text(delivery_id):
        row = session.execute(_records_query().add_columns(Event.payload, Webhook.org_id)
                              .where(Delivery.id == delivery_id)).first()
    if row is None or (org_id is not None and row.org_id != org_id):
        raise NotFound(f"deliveryId {delivery_id} is invalid")
    return row


def require_delivery(db: Database, org_id: int, delivery_id: str) -> None:
    """``NotFound`` unless the delivery went to one of the org's webhooks."""
    with db.session() as session:
        _owned(session, org_id, delivery_id)


def delivery_detail(db: Database, org_id: int | None, delivery_id: str) -> dict[str, Any]:
    """A delivery's log record with every attempt, and the payload before and after enrichment.

    ``org_id`` None: whichever org's it is (the operator's command line)."""
    with db.session() as session:
        row = _owned(session, org_id, delivery_id)
        attempts = session.scalars(select(Attempt).where(Attempt.delivery_id == delivery_id)
                                   .order_by(Attempt.id)).all()
        delivery = session.get(Delivery, delivery_id)
        assert delivery is not None  # _owned found it
        # No enriched payload is kept for a webhook that asks for no enrichment: what went out
        # is the event as published.
        added, notes = delivery.enrichment, delivery.enrichment_notes
    detail = _record(row)
    detail["attempts"] = [
        {"number": a.number, "startedAt": iso_ms(a.started_at_ms), "latencyMs": a.latency_ms,
         "statusCode": a.status_code, "outcome": a.outcome, "errorClass": a.error_class,
         "errorMessage": a.error_message, "responseExcerpt": a.response_excerpt}
        for a in attempts]
    detail["originalPayload"] = row.payload
    detail["deliveredPayload"] = row.payload if added is None else overlay(row.payload, added)
    detail["enrichmentNotes"] = notes
    return detail


def event_details(db: Database, event_id: str, org_id: int | None = None
                  ) -> list[dict[str, Any]]:
    """Every stored event with this eventId (of ``org_id`` only, if given; an eventId is
    unique per org), oldest first, each with its status, why it was rejected (``error``, and
    ``errorPath`` where in the event), and every delivery of it, to any org's webhook."""
    if not _usable_text(event_id):
        return []
    with db.session() as session:
        query = select(Event).where(Event.event_id == event_id)
        if org_id is not None:
            query = query.where(Event.org_id == org_id)
        events = session.scalars(query.order_by(Event.received_at_ms, Event.pk)).all()
        deliveries = session.execute(
            select(Delivery.event_pk, Delivery.id, Delivery.webhook_id, Delivery.status,
                   Delivery.attempt_count)
            .where(Delivery.event_pk.in_([event.pk for event in events]))
            .order_by(Delivery.ingested_at_ms, Delivery.webhook_id)).all()
    return [{"eventId": event.event_id, "eventName": event.event_name, "orgId": event.org_id,
             "status": event.status, "eventIngestionTimestamp": iso_ms(event.received_at_ms),
             "error": event.error_message, "errorPath": event.error_path,
             "deliveries": [{"deliveryId": d.id, "webHookId": d.webhook_id, "status": d.status,
                             "attemptCount": d.attempt_count}
                            for d in deliveries if d.event_pk == event.pk]}
            for event in events]


# ---------------------------------------------------------------- test events

_EXAMPLES = {"string": "example", "integer": 1, "number": 1.0, "boolean": False, "null": None}


def _combine(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """One schema that asks what both ask (enough of ``allOf`` for examples): required names
    add up, properties of the same name combine, other keywords of ``second`` win."""
    combined = {**first, **second}
    combined["required"] = list(dict.fromkeys([*first.get("required", ()),
                                               *second.get("required", ())]))
    properties = dict(first.get("properties", {}))
    for name, schema in second.get("properties", {}).items():
        properties[name] = _combine(_flat(properties[name]), _flat(schema)) \
            if name in properties else schema
    combined["properties"] = properties
    return combined


def _flat(schema: Any) -> dict[str, Any]:
    """``schema`` with its ``allOf`` (and the first ``oneOf``/``anyOf`` choice) folded in."""
    if not isinstance(schema, dict):
        return {}
    flat: dict[str, Any] = {k: v for k, v in schema.items()
                            if k not in ("allOf", "oneOf", "anyOf")}
    parts = [*schema.get("allOf", ()),
             *(schema[k][0] for k in ("oneOf", "anyOf") if schema.get(k))]
    for part in parts:
        flat = _combine(_flat(part), flat)
    return flat


def _example(schema: Any, *, every: bool = False) -> Any:
    """The smallest value of ``schema`` with every required property filled in; with ``every``,
    every property it names, and an item in each array (the tests' fullest events)."""
    schema = _flat(schema)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    if "default" in schema:
        return schema["default"]
    return _example_of_type(schema, every)


def _example_of_type(schema: dict[str, Any], every: bool) -> Any:
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if schema.get("properties") or schema.get("required") else None
    if kind == "object":
        properties = schema.get("properties", {})
        names = properties if every else schema.get("required", ())
        return {name: _example(properties.get(name, {}), every=every) for name in names}
    if kind == "array":
        items = max(schema.get("minItems", 0), every)
        return [_example(schema.get("items", {}), every=every) for _ in range(items)]
    if kind == "string":
        text = "example".ljust(schema.get("minLength", 0), "x")
        return text[:schema["maxLength"]] if "maxLength" in schema else text
    if kind in ("integer", "number"):
        low, high = schema.get("minimum"), schema.get("maximum")
        number = _EXAMPLES[kind]
        if low is not None and number < low:
            number = low
        if high is not None and number > high:
            number = high
        return number
    return _EXAMPLES.get(kind) if isinstance(kind, str) else None


def example_event(catalog: EventCatalog, event_name: str) -> dict[str, Any]:
    """A minimal event of ``event_name`` that its schema accepts (``InvalidEvent`` otherwise).

    Built from the resolved schema: required properties only, filled by type (``"example"``,
    1, 1.0, false, [], objects recursively), with ``const``, ``enum`` and ``default`` first.
    """
    example = _example(catalog.resolved(event_name))
    if not isinstance(example, dict):
        raise InvalidEvent("$", f"the schema of {event_name} does not describe an object")
    example["eventName"] = event_name
    catalog.validate(example)
    return example


def test_event(db: Database, catalog: EventCatalog, org_id: int, webhook_id: str,
               event_name: str | None, *, event_id: str, now_ms: int) -> dict[str, Any]:
    """The example event a test send of the webhook publishes, for the org, as ``event_id``.

    The name must be one the webhook is subscribed to (default: the first of them): a receiver
    gets only what it asked for, and the normal fan-out needs the subscription.
    """
    with db.session() as session:
        hook = session.get(Webhook, webhook_id) if _usable_text(webhook_id) else None
        if hook is None or hook.org_id != org_id:
            raise NotFound(f"webHookId {webhook_id} is invalid")
        if not hook.active:
            raise InvalidInput("webHookId", "is inactive; activate it to send a test event")
        names = sorted(session.scalars(select(WebhookSubscription.event_name).where(
            WebhookSubscription.webhook_id == webhook_id)))
    name = names[0] if event_name is None and names else event_name
    if name not in names:
        raise InvalidInput("eventName", f"the webhook is not subscribed to {name!r}; "
                                        f"use one of {', '.join(names)}")
    event = example_event(catalog, str(name))
    event.update(eventId=event_id, orgId=org_id, createdAt=now_ms)
    return event

