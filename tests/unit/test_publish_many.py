"""``notifier.publish_many``: several events in one broker message, each an envelope of its own,
the list bounded, nothing sent when one cannot be built (the worker's side is in
tests/unit/test_ingest_task.py and tests/integration/test_publish_many.py)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

import notifier
from notifier import client
from notifier.errors import InvalidEvent, TooLarge

ORG = 100


class Producer:
    """Stands for the client's Celery app: records what it would send."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def send_task(self, name: str, **options: Any) -> None:
        self.sent.append({"name": name, **options})


@pytest.fixture
def producer(monkeypatch: pytest.MonkeyPatch) -> Producer:
    fake = Producer()
    monkeypatch.setattr(client, "producer", lambda broker_url: fake)
    monkeypatch.delenv("NOTIFIER_MAX_EVENTS_PER_MESSAGE", raising=False)
    return fake


def event(n: int, **fields: Any) -> dict[str, Any]:
    return {"eventName": "pointsIssued", "data": {"customerIdentifiers": {"customerId": n}},
            **fields}


def test_one_message_carries_an_envelope_per_event_in_order(producer: Producer) -> None:
    ids = notifier.publish_many(
        [event(1, orgId=ORG), event(2, eventId="given", refId="r-2", createdAt=5),
         event(3, orgId=7, loyaltyProgram="gold", event_id="a field like any other")],
        org_id=ORG, broker_url="memory://")

    (message,) = producer.sent
    assert message["name"] == client.INGEST_TASK and message["queue"] == client.QUEUE
    (envelopes,) = message["args"]
    assert [e["eventId"] for e in envelopes] == ids
    assert ids[1] == "given"
    for generated in (ids[0], ids[2]):
        uuid.UUID(generated)  # filled in, one each
    assert ids[0] != ids[2]
    # org_id stands for a missing orgId only; the other fields are kept as given.
    assert [e["orgId"] for e in envelopes] == [ORG, ORG, 7]
    assert envelopes[1]["refId"] == "r-2" and envelopes[1]["createdAt"] == 5
    assert envelopes[2]["loyaltyProgram"] == "gold"
    assert envelopes[2]["event_id"] == "a field like any other"
    assert all(e["createdAt"] > 0 and e["eventName"] == "pointsIssued" for e in envelopes)
    assert [e["data"] for e in envelopes] == [event(n)["data"] for n in (1, 2, 3)]


def test_the_message_shows_its_events_ids_never_their_data(producer: Producer) -> None:
    notifier.publish_many([event(n, eventId=f"e-{n}") for n in range(8)], org_id=ORG,
                          broker_url="memory://")

    (message,) = producer.sent
    shown = json.loads(message["argsrepr"])
    assert shown == [[*({"orgId": ORG, "eventName": "pointsIssued", "eventId": f"e-{n}"}
                        for n in range(5)), "+3 more"]]
    assert "customerId" not in message["argsrepr"] and message["kwargsrepr"] == "{}"


def test_the_same_event_id_twice_is_sent_as_given(producer: Producer) -> None:
    # As two publish() calls with one eventId: the worker stores and delivers it once.
    ids = notifier.publish_many([event(1, eventId="same"), event(2, eventId="same")],
                                org_id=ORG, broker_url="memory://")

    assert ids == ["same", "same"]
    assert len(producer.sent) == 1


def test_a_list_over_the_bound_is_refused_and_nothing_is_sent(
        producer: Producer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFIER_MAX_EVENTS_PER_MESSAGE", "3")
    notifier.publish_many([event(n) for n in range(3)], org_id=ORG, broker_url="memory://")

    with pytest.raises(TooLarge) as refused:
        notifier.publish_many([event(n) for n in range(4)], org_id=ORG, broker_url="memory://")

    assert refused.value.field == "events"
    assert "4 events" in str(refused.value) and "of 3" in str(refused.value)
    assert "NOTIFIER_MAX_EVENTS_PER_MESSAGE" in str(refused.value)
    assert len(producer.sent) == 1  # the list of three only


def test_the_bound_is_1000_by_default(producer: Producer) -> None:
    notifier.publish_many([event(n) for n in range(1000)], org_id=ORG, broker_url="memory://")
    with pytest.raises(TooLarge):
        notifier.publish_many([event(n) for n in range(1001)], org_id=ORG,
                              broker_url="memory://")
    assert len(producer.sent) == 1


@pytest.mark.parametrize(("bad", "field"), [
    ({"data": {}, "orgId": ORG}, "events[1].eventName"),
    ({"eventName": "pointsIssued", "orgId": ORG}, "events[1].data"),
    ({"eventName": "pointsIssued", "data": {}, "orgId": "100"}, "events[1].orgId"),
    ("pointsIssued", "events[1]"),
])
def test_an_event_that_cannot_be_built_is_named_and_nothing_is_sent(
        producer: Producer, bad: Any, field: str) -> None:
    with pytest.raises(InvalidEvent) as refused:
        notifier.publish_many([event(0, orgId=ORG), bad], broker_url="memory://")

    assert refused.value.field == field
    assert producer.sent == []


def test_no_events_send_nothing(producer: Producer) -> None:
    assert notifier.publish_many([], org_id=ORG, broker_url="memory://") == []
    assert producer.sent == []
