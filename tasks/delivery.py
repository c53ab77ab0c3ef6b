"""The tasks: ingest an event, deliver one lease, and beat's sweep and SLA check."""

from __future__ import annotations

import logging
from typing import Any

from celery import Task

from notifier import client, pipeline
from notifier.client import DELIVER_TASK, INGEST_TASK
from notifier.errors import TransientError
from notifier.queues import Lease
from tasks.app import app
from tasks.runtime import services

__all__ = ["check_sla", "deliver", "ingest", "send_lease", "sweep"]

log = logging.getLogger(__name__)

# Retries of a transient failure (database or Redis away) wait a few seconds, never long:
# a long countdown on Redis outlives the visibility timeout and runs again and again.
RETRY_COUNTDOWN_MAX = 30


def _countdown(task: Task) -> int:
    return int(min(2 ** task.request.retries, RETRY_COUNTDOWN_MAX))


def send_lease(lease: Lease) -> None:
    client.send_lease(app, lease)


@app.task(name=INGEST_TASK, bind=True, max_retries=None)
def ingest(self: Task, envelope: dict[str, Any]) -> None:
    """Store, validate and fan out one event; queue and pump its deliveries."""
    try:
        outcome = pipeline.accept(services(), envelope, send_lease)
    except TransientError as exc:
        raise self.retry(exc=exc, countdown=_countdown(self)) from exc
    if outcome.error:
        log.info("event %s rejected: %s", outcome.event_id, outcome.error)


@app.task(name=DELIVER_TASK, bind=True, max_retries=3)
def deliver(self: Task, webhook_id: str, token: str, delivery_ids: list[str],
            slow: bool = False) -> None:
    """POST one lease's deliveries over one of the webhook's slots, then send the next leases.

    On a transient failure the slot is kept: a retry carries on with it, and if the retries run
    out the lease expires and the sweeper re-queues its deliveries.
    """
    try:
        following = pipeline.deliver(services(), Lease(webhook_id, token, tuple(delivery_ids),
                                                        slow=slow))
    except TransientError as exc:
        raise self.retry(exc=exc, countdown=_countdown(self)) from exc
    for lease in following:
        send_lease(lease)


@app.task(name="notifier.sweep", bind=True)
def sweep(self: Task) -> None:
    """Rebuild a flushed Redis, bring back due retries and expired leases, pump every queue."""
    try:
        report = pipeline.sweep(services(), send_lease)
    except TransientError as exc:
        log.warning("sweep skipped: %s", exc)  # the next beat tick tries again
        return
    if report.rebuilt or report.expired:
        log.info("sweep: %s", report)


@app.task(name="notifier.check_sla")
def check_sla() -> None:
    try:
        flagged = pipeline.check_sla(services())
    except TransientError as exc:
        log.warning("SLA check skipped: %s", exc)
        return
    if flagged:
        log.info("SLA: %d deliveries flagged", flagged)
