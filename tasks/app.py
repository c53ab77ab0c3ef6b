"""The Celery app, configured lazily from notifier's settings (see ``tasks.celeryconfig``)."""

from celery import Celery

__all__ = ["app"]

app = Celery("notifier")
# A module name, not the module: settings are read when the app is first configured, not on import.
app.config_from_object("tasks.celeryconfig")
