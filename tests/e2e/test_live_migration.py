"""Live migration end to end: real `vmig vmm` processes, the API and CLI, real sockets.

Every test starts its own VMMs (the `spawn_vmm` fixture): an empty destination
and a source running a guest that keeps dirtying its memory while it migrates.
Guests are small (128 MiB, 32 MiB working set) so that the file runs in a
couple of minutes on two cores; the engine's own paths are covered faster by
tests/kvm/test_migration_engine.py.
"""

from __future__ import annotations

import json
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    ANY_PORT,
    BUSY_GUEST,
    GUEST,
    Background,
    SourceWatch,
    Spawn,
    assert_one_line_error,
    assert_source_still_healthy,
    expect_api_error,
    heartbeat_grows,
    kill,
    migration_info_or_none,
    receive,
    send_in_precopy,
    vmig,
    wait_for,
)

from vmig.errors import ApiError

# --- migrations that work ----------------------------------------------------------------------


@pytest.mark.parametrize(("connections", "local"), [(1, False), (2, False), (4, False),
                                                    (8, False), (1, True)],
                         ids=["tcp-1", "tcp-2", "tcp-4", "tcp-8", "unix-local"])
def test_live_migration_of_a_dirtying_guest(spawn_vmm: Spawn, tmp_path: Path, connections: int,
                                            local: bool) -> None:
    destination = spawn_vmm()
    source = spawn_vmm(*GUEST)
    wanted = f"unix:{tmp_path}/migration.sock" if local else ANY_PORT
    url, auth = receive(destination, wanted)
    assert bool(auth) is not local  # tcp: a token was made; unix: the socket's mode
    assert url == wanted if local else url.startswith("tcp:127.0.0.1:") and url != ANY_PORT
    assert destination.client.info() == {"state": "receiving", "receiver_url": url}
    before = source.client.info()
    assert before["state"] == "running" and heartbeat_grows(source.client, before["heartbeat"])

    with SourceWatch(source.socket_path) as watch:
        summary = source.client.send_migration(destination_url=url, **auth, connections=connections,
                                               local=local, verify_memory=True)

    assert summary["status"] == "completed" and summary["connections"] == connections
    assert summary["memory_verified"] is True and summary["local"] is local
    assert summary["warnings"] == []
    if local:
        assert summary["bytes_transferred"] == 0  # the memory fd was handed over, nothing copied
    else:
        assert summary["bytes_transferred"] >= 32 << 20 and summary["iterations"] >= 2
    assert summary["downtime_ms"] <= summary["elapsed_ms"]
    assert source.client.info()["state"] == "migrated"

    after = destination.client.info()
    assert after["state"] == "running" and after["cpus"] == 2 and after["workload"] == "dirty"
    # the guest went on from where it was: at least the source's last value (the watch may
    # not have seen one if the migration was quick) and the value when the source paused
    assert after["heartbeat"] >= summary["heartbeat_at_pause"] >= before["heartbeat"]
    if watch.last_heartbeat is not None:
        assert after["heartbeat"] >= watch.last_heartbeat
    assert heartbeat_grows(destination.client, after["heartbeat"])
    assert destination.client.check_guest(60)["ok"]

    for side, role in ((source, "send"), (destination, "receive")):
        # the receiver stays active until its threads are joined, just after the hand-over
        info = wait_for(lambda s=side: (i := s.client.migration_info()) and not i["active"]
                        and i, "the migration to wind down")
        assert (info["role"], info["phase"], info["status"]) == (role, "completed", "completed")
        assert info["error"] is None
    if local:
        assert not (tmp_path / "migration.sock").exists()


