"""What the pipeline reads and writes in the database: the source of truth for every delivery.

Each function is one short transaction. Claims are conditional updates, so two workers handed
the same delivery (a re-queue after a lost lease, a broker redelivery) never both send it.
"""

from __future__ import annotations

import functools
import json
import math
import uuid
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    ColumnElement,
    Connection,
    Integer,
    Select,
    String,
    Text,
    Update,
    and_,
    any_,
    bindparam,
    case,
    cast,
    delete,
    func,
    insert,
    literal,
    null,
    or_,
    select,
    true,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from notifier.clock import iso_ms
from notifier.db import Database
from notifier.enrich import OPTION_COLUMNS, POINTS_BALANCE_OPTION, SOURCES_OPTION
from notifier.errors import EventTooLarge, InvalidEvent, InvalidInput, NotFound, TooLarge
from notifier.models import (
    FINAL_STATUSES,
    RESTING_STATUSES,
    Base,
    Delivery,
    DeliveryStatus,
    EventStatus,
    Org,
    SigningSecret,
    Webhook,
)
from notifier.replays import Selection
from notifier.schemas import EventCatalog
from notifier.vault import Vault

# The statements every event and delivery runs are Core over these tables: the ORM's unit of
# work was a third of a worker's time for rows that are written once and never loaded as objects.
_events = Base.metadata.tables["events"]
_deliveries = Base.metadata.tables["deliveries"]
_attempts = Base.metadata.tables["attempts"]
_webhooks = Base.metadata.tables["webhooks"]
_subscriptions = Base.metadata.tables["webhook_subscriptions"]
_orgs = Base.metadata.tables["orgs"]
_dead_letters = Base.metadata.tables["dead_letters"]
_replays = Base.metadata.tables["replays"]
_retention_cursor_table = Base.metadata.tables["retention_cursor"]
_retention_kept = Base.metadata.tables["retention_kept"]

__all__ = [
    "PURGED_PAYLOAD",
    "Breach",
    "Claim",
    "Claimed",
    "DeadLetterView",
    "Finished",
    "IngestOutcome",
    "OpenDelivery",
    "Purged",
    "Queued",
    "Refused",
    "ReplayBatch",
    "ReplayView",
    "Selected",
    "SelectionCount",
    "Target",
    "WithBreaches",
    "check_event_size",
    "claim",
    "count_selection",
    "create_org",
    "dead_letter",
    "dead_letters",
    "disable_failing",
    "event_id_of",
    "finish",
    "flag_sla_breaches",
    "hold_statement",
    "ingest_many",
    "mark_replayed",
    "new_delivery_id",
    "normalize_envelope",
    "open_work",
    "purge",
    "reject",
    "release_claims",
    "replay_batch",
    "replay_of",
    "replayable_dead_letters",
    "replays",
    "sample_selection",
    "start_replay",
    "still_claimed",
    "target",
    "targets",
    "waiting_dead_letter",
]


# The largest value of a BIGINT column (orgId, createdAt).
BIGINT_MAX = 2**63 - 1


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
    # Where a rejected event failed its checks (see InvalidEvent; None: it passed them, and the
    # database refused it), as stored. And which check failed, for logs (``error`` may quote
    # the event's values), when this sending found it.
    error_path: str | None = None
    error_rule: str | None = None


def normalize_envelope(envelope: Mapping[str, Any], now_ms: int) -> dict[str, Any]:
    """Fill in a missing ``eventId`` and ``createdAt``; check the fields idempotency rests on."""
    event = dict(envelope)
    if event.get("eventId") in (None, ""):
        event["eventId"] = str(uuid.uuid4())
    if not isinstance(event["eventId"], str) or len(event["eventId"]) > 100:
        raise InvalidEvent("$.eventId", "must be a string of at most 100 characters")
    if event.get("createdAt") is None:
        event["createdAt"] = now_ms
    if not _storable_int(event.get("orgId")):
        raise InvalidEvent("$.orgId", f"is required and must be an integer from 0 to {BIGINT_MAX}")
    return event


class Refused(dict[str, Any]):
    """An envelope refused before it is stored (one of a broker message's events past its
    bound): its naming fields only, as for an event over the size limit, and the ``problem``
    that ``ingest_many`` stores it rejected with. A mapping, so that every other path (a
    rejection for good, a dead letter, a log line) takes it as the envelope it stands for."""

    def __init__(self, envelope: Any, problem: InvalidEvent) -> None:
        super().__init__(_naming_fields(envelope) if isinstance(envelope, Mapping) else {})
        self.problem = problem


def check_event_size(envelope: Any, limit: int, field: str = "$") -> None:
    """Raise ``EventTooLarge`` naming ``field`` when ``envelope`` takes more than ``limit``
    bytes as compact JSON (``NOTIFIER_MAX_EVENT_BYTES``)."""
    size = len(json.dumps(envelope, ensure_ascii=False, separators=(",", ":"),
                          default=str).encode())
    if size > limit:
        raise EventTooLarge(field, f"is {size} bytes of JSON, over the limit of {limit} "
                                   "(NOTIFIER_MAX_EVENT_BYTES)")


def ingest_many(db: Database, catalog: EventCatalog, envelopes: Sequence[Any], *,
                now_ms: int, only_webhook: str | None = None,
                max_event_bytes: int | None = None,
                reserved: Collection[str] = ()) -> list[IngestOutcome]:
    """Store events (each once per org and eventId), validate them, and fan each out to its
    webhooks, in one transaction; the outcomes in the envelopes' order.

    ``only_webhook`` narrows the fan-out to that one webhook (a test send reaches only the
    webhook under test); by default every subscribed webhook gets each event.

    An event named in ``reserved`` (notifier's own events, when a producer publishes) is
    stored rejected, naming ``eventName``.

    Each envelope should be a mapping; anything else is stored rejected, naming the problem.
    An envelope over ``max_event_bytes`` is stored rejected with only the fields that name it
    (``check_event_size``), and so is a ``Refused`` one, with its problem.
    One transaction writes the batch, rejected envelopes included, so a batch that is retried
    after a failure stores nothing twice.

    An event is never stored without its deliveries. A second ingest of the same event changes
    nothing and returns its unfinished deliveries, so a redelivered ingest task re-queues
    whatever a crash may have left out of Redis. Events are written in (org, eventId) order,
    so two batches that share events take their row locks in the same order (no deadlock).
    """
    if not envelopes:
        return []
    outcomes: list[IngestOutcome | None] = [None] * len(envelopes)
    unusable: list[tuple[int, dict[str, Any], InvalidEvent]] = []
    keyed: list[tuple[int, dict[str, Any], dict[str, Any], InvalidEvent | None]] = []
    for index, envelope in enumerate(envelopes):
        if isinstance(envelope, Refused):
            unusable.append((index, _unusable_row(envelope, envelope.problem, now_ms),
                             envelope.problem))
            continue
        try:
            if not isinstance(envelope, Mapping):
                raise InvalidEvent("$", "must be an event envelope (a JSON object), not "
                                        f"{type(envelope).__name__}")
            if max_event_bytes is not None:
                check_event_size(envelope, max_event_bytes)
            _check_storable(envelope, "$")
            event = normalize_envelope(envelope, now_ms)
        except InvalidEvent as exc:
            unusable.append((index, _unusable_row(envelope, exc, now_ms), exc))
            continue
        invalid: InvalidEvent | None = None
        try:
            _check_finite(event, "$")
            catalog.validate(event)
            if event["eventName"] in reserved:
                raise InvalidEvent("$.eventName", f"{event['eventName']!r} is one of notifier's "
                                   "own alert events, which only notifier publishes")
        except InvalidEvent as exc:
            invalid = exc
        row = _event_row(event, invalid, now_ms)
        audience = {"org_id": event["orgId"], "event_name": row["event_name"],
                    "only_webhook": only_webhook}
        keyed.append((index, row, audience, invalid))
    keyed.sort(key=lambda item: (item[1]["org_id"], item[1]["event_id"]))
    # On PostgreSQL each event is written by one statement, atomic on its own: one event alone
    # then needs no transaction around it (one round trip instead of three).
    alone = db.is_postgresql and len(keyed) + len(unusable) == 1
    with db.autocommit() if alone else db.transaction() as connection:
        for index, row, problem in unusable:
            connection.execute(insert(_events).values(**row))
            outcomes[index] = IngestOutcome(row["event_id"], row["status"], True,
                                            row["error_message"], error_path=problem.field,
                                            error_rule=problem.rule)
        for index, row, audience, invalid in keyed:
            outcome = _insert_and_fan_out(connection, row, audience, now_ms)
            if invalid is not None and outcome.created:
                outcome = replace(outcome, error_rule=invalid.rule)
            outcomes[index] = outcome
    stored = [outcome for outcome in outcomes if outcome is not None]
    assert len(stored) == len(envelopes)  # every envelope has its outcome
    return stored


