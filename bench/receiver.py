"""A fast HTTP/1.1 keep-alive receiver: N processes on one port (SO_REUSEPORT), each an epoll loop.

Every request is answered ``200`` with a 2-byte body and counted in a shared array (one slot per
process, so no lock). It parses just enough HTTP: headers up to a blank line, a Content-Length body.

A body holding ``"benchSentAtUs":<epoch microseconds>`` (found with one ``bytes.find``, not a JSON
parse) has its latency (arrival - sent, in ms) stored in a shared array, one region per process.
``delay`` (seconds) answers every request that much later without blocking other connections;
``status`` is the status every answer carries; ``trickle`` (seconds) answers one byte at a time,
that far apart, for as long as the client listens (a body that never ends), each request counted
when it arrives. ``split`` answers in two writes, the head and then the body, with Nagle's
algorithm left on, as Python's ``http.server`` and the JDK's ``HttpServer`` do. ``record`` (a
folder) keeps one line per request (arrival and sent-at in epoch microseconds, path,
``webhook-id``) in a file per process: see ``Receiver.records``; and, unless trickling, one line
per answer (when it went, how many requests it answered), from which ``Receiver.in_flight_peak``
counts the most requests open at once across the processes.
"""

from __future__ import annotations

import heapq
import itertools
import multiprocessing as mp
import os
import select
import signal
import socket
import time
from dataclasses import dataclass
from http import HTTPStatus
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from typing import Any, NamedTuple

__all__ = ["Receiver", "Request"]

SENT_AT = b'"benchSentAtUs":'
WEBHOOK_ID = b"\r\nwebhook-id:"
LATENCY_SLOTS = 400_000  # latencies kept per receiver process (a ring past that)


