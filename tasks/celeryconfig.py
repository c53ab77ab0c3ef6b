"""Celery settings derived from notifier's own; read when the app is first configured."""

from datetime import timedelta

from kombu.entity import Exchange, Queue

from config import load_settings
from notifier.client import DELIVER_QUEUE, DELIVER_TASK, QUEUE, SLOW_QUEUE

_settings = load_settings()

broker_url = _settings.broker_url
broker_connection_retry_on_startup = True
# Redis hands an unacknowledged task to another worker after this; it must outlast the longest
# task (checked in config), and it is set in all three places Celery reads it from.
broker_transport_options = {
    "visibility_timeout": _settings.visibility_timeout,
    # The slow lane's threads acknowledge from many threads at once; kombu's default pool of 10
    # connections runs dry under load and acknowledgements fail (tasks then run twice).
    "max_connections": 100,
    # A killed worker's unacknowledged tasks (an event it had taken but not ingested, above
    # all) come back once the visibility timeout has passed, at the next sweep for them: every
    # 5 s, rather than kombu's default of every 100 s.
    "unacked_restore_interval": 5,
    "unacked_restore_throttle": 1,
}
result_backend_transport_options = {"visibility_timeout": _settings.visibility_timeout}
visibility_timeout = _settings.visibility_timeout

task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
# Flower shows tasks only from the workers' task events: sent by every worker (the Procfile's,
# ``notifier up``'s, any other) without the -E switch a new operator would not know to add. They
# show a task by name and ``argsrepr``: ids only (``client.ingest_reprs``; a delivery task's
# arguments are ids). Not ``task_send_sent_event``: one more message for every task sent, for
# the little a "sent" state adds (``/health`` names a queue that nothing consumes). They cost a
# busy worker about 9% of its rate: NOTIFIER_TASK_EVENTS=off where nothing watches them.
worker_send_task_events = _settings.task_events
# Delivery state lives in our tables; Celery results would only cost writes.
task_ignore_result = True
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
# Except in a pool that cannot stop a task (threads): see tasks.app.
worker_cancel_long_running_tasks_on_connection_loss = True
# A delivery task is stopped (soft limit: its leases carry on in a retry) and then killed (hard
# limit) before its slot lease can expire: config checks lease > hard > soft > longest task, so
# no second request of a delivery starts while the first may still be open. (Enforced by the
# prefork pool; the slow lane's threads pool cannot stop a thread, there the request's own
# deadline bounds it.)
task_annotations = {DELIVER_TASK: {"soft_time_limit": _settings.task_soft_time_limit,
                                   "time_limit": _settings.task_time_limit}}
task_default_queue = QUEUE
# Each queue with an exchange of its own: sharing the default one would copy every message into
# all of them. A worker started without --queues takes all three.
task_queues = [Queue(name, Exchange(name), routing_key=name)  # type: ignore[no-untyped-call]
               for name in (QUEUE, DELIVER_QUEUE, SLOW_QUEUE)]

beat_schedule = {
    "sweep": {
        "task": "notifier.sweep",
        "schedule": timedelta(seconds=_settings.sweep_interval),
        "options": {"expires": _settings.sweep_interval * 5},
    },
    "check-sla": {
        "task": "notifier.check_sla",
        "schedule": timedelta(seconds=_settings.sla_check_interval),
        "options": {"expires": _settings.sla_check_interval},
    },
    "purge": {
        "task": "notifier.purge",
        "schedule": timedelta(seconds=_settings.retention_interval),
        # It shares the ingest queue: a run that waits behind a backlog of events still runs
        # within five intervals (each run is bounded), rather than every run being dropped.
        "options": {"expires": _settings.retention_interval * 5},
    },
}