def _event_row(event: dict[str, Any], invalid: InvalidEvent | None, now_ms: int) -> dict[str, Any]:
    return {
        "event_id": event["eventId"], "event_name": str(event.get("eventName", ""))[:100],
        "org_id": event["orgId"], "ref_id": _short(event.get("refId")),
        "api_request_id": _short(event.get("apiRequestId")),
        "created_at_ms": _as_int(event.get("createdAt"), now_ms), "received_at_ms": now_ms,
        # A rejected event may hold what its column cannot (NaN): keep what can be kept.
        "payload": _scrubbed(event) if invalid else event,
        "status": EventStatus.REJECTED if invalid else EventStatus.DISPATCHED,
        "error_message": str(invalid) if invalid else None,
        "error_path": invalid.field if invalid else None}


def _insert_once(connection: Connection, row: dict[str, Any]) -> int | None:
    """Insert an event unless its (org, eventId) is stored already: one statement, no race."""
    dialect_insert = pg_insert if connection.dialect.name == "postgresql" else sqlite_insert
    statement = (dialect_insert(_events).values(**row)
                 .on_conflict_do_nothing(index_elements=["org_id", "event_id"])
                 .returning(_events.c.pk))
    pk = connection.scalar(statement)
    return None if pk is None else int(pk)


def _insert_and_fan_out(connection: Connection, row: dict[str, Any], audience: dict[str, Any],
                        now_ms: int) -> IngestOutcome:
    if connection.dialect.name == "postgresql" and row["status"] == EventStatus.DISPATCHED:
        queued = _insert_with_deliveries(connection, row, audience, now_ms)
        if queued is not None:
            return IngestOutcome(row["event_id"], row["status"], True, queued=queued)
        # Stored already: the general path below answers for it.
    pk = _insert_once(connection, row)
    if pk is None:
        existing = connection.execute(
            select(_events.c.pk, _events.c.status, _events.c.error_message,
                   _events.c.error_path)
            .where(_events.c.org_id == row["org_id"], _events.c.event_id == row["event_id"])).one()
        return IngestOutcome(row["event_id"], existing.status, False, existing.error_message,
                             _unfinished(connection, existing.pk), existing.error_path)
    if row["status"] == EventStatus.REJECTED:
        return IngestOutcome(row["event_id"], row["status"], True, row["error_message"],
                             error_path=row["error_path"])
    hooks = connection.execute(_subscribers().order_by(_webhooks.c.id), audience).all()
    made = [(Queued(hook_id, limit, new_delivery_id(), now_ms), _first_status(active),
             now_ms + sla_in_seconds * 1000)
            for hook_id, limit, active, sla_in_seconds in hooks]
    if made:
        connection.execute(insert(_deliveries), [
            {"id": q.delivery_id, "event_pk": pk, "webhook_id": q.webhook_id, "status": status,
             "attempt_count": 0, "ingested_at_ms": now_ms, "sla_due_at_ms": due}
            for q, status, due in made])
    queued = tuple(q for q, status, _ in made if status == DeliveryStatus.PENDING)
    return IngestOutcome(row["event_id"], row["status"], True, queued=queued)


def _first_status(active: bool) -> DeliveryStatus:
    """A new delivery waits in its webhook's queue, or, its webhook inactive, is held."""
    return DeliveryStatus.PENDING if active else DeliveryStatus.HELD


def _insert_with_deliveries(connection: Connection, row: dict[str, Any],
                            audience: dict[str, Any], now_ms: int) -> tuple[Queued, ...] | None:
    """PostgreSQL: ``_insert_and_fan_out`` as one statement, atomic on its own and one round
    trip instead of six. None when the event was stored already (nothing is written then)."""
    rows = connection.execute(_insert_with_deliveries_statement(), {
        **{f"event_{name}": value for name, value in row.items()}, **audience,
        "ingested_at_ms": now_ms}).all()
    if not rows:
        return None
    return tuple(sorted((Queued(r.webhook_id, r.max_allowed_connections, r.id, now_ms)
                         for r in rows if r.status == DeliveryStatus.PENDING),
                        key=lambda q: q.webhook_id))


@functools.cache
def _insert_with_deliveries_statement() -> Select[Any]:
    # Built once: building it costs more than running it. Parameters: every event column as
    # ``event_<column>``, the audience of _subscribers(), and ``ingested_at_ms``.
    event = (pg_insert(_events)
             .values({name: bindparam(f"event_{name}", type_=_events.c[name].type)
                      for name in _EVENT_COLUMNS})
             .on_conflict_do_nothing(index_elements=["org_id", "event_id"])
             .returning(_events.c.pk).cte("event"))
    hooks = _subscribers().cte("hooks")
    # The same form as new_delivery_id(): "msg_" and the 32 hex digits of a random UUID.
    delivery_id = literal("msg_") + func.replace(cast(func.gen_random_uuid(), String), "-", "")
    # _first_status() in SQL: an inactive subscriber's delivery is held, in the same statement.
    status = case((hooks.c.active, literal(DeliveryStatus.PENDING.value)),
                  else_=literal(DeliveryStatus.HELD.value))
    ingested = bindparam("ingested_at_ms", type_=BigInteger)
    made = (insert(_deliveries).from_select(
        ["id", "event_pk", "webhook_id", "status", "attempt_count", "ingested_at_ms",
         "sla_due_at_ms"],
        select(delivery_id, event.c.pk, hooks.c.id, status, literal(0), ingested,
               ingested + _sla_ms(hooks.c.sla_in_seconds))
        .select_from(event.join(hooks, true())))
        .returning(_deliveries.c.id, _deliveries.c.webhook_id, _deliveries.c.status).cte("made"))
    return (select(made.c.id, made.c.webhook_id, made.c.status, hooks.c.max_allowed_connections)
            .select_from(event.outerjoin(made, true())
                         .outerjoin(hooks, hooks.c.id == made.c.webhook_id)))


_EVENT_COLUMNS = ("event_id", "event_name", "org_id", "ref_id", "api_request_id", "created_at_ms",
                  "received_at_ms", "payload", "status", "error_message", "error_path")


def _sla_ms(sla_in_seconds: Any) -> Any:
    """A webhook's ``slaInSeconds`` in milliseconds, in SQL: in BIGINT, because the column is a
    32-bit integer and its product with 1000 overflows one (PostgreSQL: from 24.8 days)."""
    return cast(sla_in_seconds, BigInteger) * 1000


@functools.cache
def _subscribers() -> Select[Any]:
    """Webhooks subscribed to ``:event_name`` that hear the events of ``:org_id``: the org's
    own, and its parent's that listen to children (the parent found inside the query), with
    whether each is active (an inactive one holds the event); deleted ones hear nothing.
    A non-null ``:only_webhook`` narrows it to that one."""
    hooks, subscriptions = _webhooks.c, _subscriptions.c
    org_id = bindparam("org_id", type_=BigInteger)
    only = bindparam("only_webhook", type_=String)
    parent = select(_orgs.c.parent_id).where(_orgs.c.id == org_id).scalar_subquery()
    return (select(hooks.id, hooks.max_allowed_connections, hooks.active, hooks.sla_in_seconds)
            .join_from(_webhooks, _subscriptions, subscriptions.webhook_id == hooks.id)
            .where(or_(hooks.org_id == org_id,
                       and_(hooks.org_id == parent, hooks.listen_to_child_events.is_(True))),
                   hooks.deleted_at_ms.is_(None),
                   subscriptions.event_name == bindparam("event_name", type_=String),
                   or_(only.is_(None), hooks.id == only)))


def _unusable_row(envelope: Any, exc: InvalidEvent, now_ms: int) -> dict[str, Any]:
    # An envelope whose orgId or eventId is unusable cannot be keyed for idempotency; it is
    # still kept, rejected, under a fresh id, so that nothing sent to notifier is lost.
    if isinstance(exc, TooLarge) and isinstance(envelope, Mapping):
        envelope = _naming_fields(envelope)
    return _rejected_row(envelope, str(exc), exc.field, now_ms)


def _rejected_row(envelope: Any, message: str, path: str | None, now_ms: int) -> dict[str, Any]:
    kept = (_scrubbed(envelope) if isinstance(envelope, Mapping)
            else {"notAnEnvelope": _scrubbed(envelope)})
    org_id = kept.get("orgId")
    return {
        "event_id": str(uuid.uuid4()), "event_name": str(kept.get("eventName", ""))[:100],
        "org_id": org_id if _storable_int(org_id) else None, "ref_id": _short(kept.get("refId")),
        "api_request_id": _short(kept.get("apiRequestId")),
        "created_at_ms": _as_int(kept.get("createdAt"), now_ms), "received_at_ms": now_ms,
        "payload": kept, "status": EventStatus.REJECTED, "error_message": message,
        "error_path": path}


