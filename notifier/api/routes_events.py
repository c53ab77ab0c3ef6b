"""``/v3/events``: ingest events over HTTP, and the event catalog with its schemas."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Query, Request
from fastapi.responses import JSONResponse

from notifier import pipeline
from notifier.api.auth import caller_org
from notifier.api.envelope import envelope, error_body
from notifier.api.schemas import AcceptedEvent, CatalogEntry, Envelope, answers
from notifier.errors import NotFound

__all__ = ["router"]

router = APIRouter(prefix="/v3/events", tags=["events"])
Org = Annotated[int, Depends(caller_org)]


@router.post("", status_code=202, responses={
    **answers(202, list[AcceptedEvent]),
    400: {"model": Envelope[list[AcceptedEvent]],
          "description": "Some events are invalid (or refused by the database): they are "
                         "stored as rejected (or kept as dead letters); errors name the field"}})
def ingest_events(
    request: Request,
    org: Org,
    body: Annotated[dict[str, Any] | list[dict[str, Any]], Body(
        examples=[{"eventName": "pointsIssued",
                   "data": {"customerIdentifiers": {"customerId": 42}}}])],
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
        if outcome.error:
            field = outcome.error.partition(":")[0]
            if field.startswith("$"):  # a JSON path: the event failed its checks
                errors.append(error_body("INVALID_EVENT", f"{where}{outcome.error}",
                                         f"{where}{field}"))
            else:
                errors.append(error_body("NOT_STORED", f"{where}{outcome.error}"))
    return envelope(results, status=400 if errors else 202, errors=errors)


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
