"""The scenarios: raw receiver check, Floor A, Floor B and notifier; each returns one Sample."""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import redis
import requests
import sqlalchemy as sa
from celery import Celery

from bench.receiver import Receiver

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
DATABASE = "notifier_bench"
PG_URL = f"postgresql+psycopg://postgres@127.0.0.1:5432/{DATABASE}"
REDIS = "redis://127.0.0.1:6379"
FLOOR_B_BROKER = f"{REDIS}/12"
NOTIFIER_BROKER = f"{REDIS}/13"
NOTIFIER_REDIS = f"{REDIS}/11"


def use(redis_url: str, database: str) -> None:
    """Run against this Redis server (its databases 11 to 13, flushed) and this PostgreSQL
    database (created if missing, its tables emptied): two benchmarks on one machine then keep
    out of each other's way."""
    global DATABASE, PG_URL, REDIS, FLOOR_B_BROKER, NOTIFIER_BROKER, NOTIFIER_REDIS
    if not database.replace("_", "").isalnum():
        raise BenchError(f"--database: {database!r} is not a plain name (letters, digits, _)")
    DATABASE, REDIS = database, redis_url.rstrip("/")
    PG_URL = f"postgresql+psycopg://postgres@127.0.0.1:5432/{DATABASE}"
    FLOOR_B_BROKER, NOTIFIER_BROKER, NOTIFIER_REDIS = (f"{REDIS}/{n}" for n in (12, 13, 11))
FLOOR_B_QUEUE = "bench-floor-b"
# Settings given to every notifier stack (``--set``), to measure what one changes.
SETTINGS: dict[str, str] = {}
ORG = 4242
EVENT = "pointsIssued"


class BenchError(RuntimeError):
    pass


@dataclass
class Sample:
    seconds: float
    deliveries: int
    peak_rss: int = 0
    notes: list[str] = field(default_factory=list)
    cpu_us: float = 0.0  # CPU time its workers used a delivery (``CpuUse``), if measured

    @property
    def rate(self) -> float:
        return self.deliveries / self.seconds


def event_data() -> dict[str, Any]:
    """The event's ``data``: a valid pointsIssued, padded so the delivered body is about 1 KiB."""
    return {
        "customerIdentifiers": {"customerId": 42, "mobile": "919999999999",
                                "email": "bench@example.com", "externalId": "ext-42"},
        "totalPointsIssued": 120, "regularPointsIssued": 100, "programCurrentPoints": 5120,
        "programLifetimePoints": 9120, "loyaltyProgramId": 7,
        "loyaltyProgramDetails": {"id": 7, "name": "Gold Rewards", "isDefault": True,
                                  "description": "x" * 420, "pointsToCurrencyRatio": 0.25,
                                  "tiers": [{"tierNumber": 1, "tierName": "Silver"},
                                            {"tierNumber": 2, "tierName": "Gold"}]},
        "regularPointsBreakup": [{"points": 100, "expiryAt": "2027-11-28T00:00:00Z",
                                  "awardedReferenceId": "ref-0001"}],
    }


def body() -> dict[str, Any]:
    """What Floors A and B POST: an envelope like the one notifier delivers."""
    return {"eventName": EVENT, "eventId": str(uuid.uuid4()), "orgId": ORG,
            "createdAt": time.time_ns() // 1_000_000, "data": event_data()}


# ---------------------------------------------------------------- memory


def _tree(pids: list[int]) -> Iterator[psutil.Process]:
    """The processes ``pids`` and all their descendants, those still there."""
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(pid)
            yield from [root, *root.children(recursive=True)]


def _each(procs: Iterable[psutil.Process], read: Callable[[psutil.Process], float]
          ) -> dict[int, float]:
    """``read(proc)`` of each process still there, by pid."""
    values: dict[int, float] = {}
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            values[proc.pid] = read(proc)
    return values


def tree_rss(pids: list[int]) -> int:
    """Summed RSS of the processes ``pids`` and all their descendants, now."""
    return int(sum(_each(_tree(pids), lambda proc: proc.memory_info().rss).values()))


def _cpu(proc: psutil.Process) -> float:
    return float(sum(proc.cpu_times()[:2]))  # user and system


def tree_cpu(pids: list[int]) -> dict[int, float]:
    """The CPU seconds each of the processes ``pids`` and all their descendants has used so
    far, by pid."""
    return _each(_tree(pids), _cpu)


def postgres_cpu() -> dict[int, float]:
    """The CPU seconds each of the PostgreSQL server's processes has used so far, by pid (those
    this user may read; all of them when the benchmark runs as root, as it does in CI)."""
    return _each((proc for proc in psutil.process_iter(["name"])
                  if (proc.info["name"] or "").startswith("postgres")), _cpu)


def _used_since(before: dict[int, float], now: dict[int, float]) -> float:
    """The CPU seconds used between two readings, by the processes there at the second (a
    process that ended meanwhile, a prefork child replaced or a database connection closed,
    takes its time with it: never counted as time given back)."""
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in now.items())


