"""The store's end of a poison event, on SQLite and PostgreSQL: kept rejected once per eventId
with what can be kept, or kept whole as a dead letter that round-trips exactly for replay."""

from __future__ import annotations

import math

import pytest
from sqlalchemy import select

from notifier import store
from notifier.db import Database
from notifier.errors import NotFound
from notifier.models import DeadLetter, Event, EventStatus

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


DAY = 24 * 3600 * 1000
CUTOFF = 100 * DAY  # NOTIFIER_RETENTION_DAYS ago


def test_retention_empties_the_dead_letters_past_it_as_it_empties_events(db: Database) -> None:
    """A dead letter holds a whole event (customer data): kept past NOTIFIER_RETENTION_DAYS, it
    would outlive every copy retention empties. Emptied, it leaves the list (nothing is left to
    replay), and a replay of it says why."""
    def letter(event_id: str, at_ms: int) -> int:
        envelope = {"eventName": "pointsIssued", "eventId": event_id, "orgId": ORG,
                    "data": {"customer": "jane@example.com"}}
        (made,) = store.dead_letter(db, [envelope], "refused twice", now_ms=at_ms)
        return made

    old, older, recent = letter("old", CUTOFF - 1), letter("older", CUTOFF - DAY), letter(
        "recent", CUTOFF + 1)
    store.mark_replayed(db, [older], now_ms=CUTOFF - 1)  # replayed or not, it held the event

    first = store.purge(db, older_than_ms=CUTOFF, batch=1, now_ms=CUTOFF + DAY)
    second = store.purge(db, older_than_ms=CUTOFF, batch=1, now_ms=CUTOFF + DAY)
    third = store.purge(db, older_than_ms=CUTOFF, batch=1, now_ms=CUTOFF + DAY)

    assert (first.dead_letters, first.more) == (1, True)  # at most a batch a run
    assert (second.dead_letters, third.dead_letters, third.more) == (1, 0, False)
    with db.session() as session:
        kept = dict(session.execute(select(DeadLetter.event_id, DeadLetter.envelope)).all())
    assert "jane" not in kept["old"] and "jane" not in kept["older"]
    assert "jane" in kept["recent"]
    assert [listed.id for listed in store.dead_letters(db)] == [recent]
    with pytest.raises(NotFound, match=rf"{old}.*emptied by retention"):
        store.replayable_dead_letters(db, [old])
