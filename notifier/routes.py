"""The names notifier's processes agree on over the broker: its tasks and their queues.

Plain names, apart from Celery's code: the domain (metrics counting what waits in each queue)
reads them without loading Celery, which only the producer client (``notifier.client``) and the
processes' faces do.
"""

from __future__ import annotations

__all__ = ["DELIVER_QUEUE", "DELIVER_TASK", "INGEST_TASK", "QUEUE", "QUEUES", "REPLAY_TASK",
           "SLOW_QUEUE"]

INGEST_TASK = "notifier.ingest"
DELIVER_TASK = "notifier.deliver"
# Carries a replay on past the batches queued by the request that made it (the API, the UI).
REPLAY_TASK = "notifier.replay"
# Events to ingest, and beat's tasks.
QUEUE = "notifier"
# Delivery tasks have a queue of their own, which a worker takes turns with QUEUE: a burst of
# events waiting to be ingested never stands in front of the deliveries of earlier ones.
DELIVER_QUEUE = "notifier.deliver"
# Delivery tasks of webhooks that answer slowly, for a threads worker (the slow lane).
SLOW_QUEUE = "notifier.slow"
QUEUES = (QUEUE, DELIVER_QUEUE, SLOW_QUEUE)
