"""``celery -A tasks replay``: send deliveries again by id or by selection, same ``webhook-id``.

Exit codes, for scripts, as ``--help`` states them (``_EXIT_CODES``): 0 done; 1 nothing
matched, or a delivery id named is no delivery (the ids found are queued all the same), or the
prompt declined; 2 bad usage (named); 3 the database or Redis did not answer (run it again: a
replay skips what it queued already).
"""

from __future__ import annotations

import getpass
import os

import click
from celery.bin.base import CeleryCommand, handle_preload_options

from notifier import pipeline, replays, store
from notifier.clock import iso_ms, now_ms
from notifier.errors import InvalidInput, NotifierError, TransientError
from notifier.models import DeliveryStatus

__all__ = ["replay"]

NOTHING, USAGE, SERVICE = 1, 2, 3
# How many of the delivery ids not found are named; the count says how many there are.
_NAMED = 5

_EXIT_CODES = f"""\b
Exit codes:
  0  done: every delivery named found, the matching ones queued (those queued
     already skipped); with --dry-run, shown
  {NOTHING}  nothing matched, or a delivery id named is no delivery (those found are
     queued all the same), or the question was answered no
  {USAGE}  bad usage: a missing criterion or a bad option, named
  {SERVICE}  the database or Redis did not answer: run it again (a replay skips what
     it queued already)
"""


@click.command(cls=CeleryCommand, epilog="""\b
Examples:
  # the receiver was down since 02:00: send again everything that failed
  celery -A tasks replay --webhook WEBHOOK --status failed --status dead \\
      --since 2026-03-05T02:00Z
  # what got a 5xx in the last 2 hours, to see first
  celery -A tasks replay --org 100 --response-status 5xx --since 2h --dry-run
  celery -A tasks replay msg_0123 msg_4567 --yes

""" + _EXIT_CODES)
@click.argument("delivery_ids", nargs=-1, metavar="[DELIVERY_ID]...")
@click.option("--event-id", help="Deliveries of this event (its eventId).")
@click.option("--webhook", metavar="ID", help="Deliveries to this webhook (its webHookId or "
              "its consumerGroupId).")
@click.option("--org", metavar="ORG_ID", help="Deliveries to this org's webhooks.")
@click.option("--status", "statuses", multiple=True, metavar="STATUS",
              type=click.Choice([status.value for status in DeliveryStatus]),
              help="Deliveries in this status ("
                   f"{', '.join(status.value for status in DeliveryStatus)}); repeat for several.")
@click.option("--event-name", "event_names", multiple=True, metavar="NAME",
              help="Deliveries of events of this name (pointsIssued); repeat for several.")
@click.option("--since", metavar="WHEN", help="Ingested at or after WHEN: ISO 8601 (UTC unless "
              "it says otherwise) or a time ago (30m, 2h, 3d).")
@click.option("--until", metavar="WHEN", help="Ingested before WHEN (as --since).")
@click.option("--response-status", metavar="CODE", help="Whose last answer was CODE (404) or "
              "of its class (5xx, 4xx).")
@click.option("--dry-run", is_flag=True, help="Show what matches; send nothing.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask before sending.")
@click.option("--sample", default=5, show_default=True, type=click.IntRange(0, 100), metavar="N",
              help="How many matching deliveries to show first.")
@click.pass_context
@handle_preload_options
def replay(ctx: click.Context, delivery_ids: tuple[str, ...], event_id: str | None,
           webhook: str | None, org: str | None, statuses: tuple[str, ...],
           event_names: tuple[str, ...], since: str | None, until: str | None,
           response_status: str | None, dry_run: bool, yes: bool, sample: int) -> None:
    """Send deliveries again, with their webhook-id, by DELIVERY_IDs and/or a selection.

    Every criterion given must hold; at least one is required. Deliveries pending or in flight
    are skipped (queued already), so running a replay twice queues nothing twice. Replayed
    deliveries wait in their webhook's replay queue, sent through its own slots only while no
    live delivery waits. Each replay is recorded (notifier replays list).
    """
    from tasks.delivery import send_lease
    from tasks.runtime import services

    try:
        selection = replays.selection(
            now_ms=now_ms(), delivery_ids=delivery_ids, event_id=event_id,
            webhook=webhook, org=org, statuses=statuses, event_names=event_names, since=since,
            until=until, response_status=response_status)
    except InvalidInput as exc:
        hint = replays.FIELDS.get(str(exc.path[0]))
        raise click.UsageError(f"{hint}: {exc.problem}" if hint else exc.problem, ctx) from exc
    try:
        running = services()
        counted = store.count_selection(running.db, selection)
        _show(counted, store.sample_selection(running.db, selection, most=sample))
        # Ids not found do not hold the others back; the exit code tells a script of them.
        incomplete = NOTHING if counted.not_found or not counted.matched else 0
        if dry_run or not counted.replayable:
            ctx.exit(incomplete)
        if not yes:
            click.confirm(f"Replay {counted.replayable} deliveries?", abort=True)
        with click.progressbar(length=counted.replayable, label="replaying",
                               file=click.get_text_stream("stderr")) as bar:
            done = pipeline.replay_selection(running, selection, send_lease,
                                             requested_by=_who(), progress=bar.update)
    except TransientError as exc:
        click.echo(f"Error: {exc}", err=True)
        ctx.exit(SERVICE)
    except NotifierError as exc:
        raise click.ClickException(str(exc)) from exc
    why = ("pending or in flight already, or emptied by retention" if done.emptied
           else "pending or in flight already")
    click.echo(f"replay {done.replay_id}: queued {done.queued}, skipped {done.skipped} ({why}), "
               f"{_not_found(done.not_found)}")
    ctx.exit(NOTHING if done.not_found else 0)


def _show(counted: store.SelectionCount, sample: list[store.Selected]) -> None:
    if counted.not_found:
        click.echo(_not_found(counted.not_found), err=True)
    if not counted.matched:
        click.echo("nothing matched", err=True)
        return
    emptied = f", {counted.emptied} emptied by retention" if counted.emptied else ""
    click.echo(f"{counted.matched} deliveries match: {counted.replayable} to replay, "
               f"{counted.skipped - counted.emptied} pending or in flight already{emptied} "
               "(skipped)")
    for row in sample:
        click.echo(f"  {row.id}  {row.webhook_id}  {row.event_name:<24} {row.status:<10} "
                   f"{row.last_status_code or '-':<4} {iso_ms(row.ingested_at_ms)}")
    if len(sample) < counted.matched:
        click.echo(f"  ... and {counted.matched - len(sample)} more")


def _not_found(ids: tuple[str, ...]) -> str:
    named = ", ".join(ids[:_NAMED])
    more = f" and {len(ids) - _NAMED} more" if len(ids) > _NAMED else ""
    return f"not found {len(ids)}: {named}{more}" if ids else "not found 0"


def _who() -> str:
    """The OS user running the command, as the replay records who asked."""
    try:
        return f"{getpass.getuser()} (command line)"
    except (KeyError, OSError):
        return f"uid {os.getuid()} (command line)"
