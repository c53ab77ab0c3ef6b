"""``python -m bench [--quick] [--deliveries N] [--repeat R] [--fanout 1,10] [--concurrency C]``."""

from __future__ import annotations

import argparse
import platform
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import celery
import psutil

from bench import run
from bench.receiver import Receiver

WARMUP = 100  # deliveries sent before each worker scenario's timed runs, not counted


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="CI-sized: 2000 deliveries, 1 repetition, fan-out 1 (under 2 minutes)")
    parser.add_argument("--deliveries", type=int, help="deliveries per run (default 5000; quick 2000)")
    parser.add_argument("--repeat", type=int, help="repetitions, median reported (default 3; quick 1)")
    parser.add_argument("--fanout", default="1", help="webhooks per event, comma separated (e.g. 1,10)")
    parser.add_argument("--concurrency", type=int, default=2,
                        help="worker processes: Floor A loops, prefork children of each worker")
    parser.add_argument("--receiver-processes", type=int, default=2)
    parser.add_argument("--max-connections", type=int, default=8,
                        help="maxAllowedConnections of each notifier webhook")
    args = parser.parse_args(argv)
    args.deliveries = args.deliveries or (2000 if args.quick else 5000)
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.fanout = [int(f) for f in args.fanout.split(",") if f.strip()]
    if args.quick:
        args.fanout = args.fanout[:1]
    return args


class Row:
    def __init__(self, name: str) -> None:
        self.name = name
        self.samples: list[run.Sample] = []
        self.error = ""

    @property
    def median(self) -> float:
        return statistics.median(s.rate for s in self.samples)


def repeat(row: Row, times: int, once: Callable[[], run.Sample]) -> None:
    for i in range(times):
        sample = once()
        row.samples.append(sample)
        notes = "; ".join(sample.notes)
        print(f"  {row.name} run {i + 1}/{times}: {sample.deliveries} in {sample.seconds:.2f}s "
              f"= {sample.rate:.0f}/s {notes}", flush=True)


def table(rows: list[Row], floor_b: Row | None) -> str:
    head = (f"{'scenario':<26} {'deliveries':>10} {'median/s':>9} {'range/s':>13} "
            f"{'/FloorB':>8} {'peak RSS MiB':>13}")
    lines = [head, "-" * len(head)]
    base = floor_b.median if floor_b and floor_b.samples else None
    for row in rows:
        if not row.samples:
            lines.append(f"{row.name:<26} FAILED: {row.error}")
            continue
        rates = [s.rate for s in row.samples]
        ratio = f"{row.median / base:.2f}" if base and not row.name.startswith("receiver") else "-"
        peak = max(s.peak_rss for s in row.samples)
        mem = f"{peak / 2**20:.0f}" if peak else "-"
        lines.append(f"{row.name:<26} {row.samples[0].deliveries:>10} {row.median:>9.0f} "
                     f"{f'{min(rates):.0f}-{max(rates):.0f}':>13} {ratio:>8} {mem:>13}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so every finally runs
    c, n = args.concurrency, args.deliveries
    print(f"notifier benchmark: {n} deliveries x {args.repeat}, concurrency {c} (prefork), "
          f"fan-out {args.fanout}, receiver {args.receiver_processes} processes; "
          f"{psutil.cpu_count()} CPUs, Python {platform.python_version()}, Celery {celery.__version__}",
          flush=True)
    started = time.monotonic()
    rows: list[Row] = []
    floor_b: Row | None = None
    with tempfile.TemporaryDirectory(prefix="notifier-bench-") as tmp, \
            Receiver(args.receiver_processes) as receiver:
        folder = Path(tmp)

        def attempt(row: Row, body: Callable[[], None]) -> None:
            rows.append(row)
            try:
                body()
            except run.BenchError as exc:
                row.error = str(exc).splitlines()[0]
                print(f"  {row.name}: {exc}", file=sys.stderr, flush=True)

        check = Row("receiver (raw sockets)")
        attempt(check, lambda: repeat(check, 1, lambda: run.receiver_check(receiver, 2 * n, c)))

        floor_a = Row("Floor A (requests loops)")
        attempt(floor_a, lambda: repeat(floor_a, args.repeat, lambda: run.floor_a(receiver, n, c)))

        floor_b = Row("Floor B (Celery task/POST)")

        def do_floor_b() -> None:
            with run.floor_b_worker(receiver, folder / "floor-b", c) as procs:
                run.floor_b(receiver, procs, WARMUP)
                repeat(floor_b, args.repeat, lambda: run.floor_b(receiver, procs, n))

        (folder / "floor-b").mkdir()
        attempt(floor_b, do_floor_b)

        run.ensure_database()
        for fanout in args.fanout:
            row = Row(f"notifier fan-out {fanout}")
            sub = folder / f"notifier-{fanout}"
            sub.mkdir()

            def do_notifier(row: Row = row, fanout: int = fanout, sub: Path = sub) -> None:
                with run.notifier_stack(receiver, sub, c, fanout, args.max_connections) as procs:
                    run.notifier(receiver, procs, max(WARMUP, fanout), fanout)
                    repeat(row, args.repeat, lambda: run.notifier(receiver, procs, n, fanout))

            attempt(row, do_notifier)

    print()
    print(table(rows, floor_b))
    print(f"\nmedian of {args.repeat}; peak RSS = summed RSS of the worker process tree (Floor A: "
          f"its loop processes); {time.monotonic() - started:.0f}s in all")
    return 1 if any(not r.samples for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
