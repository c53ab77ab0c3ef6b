"""``python -m bench [--quick] [--deliveries N] [--repeat R] [--fanout 1,10] [--lists 20]
[--concurrency C] [--latency] [--http] [--isolation [--isolation-dead STATUS]] [--enrichment]
[--webhooks 10,1000] [--backlog N]
[--retention N] [--soak SECONDS [--soak-rate R]] [--replay N] [--redis URL] [--database NAME]``."""

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

from bench import enrichment, extra, replay, retention, run, soak
from bench.receiver import Receiver

WARMUP = 100  # deliveries sent before each worker scenario's timed runs, not counted
QUICK_SOAK = 6.0  # seconds of --quick's soak (after a warm-up of QUICK_SOAK_WARM_UP)
QUICK_SOAK_WARM_UP = 2.0
RETENTION_ROWS, QUICK_RETENTION_ROWS = 1_000_000, 20_000
RETENTION_RATE = 100.0  # live deliveries/s of the retention scenario without fan-out 1's rate
QUICK_REPLAY = 500  # dead deliveries replayed by --quick (CI runs it: kept short)
QUICK_REPLAY_WARM_UP = 2.0


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="CI-sized: 2000 deliveries, 1 repetition, fan-out 1, a 6 s soak, "
                             f"a replay of {QUICK_REPLAY}")
    parser.add_argument("--deliveries", type=int, help="deliveries per run (default 5000; quick 2000)")
    parser.add_argument("--repeat", type=int, help="repetitions, median reported (default 3; quick 1)")
    parser.add_argument("--fanout", default="1", help="webhooks per event, comma separated (e.g. 1,10)")
    parser.add_argument("--lists", type=int, default=20, metavar="N",
                        help="fan-out 1 again with the events published N a message "
                             "(notifier.publish_many), its rounds alternating with fan-out 1's "
                             "in the same stack, each beside a Floor B round (default 20; 0: off)")
    parser.add_argument("--concurrency", type=int, default=2,
                        help="worker processes: Floor A loops, prefork children of each worker")
    parser.add_argument("--receiver-processes", type=int, default=2)
    parser.add_argument("--max-connections", type=int, default=8,
                        help="maxAllowedConnections of each notifier webhook")
    on = argparse.BooleanOptionalAction
    parser.add_argument("--latency", action=on,
                        help="end-to-end p50/p95/p99 at half of notifier's fan-out-1 rate (default on)")
    parser.add_argument("--latency-seconds", type=float,
                        help="offered-load duration of each latency window, one window a "
                             "--repeat (default 20; quick 5)")
    parser.add_argument("--latency-rate", type=float, metavar="R",
                        help="offer R deliveries/s instead of half of fan-out 1's rate: the same "
                             "load for runs of two versions to compare")
    parser.add_argument("--http", action=on,
                        help="fan-out 1 fed by POST /v3/events (default on; off with --quick)")
    parser.add_argument("--isolation", action=on, help="9 fast webhooks' p99 alone and beside one "
                        "answering after 2 s (default on; off with --quick)")
    parser.add_argument("--isolation-dead", type=int, metavar="STATUS", default=0,
                        help="with --isolation: the 9 fast webhooks beside a dead one answering "
                             "every request with STATUS (503: its circuit breaker opens; 410: "
                             "deactivated at once); default off")
    parser.add_argument("--enrichment", action=on,
                        help="fan-out 1 with every enrichment option off, then on, against loaded "
                             "reference data; reports the per-delivery cost (default on; off with "
                             "--quick)")
    parser.add_argument("--webhooks", default="",
                        help="many webhooks, traffic spread across them, e.g. 10,1000")
    parser.add_argument("--backlog", type=int, default=0,
                        help="N deliveries (fan-out 1) queued while delivery is paused, then "
                             "drained, in --repeat rounds, each drain right after a round of "
                             "Floor B: drain rate against Floor B's (pairwise) and fan-out 1's, "
                             "and the memory of Redis, workers and the database per delivery "
                             "(e.g. 4000; default off)")
    parser.add_argument("--retention", type=int, metavar="N",
                        help="live p99 with and without a purge of N old events (with their "
                             "deliveries and attempts) running, as a same-run ratio (default "
                             f"{RETENTION_ROWS}; quick {QUICK_RETENTION_ROWS}; 0: off)")
    parser.add_argument("--soak", type=float, metavar="SECONDS",
                        help="the soak alone: a steady rate over 10 webhooks (one answering after "
                             "2 s, one 500, one trickling) for SECONDS, then the 7 healthy ones "
                             "alone; lost, duplicates, p99 beside and without the bad ones, worker "
                             "RSS each minute; exits 1 only when deliveries were lost. With "
                             f"--quick: its soak's length (default {QUICK_SOAK:.0f})")
    parser.add_argument("--soak-rate", type=float, default=10.0,
                        help="events/s published during the soak, each to all 10 webhooks "
                             "(default 10: 70 healthy deliveries/s, a fraction of fan-out 1's rate)")
    parser.add_argument("--replay", type=int, metavar="N",
                        help="N dead deliveries of one webhook replayed by selection (celery -A "
                             "tasks replay --webhook ID --status dead --yes) beside a live stream "
                             f"of {replay.LIVE_RATE:g} events/s to the same webhook: drain rate, "
                             "peak requests in flight against maxAllowedConnections, live "
                             "p50/p99 without and during the replay; exits 1 on a delivery lost "
                             "or duplicated or the cap exceeded. Alone (with --soak, if given) "
                             f"unless --quick, which includes {QUICK_REPLAY} (0: off)")
    parser.add_argument("--redis", default=run.REDIS, metavar="URL",
                        help=f"the Redis server to use, its databases 11 to 13 flushed "
                             f"(default {run.REDIS})")
    parser.add_argument("--database", default=run.DATABASE, metavar="NAME",
                        help=f"the PostgreSQL database on 127.0.0.1 to use, created if missing, "
                             f"its tables emptied (default {run.DATABASE})")
    parser.add_argument("--set", action="append", default=[], metavar="NOTIFIER_NAME=VALUE",
                        help="a notifier setting for its stacks (e.g. "
                             "NOTIFIER_FAST_LANE_LEASES=2), to measure what it changes; repeatable")
    args = parser.parse_args(argv)
    run.use(args.redis, args.database)
    for setting in args.set:
        name, sep, value = setting.partition("=")
        if not sep or not name.startswith("NOTIFIER_"):
            parser.error(f"--set {setting!r}: expected NOTIFIER_NAME=VALUE")
        run.SETTINGS[name] = value
    # --soak and --replay without --quick: those scenarios alone.
    args.alone = not args.quick and (args.soak is not None or bool(args.replay))
    if args.quick and args.replay is None:
        args.replay = QUICK_REPLAY
    if args.quick and args.soak is None:
        args.soak = QUICK_SOAK
    args.latency_seconds = args.latency_seconds or (5.0 if args.quick else 20.0)
    args.latency = True if args.latency is None else args.latency
    args.http = not args.quick if args.http is None else args.http
    args.isolation = not args.quick if args.isolation is None else args.isolation
    args.enrichment = not args.quick if args.enrichment is None else args.enrichment
    args.webhooks = [int(w) for w in args.webhooks.split(",") if w.strip()]
    if args.retention is None:
        args.retention = QUICK_RETENTION_ROWS if args.quick else RETENTION_ROWS
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
        # Its rate over Floor B's, round by round: each round beside a Floor B round run just
        # before it, so that the machine's drift weighs on both alike.
        self.paired: list[float] = []

    @property
    def median(self) -> float:
        return statistics.median(s.rate for s in self.samples)

    def pairing(self) -> str:
        """The median of the pairwise ratios to Floor B, with their range and each of them."""
        ratios = self.paired
        return (f"{self.name} / Floor B = {statistics.median(ratios):.2f} (median of {len(ratios)} "
                f"pairwise ratios, range {min(ratios):.2f}-{max(ratios):.2f}: "
                f"{', '.join(f'{r:.2f}' for r in ratios)})")