def reject(db: Database, envelope: Any, reason: str, *, now_ms: int) -> IngestOutcome:
    """Store an event whose ingest failed for good (the database refused it) as rejected, with
    ``reason``: it ends recorded instead of being retried for ever. Once per (org, eventId),
    as ``ingest_many``; an envelope that cannot be keyed is kept under a fresh id."""
    row = _rejected_row(envelope, reason, None, now_ms)
    event_id = envelope.get("eventId") if isinstance(envelope, Mapping) else None
    keyed = (isinstance(event_id, str) and 0 < len(event_id) <= 100 and not _bad_text(event_id)
             and row["org_id"] is not None)
    if keyed:
        row["event_id"] = event_id
    with db.transaction() as connection:
        if keyed and _insert_once(connection, row) is None:
            existing = connection.execute(
                select(_events.c.status, _events.c.error_message, _events.c.error_path)
                .where(_events.c.org_id == row["org_id"], _events.c.event_id == event_id)).one()
            return IngestOutcome(row["event_id"], existing.status, False, existing.error_message,
                                 error_path=existing.error_path)
        if not keyed:
            connection.execute(insert(_events).values(**row))
    return IngestOutcome(row["event_id"], row["status"], True, reason)


_NAMING_FIELDS = ("eventName", "eventId", "orgId", "createdAt", "refId", "apiRequestId")


def _naming_fields(envelope: Mapping[str, Any]) -> dict[str, Any]:
    """What names an oversized event: storing its data would be what the limit refuses."""
    return {name: envelope[name] for name in _NAMING_FIELDS
            if isinstance(envelope.get(name), str | int) and len(str(envelope[name])) <= 200}


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


def _check_finite(value: Any, path: str) -> None:
    """Refuse NaN and infinities, naming where: JSON has no such numbers (Python's parser takes
    them, PostgreSQL refuses them), so no receiver could read the event either."""
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidEvent(path, f"must be a finite number, not {_json_number(value)}")
    if isinstance(value, Mapping):
        for key, item in value.items():
            _check_finite(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_finite(item, f"{path}[{index}]")


def _json_number(value: float) -> str:
    return "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"


def _scrubbed(value: Any) -> Any:
    """``value`` with every unstorable character replaced by U+FFFD, and every non-finite
    number by its name (``"NaN"``), to keep what can be kept."""
    if isinstance(value, float) and not math.isfinite(value):
        return _json_number(value)
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


def _storable_int(value: Any) -> bool:
    """An int (not a bool) that a BIGINT column holds, and not negative."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= BIGINT_MAX


def _as_int(value: Any, default: int) -> int:
    return value if _storable_int(value) else default


def _unfinished(connection: Connection, event_pk: int) -> tuple[Queued, ...]:
    rows = connection.execute(
        select(_deliveries.c.webhook_id, _webhooks.c.max_allowed_connections, _deliveries.c.id,
               _deliveries.c.ingested_at_ms)
        .join_from(_deliveries, _webhooks, _webhooks.c.id == _deliveries.c.webhook_id)
        .where(_deliveries.c.event_pk == event_pk,
               _deliveries.c.status.not_in(RESTING_STATUSES))).all()
    return tuple(Queued(*row) for row in rows)


@dataclass(frozen=True)
class Claimed:
    """A delivery this worker now holds, with what it needs to send it."""

    id: str
    event: dict[str, Any]
    attempt_count: int
    ingested_at_ms: int
    lease_until_ms: int
    # Queued by a replay: given back, it waits behind live traffic again (the replay queue).
    replayed: bool = False
    # When it breaches its SLA, while undecided (``Delivery.sla_due_at_ms``): an attempt that
    # ends later stamps the breach, unless beat did first.
    sla_due_at_ms: int | None = None


@dataclass(frozen=True)
class Claim:
    claimed: tuple[Claimed, ...]
    # Deliveries under another claim (a live one, or one that won a race with ours): look at
    # them again when it would run out rather than drop them, so that none is stranded if its
    # holder dies. No retry: most are finished by their holder long before.
    later: tuple[tuple[str, int], ...] = ()
    # Retries not due yet: parked until they are.
    not_due: tuple[tuple[str, int], ...] = ()
    # Names this claim among all others (stored on its deliveries as ``claimed_by``): a Redis
    # rebuilt from the database counts one slot per claim, and two tasks that claim in the same
    # millisecond share an expiry, never a token.
    token: str = ""


def claim(db: Database, delivery_ids: Sequence[str], *, now_ms: int, lease_ms: int,
          held_until: int | None = None) -> Claim:
    """Take the deliveries that are free to send now; say when to look at the others again.

    ``held_until`` is the ``lease_until_ms`` of an earlier claim of the caller's (a task handed
    on or retried): deliveries still held by it are taken again at once, not parked until it
    runs out. It is the same mark ``finish`` checks, so it claims nothing of anyone else's.
    """
    lease_until = now_ms + lease_ms
    token = uuid.uuid4().hex
    params = {"ids": list(delivery_ids), "now_ms": now_ms, "new_lease_until_ms": lease_until,
              "held_until_ms": held_until, "claim_token": token}
    if db.is_postgresql:
        with db.autocommit() as connection:  # one statement, one round trip
            rows = connection.execute(_claim_statement(), params).all()
        taken = {row.id for row in rows if row.taken}
    else:
        with db.transaction() as connection:
            taken = set(connection.scalars(_take_statement(), params))
            rows = connection.execute(_claimable_statement(), params).all()
    order = {delivery_id: i for i, delivery_id in enumerate(delivery_ids)}
    claimed, later, not_due = [], [], []
    for row in sorted(rows, key=lambda r: order[r.id]):
        if row.id in taken:
            claimed.append(Claimed(row.id, row.payload, row.attempt_count, row.ingested_at_ms,
                                   lease_until, row.replay_id is not None, row.sla_due_at_ms))
        elif row.status == DeliveryStatus.IN_FLIGHT and row.lease_until_ms is not None:
            later.append((row.id, row.lease_until_ms + 1))
        elif row.status == DeliveryStatus.RETRYING and row.next_attempt_at_ms is not None:
            not_due.append((row.id, row.next_attempt_at_ms))
        elif row.status == DeliveryStatus.PENDING:
            # Pending as the statement began, yet not ours: a concurrent claim won it. Look
            # again when that claim's lease would have run out.
            later.append((row.id, lease_until + 1))
    return Claim(tuple(claimed), tuple(later), tuple(not_due), token)


@functools.cache
def _take_statement() -> Any:
    d = _deliveries.c
    now = bindparam("now_ms", type_=BigInteger)
    return (update(_deliveries)
            .where(d.id.in_(bindparam("ids", expanding=True)), or_(
                d.status == DeliveryStatus.PENDING,
                and_(d.status == DeliveryStatus.RETRYING, d.next_attempt_at_ms <= now),
                and_(d.status == DeliveryStatus.IN_FLIGHT, or_(
                    d.lease_until_ms < now,
                    d.lease_until_ms == bindparam("held_until_ms", type_=BigInteger)))))
            .values(status=DeliveryStatus.IN_FLIGHT,
                    lease_until_ms=bindparam("new_lease_until_ms", type_=BigInteger),
                    claimed_by=bindparam("claim_token"))
            .returning(d.id))


@functools.cache
def _claimable_statement() -> Any:
    d = _deliveries.c
    return (select(d.id, d.status, d.attempt_count, d.ingested_at_ms, d.next_attempt_at_ms,
                   d.lease_until_ms, d.replay_id, d.sla_due_at_ms, _events.c.payload)
            .join_from(_deliveries, _events, _events.c.pk == d.event_pk)
            .where(d.id.in_(bindparam("ids", expanding=True))))


@functools.cache
def _claim_statement() -> Any:
    # PostgreSQL: both in one statement. The select sees the rows as they were before the
    # update, which is what parking the untaken ones needs (taken ones keep their counts).
    taken = _take_statement().cte("taken")
    return _claimable_statement().add_columns(
        _deliveries.c.id.in_(select(taken.c.id)).label("taken"))


def still_claimed(db: Database, claimed: Sequence[Claimed]) -> list[Claimed]:
    """Those of ``claimed`` still held by their claim: not finished, nor taken over since."""
    if not claimed:
        return []
    d = _deliveries.c
    with db.autocommit() as connection:
        held = set(connection.scalars(select(d.id).where(
            d.id.in_([item.id for item in claimed]), d.status == DeliveryStatus.IN_FLIGHT,
            d.lease_until_ms.in_({item.lease_until_ms for item in claimed}))))
    return [item for item in claimed if item.id in held]


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
    # When it was last saved (edited, activated, deactivated): a failing streak starts no
    # earlier (see pipeline's disabling of failing webhooks).
    updated_at_ms: int = 0
    # Deleted by its org (soft): inactive, and holding nothing.
    deleted: bool = False
    # Its org: whose operations webhook hears the alerts about it (notifier.alerts).
    org_id: int = 0


@functools.cache
def _targets_statement() -> Any:
    """The webhooks with their live secrets (one row each, newest first; one row of NULL when
    one has none) and their org's points-balance gate: everything a delivery task needs, in
    one statement."""
    w = _webhooks.c
    secrets = SigningSecret.__table__.c
    gate = (select(Org.available_points_balance_enrichment_enabled)
            .where(Org.id == w.org_id).scalar_subquery())
    live = and_(secrets.webhook_id == w.id,
                or_(secrets.expires_at_ms.is_(None), secrets.expires_at_ms > bindparam("now")))
    return (select(w.id, w.org_id, w.url, w.headers, w.active, w.sla_in_seconds,
                   w.max_allowed_connections, w.updated_at_ms, w.deleted_at_ms,
                   *(w[column] for column in OPTION_COLUMNS.values()),
                   gate.label("points_allowed"), secrets.secret)
            .select_from(_webhooks.outerjoin(SigningSecret.__table__, live))
            .where(w.id.in_(bindparam("ids", expanding=True)))
            .order_by(w.id, secrets.id.desc()))


def target(db: Database, vault: Vault, webhook_id: str, *, now_ms: int) -> Target:
    """The webhook ``webhook_id`` with its header values and live secrets opened."""
    return targets(db, vault, [webhook_id], now_ms=now_ms)[webhook_id]


def targets(db: Database, vault: Vault, webhook_ids: Iterable[str], *, now_ms: int,
            faults: dict[str, Exception] | None = None) -> dict[str, Target]:
    """``target`` for several webhooks, read in one statement; by webhook id.

    With ``faults``, a webhook that cannot be made ready (deleted, or a secret that no
    configured key opens) is put there with its error instead of failing them all: one
    webhook's fault must not stall the others of its delivery task."""
    wanted = sorted(set(webhook_ids))
    if not wanted:
        return {}
    with db.autocommit() as connection:
        rows = connection.execute(_targets_statement(), {"ids": wanted, "now": now_ms}).all()
    by_hook: dict[str, list[Any]] = {}
    for row in rows:
        by_hook.setdefault(row.id, []).append(row)
    if missing := [webhook_id for webhook_id in wanted if webhook_id not in by_hook]:
        if faults is None:
            raise NotFound(f"webhook {', '.join(missing)} does not exist")
        faults.update((webhook_id, NotFound(f"webhook {webhook_id} does not exist"))
                      for webhook_id in missing)
    ready = {}
    for webhook_id, hook_rows in by_hook.items():
        try:
            ready[webhook_id] = _target(vault, hook_rows)
        except Exception as exc:
            if faults is None:
                raise
            faults[webhook_id] = exc
    return ready


