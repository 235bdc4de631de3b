"""Logging set-up for `specd serve`: readable text, or one JSON object a line (`--log-format
json`) for log shippers (Loki, Elasticsearch, Cloud Logging) that index fields.

In JSON mode uvicorn's loggers are routed through the same handler (uvicorn is started with
``log_config=None``), so every line the process writes is JSON. A record's ``request_id``
(passed as ``extra``) becomes a field, so a request's lines can be found by the id a client
or load balancer sent in X-Request-Id.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# LogRecord attributes carried as fields when set (through `extra=`).
EXTRA_FIELDS = ("request_id",)


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in EXTRA_FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                entry[field] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        # ensure_ascii: a log line must stay one line and valid whatever a prompt contained.
        return json.dumps(entry, ensure_ascii=True, default=str)


def configure_logging(level: str, log_format: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    formatter = JSONFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def uvicorn_log_config(log_format: str) -> dict[str, object] | None:
    """What uvicorn.Config takes as ``log_config``: its own coloured set-up for text, none for
    JSON (its loggers then propagate to the root handler above)."""
    if log_format == "json":
        return None
    import uvicorn.config

    return uvicorn.config.LOGGING_CONFIG
