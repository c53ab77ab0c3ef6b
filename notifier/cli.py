"""The ``notifier`` command: run everything (``up``), migrate, and manage orgs and webhooks."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

import click

from config import SettingsError, describe, load_settings
from notifier.clock import iso_ms, now_ms

__all__ = ["main"]


def _settings() -> Any:
    try:
        return load_settings()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from exc


class _Group(click.Group):
    """Shows any notifier error a command raises as one line naming the problem, exit 1."""

    def invoke(self, ctx: click.Context) -> Any:
        from notifier.errors import NotifierError

        try:
            return super().invoke(ctx)
        except NotifierError as exc:
            raise click.ClickException(str(exc)) from exc


@click.group(cls=_Group)
def main() -> None:
    """notifier: validated, signed webhook delivery for loyalty events."""


@main.command()
@click.option("--concurrency", "-c", default=2, show_default=True,
              help="Worker processes (Celery prefork pool).")
@click.option("--slow-threads", default=16, show_default=True,
              help="Threads of the slow lane's worker, which sends to webhooks that answer "
                   "slowly; 0 to go without (the prefork worker then takes their tasks too).")
@click.option("--port", default=8000, show_default=True,
              help="Port of the HTTP API on 127.0.0.1; 0 to go without.")
@click.option("--flower-port", default=5555, show_default=True,
              help="Port of Flower, the Celery monitor, on 127.0.0.1; 0 to go without.")
def up(concurrency: int, slow_threads: int, port: int, flower_port: int) -> None:
    """Run the whole service on this machine: Redis (embedded by default), migrations,
    the HTTP API, the workers (prefork, and threads for the slow lane), beat and Flower.
    Ctrl-C stops it all."""
    from notifier.client import DELIVER_QUEUE, QUEUE, SLOW_QUEUE
    from notifier.db import upgrade
    from notifier.embedded import private_folder, start_redis
    from notifier.vault import mask_url

    settings = _settings()
    private_folder(settings.data_dir)
    redis_process = start_redis(settings.data_dir) if settings.uses_embedded_redis else None
    upgrade(settings.database_url)
    click.echo(f"database: {mask_url(settings.database_url)}")
    click.echo(f"redis:    {mask_url(settings.redis_url)}")
    celery = [sys.executable, "-m", "celery", "-A", "tasks"]
    worker = [*celery, "worker", "--loglevel", "INFO"]
    commands = {
        "worker": [*worker, "--concurrency", str(concurrency), "--hostname", "celery@%h",
                   "--queues", f"{QUEUE},{DELIVER_QUEUE}" if slow_threads else
                   f"{QUEUE},{DELIVER_QUEUE},{SLOW_QUEUE}"],
        "beat": [*celery, "beat", "--loglevel", "INFO",
                 "--schedule", str(settings.data_dir / "celerybeat-schedule")],
    }
    if slow_threads:
        commands["slow"] = [*worker, "--pool", "threads", "--concurrency", str(slow_threads),
                            "--hostname", "slow@%h", "--queues", SLOW_QUEUE]
    if port:
        commands["api"] = [sys.executable, "-m", "uvicorn", "--factory", "notifier.api:create_app",
                           "--host", "127.0.0.1", "--port", str(port)]
    environments = {}
    if flower_port:
        commands["flower"], environments["flower"] = flower_command(settings, flower_port)
    children = {name: subprocess.Popen(cmd, stdin=subprocess.DEVNULL, env=environments.get(name))
                for name, cmd in commands.items()}
    stopping = False

    def stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    click.echo("notifier is up (" + ", ".join(commands) + "); Ctrl-C to stop")
    if port:
        click.echo(f"api:      http://127.0.0.1:{port}/docs")
    if flower_port:
        click.echo(f"flower:   http://{settings.flower_address}:{flower_port}/")
    code = 0
    while not stopping:
        for name, child in children.items():
            if child.poll() is not None:
                click.echo(f"{name} exited with {child.returncode}; stopping", err=True)
                code, stopping = child.returncode or 1, True
        time.sleep(0.5)
    for child in children.values():
        if child.poll() is None:
            child.terminate()
    for child in children.values():
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
    if redis_process is not None:
        redis_process.terminate()
        redis_process.wait(timeout=10)
    sys.exit(code)


def flower_command(settings: Any, port: int) -> tuple[list[str], dict[str, str]]:
    """Flower's command line and environment: on ``NOTIFIER_FLOWER_ADDRESS`` (127.0.0.1 unless
    configured), asking for ``NOTIFIER_FLOWER_BASIC_AUTH`` when set. The credentials go by
    Flower's own environment variable, so they never show in the process list."""
    env = {k: v for k, v in os.environ.items() if k != "FLOWER_BASIC_AUTH"}
    if settings.flower_basic_auth:
        env["FLOWER_BASIC_AUTH"] = ",".join(settings.flower_basic_auth)
    return ([sys.executable, "-m", "celery", "-A", "tasks", "flower",
             f"--address={settings.flower_address}", f"--port={port}"], env)


