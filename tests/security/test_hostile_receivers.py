"""Receivers that fight back, through the real path: a real worker POSTs to raw TCP servers on
127.0.0.1 that trickle, stall, reset, flood, bomb or lie. For each, every attempt is recorded
with its reason, ends by the whole-request deadline (NOTIFIER_HTTP_DEADLINE=2 in the stack), and
never overlaps another send of the same delivery or exceeds ``maxAllowedConnections=1``; and
another org's delivery gets through meanwhile."""

from __future__ import annotations

import gzip
import itertools
import select
import socket
import struct
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator

import pytest

from notifier.db import Database
from tests.conftest import Receiver, Stack, wait_until
from tests.security.conftest import OTHER_ORG, attempts_of_hook, make_hook, send

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

DEADLINE = 2.0  # the stack's NOTIFIER_HTTP_DEADLINE
SLACK = 1.0     # scheduling on a loaded machine; far below a trickle's minute
GZIP_BOMB = gzip.compress(bytes(200 * 2**20), compresslevel=9)  # 200 MiB of zeros, ~200 KiB


class Hostile:
    """A raw HTTP/1.1 server: reads each request, then answers as ``behaviours[path]`` says,
    recording connections open per path and every webhook-id sent while an earlier send of
    it was still open."""

    def __init__(self, behaviours: dict[str, Callable[[socket.socket], None]]) -> None:
        self.behaviours = behaviours
        self.lock = threading.Lock()
        self.open: dict[str, int] = defaultdict(int)
        self.peak: dict[str, int] = defaultdict(int)
        self.open_ids: dict[str, int] = defaultdict(int)
        self.overlaps: list[str] = []
        self.requests: dict[str, int] = defaultdict(int)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                head += chunk
            lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
            path = lines[0].split(" ")[1]
            headers = {k.strip().lower(): v.strip() for k, _, v in
                       (line.partition(":") for line in lines[1:])}
            webhook_id = headers.get("webhook-id", "")
            with self.lock:
                self.requests[path] += 1
                self.open[path] += 1
                self.peak[path] = max(self.peak[path], self.open[path])
                if self.open_ids[webhook_id]:
                    self.overlaps.append(webhook_id)
                self.open_ids[webhook_id] += 1
            try:
                self.behaviours[path](conn)
            except OSError:
                pass  # the sender cut the connection: what these receivers are for
            finally:
                with self.lock:
                    self.open[path] -= 1
                    self.open_ids[webhook_id] -= 1

    def close(self) -> None:
        self.server.close()


def _closed_within(conn: socket.socket, seconds: float) -> bool:
    """Whether the sender closed (or cut) the connection within ``seconds``: the server counts
    a connection open until it sees that, not until its next write happens to fail."""
    readable, _, _ = select.select([conn], [], [], seconds)
    return bool(readable) and not conn.recv(65536)


def _trickle(conn: socket.socket, prefix: bytes) -> None:
    conn.sendall(prefix)
    # One byte every 0.3 s: no read ever waits its 1 s read timeout.
    while not _closed_within(conn, 0.3):
        conn.sendall(b"x")


def trickled_headers(conn: socket.socket) -> None:
    _trickle(conn, b"HTTP/1.1 200 OK\r\nX-Slow: ")


