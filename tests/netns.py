"""A second "host" on this machine: a network namespace joined to the host by a veth pair.

`two_hosts()` makes the namespace, the veth pair (one end moved into it) and a /24
between them, and removes all of it on the way out, whatever happened (the
namespace's end of the pair goes with the namespace; the host's end goes with
its peer). `cap(rate)` puts a `tbf` queueing discipline on the host's end, so the
traffic towards the namespace is limited like a slower link (`netem` is not
available on these kernels). Needs root and iproute2's `ip` and `tc`.
"""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

PREFIX = "vmigt"  # namespaces and interfaces this module makes start with it


def _run(*args: str) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


@dataclass(frozen=True)
class Namespace:
    name: str
    host_if: str  # the host's end of the veth pair
    host_addr: str
    ns_addr: str  # the namespace's end

    @property
    def exec_prefix(self) -> tuple[str, ...]:
        """Run a command inside the namespace: prefix its argv with this."""
        return ("ip", "netns", "exec", self.name)

    def cap(self, rate: str, burst: str = "512kb", latency: str = "100ms") -> None:
        """Limit host -> namespace traffic to `rate` (e.g. "1gbit") with a tbf qdisc."""
        _run("tc", "qdisc", "replace", "dev", self.host_if, "root", "tbf", "rate", rate,
             "burst", burst, "latency", latency)


def available() -> str | None:
    """None if namespaces can be made here, or why not."""
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("ip", "tc"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            return f"needs iproute2's {tool}"
    return None


def existing() -> list[str]:
    """Namespaces of ours that exist now (a leak check)."""
    names = _run("ip", "netns", "list").split()
    return [name for name in names if name.startswith(PREFIX)]


@contextlib.contextmanager
def two_hosts() -> Iterator[Namespace]:
    tag = f"{os.getpid() % 10000}{random.randrange(100, 1000)}"
    subnet = random.randrange(1, 250)
    ns = Namespace(name=f"{PREFIX}{tag}", host_if=f"{PREFIX}h{tag}",
                   host_addr=f"10.231.{subnet}.1", ns_addr=f"10.231.{subnet}.2")
    peer = f"{PREFIX}n{tag}"
    try:
        _run("ip", "netns", "add", ns.name)
        _run("ip", "link", "add", ns.host_if, "type", "veth", "peer", "name", peer)
        _run("ip", "link", "set", peer, "netns", ns.name)
        _run("ip", "addr", "add", f"{ns.host_addr}/24", "dev", ns.host_if)
        _run("ip", "link", "set", ns.host_if, "up")
        _run("ip", "-n", ns.name, "addr", "add", f"{ns.ns_addr}/24", "dev", peer)
        _run("ip", "-n", ns.name, "link", "set", peer, "up")
        _run("ip", "-n", ns.name, "link", "set", "lo", "up")
        yield ns
    finally:
        with contextlib.suppress(RuntimeError):
            _run("ip", "netns", "del", ns.name)
        with contextlib.suppress(RuntimeError):
            _run("ip", "link", "del", ns.host_if)
