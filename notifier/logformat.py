"""JSON log lines (``NOTIFIER_LOG_FORMAT=json``): one object a line, for a log collector.

Each line has ``time`` (ISO 8601, UTC, milliseconds), ``level``, ``logger`` and ``message``, the
exception's traceback as ``exception`` if any, and the fields a record was given as data
(``extra={"fields": {...}}``), such as the delivery pipeline's line per attempt. Nothing is
added that the text line does not say already: secrets and payloads stay out the same way.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from datetime import UTC, datetime

__all__ = ["JsonFormatter", "use_json"]


class JsonFormatter(logging.Formatter):
    """A record as one JSON object, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        # default=str: a field nobody meant to be exotic still makes a line, never an error.
        return json.dumps(line, ensure_ascii=False, default=str)


def use_json(loggers: Iterable[logging.Logger]) -> None:
    """Give every handler of these loggers the JSON format."""
    formatter = JsonFormatter()
    for logger in loggers:
        for handler in logger.handlers:
            handler.setFormatter(formatter)
