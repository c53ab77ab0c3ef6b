"""Delivery logs, metrics, replay and test sends (InTouch v3 ``eventLog`` and consumer groups).

InTouch answers ``eventLog/{eventId}`` and ``eventLog/refId/{refId}`` with one object and
``eventLog/requestId/{requestId}`` with an array. One event fans out to several webhooks, so the
object is the first delivery's record (oldest, then by webhook id) and carries every record of
the event(s) in ``deliveries``: an InTouch client reads the object as before, and nothing is
hidden from the others.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from notifier import logs, pipeline
from notifier.api.auth import caller_key, caller_org
from notifier.api.envelope import envelope
from notifier.api.schemas import answers
from notifier.clock import now_ms

__all__ = ["router"]

router = APIRouter(tags=["logs"])
Org = Annotated[int, Depends(caller_org)]


# InTouch's field names, hence camelCase attributes.
class ConsumerResponse(BaseModel):
    statusCode: int | None
    body: str | None
    error: str | None


class LogRecord(BaseModel):
    refId: str | None
    requestId: str | None
    eventName: str
    eventId: str
    consumerGroupId: str | None
    eventIngestionTimestamp: str | None
    eventStartTimestamp: str | None
    eventEndTimestamp: str | None
    slaBreachTimestamp: str | None
    consumerResponse: ConsumerResponse | None
    status: str
    webHookId: str | None
    deliveryId: str | None
    attemptCount: int


class EventLog(LogRecord):
    deliveries: list[LogRecord]


class LogPage(BaseModel):
    content: list[LogRecord]
    page: int
    size: int
    totalElements: int
    totalPages: int


class Metrics(BaseModel):
    totalEvents: int
    deliveredEvents: int
    failedEvents: int
    retryingEvents: int
    pendingEvents: int
    heldEvents: int
    averageDeliveryTime: int
    slaBreachedEvents: int
    slaMetEvents: int
    slaMetPercent: float | None
    startDate: int
    endDate: int


class AttemptOut(BaseModel):
    number: int
    startedAt: str
    latencyMs: int
    statusCode: int | None
    outcome: str
    errorClass: str | None
    errorMessage: str | None
    responseExcerpt: str | None


class DeliveryDetail(LogRecord):
    attempts: list[AttemptOut]
    originalPayload: dict[str, Any]
    deliveredPayload: dict[str, Any]
    enrichmentNotes: Any = None


class Replayed(BaseModel):
    deliveryId: str
    queued: int


class TestSent(BaseModel):
    eventId: str
    eventName: str
    webHookId: str
    status: str
    deliveryIds: list[str]


class TestBody(BaseModel):
    eventName: str | None = Field(
        None, examples=["pointsIssued"],
        description="One of the webhook's eventNames; default: the first of them")


def _object(records: list[dict[str, Any]]) -> dict[str, Any]:
    return {**records[0], "deliveries": records}


@router.get("/v3/webHooks/eventLog/{eventId}", responses=answers(200, EventLog))
# InTouch's reference spells this one path with a lower-case h; clients copied it from there.
@router.get("/v3/webhooks/eventLog/{eventId}", include_in_schema=False)
def event_log_by_event_id(eventId: str, org: Org, request: Request) -> JSONResponse:
    """The delivery records of one event; ``deliveries`` has one per webhook."""
    db = request.app.state.services.db
    return envelope(_object(logs.event_log(db, org, event_id=eventId)))


@router.get("/v3/webHooks/eventLog/refId/{refId}", responses=answers(200, EventLog))
def event_log_by_ref_id(refId: str, org: Org, request: Request) -> JSONResponse:
    """The delivery records of the event(s) with this refId; ``deliveries`` has them all."""
    db = request.app.state.services.db
    return envelope(_object(logs.event_log(db, org, ref_id=refId)))


@router.get("/v3/webHooks/eventLog/requestId/{requestId}", responses=answers(200, list[LogRecord]))
def event_log_by_request_id(requestId: str, org: Org, request: Request) -> JSONResponse:
    """Every delivery record of the events one API request (``apiRequestId``) caused."""
    db = request.app.state.services.db
    return envelope(logs.event_log(db, org, request_id=requestId))


@router.get("/v3/events/consumer-groups/{consumerGroupId}/logs", responses=answers(200, LogPage))
def consumer_group_logs(
    consumerGroupId: str, org: Org, request: Request,
    page: Annotated[int, Query(description="0-based page number")] = 0,
    size: Annotated[int, Query(description=f"1 to {logs.MAX_PAGE_SIZE}")] = 20,
    eventType: Annotated[str | None, Query()] = None,
    status: Annotated[str | None, Query(
        description="Delivery status(es), comma-separated: pending, in_flight, retrying, "
                    "delivered, failed, dead, held")] = None,
    startDate: Annotated[int | None, Query(description="Epoch ms; default 30 days ago")] = None,
    endDate: Annotated[int | None, Query(description="Epoch ms; default now")] = None,
    eventSearchKey: Annotated[str | None, Query(
        description="refId, apiRequestId, eventId, eventSearchKey or customerId")] = None,
    sortBy: Annotated[str | None, Query(description=", ".join(logs.SORTS))] = None,
    slaBreached: Annotated[bool | None, Query(
        description="true: only deliveries past their SLA (with a slaBreachTimestamp); "
                    "false: only the others")] = None,
) -> JSONResponse:
    """A webhook's delivery records, newest first by default; filters combine."""
    return envelope(logs.consumer_group_logs(
        request.app.state.services.db, org, consumerGroupId, now_ms=now_ms(),
        page=page, size=size, event_type=eventType, status=status, start_ms=startDate,
        end_ms=endDate, search_key=eventSearchKey, sort=sortBy, sla_breached=slaBreached))


