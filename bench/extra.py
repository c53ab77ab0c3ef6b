"""Issue 5's further scenarios: latency at a fixed offered load, POST /v3/events, isolation, many
webhooks, a backlog drained.

Latency: every published event carries ``data.benchSentAtUs`` (epoch microseconds, set just before
it is published or POSTed); the receiver computes arrival - sent per request (see receiver.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import redis
import requests
import sqlalchemy as sa

from bench import run
from bench.receiver import Receiver

HTTP_BATCH = 20  # events per POST /v3/events
HTTP_CLIENTS = 4  # client threads POSTing
WARM_UP_SECONDS = 5.0  # of offered load before the isolation scenario's measured runs


def percentiles(values: list[float]) -> str:
    if not values:
        return "no latencies recorded"
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return (f"p50 {at(0.50):.1f} ms, p95 {at(0.95):.1f} ms, p99 {at(0.99):.1f} ms, "
            f"max {ordered[-1]:.1f} ms (n={len(ordered)})")


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else float("nan")


def bench_data() -> dict[str, object]:
    return {**run.event_data(), "benchSentAtUs": time.time_ns() // 1000}


@contextlib.contextmanager
def stack(folder: Path, concurrency: int, hooks: list[tuple[int, str, int]],
          web: bool = False) -> Iterator[tuple[run.Processes, str, str]]:
    """Fresh tables; webhooks ``(org, url, maxAllowedConnections)``; worker, beat and maybe the API.

    Yields the processes, the API's base URL ("" without ``web``) and an API key of the first org.
    """
    from config import load_settings
    from notifier import store, tenants
    from notifier.db import Database
    from notifier.models import Base
    from notifier.schemas import load_catalog
    from notifier.vault import vault_for

    run._truncate(", ".join(t.name for t in Base.metadata.sorted_tables))
    run._flush(run.NOTIFIER_BROKER, run.NOTIFIER_REDIS)
    env = run.notifier_env(folder)
    settings = load_settings({k: v for k, v in env.items() if k.startswith("NOTIFIER_")})
    db = Database(run.PG_URL)
    try:
        for org in dict.fromkeys(h[0] for h in hooks):
            store.create_org(db, org, f"bench-{org}", now_ms=0)
        catalog, vault = load_catalog(), vault_for(settings.secret_keys, settings.data_dir)
        for i, (org, url, connections) in enumerate(hooks):
            run.create_webhook(db, catalog, vault, org_id=org, name=f"hook-{i}", url=url,
                               event_names=[run.EVENT], max_allowed_connections=connections)
        key = tenants.create_key(db, hooks[0][0], now_ms=0)
    finally:
        db.dispose()
    procs = run.start_notifier(folder, env, concurrency)
    base = ""
    try:
        if web:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            with (folder / "web.log").open("wb") as log:
                procs.procs["web"] = subprocess.Popen(
                    [sys.executable, "-m", "uvicorn", "--factory", "notifier.api:create_app",
                     "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                    env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True, cwd=run.ROOT)
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while True:
                with contextlib.suppress(requests.ConnectionError):
                    if requests.get(f"{base}/v3/events/catalog", timeout=5,
                                    headers={"Authorization": f"Bearer {key}"}).ok:
                        break
                if procs.procs["web"].poll() is not None or time.monotonic() > deadline:
                    raise run.BenchError(f"the API did not start:\n{procs.log('web')[-3000:]}")
                time.sleep(0.1)
        yield procs, base, key
    finally:
        procs.stop()


def _stop_web(procs: run.Processes) -> None:
    web = procs.procs.get("web")
    if web is not None and web.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(web.pid, signal.SIGTERM)


def offered_load(receiver: Receiver, events_per_s: float, seconds: float, deliveries_per_event: int,
                 publish: Callable[[], None]) -> tuple[list[float], str]:
    """Publish at a fixed rate for ``seconds`` (one thread), wait for every delivery; latencies."""
    count = max(1, int(events_per_s * seconds))
    start_count, mark = receiver.count, receiver.mark()
    t0 = time.monotonic()
    late = 0.0
    for i in range(count):
        wait = t0 + i / events_per_s - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        else:
            late = max(late, -wait)
        publish()
    sent_in = time.monotonic() - t0
    target = start_count + count * deliveries_per_event
    if not receiver.wait_for(target, 60 + count * deliveries_per_event / 50):
        raise run.BenchError(f"offered load: receiver got {receiver.count - start_count} "
                             f"of {count * deliveries_per_event}")
    achieved = (count - 1) / sent_in if count > 1 else 0.0
    note = (f"{count} events at {events_per_s:.1f}/s offered ({achieved:.1f}/s achieved, "
            f"publisher at most {late * 1000:.0f} ms behind)")
    return receiver.latencies(mark), note


def latency(receiver: Receiver, procs: run.Processes, rate: float, seconds: float,
            windows: int = 1) -> str:
    """In a running fan-out-1 stack: offered load = ``rate`` deliveries/s for ``windows``
    windows of ``seconds``, back to back. The latencies of them all together, and each window's
    p99 (one stall weighs on one window's p99: their spread says how much to trust one);
    besides, how busy the machine's CPUs were meanwhile, how the events and deliveries were
    batched and what a delivery cost the workers (``Window``), and where the time went
    (``stages``)."""
    from notifier import publish

    pooled: list[float] = []
    each: list[float] = []
    notes: list[str] = []
    with Window(procs) as window:
        for _ in range(windows):
            lat, note = offered_load(receiver, rate, seconds, 1, lambda: publish(
                run.EVENT, bench_data(), org_id=run.ORG, broker_url=run.NOTIFIER_BROKER))
            pooled += lat
            each.append(p99(lat))
            notes.append(f"window {len(notes) + 1}: {note}" if windows > 1 else note)
    spread = (f"; each {seconds:.0f} s window's p99: {', '.join(f'{v:.1f}' for v in each)} ms"
              if windows > 1 else "")
    return (f"{percentiles(pooled)}{spread}; {'; '.join(notes)}; "
            f"{window.summary(len(pooled))}; {stages(window.since_ms)}")


class Window:
    """What the machine and the workers did over an offered load (``with Window(procs) as w``):
    how busy the CPUs were, how many events an ingest batch stored and deliveries a delivery
    task carried, and the workers' and PostgreSQL's CPU time a delivery (``run.CpuUse``). At a
    steady rate these batches are smaller than in a drain, and each costs the same: a delivery
    costs more CPU than in the drain that measured the capacity, so that half of it is not half
    of the machine."""

    def __init__(self, procs: run.Processes) -> None:
        self.procs = procs

    def __enter__(self) -> Window:
        self.since_ms, self._machine = time.time_ns() // 1_000_000, psutil.cpu_times()
        self._tasks_before = run.delivery_tasks(self.procs)
        self.cpu = run.CpuUse(run.worker_pids(self.procs))
        return self

    def __exit__(self, *_: object) -> None:
        self.cpu.stop()
        self.busy = busy_since(self._machine)
        self.tasks = run.delivery_tasks(self.procs) - self._tasks_before
        self.batches = run.ingest_batches(self.since_ms)

    def summary(self, deliveries: int) -> str:
        return (f"the machine's CPUs {self.busy:.0%} busy; "
                f"{deliveries / self.batches:.1f} events per ingest batch, "
                f"{deliveries / max(1, self.tasks):.1f} deliveries per delivery task, "
                f"{self.cpu.per(deliveries)}")


def busy_since(before: Any) -> float:
    """The share of the machine's CPU time spent busy (neither idle nor waiting for I/O) since
    ``before`` (``psutil.cpu_times()``)."""
    now = psutil.cpu_times()

    def idle(times: Any) -> float:
        return float(times.idle + getattr(times, "iowait", 0.0))

    spent = sum(now) - sum(before)
    return (spent - (idle(now) - idle(before))) / spent if spent > 0 else 0.0


def stages(since_ms: int) -> str:
    """Where the time of the deliveries of the events published since ``since_ms`` went, from
    the database: from publish to the ingest that stored the event (the broker, and the wait for
    a worker's earlier ingest), and from there to the first attempt's start (the store itself,
    the lease, the delivery task's hop and linger, the claim)."""
    engine = sa.create_engine(run.PG_URL)
    try:
        with engine.connect() as conn:
            rows = conn.exec_driver_sql(
                "SELECT e.received_at_ms - e.created_at_ms, a.started_at_ms - e.received_at_ms "
                "FROM events e JOIN deliveries d ON d.event_pk = e.pk "
                "JOIN attempts a ON a.delivery_id = d.id AND a.number = 1 "
                "WHERE e.created_at_ms >= %s", (since_ms,)).all()
    finally:
        engine.dispose()
    return (f"from the database, publish to stored: {percentiles([r[0] for r in rows])}; "
            f"stored to sent: {percentiles([r[1] for r in rows])}")


# ---------------------------------------------------------------- POST /v3/events


def http(receiver: Receiver, folder: Path, concurrency: int, deliveries: int,
         connections: int) -> run.Sample:
    """Fan-out 1 fed by POST /v3/events (lists of HTTP_BATCH events): first POST to last delivery."""
    hooks = [(run.ORG, receiver.url("/notifier-http/0"), connections)]
    with stack(folder, concurrency, hooks, web=True) as (procs, base, key):
        url = f"{base}/v3/events"
        events = deliveries - deliveries % (HTTP_BATCH * HTTP_CLIENTS)
        per_client = events // HTTP_BATCH // HTTP_CLIENTS
        errors: list[str] = []

        def client() -> None:
            session = requests.Session()
            session.trust_env = False
            session.headers["Authorization"] = f"Bearer {key}"
            for _ in range(per_client):
                batch = [{"eventName": run.EVENT, "data": bench_data()} for _ in range(HTTP_BATCH)]
                response = session.post(url, json=batch, timeout=60)
                if response.status_code != 202:
                    errors.append(f"{response.status_code} {response.text[:300]}")
                    return

        # warm-up: one batch
        requests.post(url, json=[{"eventName": run.EVENT, "data": run.event_data()}],
                      headers={"Authorization": f"Bearer {key}"}, timeout=60).raise_for_status()
        if not receiver.wait_for(receiver.count + 1, 30):
            raise run.BenchError("HTTP: the warm-up event was not delivered")
        start_count = receiver.count
        threads = [threading.Thread(target=client) for _ in range(HTTP_CLIENTS)]
        web_rss = run.RssSampler([procs.procs["web"].pid])
        with run.RssSampler(run.worker_pids(procs)) as rss, web_rss:
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            posted = time.perf_counter() - t0
            if errors:
                raise run.BenchError(f"POST /v3/events: {errors[0]}")
            run._wait(receiver, start_count + events, events, "notifier HTTP")
            seconds = time.perf_counter() - t0
        _stop_web(procs)
    return run.Sample(seconds, events, rss.peak, [
        f"(POSTs done in {posted:.2f}s = {events / posted:.0f} events/s; {HTTP_BATCH} events per POST, "
        f"{HTTP_CLIENTS} client threads, 1 uvicorn process of peak {web_rss.peak / 2**20:.0f} MiB; "
        f"not pre-filled: the clock runs from the first POST)"])


# ---------------------------------------------------------------- isolation


def isolation(receiver: Receiver, folder: Path, concurrency: int, rate: float, seconds: float,
              connections: int, delay: float = 2.0) -> tuple[float, float, str]:
    """9 fast webhooks alone, then beside one answering after ``delay`` s (maxAllowedConnections=2).

    Offered load: ``rate`` deliveries/s to the fast ones together. Returns both fast p99s (ms).
    """
    from notifier import publish

    fast = [(run.ORG, receiver.url(f"/fast/{i}"), connections) for i in range(9)]

    def once(sub: str, hooks: list[tuple[int, str, int]]) -> tuple[float, str]:
        (folder / sub).mkdir()
        with stack(folder / sub, concurrency, hooks):
            def load(for_seconds: float) -> tuple[list[float], str]:
                return offered_load(receiver, rate / 9, for_seconds, 9, lambda: publish(
                    run.EVENT, bench_data(), org_id=run.ORG, broker_url=run.NOTIFIER_BROKER))

            # The first seconds of a stack are its cold start (new processes, connections,
            # webhooks not yet measured, which start in the slow lane): reported apart.
            cold, _ = load(WARM_UP_SECONDS)
            lat, note = load(seconds)
        return p99(lat), (f"{percentiles(lat)}; {note}; the {WARM_UP_SECONDS:.0f} s warm-up "
                          f"before it: p99 {p99(cold):.1f} ms")

    without, note_without = once("isolation-without", fast)
    with Receiver(1, delay=delay) as slow:
        with_slow, note_with = once("isolation-with", [*fast, (run.ORG, slow.url("/slow"), 2)])
        slow_got = slow.count
    text = (f"  fast p99 without the slow webhook: {note_without}\n"
            f"  fast p99 beside the slow webhook:  {note_with}; the slow one answered {slow_got}")
    return without, with_slow, text


def isolation_dead(receiver: Receiver, folder: Path, concurrency: int, rate: float,
                   seconds: float, connections: int, status: int = 503) -> tuple[float, str]:
    """9 fast webhooks beside one dead endpoint, answering every request with ``status`` (503:
    always failing, its circuit breaker opens and it gets probes only; 410: deactivated at its
    first answer), subscribed to the same events (maxAllowedConnections=2).

    Offered load: ``rate`` deliveries/s to the fast ones together (the dead one gets as many
    events again). Returns the fast p99 (ms) and a line saying what the dead endpoint got; to
    be read against ``isolation``'s fast p99 alone, from the same run.
    """
    from notifier import publish

    fast = [(run.ORG, receiver.url(f"/fast/{i}"), connections) for i in range(9)]
    (folder / "isolation-dead").mkdir()
    with Receiver(1, status=status) as dead:
        with stack(folder / "isolation-dead", concurrency,
                   [*fast, (run.ORG, dead.url("/dead"), 2)]):
            def load(for_seconds: float) -> tuple[list[float], str]:
                return offered_load(receiver, rate / 9, for_seconds, 9, lambda: publish(
                    run.EVENT, bench_data(), org_id=run.ORG, broker_url=run.NOTIFIER_BROKER))

            cold, _ = load(WARM_UP_SECONDS)
            lat, note = load(seconds)
        dead_got = dead.count
    text = (f"  fast p99 beside a dead webhook (every answer {status}): {percentiles(lat)}; "
            f"{note}; the {WARM_UP_SECONDS:.0f} s warm-up before it: p99 {p99(cold):.1f} ms; "
            f"the dead one got {dead_got} requests in {WARM_UP_SECONDS + seconds:.0f} s")
    return p99(lat), text


# ---------------------------------------------------------------- many webhooks


def many_webhooks(receiver: Receiver, folder: Path, concurrency: int, deliveries: int,
                  counts: list[int], connections: int, repeat: int) -> dict[int, list[run.Sample]]:
    """Traffic spread over ``counts`` webhooks (one per org), each count a run of ``deliveries``
    with the events round-robin over the first ``count`` orgs, pre-filled, then drained.

    One stack holds the largest count's webhooks and the runs alternate between the counts, so
    that a drift of the machine weighs on all of them alike. Every webhook is delivered to once
    first (measured, so in the fast lane).
    """
    orgs = [run.ORG + i for i in range(max(counts))]
    hooks = [(org, receiver.url(f"/many/{i}"), connections) for i, org in enumerate(orgs)]
    samples: dict[int, list[run.Sample]] = {count: [] for count in counts}
    with stack(folder, concurrency, hooks) as (procs, _, _):
        _spread(receiver, procs, orgs, len(orgs))  # warm-up
        for i in range(repeat):
            for count in counts:
                sample = _spread(receiver, procs, orgs[:count], deliveries)
                samples[count].append(sample)
                print(f"  notifier {count} webhooks run {i + 1}/{repeat}: {sample.rate:.0f}/s "
                      f"{' '.join(sample.notes)}", flush=True)
    return samples


def _spread(receiver: Receiver, procs: run.Processes, orgs: list[int],
            deliveries: int) -> run.Sample:
    from notifier import publish
    from notifier.client import QUEUE

    run._truncate("attempts, deliveries, events")
    data = run.event_data()
    start_count = receiver.count
    procs.pause(run.NOTIFIER_BROKER, "notifier", QUEUE)
    for i in range(deliveries):
        publish(run.EVENT, data, org_id=orgs[i % len(orgs)], broker_url=run.NOTIFIER_BROKER)
    tasks_before = run.delivery_tasks(procs)
    with run.RssSampler(run.worker_pids(procs)) as rss:
        t0, wake = procs.resume_timed(run.NOTIFIER_BROKER, "notifier", QUEUE)
        run._wait(receiver, start_count + deliveries, deliveries, f"{len(orgs)} webhooks")
        seconds = time.perf_counter() - t0
    tasks = max(1, run.delivery_tasks(procs) - tasks_before)
    deadline = time.monotonic() + 30
    while (counts := run._db_counts())[0] < deliveries and time.monotonic() < deadline:
        time.sleep(0.1)
    if counts != (deliveries,) * 3:
        raise run.BenchError(f"{len(orgs)} webhooks: expected {deliveries} delivered, db {counts}")
    return run.Sample(seconds, deliveries, rss.peak,
                      [f"({len(orgs)} orgs x 1 webhook, events round-robin; {tasks} delivery "
                       f"tasks, {deliveries / tasks:.1f} deliveries each; {run.woke(wake)})"])


# ---------------------------------------------------------------- backlog


def _redis_memory() -> int:
    client = redis.Redis.from_url(run.NOTIFIER_REDIS)
    try:
        return int(client.info("memory")["used_memory"])
    finally:
        client.close()


def _database_bytes() -> int:
    return int(run.pg_value("SELECT pg_database_size(current_database())", run.PG_URL))


def _wait_until(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise run.BenchError(f"backlog: {what} did not happen in {seconds:.0f}s")
        time.sleep(0.5)


def backlog(receiver: Receiver, folder: Path, concurrency: int, deliveries: int,
            connections: int, before_drain: Callable[[], None] = lambda: None) -> run.Sample:
    """A backlog of ``deliveries`` (fan-out 1), built with delivery stopped, then drained.

    1. Every consumer paused, the events are published: the broker holds them.
    2. Ingestion resumed, delivery still paused: the deliveries wait in notifier's Redis queue
       and the database (and ``before_drain()`` runs: a round of Floor B, to pair with).
    3. Delivery resumed: the drain is timed. Returns it, with a note of the memory each phase
       took.

    Delivery is paused as an operator pauses it: the fast lane's consumer and the slow worker's
    cancelled (``cancel_consumer``), which the fast worker's slow lane cover leaves alone.
    """
    from notifier import publish
    from notifier.client import DELIVER_QUEUE, QUEUE, SLOW_QUEUE

    broker = run.NOTIFIER_BROKER
    with stack(folder, concurrency, [(run.ORG, receiver.url("/backlog"), connections)]) as (
            procs, _, _):
        # Warm-up: the webhook is measured fast, so its leases take the fast lane.
        start_count = receiver.count
        for _ in range(100):
            publish(run.EVENT, run.event_data(), org_id=run.ORG, broker_url=broker)
        run._wait(receiver, start_count + 100, 100, "backlog warm-up")
        _wait_until(lambda: run._db_counts()[0] == 100, 30, "the warm-up's 100 records")
        run._truncate("attempts, deliveries, events")
        procs.pause(broker, "notifier", QUEUE)
        procs.pause(broker, "notifier", DELIVER_QUEUE)
        procs.pause(broker, "slow", SLOW_QUEUE)
        memory_empty, database_empty = _redis_memory(), _database_bytes()

        data = run.event_data()
        t0 = time.perf_counter()
        for _ in range(deliveries):
            publish(run.EVENT, data, org_id=run.ORG, broker_url=broker)
        published = time.perf_counter() - t0
        memory_published = _redis_memory()

        t0 = time.perf_counter()
        procs.resume(broker, "notifier", QUEUE)
        _wait_until(lambda: run._db_counts()[1] == deliveries
                    and run._queue_length(broker, QUEUE) == 0, 60 + deliveries / 20,
                    "ingesting every event")
        ingested = time.perf_counter() - t0
        memory_queued = _redis_memory()
        if receiver.count != start_count + 100:
            raise run.BenchError("backlog: a delivery went out while delivery was paused")

        # The fast lane's worker must consume nothing when its delivery queue is resumed, or
        # it would take from it only when its BRPOP over the ingest queue, in flight, times out
        # (up to 1 s; see run.Processes.resume_timed).
        procs.pause(broker, "notifier", QUEUE)
        before_drain()
        # (The receiver counted Floor B's requests meanwhile: the database says what notifier
        # attempted.)
        if run._db_counts()[2]:
            raise run.BenchError("backlog: a delivery went out while delivery was paused")
        start_count = receiver.count
        tasks_before = run.delivery_tasks(procs)
        with run.RssSampler(run.worker_pids(procs)) as rss:
            t0 = time.perf_counter()
            procs.resume(broker, "notifier", DELIVER_QUEUE)
            procs.resume(broker, "slow", SLOW_QUEUE)
            procs.resume(broker, "notifier", QUEUE)  # (beat's sweeps)
            run._wait(receiver, start_count + deliveries, deliveries, "backlog drain")
            seconds = time.perf_counter() - t0
        _wait_until(lambda: run._db_counts() == (deliveries,) * 3, 60, "every attempt recorded")
        tasks = max(1, run.delivery_tasks(procs) - tasks_before)
        database_full = _database_bytes()
    note = (f"backlog of {deliveries}: published at {deliveries / published:.0f}/s, the broker "
            f"held {(memory_published - memory_empty) / deliveries:.0f} B per waiting event; "
            f"ingested (delivery paused) at {deliveries / ingested:.0f}/s, then notifier's Redis "
            f"queue held {(memory_queued - memory_empty) / deliveries:.0f} B per queued "
            f"delivery; drained at {deliveries / seconds:.0f}/s in {tasks} delivery tasks "
            f"({deliveries / tasks:.1f} each); the database grew "
            f"{(database_full - database_empty) / deliveries:.0f} B per delivery; workers' peak "
            f"RSS {rss.peak / 2**20:.0f} MiB")
    return run.Sample(seconds, deliveries, rss.peak, [note])
