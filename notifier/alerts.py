"""Operational alerts: notifier's own events about an org's webhooks, kept and sent on.

Four kinds (schemas in ``schemas/``, group "Operations" of the catalog): ``slaBreached``
(grouped: one per webhook per minute, with a count and the first delivery ids),
``webhookDisabled`` (with the reason), ``webhookRecovered`` and ``deliveryExhausted`` (dead).

An alert is kept in the ``alerts`` table (the "Recent alerts" list) under a key that raises it
once, whichever worker or beat finds it first; then it is published as an event of the org of
each operations webhook that should hear it (the org's own, named on the org, and the
operator's, ``NOTIFIER_OPERATOR_ALERTS_WEBHOOK``), narrowed to that webhook, so that the same
pipeline delivers, signs and records it; a webhook hears the kinds it is subscribed to.

An alert kept is sent at least once. It is marked ``sent`` once its events are stored, each with
its deliveries; one that the process keeping it failed to send (the database or Redis away, the
process killed) is found by beat's sweep (``unsent``) and sent then. Its events' ids are its key
and the webhook's, so an alert sent twice stores nothing twice.

An alert never raises an alert about itself: deliveries of alert events never raise one
(``is_alert_event``), and a webhook deactivated is not sent its own ``webhookDisabled``.
Nothing here knows the pipeline; ``notifier.pipeline.raise_alerts`` publishes what this builds.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from notifier.clock import iso_ms
from notifier.db import Database
from notifier.errors import InvalidInput, NotFound
from notifier.models import Base, Org, Webhook

__all__ = [
    "DELIVERY_EXHAUSTED",
    "FIRST_IDS",
    "KINDS",
    "MINUTE_MS",
    "SLA_BREACHED",
    "WEBHOOK_DISABLED",
    "WEBHOOK_RECOVERED",
    "Alert",
    "delivery_exhausted",
    "envelopes",
    "given_up",
    "is_alert_event",
    "keep",
    "kept",
    "operations_webhook",
    "recent",
    "record",
    "sent",
    "set_operations_webhook",
    "sla_breached",
    "unsent",
    "webhook_disabled",
    "webhook_recovered",
]

SLA_BREACHED = "slaBreached"
WEBHOOK_DISABLED = "webhookDisabled"
WEBHOOK_RECOVERED = "webhookRecovered"
DELIVERY_EXHAUSTED = "deliveryExhausted"
KINDS = frozenset({SLA_BREACHED, WEBHOOK_DISABLED, WEBHOOK_RECOVERED, DELIVERY_EXHAUSTED})
# A slaBreached alert names at most this many deliveries: a flood is a count, not a list.
FIRST_IDS = 10
MINUTE_MS = 60_000

_alerts = Base.metadata.tables["alerts"]
_deliveries = Base.metadata.tables["deliveries"]
_events = Base.metadata.tables["events"]


@dataclass(frozen=True)
class Alert:
    """An alert about one webhook. ``key`` raises it once (``record``); ``data`` is its event's
    data besides the webhook and its org."""

    kind: str
    org_id: int
    webhook_id: str
    key: str
    data: Mapping[str, Any] = field(default_factory=dict)
    count: int = 1

    def event_data(self) -> dict[str, Any]:
        return {"webHookId": self.webhook_id, "orgId": self.org_id, **self.data}


def is_alert_event(event: Mapping[str, Any]) -> bool:
    """Whether an event is one of notifier's alerts: its deliveries raise no alert."""
    return event.get("eventName") in KINDS


def webhook_disabled(org_id: int, webhook_id: str, reason: str, *, now_ms: int) -> Alert:
    return Alert(WEBHOOK_DISABLED, org_id, webhook_id, f"{WEBHOOK_DISABLED}:{webhook_id}:{now_ms}",
                 {"reason": reason[:2000]})


def webhook_recovered(org_id: int, webhook_id: str, *, now_ms: int, reason: str = "") -> Alert:
    data = {"reason": reason[:2000]} if reason else {}
    return Alert(WEBHOOK_RECOVERED, org_id, webhook_id,
                 f"{WEBHOOK_RECOVERED}:{webhook_id}:{now_ms}", data)


def delivery_exhausted(org_id: int, webhook_id: str, delivery_id: str, event: Mapping[str, Any],
                       *, attempts: int, last_status_code: int | None) -> Alert:
    """A delivery dead after ``attempts``; once per delivery and attempt (a replay that dies
    again is told again)."""
    data: dict[str, Any] = {"deliveryId": delivery_id, "attempts": attempts,
                            "lastStatusCode": last_status_code}
    for name, key in (("eventId", "eventId"), ("eventName", "eventName")):
        if isinstance(event.get(key), str):
            data[name] = event[key][:100]
    return Alert(DELIVERY_EXHAUSTED, org_id, webhook_id,
                 f"{DELIVERY_EXHAUSTED}:{delivery_id}:{attempts}", data)