@main.command()
@click.option("--port", default=5555, show_default=True, help="Flower's port.")
def flower(port: int) -> None:
    """Run Flower, the Celery monitor, as the Procfile does: on 127.0.0.1 unless
    NOTIFIER_FLOWER_ADDRESS says otherwise, with NOTIFIER_FLOWER_BASIC_AUTH's credentials."""
    command, env = flower_command(_settings(), port)
    os.execve(command[0], command, env)  # noqa: S606 - becomes Flower; argv is a list, no shell


@main.group()
def db() -> None:
    """The database."""


@db.command("upgrade")
@click.argument("revision", default="head")
def db_upgrade(revision: str) -> None:
    """Apply the migrations up to REVISION (default: the newest)."""
    from notifier.db import upgrade
    from notifier.vault import mask_url

    settings = _settings()
    upgrade(settings.database_url, revision)
    click.echo(f"database at {revision}: {mask_url(settings.database_url)}")


@main.command("settings")
def show_settings() -> None:
    """Every NOTIFIER_* setting with its default and what it is for."""
    click.echo(describe())


@main.group()
def orgs() -> None:
    """Orgs (tenants)."""


@orgs.command("create")
@click.argument("org_id", type=int)
@click.argument("name")
@click.option("--parent", type=int, default=None, help="Parent org id.")
def orgs_create(org_id: int, name: str, parent: int | None) -> None:
    """Create org ORG_ID called NAME."""
    from notifier import store, tenants
    from notifier.db import Database

    database = Database(_settings().database_url)
    store.create_org(database, org_id, name, now_ms=now_ms(), parent_id=parent)
    key = tenants.create_key(database, org_id, now_ms=now_ms())
    click.echo(json.dumps({"orgId": org_id, "apiKey": key}))


@orgs.group("keys")
def org_keys() -> None:
    """An org's API keys (shown once, stored hashed)."""


@org_keys.command("create")
@click.argument("org_id", type=int)
def org_keys_create(org_id: int) -> None:
    """Print a new API key for ORG_ID."""
    from notifier import tenants
    from notifier.db import Database

    click.echo(tenants.create_key(Database(_settings().database_url), org_id,
                                  now_ms=now_ms()))


@org_keys.command("list")
@click.argument("org_id", type=int)
def org_keys_list(org_id: int) -> None:
    """The prefixes of ORG_ID's keys, and whether each is revoked."""
    from notifier import tenants
    from notifier.db import Database

    for prefix, _created, revoked in tenants.list_keys(Database(_settings().database_url), org_id):
        click.echo(f"{prefix}...  {'revoked' if revoked else 'live'}")


@org_keys.command("revoke")
@click.argument("org_id", type=int)
@click.argument("prefix")
def org_keys_revoke(org_id: int, prefix: str) -> None:
    """Revoke ORG_ID's key that starts with PREFIX."""
    from notifier import tenants
    from notifier.db import Database

    tenants.revoke_key(Database(_settings().database_url), org_id, prefix, now_ms=now_ms())
    click.echo("revoked")


