"""Retention beside live traffic: the live p99 (publish to arrival) with and without a purge of
many old rows running, in one stack, as a same-run ratio (issue 14: at most 1.10).

Old rows are written straight into the tables (one ``INSERT ... SELECT`` each: events of
``run.event_data()``'s size, one delivered delivery and one attempt each), received
``OLD_DAYS`` ago. The stack's beat keeps its own retention run (``NOTIFIER_RETENTION_DAYS``,
30 by default, which these rows are younger than), so the purge measured is the bench's own:
``store.purge``, the function beat's task calls, with a cutoff of ``CUTOFF_DAYS``, in batches of
``NOTIFIER_RETENTION_BATCH_SIZE``, in a thread: first at beat's pace (``NOTIFIER_RETENTION_INTERVAL``
between batches), then back to back (the worst case). Windows of live load without the purge
and with it at beat's pace alternate in pairs, the order within a pair alternating too, and each
side's latencies are pooled: a drift of the shared machine weighs on both sides alike. (One
window each, as before, gave ratios from 0.9 to 1.3 for the same code: a 20 s window's p99 is
the 99th percentile of a few thousand deliveries, and one hiccup of the machine moves it.)
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import sqlalchemy as sa

from bench import extra, run
from bench.receiver import Receiver

OLD_DAYS = 20
CUTOFF_DAYS = 10
_DAY_MS = 24 * 3600 * 1000
_SPREAD_MS = _DAY_MS  # the old rows' received times, over one day


def fill(rows: int, webhook_id: str) -> float:
    """``rows`` old events, each with a delivered delivery and its attempt; returns seconds."""
    return run.write_history(webhook_id, rows, events="old-", deliveries="msg_old_",
                             oldest_ms=time.time_ns() // 1_000_000 - OLD_DAYS * _DAY_MS,
                             spread_ms=_SPREAD_MS, ended=run.Ended("delivered", 200, "ok"))


class Purging:
    """``store.purge`` batch after batch in a thread, ``pause`` seconds apart (beat's
    ``NOTIFIER_RETENTION_INTERVAL``, or 0: back to back), until stopped or nothing is left."""

    def __init__(self, batch: int, pause: float = 0.0) -> None:
        from notifier.db import Database

        self.batch = batch
        self.pause = pause
        self.db = Database(run.PG_URL)
        self.events = self.batches = 0
        self.busy = 0.0  # seconds spent inside purge calls
        self.ended_at: float | None = None  # when it ran out of rows
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from notifier import store

        while not self._stop.is_set():
            now = time.time_ns() // 1_000_000
            started = time.perf_counter()
            purged = store.purge(self.db, older_than_ms=now - CUTOFF_DAYS * _DAY_MS,
                                 batch=self.batch, now_ms=now)
            self.busy += time.perf_counter() - started
            self.events += purged.events
            self.batches += 1
            if not purged.more:
                self.ended_at = time.perf_counter()
                return
            self._stop.wait(self.pause)

    def __enter__(self) -> Purging:
        self.started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.stopped = time.perf_counter()
        self.db.dispose()


def retention(receiver: Receiver, folder: Path, concurrency: int, rows: int, rate: float,
              seconds: float, connections: int, pairs: int = 5) -> str:
    """``rows`` old rows, then ``rate`` live deliveries/s in windows of ``seconds``: ``pairs``
    pairs without and with a purge at beat's pace, then one with the purge back to back; returns
    what it measured (the live p99s and their ratios)."""
    from config import load_settings
    from notifier import publish

    env = run.notifier_env(folder)
    settings = load_settings({k: v for k, v in env.items() if k.startswith("NOTIFIER_")})
    batch, interval = settings.retention_batch_size, settings.retention_interval
    hooks = [(run.ORG, receiver.url("/retention/live"), connections)]
    with extra.stack(folder, concurrency, hooks) as (_procs, _, _):
        engine = sa.create_engine(run.PG_URL)
        try:
            with engine.connect() as conn:
                webhook_id = conn.execute(sa.text("SELECT id FROM webhooks")).scalar_one()
        finally:
            engine.dispose()
        filled = fill(rows, webhook_id)
        print(f"  retention: {rows} old events, deliveries and attempts written in "
              f"{filled:.1f}s", flush=True)

        def load() -> tuple[list[float], str]:
            return extra.offered_load(receiver, rate, seconds, 1, lambda: publish(
                run.EVENT, extra.bench_data(), org_id=run.ORG, broker_url=run.NOTIFIER_BROKER))

        load()  # warm-up: cold start, the webhook measured (fast lane)
        # Windows without and with a purge at beat's pace alternate, in pairs whose order
        # alternates too (without-with, with-without, ...), so that the machine's drift weighs
        # on both alike; each side's latencies are pooled across its windows.
        without: list[float] = []
        paced_lat: list[float] = []
        pair_ratios: list[float] = []
        paced_events = paced_batches = 0
        for index in range(pairs):
            got: dict[bool, list[float]] = {}
            for purge_on in ((False, True) if index % 2 == 0 else (True, False)):
                if purge_on:
                    with Purging(batch, interval) as paced:  # as beat runs it
                        got[True], _ = load()
                    paced_events += paced.events
                    paced_batches += paced.batches
                else:
                    got[False], _ = load()
            without += got[False]
            paced_lat += got[True]
            pair_ratios.append(extra.p99(got[True]) / extra.p99(got[False]))
        wal = run.wal_bytes()
        with Purging(batch) as purging:
            during, note = load()
        wal = run.wal_bytes() - wal
    base, at_pace, worst = extra.p99(without), extra.p99(paced_lat), extra.p99(during)
    window = purging.stopped - purging.started
    ran = (purging.ended_at or purging.stopped) - purging.started
    text = (f"retention: live p99 {base:.1f} ms without a purge, {at_pace:.1f} ms with one at "
            f"beat's pace ({paced_batches} batches of {batch}, {interval:g} s apart, "
            f"{paced_events} events emptied): ratio {at_pace / base:.2f} (target <= 1.10; "
            f"{pairs} pairs of {seconds:g} s windows, their orders alternating, latencies "
            f"pooled per side; pairwise ratios {', '.join(f'{r:.2f}' for r in pair_ratios)}); "
            f"with batches back to back (the worst case): {worst:.1f} ms, ratio "
            f"{worst / base:.2f}; live {note}; the purge back to back emptied "
            f"{purging.events} of {rows} old events (with their deliveries and attempts) "
            f"in {purging.batches} batches of {batch}, {purging.events / max(ran, 1e-9):.0f} "
            f"events/s, busy {purging.busy / window:.0%} of the {window:.1f} s window"
            + ("" if purging.ended_at is None else
               f" (ran out of old rows after {ran:.1f} s: a larger --retention keeps it busy)")
            + f"; {wal / max(1, purging.events):.0f} B of WAL per emptied event, live included")
    return text
