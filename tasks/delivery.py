"""The tasks: ingest events, deliver leases, carry replays on, and beat's sweep and SLA check."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded
from celery.worker.request import Request

from config import load_settings
from notifier import client, pipeline, store
from notifier.client import DELIVER_TASK, INGEST_TASK, REPLAY_TASK
from notifier.errors import TransientError
from notifier.faults import is_transient, reason, summary
from notifier.pipeline import DeliveryInterrupted
from notifier.queues import Lease
from tasks.app import app
from tasks.gathering import Gathering, SimpleRequest
from tasks.runtime import services

__all__ = ["check_sla", "deliver", "ingest", "replay", "send_lease", "sweep"]

log = logging.getLogger(__name__)

# Retries of a transient failure (database or Redis away) wait a few seconds, never long:
# a long countdown on Redis outlives the visibility timeout and runs again and again.
RETRY_COUNTDOWN_MAX = 30


def _countdown(retries_before: int) -> int:
    """Seconds before a retry: 1 s, doubling with each earlier retry, up to 30 s."""
    return int(min(2 ** retries_before, RETRY_COUNTDOWN_MAX))


def send_lease(lease: Lease) -> None:
    client.send_lease(app, lease)


@contextlib.contextmanager
def _sent_together() -> Iterator[Callable[[Lease], None]]:
    """A send function for the pipeline that holds the leases and sends them together at the
    end (``client.send_leases``), also when the step fails midway: their slots are taken."""
    held: list[Lease] = []
    try:
        yield held.append
    finally:
        if held:
            # A task's worth: what it sends side by side, each lease a batch.
            settings = services().settings
            client.send_leases(app, held, most=settings.batch_size * settings.send_concurrency)


class _Ingest(Gathering):
    # Gathered events go as soon as the worker's previous ingest task is done; the timer only
    # brings back retries whose countdown has run out.
    flush_interval = 0.1

    def configure(self, consumer: Any) -> None:
        self.flush_every = load_settings().ingest_batch_size

    def shown(self, request: Request) -> tuple[str, str]:
        # The event's ids, whoever sent it: a producer other than notifier.publish (`celery
        # call`, another language) leaves Celery's default argsrepr, the payload itself.
        shown = client.ingest_reprs(request.args, request.kwargs)
        return shown["argsrepr"], shown["kwargsrepr"]


@dataclass(frozen=True)
class _Message:
    """A gathered ingest message and the events it carries (``pipeline.message_events``)."""

    request: SimpleRequest
    envelopes: list[Any]


@app.task(name=INGEST_TASK, base=_Ingest)
def ingest(requests: list[SimpleRequest]) -> int:
    """Store, validate and fan out the events a worker gathered, queue and pump their deliveries.

    Each message carries one event envelope (``args=[envelope]``) or a list of them
    (``args=[[envelope, ...]]``, ``notifier.publish_many``), each event ingested as if it had
    come alone. The messages' events are stored in one transaction, or, past
    ``NOTIFIER_MAX_EVENTS_PER_MESSAGE`` events, in one per group of whole messages under it.
    Returns how many messages were settled (the gathering acknowledges them then): their
    events ingested, rejected for good, kept as dead letters, or sent again to be retried after
    a transient failure (``notifier.faults`` tells which).
    """
    most = services().settings.max_events_per_message
    messages = [_Message(request, pipeline.message_events(_body(request), most))
                for request in requests]
    with _sent_together() as send:
        for together in _transactions(messages, most):
            _ingest_together(together, send)
    return len(requests)


def _transactions(messages: list[_Message], most: int) -> Iterator[list[_Message]]:
    """The messages in groups of at most ``most`` events, each message whole (a longer one
    alone); one transaction each."""
    group: list[_Message] = []
    events = 0
    for message in messages:
        if group and events + len(message.envelopes) > most:
            yield group
            group, events = [], 0
        group.append(message)
        events += len(message.envelopes)
    if group:
        yield group


def _ingest_together(messages: list[_Message], send: Callable[[Lease], None]) -> None:
    envelopes = [envelope for message in messages for envelope in message.envelopes]
    if not envelopes:  # (messages of empty lists)
        return
    try:
        for outcome in pipeline.accept_many(services(), envelopes, send):
            _log_ended(outcome)
    except Exception as exc:
        if is_transient(exc):
            _ingest_later([(message, message.envelopes) for message in messages], exc)
        else:
            _each_on_its_own(messages, send)


def _each_on_its_own(messages: list[_Message], send: Callable[[Lease], None]) -> None:
    """One event's fault must not hold back the others: each on its own, and one that fails
    for good ends recorded (rejected, or a dead letter), never sent again."""
    for message in messages:
        failed: list[Any] = []
        fault: Exception | None = None
        for envelope in message.envelopes:
            try:
                outcome = pipeline.accept_or_end(services(), envelope, send)
            except Exception as exc:  # transient, or even the recording of its end failed
                failed.append(envelope)
                fault = exc
                continue
            _log_ended(outcome)
        if fault is not None:
            _ingest_later([(message, failed)], fault)


def _log_ended(outcome: store.IngestOutcome) -> None:
    """Log an event that ended rejected (or a dead letter): the path and the check, never the
    message, which may quote the offending value (personal data). The whole message is kept
    on the event's row (or its dead letter)."""
    if outcome.error:
        log.info("event %s %s at %s (%s)", outcome.event_id, outcome.status,
                 outcome.error_path or "$", outcome.error_rule or "stored before")


