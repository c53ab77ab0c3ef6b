"""``/v3/org``: the caller's org's operations webhook (which receives notifier's own alert
events about the org's webhooks) and its recent alerts."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from notifier import alerts
from notifier.api.auth import caller_org
from notifier.api.envelope import envelope

__all__ = ["router"]

router = APIRouter(prefix="/v3/org", tags=["org"])
Org = Annotated[int, Depends(caller_org)]


class OperationsWebhookBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    webHookId: str | None = Field(..., max_length=24, description=(
        "One of the org's webhooks, or null for none. It receives the alert events "
        "(slaBreached, webhookDisabled, webhookRecovered, deliveryExhausted) it is subscribed "
        "to, about every webhook of the org."))


@router.get("/operationsWebHook")
def get_operations_webhook(org: Org, request: Request) -> JSONResponse:
    return envelope({"webHookId": alerts.operations_webhook(request.app.state.services.db, org)})


@router.put("/operationsWebHook")
def set_operations_webhook(body: OperationsWebhookBody, org: Org,
                           request: Request) -> JSONResponse:
    named = alerts.set_operations_webhook(request.app.state.services.db, org, body.webHookId)
    return envelope({"webHookId": named})


@router.get("/alerts")
def recent_alerts(org: Org, request: Request) -> JSONResponse:
    """The org's latest alerts, newest first (as the admin pages' "Recent alerts")."""
    return envelope(alerts.recent(request.app.state.services.db, org))