@router.get("/v3/events/consumer-groups/{consumerGroupId}/metrics",
            responses=answers(200, Metrics))
def consumer_group_metrics(
    consumerGroupId: str, org: Org, request: Request,
    startDate: Annotated[int | None, Query(description="Epoch ms; default 30 days ago")] = None,
    endDate: Annotated[int | None, Query(description="Epoch ms; default now")] = None,
) -> JSONResponse:
    """Delivery counts by state, the mean delivery time (ms) of the webhook's events, and how
    many were delivered within the SLA and how many not (``slaMetPercent``: the share within)."""
    return envelope(logs.consumer_group_metrics(
        request.app.state.services.db, org, consumerGroupId, now_ms=now_ms(),
        start_ms=startDate, end_ms=endDate))


@router.get("/v3/deliveries/{deliveryId}", responses=answers(200, DeliveryDetail))
def delivery_detail(deliveryId: str, org: Org, request: Request) -> JSONResponse:
    """One delivery: its record, every attempt, and the payload as published and as sent."""
    return envelope(logs.delivery_detail(request.app.state.services.db, org, deliveryId))


@router.post("/v3/deliveries/{deliveryId}/replay", status_code=202,
             responses=answers(202, Replayed))
def replay_delivery(deliveryId: str, org: Org, request: Request) -> JSONResponse:
    """Send a delivery again, with the same ``webhook-id``. One in flight is left alone
    (``queued: 0``)."""
    services = request.app.state.services
    logs.require_delivery(services.db, org, deliveryId)
    done = pipeline.replay(services, [deliveryId], request.app.state.send_lease,
                           requested_by=caller_key(request), org_id=org)
    warnings = [] if done.queued else [
        "its event was emptied by retention (NOTIFIER_RETENTION_DAYS): nothing is left to "
        "send; not replayed" if done.emptied else
        "the delivery is being sent right now; not replayed"]
    return envelope({"deliveryId": deliveryId, "queued": done.queued}, status=202,
                    warnings=warnings)


@router.post("/v3/webHooks/{webHookId}/test", status_code=202, responses=answers(202, TestSent))
def send_test_event(webHookId: str, org: Org, request: Request,
                    body: TestBody | None = None) -> JSONResponse:
    """Publish an example event (valid against its schema) to this webhook only.

    It goes through the normal pipeline as a new event of the caller's org, so its log,
    attempts and replay work as for any other.
    """
    services = request.app.state.services
    event = logs.test_event(services.db, services.catalog, org, webHookId,
                            body.eventName if body else None, event_id=str(uuid.uuid4()),
                            now_ms=now_ms())
    outcome = pipeline.accept(services, event, request.app.state.send_lease,
                              only_webhook=webHookId)
    return envelope({"eventId": outcome.event_id, "eventName": event["eventName"],
                     "webHookId": webHookId, "status": outcome.status,
                     "deliveryIds": [q.delivery_id for q in outcome.queued]}, status=202)