@orgs.command("set")
@click.argument("org_id", type=int)
@click.option("--available-points-balance-enrichment/--no-available-points-balance-enrichment",
              "points_balance", default=None,
              help="Allow the org's webhooks to ask for AvailablePointsBalance "
                   "(InTouch: availablePointsBalanceEnrichmentEnabled).")
def orgs_set(org_id: int, points_balance: bool | None) -> None:
    """Change ORG_ID's operator-set options."""
    from notifier.db import Database
    from notifier.enrich import set_points_balance_allowed

    if points_balance is None:
        raise click.UsageError("nothing to set; see --help")
    database = Database(_settings().database_url)
    try:
        set_points_balance_allowed(database, org_id, points_balance)
    finally:
        database.dispose()
    click.echo(json.dumps({"orgId": org_id,
                           "availablePointsBalanceEnrichmentEnabled": points_balance}))


@main.group()
def reference() -> None:
    """Reference data for enrichment: tills, stores, customers, cards, points."""


@reference.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--org", "org_id", type=int, required=True, help="The org the rows belong to.")
@click.option("--format", "file_format", type=click.Choice(["jsonl", "csv"]), default=None,
              help="Default: from the file name (.csv is CSV, anything else JSON lines).")
@click.option("--kind", default=None,
              help="What the rows are (tills, stores, customers, cards, pointsBalances, "
                   "awardedReferences); required for CSV, optional for JSON lines, "
                   "whose lines may name their own.")
def reference_import(file: str, org_id: int, file_format: str | None, kind: str | None) -> None:
    """Load FILE (JSON lines or CSV) into ORG's reference data: every row, or none.

    Each record replaces what is stored under its key. A bad line is reported by number,
    with every other bad line, and nothing is applied.
    """
    from notifier import reference
    from notifier.db import Database
    from notifier.errors import InvalidRows, NotifierError

    as_csv = file_format == "csv" or (file_format is None and file.lower().endswith(".csv"))
    if as_csv and kind is None:
        raise click.UsageError("a CSV file needs --kind")
    database = Database(_settings().database_url)
    try:
        with open(file, encoding="utf-8", newline="") as handle:  # csv wants newline=""
            records = (reference.parse_csv(handle, kind) if as_csv and kind is not None
                       else reference.parse_jsonl(handle, kind=kind))
        with click.progressbar(length=len(records), label="importing",
                               file=sys.stderr) as bar:
            counts = reference.load(database, org_id, records, progress=bar.update)
    except InvalidRows as exc:
        for line, problem in exc.rows[:50]:
            click.echo(f"{file}:{line}: {problem}", err=True)
        if len(exc.rows) > 50:
            click.echo(f"... and {len(exc.rows) - 50} more bad lines", err=True)
        raise click.ClickException(f"{len(exc.rows)} bad line(s); nothing was imported") \
            from exc
    except UnicodeDecodeError as exc:
        raise click.ClickException(f"{file} is not UTF-8 ({exc}); nothing was imported") from exc
    except NotifierError as exc:
        raise click.ClickException(f"{exc}; nothing was imported") from exc
    finally:
        database.dispose()
    click.echo(json.dumps({"orgId": org_id, "imported": counts}))


def _header(_ctx: Any, _param: Any, values: tuple[str, ...]) -> dict[str, str]:
    headers = {}
    for value in values:
        name, sep, content = value.partition(":")
        if not sep or not name.strip():
            raise click.BadParameter(f"{value!r}: expected NAME:VALUE")
        headers[name.strip()] = content.strip()
    return headers


@main.group()
def webhooks() -> None:
    """Webhooks."""


@contextlib.contextmanager
def _webhook_context() -> Iterator[Any]:
    """The same webhook-save service as the API's, with its bounds and its connection-limit
    change (sent to the workers over the broker)."""
    from notifier.client import lease_sender
    from notifier.pipeline import build_services, webhook_context

    settings = _settings()
    services = build_services(settings)
    try:
        yield webhook_context(services, lease_sender(settings.broker_url))
    finally:
        services.db.dispose()


