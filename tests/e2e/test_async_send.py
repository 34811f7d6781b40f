"""An asynchronous send, with real VMMs: vm.send-migration answers 202 as soon as the
migration has started, with its id and migration-info; the migration runs in the VMM,
is followed through the events (or migration-info), and a client that goes away
changes nothing."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
from typing import Any

import httpx
from helpers import GUEST, Background, Spawn, receive, vmig, wait_for

from vmig.api.client import ApiClient
from vmig.api.process import VmmProcess

# Idle once it has stamped its 64 MiB: under a 40 MB/s cap the migration takes a couple of
# seconds and then converges, long enough to act while it runs.
SLOW_GUEST = ("--memory", "128M", "--cpus", "1", "--working-set", "64M")
CAP = "40M"
SEND_PATH = "/api/v1/vm.send-migration"


def assert_completed(source: VmmProcess, destination: VmmProcess, migration_id: str) -> None:
    """Migration `migration_id` ends (seen in migration-info alone) completed, and the
    destination runs the guest."""
    info = wait_for(lambda: (i := source.client.migration_info())["migration_id"] ==
                    migration_id and not i["active"] and i, "the migration to end", timeout=60)
    assert (info["status"], info["outcome"]) == ("completed", "completed"), info
    assert_runs_at_the_destination(source, destination)


def assert_runs_at_the_destination(source: VmmProcess, destination: VmmProcess) -> None:
    assert source.client.info()["state"] == "migrated"
    assert destination.client.info()["state"] == "running"
    assert destination.client.check_guest(60)["ok"]


def test_the_answer_is_202_with_the_id_while_the_migration_runs(spawn_vmm: Spawn) -> None:
    destination = spawn_vmm()
    source = spawn_vmm(*SLOW_GUEST)
    url, auth = receive(destination)
    with httpx.Client(transport=httpx.HTTPTransport(uds=source.socket_path),
                      base_url="http://localhost", timeout=30) as raw:
        response = raw.put(SEND_PATH, json={"destination_url": url, **auth,
                                            "max_bandwidth": CAP})
    assert response.status_code == 202, response.text
    started = response.json()
    assert len(started["id"]) == 32 and started["id"] == started["migration_id"]
    assert started["role"] == "send" and started["peer"] == url
    assert started["active"] is True and started["outcome"] is None  # answered, not waited
    assert started["phase"] in ("connecting", "precopy")
    running = source.client.migration_info()
    assert running["migration_id"] == started["id"] and running["active"], running
    summary = source.client.wait_for_migration(started["id"])
    assert summary["status"] == "completed" and summary["error"] is None
    assert "active" not in summary and "outcome" not in summary  # the metrics' final view
    assert_completed(source, destination, started["id"])


def test_a_send_is_followed_to_completion_through_events_alone(spawn_vmm: Spawn) -> None:
    destination = spawn_vmm()
    source = spawn_vmm(*GUEST)
    url, auth = receive(destination)
    subscribed = threading.Event()

    def follow() -> list[dict[str, Any]]:
        seen = []
        with ApiClient(source.socket_path) as client, client.events() as events:
            subscribed.set()
            for event in events:
                seen.append(event)
                if (event["source"], event["event"]) in (("vm", "migrated"),
                                                         ("migration", "failed"),
                                                         ("migration", "cancelled")):
                    return seen
        return seen

    reader = Background(follow)
    reader.start()
    wait_for(subscribed.is_set, "the event stream")
    started = source.client.send_migration(wait=False, destination_url=url, **auth,
                                           connections=2)
    seen = reader.outcome(60)
    steps = [e for e in seen if e["source"] == "migration"]
    names = [e["event"] for e in steps]
    assert names[0] == "started" and names[-1] == "completed", names
    assert "iteration" in names and "switchover" in names, names
    assert {e["properties"]["migration_id"] for e in steps} == {started["id"]}
    last = steps[-1]["properties"]
    assert last["status"] == "completed" and last["bytes_transferred"] > 0
    assert (seen[-1]["source"], seen[-1]["event"]) == ("vm", "migrated")
    assert seen[-1]["properties"]["destination"] == url
    assert_completed(source, destination, started["id"])


def test_a_client_gone_right_after_the_answer_changes_nothing(spawn_vmm: Spawn) -> None:
    destination = spawn_vmm()
    source = spawn_vmm(*SLOW_GUEST)
    url, auth = receive(destination)
    body = json.dumps({"destination_url": url, **auth, "max_bandwidth": CAP}).encode()
    request = (f"PUT {SEND_PATH} HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
               f"application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(source.socket_path)
        sock.sendall(request)
        assert sock.recv(12) == b"HTTP/1.1 202"  # and gone, the rest of the answer unread
    info = source.client.migration_info()
    assert info["active"], info
    assert_completed(source, destination, info["migration_id"])


def test_a_following_cli_killed_leaves_the_migration_running(spawn_vmm: Spawn) -> None:
    destination = spawn_vmm()
    source = spawn_vmm(*SLOW_GUEST)
    url, auth = receive(destination)
    cli = subprocess.Popen([sys.executable, "-m", "vmig", "remote", "--api-socket",
                            source.socket_path, "send-migration", url, "--token",
                            auth["token"], "--max-bandwidth", CAP, "--json"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def moving() -> dict[str, Any] | None:
            assert cli.poll() is None, f"the CLI ended early: {cli.communicate()}"
            try:
                info = source.client.migration_info()
            except Exception:
                return None
            return info if info["active"] and info["bytes_transferred"] > 0 else None

        info = wait_for(moving, "memory to move")
        cli.send_signal(signal.SIGKILL)  # no Ctrl-C: it cannot cancel anything
        cli.communicate(timeout=10)
    finally:
        if cli.poll() is None:
            cli.kill()
    assert_completed(source, destination, info["migration_id"])


def test_detach_prints_the_answer_and_returns_at_once(spawn_vmm: Spawn) -> None:
    destination = spawn_vmm()
    source = spawn_vmm(*SLOW_GUEST)
    url, auth = receive(destination)
    result = vmig("remote", "--api-socket", source.socket_path, "send-migration", url,
                  "--token", auth["token"], "--max-bandwidth", CAP, "--detach", "--json")
    assert result.returncode == 0, result
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    started = json.loads(lines[0])
    assert started["active"] is True and started["outcome"] is None, started  # not waited
    summary = source.client.wait_for_migration(started["id"])
    assert summary["status"] == "completed"
    assert_runs_at_the_destination(source, destination)
