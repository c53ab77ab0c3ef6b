"""The producer client: ``publish`` an event (or ``publish_many`` several in one message)
without any of notifier's task code.

It sends the ``notifier.ingest`` task by name over the broker, so a loyalty service needs only
this module (and Celery's client side) to publish.
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from celery import Celery

from notifier.errors import InvalidEvent, TooLarge, path_text
from notifier.queues import Lease
from notifier.routes import (
    DELIVER_QUEUE,
    DELIVER_TASK,
    INGEST_TASK,
    QUEUE,
    REPLAY_TASK,
    SLOW_QUEUE,
)

__all__ = ["DELIVER_QUEUE", "DELIVER_TASK", "INGEST_TASK", "QUEUE", "REPLAY_TASK", "SLOW_QUEUE",
           "build_envelope", "ingest_reprs", "lease_args", "lease_sender", "producer", "publish",
           "publish_envelope", "publish_many", "replay_sender", "send_lease", "send_leases"]

def build_envelope(event_name: str, data: Mapping[str, Any], *, org_id: int,
                   event_id: str | None = None, ref_id: str | None = None,
                   api_request_id: str | None = None, created_at: int | None = None,
                   **extra: Any) -> dict[str, Any]:
    """The InTouch event envelope, with ``eventId`` and ``createdAt`` filled in when missing."""
    if not isinstance(event_name, str) or not event_name:
        raise InvalidEvent("eventName", "must be a non-empty string")
    if isinstance(org_id, bool) or not isinstance(org_id, int):
        raise InvalidEvent("orgId", "must be an integer")
    if not isinstance(data, Mapping):
        raise InvalidEvent("data", "must be an object")
    envelope: dict[str, Any] = {
        "eventName": event_name,
        "eventId": event_id or str(uuid.uuid4()),
        "orgId": org_id,
        "createdAt": created_at if created_at is not None else time.time_ns() // 1_000_000,
        "data": dict(data),
    }
    if ref_id is not None:
        envelope["refId"] = ref_id
    if api_request_id is not None:
        envelope["apiRequestId"] = api_request_id
    envelope.update(extra)
    return envelope


@functools.cache
def producer(broker_url: str) -> Celery:
    """A client-only Celery app for ``broker_url``, made once per process, that sends by name."""
    producer = Celery("notifier-client", broker=broker_url, set_as_current=False)
    producer.conf.update(task_serializer="json", accept_content=["json"],
                         broker_connection_retry_on_startup=True)
    return producer


def publish(event_name: str, data: Mapping[str, Any], *, org_id: int,
            event_id: str | None = None, broker_url: str | None = None,
            **envelope_fields: Any) -> str:
    """Publish one event for notifier to deliver; returns its ``eventId``.

    ``broker_url`` defaults to ``NOTIFIER_BROKER_URL`` (or the embedded Redis).
    """
    envelope = build_envelope(event_name, data, org_id=org_id, event_id=event_id,
                              **envelope_fields)
    publish_envelope(envelope, broker_url=broker_url)
    return str(envelope["eventId"])


def publish_many(events: Iterable[Mapping[str, Any]], *, org_id: int | None = None,
                 broker_url: str | None = None) -> list[str]:
    """Publish several events in one broker message; returns their ``eventId``s, in order.

    Each event is an InTouch envelope (``eventName``, ``orgId``, ``data``; ``eventId``,
    ``createdAt``, ``refId``, ``apiRequestId`` filled in or left out as ``publish`` does them);
    ``org_id`` stands for a missing ``orgId``. notifier stores, validates and delivers each as
    if it had been published alone: one that fails its schema is stored rejected and the others
    go on, and an ``eventId`` given twice is one event. Nothing is sent when an envelope cannot
    be built (``InvalidEvent`` naming it: ``events[3].orgId``) or when there are more than
    ``NOTIFIER_MAX_EVENTS_PER_MESSAGE`` (1000) of them (``TooLarge``).
    """
    listed = list(events)
    most = _max_events_per_message()
    if len(listed) > most:
        raise TooLarge("events", f"has {len(listed)} events, over the limit of {most} a message "
                                 "(NOTIFIER_MAX_EVENTS_PER_MESSAGE): publish them in several")
    envelopes = [_envelope_of(event, index, org_id) for index, event in enumerate(listed)]
    if envelopes:
        _send_ingest(envelopes, broker_url)
    return [str(envelope["eventId"]) for envelope in envelopes]


def _envelope_of(event: Any, index: int, org_id: int | None) -> dict[str, Any]:
    if not isinstance(event, Mapping):
        raise InvalidEvent(path_text(("events", index)),
                           f"must be an event envelope (a mapping), not {type(event).__name__}")
    fields = dict(event)
    try:
        envelope = build_envelope(
            fields.pop("eventName", None), fields.pop("data", None),
            org_id=fields.pop("orgId", org_id), event_id=fields.pop("eventId", None),
            ref_id=fields.pop("refId", None), api_request_id=fields.pop("apiRequestId", None),
            created_at=fields.pop("createdAt", None))
    except InvalidEvent as exc:
        raise InvalidEvent(path_text(("events", index, *exc.path)), exc.problem) from exc
    envelope.update(fields)  # the envelope's other fields, as given
    return envelope


def _max_events_per_message() -> int:
    from config import load_setting

    return int(load_setting("max_events_per_message"))


def publish_envelope(envelope: Any, *, broker_url: str | None = None) -> None:
    """Send one event envelope, as it is, to be ingested (``publish`` builds it first)."""
    _send_ingest(envelope, broker_url)


def _send_ingest(body: Any, broker_url: str | None) -> None:
    """Send one ingest message: an envelope, or a list of them."""
    if broker_url is None:
        from config import load_settings

        broker_url = load_settings().broker_url
    producer(broker_url).send_task(INGEST_TASK, args=[body], queue=QUEUE,
                                   **ingest_reprs([body], {}))


_ID_FIELDS = ("orgId", "eventName", "eventId")
# The events of a list whose ids a message's headers show; the rest are counted.
_SHOWN_EVENTS = 5


def ingest_reprs(args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, str]:
    """``argsrepr`` and ``kwargsrepr`` of an ingest message: the event's ids, never its payload
    (of a list: the first few events' ids, and how many more there are).

    Celery puts them in the message's headers for Flower and the workers' logs to show instead
    of the arguments; by default they are the arguments' repr, the whole event with its
    customer data.
    """
    body = args[0] if args else kwargs.get("envelope")
    if isinstance(body, list):
        shown: list[Any] = [_ids(envelope) for envelope in body[:_SHOWN_EVENTS]]
        if len(body) > _SHOWN_EVENTS:
            shown.append(f"+{len(body) - _SHOWN_EVENTS} more")
        return {"argsrepr": json.dumps([shown]), "kwargsrepr": "{}"}
    return {"argsrepr": json.dumps([_ids(body)]), "kwargsrepr": "{}"}


def _ids(envelope: Any) -> dict[str, Any]:
    if not isinstance(envelope, Mapping):
        return {}
    return {name: _short(envelope.get(name)) for name in _ID_FIELDS if name in envelope}


def _short(value: Any) -> Any:
    # An id is a short scalar; anything else is shown by its type alone.
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int | float):
        return value
    if isinstance(value, str):
        return value[:100]
    return f"<{type(value).__name__}>"


def send_lease(app: Celery, lease: Lease, *, claimed_until: int | None = None) -> None:
    """Send the delivery task of one lease, by its lane, after its linger if it has one."""
    _send(app, lease, (), claimed_until)


def lease_sender(broker_url: str) -> Callable[[Lease], None]:
    """``send_lease`` over the broker at ``broker_url``, as the pipeline's ``send`` argument."""
    app = producer(broker_url)

    def send(lease: Lease) -> None:
        send_lease(app, lease)

    return send


def replay_sender(broker_url: str) -> Callable[[int], None]:
    """Hands a replay (by id) over the broker at ``broker_url`` to a worker, which queues what
    is left of it (``pipeline.carry_on_replay``)."""
    app = producer(broker_url)

    def send(replay_id: int) -> None:
        app.send_task(REPLAY_TASK, args=[replay_id], queue=QUEUE)

    return send


def send_leases(app: Celery, leases: Iterable[Lease], *, most: int,
                claimed_until: int | None = None) -> None:
    """Send the delivery tasks of several leases, several leases a task where it pays.

    Fast-lane leases that start together (at once, or after the same linger) share tasks of up
    to ``most`` deliveries: the first lease is the task's own, the others ride as ``more``
    (traffic spread over many webhooks would otherwise cost one task per delivery). A webhook's
    fast-lane lease and the leases riding with it (``Lease.rides``) go in one task of their own,
    never split (they hold one prefork process, and what waits for that lease boards it as it
    starts); another fast-lane lease of the same webhook goes in a task of its own. A slow-lane
    lease goes alone, and so does a riding lease sent without its fast-lane one, by the slow
    lane. ``claimed_until``: see ``pipeline.deliver``.
    """
    groups: dict[int, list[Lease]] = defaultdict(list)  # by linger

    def send_group(group: list[Lease]) -> None:
        if group:
            _send(app, group[0], group[1:], claimed_until)
            group.clear()

    for first, *riding in _units(leases):
        group = groups[first.linger_ms]
        # A task of its own: a slow-lane lease, a lone rider, a unit with riders (what waits
        # for its fast-lane lease boards that task: Queues.take_many), a second of a webhook.
        if (first.slow or first.rides or riding
                or any(held.webhook_id == first.webhook_id for held in group)):
            _send(app, first, riding, claimed_until)
            continue
        if sum(len(lease.delivery_ids) for lease in group) + len(first.delivery_ids) > most:
            send_group(group)
        group.append(first)
    for group in groups.values():
        send_group(group)


def _units(leases: Iterable[Lease]) -> Iterator[list[Lease]]:
    """The leases in the units they are sent in: a fast-lane lease with the leases riding with
    it (those of its webhook right after it), any other lease alone."""
    unit: list[Lease] = []
    for lease in leases:
        if (lease.rides and unit and unit[0].webhook_id == lease.webhook_id
                and not (unit[0].slow or unit[0].rides)):
            unit.append(lease)
            continue
        if unit:
            yield unit
        unit = [lease]
    if unit:
        yield unit


def _send(app: Celery, lease: Lease, more: Sequence[Lease], claimed_until: int | None) -> None:
    kwargs: dict[str, Any] = {}
    # (A riding lease is a task's own only when sent without its fast-lane lease.)
    slow = lease.slow or lease.rides
    if slow:
        kwargs["slow"] = True
    if more:
        kwargs["more"] = [lease_args(other) for other in more]
    if claimed_until is not None:
        kwargs["claimed_until"] = claimed_until
    app.send_task(DELIVER_TASK, args=lease_args(lease), kwargs=kwargs or None,
                  queue=SLOW_QUEUE if slow else DELIVER_QUEUE,
                  countdown=lease.linger_ms / 1000 if lease.linger_ms else None)


def lease_args(lease: Lease) -> list[Any]:
    """A lease as the delivery task's arguments (and as an item of its ``more``)."""
    return [lease.webhook_id, lease.token, list(lease.delivery_ids)]
