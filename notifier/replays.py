"""Which deliveries a replay sends again: the criteria, read and checked once for every room.

The command line (``celery -A tasks replay``), the API (``POST /v3/webHooks/{id}/replay``) and
the admin pages give the same criteria as text; ``selection`` turns them into a ``Selection``
(``store`` builds its query, ``pipeline.replay_selection`` replays it) or raises
``InvalidInput`` naming the criterion by its API name (``FIELDS`` maps each to its option).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from notifier.clock import iso_ms
from notifier.errors import InvalidInput
from notifier.models import DeliveryStatus

__all__ = ["FIELDS", "MAX_IDS", "MAX_NAMES", "Selection", "selection"]

# Each criterion's API name and its command-line option.
FIELDS: Mapping[str, str] = {
    "deliveryIds": "DELIVERY_IDS", "eventId": "--event-id", "webhook": "--webhook",
    "org": "--org", "status": "--status", "eventName": "--event-name", "since": "--since",
    "until": "--until", "responseStatus": "--response-status",
}
# Bounds on what one replay names (each name is also a bound parameter of its query).
MAX_IDS = 10_000
MAX_NAMES = 100

_RELATIVE = re.compile(r"^(\d{1,9})\s*([smhdw])$")
_UNIT_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
_STATUS_CLASS = re.compile(r"^([1-5])xx$")


@dataclass(frozen=True)
class Selection:
    """The deliveries to replay: each criterion given narrows it (all must hold).

    ``webhook`` is a webhook's id or its ``consumerGroupId``; times are on the delivery's
    ingestion (``since`` included, ``until`` not); ``response_status`` bounds (both included)
    its last answer's status code.
    """

    delivery_ids: tuple[str, ...] = ()
    event_id: str | None = None
    webhook: str | None = None
    org_id: int | None = None
    statuses: tuple[str, ...] = ()
    event_names: tuple[str, ...] = ()
    since_ms: int | None = None
    until_ms: int | None = None
    response_status: tuple[int, int] | None = None

    def as_json(self) -> dict[str, Any]:
        """The criteria given, in the API's names (times as ISO 8601), as a replay records them."""
        given: dict[str, Any] = {
            "deliveryIds": list(self.delivery_ids), "eventId": self.event_id,
            "webhook": self.webhook, "org": self.org_id, "status": list(self.statuses),
            "eventName": list(self.event_names), "since": iso_ms(self.since_ms),
            "until": iso_ms(self.until_ms),
            "responseStatus": list(self.response_status) if self.response_status else None}
        return {name: value for name, value in given.items() if value not in (None, [])}

    @classmethod
    def from_json(cls, given: Mapping[str, Any]) -> Selection:
        """The selection a replay recorded (``as_json``), to carry the replay on."""
        status = given.get("responseStatus")
        return cls(
            delivery_ids=tuple(given.get("deliveryIds", ())), event_id=given.get("eventId"),
            webhook=given.get("webhook"), org_id=given.get("org"),
            statuses=tuple(given.get("status", ())), event_names=tuple(given.get("eventName", ())),
            since_ms=_recorded_time(given.get("since")), until_ms=_recorded_time(given.get("until")),
            response_status=(int(status[0]), int(status[1])) if status else None)


def selection(*, now_ms: int, delivery_ids: Iterable[str] = (), event_id: str | None = None,
              webhook: str | None = None, org: str | int | None = None,
              statuses: Iterable[str] = (), event_names: Iterable[str] = (),
              since: str | None = None, until: str | None = None,
              response_status: str | None = None) -> Selection:
    """Read the criteria as given (text); ``InvalidInput`` names the first bad one. At least
    one is required: a replay of everything is never made by accident."""
    ids = tuple(delivery_ids)
    if len(ids) > MAX_IDS:
        raise InvalidInput("deliveryIds", f"at most {MAX_IDS} ids per replay")
    for index, delivery_id in enumerate(ids):
        _check_text(("deliveryIds", index), delivery_id, 40)
    names = tuple(event_names)
    if len(names) > MAX_NAMES:
        raise InvalidInput("eventName", f"at most {MAX_NAMES} event names")
    for index, name in enumerate(names):
        _check_text(("eventName", index), name, 100)
    chosen = tuple(statuses)
    known = [status.value for status in DeliveryStatus]
    for index, status in enumerate(chosen):
        if status not in known:
            raise InvalidInput(("status", index),
                               f"{status!r} is not a delivery status ({', '.join(known)})")
    if event_id is not None:
        _check_text("eventId", event_id, 100)
    if webhook is not None:
        _check_text("webhook", webhook, 36)
    made = Selection(
        delivery_ids=ids, event_id=event_id, webhook=webhook, org_id=_org(org),
        statuses=tuple(dict.fromkeys(chosen)), event_names=tuple(dict.fromkeys(names)),
        since_ms=_time("since", since, now_ms), until_ms=_time("until", until, now_ms),
        response_status=_response_status(response_status))
    if made == Selection():
        raise InvalidInput("selection", "give at least one criterion (delivery ids, "
                           + ", ".join(list(FIELDS)[1:]) + "): a replay of everything is "
                           "never made by accident")
    if made.since_ms is not None and made.until_ms is not None and made.until_ms <= made.since_ms:
        raise InvalidInput("until", "must be later than since")
    return made


def _recorded_time(text: str | None) -> int | None:
    return None if text is None else round(datetime.fromisoformat(text).timestamp() * 1000)


def _check_text(field: str | tuple[str, int], value: Any, longest: int) -> None:
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(field, "must be a non-empty string")
    if len(value) > longest:
        raise InvalidInput(field, f"longer than {longest} characters")


def _org(org: str | int | None) -> int | None:
    if org is None:
        return None
    try:
        value = int(org)
    except ValueError:
        raise InvalidInput("org", f"{org!r} is not an org id (an integer)") from None
    if not 0 <= value < 2**63:
        raise InvalidInput("org", f"{org!r} is out of range")
    return value


def _time(field: str, text: str | None, now_ms: int) -> int | None:
    """ISO 8601 (no zone: UTC) or a time ago (``30m``, ``2h``, ``3d``, ``1w``)."""
    if text is None:
        return None
    if not isinstance(text, str):
        raise InvalidInput(field, "must be a string")
    relative = _RELATIVE.match(text.strip())
    if relative:
        return now_ms - int(relative.group(1)) * _UNIT_MS[relative.group(2)]
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidInput(field, f"{text!r} is neither ISO 8601 (2026-03-05T02:00:00Z) nor a "
                                  "time ago (30m, 2h, 3d)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return round(moment.timestamp() * 1000)


def _response_status(text: str | None) -> tuple[int, int] | None:
    """``5xx`` (any of a class) or one code (``404``)."""
    if text is None:
        return None
    if not isinstance(text, str):
        raise InvalidInput("responseStatus", "must be a string")
    text = text.strip().lower()
    of_class = _STATUS_CLASS.match(text)
    if of_class:
        low = int(of_class.group(1)) * 100
        return low, low + 99
    if text.isdigit() and 100 <= int(text) <= 599:
        return int(text), int(text)
    raise InvalidInput("responseStatus", f"{text!r} is neither a status class (5xx, 4xx) nor "
                                         "an HTTP status code (100-599)")
