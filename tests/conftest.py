"""Shared test plumbing: the real services (PostgreSQL, Redis), a real HTTP receiver, and
notifier's own worker and beat processes.

PostgreSQL and Redis are this machine's (``NOTIFIER_TEST_DATABASE_URL``,
``NOTIFIER_TEST_REDIS_URL``). Without a Redis server the tests start the embedded one; without
PostgreSQL its tests are skipped, except under CI, where a missing service is a failure.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from click.testing import CliRunner, Result

from config import Settings, load_settings
from notifier.db import Database, upgrade
from notifier.models import Base
from notifier.queues import Queues

REPO = Path(__file__).resolve().parent.parent
PG_URL = os.environ.get("NOTIFIER_TEST_DATABASE_URL",
                        "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("NOTIFIER_TEST_REDIS_URL", "redis://127.0.0.1:6379")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# Redis database numbers the tests flush and use: (queues, broker). Two suites can share one
# Redis server by choosing different numbers.
QUEUE_DB, BROKER_DB = (int(n) for n in os.environ.get("NOTIFIER_TEST_REDIS_DBS", "15,14").split(","))


def wait_until(condition: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.05) -> Any:
    """Poll ``condition`` until it returns something truthy; fail naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def sign_in_form(page: str, org: int | str, key: str) -> dict[str, str]:
    """The sign-in form's fields as a browser posts them: the org, the key and the CSRF token
    that the form ``page`` (the HTML of ``GET /ui/login``) carries."""
    token = re.search(r'name="csrf" value="([^"]+)"', page)
    assert token, "the sign-in form carries a CSRF token"
    return {"orgId": str(org), "apiKey": key, "csrf": token.group(1)}


def waiting(queues: Queues, webhook_id: str, *, replay: bool = False) -> int:
    """How many deliveries wait in a webhook's live queue in Redis (``P:q:<webhook>``), or in its
    replay queue (``P:r:<webhook>``) if ``replay``: the keys ``notifier.queues`` documents. The
    product reads the two only together (``Queues.state``, for the metrics)."""
    return int(queues.client.zcard(f"{queues.prefix}:{'r' if replay else 'q'}:{webhook_id}"))


def slots_held(queues: Queues, webhook_id: str, now_ms: int) -> int:
    """A webhook's connection slots held in Redis at ``now_ms`` (``P:slots:<webhook>``): its live
    leases, and the slots rebuilt from the database's live claims (``Queues.hold_claims``)."""
    return int(queues.client.zcount(f"{queues.prefix}:slots:{webhook_id}", now_ms, "+inf"))


_REFUSE_DELIVERED = {
    "postgresql": [
        """CREATE OR REPLACE FUNCTION notifier_test_refuse() RETURNS trigger AS $$
        BEGIN
            RAISE EXCEPTION USING ERRCODE = 'check_violation',
                MESSAGE = 'outcome refused by the test trigger';
        END $$ LANGUAGE plpgsql""",
        """CREATE TRIGGER notifier_test_refuse BEFORE UPDATE ON deliveries FOR EACH ROW
        WHEN (NEW.status = 'delivered' AND NEW.id = '{id}')
        EXECUTE FUNCTION notifier_test_refuse()"""],
    "sqlite": [
        """CREATE TRIGGER notifier_test_refuse BEFORE UPDATE ON deliveries FOR EACH ROW
        WHEN NEW.status = 'delivered' AND NEW.id = '{id}'
        BEGIN SELECT RAISE(ABORT, 'outcome refused by the test trigger'); END"""],
}


@contextlib.contextmanager
def refusing_delivered(db: Database, delivery_id: str) -> Iterator[None]:
    """While the block runs, the database refuses to mark one delivery delivered, for good (a
    ``StoreRefused``: a row it cannot take, not a fault that passes); the trigger is dropped
    after, as the database is the other tests' too."""
    with db.transaction() as connection:
        for statement in _REFUSE_DELIVERED["postgresql" if db.is_postgresql else "sqlite"]:
            connection.exec_driver_sql(statement.format(id=delivery_id))
    try:
        yield
    finally:
        with db.transaction() as connection:
            connection.exec_driver_sql("DROP TRIGGER notifier_test_refuse"
                                       + (" ON deliveries" if db.is_postgresql else ""))


