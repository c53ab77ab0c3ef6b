"""The one exception tree of notifier.

    NotifierError
    ├── InvalidInput            bad input from a caller; names the field
    │   ├── InvalidEvent        an event that fails its envelope or schema check
    │   └── InvalidRows         bulk input with bad lines; lists each by number
    ├── NotFound                an id that does not exist (or belongs to another org)
    ├── AuthenticationFailed    no API key, or one that is wrong or revoked
    ├── DestinationNotAllowed   a webhook URL that points where notifier may not send
    └── TransientError          worth retrying: the same call may succeed later
        ├── StoreUnavailable    the database did not answer
        ├── QueueUnavailable    Redis did not answer
        ├── StateLost           Redis lost notifier's state: nothing is dispatched until rebuilt
        └── DeliveryInterrupted a delivery task stopped by one of those; what to carry on with

Outside errors are wrapped at the boundary (``raise StoreUnavailable(...) from exc``) so callers
only ever catch these. Tasks retry ``TransientError``; the API maps each class to one status.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from notifier.queues import Lease

__all__ = [
    "AuthenticationFailed",
    "DeliveryInterrupted",
    "DestinationNotAllowed",
    "InvalidEvent",
    "InvalidInput",
    "InvalidRows",
    "NotFound",
    "NotifierError",
    "QueueUnavailable",
    "StateLost",
    "StoreUnavailable",
    "TransientError",
]


class NotifierError(Exception):
    """Root of every error notifier raises on purpose."""


class InvalidInput(NotifierError):
    """A caller sent something notifier cannot accept; ``field`` names where."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class InvalidEvent(InvalidInput):
    """An event failed its envelope or schema check; ``field`` is a JSON path such as ``$.data``."""


class NotFound(NotifierError):
    """The thing asked for does not exist, or is not the caller's to see."""


class AuthenticationFailed(NotifierError):
    """The request's API key is missing, unknown or revoked."""


class DestinationNotAllowed(NotifierError):
    """A webhook URL's scheme or address is outside what the operator allows."""


class TransientError(NotifierError):
    """A dependency failed in a way that may pass: retry later."""


class StoreUnavailable(TransientError):
    """The database could not be reached or gave up mid-transaction."""


class QueueUnavailable(TransientError):
    """Redis (queues, slots, retry times) could not be reached."""


class StateLost(TransientError):
    """Redis lost notifier's state (flushed, restarted) and it is not rebuilt from the database
    yet: no slot is granted until it is, or the requests still open would not be counted."""


class DeliveryInterrupted(TransientError):
    """A delivery task stopped midway by a transient error (its cause, chained).

    ``leases`` are the task's leases whose slots it had not given back yet, for a retry to
    carry on with; ``claimed_until`` marks the claims on their deliveries that it still holds
    (``store.claim``'s ``held_until``).
    """

    def __init__(self, cause: TransientError, leases: Sequence[Lease],
                 claimed_until: int | None) -> None:
        super().__init__(str(cause))
        self.leases = tuple(leases)
        self.claimed_until = claimed_until


class InvalidRows(InvalidInput):
    """Bulk input (a reference-data file) with bad lines, none of it applied.

    ``rows`` holds ``(line number, problem)`` for every bad line, in file order.
    """

    def __init__(self, rows: Sequence[tuple[int, str]]) -> None:
        line, problem = rows[0]
        more = f" (and {len(rows) - 1} more bad lines)" if len(rows) > 1 else ""
        super().__init__(f"line {line}", problem + more)
        self.rows = tuple(rows)
