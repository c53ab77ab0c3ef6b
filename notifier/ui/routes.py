"""The admin web UI under ``/ui``: server-rendered pages over the same domain calls as the API.

One signed-in org per browser session (a signed cookie naming a server-side session bound to
the API key it was signed in with, see ``notifier.ui.sessions``). Every
change goes through ``notifier.webhooks`` / ``notifier.pipeline``, so the UI can do nothing the
API could not, and an ``InvalidInput`` from them is shown next to the field it names.
"""

from __future__ import annotations

import hmac
import json
import secrets
import uuid
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qsl, urlencode

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy import func, select
from starlette.concurrency import run_in_threadpool

from notifier import alerts, logs, pipeline, replays, store, tenants, webhooks
from notifier.clock import now_ms
from notifier.errors import AuthenticationFailed, InvalidInput, NotFound
from notifier.models import Delivery, DeliveryStatus, Event, Org, Webhook
from notifier.pipeline import Services
from notifier.reference import SOURCES
from notifier.ui import forms, sessions

__all__ = ["SignInRequired", "router"]

HERE = Path(__file__).resolve().parent
templates = Jinja2Templates(directory=HERE / "templates")
router = APIRouter(prefix="/ui", include_in_schema=False)


class SignInRequired(Exception):
    """No org in the session: the page answers with a redirect to the sign-in page."""


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def _signed_in(request: Request) -> int:
    session_id = request.session.get("sid")
    if not isinstance(session_id, str):
        raise SignInRequired
    settings = _services(request).settings
    try:
        return sessions.check(_services(request).db, session_id, now_ms=now_ms(),
                              idle_ms=int(settings.ui_session_idle_seconds * 1000),
                              max_ms=int(settings.ui_session_max_seconds * 1000))
    except AuthenticationFailed:
        request.session.clear()
        raise SignInRequired from None


OrgId = Annotated[int, Depends(_signed_in)]


def _context(request: Request) -> webhooks.Context:
    return pipeline.webhook_context(_services(request), request.app.state.send_lease)


def _flash(request: Request, message: str, kind: str = "ok") -> None:
    request.session.setdefault("flash", []).append([kind, message])
    request.session["flash"] = request.session["flash"]  # mark the session changed


def _time(ms: int | None) -> str:
    if not ms:
        return ""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=False, ensure_ascii=False)


templates.env.filters["time"] = _time
templates.env.filters["pretty"] = _pretty


