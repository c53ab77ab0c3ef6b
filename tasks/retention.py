"""Beat's retention task: empty the payloads and attempt bodies past NOTIFIER_RETENTION_DAYS."""

from __future__ import annotations

import logging

from notifier import pipeline
from notifier.errors import TransientError
from tasks.app import app
from tasks.runtime import services

__all__ = ["purge"]

log = logging.getLogger(__name__)


@app.task(name="notifier.purge")
def purge() -> None:
    """One bounded batch; what is left goes in the next beat tick's."""
    try:
        purged = pipeline.purge(services())
    except TransientError as exc:
        log.warning("retention run skipped: %s", exc)  # the next beat tick tries again
        return
    if purged and purged.events:
        log.info("retention: %s", purged)
