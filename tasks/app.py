"""The Celery app, configured lazily from notifier's settings (see ``tasks.celeryconfig``)."""

from typing import Any

from celery import Celery, signals
from celery.concurrency.base import BasePool

__all__ = ["app"]

app = Celery("notifier")
# A module name, not the module: settings are read when the app is first configured, not on import.
app.config_from_object("tasks.celeryconfig")


@signals.worker_ready.connect
def _let_a_pool_that_cannot_stop_a_task_finish_it(sender: Any, **_: Any) -> None:
    """A pool that cannot stop one task (the slow lane's threads) lets its running tasks finish
    when the broker connection is lost: Celery cancelling them raised NotImplementedError and
    stopped the whole worker, the slow lane dying with every Redis restart. Their
    acknowledgement may be lost; a message that comes back finds its deliveries claimed or
    finished in the database, and sends none twice at once."""
    # Known only once the pool has started: prefork sets its terminate_job then.
    if getattr(sender.pool.terminate_job, "__func__", None) is BasePool.terminate_job:
        sender.app.conf.worker_cancel_long_running_tasks_on_connection_loss = False