def _unavailable(service: str, exc: Exception) -> None:
    message = f"{service} unreachable ({exc})"
    if IN_CI:
        pytest.fail(message + "; .ci/run should have started it")
    pytest.skip(message)


# ---------------------------------------------------------------- databases


@pytest.fixture(scope="session")
def pg_url() -> str:
    try:
        engine = sa.create_engine(PG_URL)
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP SCHEMA IF EXISTS public CASCADE")
            conn.exec_driver_sql("CREATE SCHEMA public")
        engine.dispose()
    except Exception as exc:  # any driver error means: no usable PostgreSQL here
        _unavailable("PostgreSQL", exc)
    upgrade(PG_URL)
    return PG_URL


def _truncate(url: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        names = ", ".join(t.name for t in Base.metadata.sorted_tables)
        conn.exec_driver_sql(f"TRUNCATE {names} RESTART IDENTITY CASCADE")
    engine.dispose()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file the migrations brought to head, once a session: each test's file is a copy
    of it (what the migrations make, without a second of alembic a test)."""
    path = tmp_path_factory.mktemp("sqlite-template") / "notifier.db"
    upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated, empty database: a fresh SQLite file, or the PostgreSQL test database."""
    if request.param == "sqlite":
        path = tmp_path / "notifier.db"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)  # its mode (0600) too
        return f"sqlite:///{path}"
    url = request.getfixturevalue("pg_url")
    _truncate(url)
    return url


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    database = Database(database_url)
    yield database
    database.dispose()


# ---------------------------------------------------------------- redis


@pytest.fixture(scope="session")
def redis_base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(redis-py URL prefix, kombu URL prefix) of a live Redis; db numbers are appended."""
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
        yield REDIS_URL.rstrip("/"), REDIS_URL.rstrip("/")
        return
    except redis.exceptions.RedisError as exc:
        if IN_CI:
            pytest.fail(f"Redis unreachable at {REDIS_URL} ({exc})")
    from notifier.embedded import start_redis

    folder = tmp_path_factory.mktemp("redis")
    process = start_redis(folder)
    socket_path = folder / "redis.sock"
    yield f"unix://{socket_path}?db=", f"redis+socket://{socket_path}?virtual_host="
    if process is not None:
        process.terminate()
        process.wait(timeout=10)


def _with_db(base: str, number: int) -> str:
    return f"{base}{number}" if base.endswith("=") else f"{base}/{number}"


@pytest.fixture
def redis_url(redis_base: tuple[str, str]) -> str:
    url = _with_db(redis_base[0], QUEUE_DB)
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    return url


@pytest.fixture
def broker_url(redis_base: tuple[str, str]) -> str:
    url = _with_db(redis_base[1], BROKER_DB)
    client = redis.Redis.from_url(_with_db(redis_base[0], BROKER_DB))
    client.flushdb()
    client.close()
    return url


RABBITMQ_URL = os.environ.get("NOTIFIER_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")


@pytest.fixture
def rabbitmq_url() -> str:
    """RabbitMQ, with notifier's queues declared and emptied."""
    from kombu import Connection, Exchange, Queue

    from notifier.client import DELIVER_QUEUE, QUEUE, SLOW_QUEUE

    try:
        with Connection(RABBITMQ_URL, connect_timeout=5) as connection:
            channel = connection.default_channel
            for name in (QUEUE, DELIVER_QUEUE, SLOW_QUEUE):
                bound = Queue(name, Exchange(name), routing_key=name)(channel)
                bound.declare()
                bound.purge()
    except Exception as exc:  # any connection error means: no usable RabbitMQ here
        _unavailable("RabbitMQ", exc)
    return RABBITMQ_URL


# ---------------------------------------------------------------- receiver


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    status: int = 200  # what the receiver answered (0: nothing, the sender went away mid-request)
    began: float = 0.0  # when its handling started (``at``: when its answer started out)


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


