"""Log formats: the default text line, or one JSON object per line (``PUSH_LOG_FORMAT=json``).

Session events (connections/consumers.py) carry ``node``, ``uid`` and
``conn_id`` as fields of the record; the JSON format writes them as keys, the
text format appends them. No log line carries a login key, the verify token
or the API secret: the consumer logs uids, never keys, and httpx (which would
log the verify URL with both) is held at WARNING in settings.LOGGING.

Guarded by tests/test_logs.py.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

# Fields a record may carry beyond the standard ones, in the order written.
SESSION_FIELDS = ("event", "node", "uid", "conn_id", "client", "code")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the session fields, and the exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in SESSION_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """The plain line, with the session fields appended as key=value."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = " ".join(
            f"{name}={record.__dict__[name]}" for name in SESSION_FIELDS if record.__dict__.get(name) is not None
        )
        return f"{line} {extra}" if extra else line