def test_migration_info_and_vm_info_answer_during_a_migration(spawn_vmm: Spawn) -> None:
    destination = spawn_vmm()
    source = spawn_vmm(*BUSY_GUEST)
    expect_api_error(404, source.client.migration_info)
    url, auth = receive(destination, ANY_PORT)
    listening = destination.client.migration_info()
    assert (listening["active"], listening["role"], listening["phase"]) == (True, "receive",
                                                                           "listening")
    # A 0 ms budget is never met; after 5 s of pre-copy, "ignore" switches over anyway
    # (time enough for the checks below on a slow host).
    send = Background(lambda: source.client.send_migration(
        destination_url=url, **auth, connections=2, downtime_ms=0, timeout_s=5,
        timeout_strategy="ignore", verify_memory=True))
    send.start()

    def in_later_iteration() -> dict[str, Any] | None:
        assert send.is_alive(), f"the send ended before it was seen in pre-copy: {send.outcome()}"
        info = migration_info_or_none(source.client)
        if info and info["active"] and info["phase"] == "precopy" and info["iterations"] >= 1:
            return info
        return None

    seen = wait_for(in_later_iteration, "the source to report pre-copy iterations")
    assert seen["role"] == "send" and seen["connections"] == 2
    assert seen["bytes_transferred"] > 0 and seen["memory_bytes"] == 128 << 20
    info = source.client.info()  # vm.info is not blocked by the send
    assert info["state"] == "running" and info["busy"] == "migrating"
    incoming = destination.client.migration_info()
    assert (incoming["active"], incoming["role"], incoming["phase"]) == (True, "receive",
                                                                        "receiving")
    assert destination.client.info()["state"] == "receiving"
    # The VM is taken while it migrates.
    assert "already running" in expect_api_error(
        409, source.client.send_migration, destination_url=url, **auth)
    assert "migrating" in expect_api_error(409, source.client.pause)
    assert "migrating" in expect_api_error(409, source.client.shutdown)
    assert "awaited" in expect_api_error(409, destination.client.create, memory="64M")

    summary = send.outcome()
    assert summary["status"] == "completed" and summary["memory_verified"]
    done = source.client.migration_info()
    assert (done["active"], done["phase"], done["bytes_remaining"]) == (False, "completed", 0)
    assert destination.client.check_guest(60)["ok"]


# --- refused requests --------------------------------------------------------------------------


TOKEN = "e2e-test-token-0123456789"

BAD_SENDS = [
    ({"connections": 0}, "connections: input should be greater than or equal to 1"),
    ({"connections": 129}, "connections: input should be less than or equal to 128"),
    ({"token": None}, "token: a tcp: destination needs the token"),
    ({"token": "short"}, "token: must be at least 16 characters"),
    ({"connections": 2, "local": True}, "connections: must be 1 when local is true"),
    ({"local": True}, "local: needs a unix: destination_url"),
    ({"destination_url": "http://example.com"}, "destination_url: bad migration URL"),
    ({"destination_url": "tcp:127.0.0.1"}, "destination_url: bad migration URL"),
    ({"timeout_strategy": "later"},
     "timeout_strategy: input should be 'cancel', 'ignore' or 'postcopy'"),
    ({"downtime_ms": -1}, "downtime_ms: input should be greater than or equal to 0"),
    ({"timeout_s": 0}, "timeout_s: input should be greater than 0"),
]

CLI_FLAGS = {"connections": "--connections", "downtime_ms": "--downtime-ms",
             "timeout_s": "--timeout-s", "timeout_strategy": "--timeout-strategy",
             "token": "--token"}


def cli_args(params: dict[str, Any]) -> list[str]:
    args = [params["destination_url"]]
    for name, value in params.items():
        if name == "local":
            args.append("--local")
        elif name != "destination_url" and value is not None:
            args += [CLI_FLAGS[name], str(value)]
    return args


def test_bad_parameters_are_refused_with_one_line_naming_the_field(spawn_vmm: Spawn) -> None:
    source = spawn_vmm("--memory", "64M")
    for params, message in BAD_SENDS:
        request = {"destination_url": "tcp:127.0.0.1:1", "token": TOKEN, **params}
        assert expect_api_error(400, source.client.send_migration, **request).startswith(
            message), params
        result = vmig("remote", "--api-socket", source.socket_path, "send-migration",
                      *cli_args(request))
        if "input should be" not in message:
            assert_one_line_error(result, f"vmig: error: {message}")
        else:  # a limit or a choice: click's own usage error, naming the flag (exit 2)
            flag = CLI_FLAGS[message.split(":")[0]]
            assert result.returncode == 2 and f"Invalid value for '{flag}'" in result.stderr

    empty = spawn_vmm()
    for url, max_connections, message in (
            ("http://x", None, "receiver_url: bad migration URL 'http://x'"),
            ("tcp:127.0.0.1:0", 0, "max_connections: input should be greater than or equal"),
            ("tcp:127.0.0.1:0", 129, "max_connections: input should be less than or equal")):
        assert expect_api_error(400, empty.client.receive_migration, url,
                                max_connections=max_connections).startswith(message)
        args = [url] + ([] if max_connections is None else ["--max-connections",
                                                            str(max_connections)])
        result = vmig("remote", "--api-socket", empty.socket_path, "receive-migration", *args)
        if max_connections is None:
            assert_one_line_error(result, message)
        else:
            assert result.returncode == 2
            assert "Invalid value for '--max-connections'" in result.stderr
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    with busy:
        port = busy.getsockname()[1]
        message = expect_api_error(400, empty.client.receive_migration, f"tcp:127.0.0.1:{port}")
        assert message.startswith(f"receiver_url: cannot listen on tcp:127.0.0.1:{port}")

    # Nothing was started: the VM runs untouched, and no migration has run on either VMM.
    assert_source_still_healthy(source)
    for vmm in (source, empty):
        assert "no migration has run" in expect_api_error(404, vmm.client.migration_info)
    assert empty.client.info() == {"state": "empty"}
    # The state rules: no VM to send, a VM in the way of receiving.
    assert "no VM" in expect_api_error(409, empty.client.send_migration,
                                       destination_url="tcp:127.0.0.1:1", token=TOKEN)
    assert "a VM already exists" in expect_api_error(409, source.client.receive_migration,
                                                     ANY_PORT)


