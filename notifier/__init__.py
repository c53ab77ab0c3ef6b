"""notifier: event notifications for loyalty platforms, delivered as signed webhooks.

``notifier.publish`` is the producer's one call (``notifier.client``); it is loaded on first use,
so that importing any part of notifier (``notifier.signing`` in a receiver, say) loads neither
Celery nor a broker client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from notifier.client import publish

__all__ = ["publish"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "publish":
        from notifier.client import publish

        return publish
    raise AttributeError(f"module 'notifier' has no attribute {name!r}")
