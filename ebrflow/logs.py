"""Log set-up for the CLI: plain text lines, or one JSON object per line (``run.log_format`` / ``--log-format``)."""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Attributes every LogRecord has; anything else on a record came from ``extra=`` and is a field of its own.
_RECORD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
_format = "text"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``message``, every ``extra=``
    field, and ``exc`` (the formatted traceback) when an exception is attached.

    >>> record = logging.makeLogRecord({"name": "ebrflow.x", "levelname": "INFO", "msg": "%d events",
    ...                                 "args": (3,), "created": 0.0, "lag": 7})
    >>> print(JsonFormatter().format(record))
    {"ts": "1970-01-01T00:00:00.000Z", "level": "INFO", "logger": "ebrflow.x", "message": "3 events", "lag": 7}
    """

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON (values JSON cannot hold are written as strings)."""
        ts = datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds")
        out = {
            "ts": ts.replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update({key: value for key, value in vars(record).items() if key not in _RECORD_ATTRS})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str)


def configure(level: str, fmt: str = "text") -> None:
    """Log to stderr at ``level`` in ``fmt`` (``text`` or ``json``); Python warnings are logged too, so in JSON
    mode every stderr line the process writes through logging is JSON. Noisy libraries are turned down."""
    global _format
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}")
    _format = fmt
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
    logging.captureWarnings(True)
    logging.getLogger("kafka").setLevel(logging.ERROR)
    logging.getLogger("grpc._server").setLevel(logging.CRITICAL)  # Milvus Lite logs unimplemented RPCs it does not need
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # "no AVX2 build" is not a problem


def json_mode() -> bool:
    """Whether ``configure`` chose JSON lines (the CLI then logs its messages instead of printing them)."""
    return _format == "json"
