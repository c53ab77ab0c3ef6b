"""A task that gathers the messages a worker receives and runs them together as one.

One Celery task per event cost the worker more than ingesting the event did (see the
performance issue's profile). ``Gathering`` is celery-batches' ``Batches`` with three changes
that notifier needs:

- **Acknowledged once settled.** ``Batches`` acknowledges a late-acknowledged batch even when
  its run raised, which would lose the events. Here a batch's messages are acknowledged when
  its run returns; when the run raises, or the pool loses the process running it, they go back
  to the queue.
- **Prefetch credit.** A gathered message holds one of the worker's prefetch credits until it is
  acknowledged. With ``worker_prefetch_multiplier = 1`` a worker has one credit per process, so
  two gathered events would stop it from fetching anything else, deliveries included. Each
  gathered message lends the worker a credit, as Celery does for a task waiting for its ETA,
  paid back when its batch is done. At most two batches' worth are lent: past that, gathered
  messages hold the worker's own credits, and a flood of events slows the worker's fetching
  instead of filling its memory.
- **Batches as large as the load.** A message that arrives while no batch of this task is in
  the pool goes at once, alone. While one is, what arrives gathers into the next, which goes
  when that one is done (or when it is full): an event alone waits for nothing, and under load
  batches grow with the load, as a database's group commit does.

Each message still shows in Flower as a task of its own (received, started, succeeded).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection
from typing import Any

from billiard.einfo import ExceptionInfo
from celery import Celery
from celery.worker.request import Request
from celery_batches import Batches, SimpleRequest
from celery_batches.trace import apply_batches_task

__all__ = ["Gathering", "SimpleRequest"]


class Gathering(Batches):
    """Runs ``run(requests)`` on up to ``flush_every`` gathered messages; see the module's
    docstring. ``run`` returns something other than None once every message is settled."""

    abstract = True

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._lent = 0  # prefetch credits lent to the worker and not yet paid back
        self._running = 0  # batches handed to the pool and not yet settled
        self._qos: Any = None

    def configure(self, consumer: Any) -> None:
        """Set ``flush_every`` and ``flush_interval`` as the worker starts; by default nothing."""

    def shown(self, request: Request) -> tuple[str, str]:
        """What the task events (Flower) show of a message's arguments: by default the
        ``argsrepr`` and ``kwargsrepr`` its producer put in its headers."""
        return request.argsrepr, request.kwargsrepr

    def Strategy(self, task: Batches, app: Celery, consumer: Any) -> Callable[..., None]:
        self.configure(consumer)
        handle = super().Strategy(task, app, consumer)

        def on_message(*args: Any, **kwargs: Any) -> None:
            self._qos = consumer.qos  # (the consumer makes its QoS after the strategies)
            with self._lock:
                lend = self._lent < 2 * self.flush_every
                self._lent += lend
            if lend:
                self._qos.increment_eventually()
            handle(*args, **kwargs)
            self._do_flush()

        return on_message

    def _do_flush(self) -> None:
        with self._lock:
            wait = self._running and self._buffer.qsize() < self.flush_every
        if not wait:
            super()._do_flush()

    def flush(self, requests: Collection[Request]) -> Any:
        held = list(requests)
        simple = [SimpleRequest.from_request(request) for request in held]
        started = time.monotonic()
        for request in held:
            # What the default strategy tells Flower (when events are on), one task each.
            args, kwargs = self.shown(request)
            request.send_event("task-received", name=request.name, args=args,
                               kwargs=kwargs, root_id=request.root_id,
                               parent_id=request.parent_id,
                               retries=request.request_dict.get("retries", 0))
            request.send_event("task-started")

        def settle(acknowledge: bool) -> None:
            runtime = time.monotonic() - started
            for request in held:
                if acknowledge:
                    request.acknowledge()
                    request.send_event("task-succeeded", result=None, runtime=runtime)
                else:
                    request.reject(requeue=True)  # (sends task-rejected)
            with self._lock:
                self._running -= 1
                repay = min(self._lent, len(held))
                self._lent -= repay
            for _ in range(repay):
                self._qos.decrement_eventually()
            self._do_flush()  # what gathered while this batch ran

        def on_return(result: Any) -> None:
            # apply_batches_task returns None when the run raised (it logs the error); a
            # threads pool passes an ExceptionInfo when the thread was lost.
            settle(acknowledge=result is not None and not isinstance(result, ExceptionInfo))

        def on_error(*_: Any) -> None:
            settle(acknowledge=False)

        with self._lock:
            self._running += 1
        return self._pool.apply_async(apply_batches_task, (self, (simple,), 0, None),
                                      callback=on_return, error_callback=on_error)
