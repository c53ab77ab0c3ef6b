"""``/v3/webHooks``: create, list, read, update (partial), delete (soft), rotate the secret,
replay by selection."""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from notifier import pipeline, replays, store, webhooks
from notifier.api.auth import caller_key, caller_org
from notifier.api.envelope import envelope
from notifier.api.schemas import (
    CreatedWebhookOut,
    ReplayOut,
    ReplayProgressOut,
    RotatedOut,
    WebhookOut,
    answers,
)
from notifier.clock import now_ms
from notifier.errors import InvalidInput
from notifier.pipeline import webhook_context

__all__ = ["router"]

router = APIRouter(prefix="/v3/webHooks", tags=["webHooks"])
Org = Annotated[int, Depends(caller_org)]


class WebhookBody(BaseModel):
    """The InTouch v3 webhook fields. On PUT every field is optional."""

    model_config = ConfigDict(extra="allow")

    name: str | None = Field(None, examples=["points_to_crm"])
    webHookUrl: str | None = Field(None, examples=["https://example.com/hook"])
    webHookHeaders: dict[str, str] | None = None
    eventNames: list[str] | None = Field(None, examples=[["pointsIssued"]])
    maxAllowedConnections: int | None = Field(None, examples=[10])
    slaInSeconds: int | None = Field(None, examples=[3600])
    active: bool | None = None
    methodType: str | None = Field(None, examples=["POST"])
    webHookType: str | None = Field(None, examples=["HTTP"])
    tillDetailsEnrichmentEnabled: bool | None = None
    storeDetailsEnrichmentEnabled: bool | None = None
    customerIdentifiersToBeEnriched: list[str] | None = None
    cardNumberEnrichmentEnabled: bool | None = None
    awardedReferenceEnrichmentEnabled: bool | None = None
    availablePointsBalanceEnrichmentEnabled: bool | None = None
    listenToChildEvents: bool | None = None
    deliverHeld: bool | None = Field(None, description=(
        "With active true: queue the deliveries the webhook held while it was inactive, in "
        "the order they were ingested. Without it they stay held (replayable)."))


class RotateBody(BaseModel):
    # Range checked by webhooks.rotate_secret, as from every other room.
    overlapSeconds: int = Field(webhooks.ROTATION_OVERLAP_SECONDS)


def _context(request: Request) -> webhooks.Context:
    return webhook_context(request.app.state.services, request.app.state.send_lease)


def _given(body: WebhookBody) -> dict[str, Any]:
    return body.model_dump(exclude_unset=True)


@router.post("", status_code=201, responses=answers(201, CreatedWebhookOut))
def create_webhook(body: WebhookBody, org: Org, request: Request) -> JSONResponse:
    """Create a webhook. The response carries ``signingSecret``, shown this once only."""
    saved = webhooks.create(_context(request), org, _given(body), now_ms=now_ms())
    return envelope({**saved.view, "signingSecret": saved.secret}, status=201,
                    warnings=saved.warnings)


@router.get("", responses=answers(200, list[WebhookOut]))
def list_webhooks(org: Org, request: Request) -> JSONResponse:
    return envelope(webhooks.list_all(_context(request), org))


@router.get("/{webHookId}", responses=answers(200, WebhookOut))
def get_webhook(webHookId: str, org: Org, request: Request) -> JSONResponse:
    return envelope(webhooks.get(_context(request), org, webHookId))


@router.put("/{webHookId}", responses=answers(200, WebhookOut))
def update_webhook(webHookId: str, body: WebhookBody, org: Org,
                   request: Request) -> JSONResponse:
    saved = webhooks.update_webhook(_context(request), org, webHookId, _given(body),
                                    now_ms=now_ms())
    return envelope(saved.view, warnings=saved.warnings)


@router.delete("/{webHookId}", responses=answers(200, WebhookOut))
def delete_webhook(webHookId: str, org: Org, request: Request) -> JSONResponse:
    """Deactivate the webhook (InTouch's delete is soft: history stays); unlike a deactivated
    one, it holds no events."""
    return envelope(webhooks.delete_webhook(_context(request), org, webHookId,
                                            now_ms=now_ms()))