def _target(vault: Vault, rows: Sequence[Any]) -> Target:
    hook = rows[0]
    # The points balance also needs the org's operator-set gate, checked here too so that
    # turning the gate off stops it at once for webhooks that already ask for it.
    options = {name: getattr(hook, column) for name, column in OPTION_COLUMNS.items()}
    options[SOURCES_OPTION] = tuple(options[SOURCES_OPTION] or ())
    options[POINTS_BALANCE_OPTION] = bool(options[POINTS_BALANCE_OPTION] and hook.points_allowed)
    return Target(hook.id, hook.url,
                  {name: vault.open(value) for name, value in (hook.headers or {}).items()},
                  tuple(vault.open(row.secret) for row in rows if row.secret is not None),
                  hook.active, hook.sla_in_seconds, hook.max_allowed_connections, options,
                  hook.updated_at_ms, hook.deleted_at_ms is not None, int(hook.org_id))


def hold_statement(webhook_id: str) -> Update:
    """What an inactive webhook would send next (deliveries waiting, or waiting to be tried
    again) is held instead. Its Redis entries are left: a claim takes nothing held, so they
    fall away as they come up."""
    deliveries = _deliveries.c  # Core: the webhooks' ORM sessions run it too
    return (update(_deliveries)
            .where(deliveries.webhook_id == webhook_id,
                   deliveries.status.in_([DeliveryStatus.PENDING, DeliveryStatus.RETRYING]))
            .values(status=DeliveryStatus.HELD))


def disable_failing(db: Database, webhook_id: str, *, reason: str, now_ms: int,
                    within: Callable[[Connection], None] | None = None) -> bool:
    """Deactivate a webhook that keeps failing, saying why; False if it was inactive already.
    ``within``, if given, runs last in the same transaction when it deactivates it (the alert
    it raises is kept with it: ``pipeline._deactivate``).

    What it cuts short (deliveries waiting, or waiting to be tried again) is held with it, not
    failed, so that activating it with deliverHeld, or one replay, brings it all back.
    """
    with db.transaction() as connection:
        result = connection.execute(
            update(_webhooks)
            .where(_webhooks.c.id == webhook_id, _webhooks.c.active.is_(True))
            .values(active=False, disabled_reason=reason, updated_at_ms=now_ms))
        if result.rowcount:
            connection.execute(hold_statement(webhook_id))
            if within is not None:
                within(connection)
    return bool(result.rowcount)


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
    # What enrichment added, when it ran (None: the event as published; see enrich.additions),
    # and what it left out.
    enrichment: dict[str, Any] | None = None
    enrichment_notes: str | None = None

    @property
    def taken_ms(self) -> int:
        """From the event's ingest to the end of this attempt."""
        return self.started_at_ms + self.latency_ms - self.claimed.ingested_at_ms

    @property
    def ended_at_ms(self) -> int:
        return self.started_at_ms + self.latency_ms

    @property
    def late(self) -> bool:
        """Whether this attempt ended past its delivery's SLA, which was undecided when it
        was claimed."""
        due = self.claimed.sla_due_at_ms
        return due is not None and self.ended_at_ms > due


@dataclass(frozen=True)
class Breach:
    """A delivery stamped as past its SLA by the statement that returned it: each is returned
    once, by the one statement that stamped it (beat's check or the late attempt's finish)."""

    delivery_id: str
    webhook_id: str
    breached_at_ms: int


# What runs last in the transaction that stamps SLA breaches, given those it stamped (the
# alerts they raise are kept with them: ``pipeline``).
WithBreaches = Callable[[Connection, Sequence[Breach]], None]


def finish(db: Database, done: Sequence[Finished],
           within: WithBreaches | None = None) -> list[Breach]:
    """Record attempts and move their deliveries on, atomically; returns the SLA breaches this
    stamped (attempts that ended past an SLA that beat had not stamped yet). ``within``, if
    given, runs last in the same transaction, given those breaches (the alerts the attempts
    raise are kept with them: ``pipeline._Ledger``).

    One transaction of a few statements whatever the number of attempts (a delivery task
    records its batch at once): the late ones' stamps, the attempts' inserts and the
    deliveries' moves, each one statement for all rows.

    A delivery whose lease was taken over meanwhile keeps its new holder's state; its attempt
    is still recorded, because it happened.
    """
    if not done:
        return []
    rows = [_finish_row(f) for f in done]
    late = [f for f in done if f.late]
    if db.is_postgresql and not late and len(rows) == 1 and within is None:
        # The attempt and its delivery's move in one statement: one round trip.
        with db.autocommit() as connection:
            connection.execute(_record_and_move_statement(), rows)
        return []
    with db.transaction() as connection:
        # Stamped before the move, while the claim still names its holder: a stale holder's
        # late attempt stamps nothing.
        breaches = ([_breach(row) for row in connection.execute(_stamp_late_statement(late))]
                    if late else [])
        if db.is_postgresql:
            connection.execute(_record_and_move_statement(), rows)
        else:
            connection.execute(_record_statement(), rows)
            connection.execute(_move_statement(), rows)
        if within is not None:
            within(connection, breaches)
    return breaches


