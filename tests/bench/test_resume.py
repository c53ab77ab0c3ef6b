"""How the benchmark times a drain (bench/run.py ``Processes.resume_timed``): from the first
message a real worker takes off the resumed queue, never before the resume."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import redis

from bench import run
from bench.receiver import Receiver
from tests.conftest import BROKER_DB, wait_until

QUEUE = run.FLOOR_B_QUEUE


@pytest.fixture
def broker(redis_base: tuple[str, str]) -> str:
    if not redis_base[0].startswith("redis://"):
        pytest.skip("the benchmark runs on a Redis server over TCP")
    url = f"{redis_base[0]}/{BROKER_DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    return url


def test_a_drain_is_timed_from_the_first_message_its_worker_takes(tmp_path: Path,
                                                                  broker: str) -> None:
    from celery import Celery

    app = Celery("bench-test", broker=broker, set_as_current=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFIER_", "BENCH_"))}
    client = redis.Redis.from_url(broker)
    with Receiver(1) as receiver:
        env.update(BENCH_BROKER_URL=broker, BENCH_TARGET_URL=receiver.url("/floor-b"))
        procs = run.Processes(tmp_path, env)
        try:
            # A worker of two queues, as notifier's fast worker is: while the one is paused, a
            # BRPOP over the other is in flight when the first is resumed.
            procs.worker("bench.floor_b", "floor-b", 1, queues=f"{QUEUE},bench-idle")
            procs.pause(broker, "floor-b", QUEUE)
            with app.producer_or_acquire() as producer:
                for _ in range(20):
                    app.send_task("bench.post", args=[{}], producer=producer, queue=QUEUE)
            assert client.llen(QUEUE) == 20 and receiver.count == 0
            before = time.perf_counter()
            t0, wake = procs.resume_timed(broker, "floor-b", QUEUE)
            returned = time.perf_counter()
            # Timed from a take that happened: the queue is shorter, and the start lies between
            # the resume and the return (the wait before the take is reported, not timed).
            assert client.llen(QUEUE) < 20
            assert before <= t0 <= returned and wake >= 0
            wait_until(lambda: receiver.count == 20, 30, "the 20 POSTs")
        finally:
            procs.stop()
            client.close()


def test_the_clock_starts_when_the_queue_first_falls_not_at_the_resume_nor_when_it_grows(
        broker: str) -> None:
    client = redis.Redis.from_url(broker)
    client.lpush("timed", "a", "b", "c")
    took: list[float] = []

    def worker() -> None:
        """What a late worker does: a message joins the queue (beat's), then one is taken."""
        time.sleep(0.1)
        client.lpush("timed", "beat")
        time.sleep(0.1)
        took.append(time.perf_counter())
        client.rpop("timed")

    taker = threading.Thread(target=worker)
    try:
        t0, wake = run.first_take(broker, "timed", taker.start)
        taker.join()
    finally:
        client.close()
    # Not from the resume (a wait of 0.2 s before the take, untimed), nor from the growth.
    assert t0 >= took[0] and wake >= 0.2
