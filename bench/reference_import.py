"""``python -m bench.reference_import [--rows 100000]``: time ``notifier reference import``.

Issue 4's figure: a JSON-lines file of ``rows`` reference records (a quarter each of customers
with identifiers in every source, cards, points balances and tills) imported by the CLI into
PostgreSQL (``notifier_bench``), timed from the command's start to its end. Then the same file
with one malformed line in the middle: the import must fail naming that line and leave the
database as it was (all or nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa

from bench import run

ORG = 777
TABLES = "ref_customers, ref_customer_identifiers, ref_cards, ref_points_balances, ref_tills"


def records(rows: int) -> Iterator[str]:
    quarter = rows // 4
    for c in range(quarter):
        customer = 1_000_000 + c
        yield json.dumps({"kind": "customers", "id": customer, "identifiers": {
            "InStore": {"externalId": f"EXT-{customer}", "mobile": f"91{customer:010d}",
                        "email": f"member{c}@example.com"},
            "WeChat": {"accounts": [{"accountId": f"wx-{c}", "identifiers": [
                {"identifierType": "openId", "identifierValue": f"oWx-{c}"}]}]}}})
    for c in range(quarter):
        yield json.dumps({"kind": "cards", "cardNumber": f"CARD-{c}", "customerId": 1_000_000 + c,
                          "source": "InStore", "status": "ACTIVE"})
    for c in range(quarter):
        yield json.dumps({"kind": "pointsBalances", "customerId": 1_000_000 + c, "programs": [
            {"programId": 7, "availablePoints": 100 + c}]})
    for t in range(rows - 3 * quarter):
        yield json.dumps({"kind": "tills", "id": 50_000 + t, "code": f"T-{t}", "name": f"Till {t}",
                          "storeId": 900 + t % 50})


def _reference_rows() -> int:
    engine = sa.create_engine(run.PG_URL)
    try:
        with engine.connect() as conn:
            return sum(int(conn.exec_driver_sql(f"SELECT count(*) FROM {table}").scalar_one())
                       for table in ("ref_customers", "ref_cards", "ref_points_balances",
                                     "ref_tills"))
    finally:
        engine.dispose()


def _notifier(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NOTIFIER_DATABASE_URL": run.PG_URL}
    return subprocess.run([sys.executable, "-m", "notifier.cli", *args], env=env,
                          capture_output=True, text=True, check=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reference_import", description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args(argv)
    run.ensure_database()
    run._truncate(f"{TABLES}, orgs")
    created = _notifier("orgs", "create", str(ORG), "bench-import")
    if created.returncode:
        print(created.stderr, file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="notifier-import-") as tmp:
        good = Path(tmp) / "reference.jsonl"
        good.write_text("\n".join(records(args.rows)) + "\n")
        t0 = time.perf_counter()
        done = _notifier("reference", "import", str(good), "--org", str(ORG))
        seconds = time.perf_counter() - t0
        if done.returncode:
            print(done.stderr, file=sys.stderr)
            return 1
        stored = _reference_rows()
        print(f"imported {args.rows} rows ({good.stat().st_size / 2**20:.1f} MiB of JSON lines) "
              f"in {seconds:.1f}s = {args.rows / seconds:.0f} rows/s, the command's whole run "
              f"(start-up included); {stored} reference rows stored; it printed "
              f"{done.stdout.strip()}")

        bad_line = args.rows * 42 // 100
        lines = good.read_text().splitlines()
        lines[bad_line - 1] = lines[bad_line - 1][:-2] + ', "programs": 5}'  # not valid JSON
        bad = Path(tmp) / "bad.jsonl"
        bad.write_text("\n".join(lines) + "\n")
        run._truncate(TABLES)
        refused = _notifier("reference", "import", str(bad), "--org", str(ORG))
        after = _reference_rows()
        print(f"a malformed line {bad_line}: exit code {refused.returncode}, "
              f"{after} rows stored after it; the command said:\n  "
              + "\n  ".join(refused.stderr.strip().splitlines()[-3:]))
        if refused.returncode == 0 or after != 0 or f":{bad_line}:" not in refused.stderr:
            print("FAILED: the bad file was not refused by its line, or rows were stored",
                  file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
