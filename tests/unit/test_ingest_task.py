"""The ingest task's handling of a gathered batch that fails (the worker path itself is in
tests/integration/test_pipeline.py, the database outage included)."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest

from notifier.errors import StoreUnavailable
from notifier.store import IngestOutcome
from tasks import delivery
from tasks.gathering import SimpleRequest


def _request(n: int, retries: int = 0, **kwargs: Any) -> SimpleRequest:
    args = () if kwargs else ({"eventName": "pointsIssued", "eventId": f"e-{n}", "orgId": 1},)
    return SimpleRequest(id=f"task-{n}", name=delivery.INGEST_TASK, args=args, kwargs=kwargs,
                         delivery_info={}, hostname="test", ignore_result=True, reply_to=None,
                         correlation_id=None, request_dict={"retries": retries})


class Recorder:
    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail_batch: Exception,
                 fail_alone: dict[str, Exception], horizon: float = 3600) -> None:
        self.accepted: list[Any] = []
        self.sent: list[dict[str, Any]] = []
        self.ended: list[tuple[Any, BaseException]] = []
        self.dead: list[tuple[list[Any], str]] = []
        self.fail_batch, self.fail_alone = fail_batch, fail_alone
        services = SimpleNamespace(settings=SimpleNamespace(ingest_retry_horizon=horizon))
        monkeypatch.setattr(delivery, "services", lambda: services)
        monkeypatch.setattr(delivery.pipeline, "accept_many", self.accept_many)
        monkeypatch.setattr(delivery.pipeline, "accept", self.accept)
        monkeypatch.setattr(delivery.pipeline, "reject_for_good", self.reject_for_good)
        monkeypatch.setattr(delivery.pipeline, "dead_letter", self.dead_letter)
        monkeypatch.setattr(delivery.app, "send_task", self.send_task)

    def reject_for_good(self, services: Any, envelope: Any, fault: BaseException) -> Any:
        self.ended.append((envelope, fault))
        return IngestOutcome(envelope.get("eventId"), "rejected", True,
                             f"not stored: {fault!r}", error_rule=type(fault).__name__)

    def dead_letter(self, services: Any, envelopes: list[Any], reason: str) -> list[int]:
        self.dead.append((envelopes, reason))
        return [len(self.dead)]

    def accept_many(self, services: Any, envelopes: list[Any], send: Any) -> list[Any]:
        if len(envelopes) > 1:
            raise self.fail_batch
        return [self.accept(services, envelopes[0], send)]

    def accept(self, services: Any, envelope: Any, send: Any) -> Any:
        if (fault := self.fail_alone.get(envelope.get("eventId"))) is not None:
            raise fault
        self.accepted.append(envelope)
        return SimpleNamespace(event_id=envelope.get("eventId"), error=None)

    def send_task(self, name: str, **options: Any) -> None:
        self.sent.append({"name": name, **options})


def test_a_batch_that_fails_for_good_is_ingested_event_by_event_and_the_poison_ends_recorded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    poison = KeyError("poison")
    recorder = Recorder(monkeypatch, ValueError("a bug"),
                        {"e-2": poison, "e-3": StoreUnavailable("database away")})

    settled = delivery.ingest.run([_request(1), _request(2, retries=3), _request(3, retries=3),
                                   _request(4)])

    assert settled == 4
    assert [e["eventId"] for e in recorder.accepted] == ["e-1", "e-4"]
    # A permanent failure ends with a recorded reason (rejected, or a dead letter), and is not
    # sent again: it would fail the same way for ever.
    assert recorder.ended == [(_request(2).args[0], poison)]
    # A transient one is sent again: same task id, one more retry, a longer countdown.
    (again,) = recorder.sent
    assert again["task_id"] == "task-3" and again["retries"] == 4 and again["countdown"] == 8
    assert again["args"] == _request(3).args and again["queue"] == delivery.client.QUEUE
    # Flower and the logs show it by its ids, never its payload.
    assert json.loads(again["argsrepr"]) == [{"orgId": 1, "eventName": "pointsIssued",
                                              "eventId": "e-3"}]
    assert again["kwargsrepr"] == "{}"
    assert recorder.dead == []


def test_an_event_failing_transiently_past_the_horizon_becomes_a_dead_letter(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Countdowns 1, 2, 4, 8: a message retried 4 times has waited 15 s.
    recorder = Recorder(monkeypatch, StoreUnavailable("deadlock"), {}, horizon=15)

    delivery.ingest.run([_request(1, retries=3), _request(2, retries=4)])

    assert [(s["task_id"], s["retries"]) for s in recorder.sent] == [("task-1", 4)]
    ((envelopes, reason),) = recorder.dead
    assert envelopes == list(_request(2).args)
    assert "deadlock" in reason and "NOTIFIER_INGEST_RETRY_HORIZON is 15 s" in reason


def test_a_transient_failure_sends_the_whole_batch_again_with_a_countdown(
        monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = Recorder(monkeypatch, StoreUnavailable("database away"), {})

    delivery.ingest.run([_request(1), _request(2, retries=9)])

    assert recorder.accepted == []
    assert [(s["task_id"], s["retries"], s["countdown"]) for s in recorder.sent] == [
        ("task-1", 1, 1), ("task-2", 10, delivery.RETRY_COUNTDOWN_MAX)]


def test_a_message_with_the_envelope_as_a_keyword_is_read_and_anything_else_is_kept(
        monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = Recorder(monkeypatch, ValueError("unused"), {})
    envelope = {"eventName": "pointsIssued", "eventId": "e-kw", "orgId": 1}

    delivery.ingest.run([_request(1, envelope=envelope)])
    delivery.ingest.run([_request(2, event=envelope)])

    assert recorder.accepted[0] == envelope
    # Not an envelope: handed to the store as it came, which keeps it as rejected.
    assert recorder.accepted[1] == {"args": [], "kwargs": {"event": envelope}}
