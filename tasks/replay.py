"""``celery -A tasks replay DELIVERY_ID...``: send deliveries again, same ``webhook-id``."""

from __future__ import annotations

import click
from celery.bin.base import CeleryCommand, handle_preload_options

from notifier import pipeline
from notifier.errors import NotifierError

__all__ = ["replay"]


@click.command(cls=CeleryCommand)
@click.argument("delivery_ids", nargs=-1, required=True)
@click.pass_context
@handle_preload_options
def replay(ctx: click.Context, delivery_ids: tuple[str, ...]) -> None:
    """Queue DELIVERY_IDS for another attempt (finished, failed or dead ones alike)."""
    from tasks.delivery import send_lease
    from tasks.runtime import services

    try:
        queued = pipeline.replay(services(), delivery_ids, send_lease)
    except NotifierError as exc:
        raise click.ClickException(str(exc)) from exc
    ctx.obj.echo(f"queued {queued} deliveries for replay")