def _body(request: SimpleRequest) -> Any:
    """What the message carries: an envelope, or a list of them."""
    if len(request.args) == 1 and not request.kwargs:
        return request.args[0]
    if not request.args and set(request.kwargs) == {"envelope"}:
        return request.kwargs["envelope"]
    # Kept (rejected) rather than dropped: store.ingest_many names the problem.
    return {"args": list(request.args), "kwargs": dict(request.kwargs)}


def _waited(retries: int) -> int:
    """Seconds a message retried ``retries`` times has waited at least (its countdowns)."""
    return sum(_countdown(before) for before in range(retries))


def _ingest_later(failed: list[tuple[_Message, list[Any]]], exc: Exception) -> None:
    """Send the messages again, each with a countdown that doubles with its retries (1 s, 2 s,
    4 s, ... up to 30 s); the run acknowledges the originals once this returns. A message is
    sent again whole: those of its events that were stored are then duplicates, which ingest
    takes as it takes any redelivery. A message that has waited
    ``NOTIFIER_INGEST_RETRY_HORIZON`` has its failed events kept as dead letters instead (or,
    with the database away, is sent again: nothing is dropped)."""
    horizon = services().settings.ingest_retry_horizon
    sent = attempt = 0
    for message, envelopes in failed:
        request = message.request
        before = int((request.request_dict or {}).get("retries") or 0)
        if _waited(before) >= horizon and _kept_as_dead_letters(envelopes, exc, before, horizon):
            continue
        attempt, sent = max(attempt, before + 1), sent + len(envelopes)
        app.send_task(INGEST_TASK, args=request.args, kwargs=request.kwargs, task_id=request.id,
                      queue=client.QUEUE, retries=before + 1, countdown=_countdown(before),
                      **client.ingest_reprs(request.args, request.kwargs))
    if sent:
        log.warning("ingest of %d event(s) retried (attempt %d): %s", sent, attempt,
                    summary(exc))


def _kept_as_dead_letters(envelopes: list[Any], exc: Exception, retries: int,
                          horizon: float) -> bool:
    try:
        pipeline.dead_letter(services(), envelopes, (
            f"{reason(exc)}; still failing after {retries} retries over {_waited(retries)} s "
            f"(NOTIFIER_INGEST_RETRY_HORIZON is {horizon:g} s)"))
    except Exception as again:  # the database is away too: sent again, never dropped
        log.warning("event(s) %s past the retry horizon, not kept as dead letters yet: %s",
                    ", ".join(str(store.event_id_of(envelope)) for envelope in envelopes[:5]),
                    summary(again))
        return False
    return True