def _finish_row(f: Finished) -> dict[str, Any]:
    ended = f.ended_at_ms
    return {
        "delivery_id": f.claimed.id, "claimed_until_ms": f.claimed.lease_until_ms,
        "number": f.claimed.attempt_count + 1, "started_at_ms": f.started_at_ms,
        "latency_ms": f.latency_ms, "status_code": f.status_code, "outcome": f.outcome,
        "error_class": f.error_class, "error_message": f.error_message,
        "response_excerpt": f.response_excerpt, "next_attempt_at_ms": f.next_attempt_at_ms,
        "ended_at_ms": ended if f.outcome in FINAL_STATUSES else None,
        # Delivered in time: the SLA is met, and the delivery leaves beat's SLA index.
        "sla_met": f.outcome == DeliveryStatus.DELIVERED and not f.late,
        # Enrichment that ran replaces what an earlier attempt recorded; none leaves it be.
        "enriched": f.enrichment is not None or f.enrichment_notes is not None,
        "enrichment": f.enrichment, "enrichment_notes": f.enrichment_notes,
    }


_ATTEMPT_COLUMNS = ("delivery_id", "number", "started_at_ms", "latency_ms", "status_code",
                    "outcome", "error_class", "error_message", "response_excerpt")


@functools.cache
def _record_statement() -> Any:
    """The attempt's insert, unless it is recorded already. Statements are built once, with
    named parameters (the keys of _finish_row()).

    An attempt is its delivery, its number and its start: a task stopped right after its
    record committed, before it could mark its attempts recorded, records them again on its way
    out (pipeline._Ledger), and that must not write them twice. Two holders' attempts of one
    delivery (a stale claim's and its successor's) share a number, never a start."""
    given = {name: bindparam(name, type_=_attempts.c[name].type) for name in _ATTEMPT_COLUMNS}
    a = _attempts.c
    recorded = select(a.id).where(a.delivery_id == given["delivery_id"],
                                  a.number == given["number"],
                                  a.started_at_ms == given["started_at_ms"])
    return insert(_attempts).from_select(
        list(_ATTEMPT_COLUMNS), select(*given.values()).where(~recorded.exists()))


@functools.cache
def _move_statement() -> Any:
    d = _deliveries.c

    def given(name: str) -> Any:
        return bindparam(name, type_=_deliveries.c[name].type)

    enriched = bindparam("enriched", type_=Boolean)
    return (update(_deliveries)
            .where(d.id == bindparam("delivery_id", type_=String),
                   d.lease_until_ms == bindparam("claimed_until_ms", type_=BigInteger))
            .values(status=bindparam("outcome", type_=String), attempt_count=d.attempt_count + 1,
                    lease_until_ms=null(), next_attempt_at_ms=given("next_attempt_at_ms"),
                    started_at_ms=func.coalesce(d.started_at_ms,
                                                bindparam("started_at_ms", type_=BigInteger)),
                    last_status_code=bindparam("status_code", type_=Integer),
                    last_error=bindparam("error_message", type_=Text),
                    ended_at_ms=func.coalesce(given("ended_at_ms"), d.ended_at_ms),
                    sla_due_at_ms=case((bindparam("sla_met", type_=Boolean), null()),
                                       else_=d.sla_due_at_ms),
                    enrichment=case((enriched, given("enrichment")), else_=d.enrichment),
                    enrichment_notes=case((enriched, given("enrichment_notes")),
                                          else_=d.enrichment_notes)))


@functools.cache
def _record_and_move_statement() -> Any:
    return _move_statement().add_cte(_record_statement().cte("attempt"))


def _stamp() -> dict[str, Any]:
    """What stamping a breach writes: its time, and the due time cleared, so that no other
    statement (conditioned on the due time) stamps or counts it again."""
    return {"sla_breach_at_ms": _deliveries.c.sla_due_at_ms, "sla_due_at_ms": null()}


def _stamped() -> tuple[Any, ...]:
    d = _deliveries.c
    return d.id, d.webhook_id, d.sla_breach_at_ms


def _breach(row: Any) -> Breach:
    return Breach(row.id, row.webhook_id, row.sla_breach_at_ms)


def _stamp_late_statement(late: Sequence[Finished]) -> Any:
    """Stamp the breaches of attempts that ended past their SLA, those whose claim still holds
    their delivery, in one statement."""
    d = _deliveries.c
    claims = [(f.claimed.id, f.claimed.lease_until_ms) for f in late]
    return (update(_deliveries)
            .where(tuple_(d.id, d.lease_until_ms).in_(claims), d.sla_due_at_ms.is_not(None))
            .values(_stamp()).returning(*_stamped()))


@dataclass(frozen=True)
class OpenDelivery:
    """An unfinished delivery, as Redis must hold it after losing its state."""

    queued: Queued
    status: str
    # When a parked retry is due.
    due_ms: int | None
    # The expiry of the claim that holds it (in flight): until then an earlier send of it may
    # still be open, and its claim counts against the webhook's cap.
    claimed_until_ms: int | None
    # That claim's token (``Claim.token``; None for a claim made before tokens were stored).
    claimed_by: str | None = None
    # The replay that queued it again, if one did: pending, it waits in the replay queue.
    replay_id: int | None = None


def open_work(db: Database) -> list[OpenDelivery]:
    """Every unfinished delivery with its status, due time and claim: what Redis must hold
    (held ones wait for their webhook's activation, out of Redis)."""
    with db.session() as session:
        rows = session.execute(
            select(Delivery.webhook_id, Webhook.max_allowed_connections, Delivery.id,
                   Delivery.ingested_at_ms, Delivery.status, Delivery.next_attempt_at_ms,
                   Delivery.lease_until_ms, Delivery.claimed_by, Delivery.replay_id)
            .join(Webhook, Webhook.id == Delivery.webhook_id)
            .where(Delivery.status.not_in(RESTING_STATUSES))).all()
    return [OpenDelivery(Queued(r[0], r[1], r[2], r[3]), *r[4:]) for r in rows]


def flag_sla_breaches(db: Database, *, now_ms: int, batch: int,
                      within: WithBreaches | None = None) -> list[Breach]:
    """Stamp ``slaBreachTimestamp`` on at most ``batch`` deliveries not delivered within their
    SLA (the earliest due first; the rest in the next call); returns those it stamped.
    ``within``, if given, runs last in the same transaction, given them (``finish``'s).

    It reads only deliveries due by ``now_ms`` from the index of undecided SLAs, and stamps
    each one whose SLA is still undecided as the update reaches it: one that its attempt
    finished meanwhile (delivered in time, or stamped late) is left as that made it.
    """
    d = _deliveries.c
    due = (select(d.id).where(d.sla_due_at_ms.is_not(None), d.sla_due_at_ms < now_ms)
           .order_by(d.sla_due_at_ms).limit(batch))
    if db.is_postgresql:
        # Rows that an attempt's finish holds are left to it (or to the next check): two
        # beats, or a beat and a busy worker, never wait on each other. Chosen once, before the
        # update (a materialized CTE), not in a subquery that PostgreSQL may run again for each
        # row it updates: each run then skipped the rows this statement had locked and stamped
        # already, and read the next ones, so one check stamped the whole backlog instead of a
        # batch (seen with a plan that statistics of a larger table chose).
        due = select(due.with_for_update(skip_locked=True).cte("due")
                     .prefix_with("MATERIALIZED").c.id)
    # Not a CTE on SQLite: its driver opens the transaction only before a statement that
    # begins with UPDATE (or INSERT, DELETE); one that began with WITH committed the stamps at
    # once, whatever failed after them in the transaction (keeping their alerts: ``within``).
    with db.transaction() as connection:
        rows = connection.execute(
            update(_deliveries)
            .where(d.id.in_(due), d.sla_due_at_ms.is_not(None))
            .values(_stamp()).returning(*_stamped())).all()
        breaches = [_breach(row) for row in rows]
        if within is not None:
            within(connection, breaches)
    return breaches


def create_org(db: Database, org_id: int, name: str, *, now_ms: int,
               parent_id: int | None = None) -> None:
    with db.session() as session:
        if session.get(Org, org_id) is not None:
            raise InvalidInput("orgId", f"org {org_id} exists already")
        session.add(Org(id=org_id, name=name, parent_id=parent_id, created_at_ms=now_ms))


