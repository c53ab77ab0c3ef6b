"""notifier: event notifications for loyalty platforms, delivered as signed webhooks.

``notifier.publish`` and ``notifier.publish_many`` are the producer's calls (``notifier.client``),
loaded on first use,
so that importing any part of notifier (``notifier.signing`` in a receiver, say) loads neither
Celery nor a broker client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from notifier.client import publish, publish_many

__all__ = ["publish", "publish_many"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in __all__:
        from notifier import client

        return getattr(client, name)
    raise AttributeError(f"module 'notifier' has no attribute {name!r}")
