"""The Celery side of notifier: ``celery -A tasks worker`` / ``celery -A tasks beat``.

Tasks are thin: ids and plain dicts in, one ``notifier.pipeline`` call, transient errors retried.
"""

from tasks import delivery, retention  # noqa: F401 - registers the tasks on the app
from tasks.app import app

__all__ = ["app"]
