"""A destination that falls silent in the middle of pre-copy is found in dead_peer_timeout_s.

Two real `vmig vmm` processes: the destination in a network namespace behind a
router (tests/netns.py), the source on the host with a guest that keeps
dirtying its memory. In pre-copy the path between them starts dropping every
packet without a word (no RST, no ICMP, both links up), as a crashed host or a
broken network does. Without dead-peer detection the source would wait for its
60 s read timeout (a blocked send has none at all).
"""

from __future__ import annotations

import time

import netns
import pytest
from helpers import (
    BUSY_GUEST,
    NEVER_CONVERGES,
    Background,
    Spawn,
    assert_source_still_healthy,
    migration_info_or_none,
    receive,
    wait_for,
)

from vmig.errors import ApiError
from vmig.transport.liveness import DEAD_PEER_TIMEOUT_S
from vmig.transport.stream import IO_TIMEOUT_S

pytestmark = pytest.mark.skipif(netns.available() is not None,
                                reason=f"network namespaces: {netns.available()}")

DEAD_PEER_S = 2
SLACK_S = 2.0  # the failure's way up: threads joined, the VM resumed, the reply sent


def test_a_destination_that_falls_silent_in_precopy_is_found_in_time(spawn_vmm: Spawn) -> None:
    before = netns.existing()
    with netns.two_hosts(routed=True) as ns:
        destination = spawn_vmm(prefix=ns.exec_prefix)
        source = spawn_vmm(*BUSY_GUEST)
        url, auth = receive(destination, f"tcp:{ns.ns_addr}:0")
        send = Background(lambda: source.client.send_migration(
            destination_url=url, **auth, connections=4, reconnect_timeout_s=0,
            dead_peer_timeout_s=DEAD_PEER_S, **NEVER_CONVERGES))
        send.start()
        wait_for(lambda: (info := migration_info_or_none(source.client)) and info["active"]
                 and info["phase"] == "precopy" and info["iterations"] >= 2,
                 "the source to be in pre-copy, past its first pass")
        try:
            ns.silence()
            silent_at = time.monotonic()
            with pytest.raises(ApiError) as failure:
                send.outcome(IO_TIMEOUT_S + 30)
            found_in = time.monotonic() - silent_at
            assert found_in < DEAD_PEER_S + SLACK_S, (found_in, failure.value.message)
            # The kernel's "the peer is silent", or (protocol v3) MAIN's heartbeat "timed out".
            message = failure.value.message
            assert "silent" in message or "timed out" in message, message
            info = source.client.migration_info()
            assert (info["active"], info["phase"]) == (False, "failed"), info

            # The destination finds the source silent too and discards what it received:
            # at the 10 s default here (keepalive on its idle MAIN reader); in about
            # DEAD_PEER_S where START carries the sender's value (protocol v3: measured
            # 2.3 s with the integrator's heartbeat timeout on MAIN).
            info = wait_for(lambda: (i := destination.client.info())["state"] == "empty"
                            and i, "the destination to discard the migration",
                            timeout=DEAD_PEER_TIMEOUT_S + SLACK_S + 5)
            discarded_in = time.monotonic() - silent_at
            assert discarded_in < DEAD_PEER_TIMEOUT_S + SLACK_S, discarded_in
            assert info["last_error"]
            assert destination.client.migration_info()["phase"] == "failed"
        finally:
            ns.restore()
        assert_source_still_healthy(source)  # running, its guest intact
        destination.stop()
    assert netns.existing() == before
