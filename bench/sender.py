"""What the whole-request deadline costs on the hot path: ``python -m bench.sender [--posts N]
[--repeat R]``.

One ``HttpSender`` POSTs ``--posts`` times in a loop over one keep-alive connection to the bench
receiver on 127.0.0.1, with its deadline off (``deadline=None``) and on (30 s, the watchdog
armed and disarmed per request), runs alternating; the median of each is reported, in
microseconds a POST (wall time and this process's CPU time), beside a loop of arm/disarm alone.
Then a tenth as many POSTs to a receiver that answers in two writes with Nagle's algorithm on
(head, then body: Python's ``http.server`` and the JDK's ``HttpServer`` do), where each answer's
body waits for the head's acknowledgement unless the sender asks for it at once.
"""

from __future__ import annotations

import argparse
import ipaddress
import statistics
import time

from bench.receiver import Receiver
from notifier.sender import _WATCHDOG, HttpSender, OutboundRequest

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)


def _posts(url: str, posts: int, deadline: float | None) -> tuple[float, float]:
    """(wall time, CPU time of this process, its watchdog thread included) in microseconds a POST."""
    sender = HttpSender(timeout=(5.0, 5.0), max_response_bytes=1024, deadline=deadline,
                        allowed_networks=LOOPBACK)
    request = OutboundRequest(url, {"content-type": "application/json"}, b'{"a":1}')
    sender.send(request)  # the connection, made before the clock starts
    started, cpu = time.perf_counter(), time.process_time()
    for _ in range(posts):
        result = sender.send(request)
        assert result.status_code == 200, result
    took, cpu_took = time.perf_counter() - started, time.process_time() - cpu
    sender.close()
    return took / posts * 1e6, cpu_took / posts * 1e6


def _arm_disarm(times: int) -> float:
    started = time.perf_counter()
    for _ in range(times):
        _WATCHDOG.disarm(_WATCHDOG.arm(30.0))
    return (time.perf_counter() - started) / times * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.sender", description=__doc__)
    parser.add_argument("--posts", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    options = parser.parse_args()
    off: list[tuple[float, float]] = []
    on: list[tuple[float, float]] = []
    with Receiver(processes=1) as receiver:
        for _ in range(options.repeat):
            off.append(_posts(receiver.url(), options.posts, None))
            on.append(_posts(receiver.url(), options.posts, 30.0))
    for what, index in (("wall", 0), ("CPU", 1)):
        print(f"{options.posts} POSTs x {options.repeat}, median {what} us/POST: deadline off "
              f"{statistics.median(r[index] for r in off):.1f}, "
              f"on {statistics.median(r[index] for r in on):.1f}")
    print(f"arm + disarm alone: {_arm_disarm(100_000):.2f} us")
    posts = max(1, options.posts // 10)
    with Receiver(processes=1, split=True) as split:
        walls = [_posts(split.url(), posts, 30.0)[0] for _ in range(options.repeat)]
    print(f"{posts} POSTs x {options.repeat} to a receiver answering in two writes with Nagle's "
          f"algorithm on, median wall us/POST: {statistics.median(walls):.1f}")


if __name__ == "__main__":
    main()