def repeat(row: Row, times: int, once: Callable[[], run.Sample]) -> None:
    for i in range(times):
        sample = once()
        row.samples.append(sample)
        notes = "; ".join(sample.notes)
        print(f"  {row.name} run {i + 1}/{times}: {sample.deliveries} in {sample.seconds:.2f}s "
              f"= {sample.rate:.0f}/s {notes}", flush=True)


def table(rows: list[Row], floor_b: Row | None) -> str:
    head = (f"{'scenario':<32} {'deliveries':>10} {'median/s':>9} {'range/s':>13} "
            f"{'/FloorB':>8} {'peak RSS MiB':>13} {'CPU us':>7}")
    lines = [head, "-" * len(head)]
    base = floor_b.median if floor_b and floor_b.samples else None
    for row in rows:
        if not row.samples:
            # Floor B runs only beside the headline scenarios: none asked, nothing to show.
            if row is not floor_b or row.error:
                lines.append(f"{row.name:<32} FAILED: {row.error}")
            continue
        rates = [s.rate for s in row.samples]
        if row.paired:  # paired rounds: the median of the pairwise ratios
            ratio = f"{statistics.median(row.paired):.2f}p"
        else:
            ratio = f"{row.median / base:.2f}" if base and not row.name.startswith("receiver") else "-"
        peak = max(s.peak_rss for s in row.samples)
        mem = f"{peak / 2**20:.0f}" if peak else "-"
        cpu = [s.cpu_us for s in row.samples if s.cpu_us]
        cpu_us = f"{statistics.median(cpu):.0f}" if cpu else "-"
        lines.append(f"{row.name:<32} {row.samples[0].deliveries:>10} {row.median:>9.0f} "
                     f"{f'{min(rates):.0f}-{max(rates):.0f}':>13} {ratio:>8} {mem:>13} "
                     f"{cpu_us:>7}")
    return "\n".join(lines)