_org = click.option("--org", "org_id", type=int, required=True, help="The webhook's org.")
# For a webhook named by its id: the org is found from it, or checked if given.
_its_org = click.option("--org", "org_id", type=int, default=None,
                        help="The webhook's org (found from the webhook if left out; if given, "
                             "a webhook of another org is not found).")


def _owner(context: Any, webhook_id: str, org_id: int | None) -> int:
    from notifier import webhooks

    return webhooks.org_of(context, webhook_id) if org_id is None else org_id


@webhooks.command("create")
@_org
@click.option("--name", required=True)
@click.option("--url", required=True)
@click.option("--event", "events", multiple=True, required=True, help="An event name; repeat.")
@click.option("--header", "headers", multiple=True, callback=_header, help="NAME:VALUE; repeat.")
@click.option("--max-connections", type=int, default=10, show_default=True,
              help="maxAllowedConnections.")
@click.option("--sla", type=int, default=3600, show_default=True,
              help="Delivery SLA, seconds (slaInSeconds).")
def webhooks_create(org_id: int, name: str, url: str, events: tuple[str, ...],
                    headers: dict[str, str], max_connections: int, sla: int) -> None:
    """Create a webhook; prints its id and its signing secret (shown only once)."""
    from notifier import webhooks

    body = {"name": name, "webHookUrl": url, "eventNames": list(events),
            "webHookHeaders": headers, "maxAllowedConnections": max_connections,
            "slaInSeconds": sla}
    with _webhook_context() as context:
        saved = webhooks.create(context, org_id, body, now_ms=now_ms())
    for warning in saved.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(json.dumps({"webHookId": saved.view["webHookId"], "secret": saved.secret}))


_json = click.option("--json", "as_json", is_flag=True,
                     help="One line of JSON, with the v3 API's field names, for scripts.")


def _webhook_line(org_id: int, view: dict[str, Any]) -> str:
    return (f"{view['webHookId']}  org {org_id}  {'active' if view['active'] else 'inactive'}  "
            f"{view['name']}  {view['webHookUrl']}  {','.join(view['eventNames'])}")


@webhooks.command("list")
@click.option("--org", "org_id", type=int, default=None, help="Only this org's webhooks.")
@click.option("--active/--inactive", default=None, help="Only the active (or inactive) ones.")
@_json
def webhooks_list(org_id: int | None, active: bool | None, as_json: bool) -> None:
    """The webhooks of every org (or of --org), by org, oldest first: one line each, or with
    --json a JSON array of the API's webhooks with their orgId."""
    from notifier import webhooks

    with _webhook_context() as context:
        listed = webhooks.list_by_org(context, org_id, active=active)
    if as_json:
        click.echo(json.dumps([{"orgId": org, **view} for org, view in listed]))
        return
    for org, view in listed:
        click.echo(_webhook_line(org, view))


@webhooks.command("show")
@click.argument("webhook_id")
@_its_org
@_json
def webhooks_show(webhook_id: str, org_id: int | None, as_json: bool) -> None:
    """Print a webhook as the API's GET does (header values masked), as JSON: indented, or
    on one line with --json."""
    from notifier import webhooks

    with _webhook_context() as context:
        view = webhooks.get(context, _owner(context, webhook_id, org_id), webhook_id)
    click.echo(json.dumps(view) if as_json else json.dumps(view, indent=2))


@webhooks.command("update")
@click.argument("webhook_id")
@_its_org
@click.option("--body", "body_file", type=click.File("r"), default=None,
              help="A JSON file (- for stdin) of InTouch webHooks fields, as `show` prints or "
                   "the API takes; the options below override its fields.")
@click.option("--name", default=None)
@click.option("--url", default=None)
@click.option("--event", "events", multiple=True, help="An event name; repeat (the whole set).")
@click.option("--header", "headers", multiple=True, callback=_header,
              help="NAME:VALUE; repeat (the whole set). A value as `show` masks it keeps the "
                   "stored value.")
