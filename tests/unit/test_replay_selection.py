"""Reading a replay's criteria: times, status codes, and bad values named by their field."""

from __future__ import annotations

import pytest

from notifier.errors import InvalidInput
from notifier.models import DeliveryStatus
from notifier.replays import Selection, selection

NOW = 1_800_000_000_000  # 2027-01-15T08:00:00Z


def test_relative_times_count_back_from_now() -> None:
    chosen = selection(now_ms=NOW, webhook="w", since="2h", until="30m")

    assert chosen.since_ms == NOW - 2 * 3_600_000 and chosen.until_ms == NOW - 30 * 60_000
    assert selection(now_ms=NOW, since="3d").since_ms == NOW - 3 * 86_400_000
    assert selection(now_ms=NOW, since="45s").since_ms == NOW - 45_000
    assert selection(now_ms=NOW, since="1w").since_ms == NOW - 7 * 86_400_000


def test_iso_times_are_utc_unless_they_say_otherwise() -> None:
    assert selection(now_ms=NOW, since="2027-01-15T02:00:00Z").since_ms == NOW - 6 * 3_600_000
    assert selection(now_ms=NOW, since="2027-01-15T02:00").since_ms == NOW - 6 * 3_600_000
    assert selection(now_ms=NOW, since="2027-01-15T03:00+01:00").since_ms == NOW - 6 * 3_600_000


def test_response_status_is_a_class_or_one_code() -> None:
    assert selection(now_ms=NOW, response_status="5xx").response_status == (500, 599)
    assert selection(now_ms=NOW, response_status="4XX").response_status == (400, 499)
    assert selection(now_ms=NOW, response_status="404").response_status == (404, 404)


def test_statuses_are_those_of_the_enum_and_repeat_once() -> None:
    every = [status.value for status in DeliveryStatus]

    assert selection(now_ms=NOW, statuses=every + every).statuses == tuple(every)


@pytest.mark.parametrize(("given", "field", "problem"), [
    ({}, "selection", "at least one criterion"),
    ({"since": "yesterday"}, "since", "neither ISO 8601"),
    ({"until": "2h ago"}, "until", "neither ISO 8601"),
    ({"since": "1h", "until": "2h"}, "until", "later than since"),
    ({"response_status": "6xx"}, "responseStatus", "neither a status class"),
    ({"response_status": "99"}, "responseStatus", "neither a status class"),
    ({"statuses": ["dead", "lost"]}, "status[1]", "'lost' is not a delivery status"),
    ({"org": "acme"}, "org", "not an org id"),
    ({"event_names": ["pointsIssued", ""]}, "eventName[1]", "non-empty"),
    ({"delivery_ids": ["x" * 41]}, "deliveryIds[0]", "longer than 40"),
    ({"webhook": " "}, "webhook", "non-empty"),
])
def test_bad_values_name_their_field(given: dict[str, object], field: str, problem: str) -> None:
    with pytest.raises(InvalidInput, match=problem) as caught:
        selection(now_ms=NOW, **given)  # type: ignore[arg-type]

    assert caught.value.field == field


def test_the_selection_is_recorded_in_the_api_names() -> None:
    chosen = selection(now_ms=NOW, webhook="w", statuses=["dead"], since="2027-01-15T02:00Z",
                       response_status="5xx")

    assert chosen.as_json() == {"webhook": "w", "status": ["dead"],
                                "since": "2027-01-15T02:00:00.000Z", "responseStatus": [500, 599]}
    assert Selection().as_json() == {}