@router.post("/{webHookId}/secret/rotate", responses=answers(200, RotatedOut))
def rotate_secret(webHookId: str, org: Org, request: Request,
                  body: RotateBody | None = None) -> JSONResponse:
    """A new signing secret, shown once; the old one keeps signing for ``overlapSeconds``."""
    overlap = body.overlapSeconds if body else webhooks.ROTATION_OVERLAP_SECONDS
    secret = webhooks.rotate_secret(_context(request), org, webHookId, now_ms=now_ms(),
                                    overlap_seconds=overlap)
    return envelope({"webHookId": webHookId, "signingSecret": secret,
                     "previousSecretsValidForSeconds": overlap})


class ReplayBody(BaseModel):
    """Which of the webhook's deliveries to send again (each criterion given must hold; at least
    one), as ``celery -A tasks replay`` takes them."""

    # A misspelt criterion is refused, never read as "every delivery of the webhook".
    model_config = ConfigDict(extra="forbid")

    deliveryIds: list[str] | None = None
    eventId: str | None = None
    status: list[str] | None = Field(None, examples=[["failed", "dead"]])
    eventName: list[str] | None = Field(None, examples=[["pointsIssued"]])
    since: str | None = Field(None, description="Ingested at or after: ISO 8601 or a time ago "
                              "(30m, 2h, 3d).", examples=["2h"])
    until: str | None = Field(None, description="Ingested before (as since).")
    responseStatus: str | None = Field(None, description="The last answer's status code (404) "
                                       "or class (5xx).", examples=["5xx"])
    dryRun: bool = Field(False, description="Count and show a sample; send nothing.")


# Deliveries shown with a dry run.
_SAMPLE = 5


@router.post("/{webHookId}/replay", status_code=202, responses=answers(202, ReplayOut))
def replay(webHookId: str, body: ReplayBody, org: Org, request: Request) -> JSONResponse:
    """Send the webhook's deliveries that match again, with their ``webhook-id``, behind its
    live traffic. Those pending or in flight are skipped (queued already), and so are those
    whose event retention emptied (``emptied``: nothing is left to send). Answers the count and
    the replay's id (``GET .../replays/{replayId}`` for its progress); with ``dryRun``, the
    count and a sample, and no replay. A large replay answers once its first few thousand
    deliveries are queued (``queuing``: a worker queues the rest; ``queued`` grows in its
    progress)."""
    services = request.app.state.services
    webhooks.get(_context(request), org, webHookId)
    selection = replace(replays.selection(
        now_ms=now_ms(), delivery_ids=body.deliveryIds or (), event_id=body.eventId,
        statuses=body.status or (), event_names=body.eventName or (), since=body.since,
        until=body.until, response_status=body.responseStatus), webhook=webHookId, org_id=org)
    counted = store.count_selection(services.db, selection)
    answer = {"replayId": None, "matched": counted.matched, "queued": 0,
              "skipped": counted.skipped, "emptied": counted.emptied,
              "notFound": list(counted.not_found)}
    if counted.not_found and not body.dryRun:
        first = counted.not_found[0]
        raise InvalidInput(("deliveryIds", selection.delivery_ids.index(first)),
                           f"{first} is no delivery of webhook {webHookId}: nothing replayed")
    if body.dryRun:
        sample = store.sample_selection(services.db, selection, most=_SAMPLE)
        return envelope({**answer, "sample": [row.as_json() for row in sample]})
    done = pipeline.replay_handing_on(services, selection, request.app.state.send_lease,
                                      request.app.state.hand_on_replay,
                                      requested_by=caller_key(request), org_id=org)
    return envelope({**answer, "replayId": done.replay_id, "queued": done.queued,
                     "skipped": done.skipped, "emptied": done.emptied,
                     "queuing": not done.finished}, status=202)


@router.get("/{webHookId}/replays/{replayId}", responses=answers(200, ReplayProgressOut))
def replay_progress(webHookId: str, replayId: int, org: Org, request: Request) -> JSONResponse:
    """A replay of the webhook and its progress: of the deliveries it queued, how many are
    delivered, failed (for good, or dead) and still to go."""
    webhooks.get(_context(request), org, webHookId)
    return envelope(store.replay_of(request.app.state.services.db, replayId, org_id=org,
                                    webhook_id=webHookId).as_json())