def sla_breached(connection: Connection, breaches: Iterable[tuple[str, str]], *,
                 now_ms: int) -> list[Alert]:
    """One ``slaBreached`` per webhook of ``breaches`` (``(webhook id, delivery id)``, as they
    were stamped), for the minute of ``now_ms``: its count and first delivery ids. Deliveries of
    alert events are left out (an alert never raises one about itself). Read on the caller's
    ``connection``: within the transaction that stamped them, to ``keep`` them with it."""
    by_hook: dict[str, list[str]] = defaultdict(list)
    for webhook_id, delivery_id in breaches:
        by_hook[webhook_id].append(delivery_id)
    if not by_hook:
        return []
    ids = [delivery_id for found in by_hook.values() for delivery_id in found]
    d, e = _deliveries.c, _events.c
    of_alerts = set(connection.scalars(
        select(d.id).join_from(_deliveries, _events, e.pk == d.event_pk)
        .where(d.id.in_(ids), e.event_name.in_(sorted(KINDS)))))
    hooks = {row.id: row for row in connection.execute(
        select(Webhook.id, Webhook.org_id, Webhook.sla_in_seconds)
        .where(Webhook.id.in_(list(by_hook))))}
    minute = now_ms - now_ms % MINUTE_MS
    made = []
    for webhook_id, found in sorted(by_hook.items()):
        found = [delivery_id for delivery_id in found if delivery_id not in of_alerts]
        hook = hooks.get(webhook_id)
        if not found or hook is None:
            continue
        made.append(Alert(SLA_BREACHED, int(hook.org_id), webhook_id,
                          f"{SLA_BREACHED}:{webhook_id}:{minute}",
                          {"count": len(found), "firstDeliveryIds": sorted(found)[:FIRST_IDS],
                           "minuteStart": minute, "slaInSeconds": int(hook.sla_in_seconds)},
                          count=len(found)))
    return made


def record(db: Database, alert: Alert, *, now_ms: int) -> bool:
    """Keep an alert; True when it is new (to be sent). See ``keep``."""
    with db.transaction() as connection:
        return keep(connection, alert, now_ms=now_ms)


def keep(connection: Connection, alert: Alert, *, now_ms: int) -> bool:
    """Keep an alert within the caller's transaction (so that it is kept if and only if what
    raised it is, e.g. a dead attempt's record); True when it is new (to be sent). The insert
    that wins the key is the only one that returns True, however many race for it. A
    ``slaBreached`` raised again under its key (the same webhook's breaches later in the same
    minute, found by this or another process) adds its count to the one kept, and, while it is
    not sent, its deliveries to the data it is sent with (a task whose records stamp a minute's
    breaches one by one sends one alert that says them all); any other alert raised again (a
    record written again, see ``store.finish``) changes nothing."""
    dialect_insert = pg_insert if connection.dialect.name == "postgresql" else sqlite_insert
    inserted = connection.scalar(
        dialect_insert(_alerts).values(
            key=alert.key, kind=alert.kind, org_id=alert.org_id, webhook_id=alert.webhook_id,
            count=alert.count, data=alert.event_data(), created_at_ms=now_ms)
        .on_conflict_do_nothing(index_elements=["key"]).returning(_alerts.c.id))
    if inserted is None and alert.kind == SLA_BREACHED:
        # The update locks the row: a merge racing for it reads the data this one writes.
        row = connection.execute(
            update(_alerts).where(_alerts.c.key == alert.key)
            .values(count=_alerts.c.count + alert.count)
            .returning(_alerts.c.count.label("times"), _alerts.c.data, _alerts.c.sent_at_ms)).one()
        if row.sent_at_ms is None:
            ids = {*row.data.get("firstDeliveryIds", ()), *alert.data.get("firstDeliveryIds", ())}
            connection.execute(update(_alerts).where(_alerts.c.key == alert.key).values(
                data={**row.data, "count": int(row.times),
                      "firstDeliveryIds": sorted(ids)[:FIRST_IDS]}))
    return inserted is not None


def kept(db: Database, keys: Iterable[str]) -> set[str]:
    """Those of ``keys`` under which an alert is kept."""
    wanted = sorted(set(keys))
    if not wanted:
        return set()
    with db.autocommit() as connection:
        return set(connection.scalars(select(_alerts.c.key).where(_alerts.c.key.in_(wanted))))


