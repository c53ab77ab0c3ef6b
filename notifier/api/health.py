"""``/health``'s checks: short-lived connections of their own, bounded in time, and one check
a second however many callers ask.

The checks never borrow the connections the API publishes with: a ping that held one pooled
broker connection while it waited for another deadlocked the pool of ten under forty concurrent
calls, and every route that publishes with it (issue 12, item 5).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import redis
from kombu.connection import Connection
from kombu.pidbox import Mailbox
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.pool import NullPool
from starlette.concurrency import run_in_threadpool

from config import Settings

__all__ = ["HealthCheck"]

log = logging.getLogger(__name__)

# Seconds each check may take to connect and to answer.
CHECK_TIMEOUT = 2.0
# Seconds a worker ping waits for replies: reported, not required.
PING_TIMEOUT = 0.3
# Seconds an answer is served again to later callers without a new check.
FRESH_SECONDS = 1.0
# Seconds an older answer is still served while the next check runs, so that a caller never
# waits for a check that a busy process makes slow; past this, callers wait for the check.
STALE_SECONDS = 10.0

Answer = tuple[dict[str, str | int], bool]


class HealthCheck:
    """Checks the database, Redis and the broker; ``answer()`` shares one check between all
    the callers of a second and runs it off the event loop."""

    def __init__(self, settings: Settings, *, fresh_seconds: float = FRESH_SECONDS) -> None:
        self.settings = settings
        self.fresh_seconds = fresh_seconds
        self._engine: Engine | None = None
        self._answer: Answer | None = None
        self._answered_at = float("-inf")
        self._pending: asyncio.Future[Answer] | None = None

    async def answer(self) -> Answer:
        """({component: "ok" | "down", "workers": n}, healthy): the answer of a check that ended
        at most a second before, or, while the next check runs, of the last one (up to
        STALE_SECONDS); with none as recent, the next check's."""
        age = time.monotonic() - self._answered_at
        if age < self.fresh_seconds and self._answer:
            return self._answer
        loop = asyncio.get_running_loop()
        if self._pending is None or self._pending.get_loop() is not loop:
            self._pending = asyncio.ensure_future(run_in_threadpool(self.check))
            self._pending.add_done_callback(self._keep)
        if age < STALE_SECONDS and self._answer:
            return self._answer
        # Shielded: a caller that leaves does not cancel the check the others wait for.
        return await asyncio.shield(self._pending)

    def _keep(self, done: asyncio.Future[Answer]) -> None:
        if self._pending is done:
            self._pending = None
        if not done.cancelled() and done.exception() is None:
            self._answer, self._answered_at = done.result(), time.monotonic()

    def check(self) -> Answer:
        """Every check now, each on a fresh connection with a timeout (blocking)."""
        checks: dict[str, str | int] = {
            "database": _probe("database", self._select_one),
            "redis": _probe("redis", self._ping_redis),
        }
        workers: list[int] = []
        checks["broker"] = _probe("broker", lambda: workers.append(self._ping_broker()))
        healthy = all(v == "ok" for v in checks.values())
        checks["workers"] = workers[0] if workers else 0
        return checks, healthy

    def _select_one(self) -> None:
        if self._engine is None:
            self._engine = _engine(self.settings.database_url)
        with self._engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    def _ping_redis(self) -> None:
        client = redis.Redis.from_url(self.settings.redis_url, socket_timeout=CHECK_TIMEOUT,
                                      socket_connect_timeout=CHECK_TIMEOUT,
                                      single_connection_client=True)
        try:
            client.ping()
        finally:
            client.close()

    def _ping_broker(self) -> int:
        """Connect to the broker and count the Celery workers that answer a ping."""
        with Connection(self.settings.broker_url, connect_timeout=CHECK_TIMEOUT,  # type: ignore[no-untyped-call]
                        transport_options={"socket_timeout": CHECK_TIMEOUT,
                                           "socket_connect_timeout": CHECK_TIMEOUT,
                                           "max_retries": 0,
                                           # Redis: closing waits for the pending BRPOP
                                           # (1 s by default), which this bounds.
                                           "polling_interval": PING_TIMEOUT}) as connection:
            connection.ensure_connection(max_retries=1, timeout=CHECK_TIMEOUT)
            # Celery's control mailbox, without its producer pool: this connection only.
            mailbox = Mailbox("celery", type="fanout", accept=["json"],  # type: ignore[no-untyped-call]
                              serializer="json", producer_pool=None)(connection)
            replies = mailbox._broadcast("ping", reply=True, timeout=PING_TIMEOUT) or []
            return len(replies)


def _engine(url: str) -> Engine:
    # No pool: each check opens and closes its own connection, so it never waits for (nor
    # holds) one of the API's.
    if url.startswith("sqlite"):
        return create_engine(url, poolclass=NullPool, connect_args={"timeout": CHECK_TIMEOUT})
    connect_args: dict[str, Any] = {}
    if url.startswith("postgresql"):
        connect_args = {"connect_timeout": max(1, round(CHECK_TIMEOUT)),
                        "options": f"-c statement_timeout={round(CHECK_TIMEOUT * 1000)}"}
    return create_engine(url, poolclass=NullPool, connect_args=connect_args)


def _probe(component: str, check: Callable[[], object]) -> str:
    try:
        check()
    except Exception as exc:  # a health check reports every failure, whatever its kind
        # The answer says only "down": exception text can carry hosts, users and paths.
        log.warning("health: %s is down (%s)", component, type(exc).__name__)
        return "down"
    return "ok"
