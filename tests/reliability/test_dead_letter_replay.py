"""Replaying dead letters when publishing fails midway, on SQLite and PostgreSQL: what went out
is not sent again by the next replay, and a letter sent twice anyway (its publish's answer
lost) is still one event, also when its envelope named no eventId."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import func, select

from notifier import pipeline, store
from notifier.db import Database
from notifier.models import Event
from notifier.schemas import load_catalog

ORG = 71015


def _envelope(n: int, **more: Any) -> dict[str, Any]:
    return {"eventName": "pointsIssued", "orgId": ORG,
            "data": {"customerIdentifiers": {"customerId": n}}, **more}


def test_a_replay_failing_midway_sends_nothing_twice_and_makes_one_event_per_letter(
        db: Database) -> None:
    store.create_org(db, ORG, "org", now_ms=0)
    # The producer named no eventId for the first (notifier gives one at ingest).
    first, second = store.dead_letter(db, [_envelope(1), _envelope(2, eventId="e-2")],
                                      "refused", now_ms=1)
    published: list[Any] = []

    def broker_down_after_the_first(envelope: Any) -> None:
        if published:
            raise ConnectionError("broker away")
        published.append(envelope)

    with pytest.raises(ConnectionError):
        pipeline.replay_dead_letters(db, [first, second], broker_down_after_the_first)
    # The first went out: the next replay is of the second only.
    assert [letter.id for letter in store.dead_letters(db)] == [second]

    def answer_lost(envelope: Any) -> None:  # the broker took it, its answer never came
        published.append(envelope)
        raise TimeoutError("no answer")

    with pytest.raises(TimeoutError):
        pipeline.replay_dead_letters(db, [second], answer_lost)
    assert pipeline.replay_dead_letters(db, [second], published.append) == 1
    assert store.dead_letters(db) == []

    # What went out more than once (the second; the first too, had the replay died between
    # sending it and marking it) is one event: the ingest is idempotent on the eventId, which
    # the dead letter fixes for an envelope that named none.
    assert len(published) == 3
    for envelope in [*published, published[0]]:
        store.ingest_many(db, load_catalog(), [envelope], now_ms=2)
    with db.session() as session:
        assert session.scalar(select(func.count()).select_from(Event)) == 2
