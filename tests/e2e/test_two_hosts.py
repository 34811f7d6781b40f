"""A migration that crosses two network stacks: the destination VMM runs in a network
namespace of its own, joined to the host by a veth pair (once capped with tbf)."""

from __future__ import annotations

import netns
import pytest
from helpers import GUEST, Spawn, receive

pytestmark = pytest.mark.skipif(netns.available() is not None,
                                reason=f"network namespaces: {netns.available()}")


@pytest.mark.parametrize("rate", [None, "1gbit"], ids=["veth", "veth-tbf-1gbit"])
def test_migration_into_another_network_namespace(spawn_vmm: Spawn, rate: str | None) -> None:
    before = netns.existing()
    with netns.two_hosts() as ns:
        if rate is not None:
            ns.cap(rate)
        destination = spawn_vmm(prefix=ns.exec_prefix)
        source = spawn_vmm(*GUEST)
        url, auth = receive(destination, f"tcp:{ns.ns_addr}:0")
        assert url.startswith(f"tcp:{ns.ns_addr}:")
        summary = source.client.send_migration(destination_url=url, **auth, connections=4,
                                               verify_memory=True)
        assert summary["status"] == "completed" and summary["memory_verified"]
        assert summary["connections"] == 4 and summary["peer"] == url
        if rate is not None:  # 1 Gbit/s is 125 MB/s: the cap held
            assert summary["throughput_bytes_per_s"] < 1.3 * 125e6, summary
        assert destination.client.check_guest(60)["ok"]
        destination.stop()
    assert netns.existing() == before  # nothing of ours is left behind