@click.option("--max-connections", type=int, default=None, help="maxAllowedConnections.")
@click.option("--sla", type=int, default=None, help="Delivery SLA, seconds (slaInSeconds).")
def webhooks_update(webhook_id: str, org_id: int | None, body_file: Any, name: str | None,
                    url: str | None, events: tuple[str, ...], headers: dict[str, str],
                    max_connections: int | None, sla: int | None) -> None:
    """Change a webhook: only the fields given; prints it as saved."""
    from notifier import webhooks

    try:
        body = json.load(body_file) if body_file is not None else {}
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--body") from exc
    if not isinstance(body, dict):
        raise click.BadParameter("must be a JSON object of webHooks fields", param_hint="--body")
    given = {"name": name, "webHookUrl": url, "eventNames": list(events) or None,
             "webHookHeaders": headers or None, "maxAllowedConnections": max_connections,
             "slaInSeconds": sla}
    body.update({field: value for field, value in given.items() if value is not None})
    if not body:
        raise click.UsageError("nothing to change; see --help")
    with _webhook_context() as context:
        saved = webhooks.update_webhook(context, _owner(context, webhook_id, org_id), webhook_id,
                                        body, now_ms=now_ms())
    for warning in saved.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(json.dumps(saved.view, indent=2))


@webhooks.command("activate")
@click.argument("webhook_id")
@_its_org
@click.option("--deliver-held", is_flag=True,
              help="Also send the events it held while inactive, in the order they came "
                   "(deliverHeld). Without it they stay held, replayable.")
@_json
def webhooks_activate(webhook_id: str, org_id: int | None, deliver_held: bool,
                      as_json: bool) -> None:
    """Make a webhook active again; prints it as saved, as `list` does (--json: as
    `show --json` does). Exit 1 if there is none."""
    from notifier import webhooks

    with _webhook_context() as context:
        owner = _owner(context, webhook_id, org_id)
        saved = webhooks.activate(context, owner, webhook_id, now_ms=now_ms(),
                                  deliver_held=deliver_held)
    if deliver_held:
        click.echo(f"{saved.delivered_held} held deliveries queued", err=True)
    click.echo(json.dumps(saved.view) if as_json else _webhook_line(owner, saved.view))


@webhooks.command("deactivate")
@click.argument("webhook_id")
@_its_org
@_json
def webhooks_deactivate(webhook_id: str, org_id: int | None, as_json: bool) -> None:
    """Stop sending to a webhook; it keeps its history, and holds its events (and what it had
    waiting) until it is activated. Prints it as saved, as `list` does (--json: as
    `show --json` does). Exit 1 if there is none."""
    from notifier import webhooks

    with _webhook_context() as context:
        owner = _owner(context, webhook_id, org_id)
        view = webhooks.deactivate(context, owner, webhook_id, now_ms=now_ms())
    click.echo(json.dumps(view) if as_json else _webhook_line(owner, view))


@webhooks.command("delete")
@click.argument("webhook_id")
@_its_org
@click.option("--yes", "-y", is_flag=True, help="Do not ask first.")
def webhooks_delete(webhook_id: str, org_id: int | None, yes: bool) -> None:
    """Delete a webhook as the API's DELETE does: it stays, inactive, with its history, and
    holds nothing from now on (what it had waiting ends failed, replayable). Activating it
    undoes the delete."""
    from notifier import webhooks

    with _webhook_context() as context:
        owner = _owner(context, webhook_id, org_id)
        if not yes:
            name = webhooks.get(context, owner, webhook_id)["name"]
            click.confirm(f"Delete webhook {webhook_id} ({name!r}, org {owner})?", abort=True)
        view = webhooks.delete_webhook(context, owner, webhook_id, now_ms=now_ms())
    click.echo(json.dumps(view, indent=2))


# The same commands under the operator's words: one function each, whatever options they grow.
webhooks.add_command(webhooks_activate, "enable")
webhooks.add_command(webhooks_deactivate, "disable")


@main.group("dead-letters")
def dead_letters() -> None:
    """Events that could not be stored even as rejected (or kept failing past
    NOTIFIER_INGEST_RETRY_HORIZON), kept with the reason."""