# --- migrations that fail ----------------------------------------------------------------------


def test_destination_killed_mid_migration_leaves_the_source_running(spawn_vmm: Spawn) -> None:
    doomed = spawn_vmm()
    source = spawn_vmm(*BUSY_GUEST)
    url, auth = receive(doomed, ANY_PORT)
    # re-dialled for reconnect_timeout_s: 2 s is enough to see it, the 30 s default is slow
    send = send_in_precopy(source, url, auth, connections=4, reconnect_timeout_s=2)
    kill(doomed)

    with pytest.raises(ApiError) as failure:
        send.outcome()
    assert failure.value.status == 500
    assert "\n" not in failure.value.message and failure.value.message
    info = source.client.migration_info()
    assert (info["active"], info["phase"]) == (False, "failed")
    assert info["error"] and info["error"] in failure.value.message
    assert_source_still_healthy(source)

    # A second attempt, to a fresh destination, succeeds.
    destination = spawn_vmm()
    url, auth = receive(destination, ANY_PORT)
    summary = source.client.send_migration(destination_url=url, **auth, connections=4,
                                           verify_memory=True)
    assert summary["status"] == "completed" and summary["memory_verified"]
    assert source.client.info()["state"] == "migrated"
    assert destination.client.check_guest(60)["ok"]


def test_source_killed_mid_migration_leaves_the_destination_empty_and_reusable(
        spawn_vmm: Spawn) -> None:
    destination = spawn_vmm()
    doomed = spawn_vmm(*BUSY_GUEST)
    url, auth = receive(destination, ANY_PORT)
    # the destination waits for the source to resume for reconnect + dead-peer timeouts
    send = send_in_precopy(doomed, url, auth, connections=4, reconnect_timeout_s=2,
                           dead_peer_timeout_s=2)
    kill(doomed)
    with pytest.raises(ApiError):
        send.outcome()

    # The destination discards what it received and says why.
    info = wait_for(lambda: (i := destination.client.info())["state"] == "empty" and i,
                    "the destination to discard the migration")
    assert info["last_error"]
    assert destination.client.migration_info()["phase"] == "failed"

    # It can receive again: a fresh source migrates to it.
    url, auth = receive(destination, ANY_PORT)
    source = spawn_vmm(*GUEST)
    summary = source.client.send_migration(destination_url=url, **auth, connections=2,
                                           verify_memory=True)
    assert summary["status"] == "completed"
    assert destination.client.check_guest(60)["ok"]


def test_destination_refusing_connections_fails_cleanly_then_a_retry_works(
        spawn_vmm: Spawn) -> None:
    destination = spawn_vmm()
    source = spawn_vmm(*GUEST)
    url, auth = receive(destination, ANY_PORT, max_connections=2)
    message = expect_api_error(500, source.client.send_migration, destination_url=url,
                               connections=4, **auth)
    assert "accepted only 1 of 3 extra connections" in message
    assert "takes at most 2 connections" in message
    assert_source_still_healthy(source)

    # The destination is empty again and says why.
    info = wait_for(lambda: (i := destination.client.info())["state"] == "empty" and i,
                    "the destination to give up")
    assert info["last_error"] and "\n" not in info["last_error"]
    incoming = destination.client.migration_info()
    assert (incoming["active"], incoming["phase"]) == (False, "failed")
    assert incoming["error"] == info["last_error"]

    # The same destination can receive again, and this time all connections are taken.
    url, auth = receive(destination, ANY_PORT)
    assert "last_error" not in destination.client.info()
    summary = source.client.send_migration(destination_url=url, **auth, connections=4,
                                           verify_memory=True)
    assert summary["connections"] == 4 and summary["memory_verified"]
    assert destination.client.info()["state"] == "running"
    assert destination.client.check_guest(60)["ok"]


