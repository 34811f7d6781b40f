"""The VMM's log: one format, ISO-8601 timestamps, for vmig's own loggers and uvicorn's alike.

`configure()` installs one handler on the root logger (stderr, or `--log-file`);
uvicorn is run without a logging configuration of its own, so its loggers
(``uvicorn.error``, ``uvicorn.access``) propagate to the same handler. Two formats:

- ``text``: ``2026-11-30T06:04:08.123+00:00 INFO vmig.migration.sender: iteration 2: ...``
- ``json``: one object per line, ``{"timestamp", "level", "logger", "message", ...}``
  plus a record's extras (``log.info(..., extra={"bytes": n})``) and ``exception``
  (the traceback as text) when there is one.

Timestamps are UTC, to the millisecond, so the logs of two hosts line up.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

from vmig.errors import ConfigError

FORMATS = ("text", "json")
#: The attributes every LogRecord has; anything else on a record is an extra.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName",
    "color_message",  # uvicorn's copy of the message with terminal colours
}


def timestamp(created: float) -> str:
    """ISO-8601, UTC, milliseconds: '2026-11-30T06:04:08.123+00:00'."""
    return datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")


class TextFormatter(logging.Formatter):
    """``TIMESTAMP LEVEL LOGGER: MESSAGE`` (and the traceback below, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{timestamp(record.created)} {record.levelname} {record.name}: " \
               f"{record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {"timestamp": timestamp(record.created),
                                "level": record.levelname, "logger": record.name,
                                "message": record.getMessage()}
        for name, value in vars(record).items():
            if name not in _STANDARD and not name.startswith("_"):
                data[name] = value
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def formatter(fmt: str) -> logging.Formatter:
    if fmt not in FORMATS:
        raise ConfigError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    return JsonFormatter() if fmt == "json" else TextFormatter()


def open_log_file(path: str) -> TextIO:
    """`path` opened for appending, line-buffered; ConfigError (one line) if it cannot be."""
    try:
        return open(path, "a", buffering=1, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot open log file {path}: {exc.strerror}") from None


class UnixClientFilter(logging.Filter):
    """uvicorn's access log names the client by address, which a UNIX socket's client
    has none of (' - "GET /api/v1/vm.info HTTP/1.1" 200'): name it ``unix``."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if record.name == "uvicorn.access" and isinstance(args, tuple) and args \
                and not args[0]:
            record.args = ("unix", *args[1:])
        return True


def configure(level: str = "warning", fmt: str = "text", stream: TextIO | None = None
              ) -> logging.Handler:
    """Send every log record at `level` or above to `stream` (stderr) in format `fmt`.

    Replaces the root logger's handlers; returns the one installed.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter(fmt))
    handler.addFilter(UnixClientFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler
