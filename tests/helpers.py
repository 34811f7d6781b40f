"""Helpers for the tests that drive real `vmig vmm` processes (tests/e2e, tests/kvm).

Guests, waiting, background requests, and the checks every failure path ends with.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from vmig.api.client import ApiClient
from vmig.api.process import VmmProcess
from vmig.errors import ApiError

GUEST = ("--memory", "128M", "--cpus", "2", "--workload", "dirty", "--working-set", "32M",
         "--dirty-rate", "20000")
# Dirties as fast as it can, so some memory is always dirty: with a 0 ms downtime budget
# pre-copy never converges and stays in pre-copy until its timeout (long enough to act in
# the middle of it). A paced guest may be caught with nothing dirty, which converges.
BUSY_GUEST = ("--memory", "128M", "--cpus", "2", "--workload", "dirty", "--working-set",
              "32M", "--dirty-rate", "0")
NEVER_CONVERGES = {"downtime_ms": 0, "timeout_s": 30}
ANY_PORT = "tcp:127.0.0.1:0"
WAIT_S = 20.0

Spawn = Callable[..., VmmProcess]



def counter_growth(counters: Callable[[], dict[str, int]], key: str,
                   timeout: float = 10.0) -> tuple[int, int]:
    """A guest counter now and once it has changed (or at the timeout): a slow host only waits."""
    before = counters()[key]
    deadline = time.monotonic() + timeout
    while (after := counters()[key]) == before and time.monotonic() < deadline:
        time.sleep(0.02)
    return before, after


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def migration_info_or_none(client: ApiClient) -> dict[str, Any] | None:
    """vm.migration-info, or None while no migration has started yet (404)."""
    try:
        return client.migration_info()
    except ApiError as exc:
        if exc.status == 404:
            return None
        raise


def receive(destination: VmmProcess, url: str = ANY_PORT, **params: Any
            ) -> tuple[str, dict[str, str]]:
    """Have `destination` listen; return its URL and what a sender needs to authenticate."""
    reply = destination.client.receive_migration(url, **params)
    return reply["receiver_url"], {"token": reply["token"]} if reply.get("token") else {}


def send_in_precopy(source: VmmProcess, url: str, auth: dict[str, str],
                    connections: int = 1, **params: object) -> Background:
    """Start a send that cannot converge on its own; return once it is in pre-copy."""
    send = Background(lambda: source.client.send_migration(
        destination_url=url, **auth, connections=connections, **NEVER_CONVERGES, **params))
    send.start()
    wait_for(lambda: (info := migration_info_or_none(source.client)) and info["active"]
             and info["phase"] == "precopy", "the source to start pre-copy")
    return send


def kill(vmm: VmmProcess) -> None:
    """SIGKILL a VMM; remove the socket file it cannot remove itself (the fixture checks)."""
    vmm.proc.send_signal(signal.SIGKILL)
    vmm.proc.wait(10)
    os.unlink(vmm.socket_path)


def heartbeat_grows(client: ApiClient, since: int) -> bool:
    """True if the guest's heartbeat passes `since` within WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if client.info()["heartbeat"] > since:
            return True
        time.sleep(0.05)
    return False


def expect_api_error(status: int, call: Callable[..., Any], *args: Any, **kwargs: Any) -> str:
    with pytest.raises(ApiError) as info:
        call(*args, **kwargs)
    assert info.value.status == status, info.value
    message = info.value.message
    assert message and "\n" not in message and "Traceback" not in message
    return message


class Background(threading.Thread):
    """Runs `call()` on a thread, keeping its result or exception."""

    def __init__(self, call: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.call = call
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.call()
        except BaseException as exc:
            self.error = exc

    def outcome(self, timeout: float = 120.0) -> Any:
        self.join(timeout)
        assert not self.is_alive(), "the request did not return"
        if self.error is not None:
            raise self.error
        return self.result


class SourceWatch(threading.Thread):
    """Polls the source's vm.info while it migrates; keeps the last live heartbeat."""

    def __init__(self, socket_path: str) -> None:
        super().__init__(daemon=True)
        self.client = ApiClient(socket_path)
        self.stop = threading.Event()
        self.last_heartbeat: int | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                info = self.client.info()
                if info["state"] in ("running", "paused"):
                    self.last_heartbeat = info["heartbeat"]
                time.sleep(0.01)
        except BaseException as exc:  # reported by __exit__: vm.info must answer throughout
            self.error = exc
        finally:
            self.client.close()

    def __enter__(self) -> SourceWatch:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.join(10)
        assert self.error is None, f"vm.info failed during the migration: {self.error}"


def assert_source_still_healthy(source: VmmProcess) -> None:
    """The source VMM serves, its VM runs, is not busy, and the guest's pages are intact."""
    assert source.running
    assert source.client.ping()["pid"] == source.proc.pid
    info = source.client.info()
    assert info["state"] == "running" and info.get("busy") is None, info
    assert heartbeat_grows(source.client, info["heartbeat"])
    assert source.client.check_guest(60)["ok"]
    source.client.pause()  # the user owns the VM again
    source.client.resume()


def vmig(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmig", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def assert_one_line_error(result: subprocess.CompletedProcess[str], text: str) -> None:
    assert result.returncode == 1, result
    assert result.stdout == "", result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("vmig: error: ") and text in lines[0], result.stderr