@dead_letters.command("list")
def dead_letters_list() -> None:
    """One JSON line for each dead letter waiting to be replayed (not replayed yet, nor emptied
    by retention): id, eventId, reason, receivedAt."""
    from notifier import store
    from notifier.db import Database

    for letter in store.dead_letters(Database(_settings().database_url)):
        click.echo(json.dumps({"id": letter.id, "eventId": letter.event_id,
                               "reason": letter.reason, "receivedAt": letter.received_at_ms}))


@dead_letters.command("replay")
@click.argument("ids", nargs=-1, type=int, required=True)
def dead_letters_replay(ids: tuple[int, ...]) -> None:
    """Ingest the dead letters IDS again, through the broker, once their cause is fixed."""
    from notifier import pipeline
    from notifier.client import publish_envelope
    from notifier.db import Database

    settings = _settings()
    replayed = pipeline.replay_dead_letters(
        Database(settings.database_url), ids,
        lambda envelope: publish_envelope(envelope, broker_url=settings.broker_url))
    click.echo(f"replayed {replayed} dead letters")


@main.group("replays")
def replays() -> None:
    """Replays of deliveries (celery -A tasks replay, the API, the admin pages), with their
    progress."""


@replays.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line, for scripts.")
@click.option("--most", default=20, show_default=True, type=click.IntRange(1, 1000),
              help="How many of the latest replays.")
def replays_list(as_json: bool, most: int) -> None:
    """The latest replays, newest first: when, who asked, the selection, how many deliveries
    were queued, and of those how many are delivered, failed and still to go."""
    from notifier import store
    from notifier.db import Database

    for made in store.replays(Database(_settings().database_url), most=most):
        if as_json:
            click.echo(json.dumps(made.as_json()))
            continue
        click.echo(f"{made.id:>6}  {iso_ms(made.created_at_ms)}  {made.requested_by}  "
                   f"queued {made.queued}: delivered {made.delivered}, failed {made.failed}, "
                   f"to go {made.to_go}  {json.dumps(made.selection)}")


@contextlib.contextmanager
def _database() -> Iterator[Any]:
    from notifier.db import Database

    database = Database(_settings().database_url)
    try:
        yield database
    finally:
        database.dispose()


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False)


@main.group()
def retention() -> None:
    """What is kept, and for how long (NOTIFIER_RETENTION_DAYS)."""


@retention.command("run")
@_json
def retention_run(as_json: bool) -> None:
    """Run one retention batch now, as beat does every NOTIFIER_RETENTION_INTERVAL: empty the
    payloads of at most NOTIFIER_RETENTION_BATCH_SIZE events older than NOTIFIER_RETENTION_DAYS
    whose deliveries are all finished, their deliveries' enrichment and their attempts'
    responses and error messages, and the dead letters as old. Prints what it emptied."""
    from notifier import pipeline

    settings = _settings()
    services = pipeline.build_services(settings)
    try:
        purged = pipeline.purge(services)
    finally:
        services.db.dispose()
    if purged is None:
        click.echo(json.dumps(None) if as_json else
                   "retention is off (NOTIFIER_RETENTION_DAYS=0): nothing emptied")
        return
    if as_json:
        click.echo(json.dumps(dataclasses.asdict(purged)))
        return
    click.echo(f"emptied {purged.events} events older than {settings.retention_days} days, "
               f"{purged.deliveries} deliveries and {purged.attempts} attempts"
               + (f"; {purged.held_ended} held deliveries ended (held past the retention)"
                  if purged.held_ended else "")
               + (f"; {purged.dead_letters} dead letters emptied" if purged.dead_letters else "")
               + ("; more are due: they go in the next runs" if purged.more else ""))


@main.group()
def deliveries() -> None:
    """Deliveries (one event to one webhook), with every attempt."""