@app.task(name=DELIVER_TASK, bind=True, max_retries=3)
def deliver(self: Task, webhook_id: str, token: str, delivery_ids: list[str],
            slow: bool = False, more: list[list[Any]] | None = None,
            claimed_until: int | None = None, **newer: Any) -> None:
    """POST one lease's deliveries over one of the webhook's slots, and those of the leases in
    ``more`` (other webhooks', sent together: ``client.send_leases``), then send the next leases.

    ``claimed_until`` marks claims a task handed on or retried holds (``pipeline.deliver``). On
    a transient failure a retry carries on with the leases whose slots the task still holds; if
    the retries run out, those leases expire and the sweeper re-queues their deliveries.

    Options this version does not know (``newer``, sent by a newer worker during a rolling
    upgrade) are left out rather than failing the task, which would strand its leases until
    they expire.
    """
    if newer:
        log.info("delivery task options left out by this version: %s", sorted(newer))
    leases = [Lease(webhook_id, token, tuple(delivery_ids), slow=slow),
              *(Lease(hook, held, tuple(ids)) for hook, held, ids in more or ())]
    with _sent_together() as send:
        try:
            # The soft time limit (tasks.celeryconfig) stops the task as a transient error
            # does: its leases and claims carry on in a retry, its request is cut, not failed.
            pipeline.deliver(services(), leases, send, hand_on=_hand_on,
                             claimed_until=claimed_until, interruptions=(SoftTimeLimitExceeded,))
        except DeliveryInterrupted as exc:
            if not exc.leases:
                log.warning("delivery task stopped with nothing left to carry on: %s", exc)
                return
            first, *rest = exc.leases
            raise self.retry(args=client.lease_args(first),
                             kwargs={"slow": first.slow, "more": [client.lease_args(r) for r in rest],
                                     "claimed_until": exc.claimed_until},
                             exc=exc, countdown=_countdown(self.request.retries)) from exc


def _hand_on(leases: Sequence[Lease], claimed_until: int | None) -> None:
    client.send_leases(app, leases, most=1, claimed_until=claimed_until)  # one task each


@app.task(name=REPLAY_TASK, bind=True, max_retries=None)
def replay(self: Task, replay_id: int) -> None:
    """Queue what is left of a replay that the API or the admin pages made, from where the
    request that made it stopped (it queues the first batches itself, so that a small replay is
    done when it answers). Run again (a retry, or a redelivery after a crash), it carries on from
    its last committed batch: nothing is queued twice."""
    try:
        with _sent_together() as send:
            queued = pipeline.carry_on_replay(services(), replay_id, send)
    except TransientError as exc:
        raise self.retry(exc=exc, countdown=_countdown(self.request.retries)) from exc
    log.info("replay %d: %d more deliveries queued, all queued now", replay_id, queued)


@app.task(name="notifier.sweep", bind=True)
def sweep(self: Task) -> None:
    """Rebuild a flushed Redis, bring back due retries and expired leases, pump every queue,
    send the alerts kept but not sent."""
    try:
        with _sent_together() as send:
            report = pipeline.sweep(services(), send)
    except TransientError as exc:
        log.warning("sweep skipped: %s", exc)  # the next beat tick tries again
        return
    if report.rebuilt or report.expired or report.alerts_sent:
        log.info("sweep: %s", report)


@app.task(name="notifier.check_sla")
def check_sla() -> None:
    try:
        with _sent_together() as send:
            flagged = pipeline.check_sla(services(), send)
    except TransientError as exc:
        log.warning("SLA check skipped: %s", exc)
        return
    if flagged:
        log.info("SLA: %d deliveries flagged", flagged)
