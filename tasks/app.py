"""The Celery app, configured lazily from notifier's settings (see ``tasks.celeryconfig``)."""

import logging
import threading
from typing import Any

from celery import Celery, bootsteps, signals
from celery.concurrency.base import BasePool
from celery.worker.control import inspect_command
from kombu.transport import redis as kombu_redis

from config import load_settings
from notifier import consumers
from notifier.client import DELIVER_QUEUE, SLOW_QUEUE
from notifier.logformat import use_json

__all__ = ["SlowLaneCover", "app"]

log = logging.getLogger(__name__)


class _OneRedisClient(kombu_redis.Channel):
    """kombu's Redis channel, with one client for the commands it sends outside its event loop.

    kombu makes a new ``redis.Redis`` for each of them: each message a worker publishes (a
    delivery task, its task events), and each message's unacknowledged bookkeeping and its
    acknowledgement. redis-py builds each new client's table of response callbacks anew
    (redis/redis-py#3624): about 80 us of CPU, beside 130 us for the command itself. A client
    holds nothing of its own but its connection pool, which is thread-safe (the slow lane's
    threads share it) and starts afresh in a forked process, so one serves them all; it is made
    again with the channel's pool."""

    _shared: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        create = super()._create_client
        if asynchronous:
            return create(asynchronous=True)  # type: ignore[no-untyped-call]
        client = self._shared
        if client is None or client.connection_pool is not self.pool:
            client = self._shared = create()  # type: ignore[no-untyped-call]
        return client


# This module is the workers' app (and beat's, and the celery commands'): their Redis channels
# are made so, whatever URL they connect to. Not through Celery's ``broker_transport``, which
# would name the class in the broker's URL, where Flower reads which broker it is. A producer
# importing ``notifier`` keeps kombu's own.
kombu_redis.Transport.Channel = _OneRedisClient

app = Celery("notifier")
# A module name, not the module: settings are read when the app is first configured, not on import.
app.config_from_object("tasks.celeryconfig")


@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def _log_as_configured(logger: logging.Logger, **_: Any) -> None:
    """NOTIFIER_LOG_FORMAT=json: the worker's and beat's lines (Celery's own and notifier's,
    one per delivery attempt among them) as JSON objects, one a line."""
    if load_settings().log_format == "json":
        use_json([logger])


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


# Seconds between a fast-lane worker's looks at who consumes the slow lane, and the most each
# look waits for the workers' answers.
LANE_CHECK_SECONDS = 5.0
LANE_SURVEY_TIMEOUT = 1.0


class SlowLaneCover(bootsteps.StartStopStep):
    """A worker of the fast lane also takes the slow lane while no other worker consumes it, nor
    was told to.

    A webhook never measured is presumed slow, and a webhook past its first
    NOTIFIER_FAST_LANE_LEASES leases goes by the slow lane however fast it is: a deployment
    without the ``slow`` process (the Procfile's ``web``, ``worker`` and ``beat`` alone) sent
    them to a queue nothing consumed, and delivered nothing to a new webhook, without a word.
    Starting new webhooks on the fast lane would not do: a never-measured webhook could then take
    every prefork process, and the leases past the first would still go by the slow lane.

    So, every LANE_CHECK_SECONDS, a worker that consumes ``notifier.deliver`` but was not told
    to consume ``notifier.slow`` asks the workers which queues they consume and which they were
    told to (``consumers.lanes``); while none other does either for the slow lane it consumes it
    too (with a warning saying why), and once a slow lane's own worker answers (one told to
    consume ``notifier.slow`` and not ``notifier.deliver``) it leaves the lane to it, so that its
    prefork processes are kept from slow receivers again. A slow worker whose consumer an
    operator cancelled (Celery's ``cancel_consumer``: the lane paused, e.g. for maintenance of
    what its receivers reach) still answers as told to: the pause stands, and is not undone by
    the fast workers taking the lane behind the operator's back; once that worker is gone, the
    lane is covered again. The queue is added the way Celery's ``add_consumer`` remote-control
    command adds one (on the consumer's own loop), without the round trip through the broker. A
    look that fails (broker away) changes nothing.
    """

    requires = {"celery.worker.consumer.tasks:Tasks"}

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        # The queues the worker was started with (--queues), before any remote control (an
        # operator's cancel_consumer deselects a queue; the cover's own adds do not select).
        self.told = frozenset(parent.app.amqp.queues.consume_from)
        self.looks = 0  # looks done at who takes the slow lane: the watcher is alive
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()

    def start(self, parent: Any) -> None:
        # (Started again after each lost broker connection: one watcher is enough.)
        if self._thread is not None or DELIVER_QUEUE not in self.told or SLOW_QUEUE in self.told:
            return
        self._thread = threading.Thread(target=self._watch, args=(parent,), daemon=True,
                                        name="slow-lane-cover")
        self._thread.start()

    def shutdown(self, parent: Any) -> None:
        self._stopped.set()

    def _watch(self, consumer: Any) -> None:
        broker_url = consumer.app.conf.broker_url
        while not self._stopped.wait(LANE_CHECK_SECONDS):
            try:
                with consumers.connect(broker_url, LANE_SURVEY_TIMEOUT) as connection:
                    found = consumers.lanes(connection, LANE_SURVEY_TIMEOUT)
            except Exception as exc:  # the broker away: look again later, change nothing
                log.warning("could not ask which workers consume %s: %s", SLOW_QUEUE,
                            type(exc).__name__)
                continue
            # Read from the consumer each time: one rebuilt after a lost broker connection
            # consumes the queues it was told to again, without the slow lane.
            task_consumer = consumer.task_consumer
            if task_consumer is None:
                continue
            taking = task_consumer.consuming_from(SLOW_QUEUE)
            if taking and found.slow_lane_worker(other_than=consumer.hostname):
                log.info("a worker of %s answers: leaving the slow lane to it", SLOW_QUEUE)
                consumer.call_soon(consumer.cancel_task_queue, SLOW_QUEUE)
            elif not taking and not found.slow_lane_kept(other_than=consumer.hostname):
                log.warning("no worker consumes %s (the slow lane: webhooks not measured yet, or "
                            "slow): this worker takes it too, and slow receivers may hold its "
                            "processes; start the Procfile's slow worker", SLOW_QUEUE)
                consumer.call_soon(consumer.add_task_queue, SLOW_QUEUE)
            self.looks += 1


app.steps["consumer"].add(SlowLaneCover)


@inspect_command(name=consumers.LANES_COMMAND)
def _lanes(state: Any) -> dict[str, Any]:
    """The queues this worker consumes, those it was started to consume, and the slow lane
    cover's looks so far (``consumers.lanes``)."""
    consumer = state.consumer
    cover = next(step for step in consumer.steps if isinstance(step, SlowLaneCover))
    task_consumer = consumer.task_consumer
    consuming = [queue.name for queue in task_consumer.queues] if task_consumer else []
    return {"consuming": sorted(consuming), "told": sorted(cover.told),
            "slow_lane_looks": cover.looks}
