"""Who consumes notifier's broker queues, and what waits in each: one survey on a connection of
the caller's own, bounded in time.

A queue that nothing consumes swallows its messages without a word: the slow lane without its
``slow`` worker did (issue 14). ``/health`` and ``/metrics`` report such a queue by name and
length, and a worker of the fast lane takes the slow lane over while no slow worker answers
(``tasks.app``).

Consumers are found by asking the workers (Celery's ``active_queues`` remote-control command,
broadcast on the ``celery`` mailbox, replies waited for ``timeout`` seconds): the Redis transport
keeps no consumer count, and the queues' bindings stay after their workers have gone. A worker
too busy to answer in time counts as absent; a report of an unconsumed queue therefore needs
messages waiting in it too. Lengths are the broker's own (a passive declare: the list's length
on Redis, the queue's message count on RabbitMQ).

``lanes`` asks notifier's own workers (the ``LANES_COMMAND`` command, which ``tasks.app``
registers) which queues each was started to consume as well: a worker told to consume a queue
and not consuming it now was paused by an operator (Celery's ``cancel_consumer``), and the
fast lane's cover leaves a paused slow lane alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kombu.connection import Connection
from kombu.pidbox import Mailbox

from notifier.routes import DELIVER_QUEUE, QUEUES, SLOW_QUEUE

__all__ = ["LANES_COMMAND", "QUEUES", "Survey", "connect", "lanes", "survey"]

# The remote-control command of notifier's workers that says, besides the queues a worker
# consumes, those it was started to consume (``tasks.app`` registers it under this name).
LANES_COMMAND = "notifier_lanes"


@dataclass(frozen=True)
class Survey:
    """The workers that answered, each with the queues it consumes, and the queues' lengths;
    from ``lanes``, also the queues each was started to consume (``told``)."""

    workers: Mapping[str, frozenset[str]]
    lengths: Mapping[str, int] = field(default_factory=dict)
    told: Mapping[str, frozenset[str]] = field(default_factory=dict)

    @property
    def unconsumed(self) -> dict[str, int]:
        """Each notifier queue with messages waiting and no worker consuming it: its length."""
        consumed = set().union(*self.workers.values())
        return {name: count for name, count in self.lengths.items()
                if count and name not in consumed}

    def slow_lane_worker(self, other_than: str) -> bool:
        """Whether a worker other than ``other_than`` was started as a slow lane's own: told
        to consume the slow lane and not the fast one, so that the prefork pools are kept from
        slow receivers; whether it consumes it now or was paused."""
        return any(SLOW_QUEUE in queues and DELIVER_QUEUE not in queues
                   for name, queues in self.told.items() if name != other_than)

    def slow_lane_kept(self, other_than: str) -> bool:
        """Whether a worker other than ``other_than`` consumes the slow lane, or was told to and
        is paused (an operator's ``cancel_consumer``, which stands while that worker lives)."""
        return any(SLOW_QUEUE in self.workers.get(name, frozenset())
                   or SLOW_QUEUE in self.told.get(name, frozenset())
                   for name in {*self.workers, *self.told} if name != other_than)


def connect(broker_url: str, timeout: float) -> Connection:
    """A connection of its own to the broker (never one of a pool that publishes: a survey
    that held a pooled connection while it waited for another deadlocked the pool), each
    socket operation bounded by ``timeout``."""
    return Connection(broker_url, connect_timeout=timeout,  # type: ignore[no-untyped-call]
                      transport_options={"socket_timeout": timeout,
                                         "socket_connect_timeout": timeout,
                                         "max_retries": 0,
                                         # Redis: closing waits for the pending BRPOP (1 s by
                                         # default), which this bounds.
                                         "polling_interval": min(timeout, 0.3)})


def survey(connection: Connection, timeout: float, *, lengths: bool = True) -> Survey:
    """Ask the workers which queues they consume (replies waited for ``timeout`` seconds) and,
    with ``lengths``, the broker how many messages wait in each notifier queue."""
    workers: dict[str, frozenset[str]] = {}
    for reply in _mailbox(connection)._broadcast("active_queues", reply=True, timeout=timeout) or []:
        for hostname, queues in reply.items():
            workers[hostname] = frozenset(q["name"] for q in queues
                                          if isinstance(q, Mapping) and "name" in q)
    return Survey(workers, _lengths(connection) if lengths else {})


def lanes(connection: Connection, timeout: float) -> Survey:
    """Ask notifier's workers which queues each consumes and was started to consume (replies
    waited for ``timeout`` seconds); no lengths. A worker that does not know the command (an
    older one) counts as absent."""
    workers: dict[str, frozenset[str]] = {}
    told: dict[str, frozenset[str]] = {}
    for reply in _mailbox(connection)._broadcast(LANES_COMMAND, reply=True, timeout=timeout) or []:
        for hostname, answer in reply.items():
            if isinstance(answer, Mapping) and {"consuming", "told"} <= answer.keys():
                workers[hostname] = frozenset(answer["consuming"])
                told[hostname] = frozenset(answer["told"])
    return Survey(workers, told=told)


def _mailbox(connection: Connection) -> Any:
    """Celery's control mailbox, without its producer pool: this connection only."""
    return Mailbox("celery", type="fanout", accept=["json"],  # type: ignore[no-untyped-call]
                   serializer="json", producer_pool=None)(connection)


def _lengths(connection: Connection) -> dict[str, int]:
    lengths = {}
    for name in QUEUES:
        channel = connection.channel()  # type: ignore[no-untyped-call]
        try:
            _, count, _ = channel.queue_declare(queue=name, passive=True)
        except connection.channel_errors:
            count = 0  # never declared: nothing was ever sent to it
        finally:
            # A passive declare of a missing queue has closed the channel on RabbitMQ already.
            with contextlib.suppress(*connection.channel_errors, *connection.connection_errors):
                channel.close()
        lengths[name] = int(count)
    return lengths
