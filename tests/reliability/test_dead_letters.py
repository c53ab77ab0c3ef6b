"""The store's end of a poison event, on SQLite and PostgreSQL: kept rejected once per eventId
with what can be kept, or kept whole as a dead letter that round-trips exactly for replay."""

from __future__ import annotations

import math

import pytest
from sqlalchemy import select

from notifier import store
from notifier.db import Database
from notifier.errors import NotFound
from notifier.models import Event, EventStatus

ORG = 71014


def test_a_refused_event_is_kept_rejected_once_under_its_event_id(db: Database) -> None:
    store.create_org(db, ORG, "org", now_ms=0)
    envelope = {"eventName": "pointsIssued", "eventId": "e-1", "orgId": ORG,
                "data": {"points": math.nan, "note": "a\x00b"}}

    first = store.reject(db, envelope, "not stored: the database said no", now_ms=1)
    again = store.reject(db, envelope, "not stored: the database said no", now_ms=2)

    assert (first.status, first.created, first.error) == (
        EventStatus.REJECTED, True, "not stored: the database said no")
    assert not again.created and again.status == EventStatus.REJECTED
    with db.session() as session:
        (row,) = session.scalars(select(Event)).all()
    assert (row.event_id, row.org_id) == ("e-1", ORG)
    assert row.payload["data"] == {"points": "NaN", "note": "a\ufffdb"}


def test_a_dead_letter_keeps_the_envelope_exactly_and_is_replayed_once(db: Database) -> None:
    envelope = {"eventName": "pointsIssued", "eventId": "e-2", "orgId": ORG,
                "data": {"points": -math.inf, "note": "a\x00b\udc80"}}

    (letter,) = store.dead_letter(db, [envelope], "refused twice", now_ms=3)

    (listed,) = store.dead_letters(db)
    assert (listed.id, listed.event_id, listed.reason, listed.received_at_ms) == (
        letter, "e-2", "refused twice", 3)
    ((same, back),) = store.replayable_dead_letters(db, [letter])
    assert same == letter and back["data"]["points"] == -math.inf
    assert back["data"]["note"] == "a\x00b\udc80" and back["eventId"] == "e-2"
    store.mark_replayed(db, [letter], now_ms=4)
    assert store.dead_letters(db) == []
    with pytest.raises(NotFound, match=str(letter)):
        store.replayable_dead_letters(db, [letter])