class CpuUse:
    """The CPU time some process trees, and PostgreSQL's processes, used from when it is made
    until ``stop()``, per delivery (``per``): a cost that the machine's speed moves less than a
    rate. A process that ended meanwhile takes its time with it (``_used_since``)."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self._workers, self._postgres = tree_cpu(pids), postgres_cpu()
        self.workers = self.postgres = 0.0

    def stop(self) -> None:
        self.workers = _used_since(self._workers, tree_cpu(self.pids))
        self.postgres = _used_since(self._postgres, postgres_cpu())

    def workers_us(self, deliveries: int) -> float:
        """The workers' CPU time a delivery, in microseconds."""
        return self.workers / max(1, deliveries) * 1e6

    def per(self, deliveries: int) -> str:
        return (f"CPU {self.workers_us(deliveries):.0f} us a delivery in the workers, "
                f"{self.postgres / max(1, deliveries) * 1e6:.0f} us in PostgreSQL")


class RssSampler:
    """Peak summed RSS of some process trees, sampled every 50 ms in a thread."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _tree_rss(self) -> int:
        return tree_rss(self.pids)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._tree_rss())
            self._stop.wait(0.05)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._tree_rss())


# ---------------------------------------------------------------- subprocesses


def _hostname(name: str) -> str:
    return f"{name}@{socket.gethostname()}"


@functools.cache
def _control(broker_url: str) -> Any:
    return Celery("bench-control", broker=broker_url, set_as_current=False).control


def _queue_length(broker_url: str, queue: str) -> int:
    client = redis.Redis.from_url(broker_url)
    try:
        return int(client.llen(queue))
    finally:
        client.close()


class Processes:
    """Celery subprocesses in their own sessions; ``stop`` kills each process group."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.folder = folder
        self.env = env
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")

    def spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        with (self.folder / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "celery", *args], env=self.env,
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, cwd=ROOT)
        self.procs[name] = proc
        return proc

    def worker(self, app: str, name: str, concurrency: int, pool: str = "prefork",
               queues: str = "") -> subprocess.Popen[bytes]:
        proc = self.spawn(name, ["-A", app, "worker", "--hostname", f"{name}@%h", "--pool", pool,
                                 "--concurrency", str(concurrency), "--loglevel", "INFO",
                                 *(["--queues", queues] if queues else [])])
        deadline = time.monotonic() + 60
        while "ready." not in self.log(name):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"worker {name} did not start:\n{self.log(name)[-3000:]}")
            time.sleep(0.05)
        return proc

    def pause(self, broker_url: str, name: str, queue: str) -> None:
        """Stop worker ``name`` consuming ``queue`` (remote control), so the queue can be filled."""
        reply = _control(broker_url).cancel_consumer(queue, reply=True, timeout=10,
                                                     destination=[_hostname(name)])
        if not reply:
            raise BenchError(f"worker {name} did not answer cancel_consumer")
        # A BRPOP over all the worker's queues may be in flight (kombu waits up to 1 s in one):
        # let it end, or it could still take a message of the queue just cancelled.
        time.sleep(1.2)

    def resume(self, broker_url: str, name: str, queue: str) -> None:
        reply = _control(broker_url).add_consumer(queue, reply=True, timeout=10,
                                                  destination=[_hostname(name)])
        if not reply:
            raise BenchError(f"worker {name} did not answer add_consumer")

    def resume_timed(self, broker_url: str, name: str, queue: str) -> tuple[float, float]:
        """Resume ``queue``, filled while paused: ``(t0, wake)``, the ``perf_counter()`` at which
        the worker took its first message (the drain's start) and how long after the resume.

        A worker still consuming another queue takes up to a second to take from a queue added
        back: kombu's BRPOP over its other queues, already in flight, waits up to 1 s (its
        timeout) before the next one names the new queue. A worker of one queue (Floor B's) has
        none in flight and takes at once. That second is the bench's pause, not the work timed,
        so drains are timed from the first message taken, for every worker alike: a watcher,
        started before the resume, polls the queue's length every millisecond until it falls."""
        return first_take(broker_url, queue, lambda: self.resume(broker_url, name, queue))

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            # The prefork children are in the same group; make sure none outlives its parent.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)