def _listen(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0


def _sent_at_us(buf: bytes, start: int, stop: int) -> int:
    at = buf.find(SENT_AT, start, stop)
    if at < 0:
        return 0
    at += len(SENT_AT)
    end = at
    while end < stop and 48 <= buf[end] <= 57:
        end += 1
    return int(buf[at:end]) if end > at else 0


def _webhook_id(head: bytes) -> bytes:
    at = head.lower().find(WEBHOOK_ID)
    if at < 0:
        return b"-"
    at += len(WEBHOOK_ID)
    end = head.find(b"\r\n", at)
    return head[at:end if end >= 0 else len(head)].strip() or b"-"


@dataclass(frozen=True)
class _Answers:
    """How a receiver answers: after ``delay`` s, with ``status``, or trickled (see the module)."""

    delay: float = 0.0
    status: int = 200
    trickle: float = 0.0
    record: str = ""
    split: bool = False

    def response(self) -> bytes:
        line = f"HTTP/1.1 {self.status} {HTTPStatus(self.status).phrase}\r\n".encode()
        if self.trickle:
            return line + b"Content-Type: text/plain\r\nContent-Length: 1000000000\r\n\r\n"
        return line + b"Content-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"


def _serve(port: int, counts: Any, slot: int, ready: Synchronized, latencies: Any,
           recorded: Any, answers: _Answers) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    listener = _listen(port)
    poll = select.epoll()
    poll.register(listener.fileno(), select.EPOLLIN)
    conns: dict[int, socket.socket] = {}
    buffers: dict[int, bytes] = {}
    log = (os.open(Path(answers.record) / f"requests-{slot}.log",
                   os.O_WRONLY | os.O_CREAT | os.O_APPEND) if answers.record else -1)
    ended = (os.open(Path(answers.record) / f"answers-{slot}.log",
                     os.O_WRONLY | os.O_CREAT | os.O_APPEND)
             if answers.record and not answers.trickle else -1)
    response = answers.response()
    head_ends = response.index(b"\r\n\r\n") + 4  # where a split answer's second write begins
    with ready.get_lock():
        ready.value += 1
    served = 0
    noted = 0
    base = slot * LATENCY_SLOTS
    # (due at, tie-breaker, connection, replies to send; or, trickling, the next byte's offset).
    # The connection itself, not its fd: a closed connection's fd is soon another's.
    due: list[tuple[float, int, socket.socket, int]] = []
    ties = itertools.count()

    def over(replies: int) -> None:
        # Stamped before the answer goes: its sender may send its next request, to another
        # process, as soon as the answer reaches it, and that one must not seem to overlap it.
        if ended >= 0 and replies:
            os.write(ended, b"%d %d\n" % (time.time_ns() // 1000, replies))

    def answer(conn: socket.socket, replies: int) -> None:
        nonlocal served
        if conns.get(conn.fileno()) is not conn:
            return  # over when its connection closed
        over(replies)
        conn.setblocking(True)
        try:
            if answers.split:
                for _ in range(replies):
                    conn.sendall(response[:head_ends])
                    conn.sendall(response[head_ends:])
            else:
                conn.sendall(response * replies)
        except OSError:
            return
        conn.setblocking(False)
        served += replies
        counts[slot] = served

    def trickle(conn: socket.socket, offset: int) -> None:
        if conns.get(conn.fileno()) is not conn:
            return
        try:
            conn.send(response[offset:offset + 1] or b"x")
        except OSError:
            return
        heapq.heappush(due, (time.monotonic() + answers.trickle, next(ties), conn, offset + 1))

    while True:
        timeout = -1.0
        if due:
            now = time.monotonic()
            while due and due[0][0] <= now:
                _, _, dconn, n = heapq.heappop(due)
                (trickle if answers.trickle else answer)(dconn, n)
            timeout = max(0.0, due[0][0] - now) if due else -1.0
        for fd, _ in poll.poll(timeout):
            if fd == listener.fileno():
                while True:
                    try:
                        conn, _ = listener.accept()
                    except BlockingIOError:
                        break
                    conn.setblocking(False)
                    if not answers.split:
                        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    conns[conn.fileno()] = conn
                    buffers[conn.fileno()] = b""
                    poll.register(conn.fileno(), select.EPOLLIN)
                continue
            conn = conns[fd]
            try:
                data = conn.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                poll.unregister(fd)
                # Its requests still waiting for their answers are over: no one waits for them.
                over(sum(n for _, _, waiting, n in due if waiting is conn)
                     if ended >= 0 and answers.delay > 0 else 0)
                conn.close()
                del conns[fd], buffers[fd]
                continue
            buf = buffers[fd] + data
            replies = 0
            lines: list[bytes] = []
            while True:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    break
                total = end + 4 + _content_length(buf[:end])
                if len(buf) < total:
                    break
                sent = _sent_at_us(buf, end + 4, total)
                now_us = time.time_ns() // 1000
                if sent:
                    latencies[base + noted % LATENCY_SLOTS] = (now_us - sent) / 1000
                    noted += 1
                    recorded[slot] = noted
                if log >= 0:
                    path = buf[:buf.find(b"\r\n")].split(b" ")[1]
                    lines.append(b"%d %d %s %s\n" % (now_us, sent, path, _webhook_id(buf[:end])))
                buf = buf[total:]
                replies += 1
            buffers[fd] = buf
            if lines:
                os.write(log, b"".join(lines))
            if replies:
                if answers.trickle:
                    served += replies  # counted as they arrive: the answer never ends
                    counts[slot] = served
                    trickle(conn, 0)
                elif answers.delay > 0:
                    heapq.heappush(due, (time.monotonic() + answers.delay, next(ties), conn,
                                         replies))
                else:
                    answer(conn, replies)


class Request(NamedTuple):
    """One request as ``record`` kept it."""

    arrived_us: int
    sent_us: int  # the body's benchSentAtUs, 0 without one
    path: str
    webhook_id: str


class Receiver:
    """Start with ``with Receiver(processes) as r:``; ``r.count`` is requests answered so far."""

    def __init__(self, processes: int = 2, port: int = 0, delay: float = 0.0, status: int = 200,
                 trickle: float = 0.0, record: Path | None = None, split: bool = False) -> None:
        self.processes = processes
        self.record = record
        if record is not None:
            record.mkdir(parents=True, exist_ok=True)
        answers = _Answers(delay, status, trickle, str(record or ""), split)
        if port == 0:
            probe = _listen(0)
            port = probe.getsockname()[1]
            probe.close()
        self.port = port
        ctx = mp.get_context("fork")
        self._counts = ctx.RawArray("q", processes)
        self._ready = ctx.Value("i", 0)
        self._latencies = ctx.RawArray("d", processes * LATENCY_SLOTS)
        self._recorded = ctx.RawArray("q", processes)
        self._procs = [ctx.Process(target=_serve, args=(port, self._counts, i, self._ready,
                                                        self._latencies, self._recorded, answers),
                                   daemon=True, name=f"receiver-{i}") for i in range(processes)]

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self._procs if proc.pid is not None]

    @property
    def count(self) -> int:
        return sum(self._counts)

    def mark(self) -> list[int]:
        """Per-process latency counters now; pass to ``latencies`` to get those recorded since."""
        return list(self._recorded)

    def latencies(self, since: list[int]) -> list[float]:
        """Latencies (ms) recorded since ``mark()``: the last LATENCY_SLOTS of each process."""
        out: list[float] = []
        for slot, (before, now) in enumerate(zip(since, self._recorded, strict=True)):
            base = slot * LATENCY_SLOTS
            out.extend(self._latencies[base + i % LATENCY_SLOTS]
                       for i in range(max(before, now - LATENCY_SLOTS), now))
        return out

    def records(self) -> list[Request]:
        """Every request recorded so far (``record`` given), in no particular order."""
        out: list[Request] = []
        for file in sorted(self.record.glob("requests-*.log")) if self.record else []:
            text = file.read_text()
            # Up to the last newline: a line being written is read whole next time.
            for line in text[:text.rfind("\n") + 1].splitlines():
                arrived, sent, path, webhook_id = line.split(" ")
                out.append(Request(int(arrived), int(sent), path, webhook_id))
        return out

    def in_flight_peak(self) -> int:
        """The most requests open at once so far (``record`` given, not trickling): each from
        its arrival until its answer went, or its connection closed, across the processes."""
        changes: list[tuple[int, int]] = [(r.arrived_us, 1) for r in self.records()]
        for file in sorted(self.record.glob("answers-*.log")) if self.record else []:
            text = file.read_text()
            for line in text[:text.rfind("\n") + 1].splitlines():
                at, replies = line.split(" ")
                changes.append((int(at), -int(replies)))
        # At the same microsecond an answer goes first: what it ended could not overlap what
        # its sender sent next.
        changes.sort()
        peak = open_now = 0
        for _, change in changes:
            open_now += change
            peak = max(peak, open_now)
        return peak

    def wait_for(self, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.count < count:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.002)
        return True

    def __enter__(self) -> Receiver:
        for proc in self._procs:
            proc.start()
        deadline = time.monotonic() + 10
        while self._ready.value < self.processes:
            if time.monotonic() > deadline:
                raise RuntimeError("receiver did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *_: object) -> None:
        for proc in self._procs:
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.join(timeout=5)
