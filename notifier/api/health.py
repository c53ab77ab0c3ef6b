"""``/health``'s checks: short-lived connections of their own, bounded in time, and one check
a second however many callers ask.

The checks never borrow the connections the API publishes with: a ping that held one pooled
broker connection while it waited for another deadlocked the pool of ten under forty concurrent
calls, and every route that publishes with it (issue 12, item 5).

The broker's check is a survey (``notifier.consumers``): the workers that answer, the queues
they consume, and every notifier queue with messages waiting and none consuming it, which makes
the answer ``degraded`` (still 200: the API serves; its deliveries do not). ``/metrics`` reads
the last survey, or makes one, at most every SURVEY_SECONDS.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.pool import NullPool
from starlette.concurrency import run_in_threadpool

from config import Settings
from notifier import consumers

__all__ = ["HealthCheck"]

log = logging.getLogger(__name__)

# Seconds each check may take to connect and to answer.
CHECK_TIMEOUT = 2.0
# Seconds the broker survey waits for the workers' replies (which queues each consumes).
PING_TIMEOUT = 0.3
# Seconds an answer is served again to later callers without a new check.
FRESH_SECONDS = 1.0
# Seconds an older answer is still served while the next check runs, so that a caller never
# waits for a check that a busy process makes slow; past this, callers wait for the check.
STALE_SECONDS = 10.0

# Seconds a survey of the broker's queues is served again to ``/metrics`` scrapes.
SURVEY_SECONDS = 5.0

Checks = dict[str, str | int | dict[str, int]]
Answer = tuple[Checks, bool]


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
        self._surveyed: tuple[float, consumers.Survey | None] = (float("-inf"), None)
        self._surveying = threading.Lock()  # one survey at a time for the scrapes

    async def answer(self) -> Answer:
        """({component: "ok" | "down", "workers": n, "unconsumed": {queue: length}, "status":
        "ok" | "degraded" | "down"}, healthy): the answer of a check that ended
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
        checks: Checks = {
            "database": _probe("database", self._select_one),
            "redis": _probe("redis", self._ping_redis),
        }
        surveys: list[consumers.Survey] = []
        checks["broker"] = _probe("broker", lambda: surveys.append(self._survey_broker()))
        healthy = all(v == "ok" for v in checks.values())
        checks["workers"] = len(surveys[0].workers) if surveys else 0
        unconsumed = surveys[0].unconsumed if surveys else {}
        checks["unconsumed"] = unconsumed
        checks["status"] = "down" if not healthy else "degraded" if unconsumed else "ok"
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

    def _survey_broker(self) -> consumers.Survey:
        """Connect to the broker, ask which queues the Celery workers that answer within a
        moment consume, and how many messages wait in each notifier queue."""
        with consumers.connect(self.settings.broker_url, CHECK_TIMEOUT) as connection:
            connection.ensure_connection(max_retries=1, timeout=CHECK_TIMEOUT)
            found = consumers.survey(connection, PING_TIMEOUT)
        self._surveyed = (time.monotonic(), found)  # one assignment: read whole by any thread
        return found

    def unconsumed(self) -> dict[str, int] | None:
        """Each notifier queue with messages waiting and no worker consuming it, by its length,
        from a survey at most SURVEY_SECONDS old (``/health``'s own, or one made now and shared
        by the callers waiting for it); None when the broker does not answer (blocking)."""
        with self._surveying:
            surveyed_at, found = self._surveyed
            if found is None or time.monotonic() - surveyed_at >= SURVEY_SECONDS:
                try:
                    found = self._survey_broker()
                except Exception as exc:  # the broker is down: /health names it
                    log.warning("metrics: the broker is down (%s)", type(exc).__name__)
                    return None
            return found.unconsumed


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