def first_take(broker_url: str, queue: str, resume: Callable[[], None]) -> tuple[float, float]:
    """``resume()``, then ``(t0, wake)``: when ``queue``'s length first fell, watched from before
    the resume, and how long after the resume that was (see ``Processes.resume_timed``)."""
    client = redis.Redis.from_url(broker_url)
    took: list[float] = []
    ready, done = threading.Event(), threading.Event()

    def watch() -> None:
        seen = int(client.llen(queue))
        ready.set()
        # (beat's tasks may join a notifier queue meanwhile: a take is the length falling)
        while not done.is_set():
            length = int(client.llen(queue))
            if length < seen:
                took.append(time.perf_counter())
                return
            seen = length
            time.sleep(0.001)

    watcher = threading.Thread(target=watch, name="first-take", daemon=True)
    try:
        watcher.start()
        ready.wait(5)
        resumed = time.perf_counter()
        resume()
        watcher.join(5)
    finally:
        done.set()
        watcher.join(1)
        client.close()
    if not took:
        raise BenchError(f"nothing was taken from {queue} in 5 s after the resume")
    return took[0], took[0] - resumed


def woke(wake: float) -> str:
    """A round's note of how long its worker took to take its first message, untimed."""
    return f"first message taken {wake * 1000:.0f} ms after the resume, not timed"


def _timeout(deliveries: int) -> float:
    return 60 + deliveries / 50


def _wait(receiver: Receiver, target: int, deliveries: int, what: str) -> None:
    if not receiver.wait_for(target, _timeout(deliveries)):
        raise BenchError(f"{what}: receiver got {receiver.count - (target - deliveries)} "
                         f"of {deliveries} in {_timeout(deliveries):.0f}s")


# ---------------------------------------------------------------- raw receiver check


