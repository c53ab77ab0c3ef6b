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
    recording the connections of each path the sender held open at once, and every webhook-id
    sent while the sender held an earlier send of it open.

    A connection counts as open until the sender's FIN or reset is in (its TCP state), not until
    this server's thread for it gets round to finishing: after a short answer that thread may
    wait for the GIL while the sender, done, opens its next connection."""

    def __init__(self, behaviours: dict[str, Callable[[socket.socket], None]]) -> None:
        self.behaviours = behaviours
        self.lock = threading.Lock()
        self.live: list[tuple[str, str, socket.socket]] = []  # (path, webhook-id, connection)
        self.peak: dict[str, int] = defaultdict(int)
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
            entry = (path, webhook_id, conn)
            with self.lock:
                self.requests[path] += 1
                # Under the lock a listed connection is not closed yet: its thread takes it
                # off the list (below) before ``with conn`` closes it.
                held = [(p, w) for p, w, c in self.live if _held_by_sender(c)]
                self.peak[path] = max(self.peak[path], 1 + sum(p == path for p, _ in held))
                if any(w == webhook_id for _, w in held):
                    self.overlaps.append(webhook_id)
                self.live.append(entry)
            try:
                self.behaviours[path](conn)
            except OSError:
                pass  # the sender cut the connection: what these receivers are for
            finally:
                with self.lock:
                    self.live.remove(entry)

    def close(self) -> None:
        self.server.close()


_TCP_ESTABLISHED = 1  # tcp_info's first byte, the connection's state (linux/tcp_states.h)


def _held_by_sender(conn: socket.socket) -> bool:
    """Whether the sender still holds ``conn``: no FIN or reset of its has come in. Linux's
    TCP_INFO tells even with the request's body unread, which a peek at the data would not."""
    return conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == _TCP_ESTABLISHED


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


def test_a_connection_counts_as_open_while_the_sender_holds_it() -> None:
    """The evidence the test above reads: a connection the sender closed no longer counts,
    even while this server's thread for it has not finished (as when it waits for the GIL);
    one the sender still holds does, and so does a send of a webhook-id it still holds."""
    finish = threading.Event()

    def answered_then_held_up(conn: socket.socket) -> None:
        garbage(conn)
        finish.wait(30)

    server = Hostile({"/p": answered_then_held_up})

    def request(webhook_id: bytes) -> socket.socket:
        conn = socket.create_connection(("127.0.0.1", server.port))
        conn.sendall(b"POST /p HTTP/1.1\r\nwebhook-id: %s\r\nContent-Length: 2\r\n\r\n{}"
                     % webhook_id)
        assert conn.recv(65536)  # answered: counted
        return conn

    try:
        request(b"a").close()
        with request(b"a"):
            assert (dict(server.peak), server.overlaps) == ({"/p": 1}, [])
            with request(b"b"):
                assert (dict(server.peak), server.overlaps) == ({"/p": 2}, [])
                with request(b"a"):
                    assert (dict(server.peak), server.overlaps) == ({"/p": 3}, ["a"])
    finally:
        finish.set()
        server.close()