def run_soak(args: argparse.Namespace, folder: Path) -> tuple[int, str]:
    """The soak scenario: (deliveries lost, its summary line); prints its details."""
    warm_up = QUICK_SOAK_WARM_UP if args.quick else extra.WARM_UP_SECONDS
    print(f"  soak: {args.soak:.0f} s at {args.soak_rate:g} events/s over 10 webhooks after a "
          f"{warm_up:.0f} s warm-up, then the 7 healthy ones alone ...", flush=True)
    run.ensure_database()
    result = soak.soak(folder, args.concurrency, args.soak, args.soak_rate, args.max_connections,
                       warm_up, args.receiver_processes)
    print(result.text, flush=True)
    return result.lost, result.note


def run_replay(args: argparse.Namespace, folder: Path) -> replay.Result:
    """The replay scenario: its result; prints its details."""
    warm_up = QUICK_REPLAY_WARM_UP if args.quick else extra.WARM_UP_SECONDS
    run.ensure_database()
    result = replay.replay(folder, args.concurrency, args.replay, args.max_connections, warm_up,
                           args.latency_seconds, args.receiver_processes)
    print(result.text, flush=True)
    return result


def scenarios_alone(args: argparse.Namespace) -> int:
    """--soak and/or --replay without --quick: those scenarios alone; 1 when one failed."""
    what = [f"soak {args.soak:.0f} s" if args.soak is not None else "",
            f"replay of {args.replay}" if args.replay else ""]
    print(f"notifier {', '.join(w for w in what if w)}: concurrency {args.concurrency} "
          f"(prefork); {psutil.cpu_count()} CPUs, Python {platform.python_version()}, Celery "
          f"{celery.__version__}", flush=True)
    started = time.monotonic()
    notes: list[str] = []
    failed = False
    with tempfile.TemporaryDirectory(prefix="notifier-bench-") as tmp:
        if args.soak is not None:
            (Path(tmp) / "soak").mkdir()
            try:
                lost, note = run_soak(args, Path(tmp) / "soak")
                notes.append(note)
                failed |= bool(lost)
            except run.BenchError as exc:
                print(f"soak: FAILED {exc}", file=sys.stderr, flush=True)
                notes.append(f"soak: FAILED {str(exc).splitlines()[0]}")
                failed = True
        if args.replay:
            (Path(tmp) / "replay").mkdir()
            try:
                result = run_replay(args, Path(tmp) / "replay")
                notes.append(result.line)
                failed |= bool(result.problems)
            except run.BenchError as exc:
                print(f"replay: FAILED {exc}", file=sys.stderr, flush=True)
                notes.append(f"replay: FAILED {str(exc).splitlines()[0]}")
                failed = True
    print("\n" + "\n".join(notes) + f"\n{time.monotonic() - started:.0f}s in all")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so every finally runs
    if args.alone:
        return scenarios_alone(args)
    c, n = args.concurrency, args.deliveries
    print(f"notifier benchmark: {n} deliveries x {args.repeat}, concurrency {c} (prefork), "
          f"fan-out {args.fanout}, receiver {args.receiver_processes} processes; "
          f"{psutil.cpu_count()} CPUs, Python {platform.python_version()}, Celery {celery.__version__}"
          + "".join(f"; {name}={value}" for name, value in run.SETTINGS.items()),
          flush=True)
    if not run.autovacuum_on():
        print("note: PostgreSQL runs with autovacuum off here; notifier's tables bloat over a long "
              "run (ALTER SYSTEM SET autovacuum = on)", flush=True)
    started = time.monotonic()
    rows: list[Row] = []
    floor_b: Row | None = None
    notes: list[str] = []
    failed: list[str] = []
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

        floor_b = base_row = Row("Floor B (Celery task/POST)")
        rows.append(base_row)
        run.ensure_database()
        run.vacuum_analyze()
        print(f"  PostgreSQL: {run.pg_settings()} ({run.DATABASE} vacuumed and analyzed)",
              flush=True)
        notes.append(f"PostgreSQL: {run.pg_settings()}")
        (folder / "floor-b").mkdir()

        def paired(row: Row, i: int, floor_b_procs: run.Processes,
                   once: Callable[[], run.Sample]) -> None:
            """One round of ``row`` right after one of Floor B, both kept."""
            base = run.floor_b(receiver, floor_b_procs, n)
            record(row, i, base, once())

        def record(row: Row, i: int, base: run.Sample, sample: run.Sample) -> None:
            base_row.samples.append(base)
            row.samples.append(sample)
            row.paired.append(sample.rate / base.rate)
            print(f"  round {i + 1}/{args.repeat}: Floor B {base.rate:.0f}/s "
                  f"(CPU {base.cpu_us:.0f} us a POST in its worker) {' '.join(base.notes)}, "
                  f"{row.name} "
                  f"{sample.rate:.0f}/s = {row.paired[-1]:.2f} {'; '.join(sample.notes)}",
                  flush=True)

        def headline(floor_b_procs: run.Processes) -> None:
            """Every headline scenario in rounds, each beside a round of Floor B (whose worker
            waits idle meanwhile, as notifier's does during Floor B's)."""
            run.floor_b(receiver, floor_b_procs, WARMUP)
            for fanout in args.fanout:
                row = Row(f"notifier fan-out {fanout}")
                rows.append(row)
                listed = Row(f"notifier fan-out 1, lists of {args.lists}")
                if fanout == 1 and args.lists > 1:
                    rows.append(listed)
                sub = folder / f"notifier-{fanout}"
                sub.mkdir()
                try:
                    with run.notifier_stack(receiver, sub, c, fanout, args.max_connections) as procs:
                        # Two warm-ups: the first goes by the slow lane (a webhook never
                        # measured is presumed slow), the second opens the fast lane's
                        # connections, which the first timed round would open otherwise.
                        for _ in range(2):
                            run.notifier(receiver, procs, max(WARMUP, fanout), fanout)

                        def one_round(procs: run.Processes = procs,
                                      fanout: int = fanout) -> run.Sample:
                            return run.notifier(receiver, procs, n, fanout)

                        def listed_round(procs: run.Processes = procs) -> run.Sample:
                            return run.notifier(receiver, procs, n, 1, per_message=args.lists)

                        for i in range(args.repeat):
                            paired(row, i, floor_b_procs, one_round)
                            if listed in rows:
                                paired(listed, i, floor_b_procs, listed_round)
                        if fanout == 1 and args.latency:
                            rate = args.latency_rate or row.median / 2
                            offered = ("as asked" if args.latency_rate else
                                       "half of fan-out 1")
                            windows = f"{args.repeat} x " if args.repeat > 1 else ""
                            print(f"  latency at {rate:.0f} deliveries/s ({offered}) for "
                                  f"{windows}{args.latency_seconds:.0f}s ...", flush=True)
                            notes.append(f"latency at {rate:.0f}/s offered ({offered}): "
                                         + extra.latency(receiver, procs, rate,
                                                         args.latency_seconds, args.repeat))
                            print(f"  {notes[-1]}", flush=True)
                except run.BenchError as exc:
                    row.error = str(exc).splitlines()[0]
                    print(f"  {row.name}: {exc}", file=sys.stderr, flush=True)
                    if listed in rows and len(listed.samples) < args.repeat:
                        listed.error = row.error
                if row.paired:
                    notes.append(row.pairing())
                if listed in rows and listed.paired:
                    notes.append(listed.pairing())
            if args.http:
                row = Row("notifier HTTP fan-out 1")
                rows.append(row)
                (folder / "http").mkdir()
                try:
                    paired(row, 0, floor_b_procs, lambda: extra.http(
                        receiver, folder / "http", c, n, args.max_connections))
                    notes.append(row.pairing())
                except run.BenchError as exc:
                    row.error = str(exc).splitlines()[0]
                    print(f"  {row.name}: {exc}", file=sys.stderr, flush=True)

        def backlog(floor_b_procs: run.Processes) -> None:
            """Backlogs built and drained, each drain right after a round of Floor B (run while
            notifier's stack waits, its backlog built), in a stack of its own each."""
            row = Row(f"notifier backlog {args.backlog} drain")
            rows.append(row)
            (folder / "backlog").mkdir()
            try:
                for i in range(args.repeat):
                    print(f"  backlog of {args.backlog}, round {i + 1}/{args.repeat} ...",
                          flush=True)
                    (folder / "backlog" / str(i)).mkdir()
                    bases: list[run.Sample] = []

                    def floor_b_round(bases: list[run.Sample] = bases) -> None:
                        bases.append(run.floor_b(receiver, floor_b_procs, n))

                    sample = extra.backlog(receiver, folder / "backlog" / str(i), c, args.backlog,
                                           args.max_connections, before_drain=floor_b_round)
                    record(row, i, bases[0], sample)
            except run.BenchError as exc:
                row.error = str(exc).splitlines()[0]
                print(f"  {row.name}: {exc}", file=sys.stderr, flush=True)
            if row.paired:
                notes.append(row.samples[-1].notes[0])
                notes.append(row.pairing())
                fanout_1 = next((r for r in rows if r.name == "notifier fan-out 1" and r.samples),
                                None)
                if fanout_1 is not None:
                    notes.append(f"backlog drain / live fan-out 1 = "
                                 f"{row.median / fanout_1.median:.2f} (medians; target >= 1)")

        def do_headline() -> None:
            with run.floor_b_worker(receiver, folder / "floor-b", c) as floor_b_procs:
                headline(floor_b_procs)
                if args.backlog:
                    backlog(floor_b_procs)

        try:
            do_headline()
        except run.BenchError as exc:
            base_row.error = str(exc).splitlines()[0]
            print(f"  Floor B: {exc}", file=sys.stderr, flush=True)
        fanout_1 = next((r for r in rows if r.name == "notifier fan-out 1" and r.samples), None)
        if args.latency and fanout_1 is None:
            notes.append("latency: skipped (needs notifier fan-out 1 in the same run)")

        if args.isolation:
            if fanout_1 is None:
                notes.append("isolation: skipped (needs notifier fan-out 1 in the same run)")
            else:
                rate = fanout_1.median / 2
                print(f"  isolation at {rate:.0f} fast deliveries/s for {args.latency_seconds:.0f}s "
                      f"each ...", flush=True)
                try:
                    alone, beside, text = extra.isolation(receiver, folder, c, rate,
                                                          args.latency_seconds, args.max_connections)
                    print(text, flush=True)
                    notes.append(f"isolation: fast webhooks' p99 {alone:.1f} ms alone, {beside:.1f} ms "
                                 f"beside a 2 s webhook (maxAllowedConnections=2): ratio "
                                 f"{beside / alone:.2f}, offered {rate:.0f} fast deliveries/s")
                except run.BenchError as exc:
                    failed.append("isolation")
                    notes.append(f"isolation: FAILED {str(exc).splitlines()[0]}")
                if args.isolation_dead:
                    try:
                        dead_p99, text = extra.isolation_dead(
                            receiver, folder, c, rate, args.latency_seconds, args.max_connections,
                            status=args.isolation_dead)
                        print(text, flush=True)
                        notes.append(f"isolation: fast webhooks' p99 {dead_p99:.1f} ms beside a "
                                     f"dead webhook answering {args.isolation_dead}")
                    except run.BenchError as exc:
                        failed.append("isolation-dead")
                        notes.append(f"isolation-dead: FAILED {str(exc).splitlines()[0]}")

        if args.enrichment:
            off, on = Row("enrichment OFF fan-out 1"), Row("enrichment ON fan-out 1")
            events = 2 * (WARMUP + args.repeat * n)  # one loyaltyEventId per event
            (folder / "enrichment").mkdir()

            def do_enrichment() -> None:
                print(f"  enrichment: loading reference data ({enrichment.CUSTOMERS} customers, "
                      f"{events} awarded-reference events) for two orgs ...", flush=True)
                make = enrichment.data_factory()
                with run.notifier_stack(receiver, folder / "enrichment", c, 1, args.max_connections,
                                        enrichment.prepare(events, receiver.url("/enriched"),
                                                           args.max_connections)) as procs:
                    for org in (run.ORG, enrichment.ON_ORG):
                        run.notifier(receiver, procs, WARMUP, 1, make, org)
                    # Alternating, so that a drift of the machine weighs on both alike.
                    for i in range(args.repeat):
                        for row, org in ((off, run.ORG), (on, enrichment.ON_ORG)):
                            sample = run.notifier(receiver, procs, n, 1, make, org)
                            row.samples.append(sample)
                            print(f"  {row.name} run {i + 1}/{args.repeat}: {sample.rate:.0f}/s "
                                  f"{' '.join(sample.notes)}", flush=True)
                    ok, text = enrichment.check()
                    print(f"  {text}", flush=True)
                    notes.append(text)
                    if not ok:
                        failed.append("enrichment check")

            rows.extend([off, on])
            try:
                do_enrichment()
            except run.BenchError as exc:
                off.error = on.error = str(exc).splitlines()[0]
                print(f"  enrichment: {exc}", file=sys.stderr, flush=True)
            if off.samples and on.samples:
                pairs = [a.rate / b.rate for a, b in zip(off.samples, on.samples, strict=False)]
                notes.append(f"enrichment cost {(off.median / on.median - 1) * 100:+.1f}% per "
                             f"delivery (rate OFF {off.median:.0f}/s / rate ON {on.median:.0f}/s = "
                             f"{off.median / on.median:.3f}; medians of {args.repeat}, {n} "
                             f"deliveries each, runs alternating; pairwise OFF/ON "
                             f"{', '.join(f'{p:.2f}' for p in pairs)}; target <= +15%)")

        if args.webhooks:
            many = [Row(f"notifier {count} webhooks") for count in args.webhooks]
            rows.extend(many)
            (folder / "webhooks").mkdir()
            try:
                spread = extra.many_webhooks(receiver, folder / "webhooks", c, n, args.webhooks,
                                             args.max_connections, args.repeat)
            except run.BenchError as exc:
                for row in many:
                    row.error = str(exc).splitlines()[0]
                print(f"  webhooks: {exc}", file=sys.stderr, flush=True)
            else:
                for row, count in zip(many, args.webhooks, strict=True):
                    row.samples = spread[count]
                first, last = many[0], many[-1]
                pairs = [b.rate / a.rate for a, b in zip(first.samples, last.samples, strict=True)]
                # The median of the pairwise ratios, as every headline ratio is (#17): the ratio
                # of the medians mixed runs far apart in time.
                notes.append(f"webhooks: {last.name} / {first.name} = "
                             f"{statistics.median(pairs):.2f} per-delivery rate (median of "
                             f"{len(pairs)} pairwise ratios, runs alternating in one stack: "
                             f"{', '.join(f'{p:.2f}' for p in pairs)}; ratio of the medians "
                             f"{last.median / first.median:.2f}; target >= 0.90)")

        if args.retention:
            rate = fanout_1.median / 2 if fanout_1 is not None else RETENTION_RATE
            pairs = max(2, args.repeat)
            print(f"  retention: {args.retention} old rows, live load {rate:.0f} deliveries/s, "
                  f"{pairs} pairs of {args.latency_seconds:.0f}s windows without and with a purge "
                  f"at beat's pace, then one with it back to back ...", flush=True)
            (folder / "retention").mkdir()
            try:
                text = retention.retention(
                    receiver, folder / "retention", c, args.retention, rate,
                    args.latency_seconds, args.max_connections, pairs)
                print(f"  {text}", flush=True)
                notes.append(text)
            except run.BenchError as exc:
                failed.append("retention")
                notes.append(f"retention: FAILED {str(exc).splitlines()[0]}")

        if args.soak:
            (folder / "soak").mkdir()
            try:
                lost, note = run_soak(args, folder / "soak")
                notes.append(note)
                if lost:
                    failed.append("soak")
            except run.BenchError as exc:
                failed.append("soak")
                notes.append(f"soak: FAILED {str(exc).splitlines()[0]}")

        if args.replay:
            print(f"  replay of {args.replay} dead deliveries beside live traffic ...", flush=True)
            (folder / "replay").mkdir()
            try:
                result = run_replay(args, folder / "replay")
                notes.append(result.line)
                if result.problems:
                    failed.append("replay")
            except run.BenchError as exc:
                failed.append("replay")
                notes.append(f"replay: FAILED {str(exc).splitlines()[0]}")

    print()
    print(table(rows, floor_b))
    print(f"\nmedian of {args.repeat}; /FloorB ending in p: the median of the ratios of each "
          f"round to the Floor B round run just before it (Floor B's row: every such round); "
          f"peak RSS = summed RSS of the worker process tree (Floor A: "
          f"its loop processes); CPU us = the median CPU time the workers' process trees used a "
          f"delivery (user and system; Floor B: a POST); {time.monotonic() - started:.0f}s in all")
    for note in notes:
        print(note)
    return 1 if failed or any(not r.samples for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
