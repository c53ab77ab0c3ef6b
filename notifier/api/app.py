"""The FastAPI application: routers, the error envelope, and the services it runs on."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

import notifier
from config import Settings, load_settings
from notifier import ui
from notifier.api import routes_events, routes_logs, routes_org, routes_reference, routes_webhooks
from notifier.api.envelope import envelope, install_error_handlers
from notifier.api.health import Checks, HealthCheck
from notifier.api.limits import BodyLimit
from notifier.api.schemas import Envelope
from notifier.client import lease_sender, replay_sender
from notifier.metrics import ServiceCollector
from notifier.pipeline import SendLease, Services, build_services

__all__ = ["create_app"]




def create_app(settings: Settings | None = None, *, services: Services | None = None,
               send_lease: SendLease | None = None,
               hand_on_replay: Callable[[int], None] | None = None) -> FastAPI:
    """The API for ``settings`` (default: from the environment)."""
    settings = settings or load_settings()
    app = FastAPI(title="notifier", version=notifier.__version__,
                  description="Event notifications for loyalty platforms (InTouch v3 compatible).")
    app.state.services = services or build_services(settings)
    app.state.send_lease = send_lease or lease_sender(settings.broker_url)
    # What is left of a large replay, to a worker (see pipeline.replay_handing_on).
    app.state.hand_on_replay = hand_on_replay or replay_sender(settings.broker_url)
    install_error_handlers(app)
    app.include_router(routes_webhooks.router)
    app.include_router(routes_reference.router)
    app.include_router(routes_events.router)
    app.include_router(routes_logs.router)
    app.include_router(routes_org.router)
    ui.install(app)
    # Outermost, so that no handler (nor the session middleware) reads an oversized body.
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    checks = HealthCheck(settings)

    @app.get("/health", tags=["health"], responses={
        200: {"model": Envelope[Checks]}, 503: {"model": Envelope[Checks]}})
    async def health() -> JSONResponse:
        """200 when the database, Redis and the broker answer, else 503 naming what is down.

        ``workers`` counts the Celery workers that answered within a moment: reported, not
        required, since the API serves without them. ``unconsumed`` names each notifier queue
        with messages waiting that none of them consumes, with its length, and makes ``status``
        ``degraded`` (still 200): what waits there is not delivered until a worker takes that
        queue. Each check connects on its own with a timeout; the answer is shared by the
        callers of one second.
        """
        answer, healthy = await checks.answer()
        return envelope(answer, status=200 if healthy else 503)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector(app.state.services.queues, app.state.services.db,
                                        unconsumed=checks.unconsumed))

    @app.get("/metrics", tags=["health"], response_class=PlainTextResponse, responses={
        200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}})
    def metrics() -> Response:
        """The service's metrics in Prometheus' text format, for every worker and host: events,
        deliveries, attempts by webhook and outcome, response and delivery times, SLA breaches,
        and what waits now. Celery's own task metrics are Flower's ``/metrics``.
        """
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
