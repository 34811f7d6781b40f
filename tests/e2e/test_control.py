"""Control and resilience, with real VMMs: cancel from either side, paused VMs stay paused, a
lost data connection is survived, downtime overruns are reported.

Every cancelled or failed migration must end with exactly one running VM (the source's),
the destination empty and able to receive again, and a one-line reason.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from faultproxy import CutProxy
from helpers import (
    BUSY_GUEST,
    GUEST,
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
from vmig.transport.address import parse_url

BIG_GUEST = ("--memory", "256M", "--cpus", "2", "--workload", "dirty", "--working-set", "128M",
             "--dirty-rate", "20000")


def assert_empty_and_reusable(destination: VmmProcess, source: VmmProcess) -> None:
    """The destination dropped what it had, says why, and takes the next migration."""
    info = wait_for(lambda: (i := destination.client.info())["state"] == "empty" and i,
                    "the destination to be empty")
    assert info["last_error"] and "\n" not in info["last_error"]
    url, auth = receive(destination)
    summary = source.client.send_migration(destination_url=url, **auth, connections=2,
                                           verify_memory=True)
    assert summary["status"] == "completed" and summary["memory_verified"]
    assert destination.client.check_guest(60)["ok"]


def test_cancel_from_the_source_in_the_middle_of_precopy(spawn_vmm: Spawn) -> None:
    destination = spawn_vmm()
    source = spawn_vmm(*BUSY_GUEST)
    url, auth = receive(destination)
    send = send_in_precopy(source, url, auth, connections=4)
    info = source.client.cancel_migration()  # answers once the migration has wound down
    assert (info["active"], info["status"], info["phase"]) == (False, "cancelled", "cancelled")
    summary = send.outcome()
    assert summary["status"] == "cancelled"
    assert summary["error"] == "migration cancelled: cancelled by the operator"
    assert_source_still_healthy(source)
    empty = wait_for(lambda: (i := destination.client.info())["state"] == "empty" and i,
                     "the destination to discard the migration")
    assert "cancelled by the operator" in empty["last_error"]  # ABANDON said why
    incoming = destination.client.migration_info()
    assert incoming["status"] == "cancelled" and incoming["active"] is False  # ABANDON said so
    assert_empty_and_reusable(destination, source)


def test_cancel_from_the_destination_in_the_middle_of_precopy(spawn_vmm: Spawn) -> None:
    destination = spawn_vmm()
    source = spawn_vmm(*BUSY_GUEST)
    url, auth = receive(destination)
    # The cancel's answer reaches the source on MAIN (its heartbeat, every few seconds)
    # while the data connections the destination closed are being re-dialled: those give
    # up then, not at the end of their 30 s window.
    send = send_in_precopy(source, url, auth, connections=4)
    info = destination.client.cancel_migration()
    cancelled_at = time.monotonic()
    assert (info["active"], info["status"]) == (False, "cancelled")
    summary = send.outcome()
    assert time.monotonic() - cancelled_at < 20, "the source waited out its re-dial window"
    assert summary["status"] == "cancelled"
    assert summary["error"].startswith("the destination cancelled the migration: migration "
                                       "cancelled at the destination: cancelled by the operator")
    assert_source_still_healthy(source)
    assert_empty_and_reusable(destination, source)


def test_a_waiting_receiver_is_cancelled_and_can_receive_again(spawn_vmm: Spawn) -> None:
    destination = spawn_vmm()
    source = spawn_vmm(*GUEST)
    url, _ = receive(destination)
    info = destination.client.cancel_migration()
    assert (info["active"], info["status"], info["phase"]) == (False, "cancelled", "cancelled")
    address = parse_url(url)
    with pytest.raises(ConnectionRefusedError), socket.create_connection(
            (address.host, address.port), 5):
        pass
    assert_empty_and_reusable(destination, source)
    message = expect_api_error(409, destination.client.cancel_migration)  # the VM runs here
    assert message == "cannot cancel: the migration already completed; nothing was changed"


def test_ctrl_c_on_send_migration_cancels_through_the_api(spawn_vmm: Spawn) -> None:
    destination = spawn_vmm()
    source = spawn_vmm(*BUSY_GUEST)
    url, auth = receive(destination)
    command = [sys.executable, "-m", "vmig", "remote", "--api-socket", source.socket_path,
               "send-migration", url, "--token", auth["token"], "--downtime-ms", "0",
               "--timeout-s", "30", "--max-bandwidth", "50M", "--json"]  # far from 1000 passes
    cli = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    try:
        def in_precopy() -> bool:
            assert cli.poll() is None, f"the CLI ended early: {cli.communicate()}"
            info = migration_info_or_none(source.client)
            return bool(info and info["active"] and info["phase"] == "precopy")

        wait_for(in_precopy, "the source to start pre-copy")
        cli.send_signal(signal.SIGINT)
        try:
            out, err = cli.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # where it hangs: faulthandler's dump on SIGABRT
            cli.send_signal(signal.SIGABRT)
            out, err = cli.communicate(timeout=10)
            pytest.fail(f"the CLI did not end 30 s after Ctrl-C: {out!r} {err!r}; the "
                        f"source: {migration_info_or_none(source.client)}")
    finally:
        if cli.poll() is None:
            cli.kill()
    assert cli.returncode == 1, err
    assert '"status": "cancelled"' in out, err
    assert err.strip().splitlines()[-1] == ("vmig: error: migration cancelled: cancelled by "
                                            "the operator; the VM keeps running here")
    assert_source_still_healthy(source)


def test_a_paused_vm_arrives_paused_and_runs_after_resume(spawn_vmm: Spawn) -> None:
    destination = spawn_vmm()
    source = spawn_vmm(*GUEST)
    source.client.pause()
    url, auth = receive(destination)
    summary = source.client.send_migration(destination_url=url, **auth, connections=2,
                                           verify_memory=True)
    assert summary["status"] == "completed" and summary["paused"] is True
    assert summary["downtime_ms"] is None  # the guest was paused throughout
    assert summary["memory_verified"]
    info = destination.client.info()
    assert info["state"] == "paused"
    time.sleep(0.3)
    assert destination.client.info()["heartbeat"] == info["heartbeat"]  # not running
    destination.client.resume()
    assert heartbeat_grows(destination.client, info["heartbeat"])
    assert destination.client.check_guest(60)["ok"]
    incoming = destination.client.migration_info()
    assert incoming["paused"] is True and incoming["status"] == "completed"


@pytest.mark.parametrize("verify_memory", [True, False], ids=["verify", "no-verify"])
def test_a_cut_data_connection_is_survived(spawn_vmm: Spawn, verify_memory: bool) -> None:
    """Not re-dialled (reconnect_timeout_s 0, as version 2): its chunks go to the others;
    memory is verified even when not asked for (the destination might still write the
    rest of the lost chunk after its second copy: no fence). Resumed connections:
    tests/e2e/test_network_outage.py."""
    destination = spawn_vmm()
    source = spawn_vmm(*BIG_GUEST)
    url, auth = receive(destination)
    address = parse_url(url)
    # The third connection (MAIN is the first) is cut after 8 MiB of its data.
    with CutProxy((address.host, address.port), cut_index=2, cut_after=8 << 20) as proxy:
        summary = source.client.send_migration(destination_url=proxy.url, **auth,
                                               connections=4, verify_memory=verify_memory,
                                               reconnect_timeout_s=0)
        assert proxy.cuts == 1
    assert summary["status"] == "completed" and summary["memory_verified"]
    assert summary["connections"] == 4 and summary["connections_lost"] == 1
    lost = [c for c in summary["per_connection"] if c["lost"]]
    assert [c["index"] for c in lost] == [2]
    warning = next(w for w in summary["warnings"] if w.startswith("connection 2 (MEMORY) lost"))
    assert "unacknowledged chunks went to the other connections" in warning
    assert ("memory will be verified" in warning) is not verify_memory
    assert destination.client.check_guest(60)["ok"]
    incoming = destination.client.migration_info()
    assert incoming["connections_lost"] == 1 and incoming["status"] == "completed"


def test_a_cut_main_connection_fails_cleanly(spawn_vmm: Spawn) -> None:
    """Without a re-dial window (reconnect_timeout_s 0) a lost MAIN ends the migration."""
    destination = spawn_vmm()
    source = spawn_vmm(*BIG_GUEST)
    url, auth = receive(destination)
    address = parse_url(url)
    with CutProxy((address.host, address.port), cut_index=0, cut_after=4 << 20) as proxy:
        message = expect_api_error(500, source.client.send_migration,
                                   destination_url=proxy.url, **auth, connections=4,
                                   reconnect_timeout_s=0)
        assert proxy.cuts == 1
    assert "MAIN connection" in message or "main" in message.lower()
    assert_source_still_healthy(source)
    assert_empty_and_reusable(destination, source)


def test_a_downtime_over_the_budget_is_reported(spawn_vmm: Spawn) -> None:
    destination = spawn_vmm()
    source = spawn_vmm(*BUSY_GUEST)
    url, auth = receive(destination)
    summary = source.client.send_migration(destination_url=url, **auth, downtime_ms=1,
                                           timeout_s=0.5, timeout_strategy="ignore")
    assert summary["status"] == "completed" and summary["downtime_ms"] > 1
    assert f"downtime {summary['downtime_ms']:.1f} ms exceeded the 1 ms budget" in \
        summary["warnings"]
    assert destination.client.check_guest(60)["ok"]
