"""The tasks: ingest an event, deliver one lease, and beat's sweep and SLA check."""

from __future__ import annotations

import logging
from typing import Any

from celery import Task

from config import load_settings
from notifier import client, pipeline
from notifier.client import DELIVER_TASK, INGEST_TASK
from notifier.errors import TransientError
from notifier.queues import Lease
from tasks.app import app
from tasks.gathering import Gathering, SimpleRequest
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


class _Ingest(Gathering):
    # Gathered events go as soon as the worker's previous ingest task is done; the timer only
    # brings back retries whose countdown has run out.
    flush_interval = 0.1

    def configure(self, consumer: Any) -> None:
        self.flush_every = load_settings().ingest_batch_size


@app.task(name=INGEST_TASK, base=_Ingest)
def ingest(requests: list[SimpleRequest]) -> int:
    """Store, validate and fan out the events a worker gathered, queue and pump their deliveries.

    Each message carries one event envelope (``args=[envelope]``). Returns how many were settled:
    ingested, or sent again to be retried after a transient failure.
    """
    envelopes = [_envelope(request) for request in requests]
    try:
        pipeline.accept_many(services(), envelopes, send_lease)
    except TransientError as exc:
        _ingest_later(requests, exc)
    except Exception as exc:
        if len(requests) == 1:
            log.exception("ingest of event %s failed", _event_id(envelopes[0]))
            _ingest_later(requests, exc)
        else:
            # One event's fault must not hold back the others: each on its own.
            for request, envelope in zip(requests, envelopes, strict=True):
                try:
                    pipeline.accept(services(), envelope, send_lease)
                except Exception as exc:
                    if not isinstance(exc, TransientError):
                        log.exception("ingest of event %s failed", _event_id(envelope))
                    _ingest_later([request], exc)
    return len(requests)


def _envelope(request: SimpleRequest) -> Any:
    if len(request.args) == 1 and not request.kwargs:
        return request.args[0]
    if not request.args and set(request.kwargs) == {"envelope"}:
        return request.kwargs["envelope"]
    # Kept (rejected) rather than dropped: store.ingest_many names the problem.
    return {"args": list(request.args), "kwargs": dict(request.kwargs)}


def _event_id(envelope: Any) -> Any:
    return envelope.get("eventId") if isinstance(envelope, dict) else None


def _ingest_later(requests: list[SimpleRequest], exc: Exception) -> None:
    """Send the messages again, each with a countdown that doubles with its retries (1 s, 2 s,
    4 s, ... up to 30 s); the run acknowledges the originals once this returns."""
    attempt = 0
    for request in requests:
        retries = int((request.request_dict or {}).get("retries") or 0) + 1
        attempt = max(attempt, retries)
        app.send_task(INGEST_TASK, args=request.args, kwargs=request.kwargs, task_id=request.id,
                      queue=client.QUEUE, retries=retries,
                      countdown=min(2 ** (retries - 1), RETRY_COUNTDOWN_MAX))
    log.warning("ingest of %d event(s) retried (attempt %d): %s", len(requests), attempt, exc)


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
