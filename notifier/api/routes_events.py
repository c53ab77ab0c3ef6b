"""``/v3/events``: ingest events over HTTP, and the event catalog with its schemas."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from config import Settings
from notifier import pipeline, store
from notifier.api.auth import caller_org
from notifier.api.envelope import envelope, error_body
from notifier.api.schemas import AcceptedEvent, CatalogEntry, Envelope, answers
from notifier.errors import EventTooLarge, InvalidInput, NotFound, TooLarge

__all__ = ["router"]

router = APIRouter(prefix="/v3/events", tags=["events"])
Org = Annotated[int, Depends(caller_org)]


Events = dict[str, Any] | list[dict[str, Any]]
_EVENT = {"type": "object", "additionalProperties": True}
EVENTS_BODY = {"required": True, "content": {"application/json": {"schema": {
    "anyOf": [_EVENT, {"type": "array", "items": _EVENT}],
    "examples": [{"eventName": "pointsIssued",
                  "data": {"customerIdentifiers": {"customerId": 42}}}]}}}}


async def _events(request: Request) -> Events:
    """The body, one event or a list: read here (at most NOTIFIER_MAX_BODY_BYTES), parsed off
    the event loop, where parsing megabytes would hold every other request of the process."""
    return await run_in_threadpool(_parse_events, await request.body())


def _parse_events(raw: bytes) -> Events:
    try:
        body = json.loads(raw)
    except ValueError:  # not JSON, or not UTF-8
        raise InvalidInput("body", "must be a JSON event object or a list of them") from None
    if isinstance(body, dict):
        return body
    if not isinstance(body, list):
        raise InvalidInput("body", "must be an event object or a list of them")
    for index, event in enumerate(body):
        if not isinstance(event, dict):
            raise InvalidInput(f"[{index}]", "must be an event object")
    return body


@router.post("", status_code=202, responses={
    **answers(202, list[AcceptedEvent]),
    400: {"model": Envelope[list[AcceptedEvent]],
          "description": "Some events are invalid (or refused by the database): they are "
                         "stored as rejected (or kept as dead letters); errors name the field"},
    413: {"model": Envelope[None],
          "description": "Too many events, or an event too large: nothing is stored; errors "
                         "name the event and the limit"}},
    openapi_extra={"requestBody": EVENTS_BODY})
def ingest_events(request: Request, org: Org, body: Annotated[Events, Depends(_events)],
                  ) -> JSONResponse:
    """Store one event (or a list) for the key's org, then deliver it.

    202 with the eventIds once stored. An invalid event is stored too, as rejected, and answered
    400 with the field path of the first problem; valid events of the same list still go out.
    """
    services = request.app.state.services
    events = body if isinstance(body, list) else [body]
    if not events:
        return envelope(None, status=400, errors=[error_body(
            "INVALID_INPUT", "body: needs at least one event", "body")])
    too_large = _too_large(services.settings, events, org, listed=isinstance(body, list))
    if too_large:
        return envelope(None, status=413, errors=[
            error_body("TOO_LARGE", str(exc), exc.field) for exc in too_large])
    results, errors = [], []
    for index, event in enumerate(events):
        where = f"[{index}]" if isinstance(body, list) else ""
        if event.get("orgId", org) != org:
            errors.append(error_body("INVALID_INPUT",
                                     f"{where}orgId: does not match the API key's org", f"{where}orgId"))
            continue
        # An event the database refuses is kept (rejected with the reason, or a dead letter)
        # and answered as such, never a 500 that loses it.
        outcome = pipeline.accept_or_end(services, {**event, "orgId": org},
                                         request.app.state.send_lease)
        results.append({"eventId": outcome.event_id, "status": outcome.status})
        if outcome.error and outcome.error_path is not None:  # it failed its checks
            errors.append(error_body("INVALID_EVENT", f"{where}{outcome.error}",
                                     f"{where}{outcome.error_path}"))
        elif outcome.error:  # the database refused it: kept, with the reason
            errors.append(error_body("NOT_STORED", f"{where}{outcome.error}"))
    return envelope(results, status=400 if errors else 202, errors=errors)


def _too_large(settings: Settings, events: list[dict[str, Any]], org: int, *,
                listed: bool) -> list[TooLarge]:
    """The size limits a request breaks, each naming its event: refused whole, before
    anything is stored, so that the caller knows that nothing of it was."""
    if len(events) > settings.max_events_per_request:
        return [TooLarge("body", f"{len(events)} events, over the limit of "
                                 f"{settings.max_events_per_request} "
                                 "(NOTIFIER_MAX_EVENTS_PER_REQUEST)")]
    refused: list[TooLarge] = []
    for index, event in enumerate(events):
        try:
            # As ingest will see it, so that one the API takes is not refused by ingest.
            store.check_event_size({**event, "orgId": org}, settings.max_event_bytes,
                                   f"[{index}]" if listed else "body")
        except EventTooLarge as exc:
            refused.append(exc)
    return refused


@router.get("/catalog", responses=answers(200, list[CatalogEntry]))
def catalog(request: Request) -> JSONResponse:
    """Every event name notifier knows, with its group and description."""
    known = request.app.state.services.catalog
    return envelope([{"eventName": name, **known.entries.get(name, {})} for name in known.names])


@router.get("/catalog/{eventName}/schema", responses=answers(200, dict[str, Any]))
def event_schema(eventName: str, request: Request,
                 resolved: Annotated[bool, Query()] = False) -> JSONResponse:
    """The event's JSON schema (draft-06); ``?resolved=true`` inlines every ``$ref``."""
    known = request.app.state.services.catalog
    if eventName not in known.names:
        raise NotFound(f"eventName {eventName!r} is not in the catalog")
    return envelope(known.resolved(eventName) if resolved else known.schema(eventName))