def _selected(selection: Selection) -> Select[Any]:
    """The deliveries of a selection (a join of their events and webhooks), each criterion
    given one condition: the one query every replay reads, counts and pages through."""
    d, e, w = _deliveries.c, _events.c, _webhooks.c
    conditions: list[Any] = []
    if selection.delivery_ids:
        conditions.append(d.id.in_(selection.delivery_ids))
    if selection.event_id is not None:
        conditions.append(e.event_id == selection.event_id)
    if selection.webhook is not None:
        conditions.append(or_(d.webhook_id == selection.webhook,
                              w.consumer_group_id == selection.webhook))
    if selection.org_id is not None:
        conditions.append(w.org_id == selection.org_id)
    if selection.statuses:
        conditions.append(d.status.in_(selection.statuses))
    if selection.event_names:
        conditions.append(e.event_name.in_(selection.event_names))
    if selection.since_ms is not None:
        conditions.append(d.ingested_at_ms >= selection.since_ms)
    if selection.until_ms is not None:
        conditions.append(d.ingested_at_ms < selection.until_ms)
    if selection.response_status is not None:
        conditions.append(d.last_status_code.between(*selection.response_status))
    return (select(d.id)
            .join_from(_deliveries, _events, e.pk == d.event_pk)
            .join(_webhooks, w.id == d.webhook_id)
            .where(*conditions))


# Pending or in flight: queued already (by its event, a retry or an earlier replay). A replay
# leaves them be, so that the same replay run twice queues nothing twice.
_QUEUED_ALREADY = (DeliveryStatus.PENDING, DeliveryStatus.IN_FLIGHT)


@dataclass(frozen=True)
class Selected:
    """A delivery of a selection, as a replay shows it before it is made."""

    id: str
    webhook_id: str
    event_name: str
    status: str
    last_status_code: int | None
    ingested_at_ms: int

    def as_json(self) -> dict[str, Any]:
        return {"deliveryId": self.id, "webHookId": self.webhook_id,
                "eventName": self.event_name, "status": self.status,
                "lastStatusCode": self.last_status_code,
                "ingestedAt": iso_ms(self.ingested_at_ms)}


@dataclass(frozen=True)
class SelectionCount:
    """How many deliveries a selection holds; those queued already, or whose event's payload
    retention emptied (nothing left to send), are skipped by a replay; and the ids it names
    that are no delivery (of its webhook and org, if given) not found."""

    matched: int
    skipped: int
    not_found: tuple[str, ...] = ()
    # Of those skipped, the ones whose event retention emptied (the rest are queued already).
    emptied: int = 0

    @property
    def replayable(self) -> int:
        return self.matched - self.skipped


def count_selection(db: Database, selection: Selection) -> SelectionCount:
    d, e = _deliveries.c, _events.c
    emptied = e.purged_at_ms.is_not(None)
    skipped = or_(d.status.in_(_QUEUED_ALREADY), emptied)
    counted = _selected(selection).with_only_columns(
        func.count(), *(func.coalesce(func.sum(case((condition, 1), else_=0)), 0)
                        for condition in (skipped, emptied)))
    with db.autocommit() as connection:
        matched, skipped, emptied = connection.execute(counted).one()
        missing: tuple[str, ...] = ()
        if selection.delivery_ids:
            scope = Selection(delivery_ids=selection.delivery_ids, webhook=selection.webhook,
                              org_id=selection.org_id)
            known = set(connection.scalars(_selected(scope)))
            missing = tuple(i for i in dict.fromkeys(selection.delivery_ids) if i not in known)
    return SelectionCount(int(matched), int(skipped), missing, int(emptied))


def sample_selection(db: Database, selection: Selection, *, most: int) -> list[Selected]:
    """The first ``most`` deliveries of a selection, oldest first."""
    d, e = _deliveries.c, _events.c
    with db.autocommit() as connection:
        rows = connection.execute(_selected(selection).with_only_columns(
            d.id, d.webhook_id, e.event_name, d.status, d.last_status_code, d.ingested_at_ms)
            .order_by(d.ingested_at_ms, d.id).limit(most)).all()
    return [Selected(*row) for row in rows]


def start_replay(db: Database, selection: Selection, *, requested_by: str, org_id: int | None,
                 now_ms: int) -> int:
    """Record a replay about to be made (``replay_batch`` makes it); returns its id."""
    with db.autocommit() as connection:
        return int(connection.scalar(insert(_replays).values(
            created_at_ms=now_ms, requested_by=requested_by[:200], org_id=org_id,
            selection=selection.as_json(), queued=0).returning(_replays.c.id)))


def replay_batch(db: Database, replay_id: int, *, most: int, now_ms: int,
                 queue: Callable[[list[Queued]], None]) -> ReplayBatch:
    """Make the replay's next ``most`` deliveries (by id, past where it stopped) pending again,
    keeping their ids (``webhook-id``), mark them as the replay's and move its cursor past them,
    in one transaction; ``queue`` them before it commits (what it raises undoes the batch). The
    batch that finds nothing left marks the replay finished.

    Paging by id, not by status: a delivery replayed and delivered meanwhile still matches a
    replay of delivered ones, and must not be taken twice by the same replay. The cursor is the
    replay's own row, locked for the batch: whoever carries the replay on (the request that made
    it, a worker, a worker again after a crash) takes up where the last batch committed, and
    two never take the same batch.
    """
    d, r = _deliveries.c, _replays.c
    with db.transaction() as connection:
        record = connection.execute(
            select(r.selection, r.queued_after, r.finished_at_ms)
            .where(r.id == replay_id).with_for_update()).one_or_none()
        if record is None:
            raise NotFound(f"no replay {replay_id}")
        if record.finished_at_ms is not None:
            return ReplayBatch([], 0, finished=True)
        # Not one whose event's payload retention emptied (purge): nothing is left to send.
        found = connection.execute(
            _selected(Selection.from_json(record.selection))
            .with_only_columns(d.id, d.event_pk)
            .where(d.id > record.queued_after, d.status.not_in(_QUEUED_ALREADY),
                   _events.c.purged_at_ms.is_(None))
            .order_by(d.id).limit(most)).all()
        if not found:
            connection.execute(update(_replays).where(r.id == replay_id)
                               .values(finished_at_ms=now_ms))
            return ReplayBatch([], 0, finished=True)
        ids = [row.id for row in found]
        _hold_whole(connection, {row.event_pk for row in found})
        # Checked again as it is changed: a delivery queued since it was read is left alone,
        # and so is one whose event a retention run emptied since (it held the event, the
        # replay waited for its commit: this statement, after, sees it emptied).
        taken = list(connection.scalars(
            update(_deliveries)
            .where(d.id.in_(ids), d.status.not_in(_QUEUED_ALREADY),
                   select(_events.c.purged_at_ms).where(_events.c.pk == d.event_pk)
                   .scalar_subquery().is_(None))
            .values(status=DeliveryStatus.PENDING, next_attempt_at_ms=None, lease_until_ms=None,
                    ended_at_ms=None, replay_id=replay_id)
            .returning(d.id)))
        rows = connection.execute(
            select(d.webhook_id, _webhooks.c.max_allowed_connections, d.id, d.ingested_at_ms)
            .join_from(_deliveries, _webhooks, _webhooks.c.id == d.webhook_id)
            .where(d.id.in_(taken))).all() if taken else []
        queued = [Queued(*row) for row in rows]
        finished = len(ids) < most
        connection.execute(update(_replays).where(r.id == replay_id).values(
            queued=r.queued + len(taken), queued_after=ids[-1],
            finished_at_ms=now_ms if finished else None))
        if queued:
            # Their rows are locked (written) until this commits: a claim of one that Redis
            # hands out meanwhile waits for it, and finds it pending.
            queue(queued)
    return ReplayBatch(queued, len(ids), finished=finished)


def _hold_whole(connection: Connection, event_pks: Collection[int]) -> None:
    """Keep retention from emptying these events until this transaction ends, by pk order: a
    replay re-opens their deliveries, and a run must either see them re-opened or have emptied
    the event before the replay looks (see ``_empty_finished``). FOR SHARE, not FOR KEY SHARE:
    emptying an event changes no key, so its lock (FOR NO KEY UPDATE) gives way to KEY SHARE.

    On SQLite nothing: one writer at a time, and each side checks the other's change in the
    statement that writes its own."""
    if connection.dialect.name != "postgresql" or not event_pks:
        return
    e = _events.c
    connection.execute(select(e.pk).where(e.pk == any_(bindparam("pks", sorted(event_pks))))
                       .order_by(e.pk).with_for_update(read=True))


@dataclass(frozen=True)
class ReplayBatch:
    """One batch of a replay: what it queued, how many deliveries it looked at, and whether the
    replay is finished (nothing of its selection is left past it)."""

    queued: list[Queued]
    looked_at: int
    finished: bool


