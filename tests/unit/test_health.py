"""``/health`` shares one check between all its callers of a second (issue 12, item 5): a burst
of calls costs one round of connections, not one each, and a caller never waits behind a
check while a recent answer exists."""

from __future__ import annotations

import asyncio
import threading
import time

from config import load_settings
from notifier.api.health import Answer, HealthCheck


class CountedCheck(HealthCheck):
    """A HealthCheck whose check connects nowhere: it counts, and takes ``seconds``."""

    def __init__(self, seconds: float, fresh_seconds: float) -> None:
        super().__init__(load_settings({}), fresh_seconds=fresh_seconds)
        self.seconds = seconds
        self.calls = 0
        self.threads: set[int] = set()

    def check(self) -> Answer:
        self.calls += 1
        self.threads.add(threading.get_ident())
        time.sleep(self.seconds)
        return {"status": "ok", "calls": self.calls}, True


def test_sixty_concurrent_callers_share_one_check_off_the_event_loop() -> None:
    health = CountedCheck(0.2, fresh_seconds=1.0)

    async def burst() -> list[Answer]:
        return await asyncio.gather(*(health.answer() for _ in range(60)))

    answers = asyncio.run(burst())

    assert health.calls == 1
    assert answers == [({"status": "ok", "calls": 1}, True)] * 60
    assert threading.get_ident() not in health.threads  # run in the thread pool


def test_an_answer_is_served_for_a_second_then_checked_again_while_callers_keep_it() -> None:
    health = CountedCheck(1.0, fresh_seconds=1.0)

    async def calls() -> tuple[Answer, Answer, Answer, float, Answer]:
        first = await health.answer()
        again = await health.answer()  # fresh: no new check
        await asyncio.sleep(1.2)
        started = time.monotonic()
        stale = await health.answer()  # past fresh: a new check starts, the last answer served
        waited = time.monotonic() - started
        # The new check ends: its answer is kept by the callback its future was given first,
        # which runs before any await of that future resumes.
        refresh = health._pending
        assert refresh is not None
        await asyncio.wait_for(asyncio.shield(refresh), 30)
        return first, again, stale, waited, await health.answer()

    first, again, stale, waited, later = asyncio.run(calls())

    assert first == again == stale == ({"status": "ok", "calls": 1}, True)
    # Not behind the 1 s check: the stale answer is served without an await, so on a busy
    # machine too it takes far less than a caller waiting for the check would.
    assert waited < 0.5
    assert later == ({"status": "ok", "calls": 2}, True)
    assert health.calls == 2
