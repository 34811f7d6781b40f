"""What an operator watches, from real `vmig vmm` processes: events, /metrics, logs, and
migration-info once a migration is over.

One migration (module fixture `migrated`) serves the checks of a whole migration: the
source runs with ``--log-format json --log-file`` and an event monitor, the destination
with text logs on stderr and an event monitor. Cancelled and failed migrations, and the
event stream (server-sent events), have tests of their own.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    BUSY_GUEST,
    GUEST,
    Spawn,
    kill,
    receive,
    send_in_precopy,
    wait_for,
)
from prometheus_client.parser import text_string_to_metric_families

from vmig.api.process import VmmProcess

#: "2026-11-30T06:04:08.123+00:00 INFO vmig.api.controller: message"
TEXT_LINE = re.compile(r"^(\S+) (DEBUG|INFO|WARNING|ERROR|CRITICAL) ([\w.]+): ")


@dataclass
class Migrated:
    source: VmmProcess
    destination: VmmProcess
    summary: dict[str, Any]
    tmp: Path

    def events(self, name: str) -> list[dict[str, Any]]:
        lines = (self.tmp / f"{name}.events").read_text().splitlines()
        return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def migrated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Migrated]:
    """A finished migration between two VMMs that log at level info."""
    tmp = tmp_path_factory.mktemp("observed")
    destination = VmmProcess.start(str(tmp / "dst.sock"),
                                   ["--log-level", "info", "--event-monitor",
                                    str(tmp / "dst.events")], stderr_path=str(tmp / "dst.err"))
    try:
        source = VmmProcess.start(
            str(tmp / "src.sock"),
            [*GUEST, "--log-level", "info", "--log-format", "json", "--log-file",
             str(tmp / "src.log"), "--event-monitor", str(tmp / "src.events")],
            stderr_path=str(tmp / "src.err"))
        try:
            url, auth = receive(destination)
            summary = source.client.send_migration(destination_url=url, **auth, connections=2)
            assert summary["status"] == "completed"
            for side in (source, destination):  # the receiver lets go just after the hand-over
                wait_for(lambda s=side: not s.client.migration_info()["active"],
                         "the migration to wind down")
            yield Migrated(source, destination, summary, tmp)
        finally:
            source.stop()
    finally:
        destination.stop()


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of a /metrics answer, by prometheus_client's parser."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def sample(samples: dict[Any, float], name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


# --- events ----------------------------------------------------------------------------------


def test_event_files_record_the_whole_migration(migrated: Migrated) -> None:
    sent = migrated.events("src")
    names = [(e["source"], e["event"]) for e in sent]
    assert names[:3] == [("vmm", "starting"), ("vm", "booted"), ("vmm", "ready")]
    migration = [event for source, event in names if source == "migration"]
    iterations = migration.count("iteration")  # pre-copy passes; the switch-over's is not one
    assert iterations >= 1 and iterations == migrated.summary["iterations"] - 1
    assert migration == ["started", *["iteration"] * iterations, "switchover", "completed"]
    assert names[-1] == ("vm", "migrated")  # (both VMMs still run)
    for event in sent:
        assert datetime.fromisoformat(event["timestamp"]).tzinfo is not None
    assert [e["uptime_s"] for e in sent] == sorted(e["uptime_s"] for e in sent)

    first = next(e["properties"] for e in sent if e["event"] == "iteration")
    passed = first["last_iteration"]
    assert passed["iteration"] == 1 and passed["bytes"] > 0 and passed["seconds"] > 0
    assert passed["rate_bytes_per_s"] > 0 and passed["dirty_rate_bytes_per_s"] > 0
    assert passed["elapsed_s"] > 0 and passed["decision"] in ("continue", "converge")
    completed = next(e["properties"] for e in sent if e["event"] == "completed")
    assert completed == migrated.summary  # the event carries the metrics' final view

    received = migrated.events("dst")
    names = [(e["source"], e["event"]) for e in received]
    assert names[:2] == [("vmm", "starting"), ("vmm", "ready")]
    assert [event for source, event in names if source == "migration"] == [
        "listening", "started", "completed"]
    assert names.index(("migration", "completed")) < names.index(("vm", "received"))
    done = next(e["properties"] for e in received if e["event"] == "completed")
    assert done["role"] == "receive" and done["migration_id"] == completed["migration_id"]
    assert done["bytes_transferred"] == migrated.summary["bytes_transferred"]


def test_event_stream_follows_the_vmm_and_lets_go_of_its_clients(spawn_vmm: Spawn,
                                                                 tmp_path: Path) -> None:
    vmm = spawn_vmm("--memory", "64M", "--working-set", "8M", "--event-monitor",
                    str(tmp_path / "events"))
    got: list[dict[str, Any]] = []
    snapshot = tmp_path / "snapshot"
    with vmm.client.events() as events:  # subscribed from here
        assert "vmig_event_streams 1.0" in vmm.client.metrics()
        vmm.client.pause()
        vmm.client.snapshot(str(snapshot))
        vmm.client.resume()
        vmm.client.shutdown()
        vmm.client.restore(str(snapshot))
        for event in events:
            got.append(event)
            if event["event"] == "restored":
                break
    assert [(e["source"], e["event"]) for e in got] == [
        ("vm", "paused"), ("vm", "snapshot"), ("vm", "resumed"), ("vm", "shutdown"),
        ("vm", "restored")]
    assert got[1]["properties"] == {"directory": str(snapshot)}
    assert got[-1]["properties"]["state"] == "running"
    # the client left: its stream is gone (no queue, no task left behind)
    wait_for(lambda: "vmig_event_streams 0.0" in vmm.client.metrics(), "the stream to close")

    # A VMM that stops ends every stream (it does not wait for its clients to leave).
    stream_ended = threading.Event()

    def follow() -> None:
        with vmm.client.events() as events:
            for _ in events:
                pass
        stream_ended.set()

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    wait_for(lambda: "vmig_event_streams 1.0" in vmm.client.metrics(), "a second stream")
    vmm.client.shutdown_vmm()
    assert stream_ended.wait(5), "the event stream did not end with the VMM"
    assert vmm.proc.wait(10) == 0
    lines = (tmp_path / "events").read_text().splitlines()
    assert [(e["source"], e["event"]) for e in map(json.loads, lines)][-2:] == [
        ("vmm", "shutdown"), ("vm", "shutdown")]


def test_cancelled_and_failed_migrations_give_their_events(spawn_vmm: Spawn,
                                                           tmp_path: Path) -> None:
    destination = spawn_vmm("--event-monitor", str(tmp_path / "dst.events"))
    source = spawn_vmm(*BUSY_GUEST, "--event-monitor", str(tmp_path / "src.events"))
    url, auth = receive(destination)
    send = send_in_precopy(source, url, auth, connections=2)

    # /metrics during a migration: the live figures
    samples = metric_samples(source.client.metrics())
    assert sample(samples, "vmig_migration_active", side="send") == 1
    assert sample(samples, "vmig_migration_phase", side="send", phase="precopy") == 1
    assert sample(samples, "vmig_migration_status", side="send", status="active") == 1
    assert sample(samples, "vmig_vm_state", state="running") == 1
    assert sample(samples, "vmig_migration_iterations_total", side="send") >= 0

    source.client.cancel_migration()
    assert send.outcome()["status"] == "cancelled"

    def events(name: str) -> list[dict[str, Any]]:
        lines = (tmp_path / f"{name}.events").read_text().splitlines()
        return [e for e in map(json.loads, lines) if e["source"] == "migration"]

    last = events("src")[-1]
    assert last["event"] == "cancelled"
    assert last["properties"]["error"] == "migration cancelled: cancelled by the operator"
    # the destination hears of it from ABANDON, flagged CANCELLED: cancelled there too
    wait_for(lambda: events("dst")[-1]["event"] == "cancelled",
             "the destination to see the cancel")
    assert "cancelled by the operator" in events("dst")[-1]["properties"]["error"]

    # The destination goes away mid-migration: the source's migration fails.
    url, auth = receive(destination)
    send = send_in_precopy(source, url, auth, reconnect_timeout_s=2)  # not 30 s of re-dial
    kill(destination)
    with pytest.raises(Exception, match="migration"):
        send.outcome()
    last = events("src")[-1]
    assert last["event"] == "failed" and last["properties"]["error"]
    assert [e["event"] for e in events("src")].count("started") == 2


# --- /metrics --------------------------------------------------------------------------------


def test_metrics_are_the_live_figures(migrated: Migrated) -> None:
    summary = migrated.summary
    samples = metric_samples(migrated.source.client.metrics())
    assert sample(samples, "vmig_vm_state", state="migrated") == 1
    assert sample(samples, "vmig_vm_state", state="running") == 0
    assert sample(samples, "vmig_migration_phase", side="send", phase="completed") == 1
    assert sample(samples, "vmig_migration_status", side="send", status="completed") == 1
    assert sample(samples, "vmig_migration_active", side="send") == 0
    assert sample(samples, "vmig_migration_bytes_total", side="send") == (
        summary["bytes_transferred"])
    assert sample(samples, "vmig_migration_wire_bytes_total", side="send") == (
        summary["wire_bytes"])
    assert sample(samples, "vmig_migration_iterations_total", side="send") == (
        summary["iterations"])
    assert sample(samples, "vmig_migration_downtime_seconds", side="send") == (
        summary["downtime_ms"] / 1000)
    assert sample(samples, "vmig_migration_dirty_rate_bytes_per_second", side="send") == (
        summary["dirty_rate_bytes_per_s"])
    assert sample(samples, "vmig_migration_throttle_percent", side="send") == 0
    assert sample(samples, "vmig_migration_connections_lost", side="send") == 0
    for connection in summary["per_connection"]:
        labels = {"side": "send", "index": str(connection["index"]), "role": connection["role"]}
        assert sample(samples, "vmig_migration_connection_bytes_total", **labels) == (
            connection["bytes"])
        assert sample(samples, "vmig_migration_connection_chunks_total", **labels) == (
            connection["chunks"])
    assert {c["role"] for c in summary["per_connection"]} == {"main", "memory"}

    received = migrated.destination.client.migration_info()
    samples = metric_samples(migrated.destination.client.metrics())
    assert sample(samples, "vmig_vm_state", state="running") == 1
    assert sample(samples, "vmig_guest_heartbeat_total") > 0
    assert sample(samples, "vmig_guest_pages_written_total") > 0
    assert sample(samples, "vmig_migration_bytes_total", side="receive") == (
        received["bytes_transferred"])
    # what a receiver cannot know is absent, not 0
    assert sample(samples, "vmig_migration_iterations_total", side="receive") is None
    assert sample(samples, "vmig_migration_dirty_rate_bytes_per_second", side="receive") is None
    assert sample(samples, "vmig_migration_precopy_bytes_total", side="receive") is None


def test_migration_info_is_the_same_twice_after_the_end(migrated: Migrated) -> None:
    for vmm in (migrated.source, migrated.destination):
        first = vmm.client.migration_info()
        time.sleep(0.2)  # the clock stopped at the end: time passing changes nothing
        assert vmm.client.migration_info() == first
    received = migrated.destination.client.migration_info()
    # receiver-side figures are real or absent
    assert received["iterations"] is None and received["dirty_rate_bytes_per_s"] is None
    assert received["bandwidth_bytes_per_s"] is None and received["downtime_ms"] is None
    assert received["precopy_bytes"] is None and received["switchover_bytes"] is None
    assert received["data_bytes"] is None and received["expected_downtime_ms"] is None
    assert received["bytes_transferred"] == migrated.summary["bytes_transferred"]
    assert received["throughput_bytes_per_s"] > 0 and received["elapsed_ms"] > 0
    assert sum(c["bytes"] for c in received["per_connection"]) == received["bytes_transferred"]


# --- logs ------------------------------------------------------------------------------------


def test_log_lines_carry_timestamps(migrated: Migrated) -> None:
    # text on stderr (the destination): vmig's and uvicorn's lines in one format
    lines = Path(migrated.destination.stderr_path).read_text().splitlines()
    loggers = set()
    for line in lines:
        match = TEXT_LINE.match(line)
        assert match, line
        assert datetime.fromisoformat(match[1]).tzinfo is not None, line
        loggers.add(match[3])
    assert {"vmig.cli", "vmig.api.controller", "uvicorn.access", "uvicorn.error"} <= loggers

    # json in --log-file (the source); stderr has the ready line only
    stderr = Path(migrated.source.stderr_path).read_text().splitlines()
    assert len(stderr) == 1 and "serving API on" in json.loads(stderr[0])["message"]
    records = [json.loads(line) for line in (migrated.tmp / "src.log").read_text().splitlines()]
    for record in records:
        assert {"timestamp", "level", "logger", "message"} <= record.keys(), record
        assert datetime.fromisoformat(record["timestamp"]).tzinfo is not None
    passes = [r for r in records if r["logger"] == "vmig.migration.sender"
              and r["message"].startswith("iteration ")]
    assert len(passes) == migrated.summary["iterations"] - 1  # the switch-over's pass has none
    for record in passes:  # bytes, rate, dirty rate and elapsed: in the text and as fields
        assert record["bytes"] > 0 and record["rate_bytes_per_s"] > 0
        assert record["dirty_rate_bytes_per_s"] > 0 and record["elapsed_s"] > 0
        assert " MiB in " in record["message"] and "MB/s" in record["message"]
        assert "s elapsed" in record["message"]