class _Gate:
    """What holds a path's requests past the first ``after`` (``Receiver.gate``)."""

    def __init__(self, after: int) -> None:
        self.opened = threading.Event()
        self._free = after
        self._lock = threading.Lock()

    def pass_through(self) -> None:
        with self._lock:
            self._free -= 1
            held = self._free < 0
        if held:
            self.opened.wait(60)


class Receiver:
    """A real HTTP server on 127.0.0.1 that records every request and answers as scripted."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.requests: list[Received] = []
        self.scripts: dict[str, deque[Reply]] = defaultdict(deque)
        self.holds: dict[str, float] = {}
        self.gates: dict[str, _Gate] = {}
        self.in_flight: dict[str, int] = defaultdict(int)
        self.peak: dict[str, int] = defaultdict(int)
        self.last_began = 0.0  # time.monotonic() when the latest request's handling started
        self.lock = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # An answer goes in two writes (head, then body). With Nagle's algorithm on, the body
            # waits for the sender's delayed acknowledgement of the head: 40 ms per request on a
            # kept-alive connection, which made a batch of 20 take 0.9 s instead of 0.05 s.
            disable_nagle_algorithm = True

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length)
                began = time.monotonic()
                reply = receiver._begin(self.path)
                if len(body) < length:
                    # Its sender went away before the whole body came (a worker killed
                    # mid-request): no answer reaches it, and none is recorded (status 0).
                    reply = Reply(0)
                answering = False

                def received() -> Received:
                    return Received(self.path, {k.lower(): v for k, v in self.headers.items()},
                                    body, time.monotonic(), reply.status, began)

                try:
                    time.sleep(reply.delay)
                    if gate := receiver.gates.get(self.path):
                        gate.pass_through()
                    # Recorded, and no longer open, before its answer goes out: its sender may
                    # read the answer and go on (look at what was received, or take the slot's
                    # next request) before this thread, behind the others for the GIL, gets
                    # any further. Recorded after the answer, a request the sender had seen
                    # answered could be missing from ``requests``, and a peak counted from
                    # there would be this answer's tail, not two requests held at once.
                    receiver._handled(self.path, received())
                    answering = True
                    if not reply.status:
                        return
                    self.send_response(reply.status)
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                finally:
                    if not answering:  # (the handling failed: a gate or a script's error)
                        receiver._handled(self.path, received())

            def log_message(self, *_: Any) -> None:
                pass

        self.host = host
        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.server.server_port}{path}"

    def script(self, path: str, *replies: Reply | int) -> None:
        with self.lock:
            self.scripts[path].extend(r if isinstance(r, Reply) else Reply(r) for r in replies)

    def hold(self, path: str, seconds: float) -> None:
        self.holds[path] = seconds

    def gate(self, path: str, after: int = 0) -> threading.Event:
        """Requests to ``path`` past the first ``after`` wait for the returned event to be set
        (at most 60 s) before they are answered: a test looks at what notifier does while a
        request is open."""
        self.gates[path] = _Gate(after)
        return self.gates[path].opened

    def _begin(self, path: str) -> Reply:
        with self.lock:
            self.in_flight[path] += 1
            self.peak[path] = max(self.peak[path], self.in_flight[path])
            self.last_began = time.monotonic()
            script = self.scripts[path]
            reply = script.popleft() if script else Reply()
            if path in self.holds:
                reply = Reply(reply.status, reply.headers, reply.delay + self.holds[path])
            # The request is counted when its handling starts: arrival is what tests observe.
            return reply

    def _handled(self, path: str, received: Received) -> None:
        """A request's handling is over, its answer about to go out (or none): no longer in
        flight, and recorded."""
        with self.lock:
            self.in_flight[path] -= 1
            self.requests.append(received)
            self.lock.notify_all()

    def at(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.requests if r.path == path]

    def wait_for(self, count: int, path: str | None = None, timeout: float = 60.0,
                 unique: bool = False) -> list[Received]:
        """Block until ``count`` requests (to ``path``; distinct webhook-ids if ``unique``)."""
        def seen() -> list[Received]:
            got = [r for r in self.requests if path is None or r.path == path]
            if unique:
                got = list({r.headers["webhook-id"]: r for r in got}.values())
            return got

        deadline = time.monotonic() + timeout
        with self.lock:
            while len(seen()) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(f"receiver got {len(seen())} of {count} requests "
                                f"to {path or 'any path'} in {timeout}s")
                self.lock.wait(left)
            return seen()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


# ---------------------------------------------------------------- worker processes


class Stack:
    """notifier's own processes (Celery workers and beat) against the test services."""

    def __init__(self, env: dict[str, str], folder: Path) -> None:
        self.env = env
        self.folder = folder
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.settings: Settings = load_settings(
            {k: v for k, v in env.items() if k.startswith("NOTIFIER_")})

    def _spawn(self, name: str, args: list[str],
               program: tuple[str, ...] = ("celery", "-A", "tasks")) -> subprocess.Popen[bytes]:
        # The repository first on the path: a test's own wrapper (``tests.security...``) is
        # importable in the process, and the code run is this checkout's.
        path = os.pathsep.join(filter(None, (str(REPO), self.env.get("PYTHONPATH"))))
        with (self.folder / f"{name}.log").open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", *program, *args], env={**self.env, "PYTHONPATH": path},
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, cwd=self.folder)
        self.processes[name] = process
        return process

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")

    def worker(self, name: str = "w1", concurrency: int = 2, pool: str = "prefork",
               queues: str | None = None,
               program: tuple[str, ...] = ("celery", "-A", "tasks")) -> str:
        """A worker of the queues named (comma separated), by default of all of them;
        ``program`` is what ``python -m`` runs (a test's wrapper of celery's command)."""
        # Without mingle: at start a worker asks the others for their revoked task ids and
        # waits a second for answers, and notifier revokes none (its state is in the database).
        # The Procfile's and ``notifier up``'s workers still mingle (tests/e2e).
        self._spawn(name, ["worker", "--hostname", f"{name}@%h", "--pool", pool,
                           "--concurrency", str(concurrency), "--loglevel", "INFO",
                           "--without-mingle",
                           *(["--queues", queues] if queues else [])], program=program)
        wait_until(lambda: "ready." in self.log(name) or self.processes[name].poll() is not None,
                   60, f"worker {name} to be ready")
        assert self.processes[name].poll() is None, self.log(name)
        return name

    def beat(self, name: str = "beat") -> None:
        """A beat process; several run side by side under different names."""
        schedule = "celerybeat-schedule" + ("" if name == "beat" else f"-{name}")
        self._spawn(name, ["beat", "--loglevel", "INFO",
                           "--schedule", str(self.folder / schedule)])

    def org(self, org_id: int, name: str = "test org") -> str:
        """Create an org in the stack's database; returns a new API key of it."""
        from notifier import store, tenants

        database = Database(self.settings.database_url)
        try:
            store.create_org(database, org_id, name, now_ms=0)
            return tenants.create_key(database, org_id, now_ms=0)
        finally:
            database.dispose()

    def web(self) -> str:
        """The HTTP API under uvicorn on a free loopback port; returns its base URL."""
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self._spawn("web", ["--factory", "notifier.api:create_app", "--host", "127.0.0.1",
                            "--port", str(port)], program=("uvicorn",))
        wait_until(lambda: "Uvicorn running" in self.log("web")
                   or self.processes["web"].poll() is not None, 60, "the API to listen")
        assert self.processes["web"].poll() is None, self.log("web")
        return f"http://127.0.0.1:{port}"

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal a process and all its children (the prefork pool) at once."""
        os.killpg(self.processes[name].pid, sig)
        self.processes[name].wait(timeout=30)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop every process (and its children): by default as an operator would (a warm
        shutdown, which finishes what is under way and flushes the logs)."""
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, sig)
        for process in self.processes.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


