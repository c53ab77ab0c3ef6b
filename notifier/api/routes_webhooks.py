"""``/v3/webHooks``: create, list, read, update (partial), delete (soft), rotate the secret."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from notifier import webhooks
from notifier.api.auth import caller_org
from notifier.api.envelope import envelope
from notifier.api.schemas import CreatedWebhookOut, RotatedOut, WebhookOut, answers
from notifier.pipeline import now_ms, webhook_context

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