def trickled_body(conn: socket.socket) -> None:
    _trickle(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n")


def never_answering(conn: socket.socket) -> None:
    _closed_within(conn, 30)


def reset(conn: socket.socket) -> None:
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def gigabyte(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % 2**30)
    block = b"y" * 65536
    for _ in range(2**30 // len(block)):  # streamed: never built in memory, here or there
        conn.sendall(block)


def gzip_bomb(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n"
                 % len(GZIP_BOMB) + GZIP_BOMB)


def garbage(conn: socket.socket) -> None:
    conn.sendall(b"\x00\xff\x13 this is not HTTP \xfe\r\n\r\n")


def redirect_to(target: str) -> Callable[[socket.socket], None]:
    def answer(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 302 Found\r\nLocation: %s\r\nContent-Length: 0\r\n"
                     b"Connection: close\r\n\r\n" % target.encode())
    return answer


@pytest.fixture
def hostile(receiver: Receiver) -> Iterator[Hostile]:
    server = Hostile({
        "/trickled-headers": trickled_headers,
        "/trickled-body": trickled_body,
        "/never-answering": never_answering,
        "/reset": reset,
        "/gigabyte": gigabyte,
        "/gzip-bomb": gzip_bomb,
        "/garbage": garbage,
        "/redirect": redirect_to(receiver.url("/internal")),
    })
    yield server
    server.close()


# What each attempt of each receiver must be recorded as: (outcome, error class or status).
EXPECTED = {
    "/trickled-headers": {("retrying", "DeadlineExceeded")},
    "/trickled-body": {("retrying", "DeadlineExceeded")},
    "/never-answering": {("retrying", "ReadTimeout"), ("retrying", "ConnectionError")},
    "/reset": {("retrying", "ConnectionError")},
    "/gigabyte": {("delivered", 200)},
    "/gzip-bomb": {("delivered", 200)},
    "/garbage": {("retrying", "ConnectionError")},
    "/redirect": {("failed", 302)},
}
RETRIED = [path for path, kinds in EXPECTED.items() if ("retrying" in {k for k, _ in kinds})]


def test_hostile_receivers_are_bounded_and_recorded(
        stack: Stack, receiver: Receiver, hostile: Hostile, database: Database) -> None:
    hooks = {path: make_hook(stack, database, hostile.url(path), name=path.strip("/"),
                             max_allowed_connections=1) for path in EXPECTED}
    make_hook(stack, database, receiver.url("/other-org"), org_id=OTHER_ORG, name="other")
    stack.worker(concurrency=2)
    stack.beat()  # brings due retries back

    send(stack, customer=1)
    send(stack, customer=2)
    sent_at = time.monotonic()
    send(stack, org_id=OTHER_ORG)
    (other,) = receiver.wait_for(1, "/other-org", timeout=30)
    other_waited = other.at - sent_at

    def attempts() -> dict[str, list]:  # type: ignore[type-arg]
        return {path: attempts_of_hook(database, hook) for path, hook in hooks.items()}

    # Every retried receiver seen at least three times: its sends of one delivery follow
    # each other, they do not pile up.
    try:
        wait_until(lambda: all(len(attempts()[p]) >= 3 for p in RETRIED), 60,
                   "three attempts at every hostile receiver")
    except BaseException:
        print({p: [(a.outcome, a.error_class or a.status_code, a.latency_ms) for a in v]
               for p, v in attempts().items()}, dict(hostile.requests))
        raise
    recorded = attempts()
    for path, kinds in EXPECTED.items():
        for attempt in recorded[path]:
            kind = attempt.error_class or attempt.status_code
            assert (attempt.outcome, kind) in kinds, (path, attempt.outcome, kind,
                                                      attempt.error_message)
            assert attempt.latency_ms <= (DEADLINE + SLACK) * 1000, (path, attempt.latency_ms)
            assert len(attempt.response_excerpt or "") <= stack.settings.max_response_bytes
    for path in RETRIED:  # and as the sender recorded them: each send ended before the next
        by_delivery = defaultdict(list)
        for attempt in recorded[path]:
            by_delivery[attempt.delivery_id].append(attempt)
        for sends in by_delivery.values():
            for earlier, later in itertools.pairwise(sends):
                assert earlier.started_at_ms + earlier.latency_ms <= later.started_at_ms, path
    with hostile.lock:
        assert dict(hostile.peak) and max(hostile.peak.values()) == 1, dict(hostile.peak)
        assert hostile.overlaps == []
    assert receiver.at("/internal") == []
    print(f"another org's delivery arrived {other_waited:.2f}s after it was published")
    assert other_waited < 2 * (DEADLINE + SLACK)
