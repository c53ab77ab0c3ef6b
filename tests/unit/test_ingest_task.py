"""The ingest task's handling of a gathered batch that fails (the worker path itself is in
tests/integration/test_pipeline.py, the database outage included)."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest

from notifier import store
from notifier.errors import StoreUnavailable, TooManyEvents
from notifier.store import IngestOutcome
from tasks import delivery
from tasks.gathering import SimpleRequest


def _event(n: int | str) -> dict[str, Any]:
    return {"eventName": "pointsIssued", "eventId": f"e-{n}", "orgId": 1}


def _request(n: int, retries: int = 0, **kwargs: Any) -> SimpleRequest:
    args = () if kwargs else (_event(n),)
    return _message(n, args, retries, **kwargs)


def _listed(n: int, events: list[dict[str, Any]], retries: int = 0) -> SimpleRequest:
    """A message of notifier.publish_many: the list is its one argument."""
    return _message(n, (events,), retries)


def _message(n: int, args: tuple[Any, ...], retries: int = 0, **kwargs: Any) -> SimpleRequest:
    return SimpleRequest(id=f"task-{n}", name=delivery.INGEST_TASK, args=args, kwargs=kwargs,
                         delivery_info={}, hostname="test", ignore_result=True, reply_to=None,
                         correlation_id=None, request_dict={"retries": retries})


class Recorder:
    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail_batch: Exception | None,
                 fail_alone: dict[str, Exception], horizon: float = 3600,
                 most: int = 1000) -> None:
        self.accepted: list[Any] = []
        self.sent: list[dict[str, Any]] = []
        self.ended: list[tuple[Any, BaseException]] = []
        self.dead: list[tuple[list[Any], str]] = []
        self.batches: list[list[Any]] = []  # what each accept_many was given
        self.fail_batch, self.fail_alone = fail_batch, fail_alone
        services = SimpleNamespace(settings=SimpleNamespace(ingest_retry_horizon=horizon,
                                                           max_events_per_message=most))
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
        self.batches.append(list(envelopes))
        if len(envelopes) > 1 and self.fail_batch is not None:
            raise self.fail_batch
        return [self.accept(services, envelope, send) for envelope in envelopes]

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


# ---------------------------------------------------------------- several events a message


def test_each_event_of_a_list_is_ingested_on_its_own_and_a_poison_holds_back_none(
        monkeypatch: pytest.MonkeyPatch) -> None:
    poison = KeyError("poison")
    recorder = Recorder(monkeypatch, ValueError("a bug"), {"e-b": poison})
    events = [_event("a"), _event("b"), _event("c")]

    settled = delivery.ingest.run([_listed(1, events), _request(2)])

    assert settled == 2  # messages, each acknowledged once all its events are settled
    assert recorder.batches[0] == [*events, _event(2)]  # one transaction tried first
    assert [e["eventId"] for e in recorder.accepted] == ["e-a", "e-c", "e-2"]
    assert recorder.ended == [(_event("b"), poison)]
    assert recorder.sent == []


def test_a_list_whose_events_fail_transiently_is_sent_again_once_whole(
        monkeypatch: pytest.MonkeyPatch) -> None:
    away = StoreUnavailable("database away")
    recorder = Recorder(monkeypatch, ValueError("a bug"), {"e-b": away, "e-c": away})
    events = [_event("a"), _event("b"), _event("c")]

    delivery.ingest.run([_listed(1, events, retries=2)])

    # Once, not once per failed event: "e-a", stored already, is then a duplicate.
    (again,) = recorder.sent
    assert again["args"] == (events,) and again["task_id"] == "task-1"
    assert again["retries"] == 3 and again["countdown"] == 4
    # Flower shows the list by its events' ids.
    assert json.loads(again["argsrepr"]) == [[{"orgId": 1, "eventName": "pointsIssued",
                                               "eventId": f"e-{n}"} for n in "abc"]]


def test_a_list_past_the_horizon_keeps_only_its_failed_events_as_dead_letters(
        monkeypatch: pytest.MonkeyPatch) -> None:
    away = StoreUnavailable("deadlock")
    recorder = Recorder(monkeypatch, ValueError("a bug"), {"e-b": away}, horizon=15)

    delivery.ingest.run([_listed(1, [_event("a"), _event("b")], retries=4)])

    assert recorder.sent == []
    ((envelopes, reason),) = recorder.dead
    assert envelopes == [_event("b")] and "deadlock" in reason


def test_messages_are_stored_in_transactions_of_whole_messages_up_to_the_bound(
        monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = Recorder(monkeypatch, None, {}, most=5)
    sizes = [3, 2, 1, 5, 2]
    requests = [_listed(m, [_event(f"{m}.{n}") for n in range(size)])
                for m, size in enumerate(sizes)]

    delivery.ingest.run(requests)

    assert [len(batch) for batch in recorder.batches] == [5, 1, 5, 2]
    assert len(recorder.accepted) == sum(sizes)


def test_a_list_over_the_bound_is_stored_rejected_event_by_event_by_their_names(
        monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = Recorder(monkeypatch, None, {}, most=2)
    events = [{**_event(n), "data": {"customerIdentifiers": {"customerId": n}}}
              for n in range(3)]

    delivery.ingest.run([_listed(1, events), _listed(2, events[:2])])

    over, fine = recorder.batches
    assert fine == events[:2]
    # Each event of the message over the bound goes to the store to be kept rejected, named
    # by its ids, never its data, with the problem that names the limit.
    assert over == [_event(n) for n in range(3)]
    assert all(isinstance(refused, store.Refused) for refused in over)
    problem = over[0].problem
    assert isinstance(problem, TooManyEvents) and problem.field == "$"
    assert "3 events" in str(problem) and "NOTIFIER_MAX_EVENTS_PER_MESSAGE" in str(problem)