def _raw_client(url_port: int, count: int, payload: bytes, go: Any) -> None:
    request = (b"POST /raw HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
    sock = socket.create_connection(("127.0.0.1", url_port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    go.wait()
    for _ in range(count):  # one request in flight at a time, like a requests.Session
        sock.sendall(request)
        got = b""
        while not got.endswith(b"ok"):
            got += sock.recv(4096)
    sock.close()


def receiver_check(receiver: Receiver, deliveries: int, clients: int) -> Sample:
    """The receiver alone, driven by raw-socket clients: it must be far above Floor A."""
    payload = json.dumps(body()).encode()
    ctx = mp.get_context("fork")
    go = ctx.Event()
    per = deliveries // clients
    procs = [ctx.Process(target=_raw_client, args=(receiver.port, per, payload, go))
             for _ in range(clients)]
    for proc in procs:
        proc.start()
    start_count = receiver.count
    time.sleep(0.2)
    t0 = time.perf_counter()
    go.set()
    try:
        _wait(receiver, start_count + per * clients, per * clients, "receiver check")
        seconds = time.perf_counter() - t0
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    return Sample(seconds, per * clients)


# ---------------------------------------------------------------- Floor A


def _floor_a_client(url: str, count: int, payload: bytes, go: Any) -> None:
    session = requests.Session()
    session.trust_env = False
    headers = {"Content-Type": "application/json"}
    go.wait()
    for _ in range(count):
        session.post(url, data=payload, headers=headers, timeout=(5, 30)).raise_for_status()


def floor_a(receiver: Receiver, deliveries: int, concurrency: int) -> Sample:
    payload = json.dumps(body()).encode()
    ctx = mp.get_context("fork")
    go = ctx.Event()
    per = deliveries // concurrency
    procs = [ctx.Process(target=_floor_a_client, args=(receiver.url("/floor-a"), per, payload, go))
             for _ in range(concurrency)]
    for proc in procs:
        proc.start()
    start_count = receiver.count
    time.sleep(0.2)
    try:
        with RssSampler([p.pid for p in procs if p.pid is not None]) as rss:
            t0 = time.perf_counter()
            go.set()
            _wait(receiver, start_count + per * concurrency, per * concurrency, "Floor A")
            seconds = time.perf_counter() - t0
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    return Sample(seconds, per * concurrency, rss.peak)


# ---------------------------------------------------------------- Floor B


def _flush(*urls: str) -> None:
    for url in urls:
        client = redis.Redis.from_url(url)
        client.flushdb()
        client.close()


@contextlib.contextmanager
def floor_b_worker(receiver: Receiver, folder: Path, concurrency: int) -> Iterator[Processes]:
    _flush(FLOOR_B_BROKER)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFIER_", "BENCH_"))}
    env.update(BENCH_BROKER_URL=FLOOR_B_BROKER, BENCH_TARGET_URL=receiver.url("/floor-b"))
    procs = Processes(folder, env)
    try:
        procs.worker("bench.floor_b", "floor-b", concurrency)
        yield procs
    finally:
        procs.stop()


def floor_b(receiver: Receiver, procs: Processes, deliveries: int) -> Sample:
    os.environ["BENCH_BROKER_URL"] = FLOOR_B_BROKER
    from bench.floor_b import app

    payload = body()
    start_count = receiver.count
    procs.pause(FLOOR_B_BROKER, "floor-b", FLOOR_B_QUEUE)
    t0 = time.perf_counter()
    with app.producer_or_acquire() as producer:
        for _ in range(deliveries):
            app.send_task("bench.post", args=[payload], producer=producer, queue=FLOOR_B_QUEUE)
    fill = time.perf_counter() - t0
    with RssSampler([procs.procs["floor-b"].pid]) as rss:
        cpu = CpuUse([procs.procs["floor-b"].pid])
        t0, wake = procs.resume_timed(FLOOR_B_BROKER, "floor-b", FLOOR_B_QUEUE)
        _wait(receiver, start_count + deliveries, deliveries, "Floor B")
        seconds = time.perf_counter() - t0
        cpu.stop()
    return Sample(seconds, deliveries, rss.peak,
                  [f"(queue filled at {deliveries / fill:.0f}/s; {woke(wake)})"],
                  cpu_us=cpu.workers_us(deliveries))


# ---------------------------------------------------------------- notifier


def pg_value(sql: str, url: str = PG_ADMIN_URL) -> Any:
    """One value from PostgreSQL, on a connection of its own."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.exec_driver_sql(sql).scalar_one()
    finally:
        engine.dispose()


# The settings that move notifier's rate and not Floor B's (notifier is bound by the database):
# printed with every result.
PG_SETTINGS = ("autovacuum", "synchronous_commit", "fsync", "shared_buffers", "wal_level")


def pg_settings() -> str:
    return ", ".join(f"{name}={pg_value(f'SHOW {name}')}" for name in PG_SETTINGS)


def vacuum_analyze() -> None:
    """Prepare notifier's database the same way before every run: vacuumed and analyzed."""
    engine = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql("VACUUM ANALYZE")
    engine.dispose()


def autovacuum_on() -> bool:
    return bool(pg_value("SHOW autovacuum") == "on")


def ensure_database() -> None:
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        exists = "SELECT 1 FROM pg_database WHERE datname = %s"
        if conn.exec_driver_sql(exists, (DATABASE,)).scalar() is None:
            conn.exec_driver_sql(f'CREATE DATABASE "{DATABASE}"')
    admin.dispose()
    from notifier.db import upgrade

    upgrade(PG_URL)


def _truncate(names: str) -> None:
    engine = sa.create_engine(PG_URL)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"TRUNCATE {names} RESTART IDENTITY CASCADE")
    engine.dispose()


@dataclass(frozen=True)
class Ended:
    """How the deliveries ``write_history`` writes ended: their status, and their one attempt's."""

    status: str  # the delivery's status, and its attempt's outcome
    status_code: int
    excerpt: str  # the attempt's response excerpt
    error: str | None = None  # the delivery's last_error


def write_history(webhook_id: str, rows: int, *, events: str, deliveries: str, oldest_ms: int,
                  spread_ms: int, ended: Ended) -> float:
    """``rows`` events received over ``spread_ms`` from ``oldest_ms`` on (ids ``events`` + N),
    each with a delivery to ``webhook_id`` (ids ``deliveries`` + its event's pk) that ``ended``
    after one attempt, written straight into the tables (one ``INSERT ... SELECT`` each), then
    vacuumed, analyzed and checkpointed; returns seconds. The events are of ``event_data()``'s
    size, each payload carrying its ``eventId`` and ``createdAt`` as ingest stores them."""
    payload = json.dumps({"eventName": EVENT, "orgId": ORG, "data": event_data()})
    engine = sa.create_engine(PG_URL)
    started = time.perf_counter()
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(
                "INSERT INTO events (event_id, event_name, org_id, created_at_ms, received_at_ms, "
                "payload, status) SELECT :prefix || g, :name, :org, :oldest + g * :step, "
                ":oldest + g * :step, CAST(:payload AS jsonb) || jsonb_build_object("
                "'eventId', :prefix || g, 'createdAt', :oldest + g * :step), 'dispatched' "
                "FROM generate_series(1, :rows) AS g"),
                {"prefix": events, "name": EVENT, "org": ORG, "oldest": oldest_ms,
                 "step": max(1, spread_ms // rows), "payload": payload, "rows": rows})
            conn.execute(sa.text(
                "INSERT INTO deliveries (id, event_pk, webhook_id, status, attempt_count, "
                "ingested_at_ms, started_at_ms, ended_at_ms, last_status_code, last_error) "
                "SELECT :prefix || pk, pk, :hook, :status, 1, received_at_ms, "
                "received_at_ms + 3, received_at_ms + 8, :code, :error FROM events "
                "WHERE starts_with(event_id, :events)"),
                {"prefix": deliveries, "hook": webhook_id, "status": ended.status,
                 "code": ended.status_code, "error": ended.error, "events": events})
            conn.execute(sa.text(
                "INSERT INTO attempts (delivery_id, number, started_at_ms, latency_ms, "
                "status_code, outcome, response_excerpt) SELECT id, 1, started_at_ms, 5, :code, "
                ":status, :excerpt FROM deliveries WHERE starts_with(id, :prefix)"),
                {"prefix": deliveries, "code": ended.status_code, "status": ended.status,
                 "excerpt": ended.excerpt})
        with engine.connect() as conn:
            # Written out before the clock runs: a checkpoint flushing a million rows' pages
            # during the first window made "without a purge" the slowest of the three.
            auto = conn.execution_options(isolation_level="AUTOCOMMIT")
            auto.execute(sa.text("VACUUM ANALYZE events, deliveries, attempts"))
            auto.execute(sa.text("CHECKPOINT"))
    finally:
        engine.dispose()
    return time.perf_counter() - started


def notifier_env(folder: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFIER_", "BENCH_"))}
    env.update({
        "NOTIFIER_DATA_DIR": str(folder),
        "NOTIFIER_DATABASE_URL": PG_URL,
        "NOTIFIER_BROKER_URL": NOTIFIER_BROKER,
        "NOTIFIER_REDIS_URL": NOTIFIER_REDIS,
        "NOTIFIER_ALLOW_PRIVATE_NETWORKS": "127.0.0.0/8",
        **SETTINGS,
    })
    return env


def create_webhook(db: Any, catalog: Any, vault: Any, *, org_id: int, name: str, url: str,
                   event_names: list[str], max_allowed_connections: int = 10,
                   headers: dict[str, str] | None = None, **options: Any) -> str:
    """A webhook made through the one save path (``notifier.webhooks.create``), to a receiver
    on loopback, where the benchmark's receivers are (and nothing else is); ``options``: more
    InTouch webHooks fields (enrichment). Returns its id."""
    from notifier import webhooks

    loopback = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    context = webhooks.Context(db, catalog, vault, allowed_networks=loopback)
    saved = webhooks.create(context, org_id, {
        "name": name, "webHookUrl": url, "eventNames": event_names,
        "webHookHeaders": headers or {}, "maxAllowedConnections": max_allowed_connections,
        **options}, now_ms=0)
    return str(saved.view["webHookId"])

@contextlib.contextmanager
def notifier_stack(receiver: Receiver, folder: Path, concurrency: int, fanout: int,
                   connections: int, prepare: Callable[[Any, Any, Any], None] | None = None
                   ) -> Iterator[Processes]:
    """Fresh tables, one org with ``fanout`` webhooks to the receiver, the workers and beat.

    ``prepare(db, catalog, vault)`` (a ``notifier.db.Database``, the event catalog and the
    stack's vault), if given, runs after the org and webhooks are created and before the
    workers start (e.g. reference data, more orgs and webhooks).
    """
    from config import load_settings
    from notifier import store
    from notifier.db import Database
    from notifier.models import Base
    from notifier.schemas import load_catalog
    from notifier.vault import vault_for

    _truncate(", ".join(t.name for t in Base.metadata.sorted_tables))
    _flush(NOTIFIER_BROKER, NOTIFIER_REDIS)
    env = notifier_env(folder)
    settings = load_settings({k: v for k, v in env.items() if k.startswith("NOTIFIER_")})
    db = Database(PG_URL)
    try:
        store.create_org(db, ORG, "bench", now_ms=0)
        catalog, vault = load_catalog(), vault_for(settings.secret_keys, settings.data_dir)
        for i in range(fanout):
            create_webhook(db, catalog, vault, org_id=ORG, name=f"hook-{i}",
                           url=receiver.url(f"/notifier/{i}"), event_names=[EVENT],
                           max_allowed_connections=connections)
        if prepare is not None:
            prepare(db, catalog, vault)
    finally:
        db.dispose()
    procs = start_notifier(folder, env, concurrency)
    try:
        yield procs
    finally:
        procs.stop()


def start_notifier(folder: Path, env: dict[str, str], concurrency: int) -> Processes:
    """notifier's processes as the Procfile runs them: the prefork worker (ingest, beat's
    tasks, the fast lane), the threads worker of the slow lane, and beat."""
    from notifier.client import DELIVER_QUEUE, QUEUE, SLOW_QUEUE

    procs = Processes(folder, env)
    try:
        procs.worker("tasks", "notifier", concurrency, queues=f"{QUEUE},{DELIVER_QUEUE}")
        procs.worker("tasks", "slow", 16, pool="threads", queues=SLOW_QUEUE)
        procs.spawn("beat", ["-A", "tasks", "beat", "--loglevel", "INFO",
                             "--schedule", str(folder / "celerybeat-schedule")])
    except BaseException:
        procs.stop()
        raise
    return procs


def worker_pids(procs: Processes) -> list[int]:
    return [procs.procs[name].pid for name in ("notifier", "slow")]


def delivery_tasks(procs: Processes) -> int:
    """Delivery tasks the workers have run so far (from their logs)."""
    return sum(line.count("notifier.deliver[") for name in ("notifier", "slow")
               for line in procs.log(name).splitlines() if "succeeded" in line)


def wal_bytes() -> int:
    """PostgreSQL's write-ahead log position: its growth is what a run wrote, indexes included."""
    return int(pg_value("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn"))


def ingest_batches(since_ms: int = 0) -> int:
    """How many transactions stored the events (those published since ``since_ms``): one batch
    stamps its events with one received_at_ms."""
    return max(1, int(pg_value("SELECT count(DISTINCT received_at_ms) FROM events "
                               f"WHERE created_at_ms >= {int(since_ms)}", PG_URL)))


def _db_counts() -> tuple[int, int, int]:
    engine = sa.create_engine(PG_URL)
    with engine.connect() as conn:
        delivered = conn.exec_driver_sql(
            "SELECT count(*) FROM deliveries WHERE status = 'delivered'").scalar_one()
        total = conn.exec_driver_sql("SELECT count(*) FROM deliveries").scalar_one()
        attempts = conn.exec_driver_sql("SELECT count(*) FROM attempts").scalar_one()
    engine.dispose()
    return delivered, total, attempts


def notifier(receiver: Receiver, procs: Processes, deliveries: int, fanout: int,
             make_data: Callable[[], dict[str, Any]] | None = None, org: int = ORG,
             per_message: int = 1) -> Sample:
    """Publish ``deliveries / fanout`` events of ``org`` (worker paused), time the drain;
    ``make_data()`` gives each event's data (default: the same ``event_data()`` for all).
    ``per_message`` > 1: the events go in lists of that many a message (``publish_many``)."""
    from notifier import publish, publish_many
    from notifier.client import QUEUE

    _truncate("attempts, deliveries, events")
    events = deliveries // fanout
    data = event_data()
    start_count = receiver.count
    procs.pause(NOTIFIER_BROKER, "notifier", QUEUE)
    t0 = time.perf_counter()
    if per_message > 1:
        for first in range(0, events, per_message):
            publish_many([{"eventName": EVENT, "data": data if make_data is None else make_data()}
                          for _ in range(min(per_message, events - first))],
                         org_id=org, broker_url=NOTIFIER_BROKER)
    else:
        for _ in range(events):
            publish(EVENT, data if make_data is None else make_data(), org_id=org,
                    broker_url=NOTIFIER_BROKER)
    fill = time.perf_counter() - t0
    messages = -(-events // per_message)
    # (beat's sweep tasks share the queue, so it may hold a few more)
    if receiver.count != start_count or _queue_length(NOTIFIER_BROKER, QUEUE) < messages:
        raise BenchError("notifier: the paused worker consumed from its queue")
    tasks_before, wal_before = delivery_tasks(procs), wal_bytes()
    with RssSampler(worker_pids(procs)) as rss:
        cpu = CpuUse(worker_pids(procs))
        t0, wake = procs.resume_timed(NOTIFIER_BROKER, "notifier", QUEUE)
        _wait(receiver, start_count + events * fanout, events * fanout, "notifier")
        seconds = time.perf_counter() - t0
        # The receiver counts a request when it answers; the attempt is recorded just after.
        deadline = time.monotonic() + 30
        while (counts := _db_counts())[0] < events * fanout and time.monotonic() < deadline:
            time.sleep(0.1)
        cpu.stop()
    delivered, total, attempts = counts
    tasks = max(1, delivery_tasks(procs) - tasks_before)
    wal = (wal_bytes() - wal_before) / max(1, delivered)
    note = (f"db: {delivered}/{total} delivered, {attempts} attempts (queue filled at "
            f"{events / fill:.0f}/s; {woke(wake)}); {events / ingest_batches():.1f} events per ingest batch; "
            f"{tasks} delivery tasks ({delivered / tasks:.1f} deliveries each); {wal:.0f} B of "
            f"WAL per delivery; {cpu.per(delivered)}")
    if (delivered, total, attempts) != (events * fanout,) * 3:
        raise BenchError(f"notifier fan-out {fanout}: expected {events * fanout} delivered "
                         f"deliveries and attempts, {note}")
    return Sample(seconds, events * fanout, rss.peak, [note],
                  cpu_us=cpu.workers_us(delivered))