def _page(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
    org = request.session.get("org")
    context.setdefault("org_id", org)
    context.setdefault("org_name", request.session.get("orgName", ""))
    context["flashes"] = request.session.pop("flash", [])
    return templates.TemplateResponse(request, template, context, status_code=status)


def _redirect(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


async def _pairs(request: Request) -> list[tuple[str, str]]:
    # URL-encoded forms only (every form here is one); parsed by hand so the UI needs no
    # multipart parser. Read here (a dependency, at most NOTIFIER_MAX_BODY_BYTES) so that the
    # handlers, which touch the database, can be plain functions: run off the event loop.
    body = await request.body()
    return await run_in_threadpool(parse_qsl, body.decode(errors="replace"),
                                   keep_blank_values=True)


Pairs = Annotated[list[tuple[str, str]], Depends(_pairs)]


def _not_found(request: Request, what: str) -> HTMLResponse:
    return _page(request, "message.html", status=404, title="Not found", message=what)


# ---------------------------------------------------------------- sign-in


@router.get("", response_model=None)
@router.get("/", response_model=None)
def home(request: Request) -> RedirectResponse:
    return _redirect("/ui/notifications" if "org" in request.session else "/ui/login")


def _csrf_token(request: Request) -> str:
    """The sign-in form's token, kept in the (pre-sign-in) cookie: a post from another site's
    form cannot know it, so nobody is signed in to an org they did not choose (login CSRF)."""
    token = request.session.get("csrf")
    if not isinstance(token, str):
        token = request.session["csrf"] = secrets.token_urlsafe(32)
    return token


def _login_page(request: Request, status: int = 200, form: Mapping[str, str] | None = None,
                error: Mapping[str, str] | None = None) -> HTMLResponse:
    # Bare, whatever the cookie says: it may name a session that has ended.
    return _page(request, "login.html", status=status, form=form or {}, error=error,
                 csrf=_csrf_token(request), org_id=None)


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request) -> HTMLResponse:
    return _login_page(request)


@router.post("/login", response_model=None)
def login(request: Request, pairs: Pairs) -> Response:
    form = dict(pairs)
    expected = request.session.get("csrf")
    if not isinstance(expected, str) or not hmac.compare_digest(
            form.get("csrf", "").encode(), expected.encode()):
        return _login_page(request, 403, form, {"form": "This form has expired; sign in again"})
    try:
        org_id = int(form.get("orgId", "").strip())
    except ValueError:
        return _login_page(request, 400, form, {"orgId": "Enter your numeric org id"})
    services = _services(request)
    try:
        org_id, key_id = tenants.authenticate_key(services.db, form.get("apiKey", "").strip(),
                                                  org_id=org_id)
    except AuthenticationFailed:
        return _login_page(request, 401, form,
                           {"apiKey": "This API key is not a live key of that org"})
    session_id = sessions.start(services.db, org_id, key_id, now_ms=now_ms(),
                                max_ms=int(services.settings.ui_session_max_seconds * 1000))
    with services.db.session() as session:
        org = session.get(Org, org_id)
        org_name = org.name if org else str(org_id)
    request.session.clear()
    request.session.update({"sid": session_id, "org": org_id, "orgName": org_name})
    return _redirect("/ui/notifications")


@router.post("/logout")
def logout(request: Request) -> RedirectResponse:
    session_id = request.session.get("sid")
    if isinstance(session_id, str):
        sessions.end(_services(request).db, session_id, now_ms=now_ms())
    request.session.clear()
    return _redirect("/ui/login")


# ---------------------------------------------------------------- notifications


@router.get("/notifications", response_class=HTMLResponse)
def notifications(request: Request, org: OrgId, inactive: bool = False) -> HTMLResponse:
    hooks = webhooks.list_all(_context(request), org)
    hidden = sum(1 for h in hooks if not h["active"])
    shown = hooks if inactive else [h for h in hooks if h["active"]]
    db = _services(request).db
    return _page(request, "notifications.html", hooks=shown, hidden=hidden,
                 show_inactive=inactive, nav="notifications",
                 alerts=alerts.recent(db, org), operations=alerts.operations_webhook(db, org))


def _form_page(request: Request, form: forms.NotificationForm, *, webhook_id: str | None,
               errors: Mapping[str, str] | None = None, status: int = 200) -> HTMLResponse:
    catalog = _services(request).catalog
    events = [{"name": name, "group": catalog.entries.get(name, {}).get("group", ""),
               "description": catalog.entries.get(name, {}).get("description", "")}
              for name in catalog.names]
    return _page(request, "form.html", status=status, form=form, errors=errors or {},
                 webhook_id=webhook_id, events=events, sources=sorted(SOURCES),
                 flag_labels=forms.ENRICHMENT_FLAGS, nav="notifications")


@router.get("/notifications/new", response_class=HTMLResponse)
def new_notification(request: Request, org: OrgId) -> HTMLResponse:
    del org
    return _form_page(request, forms.NotificationForm(headers=[forms.HeaderRow("")]),
                      webhook_id=None)


@router.post("/notifications/new", response_model=None)
def create_notification(request: Request, org: OrgId, pairs: Pairs) -> Response:
    form = forms.read_form(pairs)
    try:
        saved = webhooks.create(_context(request), org, forms.body_of(form), now_ms=now_ms())
    except InvalidInput as exc:
        return _form_page(request, form, webhook_id=None, errors=forms.errors_of(exc), status=400)
    _flash(request, f"Notification “{saved.view['name']}” created.")
    # The signing secret is shown this once, on this page, and never put in the cookie.
    return _webhook_page(request, org, saved.view["webHookId"], secret=saved.secret)


@router.get("/notifications/{webhook_id}/edit", response_class=HTMLResponse)
def edit_notification(request: Request, org: OrgId, webhook_id: str) -> HTMLResponse:
    try:
        view = webhooks.get(_context(request), org, webhook_id)
    except NotFound as exc:
        return _not_found(request, str(exc))
    return _form_page(request, forms.form_from_view(view), webhook_id=webhook_id)


@router.post("/notifications/{webhook_id}/edit", response_model=None)
def save_notification(request: Request, org: OrgId, webhook_id: str, pairs: Pairs) -> Response:
    ctx = _context(request)
    try:
        view = webhooks.get(ctx, org, webhook_id)
    except NotFound as exc:
        return _not_found(request, str(exc))
    form = forms.read_form(pairs, view["webHookHeaders"])
    try:
        webhooks.update_webhook(ctx, org, webhook_id, forms.body_of(form), now_ms=now_ms())
    except InvalidInput as exc:
        return _form_page(request, form, webhook_id=webhook_id, errors=forms.errors_of(exc), status=400)
    _flash(request, "Changes saved.")
    return _redirect(f"/ui/notifications/{webhook_id}")


def _set_active(request: Request, org: int, webhook_id: str,
                change: Callable[[webhooks.Context], object], message: str,
                to: str) -> Response:
    try:
        change(_context(request))
    except NotFound as exc:
        return _not_found(request, str(exc))
    _flash(request, message)
    return _redirect(to)


@router.post("/notifications/{webhook_id}/deactivate", response_model=None)
def deactivate(request: Request, org: OrgId, webhook_id: str) -> Response:
    return _set_active(request, org, webhook_id,
                       lambda ctx: webhooks.deactivate(ctx, org, webhook_id, now_ms=now_ms()),
                       "Notification deactivated: its events are held for it until it is "
                       "activated.", f"/ui/notifications/{webhook_id}")


@router.post("/notifications/{webhook_id}/activate", response_model=None)
def activate(request: Request, org: OrgId, webhook_id: str, pairs: Pairs) -> Response:
    deliver_held = "deliverHeld" in dict(pairs)
    try:
        saved = webhooks.activate(_context(request), org, webhook_id, now_ms=now_ms(),
                                  deliver_held=deliver_held)
    except NotFound as exc:
        return _not_found(request, str(exc))
    _flash(request, f"Notification activated; {saved.delivered_held} held event(s) queued to "
                    "it." if deliver_held else "Notification activated. What it held stays "
                    "held; a replay can send it.")
    return _redirect(f"/ui/notifications/{webhook_id}")


@router.post("/notifications/{webhook_id}/delete", response_model=None)
def delete(request: Request, org: OrgId, webhook_id: str) -> Response:
    # InTouch's delete is soft: the webhook is deactivated and keeps its delivery history; the
    # list hides it unless "Show inactive" is on. It holds nothing from now on.
    return _set_active(request, org, webhook_id,
                       lambda ctx: webhooks.delete_webhook(ctx, org, webhook_id,
                                                           now_ms=now_ms()),
                       "Notification deleted. Its delivery history is kept; "
                       "“Show inactive” lists it.", "/ui/notifications")


# ---------------------------------------------------------------- the webhook page

DAYS = (1, 3, 7, 15, 30)
STATUSES = ("delivered", "failed", "dead", "retrying", "pending", "in_flight", "held")


def _webhook_page(request: Request, org: int, webhook_id: str, *,
                  secret: str | None = None) -> HTMLResponse:
    try:
        view = webhooks.get(_context(request), org, webhook_id)
    except NotFound as exc:
        return _not_found(request, str(exc))
    query = request.query_params
    days = int(query["days"]) if query.get("days", "").isdigit() and \
        int(query["days"]) in DAYS else 7
    filters = {"eventName": query.get("eventName", ""), "status": query.get("status", ""),
               "slaBreached": "true" if query.get("slaBreached") == "true" else ""}
    activity = _activity(request, org, view, days, filters)
    return _page(request, "webhook.html", hook=view, secret=secret, days=days, all_days=DAYS,
                 filters=filters, statuses=STATUSES, form=forms.form_from_view(view),
                 nav="notifications", qs=lambda **kw: urlencode(
                     {k: v for k, v in {"days": days, **filters, **kw}.items() if v}),
                 **activity)


DAY_MS = 24 * 3600 * 1000
PAGE_SIZE = 20


def _activity(request: Request, org: int, view: Mapping[str, Any], days: int,
              filters: Mapping[str, str]) -> dict[str, Any]:
    """Metrics over ``days``, and one page of the delivery log with each delivery's attempts."""
    db, now = _services(request).db, now_ms()
    group, start = view["consumerGroupId"], now - days * DAY_MS
    metrics = logs.consumer_group_metrics(db, org, group, now_ms=now, start_ms=start)
    page = request.query_params.get("page", "0")
    try:
        found = logs.consumer_group_logs(
            db, org, group, now_ms=now, start_ms=start, size=PAGE_SIZE,
            page=int(page) if page.isdigit() else 0,
            event_type=filters["eventName"] or None, status=filters["status"] or None,
            sla_breached=True if filters["slaBreached"] else None)
    except InvalidInput as exc:
        found = {"content": [], "page": 0, "totalElements": 0, "totalPages": 0}
        _flash(request, str(exc), "error")
    deliveries = [logs.delivery_detail(db, org, record["deliveryId"])
                  for record in found["content"]]
    return {"metrics": metrics, "log": found, "deliveries": deliveries}


@router.get("/notifications/{webhook_id}", response_class=HTMLResponse)
def webhook_page(request: Request, org: OrgId, webhook_id: str) -> HTMLResponse:
    return _webhook_page(request, org, webhook_id)


@router.post("/notifications/{webhook_id}/deliveries/{delivery_id}/replay", response_model=None)
def replay(request: Request, org: OrgId, webhook_id: str, delivery_id: str) -> Response:
    services = _services(request)
    try:
        logs.require_delivery(services.db, org, delivery_id)
    except NotFound as exc:
        return _not_found(request, str(exc))
    done = pipeline.replay(services, [delivery_id], request.app.state.send_lease,
                           requested_by=f"admin pages (org {org})", org_id=org)
    if done.queued:
        _flash(request, f"Delivery {delivery_id} queued again, with the same webhook-id.")
    elif done.emptied:
        _flash(request, "That delivery's event was emptied by retention "
                        "(NOTIFIER_RETENTION_DAYS): nothing is left to send; not replayed.",
               "warn")
    else:
        _flash(request, "That delivery is being sent right now; not replayed.", "warn")
    return _redirect(f"/ui/notifications/{webhook_id}")


# ---------------------------------------------------------------- replay by selection

# Deliveries shown before a replay is confirmed.
REPLAY_SAMPLE = 5


def _replay_page(request: Request, view: Mapping[str, Any], *, status: int = 200,
                 **context: Any) -> HTMLResponse:
    context.setdefault("form", {"status": [], "eventName": []})
    return _page(request, "replay.html", status=status, hook=view, errors=context.pop(
        "errors", {}), statuses=[s.value for s in DeliveryStatus], nav="notifications",
        **context)


@router.get("/notifications/{webhook_id}/replay", response_class=HTMLResponse)
def replay_form(request: Request, org: OrgId, webhook_id: str) -> HTMLResponse:
    try:
        view = webhooks.get(_context(request), org, webhook_id)
    except NotFound as exc:
        return _not_found(request, str(exc))
    return _replay_page(request, view)


@router.post("/notifications/{webhook_id}/replay", response_model=None)
def replay_selected(request: Request, org: OrgId, webhook_id: str, pairs: Pairs) -> Response:
    """The form's criteria counted (with a sample), then, confirmed, replayed."""
    services = _services(request)
    try:
        view = webhooks.get(_context(request), org, webhook_id)
    except NotFound as exc:
        return _not_found(request, str(exc))
    given = dict(pairs)
    form = {**given, "status": [v for k, v in pairs if k == "status"],
            "eventName": [v for k, v in pairs if k == "eventName"]}
    try:
        selection = replace(replays.selection(
            now_ms=now_ms(), delivery_ids=given.get("deliveryIds", "").split(),
            event_id=given.get("eventId") or None, statuses=form["status"],
            event_names=form["eventName"], since=given.get("since") or None,
            until=given.get("until") or None,
            response_status=given.get("responseStatus") or None),
            webhook=webhook_id, org_id=org)
    except InvalidInput as exc:
        return _replay_page(request, view, status=400, form=form,
                            errors={str(exc.path[0]): exc.problem})
    counted = store.count_selection(services.db, selection)
    if given.get("step") != "confirm" or counted.not_found or not counted.replayable:
        return _replay_page(request, view, form=form, counted=counted,
                            sample=store.sample_selection(services.db, selection,
                                                          most=REPLAY_SAMPLE))
    done = pipeline.replay_handing_on(services, selection, request.app.state.send_lease,
                                      request.app.state.hand_on_replay,
                                      requested_by=f"admin pages (org {org})", org_id=org)
    _flash(request, f"Replay {done.replay_id}: {done.queued} deliveries queued again, with "
                    f"their webhook-ids; {done.skipped} left as they were."
                    + ("" if done.finished else " A worker queues the rest."))
    return _redirect(f"/ui/notifications/{webhook_id}/replays/{done.replay_id}")


@router.get("/notifications/{webhook_id}/replays/{replay_id}", response_class=HTMLResponse)
def replay_progress(request: Request, org: OrgId, webhook_id: str,
                    replay_id: int) -> HTMLResponse:
    try:
        view = webhooks.get(_context(request), org, webhook_id)
        progress = store.replay_of(_services(request).db, replay_id, org_id=org,
                                   webhook_id=webhook_id)
    except NotFound as exc:
        return _not_found(request, str(exc))
    return _replay_page(request, view, progress=progress)


@router.post("/notifications/{webhook_id}/test", response_model=None)
def test_send(request: Request, org: OrgId, webhook_id: str, pairs: Pairs) -> Response:
    services = _services(request)
    name = dict(pairs).get("eventName") or None
    try:
        event = logs.test_event(services.db, services.catalog, org, webhook_id, name,
                                event_id=str(uuid.uuid4()), now_ms=now_ms())
    except NotFound as exc:
        return _not_found(request, str(exc))
    except InvalidInput as exc:
        _flash(request, f"Test not sent: {exc}", "error")
        return _redirect(f"/ui/notifications/{webhook_id}")
    outcome = pipeline.accept(services, event, request.app.state.send_lease,
                              only_webhook=webhook_id)
    _flash(request, f"Test {event['eventName']} event {outcome.event_id} sent to this webhook.")
    return _redirect(f"/ui/notifications/{webhook_id}")


@router.get("/deliveries/{delivery_id}")
def delivery(request: Request, org: OrgId, delivery_id: str) -> JSONResponse:
    """One delivery's payloads, for the event feed's original/enriched toggle."""
    try:
        detail = logs.delivery_detail(_services(request).db, org, delivery_id)
    except NotFound as exc:
        return JSONResponse({"error": str(exc)}, status_code=404)
    return JSONResponse(detail)


# ---------------------------------------------------------------- events


@router.get("/schema/{event_name}")
def schema(request: Request, org: OrgId, event_name: str) -> JSONResponse:
    del org
    catalog = _services(request).catalog
    if event_name not in catalog.names:
        return JSONResponse({"error": f"unknown event {event_name!r}"}, status_code=404)
    # The event's own schema, as InTouch's ">" shows it; /v3/events/catalog/{name}/schema
    # ?resolved=true has the $refs inlined.
    return JSONResponse(catalog.schema(event_name))


FEED_SIZE = 50


def _feed(request: Request, org: int, event_name: str) -> list[dict[str, Any]]:
    """The org's newest events of the last 30 days, each with the webhooks it went to."""
    since = now_ms() - logs.DEFAULT_WINDOW_MS
    with _services(request).db.session() as session:
        query = select(Event).where(Event.org_id == org, Event.received_at_ms >= since)
        if event_name:
            query = query.where(Event.event_name == event_name)
        events = session.scalars(query.order_by(Event.received_at_ms.desc(), Event.pk.desc())
                                 .limit(FEED_SIZE)).all()
        sent: dict[int, list[dict[str, str]]] = {}
        for event_pk, delivery_id, status, hook_name in session.execute(
                select(Delivery.event_pk, Delivery.id, Delivery.status, Webhook.name)
                .join(Webhook, Webhook.id == Delivery.webhook_id)
                .where(Delivery.event_pk.in_([e.pk for e in events]), Webhook.org_id == org)
                .order_by(Webhook.name)):
            sent.setdefault(event_pk, []).append(
                {"id": delivery_id, "status": status, "webhook": hook_name})
        return [{"eventId": e.event_id, "eventName": e.event_name, "status": e.status,
                 "requestId": e.api_request_id, "refId": e.ref_id, "at": e.received_at_ms,
                 "error": e.error_message, "payload": e.payload, "deliveries": sent.get(e.pk, [])}
                for e in events]


@router.get("/events", response_class=HTMLResponse)
def event_feed(request: Request, org: OrgId, eventName: str = "") -> HTMLResponse:
    with _services(request).db.session() as session:
        total = session.scalar(select(func.count()).select_from(Event).where(
            Event.org_id == org, Event.received_at_ms >= now_ms() - logs.DEFAULT_WINDOW_MS)) or 0
    return _page(request, "events.html", events=_feed(request, org, eventName), total=total,
                 event_name=eventName, names=_services(request).catalog.names, nav="events")


def _example(request: Request, event_name: str) -> str:
    if event_name not in _services(request).catalog.names:
        return ""
    example = logs.example_event(_services(request).catalog, event_name)
    return _pretty(example.get("data", {}))


@router.get("/example/{event_name}")
def example(request: Request, org: OrgId, event_name: str) -> JSONResponse:
    """A minimal valid ``data`` of the event, to start the publish form from."""
    del org
    if event_name not in _services(request).catalog.names:
        return JSONResponse({"error": f"unknown event {event_name!r}"}, status_code=404)
    return JSONResponse(logs.example_event(_services(request).catalog, event_name).get("data", {}))


def _publish_page(request: Request, *, name: str = "", data: str = "",
                  errors: Mapping[str, str] | None = None, result: Any = None,
                  status: int = 200) -> HTMLResponse:
    return _page(request, "publish.html", status=status, names=_services(request).catalog.names,
                 name=name, data=data, errors=errors or {}, result=result, nav="publish")


@router.get("/publish", response_class=HTMLResponse)
def publish_page(request: Request, org: OrgId, eventName: str = "") -> HTMLResponse:
    del org
    return _publish_page(request, name=eventName, data=_example(request, eventName))


@router.post("/publish", response_model=None)
def publish(request: Request, org: OrgId, pairs: Pairs) -> Response:
    form = dict(pairs)
    name, raw = form.get("eventName", ""), form.get("data", "")
    try:
        data = json.loads(raw or "{}")
    except json.JSONDecodeError as exc:
        return _publish_page(request, name=name, data=raw, status=400,
                             errors={"data": f"not JSON: {exc.msg} (line {exc.lineno})"})
    services = _services(request)
    outcome = pipeline.accept(services, {"eventName": name, "data": data, "orgId": org},
                              request.app.state.send_lease)
    if outcome.error:
        field = "eventName" if outcome.error_path == "$.eventName" else "data"
        return _publish_page(request, name=name, data=raw, status=400,
                             errors={field: outcome.error}, result=outcome)
    return _publish_page(request, name=name, data=raw, result=outcome)
