"""The tables: orgs, webhooks and their subscriptions and secrets, events, deliveries, attempts,
and the reference data that enrichment reads (``Ref*``).

Times are integers of epoch milliseconds (``*_ms``), as InTouch's ``createdAt``: exact, portable
between SQLite and PostgreSQL, and cheap to compare in SQL.
"""

from __future__ import annotations

import enum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Double,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy import false as sa_false
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "Alert",
    "ApiKey",
    "Attempt",
    "Base",
    "DeadLetter",
    "Delivery",
    "DeliveryStatus",
    "Event",
    "EventStatus",
    "Org",
    "RefAwardedReference",
    "RefCard",
    "RefCustomer",
    "RefCustomerIdentifiers",
    "RefPointsBalance",
    "RefStore",
    "RefTill",
    "Replay",
    "RetentionCursor",
    "RetentionKept",
    "SigningSecret",
    "UiSession",
    "Webhook",
    "WebhookSubscription",
]

JsonType = JSON().with_variant(JSONB(), "postgresql")
# SQLite only autoincrements INTEGER PRIMARY KEY, not BIGINT.
BigId = BigInteger().with_variant(Integer(), "sqlite")
# Room left in each page of events for the emptied version of its rows (retention).
EVENTS_FILLFACTOR = 80


class EventStatus(enum.StrEnum):
    RECEIVED = "received"
    REJECTED = "rejected"
    DISPATCHED = "dispatched"


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"
    IN_FLIGHT = "in_flight"
    RETRYING = "retrying"
    DELIVERED = "delivered"
    FAILED = "failed"
    DEAD = "dead"
    # Kept for an inactive webhook (deactivated by its org, or by notifier for failing too
    # long) until it is activated with deliverHeld, or replayed: never queued meanwhile.
    HELD = "held"


FINAL_STATUSES = frozenset({DeliveryStatus.DELIVERED, DeliveryStatus.FAILED, DeliveryStatus.DEAD})
# What nothing queues: the final statuses, and held (not final: it has not been sent, and ends
# nothing; an activation with deliverHeld or a replay makes it pending again).
RESTING_STATUSES = FINAL_STATUSES | {DeliveryStatus.HELD}


class Base(DeclarativeBase):
    pass


class Org(Base):
    __tablename__ = "orgs"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(200))
    parent_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("orgs.id"))
    # Set by the operator (InTouch: a support ticket), not by the org: gates that enrichment.
    available_points_balance_enrichment_enabled: Mapped[bool] = mapped_column(
        Boolean, default=False, server_default=sa_false())
    created_at_ms: Mapped[int] = mapped_column(BigInteger)
    # The org's webhook that receives notifier's own alert events about the org's webhooks
    # (notifier.alerts). No foreign key: orgs and webhooks would reference each other; the
    # save path checks it is the org's own, and a webhook gone since receives nothing.
    operations_webhook_id: Mapped[str | None] = mapped_column(String(24), nullable=True)


