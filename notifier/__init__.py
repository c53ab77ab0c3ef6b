"""notifier: event notifications for loyalty platforms, delivered as signed webhooks."""

from notifier.client import publish

__all__ = ["publish"]
__version__ = "0.1.0"