@dataclass(frozen=True)
class ReplayView:
    """A replay as listed, with its progress: of the deliveries it queued that are still its
    own (a later replay takes a delivery over), how many are delivered, failed (for good or
    dead) and still to go."""

    id: int
    created_at_ms: int
    requested_by: str
    org_id: int | None
    selection: dict[str, Any]
    queued: int
    # When it finished queuing (None: still queuing, its deliveries taken in batches).
    finished_at_ms: int | None
    delivered: int = 0
    failed: int = 0
    to_go: int = 0

    def as_json(self) -> dict[str, Any]:
        return {"replayId": self.id, "createdAt": iso_ms(self.created_at_ms),
                "requestedBy": self.requested_by, "orgId": self.org_id,
                "selection": self.selection, "queuing": self.finished_at_ms is None,
                "queued": self.queued,
                "delivered": self.delivered, "failed": self.failed, "toGo": self.to_go}


def replays(db: Database, *, replay_id: int | None = None, org_id: int | None = None,
            most: int = 100) -> list[ReplayView]:
    """The latest replays (of an org's keys, if given), newest first, with their progress."""
    r, d = _replays.c, _deliveries.c
    query = select(r.id, r.created_at_ms, r.requested_by, r.org_id, r.selection, r.queued,
                   r.finished_at_ms)
    if replay_id is not None:
        query = query.where(r.id == replay_id)
    if org_id is not None:
        query = query.where(r.org_id == org_id)
    with db.autocommit() as connection:
        rows = connection.execute(query.order_by(r.id.desc()).limit(most)).all()
        progress: dict[int, dict[str, int]] = defaultdict(dict)
        if rows:
            for owner, status, count in connection.execute(
                    select(d.replay_id, d.status, func.count())
                    .where(d.replay_id.in_([row.id for row in rows]))
                    .group_by(d.replay_id, d.status)):
                progress[owner][status] = int(count)
    views = []
    for row in rows:
        by_status = progress[row.id]
        failed = by_status.get(DeliveryStatus.FAILED, 0) + by_status.get(DeliveryStatus.DEAD, 0)
        delivered = by_status.get(DeliveryStatus.DELIVERED, 0)
        views.append(ReplayView(*row, delivered=delivered, failed=failed,
                                to_go=sum(by_status.values()) - delivered - failed))
    return views


def replay_of(db: Database, replay_id: int, *, org_id: int, webhook_id: str) -> ReplayView:
    """A replay an org made of one of its webhooks, with its progress; ``NotFound`` for any
    other (another org's, another webhook's)."""
    found = replays(db, replay_id=replay_id, org_id=org_id)
    if not found or found[0].selection.get("webhook") != webhook_id:
        raise NotFound(f"no replay {replay_id} of webhook {webhook_id}")
    return found[0]


# What an event's payload becomes once retention has emptied it.
PURGED_PAYLOAD = {"purged": True}
# Why a held delivery ended failed (see purge).
HELD_TOO_LONG = ("held past the retention period (NOTIFIER_RETENTION_DAYS) while its webhook was "
                 "inactive: its event is emptied, nothing is left to send")


@dataclass(frozen=True)
class Purged:
    """What one retention run emptied: events' payloads, deliveries' enrichment, attempts'
    responses and error messages. ``more``: the run was full, or found another under way:
    older events may be left."""

    events: int
    deliveries: int
    attempts: int
    more: bool
    # Held deliveries (their webhook inactive) whose event outlived the retention: ended failed,
    # with the reason, so that their events can be emptied (they could never be sent after).
    held_ended: int = 0
    # Dead letters past the retention whose envelope (a whole event) was emptied.
    dead_letters: int = 0


def _has_unfinished(event_pk: ColumnElement[int]) -> ColumnElement[bool]:
    """Whether the event ``event_pk`` has a delivery not finished yet (any status but delivered,
    failed and dead, a new one included).

    A scalar subquery, looked up for each row through the deliveries' event_pk index: written
    as EXISTS, PostgreSQL planned the walk's thousand rows as one hash of every unfinished
    delivery, a sequential scan of the whole table in each run (30 ms at 300 000 deliveries, on
    two parallel workers, growing with the table), which alone moved live p99 by a fifth."""
    d = _deliveries.c
    return (select(literal(1)).select_from(_deliveries)
            .where(d.event_pk == event_pk, d.status.not_in(FINAL_STATUSES))
            .limit(1).scalar_subquery().is_not(None))


def _among(connection: Connection, column: ColumnElement[Any],
           values: Collection[Any]) -> ColumnElement[bool]:
    """``column`` is one of ``values``: on PostgreSQL ``= ANY(array)``, one parameter whatever
    their number, so the statement's text is the same in every run (psycopg prepares it) instead
    of rendered, converted and parsed anew with a parameter per value: a retention run of 200
    took 10.3 ms of its process's CPU with three such lists, 7.7 ms with arrays."""
    if connection.dialect.name == "postgresql":
        return column == any_(bindparam(None, sorted(values)))
    return column.in_(sorted(values))


def _empty_finished(connection: Connection, event_pks: Collection[int], *,
                    now_ms: int) -> set[int]:
    """Empty the payload of those of these events whose deliveries are all finished; returns
    the pks of those emptied.

    Read in an earlier statement, a delivery could have been made pending again since (a
    replay, committed after that statement's snapshot, its worker sending the whole payload):
    the events are locked first, then their deliveries looked at again in the update, whose
    snapshot comes after the lock, so that it sees every replay committed before the lock,
    and no replay re-opens one after it (``_hold_whole`` waits for it, then finds the event
    emptied). An event that a replay holds is skipped, not waited for: kept aside, it is looked
    at again by the next runs; and retention, waiting for no event, waits for no replay, whose
    order of locks then cannot matter."""
    if not event_pks:
        return set()
    e = _events.c
    if connection.dialect.name == "postgresql":
        event_pks = list(connection.scalars(
            select(e.pk).where(_among(connection, e.pk, event_pks)).order_by(e.pk)
            .with_for_update(key_share=True, skip_locked=True)))
        if not event_pks:
            return set()
    return set(connection.scalars(
        update(_events).where(_among(connection, e.pk, event_pks), ~_has_unfinished(e.pk))
        .values(payload=PURGED_PAYLOAD, purged_at_ms=now_ms).returning(e.pk)))


def _retention_cursor(connection: Connection) -> tuple[int, int] | None:
    """Where the last run's walk stopped, ``(received_at_ms, event pk)``, locked for this run;
    None while another run holds it (a second beat, ``notifier retention run``): that run goes
    on, and this one leaves the events to it rather than waiting (saying that more may be due:
    it cannot know)."""
    c = _retention_cursor_table.c
    first = {"id": 1, "received_at_ms": -1, "event_pk": 0}
    if connection.dialect.name == "postgresql":
        locked = select(c.received_at_ms, c.event_pk).where(c.id == 1).with_for_update(
            skip_locked=True)
        if (row := connection.execute(locked).first()) is not None:
            return row.received_at_ms, row.event_pk
        # Locked by another run, or not there yet (migration 0018 writes it; the first run
        # after the tables were emptied). Inserted only then: an INSERT ... ON CONFLICT in
        # every run waited, once the run under way had moved the cursor, for that run to
        # commit, holding a prefork process beside live events for as long as its batch took.
        # (Two first runs at once still wait for each other, once.)
        if connection.execute(select(c.id).where(c.id == 1)).first() is not None:
            return None
        connection.execute(pg_insert(_retention_cursor_table).values(first)
                           .on_conflict_do_nothing(index_elements=["id"]))
        query = locked
    else:  # SQLite: one writer at a time already
        connection.execute(sqlite_insert(_retention_cursor_table).values(first)
                           .on_conflict_do_nothing(index_elements=["id"]))
        query = select(c.received_at_ms, c.event_pk).where(c.id == 1)
    row = connection.execute(query).first()
    return None if row is None else (row.received_at_ms, row.event_pk)