@deliveries.command("show")
@click.argument("delivery_id")
@_json
def deliveries_show(delivery_id: str, as_json: bool) -> None:
    """A delivery of any org: its status, webhook, event, every attempt (when, status code,
    latency, error, the start of the response), and the payload as published and as sent
    (enriched). Exit 1 if there is none. --json: the API's GET /v3/deliveries/ID."""
    from notifier import logs

    with _database() as database:
        detail = logs.delivery_detail(database, None, delivery_id)
    if as_json:
        click.echo(json.dumps(detail))
        return
    click.echo(f"delivery {detail['deliveryId']}: {detail['status']}, "
               f"{detail['attemptCount']} attempt(s)")
    click.echo(f"webhook  {detail['webHookId']} (consumerGroupId {detail['consumerGroupId']})")
    click.echo(f"event    {detail['eventName']} {detail['eventId']}, ingested "
               f"{detail['eventIngestionTimestamp']}")
    if detail["slaBreachTimestamp"]:
        click.echo(f"SLA breached at {detail['slaBreachTimestamp']}")
    for attempt in detail["attempts"]:
        error = f", {attempt['errorClass']}: {attempt['errorMessage']}" \
            if attempt["errorClass"] or attempt["errorMessage"] else ""
        click.echo(f"attempt {attempt['number']}  {attempt['startedAt']}  "
                   f"status {attempt['statusCode']}  {attempt['latencyMs']} ms  "
                   f"{attempt['outcome']}{error}")
        if attempt["responseExcerpt"]:
            click.echo(f"    response: {attempt['responseExcerpt']}")
    if detail["enrichmentNotes"]:
        click.echo(f"enrichment notes: {detail['enrichmentNotes']}")
    click.echo("original payload:\n" + _pretty(detail["originalPayload"]))
    click.echo("delivered payload:\n" + _pretty(detail["deliveredPayload"]))


@main.group()
def events() -> None:
    """Stored events."""


@events.command("show")
@click.argument("event_id")
@click.option("--org", "org_id", type=int, default=None,
              help="The event's org; needed when several orgs have an event of this id.")
@_json
def events_show(event_id: str, org_id: int | None, as_json: bool) -> None:
    """An event: its status, why it was rejected (and where in the event), and its
    deliveries (id, webhook, status). Exit 1 if there is none, 2 if several orgs have one of
    this id and --org does not say which."""
    from notifier import logs

    with _database() as database:
        found = logs.event_details(database, event_id, org_id)
    if not found:
        raise click.ClickException(f"eventId {event_id} does not exist"
                                   + (f" in org {org_id}" if org_id is not None else ""))
    if len(found) > 1:
        raise click.UsageError(f"eventId {event_id} is in several orgs "
                               f"({', '.join(str(e['orgId']) for e in found)}); give --org")
    (event,) = found
    if as_json:
        click.echo(json.dumps(event))
        return
    click.echo(f"event {event['eventName']} {event['eventId']} of org {event['orgId']}: "
               f"{event['status']}, ingested {event['eventIngestionTimestamp']}")
    if event["error"]:
        click.echo(f"rejected at {event['errorPath'] or '(not a field: the database refused it)'}"
                   f": {event['error']}")
    for delivery in event["deliveries"]:
        click.echo(f"delivery {delivery['deliveryId']}  webhook {delivery['webHookId']}  "
                   f"{delivery['status']}  {delivery['attemptCount']} attempt(s)")
    if not event["deliveries"]:
        click.echo("no deliveries")


@main.command()
@click.argument("source")
@click.option("--org", "org_id", type=int, default=None,
              help="The org: required with an event name; for a file, the orgId of the events "
                   "that have none.")
