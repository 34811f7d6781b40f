"""Switch-over on command and stall detection, with real VMMs (issue 16, parts 3 and 4).

The guest dirties memory flat out (BUSY_GUEST), so pre-copy never converges on its own:
whatever ends it is the command or the stall detector under test. A 20 MB/s cap keeps
the bytes left from ever falling (the working set is dirtied again long before a pass
of it is sent): a stall by construction.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    BUSY_GUEST,
    NEVER_CONVERGES,
    Background,
    Spawn,
    assert_source_still_healthy,
    expect_api_error,
    heartbeat_grows,
    migration_info_or_none,
    receive,
    send_in_precopy,
    wait_for,
)

from vmig.api.process import VmmProcess

SLOW_LINK = "20M"
STALL = {"stall_timeout_s": 2, "max_bandwidth": SLOW_LINK}


def events(path: Path) -> list[dict[str, Any]]:
    """The migration events a VMM's --event-monitor wrote."""
    lines = path.read_text().splitlines() if path.exists() else []
    return [e for e in map(json.loads, lines) if e["source"] == "migration"]


def assert_runs_at_the_destination(destination: VmmProcess, source: VmmProcess) -> None:
    info = destination.client.info()
    assert info["state"] == "running", info
    assert heartbeat_grows(destination.client, info["heartbeat"])
    assert destination.client.check_guest(60)["ok"]
    assert source.client.info()["state"] == "migrated"


def stalling_send(source: VmmProcess, url: str, auth: dict[str, str], **params: Any
                  ) -> Background:
    send = Background(lambda: source.client.send_migration(
        destination_url=url, **auth, **NEVER_CONVERGES, **STALL, **params))
    send.start()
    return send


def test_start_postcopy_switches_a_never_converging_migration_to_postcopy(
        spawn_vmm: Spawn) -> None:
    destination = spawn_vmm()
    source = spawn_vmm(*BUSY_GUEST)
    url, auth = receive(destination)
    # post-copy allowed, but its own trigger (iterations) far away: only the command acts
    send = send_in_precopy(source, url, auth, connections=2, postcopy=True,
                           postcopy_after_iterations=1000)
    info = source.client.migration_start_postcopy()
    assert info["active"] and info["role"] == "send"
    summary = send.outcome()
    assert summary["status"] == "completed", summary
    assert summary["switchover"] == "start-postcopy"
    assert summary["postcopy"] is not None and summary["postcopy"]["pages_left"] == 0
    assert summary["stall"] is None
    assert destination.client.migration_info()["postcopy"] is not None  # it ran post-copy
    assert_runs_at_the_destination(destination, source)
    message = expect_api_error(409, source.client.migration_start_postcopy)
    assert "no outgoing migration is running here" in message


def test_switchover_commands_are_refused_where_they_cannot_apply(spawn_vmm: Spawn) -> None:
    destination = spawn_vmm()
    source = spawn_vmm(*BUSY_GUEST)
    for command in (source.client.migration_start_postcopy,
                    source.client.migration_force_complete):
        assert "no outgoing migration is running here" in expect_api_error(409, command)
    url, auth = receive(destination)
    send = send_in_precopy(source, url, auth)  # post-copy not allowed
    message = expect_api_error(409, source.client.migration_start_postcopy)
    assert "cannot start post-copy: this migration does not allow it" in message
    # the destination is not where a switch-over is asked for
    message = expect_api_error(409, destination.client.migration_force_complete)
    assert "no outgoing migration is running here (it is asked for at the source)" in message
    assert source.client.migration_info()["phase"] == "precopy"  # nothing changed
    source.client.cancel_migration()
    summary = send.outcome()
    assert summary["status"] == "cancelled" and summary["switchover"] is None
    assert_source_still_healthy(source)


def test_a_stall_only_reported_then_force_complete_switches_over(
        spawn_vmm: Spawn, tmp_path: Path) -> None:
    destination = spawn_vmm()
    source = spawn_vmm(*BUSY_GUEST, "--event-monitor", str(tmp_path / "src.events"))
    url, auth = receive(destination)
    send = stalling_send(source, url, auth, stall_strategy="none")
    info = wait_for(lambda: (i := migration_info_or_none(source.client)) and i["stall"] and i,
                    "the stall to be reported")
    assert info["stall"]["action"] == "none" and info["stall"]["stalled_s"] >= 2
    assert info["active"] and info["phase"] == "precopy"  # `none` only reports
    stalled = [e for e in events(tmp_path / "src.events") if e["event"] == "stalled"]
    assert stalled and stalled[0]["properties"]["stall"]["action"] == "none"
    source.client.migration_force_complete()
    summary = send.outcome()
    assert summary["status"] == "completed", summary
    assert summary["switchover"] == "force-complete"
    assert summary["postcopy"] is None and summary["downtime_ms"] > 0
    assert summary["stall"]["action"] == "none"
    assert_runs_at_the_destination(destination, source)


def test_a_stall_cancels_and_the_source_runs_on(spawn_vmm: Spawn, tmp_path: Path) -> None:
    destination = spawn_vmm()
    source = spawn_vmm(*BUSY_GUEST, "--event-monitor", str(tmp_path / "src.events"))
    url, auth = receive(destination)
    summary = stalling_send(source, url, auth, stall_strategy="cancel").outcome()
    assert summary["status"] == "cancelled", summary
    assert summary["error"].startswith("migration cancelled: stalled: the bytes left")
    assert "stall strategy cancel" in summary["error"]
    stall = summary["stall"]
    assert stall["action"] == "cancel" and stall["stalled_s"] >= 2 and stall["stalls"] == 1
    assert stall["bytes_remaining"] >= 0.9 * stall["best_bytes_remaining"]
    assert summary["switchover"] is None
    assert_source_still_healthy(source)
    wait_for(lambda: destination.client.info()["state"] == "empty", "the destination to give up")
    names = [e["event"] for e in events(tmp_path / "src.events")]
    assert names.index("stalled") < names.index("cancelled"), names


@pytest.mark.parametrize("strategy", ["force-complete", "postcopy"])
def test_a_stall_switches_over_by_its_strategy(spawn_vmm: Spawn, strategy: str) -> None:
    destination = spawn_vmm()
    source = spawn_vmm(*BUSY_GUEST)
    url, auth = receive(destination)
    postcopy = {"postcopy": True, "postcopy_after_iterations": 1000} \
        if strategy == "postcopy" else {}
    summary = stalling_send(source, url, auth, stall_strategy=strategy, **postcopy).outcome()
    assert summary["status"] == "completed", summary
    assert summary["switchover"] == "stall"
    assert summary["stall"]["action"] == strategy
    assert (summary["postcopy"] is not None) == (strategy == "postcopy")
    assert_runs_at_the_destination(destination, source)