def purge(db: Database, *, older_than_ms: int, batch: int, now_ms: int) -> Purged:
    """Empty the events received before ``older_than_ms`` whose deliveries are all finished
    (delivered, failed, dead): the payload becomes ``PURGED_PAYLOAD``, their deliveries lose what
    enrichment added and their last error, their attempts their response excerpt and error
    message. Rows, ids, statuses, status codes and timestamps stay.

    One run walks at most ``batch`` events by age, from where the last one stopped
    (``RetentionCursor``); an event it passes with a delivery not finished, or that a replay
    is re-opening (``_empty_finished``), is kept whole, aside (``RetentionKept``), and looked at
    again by each run (at most ``batch``) until its deliveries end. Held deliveries of events
    past the retention (their webhook stayed inactive) are ended first, failed with the reason
    (``HELD_TOO_LONG``, kept), at most ``batch`` a run: held for ever, their events could never
    be emptied. Dead letters past the retention are emptied too, at most ``batch`` a run: each
    holds a whole event, replayed or not. One transaction of a few bounded statements; emptying
    changes no indexed column of events (see ``models.Event``)."""
    e, d, a, k = _events.c, _deliveries.c, _attempts.c, _retention_kept.c
    with db.transaction() as connection:
        cursor = _retention_cursor(connection)
        if cursor is None:  # another run is under way: more may be due, for the next
            return Purged(0, 0, 0, more=True)
        # Found by age through the index of the held ones alone (ingested when their event was
        # received), not among all the held: a webhook inactive for weeks holds many. The
        # status is written out, not a parameter, so that the partial index is used whichever
        # plan PostgreSQL keeps for the statement.
        is_held = d.status == literal(DeliveryStatus.HELD.value, literal_execute=True)
        held = (select(d.id).join_from(_deliveries, _events, e.pk == d.event_pk)
                .where(is_held, d.ingested_at_ms < older_than_ms,
                       e.received_at_ms < older_than_ms)
                .limit(batch))
        held_ended = connection.execute(
            # Held still as it is changed: one activated (deliverHeld) and sent since the
            # subquery read it keeps what its attempt made of it.
            update(_deliveries).where(d.id.in_(held.scalar_subquery()), is_held)
            .values(status=DeliveryStatus.FAILED, ended_at_ms=now_ms, last_error=HELD_TOO_LONG)
        ).rowcount
        dead_letters = _empty_dead_letters(connection, older_than_ms, batch, now_ms)
        # Kept aside by earlier runs, finished since, and past the retention still: raised
        # since they were passed (NOTIFIER_RETENTION_DAYS), it keeps them whole until then.
        # One emptied already (by the retention of before migration 0018, still running while
        # it was deployed) only leaves the set.
        ready = connection.execute(
            select(k.event_pk, e.purged_at_ms.is_(None).label("full"))
            .join_from(_retention_kept, _events, e.pk == k.event_pk)
            .where(e.received_at_ms < older_than_ms, ~_has_unfinished(k.event_pk))
            .order_by(k.event_pk).limit(batch)).all()
        walked = connection.execute(
            select(e.pk, e.received_at_ms, e.purged_at_ms.is_(None).label("full"),
                   _has_unfinished(e.pk).label("open"))
            .where(tuple_(e.received_at_ms, e.pk) > tuple_(*cursor),
                   e.received_at_ms < older_than_ms)
            .order_by(e.received_at_ms, e.pk).limit(batch)).all()
        if walked:
            connection.execute(update(_retention_cursor_table).values(
                received_at_ms=walked[-1].received_at_ms, event_pk=walked[-1].pk))
        due = ([row.event_pk for row in ready if row.full]
               + [row.pk for row in walked if row.full and not row.open])
        pks = _empty_finished(connection, due, now_ms=now_ms)
        # Those not emptied (a replay re-opened or is re-opening one of their deliveries) stay,
        # or are put, aside with those the walk found unfinished.
        if done := [row.event_pk for row in ready if not row.full or row.event_pk in pks]:
            connection.execute(delete(_retention_kept).where(k.event_pk.in_(done)))
        if kept := [{"event_pk": row.pk} for row in walked
                    if row.full and (row.open or row.pk not in pks)]:
            connection.execute(insert(_retention_kept), kept)
        more = batch in (len(walked), len(ready), held_ended, dead_letters)
        if not pks:
            return Purged(0, 0, 0, more=more, held_ended=held_ended, dead_letters=dead_letters)
        # Only rows that hold something to empty are written: most deliveries carry no
        # enrichment nor error, and a row rewritten to what it was costs the same as any.
        deliveries = connection.execute(
            update(_deliveries)
            .where(_among(connection, d.event_pk, pks),
                   or_(d.enrichment.is_not(None), d.enrichment_notes.is_not(None),
                       and_(d.last_error.is_not(None), d.last_error != HELD_TOO_LONG)))
            .values(enrichment=null(), enrichment_notes=None,  # null(): SQL's, not JSON's
                    last_error=case((d.last_error == HELD_TOO_LONG, d.last_error), else_=None))
        ).rowcount
        attempts = connection.execute(
            update(_attempts)
            .where(a.delivery_id.in_(select(d.id).where(_among(connection, d.event_pk, pks))),
                   or_(a.response_excerpt.is_not(None), a.error_message.is_not(None)))
            .values(response_excerpt=None, error_message=None)).rowcount
    return Purged(len(pks), deliveries, attempts, more=more, held_ended=held_ended,
                  dead_letters=dead_letters)


def _empty_dead_letters(connection: Connection, older_than_ms: int, batch: int,
                        now_ms: int) -> int:
    """Empty at most ``batch`` dead letters received before ``older_than_ms``, oldest first
    (through the partial index of those not emptied yet); returns how many."""
    dl = _dead_letters.c
    due = (select(dl.id).where(dl.purged_at_ms.is_(None), dl.received_at_ms < older_than_ms)
           .order_by(dl.received_at_ms).limit(batch))
    return connection.execute(
        update(_dead_letters).where(dl.id.in_(due.scalar_subquery()), dl.purged_at_ms.is_(None))
        .values(envelope=json.dumps(PURGED_PAYLOAD), purged_at_ms=now_ms)).rowcount


@dataclass(frozen=True)
class DeadLetterView:
    """A dead letter as listed: its id (to replay it by), the event's id, why, and when."""

    id: int
    event_id: str | None
    reason: str
    received_at_ms: int


def dead_letter(db: Database, envelopes: Sequence[Any], reason: str, *, now_ms: int) -> list[int]:
    """Keep events that could not be stored, with ``reason``; returns their dead letters' ids.

    The envelope is written as ASCII JSON text (NaN, NUL and lone surrogates escaped), so that
    this write does not fail for what the events table refused. One that names no ``eventId``
    is given one here, as ingest would: a replay sent twice is then still one event."""
    envelopes = [{**envelope, "eventId": str(uuid.uuid4())}
                 if isinstance(envelope, Mapping) and envelope.get("eventId") in (None, "")
                 else envelope for envelope in envelopes]
    rows = [{"envelope": json.dumps(envelope, ensure_ascii=True, default=repr),
             "event_id": event_id_of(envelope), "reason": reason,
             "received_at_ms": now_ms} for envelope in envelopes]
    if not rows:
        return []
    with db.transaction() as connection:
        return [int(connection.scalar(insert(_dead_letters).values(**row)
                                      .returning(_dead_letters.c.id))) for row in rows]


def event_id_of(envelope: Any) -> str | None:
    """The ``eventId`` an envelope names, storable (for logs and dead letters); None if none."""
    event_id = envelope.get("eventId") if isinstance(envelope, Mapping) else None
    return _scrubbed(event_id)[:100] if isinstance(event_id, str) else None


def dead_letters(db: Database) -> list[DeadLetterView]:
    """The dead letters waiting to be replayed (not replayed, nor emptied by retention), oldest
    first."""
    d = _dead_letters.c
    with db.autocommit() as connection:
        rows = connection.execute(select(d.id, d.event_id, d.reason, d.received_at_ms)
                                  .where(waiting_dead_letter()).order_by(d.id)).all()
    return [DeadLetterView(*row) for row in rows]


def replayable_dead_letters(db: Database, ids: Sequence[int]) -> list[tuple[int, Any]]:
    """``(id, envelope)`` of the dead letters ``ids`` waiting to be replayed; NotFound names the
    rest, and those retention emptied apart."""
    d = _dead_letters.c
    with db.autocommit() as connection:
        found = connection.execute(select(d.id, d.envelope, d.purged_at_ms).where(
            d.id.in_(list(ids)), d.replayed_at_ms.is_(None))).all()
    rows = {row.id: row.envelope for row in found if row.purged_at_ms is None}
    emptied = {row.id for row in found if row.purged_at_ms is not None}
    if missing := [str(i) for i in ids if i not in rows]:
        why = [f"no dead letter waiting to be replayed: {', '.join(missing)}"]
        if emptied:
            why.append(f"{', '.join(str(i) for i in ids if i in emptied)} emptied by retention "
                       "(NOTIFIER_RETENTION_DAYS): nothing left to replay")
        raise NotFound("; ".join(why))
    return [(i, json.loads(rows[i])) for i in ids]


def waiting_dead_letter() -> ColumnElement[bool]:
    """A dead letter still to replay: not replayed, nor emptied by retention."""
    return and_(_dead_letters.c.replayed_at_ms.is_(None), _dead_letters.c.purged_at_ms.is_(None))


def mark_replayed(db: Database, ids: Sequence[int], *, now_ms: int) -> None:
    with db.autocommit() as connection:
        connection.execute(update(_dead_letters).where(_dead_letters.c.id.in_(list(ids)))
                           .values(replayed_at_ms=now_ms))