def envelopes(db: Database, alert: Alert, *, operator_webhook: str | None,
              raised_at_ms: int) -> list[tuple[dict[str, Any], str]]:
    """The events that send ``alert`` on, each with the one webhook it is for: the org's
    operations webhook and the operator's, as an event of that webhook's org (each its own
    eventId, the same each time it is built). A webhook deactivated is not sent its own
    ``webhookDisabled``. Its data is as kept (``keep``: a ``slaBreached`` raised again under
    its key before it is sent says all its breaches), else as raised."""
    with db.autocommit() as connection:
        data = connection.scalar(select(_alerts.c.data).where(_alerts.c.key == alert.key))
        named = connection.scalar(select(Org.operations_webhook_id)
                                  .where(Org.id == alert.org_id))
        wanted = [hook for hook in dict.fromkeys((named, operator_webhook)) if hook]
        if alert.kind == WEBHOOK_DISABLED:
            wanted = [hook for hook in wanted if hook != alert.webhook_id]
        owners = dict(connection.execute(select(Webhook.id, Webhook.org_id)
                                         .where(Webhook.id.in_(wanted))).all()) if wanted else {}
    return [({"eventName": alert.kind, "eventId": f"{alert.key}>{hook}",
              "orgId": int(owners[hook]), "createdAt": raised_at_ms,
              "data": alert.event_data() if data is None else data},
             hook)
            for hook in wanted if hook in owners]


def sent(db: Database, key: str, *, now_ms: int) -> None:
    """The alert's events are stored: nothing more to send of it."""
    with db.autocommit() as connection:
        connection.execute(update(_alerts).where(_alerts.c.key == key,
                                                 _alerts.c.sent_at_ms.is_(None))
                           .values(sent_at_ms=now_ms))


def given_up(db: Database, key: str, reason: str) -> None:
    """Sending the alert failed in a way that trying again would only repeat: ``reason``."""
    with db.autocommit() as connection:
        connection.execute(update(_alerts).where(_alerts.c.key == key)
                           .values(send_error=reason))


def unsent(db: Database, *, kept_before_ms: int, most: int) -> list[tuple[Alert, int]]:
    """The alerts kept before ``kept_before_ms`` and neither sent nor given up, oldest first, at
    most ``most``; each with when it was kept."""
    a = _alerts.c
    with db.autocommit() as connection:
        found = connection.execute(
            select(a.key, a.kind, a.org_id, a.webhook_id, a.count.label("times"), a.data,
                   a.created_at_ms)
            .where(a.sent_at_ms.is_(None), a.send_error.is_(None),
                   a.created_at_ms < kept_before_ms)
            .order_by(a.id).limit(most)).all()
    # ``data`` is the event's data as kept, its webhook and org with it.
    return [(Alert(row.kind, int(row.org_id), row.webhook_id, row.key, row.data, int(row.times)),
             int(row.created_at_ms)) for row in found]


def recent(db: Database, org_id: int, *, most: int = 20) -> list[dict[str, Any]]:
    """The org's latest alerts, newest first, as the UI and the API show them."""
    a = _alerts.c
    with db.autocommit() as connection:
        rows = connection.execute(
            select(a.kind, a.webhook_id, a.count.label("times"), a.data, a.created_at_ms)
            .where(a.org_id == org_id).order_by(a.id.desc()).limit(most)).all()
    return [{"kind": row.kind, "webHookId": row.webhook_id, "count": int(row.times),
             "at": iso_ms(row.created_at_ms), "data": row.data} for row in rows]


def operations_webhook(db: Database, org_id: int) -> str | None:
    with db.autocommit() as connection:
        return connection.scalar(select(Org.operations_webhook_id).where(Org.id == org_id))


def set_operations_webhook(db: Database, org_id: int, webhook_id: str | None) -> str | None:
    """Name the org's operations webhook (None: none); it must be one of the org's own that is
    not deleted. It hears the alert kinds it is subscribed to."""
    with db.transaction() as connection:
        if webhook_id is not None:
            owner = connection.execute(select(Webhook.org_id, Webhook.deleted_at_ms)
                                       .where(Webhook.id == webhook_id)).first()
            if owner is None or owner.org_id != org_id or owner.deleted_at_ms is not None:
                raise InvalidInput("webHookId", f"{webhook_id!r} is no webhook of org {org_id}")
        if not connection.execute(update(Org).where(Org.id == org_id)
                                  .values(operations_webhook_id=webhook_id)).rowcount:
            raise NotFound(f"org {org_id} does not exist")
    return webhook_id
