"""The delivery pipeline as plain functions: accept an event, pump queues, deliver a lease, sweep.

Nothing here knows Celery. Where a step must start more work (a lease to send), it calls the
``send`` function it was given; ``tasks/`` passes one that publishes the delivery task.

The steps of one delivery are ``enrich -> render -> sign -> post -> judge``: each a plain
function, run here back to back in one task (one broker round trip per batch instead of one per
step; see the performance issue for the measurements).
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import requests
from sqlalchemy import Connection

from config import Settings
from notifier import alerts, faults, store, webhooks
from notifier.clock import iso_ms, now_ms
from notifier.db import Database
from notifier.enrich import additions, enrich, prefetch
from notifier.errors import NotFound, StateLost, StoreRefused, TooManyEvents, TransientError
from notifier.metrics import Tally
from notifier.models import DeliveryStatus, EventStatus
from notifier.queues import Lease, Queues, Report
from notifier.reference import Lookups
from notifier.replays import Selection
from notifier.retry import next_attempt_at_ms
from notifier.schemas import EventCatalog, load_catalog
from notifier.sender import (
    GONE_STATUS,
    Cutter,
    HttpSender,
    OutboundRequest,
    Result,
    Sender,
    Verdict,
    classify,
    retry_after_seconds,
)
from notifier.signing import signature_headers
from notifier.vault import Vault, vault_for

__all__ = [
    "DEAD_LETTER",
    "REPLAY_BATCH",
    "DeliveryInterrupted",
    "HandOn",
    "Replayed",
    "Services",
    "SweepReport",
    "accept",
    "accept_many",
    "accept_or_end",
    "alert_webhook_recovered",
    "breaker_views",
    "build_services",
    "carry_on_replay",
    "check_sla",
    "dead_letter",
    "deliver",
    "judge",
    "limit_changed",
    "message_events",
    "pump",
    "purge",
    "raise_alerts",
    "rebuild",
    "recover",
    "reject_for_good",
    "render",
    "replay",
    "replay_dead_letters",
    "replay_handing_on",
    "replay_selection",
    "request_for",
    "sweep",
    "webhook_context",
]

log = logging.getLogger(__name__)
# One line per delivery attempt, its fields also as data (``extra``) for NOTIFIER_LOG_FORMAT=json.
attempt_log = logging.getLogger("notifier.attempts")

SendLease = Callable[[Lease], None]
EXCERPT_BYTES = 1024
_OWN_HEADERS = frozenset({"content-type", "content-length", "host"})


class DeliveryInterrupted(TransientError):
    """A delivery task stopped midway by a transient error or by its time limit (its cause,
    chained).

    ``leases`` are the task's leases whose slots it had not given back yet, for a retry to
    carry on with; ``claimed_until`` marks the claims on their deliveries that it still holds
    (``store.claim``'s ``held_until``).
    """

    def __init__(self, cause: BaseException, leases: Sequence[Lease],
                 claimed_until: int | None) -> None:
        super().__init__(str(cause))
        self.leases = tuple(leases)
        self.claimed_until = claimed_until


@dataclass
class Services:
    """What the pipeline runs on; one per process."""

    settings: Settings
    db: Database
    queues: Queues
    catalog: EventCatalog
    sender: Sender
    vault: Vault
    rng: random.Random = field(default_factory=random.Random)
    # Reference-data reads for enrichment, shared by this process's deliveries of one event.
    lookups: Lookups = field(init=False)

    def __post_init__(self) -> None:
        self.lookups = Lookups(self.db)

    @property
    def lease_ms(self) -> int:
        return round(self.settings.slot_lease_seconds * 1000)


def build_services(settings: Settings) -> Services:
    return Services(
        settings=settings,
        db=Database(settings.database_url, timeout=settings.database_timeout),
        queues=Queues(settings.redis_url, settings.redis_prefix,
                      slow_ms=settings.slow_webhook_ms, linger_ms=settings.batch_linger_ms,
                      fast_leases=settings.fast_lane_leases,
                      riders=settings.send_concurrency - 1,
                      breaker_failures=settings.breaker_failures,
                      breaker_cooldown_ms=round(settings.breaker_cooldown * 1000),
                      breaker_cooldown_max_ms=round(settings.breaker_cooldown_max * 1000)),
        catalog=load_catalog(),
        sender=HttpSender(timeout=settings.http_timeout,
                          max_response_bytes=settings.max_response_bytes,
                          deadline=settings.http_deadline,
                          allowed_networks=settings.allow_private_networks),
        vault=vault_for(settings.secret_keys, settings.data_dir),
    )


def _by_webhook(queued: Iterable[store.Queued]) -> dict[str, list[store.Queued]]:
    by_hook: dict[str, list[store.Queued]] = defaultdict(list)
    for item in queued:
        by_hook[item.webhook_id].append(item)
    return by_hook


def _enqueue(services: Services, queued: Iterable[store.Queued], *, replay: bool = False) -> None:
    for webhook_id, items in _by_webhook(queued).items():
        services.queues.enqueue(webhook_id, items[0].limit,
                                [(i.delivery_id, i.score) for i in items], replay=replay)


def _offer(services: Services, queued: Iterable[store.Queued], send: SendLease) -> int:
    """Queue deliveries and send a lease for every free slot of their webhooks; returns how
    many leases were sent."""
    offers = [(webhook_id, items[0].limit, [(i.delivery_id, i.score) for i in items])
              for webhook_id, items in _by_webhook(queued).items()]
    if not offers:
        return 0
    sent, lost = 0, False
    for leases in services.queues.offer_many(offers, batch=services.settings.batch_size,
                                             lease_ms=services.lease_ms, now_ms=now_ms()):
        if leases is None:  # queued all the same; they go once Redis is rebuilt
            lost = True
            continue
        for lease in leases:
            send(lease)
            sent += 1
    return sent + (recover(services, send) if lost else 0)


def accept(services: Services, envelope: Mapping[str, Any], send: SendLease, *,
           only_webhook: str | None = None, own: bool = False) -> store.IngestOutcome:
    """Store, validate and fan out one event, queue its deliveries and send what can go now.

    ``only_webhook`` narrows the fan-out to one webhook (see ``store.ingest_many``). ``own``:
    one of notifier's own events (an alert), which a producer's event may not be.
    """
    return accept_many(services, [envelope], send, only_webhook=only_webhook, own=own)[0]


def accept_many(services: Services, envelopes: Sequence[Mapping[str, Any]], send: SendLease, *,
                only_webhook: str | None = None, own: bool = False) -> list[store.IngestOutcome]:
    """``accept`` for several events: one transaction stores them all, and each webhook's new
    deliveries reach its queue in one call."""
    outcomes = store.ingest_many(services.db, services.catalog, envelopes, now_ms=now_ms(),
                                 only_webhook=only_webhook,
                                 max_event_bytes=services.settings.max_event_bytes,
                                 reserved=() if own else alerts.KINDS)
    _offer(services, [queued for outcome in outcomes for queued in outcome.queued], send)
    tally = Tally()
    tally.ingest_batch()
    for outcome in outcomes:
        if not outcome.created:
            tally.event("duplicate")
        elif outcome.status == EventStatus.REJECTED:
            tally.event("rejected")
        else:
            tally.event("accepted", deliveries=len(outcome.queued))
    _count(services, tally)
    return outcomes


def message_events(body: Any, most: int) -> list[Any]:
    """The events one ingest message carries: its envelope, or each envelope of the list it
    carries (``notifier.publish_many``), each to be ingested as if it had come alone.

    A list of more than ``most`` (``NOTIFIER_MAX_EVENTS_PER_MESSAGE``) is not ingested: each of
    its events is stored rejected, by its names only (``store.Refused``), as an event over the
    size limit is, so that nothing sent is lost and none is delivered.
    """
    if not isinstance(body, list):
        return [body]
    if len(body) <= most:
        return body
    problem = TooManyEvents("$", f"is one of the {len(body)} events of one message, over the "
                                 f"limit of {most} (NOTIFIER_MAX_EVENTS_PER_MESSAGE)")
    return [store.Refused(envelope, problem) for envelope in body]


# The status of an ingest outcome whose event was kept as a dead letter, not stored.
DEAD_LETTER = "deadLetter"


def accept_or_end(services: Services, envelope: Any, send: SendLease) -> store.IngestOutcome:
    """``accept``; an event that fails for good ends recorded instead (``reject_for_good``),
    and the outcome says how. Transient failures raise: the caller tries again later."""
    try:
        return accept(services, envelope, send)
    except Exception as exc:
        if faults.is_transient(exc):
            raise
        # Its kind, never its message (see faults.summary): the reason is kept with the event.
        log.error("ingest of event %s failed for good: %s", store.event_id_of(envelope),
                  faults.summary(exc))
        return reject_for_good(services, envelope, exc)


def reject_for_good(services: Services, envelope: Any, fault: BaseException) -> store.IngestOutcome:
    """End the ingest of an event that failed for good (``fault`` is permanent) with a recorded
    reason: stored as rejected, or, when even that is refused, kept as a dead letter (the
    outcome's status is then ``DEAD_LETTER``). A transient failure of these writes raises: the
    caller tries again later, and nothing is lost. The outcome's ``error_rule`` is what a log
    line may say of the fault (``faults.summary``); its ``error``, the whole reason, may not."""
    reason = f"not stored: {faults.reason(fault)}"
    try:
        outcome = store.reject(services.db, envelope, reason, now_ms=now_ms())
    except Exception as exc:
        if faults.is_transient(exc):
            raise
        log.warning("event %s could not be stored even as rejected: %s",
                    store.event_id_of(envelope), faults.summary(exc))
        reason += f"; nor as rejected: {faults.reason(exc)}"
        (letter,) = dead_letter(services, [envelope], reason)
        return store.IngestOutcome(store.event_id_of(envelope) or "", DEAD_LETTER, False,
                                   f"kept as dead letter {letter}: {reason}",
                                   error_rule=faults.summary(fault))
    tally = Tally()
    tally.event("rejected")
    _count(services, tally)
    return replace(outcome, error_rule=faults.summary(fault))


def dead_letter(services: Services, envelopes: Sequence[Any], reason: str) -> list[int]:
    """Keep events that cannot be ingested as dead letters, with ``reason``; returns their ids
    (``notifier dead-letters list`` shows them, ``replay`` ingests them again)."""
    ids = store.dead_letter(services.db, envelopes, reason, now_ms=now_ms())
    for envelope, letter in zip(envelopes, ids, strict=True):
        # Not the reason: it may quote the event's values (`notifier dead-letters list` shows it).
        log.error("event %s kept as dead letter %d", store.event_id_of(envelope), letter)
    return ids


def replay_dead_letters(db: Database, ids: Sequence[int],
                        publish: Callable[[Any], None]) -> int:
    """Ingest dead letters again (once their cause is fixed) by ``publish``ing each envelope as
    a producer would; returns how many. A letter that fails again becomes a new dead letter."""
    letters = store.replayable_dead_letters(db, ids)
    for letter, envelope in letters:
        publish(envelope)
        # Marked as each goes out: a replay failing midway leaves only what did not go.
        store.mark_replayed(db, [letter], now_ms=now_ms())
    return len(letters)


def _count(services: Services, tally: Tally) -> None:
    """Add what a step counted to the metrics. Redis failing here loses the counts, never the
    work they count."""
    try:
        services.queues.add_counts(tally.snapshot())
    except TransientError as exc:
        log.warning("metrics not counted: %s", exc)


def pump(services: Services, webhook_ids: Iterable[str], send: SendLease) -> int:
    """Hand every free slot of these webhooks a batch of their queue; returns leases sent.
    A Redis that lost its state is rebuilt first (``recover``)."""
    try:
        return _dispatch(services, webhook_ids, send)
    except StateLost:
        return recover(services, send)


def _dispatch(services: Services, webhook_ids: Iterable[str], send: SendLease) -> int:
    sent = 0
    for webhook_id in webhook_ids:
        for lease in services.queues.dispatch(
                webhook_id, batch=services.settings.batch_size, lease_ms=services.lease_ms,
                now_ms=now_ms()):
            send(lease)
            sent += 1
    return sent


def limit_changed(services: Services, webhook_id: str, limit: int, send: SendLease) -> int:
    """A webhook was saved with ``maxAllowedConnections=limit``: Redis enforces it at once (a
    lowered cap starts no new lease until enough are back; a raised one takes in what waits).
    Returns the leases sent. With Redis away the cap comes with the webhook's next event.

    The save (an activation, a new cap) also closes the webhook's circuit breaker: its org has
    looked at it, as the failing period of NOTIFIER_DISABLE_FAILING_AFTER starts again then; a
    breaker left open from before its deactivation would hold back what it is sent next for up
    to NOTIFIER_BREAKER_COOLDOWN_MAX."""
    try:
        services.queues.reset_breaker(webhook_id)
        services.queues.set_limit(webhook_id, limit)
        return pump(services, [webhook_id], send)
    except TransientError as exc:
        log.warning("webhook %s: its new limit waits for its next event: %s", webhook_id, exc)
        return 0


def webhook_context(services: Services, send: SendLease) -> webhooks.Context:
    """What every room (API, admin pages, CLI) saves webhooks with: the settings' bounds, a
    saved connection limit that holds at once (``limit_changed``), and held deliveries queued
    as any others when an activation delivers them."""
    settings = services.settings
    return webhooks.Context(
        services.db, services.catalog, services.vault, settings.allow_private_networks,
        webhooks.Bounds(max_headers=settings.webhook_max_headers,
                        max_header_bytes=settings.webhook_max_header_bytes,
                        max_connections=settings.max_allowed_connections),
        limit_changed=lambda webhook_id, limit: limit_changed(services, webhook_id, limit, send),
        deliver=lambda webhook_id, limit, items: _offer(
            services, [store.Queued(webhook_id, limit, delivery_id, ingested_at_ms)
                       for delivery_id, ingested_at_ms in items], send),
        breakers=lambda webhook_ids: breaker_views(services, webhook_ids))


def breaker_views(services: Services, webhook_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The circuit breakers of these webhooks as the API and the admin pages show them
    (``circuitBreaker``): ``state`` (closed, open, halfOpen), ``consecutiveFailures`` and
    ``nextProbeAt`` (null unless open)."""
    return {webhook_id: {"state": breaker.state,
                         "consecutiveFailures": breaker.consecutive_failures,
                         "nextProbeAt": iso_ms(breaker.next_probe_at_ms)}
            for webhook_id, breaker in services.queues.breakers(
                webhook_ids, now_ms=now_ms()).items()}


def render(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def request_for(target: store.Target, delivery_id: str, body: bytes,
                timestamp: int) -> OutboundRequest:
    """The signed request: the webhook's own headers, then ours (which a webhook cannot override)."""
    headers = {name: value for name, value in target.headers.items()
               if name.lower() not in _OWN_HEADERS and not name.lower().startswith("webhook-")}
    headers["Content-Type"] = "application/json"
    headers.update(signature_headers(target.secrets, delivery_id, timestamp, body))
    return OutboundRequest(target.url, headers, body)


def judge(services: Services, claimed: store.Claimed, result: Result,
          started_at_ms: int) -> store.Finished:
    """Turn one POST's result into the delivery's next state."""
    verdict = classify(result)
    # Gone (410): held with what else its webhook, deactivated for it, would have sent.
    outcome = {Verdict.DELIVERED: DeliveryStatus.DELIVERED,
               Verdict.FAILED: DeliveryStatus.FAILED,
               Verdict.GONE: DeliveryStatus.HELD}.get(verdict, DeliveryStatus.RETRYING)
    due = None
    if verdict is Verdict.RETRY:
        settings = services.settings
        due = next_attempt_at_ms(
            attempts_made=claimed.attempt_count + 1, now_ms=now_ms(),
            ingested_at_ms=claimed.ingested_at_ms, schedule=settings.retry_schedule,
            jitter=settings.retry_jitter, horizon=settings.retry_horizon,
            retry_after=retry_after_seconds(result, time.time()),
            retry_after_max=settings.retry_after_max, rng=services.rng)
        if due is None:
            outcome = DeliveryStatus.DEAD
    error = result.error
    return store.Finished(
        claimed=claimed, started_at_ms=started_at_ms, latency_ms=result.latency_ms,
        outcome=outcome, status_code=result.status_code,
        error_class=type(error).__name__ if error else None,
        error_message=_storable(str(error)[:2000]) if error else None,
        response_excerpt=_storable(
            result.body_excerpt[:EXCERPT_BYTES].decode("utf-8", "replace")),
        next_attempt_at_ms=due)


def _storable(text: str) -> str:
    # PostgreSQL text cannot hold NUL: a receiver answering zeros (a gzip bomb does) made the
    # attempt's row fail to insert, and the delivery waited for its lease to expire, again.
    return text.replace("\x00", "\ufffd")


HandOn = Callable[[Sequence[Lease], int | None], None]


def deliver(services: Services, leases: Sequence[Lease], send: SendLease, *, hand_on: HandOn,
            claimed_until: int | None = None,
            interruptions: tuple[type[BaseException], ...] = ()) -> None:
    """Send the deliveries of a task's leases (one per webhook, but for those riding with a
    webhook's fast-lane lease: ``Lease.rides``), each lease's one after another over its slot,
    then give the slots back and ``send`` the leases that follow (what queued
    while these were out).

    The round trips are the task's, not each lease's: one Redis call takes every lease (topped
    up with what queued since it was dispatched), one statement claims all their deliveries, one
    reads their webhooks, one transaction records every attempt (``_Ledger``), one Redis call
    gives every slot back and dispatches what waits. Only the POST is one per delivery.

    The leases after the first wait at most ``NOTIFIER_SLOW_WEBHOOK_MS`` from the start (nor
    past ``NOTIFIER_BATCH_TIME_BUDGET``): then those not started are handed on with
    ``hand_on(leases, claimed_until)``, so that a webhook that turns slow cannot hold up the
    others. ``claimed_until`` marks the claims that a task handed on or retried still holds
    (``store.claim``'s ``held_until``).

    Deliveries already finished or held by someone else are skipped (at-least-once, never the
    same delivery twice at once): those held are looked at again when the other claim would
    run out (``Queues.recheck``); retries not due yet are parked until they are. A transient
    failure raises ``DeliveryInterrupted`` with the leases not given back: their slots stay
    taken, and a retry carries on with them, or they expire and the sweeper re-queues what
    they carried. ``interruptions`` are the exceptions that stop a task from outside (its
    runner's time limit): they end it the same way, never as a failed delivery.
    """
    task = _Task(services, leases, claimed_until, (TransientError, *interruptions))
    try:
        task.run(send, hand_on)
    except task.interruptions as exc:
        task.record_what_was_sent()
        task.count_what_was_kept()
        raise DeliveryInterrupted(exc, task.unreleased(), task.claimed_until) from exc
    finally:
        _count(services, task.tally)


def _duration(ms: float) -> str:
    seconds = ms / 1000
    if seconds < 3600:
        return f"{seconds:.0f} s"
    if seconds < 86_400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86_400:.1f} days"


@dataclass
class _Aftermath:
    """The alerts a delivery task kept, each in the transaction of what raised it (a dead
    delivery's record, a late attempt's, a webhook's deactivation), to send once it has given its
    slots back: ``kept``, each with when, counted as they were kept; and ``unsure``, those kept
    by a deactivation stopped before it returned (committed or not), which the task counts on
    its way out if they were (``_Task.count_what_was_kept``).
    Never about alert events (an alert never raises one about itself)."""

    kept: list[tuple[alerts.Alert, int]] = field(default_factory=list)
    unsure: list[alerts.Alert] = field(default_factory=list)


@dataclass(frozen=True)
class _Sent:
    """An attempt a task made and has not recorded yet."""

    webhook_id: str
    # None for a lease whose webhook could not be read (``_fail_lot``).
    target: store.Target | None
    finished: store.Finished


class _Ledger:
    """The attempts of one delivery task, recorded together (``record``): one ``store.finish``,
    one transaction of a few statements for the whole batch, instead of one per attempt.

    What it costs: a task killed between a send and the record loses the records of the sends
    since its last record, never a delivery. Their claims expire and they go again with the
    same ``webhook-id`` (at-least-once), and the re-send is recorded. For that, a task records
    before it gives any slot back: a slot given back takes its lease out of Redis, and with it
    what brings back (a retry of the task, or the sweeper once the lease expires) a delivery
    whose record then failed. And it parks a retry only once it is recorded: Redis follows the
    database, never ahead of it.

    The count, the log line and the alerts stay per attempt, once it is recorded.
    """

    def __init__(self, services: Services, tally: Tally, aftermath: _Aftermath) -> None:
        self._services = services
        self._tally = tally
        self._aftermath = aftermath
        self._unrecorded: list[_Sent] = []
        # The alerts its records kept (key -> when): one written again after its commit (the
        # task stopped right then) finds them kept by itself (``_KeepAlerts``).
        self._kept: dict[str, int] = {}
        # Records that stamped SLA breaches and raised, maybe after their commit (``_settle``).
        self._unsure: list[_KeepAlerts] = []
        # The task's sending threads share it: one records at a time, the others' attempts
        # wait for the next record.
        self._lock = threading.RLock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._unrecorded)

    def add(self, webhook_id: str, target: store.Target | None,
            finished: store.Finished) -> None:
        with self._lock:
            self._unrecorded.append(_Sent(webhook_id, target, finished))

    def met_sla_due_within(self, ms: float) -> bool:
        """Whether a delivery sent in time and not recorded yet reaches its SLA's due time
        within ``ms``: past it, beat's check would stamp as breached a delivery whose record
        (not written yet) says it met its SLA."""
        soon = now_ms() + ms
        with self._lock:
            return any(sent.finished.outcome == DeliveryStatus.DELIVERED
                       and not sent.finished.late
                       and sent.finished.claimed.sla_due_at_ms is not None
                       and sent.finished.claimed.sla_due_at_ms <= soon
                       for sent in self._unrecorded)

    def record(self) -> None:
        """Record the attempts made since the last record, then count, log and park them.
        A transient failure raises and keeps them, for the task to record on its way out or
        for its retry to send again.

        The alerts the attempts raise are kept in the same transaction as their record
        (``_KeepAlerts``): ``deliveryExhausted`` for a delivery that died, ``slaBreached`` for
        the breaches that late ones stamp. A task stopped after its record (its time limit, a
        kill) leaves them kept and unsent, which beat's sweep sends, never a dead delivery nor
        a breach that raised no alert."""
        with self._lock:
            if not self._unrecorded:
                return
            try:
                breaches, keeping = self._finish(self._unrecorded)
            except StoreRefused:
                self._record_one_by_one()
                return
            recorded, self._unrecorded = self._unrecorded, []
            self._recorded(recorded, breaches, keeping.kept)

    def _record_one_by_one(self) -> None:
        """The database refused the batch for good (one row it cannot take: not a fault that
        passes): record each attempt on its own, so that one bad row costs the others nothing.
        One refused again is recorded failed, saying why (replayable once the cause is fixed)."""
        recorded: list[_Sent] = []
        breaches: list[store.Breach] = []
        kept: list[tuple[alerts.Alert, int]] = []
        try:
            while self._unrecorded:
                sent = self._unrecorded[0]
                try:
                    found, keeping = self._finish([sent])
                except StoreRefused as exc:
                    # Its kind, not its message: the refused row is quoted whole in it.
                    log.error("delivery %s: its attempt could not be recorded: %s",
                              sent.finished.claimed.id, faults.summary(exc))
                    found, keeping = self._finish(
                        [replace(sent, finished=_refused(sent.finished, exc))])
                breaches += found
                kept += keeping.kept
                recorded.append(self._unrecorded.pop(0))
        finally:
            self._recorded(recorded, breaches, kept)

    def _finish(self, sent: Sequence[_Sent]) -> tuple[list[store.Breach], _KeepAlerts]:
        """``store.finish`` of ``sent``, the alerts they raise kept with them; the breaches it
        stamped, and what kept the alerts."""
        keeping = _KeepAlerts(sent, self._kept)
        try:
            breaches = store.finish(self._services.db, [s.finished for s in sent],
                                    keeping.within)
        except BaseException:
            self._settle(keeping, raised=True)
            raise
        self._settle(keeping)
        return breaches, keeping

    def _settle(self, keeping: _KeepAlerts, *, raised: bool = False) -> None:
        """Count what an earlier record that raised once it had stamped breaches (``_unsure``)
        stamped and kept, if it committed (the task stopped right after: what it stamped is
        stamped once, and the record written again stamps nothing of it). ``keeping``, of a
        later record of the same late attempts, tells: a record stamps those of its late
        attempts whose stamps have not committed yet, so it stamps again the earlier one's if
        that one did not commit, and none of them if it did."""
        if not keeping.ran:
            return
        for earlier in list(self._unsure):
            tried = {breach.delivery_id for breach in earlier.breaches} & keeping.late
            if not tried:
                continue  # a record of other attempts: it tells nothing of this one
            self._unsure.remove(earlier)
            if not tried & {breach.delivery_id for breach in keeping.breaches}:
                self._counted(earlier.breaches, [(alert, at) for alert, at in earlier.kept
                                                 if alert.kind == alerts.SLA_BREACHED])
        if raised and keeping.breaches:
            # Its deliveryExhausted, the record written again finds as its own (``_kept``).
            self._unsure.append(keeping)

    def _counted(self, breaches: Sequence[store.Breach],
                 kept: Sequence[tuple[alerts.Alert, int]]) -> None:
        """Count the breaches a record stamped and the alerts it kept, and leave those to send
        when the task has given its slots back."""
        _breached(self._tally, breaches)
        _count_kept(self._tally, kept)
        self._aftermath.kept.extend(kept)

    def _recorded(self, recorded: Sequence[_Sent], breaches: Sequence[store.Breach],
                  kept: Sequence[tuple[alerts.Alert, int]]) -> None:
        self._counted(breaches, kept)
        retries = []
        for sent in recorded:
            finished = sent.finished
            _log_attempt(sent.webhook_id, finished)
            self._tally.attempt(sent.webhook_id, finished.outcome, finished.latency_ms,
                                finished.taken_ms
                                if finished.outcome == DeliveryStatus.DELIVERED else None)
            if finished.next_attempt_at_ms is not None:
                retries.append((sent.webhook_id, finished.claimed.id, finished.next_attempt_at_ms))
        if retries:
            self._services.queues.park(retries)


class _KeepAlerts:
    """Keeps the alerts that a record of ``sent`` raises within the transaction that records
    them (``within``, for ``store.finish``; None when they can raise none): the
    ``deliveryExhausted`` of the dead, and the ``slaBreached`` of the breaches that the late
    ones stamp. Once it ran (``ran``): ``kept``, those new, each with when; ``breaches``, those
    its transaction stamped.

    ``ours`` (the ledger's: key -> when) are the ``deliveryExhausted`` its earlier records kept.
    A record that raised after its commit (the task stopped right then) is written again, and
    finds its alerts kept already: by itself, so they are still new to it (to count, and to
    send), and no other's. A ``slaBreached`` may be another's too (a webhook's minute); the
    record written again stamps nothing that the earlier one stamped, and so keeps nothing
    twice nor adds a count twice (``_Ledger._settle`` counts the earlier one's)."""

    def __init__(self, sent: Sequence[_Sent], ours: dict[str, int]) -> None:
        self._alerts = [alert for alert in (_exhausted(s.target, s.finished) for s in sent
                                            if s.target is not None) if alert is not None]
        self._ours = ours
        # The deliveries whose attempts ended late, which this record stamps as breaches unless
        # stamped already.
        self.late = {s.finished.claimed.id for s in sent if s.finished.late}
        self.within = self._keep if self._alerts or self.late else None
        self.ran = False
        self.kept: list[tuple[alerts.Alert, int]] = []
        self.breaches: list[store.Breach] = []

    def _keep(self, connection: Connection, breaches: Sequence[store.Breach]) -> None:
        self.ran, self.breaches, self.kept = True, list(breaches), []
        for alert in self._alerts:
            kept_at = self._ours.get(alert.key, now_ms())
            if alerts.keep(connection, alert, now_ms=kept_at) or alert.key in self._ours:
                self._ours[alert.key] = kept_at
                self.kept.append((alert, kept_at))
        self.kept += _keep_sla_alerts(connection, breaches)


# What a send's due-time check allows beyond the request's deadline: the enrichment before it
# (reference data not read ahead), the record after it, and beat's clock ahead of the worker's.
_SLA_SLACK_MS = 5000


def _record_if_sla_falls_due(services: Services, ledger: _Ledger) -> None:
    """Record the task's attempts if one met in time falls due within a send: a send takes up to
    the whole-request deadline, with its enrichment before and the record after, and beat would
    stamp such a delivery breached meanwhile. Before each send, and as a sending thread ends
    while the task's others may still hold it up."""
    if ledger.met_sla_due_within(services.settings.http_deadline * 1000 + _SLA_SLACK_MS):
        ledger.record()


def _refused(finished: store.Finished, exc: StoreRefused) -> store.Finished:
    """The attempt ``finished`` as it is recorded when the database refused its record: failed,
    with the refusal as its error."""
    return store.Finished(finished.claimed, finished.started_at_ms, finished.latency_ms,
                          DeliveryStatus.FAILED, error_class=type(exc).__name__,
                          error_message=str(exc)[:2000])


class _Stopped(TransientError):
    """A delivery task's thread stops: another of its threads failed, or the task was stopped
    (``_Task._send_side_by_side``). What it holds carries on with the task's other leases."""


# How long a delivery task stopped by its time limit waits for its helper threads to hand in
# what they sent (their requests cut): within the time between the soft and the hard limit
# (config.TASK_TIME_MARGIN), which must also hold the record and the retry's message.
_HAND_IN_SECONDS = 0.2


@dataclass(frozen=True)
class _Lot:
    """A lease of a task, taken: the deliveries it claimed, and their webhook."""

    lease: Lease
    claimed: tuple[store.Claimed, ...] = ()
    target: store.Target | None = None
    # Why the lease could not be made ready to send (its webhook, its secrets), if it could not.
    fault: Exception | None = None


class _Task:
    """The leases of one delivery task as they are taken, sent and given back (``deliver``)."""

    def __init__(self, services: Services, leases: Sequence[Lease], claimed_until: int | None,
                 interruptions: tuple[type[BaseException], ...]) -> None:
        self.services = services
        self.claimed_until = claimed_until
        # The token of the task's own claim (``store.Claim.token``), once it has claimed.
        self.claim_token: str | None = None
        # What stops the task midway (deliver's interruptions): never recorded as an attempt.
        self.interruptions = interruptions
        settings = services.settings
        self._budget_ends = time.monotonic() + settings.batch_time_budget
        # Past this, the leases not started are handed on. Never past the budget, so that a task
        # lasts at most the budget and one request (Settings.longest_task_seconds).
        self._deadline = time.monotonic() + min(settings.slow_webhook_ms / 1000,
                                                settings.batch_time_budget)
        self._lock = threading.Lock()
        # The leases whose slots this task holds and has not handed on.
        self._held = list(leases)
        self._waiting: collections.deque[_Lot] = collections.deque()
        self.tally = Tally()
        self.tally.delivery_task(len(leases))
        # What its sends left to alert about, raised once it gave its slots back.
        self.aftermath = _Aftermath()
        # Its attempts, recorded together before it gives its slots back.
        self.ledger = _Ledger(services, self.tally, self.aftermath)
        # Set once a sending thread fails (``_failure``) or the task is stopped from outside:
        # no thread takes another delivery. The cutter cuts the helper threads' requests when
        # the task is stopped from outside.
        self._stop = threading.Event()
        self._failure: BaseException | None = None
        self._cutter = Cutter("cut by the delivery task's time limit")

    def unreleased(self) -> list[Lease]:
        with self._lock:
            return list(self._held)

    def count_what_was_kept(self) -> None:
        """The task stops midway (``interruptions``): count the alerts kept by a deactivation
        that was stopped before it returned, if it committed (only that deactivation keeps its
        alert's key), and the deactivation with them. Beat's sweep sends them. Failing that
        (the database away), they are not counted."""
        unsure, self.aftermath.unsure = self.aftermath.unsure, []
        if not unsure:
            return
        try:
            found = alerts.kept(self.services.db, [alert.key for alert in unsure])
        except self.interruptions as exc:
            log.warning("delivery task stopped: %d alert(s) not counted: %s", len(unsure),
                        faults.summary(exc))
            return
        for alert in unsure:
            if alert.key in found:
                self.tally.webhook_disabled()
                self.tally.alert(alert.kind)

    def record_what_was_sent(self) -> None:
        """The task stops midway (``interruptions``): record what it sent before it stops. Failing
        that (the database away), the retry sends those deliveries again, with the same
        ``webhook-id``, and records that."""
        try:
            self.ledger.record()
        except self.interruptions as exc:
            log.warning("delivery task stopped: the attempts of %d send(s) not recorded, they "
                        "go again: %s", len(self.ledger), faults.summary(exc))

    def run(self, send: SendLease, hand_on: HandOn) -> None:
        services = self.services
        batch, lease_ms = services.settings.batch_size, services.lease_ms
        leases = self._held
        taken = services.queues.take_many(leases, batch=batch, lease_ms=lease_ms,
                                          now_ms=now_ms())
        # Those that boarded a fast-lane lease are the task's too: sent beside it, given back
        # with it (or carried on with it).
        self._held = taken.held
        self.tally.boarded(sum(map(len, taken.boarded)))
        if taken.dispatched:  # (those of a lease that moved out go in a task of their own)
            self._send_now(taken.dispatched, send, hand_on)
        dispatched = {lease.webhook_id for lease in taken.dispatched}
        for lease, held in zip(leases, taken.leases, strict=True):
            # Given back or expired: the webhook's queue goes on without it.
            if held is None and lease.webhook_id not in dispatched:
                pump(services, [lease.webhook_id], send)
        lots = self._claim()
        done = [(lot, Report()) for lot in lots if not lot.claimed]
        done += [(lot, _fail_lot(lot, self.ledger)) for lot in lots
                 if lot.claimed and lot.fault is not None]
        sending = [lot for lot in lots if lot.claimed and lot.fault is None]
        if sending:
            self._waiting.extend(sending[1:])
            with self._handed_on_at_deadline(hand_on):
                done += self._send_side_by_side(sending[0], hand_on)
        self.ledger.record()
        released = services.queues.release_many([(lot.lease, report) for lot, report in done],
                                                batch=batch, lease_ms=lease_ms, now_ms=now_ms(),
                                                claim=self.claim_token)
        with self._lock:
            self._held = []
        for (lot, report), given_back in zip(done, released, strict=True):
            for following in given_back.leases:
                send(following)
            if given_back.breaker_opened:
                _breaker_opened(services, lot.lease.webhook_id, self.tally)
            if given_back.breaker_closed:
                _webhook_recovered(services, lot, self.tally, send)
            if report.failing_since_ms and lot.target is not None:
                self._disable_if_failing_too_long(lot, lot.target, given_back.failing_since_ms)
        if any(given_back.state_lost for given_back in released):
            recover(services, send)
        _send_new_alerts(services, self.aftermath.kept, send)

    def _send_now(self, leases: Sequence[Lease], send: SendLease, hand_on: HandOn) -> None:
        """Send leases dispatched as the task starts at once, in tasks of their own; failing
        that (the broker away), with those the task sends as it ends, so that the task still
        sends what it holds."""
        try:
            hand_on(leases, None)
        except self.interruptions:
            raise
        except Exception as exc:
            log.warning("%d lease(s) not sent at once, they go as the task ends: %s",
                        len(leases), faults.summary(exc))
            for lease in leases:
                send(lease)

    def _send_side_by_side(self, first: _Lot, hand_on: HandOn) -> list[tuple[_Lot, Report]]:
        """Send ``first`` and the waiting lots, up to ``NOTIFIER_SEND_CONCURRENCY`` at once:
        this thread and helper threads, each taking the next lot when done with one (``_next``,
        which hands on those not started by the deadline). A lot is one webhook's slot, its
        deliveries sent one after another, so no webhook gets more requests at once than the
        slots it granted, however many lots go side by side.

        The first failure stops them all (``DeliveryInterrupted`` carries their leases on): a
        transient one lets the others end the request they have open, and take no other. Stopped
        from outside (the time limit, which lands in this thread), the task cuts the helpers'
        open requests too (``Cutter``: none outlives the task, so none overlaps its retry's on
        the same slot), and waits a moment for what they sent, to record it with its own."""
        done: list[tuple[_Lot, Report]] = []
        helpers: list[threading.Thread] = []  # those started
        try:
            # Started within the watch: a time limit that lands between two starts stops and
            # cuts those started, as it does anywhere else.
            for n in range(min(self.services.settings.send_concurrency - 1, len(self._waiting))):
                helper = threading.Thread(target=self._help, args=(hand_on, done), daemon=True,
                                          name=f"notifier-send-{n}")
                helper.start()
                helpers.append(helper)
            try:
                self._send_lots(first, hand_on, done)
            except _Stopped:
                pass  # a helper failed: its failure is raised below
            except TransientError as exc:
                self._fail(exc)
            for helper in helpers:  # (the time limit may land while this waits)
                helper.join()
        except BaseException:
            self._stop.set()
            self._cutter.cut_all()
            ends = time.monotonic() + _HAND_IN_SECONDS
            for helper in helpers:
                helper.join(max(0.0, ends - time.monotonic()))
            raise
        if self._failure is not None:
            raise self._failure
        return done

    def _help(self, hand_on: HandOn, done: list[tuple[_Lot, Report]]) -> None:
        """A helper thread of ``_send_side_by_side``."""
        with self._cutter.joined():
            try:
                self._send_lots(self._next(hand_on), hand_on, done)
            except _Stopped:
                pass
            except BaseException as exc:
                self._fail(exc)

    def _send_lots(self, lot: _Lot | None, hand_on: HandOn,
                   done: list[tuple[_Lot, Report]]) -> None:
        while lot is not None:
            done.append((lot, self._send(lot)))
            lot = self._next(hand_on)
        # This thread checks no more before a send, and the others' open requests (each
        # checked before it began) may hold the task up to their deadline: what it delivered in
        # time is recorded now if its SLA falls due meanwhile.
        _record_if_sla_falls_due(self.services, self.ledger)

    def _fail(self, exc: BaseException) -> None:
        """A sending thread failed: the first failure is the task's, and stops the others."""
        with self._lock:
            if self._failure is None:
                self._failure = exc
        self._stop.set()

    def _send(self, lot: _Lot) -> Report:
        """``_deliver_lot``; a permanent failure midway (an outcome the database refuses, a bug
        outside the per-delivery guard) fails what the lot still holds, with the reason, and
        the task carries on with its other leases."""
        try:
            return _deliver_lot(self.services, lot, self._budget_ends, self.tally,
                                self.interruptions, self.ledger, self.aftermath,
                                self._stop.is_set)
        except self.interruptions:
            raise
        except Exception as exc:
            if faults.is_transient(exc):
                raise
            # Its kind, not its message: a refused row is quoted whole in it.
            log.error("webhook %s: its batch stopped: %s", lot.lease.webhook_id,
                      faults.summary(exc))
            self.ledger.record()  # what it sent is no longer the lot's to fail
            held = store.still_claimed(self.services.db, lot.claimed)
            return _fail_lot(replace(lot, claimed=tuple(held), fault=exc), self.ledger)

    def _disable_if_failing_too_long(self, lot: _Lot, target: store.Target,
                                     failing_since_ms: int) -> None:
        """Deactivate a webhook every attempt to which has failed for
        ``NOTIFIER_DISABLE_FAILING_AFTER``, counted from its first failure since its last
        success, and never from before it was last saved (an org that edits, deactivates or
        activates its webhook gets a fresh period); and raise ``webhookDisabled``, unless what
        failed were alert events (an alert never raises one about itself)."""
        after_ms = self.services.settings.disable_failing_after * 1000
        since = max(failing_since_ms, target.updated_at_ms)
        now = now_ms()
        if not after_ms or not target.active or now - since < after_ms:
            return
        reason = (f"deactivated by notifier: every attempt has failed since {iso_ms(since)} "
                  f"({_duration(now - since)}; NOTIFIER_DISABLE_FAILING_AFTER is "
                  f"{_duration(after_ms)})")
        _deactivate(self.services, target, reason, self.tally, self.aftermath, alert=not all(
            alerts.is_alert_event(claimed.event) for claimed in lot.claimed))

    def _claim(self) -> list[_Lot]:
        """Claim every held lease's deliveries, read their webhooks and the reference data
        their enrichment needs: a statement or two for the whole task."""
        services = self.services
        owner: dict[str, int] = {}
        for index, lease in enumerate(self._held):
            for delivery_id in lease.delivery_ids:
                owner.setdefault(delivery_id, index)
        if not owner:
            return [_Lot(lease) for lease in self._held]
        claim = store.claim(services.db, list(owner), now_ms=now_ms(), lease_ms=services.lease_ms,
                            held_until=self.claimed_until)

        def by_webhook(items: Iterable[tuple[str, int]]) -> list[tuple[str, str, int]]:
            return [(self._held[owner[delivery_id]].webhook_id, delivery_id, due)
                    for delivery_id, due in items]

        services.queues.park(by_webhook(claim.not_due))
        services.queues.recheck(by_webhook(claim.later))
        claimed: list[list[store.Claimed]] = [[] for _ in self._held]
        for item in claim.claimed:
            claimed[owner[item.id]].append(item)
        if claim.claimed:  # one statement: one lease_until_ms for all
            self.claimed_until = claim.claimed[0].lease_until_ms
            self.claim_token = claim.token
        unready: dict[str, Exception] = {}
        targets = store.targets(
            services.db, services.vault,
            (lease.webhook_id for lease, mine in zip(self._held, claimed, strict=True) if mine),
            now_ms=now_ms(), faults=unready)
        if claim.claimed:
            self._give_back_lost(claimed, targets)
        sending = [(lease, tuple(mine)) for lease, mine in zip(self._held, claimed, strict=True)
                   if mine]
        ready = [(targets[lease.webhook_id], mine) for lease, mine in sending
                 if lease.webhook_id in targets]
        try:
            # The reference data every enrichment of the task needs, one query per kind.
            prefetch(((item.event, target.options) for target, mine in ready if target.active
                      for item in mine), services.lookups)
        except self.interruptions:
            raise  # the time limit (an Exception too) stops the task wherever it lands
        except Exception as exc:
            if faults.is_transient(exc):
                raise
            # Only a head start: each enrichment reads what it needs, and fails on its own.
            log.exception("reference data not read ahead for the task's enrichments")
        return [_Lot(lease, tuple(mine), targets.get(lease.webhook_id),
                     unready.get(lease.webhook_id))
                for lease, mine in zip(self._held, claimed, strict=True)]

    def _give_back_lost(self, claimed: list[list[store.Claimed]],
                        targets: Mapping[str, store.Target]) -> None:
        """Give back the claims of leases that Redis lost since they were taken (flushed,
        restarted): a rebuild that read the database before these claims did not count them,
        and may have granted the slots their requests would exceed. A lease still held now is
        safe to send: a loss after this finds its claims in the database."""
        services = self.services
        still = services.queues.still_held(self._held, now_ms=now_ms())
        for index, (lease, held) in enumerate(zip(self._held, still, strict=True)):
            # A lease whose webhook cannot be made ready sends nothing: it fails on its own.
            if not held and claimed[index] and lease.webhook_id in targets:
                log.info("webhook %s: Redis lost the lease of %d delivery(ies) since its task "
                         "took it; they are queued again", lease.webhook_id, len(claimed[index]))
                _give_back(services, lease.webhook_id, targets[lease.webhook_id], claimed[index])
                claimed[index] = []

    def _next(self, hand_on: HandOn) -> _Lot | None:
        """The next lot to send; None when none is left (or the rest were handed on, or the
        task is stopping)."""
        if time.monotonic() >= self._deadline:
            self._hand_on(hand_on)
        with self._lock:
            if self._stop.is_set():
                return None
            return self._waiting.popleft() if self._waiting else None

    def _hand_on(self, hand_on: HandOn) -> None:
        with self._lock:
            if self._stop.is_set():
                return  # the task carries its leases on (DeliveryInterrupted), those waiting too
            lots = list(self._waiting)
            self._waiting.clear()
            handed = {lot.lease for lot in lots}
            self._held = [lease for lease in self._held if lease not in handed]
            # Each goes on in a task of its own, by its lane; but a webhook keeps to one
            # prefork process: a lease of a webhook this task still sends to, or another lease
            # of a webhook handed on here (those riding with its fast-lane lease), goes on by
            # the slow lane.
            keeping = {lease.webhook_id for lease in self._held}
            leases: list[Lease] = []
            for lot in lots:
                lease = lot.lease
                leases.append(replace(lease, slow=True) if lease.webhook_id in keeping else lease)
                keeping.add(lease.webhook_id)
        if leases:
            log.info("%d lease(s) handed on: their task ran past its deadline", len(leases))
            hand_on(leases, self.claimed_until)

    @contextlib.contextmanager
    def _handed_on_at_deadline(self, hand_on: HandOn) -> Iterator[None]:
        """While the block runs, hand the waiting lots on when the deadline passes."""
        if not self._waiting:
            yield
            return
        timer = threading.Timer(max(0.0, self._deadline - time.monotonic()), self._hand_on,
                                args=(hand_on,))
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()


def _deliver_lot(services: Services, lot: _Lot, budget_ends: float, tally: Tally,
                 interruptions: tuple[type[BaseException], ...], ledger: _Ledger,
                 aftermath: _Aftermath, stopping: Callable[[], bool]) -> Report:
    """POST what a lot claimed, its attempts to the task's ``ledger``; returns what its slot's
    release reports: the slowest response, and the webhook's successes and failures (its
    answers only, not notifier's own faults).

    A batch ends early when the task's time budget is spent, or, in the fast lane, as soon as
    the webhook answers slowly: the rest goes back to the queue and on by the slow lane. It
    stops (``_Stopped``) as soon as ``stopping()``: another of the task's threads failed.
    """
    lease, target = lot.lease, lot.target
    assert target is not None  # read for every lot that claimed something
    slowest, delivered, failing_since, failures = -1, False, 0, 0
    for index, claimed in enumerate(lot.claimed):
        if stopping():
            raise _Stopped(f"webhook {lease.webhook_id}: its batch stopped with its task")
        too_slow = not lease.slow and slowest >= services.settings.slow_webhook_ms
        # Its webhook's circuit breaker opens with this run of failures: the rest wait in the
        # queue, which the breaker pauses.
        tripped = bool(lease.failures_allowed) and failures >= lease.failures_allowed
        # (Deactivated midway, by a 410: the rest is held at once, no request made.)
        if index > 0 and target.active and (too_slow or tripped
                                            or time.monotonic() > budget_ends):
            _give_back(services, lease.webhook_id, target, lot.claimed[index:])
            break
        _record_if_sla_falls_due(services, ledger)
        started = now_ms()
        try:
            finished, posted = _attempt(services, target, claimed, interruptions)
        except TransientError:
            raise
        except interruptions:
            # Stopped from outside (the task's time limit) mid-attempt: the attempt is recorded
            # (with the others, as the task stops) as a timeout, retried on the schedule.
            ledger.add(lease.webhook_id, target, judge(services, claimed, Result(
                now_ms() - started, error=requests.Timeout(
                    "cut by the delivery task's time limit")), started))
            raise
        slowest = max(slowest, finished.latency_ms)
        if posted and finished.outcome == DeliveryStatus.DELIVERED:
            delivered, failing_since, failures = True, 0, 0
        elif posted:
            failures += 1
            failing_since = failing_since or finished.started_at_ms
        ledger.add(lease.webhook_id, target, finished)
        if posted and finished.status_code == GONE_STATUS:
            # Recorded first: deactivating holds what the webhook has waiting, and what this
            # task sent it before (a retry to park, this delivery) must be recorded by then.
            ledger.record()
            reason = (f"deactivated by notifier: its endpoint answered 410 Gone at "
                      f"{iso_ms(finished.started_at_ms)} (delivery {claimed.id})")
            _deactivate(services, target, reason, tally, aftermath,
                        alert=not alerts.is_alert_event(claimed.event))
            target = replace(target, active=False)
    return Report(slowest, delivered, failing_since, failures)


def _deactivate(services: Services, target: store.Target, reason: str, tally: Tally,
                aftermath: _Aftermath, *, alert: bool) -> None:
    """Deactivate a webhook for notifier's ``reason`` (shown as its ``disabledReason``): what
    it would send next is held (``store.disable_failing``). The one way notifier deactivates a
    webhook (failing too long, or gone); nothing if it was inactive already.

    Its ``webhookDisabled`` (unless not ``alert``: what failed were alert events, and an alert
    never raises one about itself) is kept in the deactivation's own transaction, and sent
    once the task has given its slots back (``aftermath``): a task stopped in between leaves it
    to beat's sweep, never a webhook deactivated that raised no alert."""
    now = now_ms()
    raised = ([alerts.webhook_disabled(target.org_id, target.id, reason, now_ms=now)]
              if alert else [])
    kept: list[tuple[alerts.Alert, int]] = []

    def keep(connection: Connection) -> None:
        kept[:] = _keep_within(connection, raised, now)

    try:
        disabled = store.disable_failing(services.db, target.id, reason=reason, now_ms=now,
                                         within=keep if raised else None)
    except BaseException:
        aftermath.unsure.extend(alert for alert, _ in kept)
        raise
    if not disabled:
        return
    log.warning("webhook %s %s", target.id, reason)
    tally.webhook_disabled()
    _count_kept(tally, kept)
    aftermath.kept.extend(kept)


def _breaker_opened(services: Services, webhook_id: str, tally: Tally) -> None:
    """A webhook's circuit breaker opened (``Queues.release_many``): its queue is paused until a
    probe succeeds."""
    settings = services.settings
    log.warning("webhook %s: circuit breaker open after %d failed attempts in a row: nothing is "
                "sent to it until a probe, in %g s, succeeds", webhook_id,
                settings.breaker_failures, settings.breaker_cooldown)
    tally.breaker("open")


def _webhook_recovered(services: Services, lot: _Lot, tally: Tally, send: SendLease) -> None:
    """A webhook's circuit breaker closed after being open (``Queues.release_many``): it answered
    again, and its queue goes on; ``webhookRecovered``, unless what it answered were alert
    events."""
    webhook_id = lot.lease.webhook_id
    log.info("webhook %s: circuit breaker closed: it answered again, its queue goes on",
             webhook_id)
    tally.breaker("closed")
    if lot.target is not None and not all(alerts.is_alert_event(c.event) for c in lot.claimed):
        alert_webhook_recovered(services, lot.target.org_id, webhook_id, send,
                                reason="its circuit breaker closed: a probe delivery succeeded")


def _log_attempt(webhook_id: str, finished: store.Finished) -> None:
    """One line per attempt, with its ids, status, latency and outcome (never the payload nor a
    header: they may hold personal data or secrets)."""
    fields = {"eventId": finished.claimed.event.get("eventId"),
              "deliveryId": finished.claimed.id, "webhookId": webhook_id,
              "statusCode": finished.status_code, "latencyMs": finished.latency_ms,
              "outcome": str(finished.outcome), "error": finished.error_class}
    attempt_log.info("attempt %s of event %s to webhook %s: %s in %d ms, %s", finished.claimed.id,
                     fields["eventId"], webhook_id, finished.status_code or finished.error_class,
                     finished.latency_ms, finished.outcome, extra={"fields": fields})


def _attempt(services: Services, target: store.Target, claimed: store.Claimed,
             interruptions: tuple[type[BaseException], ...] = (TransientError,),
             ) -> tuple[store.Finished, bool]:
    """enrich -> render -> sign -> post -> judge, for one claimed delivery; and whether the
    webhook was asked (a request was made), so that the outcome is its answer.
    ``interruptions`` (transient errors, the task's time limit) go up to the task."""
    started = now_ms()
    if target.deleted:
        return store.Finished(claimed, started, 0, DeliveryStatus.FAILED,
                              error_class="WebhookDeleted",
                              error_message="the webhook was deleted"), False
    if not target.active:
        # Deactivated since it was queued (by its org, or by notifier for failing too long):
        # held with what else it holds, so that one activation or replay brings it all back.
        return store.Finished(claimed, started, 0, DeliveryStatus.HELD,
                              error_class="WebhookInactive",
                              error_message="the webhook is inactive: held until it is "
                                            "activated with deliverHeld, or replayed"), False
    if claimed.event == store.PURGED_PAYLOAD:
        # A replay and retention never cross on an event (store._hold_whole), so a replay
        # re-opens no delivery of an emptied event; one queued all the same (beside the
        # retention of an earlier release, during a deploy) has nothing left to send.
        return store.Finished(claimed, started, 0, DeliveryStatus.FAILED,
                              error_class="EventEmptied",
                              error_message="the event was emptied by retention "
                                            "(NOTIFIER_RETENTION_DAYS): nothing left to send"), False
    try:
        enriched = enrich(claimed.event, target.options, services.lookups)
        body = render(enriched.payload)
        result = services.sender.send(request_for(target, claimed.id, body, started // 1000))
        finished = judge(services, claimed, result, started)
        if not enriched.enriched:
            return finished, True
        return replace(finished, enrichment=additions(claimed.event, enriched.payload),
                       enrichment_notes="; ".join(enriched.notes) or None), True
    except interruptions:
        raise
    except Exception as exc:
        if faults.is_transient(exc):
            raise
        # A bug in a step must not crash the worker and resend forever: record it as a failed
        # attempt (replayable once fixed) and carry on with the batch.
        log.exception("delivery %s failed in notifier itself", claimed.id)
        return _failed_in_notifier(claimed, started, exc), False


def _failed_in_notifier(claimed: store.Claimed, started: int, exc: Exception) -> store.Finished:
    """A failed attempt that notifier's own fault ended (no request made), saying why."""
    return store.Finished(claimed, started, now_ms() - started, DeliveryStatus.FAILED,
                          error_class=type(exc).__name__, error_message=str(exc)[:2000])


def _fail_lot(lot: _Lot, ledger: _Ledger) -> Report:
    """A lease that could not be made ready (``lot.fault``: its webhook gone, a secret no key
    opens) fails each of its deliveries for good with the reason (recorded with the task's
    other attempts), replayable once the cause is fixed; its slot goes back with the others',
    and the task carries on with them."""
    assert lot.fault is not None
    log.error("webhook %s: %d deliveries failed: %s", lot.lease.webhook_id, len(lot.claimed),
              faults.reason(lot.fault))
    started = now_ms()
    for claimed in lot.claimed:
        ledger.add(lot.lease.webhook_id, lot.target, _failed_in_notifier(claimed, started,
                                                                         lot.fault))
    return Report()


def _give_back(services: Services, webhook_id: str, target: store.Target,
               rest: Iterable[store.Claimed]) -> None:
    rest = list(rest)
    store.release_claims(services.db, rest)
    # A replay's back in the replay queue: by its old ingestion time, it would go ahead of
    # every live delivery waiting.
    for replayed in (False, True):
        services.queues.enqueue(webhook_id, target.max_allowed_connections,
                                [(c.id, c.ingested_at_ms) for c in rest if c.replayed == replayed],
                                replay=replayed)


@dataclass(frozen=True)
class SweepReport:
    rebuilt: int = 0
    promoted: int = 0
    expired: int = 0
    leases_sent: int = 0
    alerts_sent: int = 0


def rebuild(services: Services) -> int:
    """Put every unfinished delivery of the database back into Redis; returns how many.

    Deliveries whose claim is live are not queued: an earlier send of them may still be open.
    Their claims take slots first, before any is granted, so the cap counts the requests still
    open: one slot per claim (a task's, whose deliveries of a webhook go one after another), which
    lasts until the claim expires (or its task gives it back), and then what it carried is
    queued again, as for any lease.
    """
    work = store.open_work(services.db)
    now = now_ms()
    claims: dict[tuple[str, str], tuple[int, list[str]]] = {}
    parked: list[tuple[str, str, int]] = []
    waiting: list[store.Queued] = []
    replayed: list[store.Queued] = []
    for item in work:
        queued, until = item.queued, item.claimed_until_ms
        if item.status == DeliveryStatus.IN_FLIGHT and until is not None and until > now:
            # A claim from before claims had tokens is told by its expiry.
            key = (queued.webhook_id, item.claimed_by or str(until))
            claims.setdefault(key, (until, []))[1].append(queued.delivery_id)
        elif item.status == DeliveryStatus.RETRYING and item.due_ms is not None:
            parked.append((queued.webhook_id, queued.delivery_id, item.due_ms))
        else:
            # A replay's pending deliveries wait behind live traffic again (see replay_selection).
            (replayed if item.replay_id is not None else waiting).append(queued)
    services.queues.hold_claims(claims, now_ms=now)
    services.queues.park(parked)
    _enqueue(services, waiting)
    _enqueue(services, replayed, replay=True)
    return len(work)


# While one process rebuilds a lost Redis, the others dispatch nothing: one that died at it
# holds them up this long at most. One that outlasts it is joined by a second rebuild, which
# keeps the cap: a rebuild only adds (at worst a slot for a claim just ended, until it expires).
# A slot lease at most, as long as any task may hold up a webhook, and never past 30 s.
_REBUILD_MOST_MS = 30_000


def _rebuild_if_lost(services: Services) -> int | None:
    """``rebuild`` a Redis that lost its state, unless another process is at it; then let it
    grant slots again. Returns how many deliveries were rebuilt; None when it was not lost, or
    another process rebuilds it."""
    if not services.queues.claim_rebuild(min(_REBUILD_MOST_MS, services.lease_ms)):
        return None
    try:
        rebuilt = rebuild(services)
        services.queues.rebuilt()
    except BaseException:
        services.queues.forget_rebuild()
        raise
    return rebuilt


def recover(services: Services, send: SendLease) -> int:
    """Redis lost its state (``StateLost``): rebuild it from the database unless another
    process is at it (which pumps after), then pump every queue with work waiting. Returns the
    leases sent."""
    if _rebuild_if_lost(services) is None:
        return 0
    try:
        return _dispatch(services, services.queues.queued_webhooks(), send)
    except StateLost:  # lost again meanwhile: whoever dispatches next rebuilds it
        return 0


def sweep(services: Services, send: SendLease) -> SweepReport:
    """Beat's frequent pass: rebuild a flushed Redis, bring back due retries and lost leases,
    pump every queue with work waiting, and send the alerts kept but not sent."""
    rebuilt = _rebuild_if_lost(services) or 0
    now = now_ms()
    promoted = services.queues.promote_due(now)
    expired = services.queues.expire_leases(now)
    sent = pump(services, services.queues.queued_webhooks(), send)
    return SweepReport(rebuilt, len(promoted), len(expired), sent,
                       send_kept_alerts(services, send))


# Deliveries made pending again and queued per transaction (and per Redis call of a webhook):
# a replay of 100 000 is bounded batches, never one statement or one call per delivery.
REPLAY_BATCH = 1000


@dataclass(frozen=True)
class Replayed:
    """What a replay did: its id (``notifier replays list``), how many deliveries it queued, how
    many it left as they were (queued already), and the ids it named that are no delivery.
    ``finished``: False when it queued only its first batches, and a worker carries it on
    (``carry_on_replay``)."""

    replay_id: int
    queued: int
    skipped: int
    not_found: tuple[str, ...] = ()
    finished: bool = True
    # Of those skipped, the ones whose event retention emptied: nothing is left to send.
    emptied: int = 0


def replay_selection(services: Services, selection: Selection, send: SendLease, *,
                     requested_by: str, org_id: int | None = None,
                     progress: Callable[[int], None] = lambda looked_at: None,
                     batch: int = REPLAY_BATCH, batches: int | None = None,
                     all_found: bool = False) -> Replayed:
    """Send a selection's deliveries again, keeping their ids (``webhook-id``), recorded as one
    replay ``requested_by`` someone (the OS user, an API key); each batch reports how many
    deliveries it looked at to ``progress``. At most ``batches`` batches (None: all of them);
    what is left, ``carry_on_replay`` queues. ``all_found``: ``NotFound`` names the delivery ids
    selected that are no delivery, and nothing is queued nor recorded.

    Those pending or in flight are skipped (queued already): the same replay run twice queues
    nothing twice. The rest go to their webhooks' replay queues, which the slots draw from only
    while no live delivery waits: a replay keeps ``maxAllowedConnections`` and never holds live
    traffic up.
    """
    counted = store.count_selection(services.db, selection)
    if all_found and counted.not_found:
        raise NotFound(f"no such delivery: {', '.join(counted.not_found)}")
    replay_id = store.start_replay(services.db, selection, requested_by=requested_by,
                                   org_id=org_id, now_ms=now_ms())
    queued, finished = _carry_on(services, replay_id, send, progress, batch, batches)
    # Until it is finished, only those queued already when it began are known to be skipped.
    skipped = counted.matched - queued if finished else counted.skipped
    return Replayed(replay_id, queued, skipped, counted.not_found, finished, counted.emptied)


# Batches that a request (the API, the admin pages) queues itself before it hands the rest of a
# replay to a worker: a replay of up to a few thousand deliveries is done when the request
# answers, and a larger one never holds the request (100 000 take seconds to queue).
REQUEST_REPLAY_BATCHES = 2


def replay_handing_on(services: Services, selection: Selection, send: SendLease,
                      hand_on: Callable[[int], None], *, requested_by: str,
                      org_id: int | None) -> Replayed:
    """``replay_selection`` for a request: its first batches, then ``hand_on`` (the replay's
    id, to a worker: ``client.replay_sender``) carries it on, if anything is left."""
    done = replay_selection(services, selection, send, requested_by=requested_by,
                            org_id=org_id, batches=REQUEST_REPLAY_BATCHES)
    if not done.finished:
        hand_on(done.replay_id)
    return done


def carry_on_replay(services: Services, replay_id: int, send: SendLease, *,
                    batch: int = REPLAY_BATCH) -> int:
    """Queue what is left of a replay, from where its last batch stopped (a replay that is
    finished queues nothing); returns how many deliveries this queued."""
    return _carry_on(services, replay_id, send, lambda looked_at: None, batch, None)[0]


def _carry_on(services: Services, replay_id: int, send: SendLease,
              progress: Callable[[int], None], batch: int, batches: int | None) -> tuple[int, bool]:
    queued = 0
    while batches is None or batches > 0:
        # Queued in Redis before the batch commits: a Redis failing leaves them as they were,
        # for the same replay to carry on, never pending with nothing to send them. Dispatched
        # only once committed: a claim meanwhile would find them as they were.
        done = store.replay_batch(services.db, replay_id, most=batch, now_ms=now_ms(),
                                  queue=lambda items: _enqueue(services, items, replay=True))
        pump(services, {item.webhook_id for item in done.queued}, send)
        queued += len(done.queued)
        progress(done.looked_at)
        if done.finished:
            return queued, True
        batches = None if batches is None else batches - 1
    return queued, False


def replay(services: Services, delivery_ids: Sequence[str], send: SendLease, *,
           requested_by: str, org_id: int | None = None) -> Replayed:
    """``replay_selection`` of these deliveries (of ``org_id``'s webhooks, if given).
    ``NotFound`` names the ids that are no delivery, and queues none."""
    return replay_selection(services, Selection(delivery_ids=tuple(delivery_ids), org_id=org_id),
                            send, requested_by=requested_by, org_id=org_id, all_found=True)


def purge(services: Services) -> store.Purged | None:
    """Retention: empty the oldest events past ``NOTIFIER_RETENTION_DAYS`` (at most
    ``NOTIFIER_RETENTION_BATCH_SIZE``; the rest in the next run), see ``store.purge``. None when
    retention is off (0 days)."""
    days = services.settings.retention_days
    if not days:
        return None
    now = now_ms()
    return store.purge(services.db, older_than_ms=now - days * 24 * 3600 * 1000,
                       batch=services.settings.retention_batch_size, now_ms=now)


def _breached(tally: Tally, breaches: Sequence[store.Breach]) -> None:
    """Where every SLA breach passes once, whichever statement stamped it (beat's check, or
    the attempt that ended late): the store returns only the rows each statement stamped."""
    tally.sla_breaches(len(breaches))


def check_sla(services: Services, send: SendLease) -> int:
    """Beat's SLA pass: stamp deliveries not delivered within their SLA, raise their
    ``slaBreached`` alerts and count them; returns how many.

    Batches of ``NOTIFIER_SLA_CHECK_BATCH_SIZE``, each its own short transaction, until one
    comes back short or half of ``NOTIFIER_SLA_CHECK_INTERVAL`` is spent (the rest goes in the
    next pass, which then does not queue behind this one)."""
    settings = services.settings
    ends = time.monotonic() + settings.sla_check_interval / 2
    flagged = 0
    while True:
        stamped = _flag_sla_batch(services, send)
        flagged += stamped
        if stamped < settings.sla_check_batch_size or time.monotonic() > ends:
            return flagged


def _flag_sla_batch(services: Services, send: SendLease) -> int:
    """One batch of ``check_sla``; returns how many it stamped. Their ``slaBreached`` alerts
    are kept in the transaction that stamps them: a check stopped after it (its process
    killed) leaves them to beat's sweep, never breaches stamped that raised no alert, and a
    failure to keep them leaves the breaches to the next check."""
    kept: list[tuple[alerts.Alert, int]] = []

    def keep(connection: Connection, breaches: Sequence[store.Breach]) -> None:
        kept[:] = _keep_sla_alerts(connection, breaches)

    breaches = store.flag_sla_breaches(services.db, now_ms=now_ms(),
                                       batch=services.settings.sla_check_batch_size, within=keep)
    tally = Tally()
    _breached(tally, breaches)
    _count_kept(tally, kept)
    _count(services, tally)
    _send_new_alerts(services, kept, send)
    return len(breaches)


# ---------------------------------------------------------------- operational alerts


# Alerts kept but not sent that one sweep sends, oldest first; the rest wait for the next.
ALERT_SEND_BATCH = 100
# An alert kept this recently may still be on its way from the process that kept it, which the
# sweep leaves to it. One still at it later stores nothing twice with the sweep (the same ids).
_ALERT_SEND_GRACE_MS = 5_000


def raise_alerts(services: Services, raised: Iterable[alerts.Alert], send: SendLease) -> int:
    """Keep each alert (``alerts.record``: once per key, whichever process raises it first) and
    send the new ones on (``_send_alert``). Returns how many were new. For an alert that no
    change of state goes with (a webhook that answers again); the others are kept in the
    transaction of the change that raises them (``_keep_within``).

    An alert that cannot be kept is logged and given up, one kept but not sent is left to beat's
    sweep (``send_kept_alerts``): it never fails what raised it."""
    new, tally = [], Tally()
    for alert in raised:
        kept_at = now_ms()
        try:
            if alerts.record(services.db, alert, now_ms=kept_at):
                new.append((alert, kept_at))
        except Exception as exc:
            log.error("alert %s not raised: %s", alert.key, faults.summary(exc))
    _count_kept(tally, new)
    _count(services, tally)
    _send_new_alerts(services, new, send)
    return len(new)


def _send_new_alerts(services: Services, kept: Sequence[tuple[alerts.Alert, int]],
                    send: SendLease) -> None:
    """Send on alerts just kept, and counted (each with when); one not sent is left to beat's
    sweep (``send_kept_alerts``)."""
    for alert, kept_at in kept:
        _send_alert(services, alert, kept_at, send)


def send_kept_alerts(services: Services, send: SendLease) -> int:
    """Send the alerts kept but not sent (the process that kept one failed to store its events,
    or died first), oldest first, ``ALERT_SEND_BATCH`` at most; returns how many were sent or
    given up. A failure worth trying again ends the run: the next sweep tries again."""
    done = 0
    for alert, kept_at in alerts.unsent(services.db, most=ALERT_SEND_BATCH,
                                        kept_before_ms=now_ms() - _ALERT_SEND_GRACE_MS):
        if not _send_alert(services, alert, kept_at, send):
            break
        done += 1
    return done


def _send_alert(services: Services, alert: alerts.Alert, kept_at_ms: int,
                send: SendLease) -> bool:
    """Send a kept alert as events to the operations webhooks that should hear it, by the same
    pipeline as any event (``accept``: stored, fanned out to that webhook if it is subscribed,
    signed, recorded), and mark it sent. True when it is done with: sent, or given up for a
    failure that trying again would only repeat; False when it is left to send again.

    Its leases go once it is marked: one whose message is lost (the broker away) expires, and
    the sweep sends its deliveries again, as it does any lease's."""
    leases: list[Lease] = []
    try:
        for envelope, webhook_id in alerts.envelopes(
                services.db, alert, operator_webhook=services.settings.operator_alerts_webhook,
                raised_at_ms=kept_at_ms):
            accept(services, envelope, leases.append, only_webhook=webhook_id, own=True)
        alerts.sent(services.db, alert.key, now_ms=now_ms())
        done = True
    except Exception as exc:
        done = _alert_not_sent(services, alert, exc)
    try:
        for lease in leases:
            send(lease)
    except Exception as exc:
        log.warning("leases of alert %s not sent, they expire and go again: %s", alert.key,
                    faults.summary(exc))
    return done


def _alert_not_sent(services: Services, alert: alerts.Alert, exc: Exception) -> bool:
    """Sending ``alert`` failed with ``exc``: left to send again if that may pass, else given up
    with the reason. Whether it is done with (``_send_alert``)."""
    if faults.is_transient(exc):
        log.warning("alert %s not sent yet, beat's sweep sends it: %s", alert.key,
                    faults.summary(exc))
        return False
    log.error("alert %s given up, it cannot be sent: %s", alert.key, faults.summary(exc))
    try:
        alerts.given_up(services.db, alert.key, faults.reason(exc))
    except Exception as failed:  # still unsent: the sweep tries it again
        log.warning("alert %s not marked given up: %s", alert.key, faults.summary(failed))
        return False
    return True


def alert_webhook_recovered(services: Services, org_id: int, webhook_id: str, send: SendLease,
                            *, reason: str = "") -> None:
    """A webhook that was failing answers again: ``webhookRecovered``."""
    raise_alerts(services, [alerts.webhook_recovered(org_id, webhook_id, now_ms=now_ms(),
                                                     reason=reason)], send)


def _exhausted(target: store.Target, finished: store.Finished) -> alerts.Alert | None:
    """The alert of an attempt whose delivery died, its retries exhausted: ``deliveryExhausted``;
    none for a delivery of an alert event (an alert never raises one about itself)."""
    claimed = finished.claimed
    if finished.outcome != DeliveryStatus.DEAD or alerts.is_alert_event(claimed.event):
        return None
    return alerts.delivery_exhausted(
        target.org_id, target.id, claimed.id, claimed.event,
        attempts=claimed.attempt_count + 1, last_status_code=finished.status_code)


def _keep_within(connection: Connection, raised: Iterable[alerts.Alert],
                 kept_at: int) -> list[tuple[alerts.Alert, int]]:
    """Keep alerts within the transaction of what raised them (``alerts.keep``); those new, each
    with when."""
    return [(alert, kept_at) for alert in raised
            if alerts.keep(connection, alert, now_ms=kept_at)]


def _keep_sla_alerts(connection: Connection,
                     breaches: Sequence[store.Breach]) -> list[tuple[alerts.Alert, int]]:
    """Deliveries were stamped as SLA breaches (each once, by the statement that stamped it):
    keep their ``slaBreached`` within that statement's transaction, one per webhook per minute
    with its count and first delivery ids; those new, each with when. Those of alert events
    raise none."""
    kept_at = now_ms()
    return _keep_within(connection, alerts.sla_breached(
        connection, [(b.webhook_id, b.delivery_id) for b in breaches], now_ms=kept_at), kept_at)


def _count_kept(tally: Tally, kept: Iterable[tuple[alerts.Alert, int]]) -> None:
    """Count alerts as they are kept (new), once: a process stopped before it sends them has
    counted them, and beat's sweep that sends them counts nothing."""
    for alert, _ in kept:
        tally.alert(alert.kind)
