"""The one exception tree of notifier.

    NotifierError
    ├── InvalidInput            bad input from a caller; names the field
    │   ├── InvalidEvent        an event that fails its envelope or schema check
    │   │   ├── EventTooLarge   an event over NOTIFIER_MAX_EVENT_BYTES (also a TooLarge)
    │   │   └── TooManyEvents   an event of a broker message carrying more than
    │   │                       NOTIFIER_MAX_EVENTS_PER_MESSAGE (also a TooLarge)
    │   ├── InvalidRows         bulk input with bad lines; lists each by number
    │   └── TooLarge            input over a size limit; names the field and the limit
    ├── NotFound                an id that does not exist (or belongs to another org)
    ├── AuthenticationFailed    no API key, or one that is wrong or revoked
    ├── DestinationNotAllowed   a webhook URL that points where notifier may not send
    ├── StoreRefused            the database refused a statement for good (bad data, a bug)
    ├── DeadlineExceeded        a request to a webhook cut at its whole-request deadline
    └── TransientError          worth retrying: the same call may succeed later
        ├── StoreUnavailable    the database did not answer
        ├── QueueUnavailable    Redis did not answer
        └── StateLost           Redis lost notifier's state: nothing is dispatched until rebuilt

(``pipeline.DeliveryInterrupted``, a ``TransientError`` that carries the leases a stopped delivery
task still holds, lives with the leases, not here: the root knows nothing of Redis.)

Outside errors are wrapped at the boundary (``raise StoreUnavailable(...) from exc``) so callers
only ever catch these. Tasks retry ``TransientError``; the API maps each class to one status.
Whether an error is worth retrying is decided once, in ``notifier.faults``: anything that is not
a ``TransientError`` (after wrapping) is permanent, and ends its work with a recorded reason.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "AuthenticationFailed",
    "DeadlineExceeded",
    "DestinationNotAllowed",
    "EventTooLarge",
    "InvalidEvent",
    "InvalidInput",
    "InvalidRows",
    "NotFound",
    "NotifierError",
    "QueueUnavailable",
    "StateLost",
    "StoreRefused",
    "StoreUnavailable",
    "TooLarge",
    "TooManyEvents",
    "TransientError",
    "path_text",
]


class NotifierError(Exception):
    """Root of every error notifier raises on purpose."""


class InvalidInput(NotifierError):
    """A caller sent something notifier cannot accept; ``field`` names where.

    ``field`` is given as a string (``"name"``) or as its path (``("webHookHeaders", "X-Key")``,
    ``("events", 2, "data")``). ``path`` keeps the parts as data, so a caller showing the error
    beside an input (the admin form) never parses them back out of ``field``, which joins them
    (``webHookHeaders.X-Key``, ``events[2].data``) for the API's ``errors[].field``.
    """

    def __init__(self, field: str | Sequence[str | int], problem: str) -> None:
        self.path: tuple[str | int, ...] = (field,) if isinstance(field, str) else tuple(field)
        self.field = path_text(self.path)
        self.problem = problem
        super().__init__(f"{self.field}: {problem}")


def path_text(path: Sequence[str | int]) -> str:
    """``("events", 2, "data")`` -> ``events[2].data``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


class InvalidEvent(InvalidInput):
    """An event failed its envelope or schema check; ``field`` is a JSON path such as ``$.data``.

    ``rule`` is the check that failed (a JSON-schema keyword such as ``type``, or ``envelope``):
    with the path, what a log line may say, since the message may quote the event's values.
    """

    def __init__(self, field: str, problem: str, *, rule: str = "envelope") -> None:
        super().__init__(field, problem)
        self.rule = rule


class TooLarge(InvalidInput):
    """Input over one of the size limits (the API answers 413); the message names the setting."""


class EventTooLarge(TooLarge, InvalidEvent):
    """An event over ``NOTIFIER_MAX_EVENT_BYTES``: refused by the API, stored as rejected when
    it came through the broker."""


class TooManyEvents(TooLarge, InvalidEvent):
    """An event of a broker message carrying more than ``NOTIFIER_MAX_EVENTS_PER_MESSAGE``:
    stored as rejected, as an event over the size limit is (``notifier.publish_many`` refuses
    such a list before sending it)."""


class NotFound(NotifierError):
    """The thing asked for does not exist, or is not the caller's to see."""


class AuthenticationFailed(NotifierError):
    """The request's API key is missing, unknown or revoked."""


class DestinationNotAllowed(NotifierError):
    """A webhook URL's scheme or address is outside what the operator allows."""


class StoreRefused(NotifierError):
    """The database refused a statement in a way that retrying cannot mend: a data or integrity
    error, or a bug. The message names the SQLSTATE and the database's reason."""
class DeadlineExceeded(NotifierError):
    """A request to a webhook ran past its whole-request deadline and was cut; retried like a
    timeout (it is a sender's result, not a failure of notifier's own dependencies)."""


class TransientError(NotifierError):
    """A dependency failed in a way that may pass: retry later.

    ``public`` is what the API answers: the message itself carries the driver's words (hosts,
    ports, server states) for the operator's log, not for callers.
    """

    public = "a service notifier depends on is unavailable; try again shortly"


class StoreUnavailable(TransientError):
    """The database could not be reached or gave up mid-transaction."""

    public = "the database is unavailable; try again shortly"


class QueueUnavailable(TransientError):
    """Redis (queues, slots, retry times) could not be reached."""

    public = "Redis (queues and slots) is unavailable; try again shortly"


class StateLost(TransientError):
    """Redis lost notifier's state (flushed, restarted) and it is not rebuilt from the database
    yet: no slot is granted until it is, or the requests still open would not be counted."""

    public = "Redis (queues and slots) is being rebuilt; try again shortly"


class InvalidRows(InvalidInput):
    """Bulk input (a reference-data file) with bad lines, none of it applied.

    ``rows`` holds ``(line number, problem)`` for every bad line, in file order.
    """

    def __init__(self, rows: Sequence[tuple[int, str]]) -> None:
        line, problem = rows[0]
        more = f" (and {len(rows) - 1} more bad lines)" if len(rows) > 1 else ""
        super().__init__(f"line {line}", problem + more)
        self.rows = tuple(rows)
