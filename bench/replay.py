"""A large replay by selection beside live traffic to the same webhook (issue 14: "replaying
100 000 deliveries never exceeds maxAllowedConnections and never starves live deliveries").

One stack, one webhook (maxAllowedConnections = ``--max-connections``) to a receiver that answers
after ``ANSWER_DELAY`` s, so that requests overlap. ``N`` dead deliveries are written straight
into the tables (``run.write_history``, as ``bench.retention`` writes its old rows): events
of ``run.event_data()``'s size received in the last hour, each with a delivery dead after one
attempt answered 500. A live stream of ``LIVE_RATE`` events/s to the same webhook runs
throughout: a warm-up, a window without the replay, then the replay as an operator starts it,
``celery -A tasks replay --webhook ID --status dead --yes`` in a subprocess with the stack's
environment, until the last replayed delivery arrived.

Reported: the replay's drain rate (from the command's start to the last replayed arrival), the
most requests in flight at the receiver over the whole run (each from its arrival until its
answer went, ``Receiver.in_flight_peak``) against the cap, the live stream's p50/p99 without
the replay and during it (by when each live event was published), and whether each replayed
delivery arrived once (distinct ``webhook-id``s, rows delivered, attempts). A lost or duplicated
delivery (replayed or live), or more requests in flight than the cap, is a problem: the
benchmark then exits 1.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from bench import extra, run
from bench.receiver import Receiver, Request

__all__ = ["ANSWER_DELAY", "LIVE_RATE", "Result", "replay", "report"]

ANSWER_DELAY = 0.020  # s the receiver takes to answer each request
LIVE_RATE = 20.0  # live events/s to the replayed webhook, throughout
DEAD_PREFIX = "msg_dead_"  # the replayed deliveries' ids (their webhook-id)
_HOUR_MS = 3600 * 1000


@dataclass
class Result:
    text: str  # the details, printed
    line: str  # the summary line
    problems: list[str] = field(default_factory=list)  # lost, duplicated, over the cap


def fill(deliveries: int, webhook_id: str) -> float:
    """``deliveries`` events received in the last hour, each with a delivery to ``webhook_id``
    dead after one attempt answered 500; returns seconds."""
    return run.write_history(webhook_id, deliveries, events="dead-", deliveries=DEAD_PREFIX,
                             oldest_ms=time.time_ns() // 1_000_000 - _HOUR_MS,
                             spread_ms=_HOUR_MS // 2,
                             ended=run.Ended("dead", 500, "down", error="HTTP 500"))


class _Stream:
    """Events published at a fixed rate in a thread, from ``start`` until ``stop``."""

    def __init__(self, rate: float, publish: Callable[[], object]) -> None:
        self.rate = rate
        self.publish = publish
        self.published = 0
        self.late = 0.0  # s the publisher was behind its schedule at most
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="live-stream")

    def _run(self) -> None:
        t0 = time.monotonic()
        try:
            while True:
                wait = t0 + self.published / self.rate - time.monotonic()
                if wait > 0:
                    if self._stop.wait(wait):
                        return
                elif self._stop.is_set():
                    return
                else:
                    self.late = max(self.late, -wait)
                self.publish()
                self.published += 1
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        if self.error is not None:
            raise run.BenchError(f"live stream: {self.error!r}") from self.error


def _scalar(sql: str) -> int:
    engine = sa.create_engine(run.PG_URL)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text(sql)).scalar_one())
    finally:
        engine.dispose()


def _webhook_id() -> str:
    return str(run.pg_value("SELECT id FROM webhooks", run.PG_URL))


def _not_delivered() -> int:
    """Replayed deliveries not delivered yet (the index on status finds the few left)."""
    return _scalar(f"SELECT count(*) FROM deliveries WHERE status IN ('pending', 'in_flight', "
                   f"'retrying', 'dead', 'failed') AND id LIKE '{DEAD_PREFIX}%'")


def _now_us() -> int:
    return time.time_ns() // 1000


def replay(folder: Path, concurrency: int, deliveries: int, connections: int,
           warm_up: float, seconds: float, receiver_processes: int = 2) -> Result:
    """The scenario (see the module): ``warm_up`` s of live load, ``seconds`` s of it without
    the replay, then the replay of ``deliveries`` with the live load on until it drained."""
    from notifier import publish

    with Receiver(receiver_processes, delay=ANSWER_DELAY, record=folder / "requests") as receiver, \
            extra.stack(folder, concurrency,
                        [(run.ORG, receiver.url("/replay"), connections)]) as (procs, _, _):
        webhook_id = _webhook_id()
        filled = fill(deliveries, webhook_id)
        print(f"  replay: {deliveries} dead deliveries written in {filled:.1f} s; live stream "
              f"{LIVE_RATE:g} events/s to the same webhook (maxAllowedConnections "
              f"{connections}, answers after {ANSWER_DELAY * 1000:.0f} ms): {warm_up:g} s "
              f"warm-up, {seconds:g} s without the replay, then the replay ...", flush=True)
        stream = _Stream(LIVE_RATE, lambda: publish(run.EVENT, extra.bench_data(), org_id=run.ORG,
                                                   broker_url=run.NOTIFIER_BROKER))
        stream.start()
        try:
            time.sleep(warm_up)
            without_from = _now_us()
            time.sleep(seconds)
            command = ["celery", "-A", "tasks", "replay", "--webhook", webhook_id,
                       "--status", "dead", "--yes"]
            began = _now_us()
            done = subprocess.run([sys.executable, "-m", *command], env=procs.env, cwd=run.ROOT,
                                  capture_output=True, text=True, timeout=600, check=False)
            queued_in = (_now_us() - began) / 1e6
            said = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
            if done.returncode != 0:
                raise run.BenchError(f"{' '.join(command)} exited {done.returncode}: "
                                     f"{done.stdout[-1000:]}{done.stderr[-2000:]}")
            print(f"  replay: {' '.join(command[:4])} ... queued them in {queued_in:.1f} s: "
                  f"{said}", flush=True)
            deadline = time.monotonic() + 120 + deliveries / 50
            while (left := _not_delivered()) and time.monotonic() < deadline:
                time.sleep(1.0)
        finally:
            stream.stop()
        # Every live event published delivered too (or, lost, not within a minute).
        receiver.wait_for(deliveries + stream.published, 60)
        delivered_deadline = time.monotonic() + 30
        while (rows := _scalar("SELECT count(*) FROM deliveries WHERE status = 'delivered'")) \
                < deliveries + stream.published and time.monotonic() < delivered_deadline:
            time.sleep(0.2)
        replayed_rows = _scalar(f"SELECT count(*) FROM deliveries WHERE status = 'delivered' "
                                f"AND id LIKE '{DEAD_PREFIX}%'")
        replayed_attempts = _scalar(f"SELECT count(*) FROM attempts "
                                    f"WHERE delivery_id LIKE '{DEAD_PREFIX}%'")
        records = receiver.records()
        peak = receiver.in_flight_peak()
    return report(records, peak, deliveries, connections, stream.published, stream.late, began,
                   queued_in, left, without_from, rows, replayed_rows, replayed_attempts)


def _p50(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else float("nan")


def report(records: list[Request], peak: int, deliveries: int, connections: int,
            published: int, late: float, began: int, queued_in: float, left: int,
            without_from: int, rows: int, replayed_rows: int, replayed_attempts: int) -> Result:
    """What the run showed (``began``: the replay command's start, ``without_from``: the window
    without it, epoch microseconds), and its problems."""
    replayed = [r for r in records if r.webhook_id.startswith(DEAD_PREFIX)]
    live = [r for r in records if not r.webhook_id.startswith(DEAD_PREFIX)]
    replayed_ids, live_ids = {r.webhook_id for r in replayed}, {r.webhook_id for r in live}
    problems: list[str] = []
    if len(replayed_ids) < deliveries or replayed_rows < deliveries:
        problems.append(f"replayed deliveries lost: {deliveries - len(replayed_ids)} never "
                        f"arrived, {deliveries - replayed_rows} rows not delivered"
                        + (f" ({left} still to go at the deadline)" if left else ""))
    if len(replayed) > len(replayed_ids) or replayed_attempts > 2 * deliveries:
        problems.append(f"replayed deliveries duplicated: {len(replayed) - len(replayed_ids)} "
                        f"requests more than webhook-ids, {replayed_attempts - 2 * deliveries} "
                        f"attempts more than one each")
    if len(live_ids) < published or len(live) > len(live_ids):
        problems.append(f"live deliveries: {len(live_ids)} of {published} arrived, "
                        f"{len(live) - len(live_ids)} more than once")
    if peak > connections:
        problems.append(f"{peak} requests in flight at once, over maxAllowedConnections "
                        f"{connections}")
    drained = max((r.arrived_us for r in replayed), default=began)
    first = min((r.arrived_us for r in replayed), default=began)
    drain_s = max(drained - began, 1) / 1e6

    def latencies(start: int, stop: int) -> list[float]:
        return [(r.arrived_us - r.sent_us) / 1000 for r in live if start <= r.sent_us < stop]

    without, during = latencies(without_from, began), latencies(began, drained)
    ratio = (extra.p99(during) / extra.p99(without)) if without and during else float("nan")
    p50s = (_p50(without), _p50(during))
    verdict = "; ".join(problems) if problems else (
        f"each replayed delivery delivered once: {len(replayed_ids)} distinct webhook-ids in "
        f"{len(replayed)} requests, {replayed_rows} rows delivered, {replayed_attempts} attempts "
        f"(the dead one and one more each); live: {len(live_ids)} of {published} "
        f"delivered once")
    line = (f"replay: {deliveries} dead deliveries replayed by selection (celery -A tasks "
            f"replay --webhook ID --status dead --yes) beside a live stream of {LIVE_RATE:g}/s "
            f"to the same webhook: drained at {deliveries / drain_s:.0f}/s ({drain_s:.1f} s from "
            f"the command's start to the last arrival; queued in {queued_in:.1f} s, first "
            f"arrival after {(first - began) / 1e6:.2f} s); at most {peak} requests in flight "
            f"at the receiver (maxAllowedConnections {connections}, answers after "
            f"{ANSWER_DELAY * 1000:.0f} ms; whole run); live p50 {p50s[0]:.1f} ms / p99 "
            f"{extra.p99(without):.1f} ms without the replay, p50 {p50s[1]:.1f} ms / p99 "
            f"{extra.p99(during):.1f} ms during it (p99 ratio {ratio:.2f}); {verdict}")
    text = (f"  live without the replay: {extra.percentiles(without)}\n"
            f"  live during the replay:  {extra.percentiles(during)}; publisher at most "
            f"{late * 1000:.0f} ms behind; {rows} deliveries delivered in all")
    return Result(text, line, problems)