class ApiKey(Base):
    """An org's API key; only its SHA-256 is kept, and a short prefix to tell keys apart."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    org_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("orgs.id"), index=True)
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at_ms: Mapped[int] = mapped_column(BigInteger)
    revoked_at_ms: Mapped[int | None] = mapped_column(BigInteger)


class UiSession(Base):
    """A sign-in to the admin pages, bound to the API key it was made with: the cookie only names
    it, so revoking the key or signing out ends it at once, wherever the cookie was saved."""

    __tablename__ = "ui_sessions"

    # SHA-256 of the session id the cookie carries: the table alone cannot be replayed.
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    org_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("orgs.id"), index=True)
    api_key_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("api_keys.id"), index=True)
    created_at_ms: Mapped[int] = mapped_column(BigInteger)
    last_seen_at_ms: Mapped[int] = mapped_column(BigInteger)
    ended_at_ms: Mapped[int | None] = mapped_column(BigInteger)


class Webhook(Base):
    __tablename__ = "webhooks"
    __table_args__ = (UniqueConstraint("org_id", "name", name="uq_webhooks_org_name"),)

    id: Mapped[str] = mapped_column(String(24), primary_key=True)
    org_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("orgs.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    url: Mapped[str] = mapped_column(Text)
    headers: Mapped[dict[str, str]] = mapped_column(JsonType, default=dict)
    method_type: Mapped[str] = mapped_column(String(8), default="POST")
    webhook_type: Mapped[str] = mapped_column(String(16), default="HTTP")
    max_allowed_connections: Mapped[int] = mapped_column(Integer)
    sla_in_seconds: Mapped[int] = mapped_column(Integer, default=3600)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    # Why notifier deactivated it (NOTIFIER_DISABLE_FAILING_AFTER); cleared when it is activated
    # or deactivated by hand.
    disabled_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    # When its org deleted it (InTouch's delete is soft: it stays, inactive, with its history).
    # A deleted webhook holds nothing; an inactive one holds its events. Activating clears it.
    deleted_at_ms: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    consumer_group_id: Mapped[str] = mapped_column(String(36), unique=True)
    listen_to_child_events: Mapped[bool] = mapped_column(Boolean, default=False)
    till_details_enrichment: Mapped[bool] = mapped_column(Boolean, default=False)
    store_details_enrichment: Mapped[bool] = mapped_column(Boolean, default=False)
    customer_identifiers_to_be_enriched: Mapped[list[str]] = mapped_column(JsonType, default=list)
    card_number_enrichment: Mapped[bool] = mapped_column(Boolean, default=False)
    awarded_reference_enrichment: Mapped[bool] = mapped_column(Boolean, default=False)
    available_points_balance_enrichment: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at_ms: Mapped[int] = mapped_column(BigInteger)
    updated_at_ms: Mapped[int] = mapped_column(BigInteger)


class WebhookSubscription(Base):
    """One row per (webhook, event name): fan-out finds subscribers with one indexed join."""

    __tablename__ = "webhook_subscriptions"
    __table_args__ = (Index("ix_webhook_subscriptions_event_name", "event_name"),)

    webhook_id: Mapped[str] = mapped_column(
        String(24), ForeignKey("webhooks.id", ondelete="CASCADE"), primary_key=True)
    event_name: Mapped[str] = mapped_column(String(100), primary_key=True)


class SigningSecret(Base):
    """A webhook's ``whsec_`` secrets; during a rotation the old one lives until ``expires_at_ms``."""

    __tablename__ = "signing_secrets"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    webhook_id: Mapped[str] = mapped_column(
        String(24), ForeignKey("webhooks.id", ondelete="CASCADE"), index=True)
    secret: Mapped[str] = mapped_column(Text)  # sealed (see notifier.vault)
    created_at_ms: Mapped[int] = mapped_column(BigInteger)
    expires_at_ms: Mapped[int | None] = mapped_column(BigInteger)


class Event(Base):
    __tablename__ = "events"
    __table_args__ = (
        # Idempotency: one row per (org, eventId); another org's eventId never collides.
        UniqueConstraint("org_id", "event_id", name="uq_events_org_event_id"),
        Index("ix_events_event_id", "event_id"),
        Index("ix_events_ref_id", "ref_id"),
        Index("ix_events_api_request_id", "api_request_id"),
        Index("ix_events_org_received", "org_id", "received_at_ms"),
        # Retention's walk, from where its last run stopped (``RetentionCursor``). Not a partial
        # index of the events not emptied yet: emptying would then change an indexed column,
        # and PostgreSQL would write each emptied row anew with an entry in every index, old
        # pages and all; emptying only unindexed columns lets it rewrite the row in its page
        # (a HOT update, in the room ``fillfactor`` leaves): a quarter of the WAL.
        Index("ix_events_received", "received_at_ms", "pk"),
        {"postgresql_with": {"fillfactor": EVENTS_FILLFACTOR}},
    )

    pk: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(100))
    event_name: Mapped[str] = mapped_column(String(100))
    org_id: Mapped[int | None] = mapped_column(BigInteger)
    ref_id: Mapped[str | None] = mapped_column(String(200))
    api_request_id: Mapped[str | None] = mapped_column(String(200))
    created_at_ms: Mapped[int] = mapped_column(BigInteger)
    received_at_ms: Mapped[int] = mapped_column(BigInteger)
    payload: Mapped[dict[str, Any]] = mapped_column(JsonType)
    status: Mapped[str] = mapped_column(String(16))
    error_message: Mapped[str | None] = mapped_column(Text)
    error_path: Mapped[str | None] = mapped_column(String(500))
    # When retention replaced the payload by store.PURGED_PAYLOAD (NOTIFIER_RETENTION_DAYS).
    purged_at_ms: Mapped[int | None] = mapped_column(BigInteger)