@pytest.mark.parametrize("how", ["vmm.shutdown", "SIGTERM"])
def test_stopping_the_source_vmm_interrupts_its_send(spawn_vmm: Spawn, how: str) -> None:
    destination = spawn_vmm()
    source = spawn_vmm(*BUSY_GUEST)
    url, auth = receive(destination, ANY_PORT)
    send = send_in_precopy(source, url, auth)
    began = time.monotonic()
    if how == "SIGTERM":
        source.signal(signal.SIGTERM)
    else:
        source.client.shutdown_vmm()
    assert source.proc.wait(20) == 0
    assert time.monotonic() - began < 10  # not the 30 s pre-copy timeout
    assert "Traceback" not in source.stderr_text()
    try:  # the answer may or may not make it out before the server stops
        summary = send.outcome()
    except ApiError:
        pass
    else:
        assert summary["status"] == "cancelled"
        assert summary["error"] == "migration cancelled: the VMM is shutting down"
    info = wait_for(lambda: (i := destination.client.info())["state"] == "empty" and i,
                    "the destination to give up")
    assert "cancelled: the VMM is shutting down" in info["last_error"]


def test_sigterm_cancels_receiving(spawn_vmm: Spawn) -> None:
    destination = spawn_vmm()
    url, _ = receive(destination, ANY_PORT)
    port = int(url.rsplit(":", 1)[1])
    destination.signal(signal.SIGTERM)
    assert destination.proc.wait(20) == 0
    assert "Traceback" not in destination.stderr_text()
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), 5):
        pass


# --- the CLI -----------------------------------------------------------------------------------


def test_cli_receive_and_send(spawn_vmm: Spawn, tmp_path: Path) -> None:
    destination = spawn_vmm()
    source = spawn_vmm(*GUEST)
    result = vmig("remote", "--api-socket", destination.socket_path, "receive-migration",
                  ANY_PORT, "--max-connections", "4", "--json")
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)  # one JSON object and nothing else
    url, token = reply["receiver_url"], reply["token"]
    assert url.startswith("tcp:127.0.0.1:") and reply["security"] == "token"
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    result = vmig("remote", "--api-socket", source.socket_path, "send-migration", url,
                  "--connections", "4", "--verify-memory", "--downtime-ms", "200", "--json",
                  "--token-file", str(token_file))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)  # one JSON object and nothing else
    assert summary["status"] == "completed" and summary["connections"] == 4
    assert summary["memory_verified"] is True
    result = vmig("remote", "--api-socket", destination.socket_path, "migration-info")
    assert json.loads(result.stdout)["phase"] == "completed"
    assert destination.client.check_guest(60)["ok"]
    result = vmig("remote", "--api-socket", source.socket_path, "send-migration", url,
                  "--token", token)
    assert_one_line_error(result, "cannot send a migration: VM is migrated, it must be")

    # And back: the source VMM, its VM migrated away, can receive it again. Not on a
    # terminal and without --json, the summary is printed for people, with no progress bar.
    result = vmig("remote", "--api-socket", source.socket_path, "receive-migration", ANY_PORT,
                  "--token", TOKEN)
    lines = result.stdout.splitlines()  # for people: the URL, then what secures it
    assert lines[0].startswith("receiver_url: tcp:127.0.0.1:") and "token:" not in result.stdout
    back = lines[0].split()[1]
    result = vmig("remote", "--api-socket", destination.socket_path, "send-migration", back,
                  "--connections", "2", "--token", TOKEN)
    assert result.returncode == 0, result.stderr
    assert "completed" in result.stdout and "throughput" in result.stdout
    assert "━" not in result.stdout  # no progress bar
    assert source.client.info()["state"] == "running"
    assert source.client.check_guest(60)["ok"]
