"""A second "host" on this machine: a network namespace joined to the host by a veth pair.

`two_hosts()` makes the namespace, the veth pair (one end moved into it) and a /24
between them, and removes all of it on the way out, whatever happened (the
namespace's end of the pair goes with the namespace; the host's end goes with
its peer). `cap(rate)` puts a `tbf` queueing discipline on the host's end, so the
traffic towards the namespace is limited like a slower link (`netem` is not
available on these kernels). Needs root and iproute2's `ip` and `tc`.

`two_hosts(routed=True)` puts a third namespace between them as a router (two
veth pairs, a /24 each side), so that `silence()` can make the path between the
two hosts drop everything without a word, as a crashed host or a broken network
does: blackhole routes in the router, which answer nothing (no RST, no ICMP) and
leave both hosts' links, routes and ARP as they were, so neither end notices
anything locally either. `restore()` takes them away. The two simpler ways were
measured and are not that: setting the namespace's end of the veth down takes the
carrier from the host's end, its ARP entry fails and the host's TCP reports "No
route to host"; a `tbf` that drops everything drops at the sender's own queue,
which TCP takes for local congestion, and keepalive then never gives up.

`inside()` runs a block of this process's code in the namespace (setns on the
calling thread), so a socket made there, a listener say, lives in its stack:
one test process can hold both ends of a connection that crosses the two.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

PREFIX = "vmigt"  # namespaces and interfaces this module makes start with it
CLONE_NEWNET = 0x40000000  # linux/sched.h
_libc = ctypes.CDLL(None, use_errno=True)


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

    router: str | None = None  # the namespace between the two (two_hosts(routed=True))

    @property
    def exec_prefix(self) -> tuple[str, ...]:
        """Run a command inside the namespace: prefix its argv with this."""
        return ("ip", "netns", "exec", self.name)

    def silence(self) -> None:
        """Drop every packet between the host and the namespace, silently, both ways."""
        for address in self._ends():
            _run("ip", "-n", self._router(), "route", "add", "blackhole", f"{address}/32")

    def restore(self) -> None:
        """Undo `silence()`: the path carries packets again (open connections go on)."""
        for address in self._ends():
            _run("ip", "-n", self._router(), "route", "del", "blackhole", f"{address}/32")

    @contextlib.contextmanager
    def silent(self) -> Iterator[None]:
        """The path is silent for the block."""
        self.silence()
        try:
            yield
        finally:
            self.restore()

    @contextlib.contextmanager
    def inside(self) -> Iterator[None]:
        """Run the block with the calling thread in the namespace's network stack;
        sockets made in it stay there after it."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            target = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
            try:
                _setns(target)
            finally:
                os.close(target)
            try:
                yield
            finally:
                _setns(own)
        finally:
            os.close(own)

    def _ends(self) -> tuple[str, str]:
        return (self.ns_addr, self.host_addr)

    def _router(self) -> str:
        if self.router is None:
            raise RuntimeError("silence() needs two_hosts(routed=True)")
        return self.router

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
def two_hosts(*, routed: bool = False) -> Iterator[Namespace]:
    """The namespace, joined to the host directly or (`routed`) through a router."""
    tag = f"{os.getpid() % 10000}{random.randrange(100, 1000)}"
    subnet = random.randrange(1, 250)
    host_net, far_net = f"10.231.{subnet}", f"10.232.{subnet}"
    router = f"{PREFIX}r{tag}" if routed else None
    ns = Namespace(name=f"{PREFIX}{tag}", host_if=f"{PREFIX}h{tag}",
                   host_addr=f"{host_net}.1", ns_addr=f"{far_net if routed else host_net}.2",
                   router=router)
    peer = f"{PREFIX}n{tag}"
    try:
        _run("ip", "netns", "add", ns.name)
        if router is None:
            _veth(ns.host_if, None, f"{ns.host_addr}/24", peer, ns.name, f"{ns.ns_addr}/24")
        else:
            _run("ip", "netns", "add", router)
            _run("ip", "netns", "exec", router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            _veth(ns.host_if, None, f"{ns.host_addr}/24", f"{PREFIX}a{tag}", router,
                  f"{host_net}.2/24")
            _veth(f"{PREFIX}b{tag}", router, f"{far_net}.1/24", peer, ns.name,
                  f"{ns.ns_addr}/24")
            _run("ip", "route", "add", f"{far_net}.0/24", "via", f"{host_net}.2",
                 "dev", ns.host_if)
            _run("ip", "-n", ns.name, "route", "add", "default", "via", f"{far_net}.1")
        _run("ip", "-n", ns.name, "link", "set", "lo", "up")
        yield ns
    finally:
        for name in (ns.name, router):
            if name is not None:
                with contextlib.suppress(RuntimeError):
                    _run("ip", "netns", "del", name)
        with contextlib.suppress(RuntimeError):  # its route to far_net goes with it
            _run("ip", "link", "del", ns.host_if)


def _veth(left: str, left_ns: str | None, left_addr: str, right: str, right_ns: str,
          right_addr: str) -> None:
    """A veth pair from `left` (in `left_ns`, None: the host) to `right` (in
    `right_ns`), both ends up with an address each."""
    where = () if left_ns is None else ("-n", left_ns)
    _run("ip", *where, "link", "add", left, "type", "veth", "peer", "name", right,
         "netns", right_ns)
    _run("ip", *where, "addr", "add", left_addr, "dev", left)
    _run("ip", *where, "link", "set", left, "up")
    _run("ip", "-n", right_ns, "addr", "add", right_addr, "dev", right)
    _run("ip", "-n", right_ns, "link", "set", right, "up")


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")