@click.option("--data", default=None, help="With an event name: its data object, as JSON.")
@click.option("--event-id", default=None, help="With an event name: its eventId.")
@_json
def publish(source: str, org_id: int | None, data: str | None, event_id: str | None,
            as_json: bool) -> None:
    """Publish events as a loyalty service would. SOURCE is an event name, or a file, or -.

    \b
    notifier publish pointsIssued --org 100 --data '{"customerIdentifiers": ...}'
        one event by name, through the broker, as notifier.publish() sends it; prints its
        eventId (the worker validates and stores it).
    notifier publish events.jsonl     (or - for stdin)
        one JSON event, or JSON lines (one event per line), each stored and validated at
        once, as POST /v3/events does, and its outcome printed (--json: a JSON line each:
        line, eventId, status, created, error, errorPath). A bad line is reported by its
        number and the others go on. Exit 1 if any was rejected or could not be read.

    SOURCE is a file when it is -, an existing file, or has a / or . in it.
    """
    if source == "-" or "/" in source or "." in source or os.path.isfile(source):
        if data is not None or event_id is not None:
            raise click.UsageError("--data and --event-id go with an event name, not a file")
        try:
            handle = click.open_file(source, encoding="utf-8")
        except OSError as exc:
            raise click.BadParameter(f"cannot read it: {exc.strerror}",
                                     param_hint="SOURCE") from exc
        with handle:
            refused = _publish_lines(handle, org_id, as_json)
        if refused:
            raise click.exceptions.Exit(1)
        return
    from notifier.client import publish as publish_event

    if org_id is None:
        raise click.UsageError("Missing option '--org': an event published by name needs its "
                               "org")
    try:
        parsed = json.loads(data or "{}")
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--data") from exc
    published = publish_event(source, parsed, org_id=org_id, event_id=event_id,
                              broker_url=_settings().broker_url)
    click.echo(json.dumps({"eventId": published}) if as_json else published)


@dataclasses.dataclass(frozen=True)
class _Unreadable:
    """A line of events that is not JSON."""

    problem: str


def _read(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        return _Unreadable(f"not JSON: {exc}")


def _events_of(lines: Iterable[str]) -> Iterator[tuple[int, Any]]:
    """``(line number, event)`` of JSON lines, blank lines skipped. When the first line is not
    JSON the whole text is read as one event (an indented one), if it is one."""
    numbered: Iterator[tuple[int, str]] = (
        (number, line) for number, line in enumerate(lines, 1) if line.strip())
    first = next(numbered, None)
    if first is None:
        return
    event = _read(first[1])
    if isinstance(event, _Unreadable):
        rest = list(numbered)
        whole = _read(first[1] + "".join(line for _, line in rest))
        if isinstance(whole, dict):
            yield first[0], whole
            return
        numbered = iter(rest)
    yield first[0], event
    for number, line in numbered:
        yield number, _read(line)


def _publish_lines(lines: Iterable[str], org_id: int | None, as_json: bool) -> int:
    """Store each event of ``lines`` as POST /v3/events does, printing its outcome; returns how
    many were rejected or could not be read."""
    from notifier import pipeline
    from notifier.client import lease_sender

    settings = _settings()
    services = pipeline.build_services(settings)
    send = lease_sender(settings.broker_url)
    refused = 0
    try:
        for number, event in _events_of(lines):
            outcome: dict[str, Any] = {"line": number, "eventId": None, "status": "unread",
                                       "created": False, "error": None, "errorPath": None}
            if isinstance(event, _Unreadable):
                outcome["error"] = event.problem
            elif not isinstance(event, dict):
                outcome["error"] = "must be an event object"
            elif org_id is not None and event.setdefault("orgId", org_id) != org_id:
                outcome.update(error="does not match --org", errorPath="orgId")
            else:
                stored = pipeline.accept_or_end(services, event, send)
                outcome.update(eventId=stored.event_id, status=stored.status,
                               created=stored.created, error=stored.error,
                               errorPath=stored.error_path)
            refused += outcome["error"] is not None
            click.echo(json.dumps(outcome) if as_json else _outcome_line(outcome))
    finally:
        services.db.dispose()
    return refused


def _outcome_line(outcome: dict[str, Any]) -> str:
    text = f"line {outcome['line']}: "
    if outcome["eventId"] is not None:
        text += f"{outcome['eventId']} {outcome['status']}"
        text += "" if outcome["created"] else " (stored before)"
    else:
        text += "not published"
    if outcome["error"]:
        text += f": {outcome['errorPath'] + ': ' if outcome['errorPath'] else ''}" \
                f"{outcome['error']}"
    return text


if __name__ == "__main__":  # pragma: no cover
    main(prog_name=os.path.basename(sys.argv[0]))
