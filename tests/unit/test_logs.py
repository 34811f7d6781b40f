"""The VMM's log format (vmig.logs): ISO-8601 timestamps, text or JSON lines."""

from __future__ import annotations

import io
import json
import logging
from datetime import datetime
from pathlib import Path

import pytest

from vmig.errors import ConfigError
from vmig.logs import configure, open_log_file


def test_text_lines_start_with_an_iso_timestamp(restored_logging: None) -> None:
    out = io.StringIO()
    configure("info", "text", out)
    logging.getLogger("vmig.test").info("iteration %d: %s", 2, "ok")
    logging.getLogger("vmig.other").warning("%s %d", "second", 2)
    logging.getLogger("vmig.test").debug("below the level")
    first, second = out.getvalue().splitlines()
    stamp, rest = first.split(" ", 1)
    assert datetime.fromisoformat(stamp).utcoffset().total_seconds() == 0
    assert len(stamp) == len("2026-11-30T06:04:08.123+00:00")
    assert rest == "INFO vmig.test: iteration 2: ok"
    assert second.split(" ", 1)[1] == "WARNING vmig.other: second 2"


def test_json_lines_parse_and_carry_extras_and_tracebacks(restored_logging: None) -> None:
    out = io.StringIO()
    configure("info", "json", out)
    log = logging.getLogger("vmig.migration.sender")
    log.info("iteration %d", 3, extra={"bytes": 4096, "rate_bytes_per_s": 1e6})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("it failed")
    first, second = (json.loads(line) for line in out.getvalue().splitlines()
                     if line.startswith("{"))
    assert first.keys() == {"timestamp", "level", "logger", "message", "bytes",
                            "rate_bytes_per_s"}
    assert (first["level"], first["logger"], first["message"]) == (
        "INFO", "vmig.migration.sender", "iteration 3")
    assert first["bytes"] == 4096 and datetime.fromisoformat(first["timestamp"])
    assert "ValueError: boom" in second["exception"] and second["level"] == "ERROR"


def test_an_unusable_log_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"cannot open log file {tmp_path}: Is a directory"):
        open_log_file(str(tmp_path))


def test_uvicorn_access_lines_name_a_unix_socket_client(restored_logging: None,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """uvicorn gives an empty client address on a UNIX socket: the line says 'unix'."""
    out = io.StringIO()
    configure("info", "text", out)
    access = logging.getLogger("uvicorn.access")
    # As `vmig vmm` runs uvicorn: no handler or level of its own, propagating to ours
    # (a test that ran uvicorn with its own logging may have changed that).
    monkeypatch.setattr(access, "handlers", [])
    monkeypatch.setattr(access, "propagate", True)
    monkeypatch.setattr(access, "disabled", False)
    monkeypatch.setattr(access, "level", access.level)  # restored afterwards; and now:
    access.setLevel(logging.NOTSET)  # (setLevel also clears the loggers' level cache)
    access.info('%s - "%s %s HTTP/%s" %d', "", "GET", "/api/v1/vm.info", "1.1", 200)
    access.info('%s - "%s %s HTTP/%s" %d', "10.0.0.1:5000", "GET", "/metrics", "1.1", 200)
    first, second = (line.split(" ", 1)[1] for line in out.getvalue().splitlines())
    assert first == 'INFO uvicorn.access: unix - "GET /api/v1/vm.info HTTP/1.1" 200'
    assert second == 'INFO uvicorn.access: 10.0.0.1:5000 - "GET /metrics HTTP/1.1" 200'