@pytest.fixture
def stack_env(tmp_path: Path, pg_url: str, redis_url: str, broker_url: str) -> dict[str, str]:
    """Settings for a fast-moving stack: short retries, timeouts and leases."""
    _truncate(pg_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOTIFIER_")}
    env.update({
        "NOTIFIER_DATA_DIR": str(tmp_path),
        "NOTIFIER_DATABASE_URL": pg_url,
        "NOTIFIER_BROKER_URL": broker_url,
        "NOTIFIER_REDIS_URL": redis_url,
        "NOTIFIER_ALLOW_PRIVATE_NETWORKS": "127.0.0.0/8",
        "NOTIFIER_RETRY_SCHEDULE": "0.3",
        "NOTIFIER_RETRY_JITTER": "0",
        "NOTIFIER_HTTP_CONNECT_TIMEOUT": "1",
        "NOTIFIER_HTTP_READ_TIMEOUT": "1",
        "NOTIFIER_HTTP_DEADLINE": "2",
        "NOTIFIER_BATCH_TIME_BUDGET": "1",
        "NOTIFIER_SLOT_LEASE_SECONDS": "5",
        "NOTIFIER_VISIBILITY_TIMEOUT": "30",
        "NOTIFIER_SWEEP_INTERVAL": "0.5",
        "NOTIFIER_SLA_CHECK_INTERVAL": "0.5",
        # A dead endpoint's breaker probes at the pace of the short retries, so that tests
        # scripting runs of failures see them through in seconds.
        "NOTIFIER_BREAKER_COOLDOWN": "0.3",
        "NOTIFIER_BREAKER_COOLDOWN_MAX": "0.6",
    })
    return env


# Deadlines no answer of a test's receiver comes near (``stack.env.update(PATIENT)``), for a
# stack whose test counts requests or attempts exactly ("once", an order, a scripted run): on a
# loaded machine an answer held up in the test's process past the fast stack's 1 s read timeout
# is cut and sent again (at least once, with the same webhook-id), a request and an attempt
# more than such a test expects. The slot lease stays above the delivery task's time limit
# that they make (1 + 15 + 1 s).
PATIENT = {"NOTIFIER_HTTP_READ_TIMEOUT": "15", "NOTIFIER_HTTP_DEADLINE": "15",
           "NOTIFIER_SLOT_LEASE_SECONDS": "20"}


Cli = Callable[..., Result]


@pytest.fixture
def cli(stack_env: dict[str, str]) -> Cli:
    """Run ``notifier ARGS...`` in-process with the stack's settings (as they are at the
    call); ``input`` goes to stdin."""
    from notifier.cli import main

    def run(*args: Any, input: str | None = None) -> Result:
        env = {k: v for k, v in stack_env.items() if k.startswith("NOTIFIER_")}
        return CliRunner().invoke(main, [str(a) for a in args], env=env, input=input)

    return run


@pytest.fixture
def stack(stack_env: dict[str, str], tmp_path: Path) -> Iterator[Stack]:
    running = Stack(stack_env, tmp_path)
    yield running
    # The test is over: what a warm shutdown would finish (two seconds a worker) is looked at
    # by no one, and the next test starts on an emptied broker, Redis and database.
    running.stop(signal.SIGKILL)


@pytest.fixture
def database(stack: Stack) -> Iterator[Database]:
    """The stack's database, reached directly (a folder's conftest or a module may override it,
    with the orgs its tests need)."""
    opened = Database(stack.settings.database_url)
    yield opened
    opened.dispose()


# Where the tests' webhooks may point: their receivers are on loopback, and nothing else is.
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


def create_webhook(db: Database, catalog: Any, vault: Any, *, org_id: int, name: str, url: str,
                   event_names: list[str] | tuple[str, ...], now_ms: int,
                   headers: dict[str, str] | None = None, max_allowed_connections: int = 10,
                   sla_in_seconds: int = 3600, active: bool = True) -> tuple[str, str]:
    """A webhook made through the one save path (``notifier.webhooks.create``, every rule of
    the API's), with Python arguments; returns ``(webHookId, secret)``. Loopback is allowed."""
    from notifier import webhooks

    context = webhooks.Context(db, catalog, vault, allowed_networks=LOOPBACK)
    saved = webhooks.create(context, org_id, {
        "name": name, "webHookUrl": url, "eventNames": list(event_names),
        "webHookHeaders": dict(headers or {}), "maxAllowedConnections": max_allowed_connections,
        "slaInSeconds": sla_in_seconds, "active": active}, now_ms=now_ms)
    assert saved.secret is not None
    return saved.view["webHookId"], saved.secret

