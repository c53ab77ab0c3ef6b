"""The soak (issue 13): a steady publish rate over 10 webhooks, three of them bad, for a while.

Seven healthy webhooks answer at once; beside them one answers after 2 s, one always answers 500
and one trickles its answer a byte a second, past notifier's whole-request deadline
(``NOTIFIER_HTTP_DEADLINE``, 30 s). Every event goes to all ten. Then, in a stack of their own,
the seven healthy ones alone at the same rate. Reported: deliveries lost (an event published
whose delivery to some healthy webhook never arrived), duplicates (a ``webhook-id`` that
arrived twice at a webhook answering 2xx), the healthy webhooks' p99 from publish to arrival
beside the bad ones and without them, and the workers' RSS (every worker process summed) at
each minute of the soak.

The healthy receiver records every request's ``webhook-id`` (bench/receiver.py, ``record``), so
a loss or a duplicate is counted per webhook from what arrived, not from notifier's own rows.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from bench import extra, run
from bench.receiver import Receiver, Request

HEALTHY = 7
SLOW_SECONDS = 2.0  # the slow webhook's answer
TRICKLE_SECONDS = 1.0  # between two bytes of the trickling answer
BAD_CONNECTIONS = 2  # maxAllowedConnections of each bad webhook (as in the isolation scenario)
BASELINE_SECONDS = 60.0  # the healthy-alone phase lasts this long at most
RSS_EVERY = 60.0  # seconds between two samples of the workers' RSS
ROLES = ("slow", "500", "trickle")  # the bad webhooks, hook-7 to hook-9


@dataclass
class Phase:
    """What one phase of offered load left behind at the healthy webhooks."""

    published: int
    lost: int
    duplicates: int
    latencies: list[float]  # ms, events published after the warm-up
    warm_up: list[float]  # ms, events published during the warm-up
    lag: float  # how far the publisher fell behind its schedule at most (s)
    rss: list[tuple[float, int]]  # (seconds into the measured load, bytes)


@dataclass
class Result:
    lost: int
    text: str  # lines to print
    note: str  # the summary line


def _publish_steadily(rate: float, warm_up: float, seconds: float, worker_pids: list[int],
                      rss_every: float) -> tuple[int, int, float, list[tuple[float, int]]]:
    """Publish ``rate`` events/s for ``warm_up + seconds``; the workers' RSS every ``rss_every``
    s of the measured part. Returns (events, measured part's start in epoch us, lag, RSS)."""
    from notifier import publish

    count = int(rate * (warm_up + seconds))
    t0 = time.monotonic()
    measured_from_us = time.time_ns() // 1000 + int(warm_up * 1e6)
    marks = [warm_up + rss_every * k for k in range(1, int(seconds / rss_every + 1e-9) + 1)]
    rss: list[tuple[float, int]] = []
    lag = 0.0
    for i in range(count):
        at = i / rate
        while marks and marks[0] <= at:
            rss.append((marks.pop(0) - warm_up, run.tree_rss(worker_pids)))
        wait = t0 + at - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        else:
            lag = max(lag, -wait)
        publish(run.EVENT, extra.bench_data(), org_id=run.ORG, broker_url=run.NOTIFIER_BROKER)
    for mark in marks:  # the last minute ends as the last event goes out
        wait = t0 + mark - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        rss.append((mark - warm_up, run.tree_rss(worker_pids)))
    return count, measured_from_us, lag, rss


def _arrived(requests: list[Request], paths: list[str]) -> dict[str, list[str]]:
    ids: dict[str, list[str]] = {path: [] for path in paths}
    for request in requests:
        if request.path in ids:
            ids[request.path].append(request.webhook_id)
    return ids


def _wait_for_all(receiver: Receiver, paths: list[str], published: int) -> dict[str, list[str]]:
    """Until every path has ``published`` distinct webhook-ids, or the drain's deadline."""
    deadline = time.monotonic() + 60 + published * len(paths) / 50
    while True:
        ids = _arrived(receiver.records(), paths)
        if all(len(set(got)) >= published for got in ids.values()) or time.monotonic() > deadline:
            return ids
        time.sleep(0.5)


def _statuses() -> dict[str, Counter[str]]:
    """Deliveries by status, per webhook name."""
    engine = sa.create_engine(run.PG_URL)
    try:
        with engine.connect() as conn:
            rows = conn.exec_driver_sql(
                "SELECT w.name, d.status, count(*) FROM deliveries d JOIN webhooks w "
                "ON w.id = d.webhook_id GROUP BY w.name, d.status").all()
    finally:
        engine.dispose()
    out: dict[str, Counter[str]] = {}
    for name, status, count in rows:
        out.setdefault(name, Counter())[status] = count
    return out


def _open_healthy(published: int) -> int:
    """Healthy deliveries not yet recorded delivered, once their attempts have had 30 s."""
    deadline = time.monotonic() + 30
    while True:
        statuses = _statuses()
        left = sum(published - statuses.get(f"hook-{i}", Counter())["delivered"]
                   for i in range(HEALTHY))
        if left <= 0 or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def _phase(receiver: Receiver, procs: run.Processes, prefix: str, rate: float, warm_up: float,
           seconds: float, rss_every: float) -> Phase:
    paths = [f"{prefix}/{i}" for i in range(HEALTHY)]
    published, measured_from_us, lag, rss = _publish_steadily(
        rate, warm_up, seconds, run.worker_pids(procs), rss_every)
    ids = _wait_for_all(receiver, paths, published)
    lost = sum(max(0, published - len(set(got))) for got in ids.values())
    duplicates = sum(len(got) - len(set(got)) for got in ids.values())
    latencies: list[float] = []
    cold: list[float] = []
    for request in receiver.records():
        if request.path in ids and request.sent_us:
            ms = (request.arrived_us - request.sent_us) / 1000
            (latencies if request.sent_us >= measured_from_us else cold).append(ms)
    return Phase(published, lost, duplicates, latencies, cold, lag, rss)


def _by_status(counts: Counter[str] | None) -> str:
    return ", ".join(f"{n} {status}" for status, n in (counts or Counter()).most_common()) or "none"


def _mib(value: int) -> str:
    return f"{value / 2**20:.0f}"


def soak(folder: Path, concurrency: int, seconds: float, rate: float, connections: int,
         warm_up: float, receiver_processes: int = 2) -> Result:
    """The soak, then the healthy webhooks alone for ``min(seconds, BASELINE_SECONDS)``."""
    lines: list[str] = []
    with Receiver(receiver_processes, record=folder / "healthy-requests") as healthy, \
            contextlib.ExitStack() as bad:
        slow = bad.enter_context(Receiver(1, delay=SLOW_SECONDS, record=folder / "slow-requests"))
        failing = bad.enter_context(Receiver(1, status=500))
        trickling = bad.enter_context(Receiver(1, trickle=TRICKLE_SECONDS))
        hooks = [(run.ORG, healthy.url(f"/soak/{i}"), connections) for i in range(HEALTHY)]
        hooks += [(run.ORG, slow.url("/slow"), BAD_CONNECTIONS),
                  (run.ORG, failing.url("/500"), BAD_CONNECTIONS),
                  (run.ORG, trickling.url("/trickle"), BAD_CONNECTIONS)]
        (folder / "soak").mkdir()
        with extra.stack(folder / "soak", concurrency, hooks) as (procs, _, _):
            beside = _phase(healthy, procs, "/soak", rate, warm_up, seconds,
                            min(RSS_EVERY, seconds / 2))
            left_open = _open_healthy(beside.published)
            statuses = _statuses()
            slow_ids = [r.webhook_id for r in slow.records()]
            slow_duplicates = len(slow_ids) - len(set(slow_ids))
            bad_line = (f"  the bad ones, of {beside.published} each: slow answered "
                        f"{len(set(slow_ids))} ({SLOW_SECONDS:.0f} s each, "
                        f"{BAD_CONNECTIONS} connections), 500 was tried {failing.count} times, "
                        f"trickle {trickling.count} times; their deliveries by status: "
                        + "; ".join(f"{role} {_by_status(statuses.get(f'hook-{HEALTHY + i}'))}"
                                    for i, role in enumerate(ROLES)))
            # Closed before the workers are stopped: a request still trickling would hold a
            # worker's warm shutdown up to the deadline.
            bad.close()
        baseline_seconds = min(seconds, BASELINE_SECONDS)
        (folder / "alone").mkdir()
        alone_hooks = [(run.ORG, healthy.url(f"/alone/{i}"), connections) for i in range(HEALTHY)]
        with extra.stack(folder / "alone", concurrency, alone_hooks) as (procs, _, _):
            alone = _phase(healthy, procs, "/alone", rate, warm_up, baseline_seconds,
                           baseline_seconds)

    lost = beside.lost + alone.lost
    duplicates = beside.duplicates + alone.duplicates + slow_duplicates
    due = (beside.published + alone.published) * HEALTHY
    first, last = beside.rss[0][1], beside.rss[-1][1]
    growth = (last / first - 1) * 100 if first else float("nan")
    rss = ", ".join(f"{at:.0f} s {_mib(value)}" for at, value in beside.rss)
    lines += [
        f"  healthy beside the bad ones: {extra.percentiles(beside.latencies)}; "
        f"{beside.published} events, publisher at most {beside.lag * 1000:.0f} ms behind; the "
        f"{warm_up:.0f} s warm-up: p99 {extra.p99(beside.warm_up):.1f} ms",
        f"  healthy alone ({baseline_seconds:.0f} s): {extra.percentiles(alone.latencies)}; "
        f"{alone.published} events, publisher at most {alone.lag * 1000:.0f} ms behind",
        bad_line,
        f"  lost {beside.lost} beside + {alone.lost} alone; duplicates {beside.duplicates} "
        f"healthy beside, {alone.duplicates} alone, {slow_duplicates} at the slow one; healthy "
        f"deliveries not recorded delivered after the soak: {left_open}",
        f"  worker RSS (MiB, all worker processes) at {rss}",
    ]
    ratio = extra.p99(beside.latencies) / extra.p99(alone.latencies)
    note = (f"soak {seconds:.0f} s at {rate:g} events/s over 10 webhooks (7 healthy; one answering "
            f"after {SLOW_SECONDS:.0f} s, one 500, one trickling past the deadline): {lost} lost "
            f"of {due} due, {duplicates} duplicates; healthy p99 "
            f"{extra.p99(beside.latencies):.1f} ms beside the bad ones, "
            f"{extra.p99(alone.latencies):.1f} ms alone (ratio {ratio:.2f}); worker RSS "
            f"{_mib(first)} -> {_mib(last)} MiB from {beside.rss[0][0]:.0f} s to "
            f"{beside.rss[-1][0]:.0f} s ({growth:+.1f}%, target < 10%)")
    return Result(lost, "\n".join(lines), note)
