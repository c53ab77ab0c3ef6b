"""The response shapes, for /openapi.json: every answer is a ``{data, errors, warnings}`` envelope."""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, Field

__all__ = ["ERRORS", "Envelope", "ErrorItem", "WebhookOut", "answers"]

T = TypeVar("T")


class ErrorItem(BaseModel):
    code: str
    message: str
    field: str | None = None


class Envelope(BaseModel, Generic[T]):
    data: T | None
    errors: list[ErrorItem] | None
    warnings: list[str] | None


class Attribution(BaseModel):
    createdOn: str
    createdOnISO: str
    lastUpdatedOn: str
    lastUpdatedOnISO: str


class CircuitBreakerOut(BaseModel):
    """After NOTIFIER_BREAKER_FAILURES failed attempts in a row the breaker opens: nothing is
    sent to the webhook (its deliveries wait, their retries unspent) until, after a cool-down,
    one probe delivery succeeds."""

    state: Literal["closed", "open", "halfOpen"] = Field(description=(
        "closed: sending as usual; open: paused until nextProbeAt; halfOpen: one probe "
        "delivery may go, or is out."))
    consecutiveFailures: int = Field(description="Failed attempts since the last success.")
    nextProbeAt: str | None = Field(None, description=(
        "When the probe may go (ISO 8601, UTC); null while closed."))


class WebhookOut(BaseModel):
    webHookId: str
    name: str
    eventNames: list[str]
    webHookUrl: str
    webHookType: str
    methodType: str
    webHookHeaders: dict[str, str]
    maxAllowedConnections: int
    slaInSeconds: int
    consumerGroupId: str
    customerIdentifiersToBeEnriched: list[str]
    noOfRetryAttempts: int
    attribution: Attribution
    tillDetailsEnrichmentEnabled: bool
    storeDetailsEnrichmentEnabled: bool
    cardNumberEnrichmentEnabled: bool
    awardedReferenceEnrichmentEnabled: bool
    availablePointsBalanceEnrichmentEnabled: bool
    listenToChildEvents: bool
    active: bool
    disabledReason: str | None = Field(None, description=(
        "Why notifier deactivated the webhook (every attempt failed for "
        "NOTIFIER_DISABLE_FAILING_AFTER, or its endpoint answered 410 Gone); null otherwise. "
        "Activating it clears this."))
    circuitBreaker: CircuitBreakerOut | None = Field(None, description=(
        "The webhook's circuit breaker; null while Redis does not answer."))


class CreatedWebhookOut(WebhookOut):
    signingSecret: str


class RotatedOut(BaseModel):
    webHookId: str
    signingSecret: str
    previousSecretsValidForSeconds: int


class ReplayedDelivery(BaseModel):
    deliveryId: str
    webHookId: str
    eventName: str
    status: str
    lastStatusCode: int | None
    ingestedAt: str


class ReplayOut(BaseModel):
    replayId: int | None = Field(description="null for a dry run")
    matched: int
    queued: int
    skipped: int = Field(description="Pending or in flight already, or emptied: left as they "
                               "are")
    emptied: int = Field(description="Of those skipped, those whose event retention emptied "
                                     "(NOTIFIER_RETENTION_DAYS): nothing is left to send")
    queuing: bool = Field(False, description="A large replay: a worker queues the rest of it "
                          "(its progress tells when it is done)")
    notFound: list[str] = Field(description="deliveryIds that are no delivery of the webhook")
    sample: list[ReplayedDelivery] | None = Field(None, description="With dryRun only")


class ReplayProgressOut(BaseModel):
    replayId: int
    createdAt: str
    requestedBy: str
    orgId: int | None
    selection: dict[str, Any]
    queuing: bool = Field(description="Still queuing its deliveries (a large replay, in batches)")
    queued: int
    delivered: int
    failed: int
    toGo: int


class AcceptedEvent(BaseModel):
    eventId: str
    status: str


class CatalogEntry(BaseModel):
    eventName: str
    group: str | None = None
    description: str | None = None


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": Envelope[None], "description": "Invalid input; each error names its field"},
    401: {"model": Envelope[None], "description": "Missing, unknown or revoked API key"},
    404: {"model": Envelope[None], "description": "No such resource in the caller's org"},
    503: {"model": Envelope[None], "description": "Database or Redis unavailable; retry"},
}


def answers(status: int, model: Any) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` of a route: its success shape and the shared error shapes."""
    return {status: {"model": Envelope[model]}, **ERRORS}
