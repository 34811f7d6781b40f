"""Several connections over UNIX sockets (issue 16 part 6), as KubeVirt carries a migration.

KubeVirt's handler gives each VMM a socket file and proxies every connection over TCP to
the other node: source VMM -> unix socket A -> proxy -> TCP loopback -> proxy -> unix
socket B -> destination VMM listening on unix:B. Two `CutProxy`s play that handler here.
Each data connection is a new connection to the same socket file, so each crosses the
proxies on its own:

- pre-copy over 4 connections completes, and the proxies carried 4;
- post-copy over several connections (its FAULT connection included) completes;
- a MEMORY connection cut by the proxy is re-dialled to the same path and the migration
  completes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from faultproxy import ROLE_MAIN, CutProxy
from helpers import Spawn, receive

from vmig.api.process import VmmProcess

#: 128 MiB, 32 MiB of it rewritten at 2,000 pages/s; at CAP the first pass takes about a
#: second, so there is a pre-copy to cut a connection in the middle of.
GUEST = ("--memory", "128M", "--cpus", "2", "--workload", "dirty", "--working-set", "32M",
         "--dirty-rate", "2000")
#: Dirty enough that post-copy has pages to fetch and push.
POSTCOPY_GUEST = (*GUEST[:-1], "20000")
CAP = "30M"
POSTCOPY = {"postcopy": True, "postcopy_after_iterations": 1, "downtime_ms": 1}
ROLE_MEMORY, ROLE_FAULT = 2, 3

pytestmark = pytest.mark.timeout(90)


@contextmanager
def kubevirt_proxies(destination: VmmProcess, tmp_path: Path, **cut: Any
                     ) -> Iterator[tuple[CutProxy, CutProxy]]:
    """Have `destination` listen on unix:B and put the two proxies in front of it; yield
    (the source's proxy, listening on unix:A, and the destination's, dialling unix:B).
    `cut` goes to the source's proxy."""
    url, auth = receive(destination, f"unix:{tmp_path}/b.sock")
    assert auth == {}  # unix: the socket file's mode, no token
    with (CutProxy(url) as inbound,
          CutProxy(("127.0.0.1", inbound.port), listen_path=f"{tmp_path}/a.sock",
                   **cut) as outbound):
        yield outbound, inbound


def send(source: VmmProcess, outbound: CutProxy, **params: Any) -> dict[str, Any]:
    return source.client.send_migration(destination_url=outbound.url, max_bandwidth=CAP,
                                        timeout_s=30, **params)


def assert_completed(summary: dict[str, Any], source: VmmProcess,
                     destination: VmmProcess) -> None:
    assert summary["status"] == "completed", (summary["status"], summary["error"],
                                              summary["warnings"])
    states = {"source": source.client.info()["state"],
              "destination": destination.client.info()["state"]}
    assert states == {"source": "migrated", "destination": "running"}, states
    assert destination.client.check_guest(60)["ok"], "the guest's self-check failed"


def roles(proxy: CutProxy) -> list[int | None]:
    return [c.role for c in proxy.connections]


def test_four_connections_through_unix_tcp_unix_proxies(spawn_vmm: Spawn,
                                                        tmp_path: Path) -> None:
    destination = spawn_vmm()
    source = spawn_vmm(*GUEST)
    with kubevirt_proxies(destination, tmp_path) as (outbound, inbound):
        summary = send(source, outbound, connections=4, verify_memory=True)
    assert_completed(summary, source, destination)
    assert summary["connections"] == 4 and summary["memory_verified"] is True
    assert summary["warnings"] == [] and summary["reconnects"] == 0
    # Four connections, each dialled anew to unix:A and carried on its own to unix:B.
    for proxy in (outbound, inbound):
        assert roles(proxy) == [ROLE_MAIN, *[ROLE_MEMORY] * 3], roles(proxy)
        assert [c.hello_index for c in proxy.connections] == [0, 1, 2, 3]
    # The destination admitted all four, and memory went over every one of them.
    incoming = destination.client.migration_info()
    assert incoming["connections"] == 4, incoming
    per_connection = incoming["per_connection"]
    assert [c["index"] for c in per_connection] == [0, 1, 2, 3], per_connection
    assert all(c["bytes"] > 0 for c in per_connection[1:]), per_connection


def test_postcopy_over_several_unix_connections(spawn_vmm: Spawn, tmp_path: Path) -> None:
    destination = spawn_vmm()
    source = spawn_vmm(*POSTCOPY_GUEST)
    with kubevirt_proxies(destination, tmp_path) as (outbound, inbound):
        summary = send(source, outbound, connections=3, **POSTCOPY)
    assert_completed(summary, source, destination)
    assert summary["connections"] == 3
    postcopy = summary["postcopy"]
    assert postcopy["pages"] > 0 and postcopy["pages_left"] == 0, postcopy
    # MAIN, 2 MEMORY and post-copy's FAULT connection, all over the socket files.
    for proxy in (outbound, inbound):
        assert sorted(roles(proxy)) == [ROLE_MAIN, ROLE_MEMORY, ROLE_MEMORY, ROLE_FAULT], \
            roles(proxy)
    incoming = destination.client.migration_info()
    assert incoming["postcopy"]["pages_left"] == 0
    assert incoming["postcopy"]["faults_served"] > 0, incoming["postcopy"]


def test_a_lost_memory_connection_is_redialled_over_unix(spawn_vmm: Spawn,
                                                         tmp_path: Path) -> None:
    """The source's proxy cuts the first MEMORY connection 8 MiB into it (a close of
    unix:A on the source's side, an RST on the TCP hop, a close of unix:B on the
    destination's); the source dials unix:A again with the connection's index and its
    resume count up by one, and the migration completes."""
    destination = spawn_vmm()
    source = spawn_vmm(*GUEST)
    with kubevirt_proxies(destination, tmp_path, cut_index=1,
                          cut_after=8 << 20) as (outbound, inbound):
        summary = send(source, outbound, connections=4, verify_memory=True)
        assert outbound.cuts == 1
    assert_completed(summary, source, destination)
    assert summary["memory_verified"] is True
    assert summary["reconnects"] == 1 and summary["reconnecting"] == [], summary
    assert summary["connections_lost"] == 0, summary  # re-dialled, not given up
    # The cut connection came back as itself: index 1, resumed once, on both proxies.
    for proxy in (outbound, inbound):
        again = [(c.hello_index, c.resume_count) for c in proxy.connections
                 if c.role == ROLE_MEMORY and c.hello_index == 1]
        assert again == [(1, 0), (1, 1)], [(c.index, c.role, c.hello_index, c.resume_count)
                                           for c in proxy.connections]