class RetentionCursor(Base):
    """Where retention's walk of the events by age stopped: everything received before it was
    emptied, or kept aside in ``RetentionKept``. One row (id 1), missing until the first run."""

    __tablename__ = "retention_cursor"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    received_at_ms: Mapped[int] = mapped_column(BigInteger)
    event_pk: Mapped[int] = mapped_column(BigInteger)


class RetentionKept(Base):
    """Events the walk passed while one of their deliveries was unfinished: each run looks at
    them again, and empties those whose deliveries have all ended."""

    __tablename__ = "retention_kept"

    event_pk: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)


class DeadLetter(Base):
    """An event that could not be stored even as rejected, or whose ingest kept failing past
    ``NOTIFIER_INGEST_RETRY_HORIZON``: kept here with the reason, acknowledged, and replayable
    (``notifier dead-letters replay``) once the cause is fixed."""

    __tablename__ = "dead_letters"
    __table_args__ = (
        # Retention's dead letters past NOTIFIER_RETENTION_DAYS (store.purge empties them): only
        # those not emptied yet are in it, by age.
        Index("ix_dead_letters_unpurged", "received_at_ms",
              postgresql_where=text("purged_at_ms IS NULL"),
              sqlite_where=text("purged_at_ms IS NULL")),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    # The envelope as ASCII JSON text, not JSON: what the database refused to hold as JSON
    # (NaN, NUL, unpaired surrogates) is written here escaped, so that this write cannot fail
    # for the same reason.
    envelope: Mapped[str] = mapped_column(Text)
    event_id: Mapped[str | None] = mapped_column(String(100))
    reason: Mapped[str] = mapped_column(Text)
    received_at_ms: Mapped[int] = mapped_column(BigInteger)
    replayed_at_ms: Mapped[int | None] = mapped_column(BigInteger, index=True)
    # Set when retention emptied the envelope (``store.PURGED_PAYLOAD``): nothing left to replay.
    purged_at_ms: Mapped[int | None] = mapped_column(BigInteger)


class Delivery(Base):
    """One event to one webhook. ``id`` is the ``webhook-id`` header: the same on every retry."""

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("event_pk", "webhook_id", name="uq_deliveries_event_webhook"),
        Index("ix_deliveries_webhook_ingested", "webhook_id", "ingested_at_ms"),
        Index("ix_deliveries_status_next", "status", "next_attempt_at_ms"),
        # Beat's SLA check: the deliveries whose SLA is still undecided, by when they breach
        # (store.flag_sla_breaches). Only those are in it: decided ones (delivered in time, or
        # stamped) leave it, so it stays as small as the open work however long the history.
        Index("ix_deliveries_sla_due", "sla_due_at_ms",
              postgresql_where=text("sla_due_at_ms IS NOT NULL"),
              sqlite_where=text("sla_due_at_ms IS NOT NULL")),
        Index("ix_deliveries_replay", "replay_id"),
        # Retention's held deliveries past the retention (store.purge ends them): only the held
        # are in it, by age, so a run reads those it ends, not every delivery a webhook
        # inactive for weeks holds. (Ingested when their event was received.)
        Index("ix_deliveries_held_ingested", "ingested_at_ms",
              postgresql_where=text("status = 'held'"), sqlite_where=text("status = 'held'")),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    event_pk: Mapped[int] = mapped_column(BigInteger, ForeignKey("events.pk"))
    webhook_id: Mapped[str] = mapped_column(String(24), ForeignKey("webhooks.id"))
    status: Mapped[str] = mapped_column(String(16))
    attempt_count: Mapped[int] = mapped_column(Integer, default=0)
    ingested_at_ms: Mapped[int] = mapped_column(BigInteger)
    next_attempt_at_ms: Mapped[int | None] = mapped_column(BigInteger)
    lease_until_ms: Mapped[int | None] = mapped_column(BigInteger)
    # The token of the claim that last took it (``store.Claim.token``): read only while it is
    # in flight, to rebuild one connection slot per claim after Redis lost its state.
    claimed_by: Mapped[str | None] = mapped_column(String(32))
    started_at_ms: Mapped[int | None] = mapped_column(BigInteger)
    ended_at_ms: Mapped[int | None] = mapped_column(BigInteger)
    sla_breach_at_ms: Mapped[int | None] = mapped_column(BigInteger)
    # When it breaches its SLA if not delivered by then (ingested + the webhook's slaInSeconds
    # when it was ingested), while that is undecided; NULL once delivered in time, or once
    # stamped in ``sla_breach_at_ms`` (by beat, or by the attempt that ended late): clearing it
    # is what makes a breach counted once, whichever path stamps it.
    sla_due_at_ms: Mapped[int | None] = mapped_column(BigInteger)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    # What enrichment added to the event's payload (None: sent as published); the payload as
    # sent is the event's overlaid with it (notifier.enrich.overlay). And what the webhook asked
    # for that the reference data could not supply.
    enrichment: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    enrichment_notes: Mapped[str | None] = mapped_column(Text)
    # The replay that last queued it again (``Replay``): its progress is read from these rows.
    # A later replay of the same delivery takes it over.
    replay_id: Mapped[int | None] = mapped_column(BigInteger)


class Replay(Base):
    """A replay by selection: when, who asked (the OS user of the command line, the API key),
    the selection as given, and how many deliveries it queued again."""

    __tablename__ = "replays"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    created_at_ms: Mapped[int] = mapped_column(BigInteger)
    requested_by: Mapped[str] = mapped_column(String(200))
    # The org whose API key asked for it (None: the operator's command line).
    org_id: Mapped[int | None] = mapped_column(BigInteger, index=True)
    selection: Mapped[dict[str, Any]] = mapped_column(JsonType)
    queued: Mapped[int] = mapped_column(Integer, server_default="0")
    # How far it has queued (its deliveries are taken in id order, in batches): the last id of
    # its last batch, where a worker carries it on ("": from the start).
    queued_after: Mapped[str] = mapped_column(String(40), server_default="")
    # When its last batch was queued (None: still queuing).
    finished_at_ms: Mapped[int | None] = mapped_column(BigInteger)


class Alert(Base):
    """An operational alert notifier raised about a webhook (``notifier.alerts``): what the
    "Recent alerts" list shows, and, through ``key`` (unique), what makes it raised once: one
    ``slaBreached`` per webhook per minute, whose ``count`` grows with what that minute finds
    after it was sent."""

    __tablename__ = "alerts"
    __table_args__ = (
        Index("ix_alerts_org", "org_id", "id"),
        # The alerts still to send, oldest first, for beat's sweep: as small as what is unsent.
        Index("ix_alerts_unsent", "id",
              postgresql_where=text("sent_at_ms IS NULL AND send_error IS NULL"),
              sqlite_where=text("sent_at_ms IS NULL AND send_error IS NULL")),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    # With the webhook each goes to, the eventId of the alert events sent for it (key>webhook):
    # an alert sent again stores none twice.
    key: Mapped[str] = mapped_column(String(100), unique=True)
    kind: Mapped[str] = mapped_column(String(32))
    # The org that owns the webhook it is about.
    org_id: Mapped[int] = mapped_column(BigInteger)
    webhook_id: Mapped[str] = mapped_column(String(24))
    count: Mapped[int] = mapped_column(Integer, default=1)
    # The alert event's data as sent (the first delivery ids of a slaBreached, a reason).
    data: Mapped[dict[str, Any]] = mapped_column(JsonType)
    created_at_ms: Mapped[int] = mapped_column(BigInteger)
    # When its events were stored, each with its deliveries (None: still to send, by the
    # process that kept it or else by beat's sweep).
    sent_at_ms: Mapped[int | None] = mapped_column(BigInteger)
    # Why sending it was given up: a failure that trying again would only repeat.
    send_error: Mapped[str | None] = mapped_column(Text)


class Attempt(Base):
    __tablename__ = "attempts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("deliveries.id"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    started_at_ms: Mapped[int] = mapped_column(BigInteger)
    latency_ms: Mapped[int] = mapped_column(Integer)
    status_code: Mapped[int | None] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(String(16))
    error_class: Mapped[str | None] = mapped_column(String(100))
    error_message: Mapped[str | None] = mapped_column(Text)
    response_excerpt: Mapped[str | None] = mapped_column(Text)


# ---------------------------------------------------------------- reference data
# What the loyalty platform tells notifier about tills, stores, customers, cards and points, per
# org, so that enrichment can add it to payloads. notifier never invents these rows; see
# notifier.reference. No foreign keys between them: the platform sends them in any order.


class RefTill(Base):
    __tablename__ = "ref_tills"

    org_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("orgs.id"), primary_key=True)
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    code: Mapped[str | None] = mapped_column(String(200))
    name: Mapped[str | None] = mapped_column(String(200))
    store_id: Mapped[int | None] = mapped_column(BigInteger)


class RefStore(Base):
    __tablename__ = "ref_stores"

    org_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("orgs.id"), primary_key=True)
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    code: Mapped[str | None] = mapped_column(String(200))
    name: Mapped[str | None] = mapped_column(String(200))
    external_id: Mapped[str | None] = mapped_column(String(200))
    external_id1: Mapped[str | None] = mapped_column(String(200))
    external_id2: Mapped[str | None] = mapped_column(String(200))


