"""The one way to save a webhook: the API, the admin pages and the CLI all create, update,
activate and deactivate webhooks here, with InTouch v3 ``webHooks`` fields in and out.

Every check names the InTouch field it is about (``maxAllowedConnections must be greater than
zero``), so an existing InTouch client gets errors it understands, and every input is bounded
(header count and size, number ranges). Header values and signing secrets are sealed at rest
and only ever shown masked; the secret is shown once, at creation and at rotation. A header
value sent back as its mask means "keep the stored value", so a webhook read and written back
loses nothing. A saved connection limit holds at once (``Context.limit_changed``).

An inactive webhook holds its events (``held`` deliveries, never queued); deactivating it holds
what waits to be sent, and activating it with ``deliverHeld`` sends what it holds, in the order
they were ingested (``Context.deliver``). A deleted one (soft, as InTouch's) holds nothing.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from notifier import store
from notifier.clock import iso_ms
from notifier.db import Database
from notifier.enrich import (
    OPTION_COLUMNS,
    OPTION_FIELDS,
    POINTS_BALANCE_OPTION,
    SOURCES_OPTION,
    check_options,
)
from notifier.errors import DestinationNotAllowed, InvalidInput, NotFound, TransientError
from notifier.models import (
    Delivery,
    DeliveryStatus,
    Org,
    SigningSecret,
    Webhook,
    WebhookSubscription,
)
from notifier.reference import source_name
from notifier.schemas import EventCatalog
from notifier.sender import check_destination
from notifier.signing import new_secret
from notifier.vault import Vault, mask

__all__ = ["FLAGS", "MAX_OVERLAP_SECONDS", "MAX_SLA_SECONDS", "MAX_URL_CHARS", "Bounds",
           "Context", "Saved", "activate", "create", "deactivate", "delete_webhook", "get",
           "list_all", "list_by_org", "rotate_secret", "update_webhook"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# InTouch flag name -> column: the enrichment switches (all of enrich.OPTION_COLUMNS but the
# list of sources) and the webhook's own.
FLAGS = {
    **{name: column for name, column in OPTION_COLUMNS.items() if name != SOURCES_OPTION},
    "listenToChildEvents": "listen_to_child_events",
    "active": "active",
}
_SOURCES_COLUMN = OPTION_COLUMNS[SOURCES_OPTION]
# Headers notifier sets itself; a webhook may not set them (Content-Type it may, to the same).
_RESERVED = {"host", "content-length", "transfer-encoding", "connection"}
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# RFC 9110's field-value (visible ASCII, space, tab, obs-text): http.client refuses a character
# past Latin-1 at send time, so each delivery would fail instead of the save.
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
_KNOWN = {"name", "webHookUrl", "webHookHeaders", "eventNames", "maxAllowedConnections",
          "slaInSeconds", "methodType", "webHookType", SOURCES_OPTION, "deliverHeld", *FLAGS}
# Read-only or not (yet) supported InTouch fields a client may send back: ignored, with a warning.
_IGNORED = {"webHookId", "consumerGroupId", "attribution", "noOfRetryAttempts", "neoEnrichment",
            "possibleValues", "orgId", "disabledReason", "circuitBreaker"}
DEFAULT_SLA_SECONDS = 3600
ROTATION_OVERLAP_SECONDS = 24 * 3600
# What the column holds (a 32-bit integer, 68 years); the fan-out multiplies it into a
# delivery's due time in 64 bits (store._sla_ms), so no allowed value can overflow there.
MAX_SLA_SECONDS = 2**31 - 1
# What browsers and proxies reliably carry; the URL is also shown in every log line of it.
MAX_URL_CHARS = 2048
# A rotated-out secret that keeps signing for longer than this is not rotated out.
MAX_OVERLAP_SECONDS = 30 * 24 * 3600
# What mask() makes: four stars and at most the value's last four characters.
_MASKED = re.compile(r"^\*{4}.{0,4}$", re.DOTALL)


@dataclass(frozen=True)
class Bounds:
    """How much one webhook may ask for (settings ``NOTIFIER_WEBHOOK_MAX_HEADERS``,
    ``NOTIFIER_WEBHOOK_MAX_HEADER_BYTES``, ``NOTIFIER_MAX_ALLOWED_CONNECTIONS``)."""

    max_headers: int = 50
    max_header_bytes: int = 8192
    max_connections: int = 100


@dataclass(frozen=True)
class Context:
    """What saving a webhook runs on. ``limit_changed(webhook_id, limit)`` is called after a
    save that changed the connection limit or activated the webhook, so the new cap holds at
    once (``pipeline.webhook_context`` passes one that sets Redis's cap and pumps the queue).
    ``deliver(webhook_id, limit, [(delivery_id, ingested_at_ms), ...])`` is called after a save
    with ``deliverHeld`` made its held deliveries pending, to queue them (the pipeline's)."""

    db: Database
    catalog: EventCatalog
    vault: Vault
    allowed_networks: Sequence[Network] = ()
    bounds: Bounds = Bounds()
    limit_changed: Callable[[str, int], object] | None = None
    deliver: Callable[[str, int, Sequence[tuple[str, int]]], object] | None = None
    # The circuit breakers of these webhooks, as shown (``circuitBreaker``); None: not shown.
    breakers: Callable[[Sequence[str]], Mapping[str, dict[str, Any]]] | None = None


@dataclass(frozen=True)
class Saved:
    """A webhook as returned, plus the warnings its request earned and a secret shown once."""

    view: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    secret: str | None = None
    # How many held deliveries this save (``deliverHeld``) queued.
    delivered_held: int = 0


def _view(hook: Webhook, event_names: Sequence[str], vault: Vault) -> dict[str, Any]:
    view: dict[str, Any] = {
        "webHookId": hook.id,
        "name": hook.name,
        "eventNames": sorted(event_names),
        "webHookUrl": hook.url,
        "webHookType": hook.webhook_type,
        "methodType": hook.method_type,
        "webHookHeaders": {k: mask(vault.open(v)) for k, v in hook.headers.items()},
        "maxAllowedConnections": hook.max_allowed_connections,
        "slaInSeconds": hook.sla_in_seconds,
        "consumerGroupId": hook.consumer_group_id,
        SOURCES_OPTION: list(getattr(hook, _SOURCES_COLUMN)),
        "noOfRetryAttempts": 0,
        "disabledReason": hook.disabled_reason,
        "attribution": {"createdOn": iso_ms(hook.created_at_ms), "createdOnISO": iso_ms(hook.created_at_ms),
                        "lastUpdatedOn": iso_ms(hook.updated_at_ms),
                        "lastUpdatedOnISO": iso_ms(hook.updated_at_ms)},
    }
    view.update({name: bool(getattr(hook, column)) for name, column in FLAGS.items()})
    return view


def _check_url(url: Any, allowed: Sequence[Network]) -> str:
    if not isinstance(url, str) or not url.strip():
        raise InvalidInput("webHookUrl", "is required")
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise InvalidInput("webHookUrl", f"is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput("webHookUrl", "must be an http or https URL with a host")
    if any(c.isspace() for c in url.strip()):
        raise InvalidInput("webHookUrl", "must not contain white space")
    try:  # the sender's own rule, without DNS (it resolves and checks again before sending)
        check_destination(url.strip(), allowed, resolve=False)
    except DestinationNotAllowed as exc:
        raise InvalidInput("webHookUrl", str(exc)) from None
    return url.strip()


def _origin(url: str) -> tuple[str, str | None, int | None]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.hostname, parts.port


def _check_headers(headers: Any, stored: Mapping[str, str], bounds: Bounds, *,
                   moved: bool = False) -> dict[str, str]:
    """The header values to store; ``stored`` (plain) fill in values sent back as their mask.
    ``moved``: the URL moves to another host, for which no stored value is kept."""
    if headers is None:
        return {}
    if not isinstance(headers, Mapping):
        raise InvalidInput("webHookHeaders", "must be an object of header names to values")
    if len(headers) > bounds.max_headers:
        raise InvalidInput("webHookHeaders", f"at most {bounds.max_headers} headers "
                           f"(NOTIFIER_WEBHOOK_MAX_HEADERS); {len(headers)} were sent")
    by_lower = {name.lower(): value for name, value in stored.items()}
    checked: dict[str, str] = {}
    named: dict[str, str] = {}  # lower case -> as sent: HTTP header names ignore case
    for name, value in headers.items():
        where = ("webHookHeaders", str(name))
        if not isinstance(name, str) or not _TOKEN.match(name):
            raise InvalidInput(where, "is not a valid header name")
        if (twin := named.setdefault(name.lower(), name)) != name:
            raise InvalidInput(where, f"is the same header as {twin} (names ignore case); "
                                      "send it once")
        if not isinstance(value, str):
            raise InvalidInput(where, "must be a string")
        if "\r" in value or "\n" in value or "\0" in value:
            raise InvalidInput(where, "must not contain CR, LF or NUL")
        if not _FIELD_VALUE.fullmatch(value):
            raise InvalidInput(where, "must hold only visible characters, spaces and tabs "
                                      "(Latin-1): HTTP cannot carry others")
        lower = name.lower()
        if lower in _RESERVED or lower.startswith("webhook-"):
            raise InvalidInput(where, "is set by notifier and cannot be configured")
        if _MASKED.match(value):
            if moved:
                raise InvalidInput(where, f"{value!r} is a masked value, kept only for the host "
                                          "it was given for; webHookUrl moves to another host: "
                                          "send the real value")
            value = _unmasked(where, value, by_lower.get(lower))
        if lower == "content-type" and value.split(";")[0].strip().lower() != "application/json":
            raise InvalidInput(where, "must be application/json: payloads are JSON")
        checked[name] = value
    size = sum(len(k.encode()) + len(v.encode()) for k, v in checked.items())
    if size > bounds.max_header_bytes:
        raise InvalidInput("webHookHeaders", f"at most {bounds.max_header_bytes} bytes of names "
                           f"and values in all (NOTIFIER_WEBHOOK_MAX_HEADER_BYTES); {size} were sent")
    return checked


def _unmasked(where: tuple[str, str], value: str, stored: str | None) -> str:
    """A value in the shape of a mask stands for the stored value it masks, or is refused: the
    API only ever shows header values masked, so a webhook read and written back sends them so,
    and a mask saved as the value would be sent to the receiver."""
    if stored is None:
        raise InvalidInput(where, f"{value!r} is a masked value but this header has no stored "
                                  "value to keep; send the real value")
    if mask(stored) != value:
        raise InvalidInput(where, f"{value!r} is not the mask of the stored value "
                                  f"({mask(stored)}); send it unchanged to keep the value, or "
                                  "the real new value")
    return stored


def _check_int(value: Any, name: str, minimum: int, maximum: int, problem: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(name, "must be an integer")
    if value < minimum:
        raise InvalidInput(name, problem)
    if value > maximum:
        raise InvalidInput(name, f"must be at most {maximum}")
    return value


def _columns(ctx: Context, org: Org, body: Mapping[str, Any], *, creating: bool,
             current: Webhook | None, warnings: list[str]) -> tuple[dict[str, Any], list[str] | None]:
    """Check a request body; returns the column values it sets and its event names (if given)."""
    for name in body:
        if creating and name == "deliverHeld":
            warnings.append("deliverHeld is for activating a webhook, which holds nothing "
                            "before it exists; ignored")
        elif name in _IGNORED:
            warnings.append(f"{name} is read-only or not supported here; ignored")
        elif name not in _KNOWN:
            warnings.append(f"{name} is not a webHooks field; ignored")
    if creating:
        for required in ("name", "webHookUrl", "eventNames", "maxAllowedConnections"):
            if body.get(required) is None:
                raise InvalidInput(required, "is required")
    values: dict[str, Any] = {}
    if "name" in body:
        if not isinstance(body["name"], str) or not body["name"].strip():
            raise InvalidInput("name", "must be a non-empty string")
        if len(body["name"]) > 200:
            raise InvalidInput("name", "must be at most 200 characters")
        values["name"] = body["name"].strip()
    if "webHookUrl" in body:
        if isinstance(body["webHookUrl"], str) and len(body["webHookUrl"]) > MAX_URL_CHARS:
            raise InvalidInput("webHookUrl", f"must be at most {MAX_URL_CHARS} characters")
        values["url"] = _check_url(body["webHookUrl"], ctx.allowed_networks)
    # Stored header values are kept only for the host they were given for: the API shows them
    # masked, so keeping them for a URL moved elsewhere would send them to whoever the caller
    # names, who could never have read them.
    moved = current is not None and "url" in values and _origin(values["url"]) != _origin(current.url)
    if moved and "webHookHeaders" not in body and current is not None and current.headers:
        raise InvalidInput("webHookHeaders", "webHookUrl moves to another host: send the header "
                           "values again (stored ones are kept only for their host)")
    if "webHookHeaders" in body:
        stored = ({k: ctx.vault.open(v) for k, v in current.headers.items()}
                  if current and not moved else {})
        values["headers"] = {k: ctx.vault.seal(v) for k, v in _check_headers(
            body["webHookHeaders"], stored, ctx.bounds, moved=moved).items()}
    if "maxAllowedConnections" in body:
        values["max_allowed_connections"] = _check_int(
            body["maxAllowedConnections"], "maxAllowedConnections", 1,
            ctx.bounds.max_connections, "must be greater than zero")
    if body.get("slaInSeconds") is not None:
        values["sla_in_seconds"] = _check_int(body["slaInSeconds"], "slaInSeconds", 0,
                                              MAX_SLA_SECONDS, "must not be negative")
    if body.get("methodType") not in (None, "POST"):
        raise InvalidInput("methodType", "only POST is supported")
    if body.get("webHookType") not in (None, "HTTP"):
        raise InvalidInput("webHookType", "only HTTP is supported")
    for name, column in FLAGS.items():
        if body.get(name) is not None:
            if not isinstance(body[name], bool):
                raise InvalidInput(name, "must be true or false")
            values[column] = body[name]
    if body.get(SOURCES_OPTION) is not None:
        sources = body[SOURCES_OPTION]
        if not isinstance(sources, list):
            raise InvalidInput(SOURCES_OPTION, "must be a list of sources")
        values[_SOURCES_COLUMN] = sorted({source_name(s, SOURCES_OPTION) for s in sources})
    event_names = None
    if "eventNames" in body:
        names = body["eventNames"]
        if not isinstance(names, list) or not names:
            raise InvalidInput("eventNames", "can not be null or empty")
        unknown = sorted({str(n) for n in names} - set(ctx.catalog.names))
        if unknown:
            raise InvalidInput("eventNames", f"unknown event name(s): {', '.join(unknown)}")
        event_names = sorted(set(names))

    def final(column: str) -> Any:
        return values.get(column, getattr(current, column, None) if current else None)

    # The rules live with enrichment. The webhook's resulting flags are checked, except the
    # points balance, checked only when asked for: an org losing the option must not lock its
    # webhooks' other fields (the sender stops adding the balance at once anyway).
    flags: dict[str, Any] = {name: final(column) for name, column in FLAGS.items()
                             if name in OPTION_FIELDS}
    flags[SOURCES_OPTION] = final(_SOURCES_COLUMN)
    flags[POINTS_BALANCE_OPTION] = values.get(OPTION_COLUMNS[POINTS_BALANCE_OPTION])
    check_options(flags, points_balance_allowed=org.available_points_balance_enrichment_enabled)
    return values, event_names


def _load(session: Session, org_id: int, webhook_id: str) -> Webhook:
    hook = session.get(Webhook, webhook_id)
    if hook is None or hook.org_id != org_id:  # another org's webhook does not exist for you
        raise NotFound(f"webHookId {webhook_id} is invalid")
    return hook


def _events_of(session: Session, webhook_id: str) -> list[str]:
    return list(session.scalars(select(WebhookSubscription.event_name)
                                .where(WebhookSubscription.webhook_id == webhook_id)))


def _org(session: Session, org_id: int) -> Org:
    org = session.get(Org, org_id)
    if org is None:
        raise NotFound(f"org {org_id} does not exist")
    return org


def _name_taken(session: Session, org_id: int, name: str, other_than: str | None = None) -> None:
    query = select(Webhook.id).where(Webhook.org_id == org_id, Webhook.name == name)
    if other_than:
        query = query.where(Webhook.id != other_than)
    if session.scalar(query) is not None:
        raise InvalidInput("name", f"a webhook named {name!r} exists already in this org")


def create(ctx: Context, org_id: int, body: Mapping[str, Any], *, now_ms: int) -> Saved:
    """Create a webhook from an InTouch ``POST /v3/webHooks`` body; the secret is in ``Saved``."""
    warnings: list[str] = []
    webhook_id, secret = secrets.token_hex(12), new_secret()
    with ctx.db.session() as session:
        org = _org(session, org_id)
        values, event_names = _columns(ctx, org, body, creating=True, current=None,
                                       warnings=warnings)
        _name_taken(session, org_id, values["name"])
        values.setdefault("sla_in_seconds", DEFAULT_SLA_SECONDS)
        values.setdefault("headers", {})
        values.setdefault(_SOURCES_COLUMN, [])
        hook = Webhook(id=webhook_id, org_id=org_id, consumer_group_id=str(uuid.uuid4()),
                       created_at_ms=now_ms, updated_at_ms=now_ms, **values)
        session.add(hook)
        session.flush()
        session.add_all([WebhookSubscription(webhook_id=webhook_id, event_name=n)
                         for n in event_names or ()])
        session.add(SigningSecret(webhook_id=webhook_id, secret=ctx.vault.seal(secret),
                                  created_at_ms=now_ms))
        session.flush()
        view = _view(hook, event_names or (), ctx.vault)
    _show_breakers(ctx, [view])
    return Saved(view, warnings, secret)


def update_webhook(ctx: Context, org_id: int, webhook_id: str, body: Mapping[str, Any], *,
                   now_ms: int) -> Saved:
    """Apply an InTouch ``PUT /v3/webHooks/{id}`` body: every field optional, a field left out
    unchanged. ``webHookHeaders``, when given, is the whole set; a value equal to its mask keeps
    the stored value. ``deliverHeld: true`` (with the webhook active once saved) queues what it
    holds, in the order it was ingested."""
    return _save(ctx, org_id, webhook_id, body, now_ms=now_ms)


def _save(ctx: Context, org_id: int, webhook_id: str, body: Mapping[str, Any], *, now_ms: int,
          deleting: bool = False) -> Saved:
    warnings: list[str] = []
    deliver_held = body.get("deliverHeld")
    if deliver_held is not None and not isinstance(deliver_held, bool):
        raise InvalidInput("deliverHeld", "must be true or false")
    with ctx.db.session() as session:
        hook = _load(session, org_id, webhook_id)
        was = (hook.max_allowed_connections, hook.active)
        values, event_names = _columns(ctx, _org(session, org_id), body, creating=False,
                                       current=hook, warnings=warnings)
        if deliver_held and not values.get("active", hook.active):
            raise InvalidInput("deliverHeld", "needs the webhook active: an inactive webhook "
                                              "keeps holding its events")
        if "name" in values:
            _name_taken(session, org_id, values["name"], other_than=webhook_id)
        for column, value in values.items():
            setattr(hook, column, value)
        if "active" in values:
            hook.disabled_reason = None  # activated or deactivated by hand
            # Deleted (soft) until activated again; a deleted webhook holds nothing.
            hook.deleted_at_ms = now_ms if deleting else None
        hook.updated_at_ms = now_ms
        if was[1] and not hook.active and not deleting:
            session.execute(store.hold_statement(webhook_id))
        released, waiting = _release_held(session, webhook_id) if deliver_held else (0, [])
        if event_names is not None:
            session.execute(delete(WebhookSubscription).where(
                WebhookSubscription.webhook_id == webhook_id))
            session.add_all([WebhookSubscription(webhook_id=webhook_id, event_name=n)
                             for n in event_names])
        session.flush()
        view = _view(hook, _events_of(session, webhook_id), ctx.vault)
    limit, active = view["maxAllowedConnections"], view["active"]
    if ctx.limit_changed is not None and active and (limit, active) != was:
        ctx.limit_changed(webhook_id, limit)  # after the commit: the queue pump reads it
    if waiting and ctx.deliver is not None:
        ctx.deliver(webhook_id, limit, waiting)
    _show_breakers(ctx, [view])
    return Saved(view, warnings, delivered_held=released)


def _release_held(session: Session, webhook_id: str) -> tuple[int, list[tuple[str, int]]]:
    """Make a webhook's held deliveries pending; returns how many, and ``(id, ingested_at_ms)``
    of every pending one (its queue is ordered by ingestion time): those of an earlier
    deliverHeld too, so that one whose queueing failed (Redis away, after the commit) is queued
    by the next, as a redelivered ingest re-queues its deliveries. Queueing is idempotent, and
    a claim never takes a delivery twice."""
    released = session.execute(
        update(Delivery)
        .where(Delivery.webhook_id == webhook_id, Delivery.status == DeliveryStatus.HELD)
        .values(status=DeliveryStatus.PENDING, next_attempt_at_ms=None, lease_until_ms=None,
                ended_at_ms=None)
        .execution_options(synchronize_session=False))
    waiting = session.execute(
        select(Delivery.id, Delivery.ingested_at_ms)
        .where(Delivery.webhook_id == webhook_id, Delivery.status == DeliveryStatus.PENDING)).all()
    return int(getattr(released, "rowcount", 0) or 0), [(row.id, row.ingested_at_ms)
                                                         for row in waiting]


def get(ctx: Context, org_id: int, webhook_id: str) -> dict[str, Any]:
    with ctx.db.session() as session:
        hook = _load(session, org_id, webhook_id)
        view = _view(hook, _events_of(session, webhook_id), ctx.vault)
    _show_breakers(ctx, [view])
    return view


def org_of(ctx: Context, webhook_id: str) -> int:
    """The org of a webhook, for the operator's command line, which may name the webhook
    alone."""
    with ctx.db.session() as session:
        org_id = session.scalar(select(Webhook.org_id).where(Webhook.id == webhook_id))
    if org_id is None:
        raise NotFound(f"webHookId {webhook_id} is invalid")
    return int(org_id)


def list_all(ctx: Context, org_id: int) -> list[dict[str, Any]]:
    return [view for _org_id, view in list_by_org(ctx, org_id)]


def list_by_org(ctx: Context, org_id: int | None = None, *, active: bool | None = None
                ) -> list[tuple[int, dict[str, Any]]]:
    """``(org id, view)`` of the webhooks of ``org_id`` (None: of every org, for the operator),
    only the active or the inactive ones if ``active`` says so; by org, then oldest first."""
    query = select(Webhook)
    if org_id is not None:
        query = query.where(Webhook.org_id == org_id)
    if active is not None:
        query = query.where(Webhook.active.is_(active))
    with ctx.db.session() as session:
        hooks = session.scalars(query.order_by(Webhook.org_id, Webhook.created_at_ms,
                                               Webhook.id)).all()
        subscriptions: dict[str, list[str]] = {h.id: [] for h in hooks}
        for webhook_id, name in session.execute(
                select(WebhookSubscription.webhook_id, WebhookSubscription.event_name)
                .where(WebhookSubscription.webhook_id.in_(list(subscriptions)))):
            subscriptions[webhook_id].append(name)
        found = [(h.org_id, _view(h, subscriptions[h.id], ctx.vault)) for h in hooks]
    _show_breakers(ctx, [view for _, view in found])
    return found


def _show_breakers(ctx: Context, views: Sequence[dict[str, Any]]) -> None:
    """Add each webhook's circuit breaker (Redis's) to its view; null while Redis is away,
    which must not keep anyone from reading or saving webhooks."""
    if ctx.breakers is None or not views:
        return
    try:
        breakers = ctx.breakers([view["webHookId"] for view in views])
    except TransientError:
        breakers = {}
    for view in views:
        view["circuitBreaker"] = breakers.get(view["webHookId"])


def deactivate(ctx: Context, org_id: int, webhook_id: str, *, now_ms: int) -> dict[str, Any]:
    """Inactive: it holds its events (and what it had waiting) until it is activated."""
    return update_webhook(ctx, org_id, webhook_id, {"active": False}, now_ms=now_ms).view


def delete_webhook(ctx: Context, org_id: int, webhook_id: str, *, now_ms: int
                   ) -> dict[str, Any]:
    """InTouch's DELETE: the webhook stays, inactive, with its history, and holds nothing
    (what it had waiting ends failed when its turn comes, replayable). Activating it undoes
    the delete."""
    return _save(ctx, org_id, webhook_id, {"active": False}, now_ms=now_ms, deleting=True).view


def activate(ctx: Context, org_id: int, webhook_id: str, *, now_ms: int,
             deliver_held: bool = False) -> Saved:
    """Active again (clearing why notifier deactivated it, if it did); with ``deliver_held``,
    what it held is queued."""
    return update_webhook(ctx, org_id, webhook_id,
                          {"active": True, "deliverHeld": deliver_held}, now_ms=now_ms)


def rotate_secret(ctx: Context, org_id: int, webhook_id: str, *, now_ms: int,
                  overlap_seconds: int = ROTATION_OVERLAP_SECONDS) -> str:
    """A new signing secret; the current ones keep signing for ``overlap_seconds`` more."""
    _check_int(overlap_seconds, "overlapSeconds", 0, MAX_OVERLAP_SECONDS, "must not be negative")
    secret = new_secret()
    ends = now_ms + overlap_seconds * 1000
    with ctx.db.session() as session:
        _load(session, org_id, webhook_id)
        session.execute(
            update(SigningSecret)
            .where(SigningSecret.webhook_id == webhook_id,
                   (SigningSecret.expires_at_ms.is_(None)) | (SigningSecret.expires_at_ms > ends))
            .values(expires_at_ms=ends))
        session.add(SigningSecret(webhook_id=webhook_id, secret=ctx.vault.seal(secret),
                                  created_at_ms=now_ms))
    return secret
