"""notifier: event notifications for loyalty platforms, delivered as signed webhooks."""

from notifier.client import publish, publish_many

__all__ = ["publish", "publish_many"]
__version__ = "0.1.0"
