"""Cancel in every state, with real VMMs (QEMU's cancel tests, in vmig's terms): while
connecting, twice while cancelling and once more after, after a completed and after a
failed migration; a cancel never affects the next migration, and a cancelled one can be
retried at once to a new destination."""

from __future__ import annotations

import signal
import socket
import time
from typing import Any

from helpers import (
    BUSY_GUEST,
    GUEST,
    Background,
    Spawn,
    expect_api_error,
    heartbeat_grows,
    receive,
    send_in_precopy,
)

from vmig.api.client import ApiClient
from vmig.api.process import VmmProcess

NO_MIGRATION = "cannot cancel: no migration is running"
CANCELLED = "migration cancelled: cancelled by the operator"


def refused(outcome: str) -> str:
    return f"cannot cancel: the migration already {outcome}; nothing was changed"


def outcome(info: dict[str, Any]) -> tuple[Any, ...]:
    """What a cancel's answer says about the migration it ended (not its clock)."""
    return (info["migration_id"], info["active"], info["status"], info["phase"],
            info["outcome"], info["error"])


def migrate(source: VmmProcess, destination: VmmProcess) -> dict[str, Any]:
    """A whole migration that must complete; the destination then runs the guest."""
    url, auth = receive(destination)
    summary = source.client.send_migration(destination_url=url, **auth, connections=2)
    assert summary["status"] == "completed", summary
    assert destination.client.info()["state"] == "running"
    return summary


def test_a_cancel_while_connecting_ends_it_and_the_next_migration_completes(
        spawn_vmm: Spawn) -> None:
    destination = spawn_vmm()
    source = spawn_vmm(*GUEST)
    assert expect_api_error(409, source.client.cancel_migration) == NO_MIGRATION
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never answers a hello
        url = f"tcp:127.0.0.1:{silent.getsockname()[1]}"
        started = source.client.send_migration(wait=False, destination_url=url,
                                               token="0123456789abcdef0123456789abcdef")
        assert started["phase"] == "connecting"
        time.sleep(0.3)  # into the handshake, which would wait a minute for its answer
        info = source.client.cancel_migration()
    assert outcome(info) == (started["id"], False, "cancelled", "cancelled", "cancelled",
                             CANCELLED)
    assert source.client.info()["state"] == "running"
    summary = migrate(source, destination)  # the cancel is not carried over
    assert summary["migration_id"] != started["id"]


def test_a_second_cancel_while_cancelling_and_one_after_answer_the_same(
        spawn_vmm: Spawn) -> None:
    """The destination stopped (SIGSTOP): MAIN cannot take the answer it waits for, so
    the first cancel waits out its grace (2 s), and the second comes meanwhile."""
    destination = spawn_vmm()
    source = spawn_vmm(*BUSY_GUEST)
    url, auth = receive(destination)
    send = send_in_precopy(source, url, auth, reconnect_timeout_s=0)
    destination.proc.send_signal(signal.SIGSTOP)
    try:
        with ApiClient(source.socket_path) as other:
            first = Background(other.cancel_migration)
            first.start()
            time.sleep(0.3)
            second = source.client.cancel_migration()
            first_info = first.outcome(30)
    finally:
        destination.proc.send_signal(signal.SIGCONT)
    assert first_info["status"] == "cancelled" and first_info["error"] == CANCELLED
    assert outcome(second) == outcome(first_info)
    assert outcome(source.client.cancel_migration()) == outcome(first_info)  # after: again
    assert send.outcome()["status"] == "cancelled"
    assert source.client.info()["state"] == "running"
    retried = migrate(source, spawn_vmm())  # at once, to a new destination
    assert retried["migration_id"] != first_info["migration_id"]


def test_a_cancel_after_completion_is_refused_on_both_sides_and_changes_nothing(
        spawn_vmm: Spawn) -> None:
    destination = spawn_vmm()
    source = spawn_vmm(*GUEST)
    migrate(source, destination)
    for side in (source, destination):
        before = side.client.migration_info()
        assert expect_api_error(409, side.client.cancel_migration) == refused("completed")
        assert outcome(side.client.migration_info()) == outcome(before)
    assert source.client.info()["state"] == "migrated"
    info = destination.client.info()
    assert info["state"] == "running" and heartbeat_grows(destination.client, info["heartbeat"])


def test_a_cancel_after_a_failure_is_refused_and_the_next_migration_completes(
        spawn_vmm: Spawn) -> None:
    destination = spawn_vmm()
    source = spawn_vmm(*GUEST)
    url, auth = receive(destination)
    reason = expect_api_error(500, source.client.send_migration, destination_url=url,
                              token="not-the-destination-token")
    failed = source.client.migration_info()
    assert (failed["active"], failed["outcome"], failed["error"]) == (False, "failed", reason)
    assert expect_api_error(409, source.client.cancel_migration) == refused("failed")
    assert outcome(source.client.migration_info()) == outcome(failed)
    info = source.client.info()
    assert info["state"] == "running" and heartbeat_grows(source.client, info["heartbeat"])
    summary = source.client.send_migration(destination_url=url, **auth)  # still waiting
    assert summary["status"] == "completed"
    assert destination.client.check_guest(60)["ok"]
