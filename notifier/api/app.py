"""The FastAPI application: routers, the error envelope, and the services it runs on."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

import notifier
from config import Settings, load_settings
from notifier import ui
from notifier.api import routes_events, routes_logs, routes_webhooks
from notifier.api.envelope import envelope, install_error_handlers
from notifier.api.schemas import Envelope
from notifier.client import DELIVER_TASK, QUEUE, producer
from notifier.errors import TransientError
from notifier.pipeline import SendLease, Services, build_services
from notifier.queues import Lease

__all__ = ["create_app"]


def _lease_sender(broker_url: str) -> SendLease:
    app = producer(broker_url)

    def send(lease: Lease) -> None:
        app.send_task(DELIVER_TASK, args=[lease.webhook_id, lease.token, list(lease.delivery_ids)],
                      queue=QUEUE)

    return send


def create_app(settings: Settings | None = None, *, services: Services | None = None,
               send_lease: SendLease | None = None) -> FastAPI:
    """The API for ``settings`` (default: from the environment)."""
    settings = settings or load_settings()
    app = FastAPI(title="notifier", version=notifier.__version__,
                  description="Event notifications for loyalty platforms (InTouch v3 compatible).")
    app.state.services = services or build_services(settings)
    app.state.send_lease = send_lease or _lease_sender(settings.broker_url)
    install_error_handlers(app)
    app.include_router(routes_webhooks.router)
    app.include_router(routes_events.router)
    app.include_router(routes_logs.router)
    ui.install(app)

    @app.get("/health", tags=["health"], responses={
        200: {"model": Envelope[dict[str, str]]}, 503: {"model": Envelope[dict[str, str]]}})
    def health(request: Request) -> JSONResponse:
        """Database and Redis reachable: 200; otherwise 503 naming what is not."""
        running: Services = request.app.state.services
        checks = {}
        try:
            with running.db.session() as session:
                session.execute(text("SELECT 1"))
            checks["database"] = "ok"
        except TransientError as exc:
            checks["database"] = str(exc)
        try:
            running.queues.ping()
            checks["redis"] = "ok"
        except TransientError as exc:
            checks["redis"] = str(exc)
        healthy = all(v == "ok" for v in checks.values())
        return envelope(checks, status=200 if healthy else 503)

    return app