class RefCustomer(Base):
    __tablename__ = "ref_customers"

    org_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("orgs.id"), primary_key=True)
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)


class RefCustomerIdentifiers(Base):
    """A customer's profile in one source (``InStore``, ``WeChat``, ``WebEngage``), as its
    payload block: ``{externalId, mobile, email}`` for InStore, ``{accounts: [...]}`` otherwise."""

    __tablename__ = "ref_customer_identifiers"

    org_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("orgs.id"), primary_key=True)
    customer_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    source: Mapped[str] = mapped_column(String(16), primary_key=True)
    identifiers: Mapped[dict[str, Any]] = mapped_column(JsonType)


class RefCard(Base):
    __tablename__ = "ref_cards"
    __table_args__ = (Index("ix_ref_cards_customer", "org_id", "customer_id"),)

    org_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("orgs.id"), primary_key=True)
    card_number: Mapped[str] = mapped_column(String(100), primary_key=True)
    customer_id: Mapped[int] = mapped_column(BigInteger)
    source: Mapped[str] = mapped_column(String(16))  # the source the card is linked through
    status: Mapped[str | None] = mapped_column(String(32))


class RefAwardedReference(Base):
    """The awarded reference id of one points block of one loyalty event (see notifier.reference
    for the keying)."""

    __tablename__ = "ref_awarded_references"

    org_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("orgs.id"), primary_key=True)
    loyalty_event_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    program_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    block: Mapped[str] = mapped_column(String(40), primary_key=True)
    block_index: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    awarded_reference_id: Mapped[str] = mapped_column(String(100))


class RefPointsBalance(Base):
    __tablename__ = "ref_points_balances"

    org_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("orgs.id"), primary_key=True)
    customer_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    program_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    available_points: Mapped[float] = mapped_column(Double)
