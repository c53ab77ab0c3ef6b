"""The benchmark's receiver (bench/receiver.py): what the soak relies on, on 127.0.0.1 only."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import requests

from bench.receiver import Receiver, Request
from tests.conftest import wait_until


def _post(sock: socket.socket, body: bytes = b"{}", webhook_id: str = "") -> None:
    head = f"POST /hook HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
    if webhook_id:
        head += f"webhook-id: {webhook_id}\r\n"
    sock.sendall(head.encode() + b"\r\n" + body)


def test_records_each_request_with_its_path_webhook_id_and_sent_time(tmp_path: Path) -> None:
    with Receiver(2, record=tmp_path / "requests") as receiver, requests.Session() as session:
        session.trust_env = False
        for i in range(4):
            body = json.dumps({"data": {"benchSentAtUs": 1000 + i}}, separators=(",", ":"))
            session.post(receiver.url(f"/soak/{i % 2}"), data=body, timeout=5,
                         headers={"webhook-id": f"msg_{i}"}).raise_for_status()
        session.post(receiver.url("/none"), data=b"{}", timeout=5).raise_for_status()
        got = sorted(receiver.records(), key=lambda r: r.webhook_id)
    assert [(r.path, r.webhook_id, r.sent_us) for r in got] == [
        ("/none", "-", 0), ("/soak/0", "msg_0", 1000), ("/soak/1", "msg_1", 1001),
        ("/soak/0", "msg_2", 1002), ("/soak/1", "msg_3", 1003)]
    assert all(isinstance(r, Request) and r.arrived_us > 1_000_000_000_000_000 for r in got)


def test_answers_with_the_status_it_was_given() -> None:
    with Receiver(1, status=500) as receiver:
        response = requests.post(receiver.url(), data=b"{}", timeout=5)
    assert (response.status_code, response.text) == (500, "ok")


def test_trickles_one_byte_at_a_time() -> None:
    with Receiver(1, trickle=0.05) as receiver, socket.create_connection(
            ("127.0.0.1", receiver.port), timeout=5) as sock:
        _post(sock)
        started, chunks = time.monotonic(), []
        while len(chunks) < 12:
            chunks.append(sock.recv(100))
        took = time.monotonic() - started
    assert b"".join(chunks) == b"HTTP/1.1 200"
    assert {len(chunk) for chunk in chunks} == {1}
    assert took >= 11 * 0.05  # eleven waits between twelve bytes, at least
    assert receiver.count == 1  # counted as it arrived: the answer never ends


def _answered(record: Path) -> int:
    """Requests whose answers went, or whose connections closed first, as the receiver's
    answers logs (``record``) say so far."""
    lines = []
    for file in record.glob("answers-*.log"):
        text = file.read_text()
        lines += text[:text.rfind("\n") + 1].splitlines()  # (a line being written: next time)
    return sum(int(line.split(" ")[1]) for line in lines)


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_a_delayed_answer_goes_to_no_later_connection_on_the_same_descriptor() -> None:
    with Receiver(1, delay=0.5) as receiver:
        (pid,) = receiver.pids
        idle = _open_fds(pid)
        early = socket.create_connection(("127.0.0.1", receiver.port), timeout=5)
        _post(early)
        wait_until(lambda: _open_fds(pid) == idle + 1, 5, "the receiver to accept it")
        early.close()  # gone before its answer
        wait_until(lambda: _open_fds(pid) == idle, 5, "the receiver to close the early connection")
        later = socket.create_connection(("127.0.0.1", receiver.port), timeout=5)  # its fd again
        last = socket.create_connection(("127.0.0.1", receiver.port), timeout=5)
        _post(last)
        # Answers go out in the order they were due: once the last one's came, the early one's
        # time has passed.
        assert last.recv(100).startswith(b"HTTP/1.1 200")
        later.setblocking(False)
        try:
            stray = later.recv(100)
        except BlockingIOError:
            stray = b""
        later.close()
        last.close()
    assert stray == b""


def test_counts_the_most_requests_in_flight_at_once_from_their_arrivals_and_answers(
        tmp_path: Path) -> None:
    record = tmp_path / "requests"
    with Receiver(2, delay=0.2, record=record) as receiver:
        socks = [socket.create_connection(("127.0.0.1", receiver.port), timeout=5)
                 for _ in range(3)]
        for sock in socks:  # three at once, over both processes
            _post(sock)
        for sock in socks:
            assert sock.recv(100).startswith(b"HTTP/1.1 200")
        for _ in range(3):  # one after the other: one at a time
            _post(socks[0])
            assert socks[0].recv(100).startswith(b"HTTP/1.1 200")
        answered = _answered(record)  # (each logged before its answer went)
        gone = socket.create_connection(("127.0.0.1", receiver.port), timeout=5)
        _post(gone, webhook_id="msg_gone")
        wait_until(lambda: any(r.webhook_id == "msg_gone" for r in receiver.records()), 5,
                   "the receiver to record it")
        gone.close()  # before its answer: it is over, however long its answer was due
        # Its end logged, at the close or at its answer if that came first: a receiver that
        # logged neither would count it open from here on, and this wait fails.
        wait_until(lambda: _answered(record) == answered + 1, 5,
                   "the receiver to log the early request's end")
        for sock in socks:
            _post(sock)
        for sock in socks:
            assert sock.recv(100).startswith(b"HTTP/1.1 200")
        peak = receiver.in_flight_peak()
        for sock in socks:
            sock.close()
    assert peak == 3
