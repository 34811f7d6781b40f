"""Seeded fault injection for live migrations between real VMMs, and the checks after each.

A `Fault` is one thing that goes wrong during a migration: a connection cut after
some bytes (through `CutProxy`), SIGKILL or SIGSTOP (for a while) of either VMM at
some moment, an operator's cancel on either side at some moment, a network outage
(every connection reset and new ones refused for 0.5-5 s) or a stall of every
connection (open, 0.5-5 s) in a chosen phase (pre-copy, the switch-over, post-copy,
or while connecting; the harness waits for it in the source's migration-info, then a
seeded delay), or nothing (a control run). `plan(seed, runs)` draws a reproducible
list of them. `Harness.run(fault)` migrates the VM between two VMMs with that fault
injected, waits for both sides to settle, then checks what must hold after every
fault:

- a network outage or stall ends completed: the network came back well within
  `reconnect_timeout_s`, and every lost connection was re-dialled;
- never two running VMs; exactly one when the VMM holding the only copy was not
  killed (the one exception: COMPLETE sent and unanswered leaves the source paused,
  and says so; the harness then resumes it, as an operator would);
- the guest's self-check passes where it runs;
- every surviving VMM holds no migration thread, TCP socket or listener any more,
  and no more other fds than it held before in the same state;
- a clean migration afterwards succeeds.

Used by tests/e2e/test_faults.py (a small seeded set) and benchmarks/faults.py (the
50-run script whose result is in docs/faults.md).
"""

from __future__ import annotations

import math
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from faultproxy import CutProxy

from vmig.api.process import VmmProcess
from vmig.errors import ApiError
from vmig.transport.address import parse_url

SETTLE_S = 30.0
#: The sender's re-dial window: twice the longest network fault (NETWORK_S), so that every
#: network fault is within it, and a dead peer costs 10 s of re-dialling, not the default 30.
RECONNECT_TIMEOUT_S = 10
#: How long a destination may stay listening after the send ended before the harness
#: calls it waiting for nobody (a handshake in flight ends within its own deadline).
HANDSHAKE_GRACE_S = 1.0
#: The guest faults are injected into: big enough that a migration takes a few tenths of a
#: second, so that most faults land in the middle of one.
FAULT_GUEST = ("--memory", "256M", "--cpus", "2", "--workload", "dirty", "--working-set",
               "96M", "--dirty-rate", "20000")
KINDS = ("none", "cut", "kill-source", "kill-destination", "stop-source", "stop-destination",
         "cancel-source", "cancel-destination", "outage", "stall")
WEIGHTS = (1, 4, 1, 1.5, 1, 1.5, 1, 1, 5, 2.5)
#: The kinds before network outages existed: `plan(seed, runs, kinds=PROCESS_KINDS)` draws
#: the same faults as it did then.
PROCESS_KINDS = KINDS[:8]
NETWORK_KINDS = ("outage", "stall")
#: The source's phases a network fault is injected in, and the longest seeded delay after
#: the phase began (the phase lasts about that long with FAULT_GUEST over loopback).
PHASE_DELAY_S = {"connecting": 0.02, "precopy": 0.25, "switchover": 0.02, "postcopy": 0.2}
#: The phases in the order a migration goes through them (one of these is the next).
PHASE_ORDER = ("connecting", "precopy", "switchover", "postcopy", "postcopy-paused",
               "completing", "completed", "cancelled", "failed")
#: How long the network is down (outage) or silent (stall): well within the default
#: reconnect_timeout_s (30 s) and dead_peer_timeout_s (10 s).
NETWORK_S = (0.5, 5.0)
#: The share of runs that go to post-copy (of network faults: NETWORK_POSTCOPY_SHARE).
POSTCOPY_SHARE = 0.3
NETWORK_POSTCOPY_SHARE = 0.4


@dataclass(frozen=True)
class Fault:
    kind: str
    connections: int
    cut_index: int = 0
    cut_after: int = 0
    delay_s: float = 0.0  # kill/stop this long after the send began
    stop_s: float = 0.0  # how long a SIGSTOP lasts
    #: Network faults: the source's phase to wait for, then `delay_s`, then the network is
    #: down (outage) or silent (stall) for `network_s`.
    phase: str = ""
    network_s: float = 0.0
    #: The migration goes to post-copy after its first pass (a 1 ms budget that pre-copy
    #: never meets); its FAULT connection is the last one (index `connections`).
    postcopy: bool = False

    def describe(self) -> str:
        return self._what() + (", post-copy" if self.postcopy else "")

    def _what(self) -> str:
        if self.kind in NETWORK_KINDS:
            what = ("reset every connection, network down" if self.kind == "outage"
                    else "stall every connection")
            return (f"{what} {self.network_s:.1f} s, {self.phase} +{self.delay_s * 1000:.0f}"
                    f" ms ({self.connections} conn)")
        if self.kind == "cut":
            total = self.connections + self.postcopy
            return f"cut connection {self.cut_index} of {total} after {self.cut_after} bytes"
        if self.kind.startswith("kill"):
            return f"SIGKILL the {self.kind[5:]} at {self.delay_s:.2f} s ({self.connections} conn)"
        if self.kind.startswith("stop"):
            return (f"SIGSTOP the {self.kind[5:]} at {self.delay_s:.2f} s for {self.stop_s:.1f} s"
                    f" ({self.connections} conn)")
        if self.kind.startswith("cancel"):
            return (f"cancel at the {self.kind[7:]} at {self.delay_s:.2f} s "
                    f"({self.connections} conn)")
        return f"no fault ({self.connections} conn)"


def plan(seed: int, runs: int, kinds: tuple[str, ...] = KINDS) -> list[Fault]:
    """`runs` faults of `kinds` (a prefix of KINDS) drawn from `seed` (the same seed gives
    the same faults)."""
    rng = random.Random(seed)
    faults = []
    for _ in range(runs):
        kind = rng.choices(kinds, WEIGHTS[:len(kinds)])[0]
        connections = rng.choice((1, 2, 4))
        delay = math.exp(rng.uniform(math.log(0.01), math.log(0.8)))
        postcopy = rng.random() < POSTCOPY_SHARE
        if kind in NETWORK_KINDS:
            postcopy = rng.random() < NETWORK_POSTCOPY_SHARE
            faults.append(network_fault(rng, kind, connections, postcopy))
        elif kind == "cut":
            index = rng.randrange(connections + postcopy)
            after = int(math.exp(rng.uniform(math.log(64), math.log(48 << 20))))
            faults.append(Fault(kind, connections, cut_index=index, cut_after=after,
                                postcopy=postcopy))
        elif kind.startswith("stop"):
            faults.append(Fault(kind, connections, delay_s=delay,
                                stop_s=rng.uniform(0.3, 2.5), postcopy=postcopy))
        else:
            faults.append(Fault(kind, connections, delay_s=delay, postcopy=postcopy))
    return faults


def network_fault(rng: random.Random, kind: str, connections: int, postcopy: bool,
                  phase: str = "") -> Fault:
    """An outage or a stall in a phase drawn from `rng` (or `phase`), at a seeded moment."""
    phases = ("connecting", "precopy", "postcopy") if postcopy else (
        "connecting", "precopy", "switchover")
    phase = phase or rng.choices(phases, (1, 3, 3))[0]
    delay = math.exp(rng.uniform(math.log(0.001), math.log(PHASE_DELAY_S[phase])))
    return Fault(kind, connections, delay_s=delay, postcopy=postcopy, phase=phase,
                 network_s=rng.uniform(*NETWORK_S))


@dataclass
class Result:
    fault: Fault
    outcome: str  # "completed", "cancelled", "failed", "in doubt", "source killed", ...
    reason: str = ""
    vm_at: str = ""  # "source", "destination" or "lost"
    seconds: float = 0.0
    checks: list[str] = field(default_factory=list)
    via_postcopy: bool = False  # the guest resumed at the destination before its last pages
    #: Network faults: the source's phase when the fault began ("" if it came too late).
    landed: str = ""

    @property
    def shown_outcome(self) -> str:
        return self.outcome + (" (via post-copy)" if self.via_postcopy else "")

    def line(self) -> str:
        why = f": {self.reason}" if self.reason else ""
        return (f"{self.fault.describe():<52} -> {self.shown_outcome}, VM at {self.vm_at}"
                f"{self.shown_landing} ({self.seconds:.1f} s){why}")

    @property
    def shown_landing(self) -> str:
        if self.fault.kind not in NETWORK_KINDS:
            return ""
        return f", began in {self.landed}" if self.landed else ", came after the end"


class Harness:
    """Two VMMs; the VM lives in one of them and moves (or not) with every run."""

    def __init__(self, spawn: Callable[[tuple[str, ...]], VmmProcess],
                 kill: Callable[[VmmProcess], None], guest: tuple[str, ...]) -> None:
        self._spawn = spawn
        self._kill = kill
        self.guest = guest
        self.source: VmmProcess = spawn(guest)
        self.destination: VmmProcess = spawn(())
        self._baselines: dict[tuple[int, str], int] = {}  # (pid, state) -> other fds
        self._cancel_refused = ""  # this run's cancel came too late: why
        self._receive_cancelled = False  # this run's destination was still listening

    # --- one run -----------------------------------------------------------------------

    def run(self, fault: Fault) -> Result:
        began = time.monotonic()
        self._ready()
        source, destination = self.source, self.destination
        for vmm in (source, destination):
            self._check_resources(vmm)
        reply = destination.client.receive_migration("tcp:127.0.0.1:0")
        url, token = reply["receiver_url"], reply["token"]
        proxy = None
        if fault.kind == "cut" or fault.kind in NETWORK_KINDS:
            address = parse_url(url)
            cut = {"cut_index": fault.cut_index, "cut_after": fault.cut_after} if (
                fault.kind == "cut") else {}
            proxy = CutProxy((address.host, address.port), **cut)
            url = proxy.url
        result = Result(fault, outcome="?")
        self._cancel_refused = ""
        self._receive_cancelled = False
        box: dict[str, Any] = {}

        def send() -> None:
            try:
                mode: dict[str, Any] = (
                    {"postcopy": True, "postcopy_after_iterations": 1, "downtime_ms": 1}
                    if fault.postcopy else {"verify_memory": True, "downtime_ms": 100})
                box["summary"] = source.client.send_migration(
                    destination_url=url, token=token, connections=fault.connections,
                    timeout_s=20, reconnect_timeout_s=RECONNECT_TIMEOUT_S, **mode)
            except ApiError as exc:
                box["error"] = exc

        before = _migration_info(source)  # the last migration's, if any
        thread = threading.Thread(target=send, daemon=True)
        thread.start()
        if fault.kind in NETWORK_KINDS:
            assert proxy is not None
            result.landed = self._break_network(fault, proxy, source,
                                                before and before.get("migration_id"))
        killed = self._inject(fault, source, destination)
        thread.join(120)
        if proxy is not None:
            proxy.close()
        assert not thread.is_alive(), f"{fault.describe()}: the send did not return"
        if killed is not destination and _listening(destination):
            # The source never authenticated (cut inside its handshake): the destination
            # rightly waits for a source that can; the operator stops it waiting.
            destination.client.cancel_migration()
            self._receive_cancelled = True
        self._settle(source, destination, killed)
        self._judge(result, box, killed)
        if self._cancel_refused and not result.reason:
            result.reason = f"cancel refused: {self._cancel_refused}"
        if self._receive_cancelled:
            result.reason += " (the destination, still waiting for a source, was cancelled)"
        self._recover_and_check(result, killed)
        result.seconds = time.monotonic() - began
        return result

    def _break_network(self, fault: Fault, proxy: CutProxy, source: VmmProcess,
                       previous: str | None) -> str:
        """Wait for `fault.phase` (or a later one) at the source, then `fault.delay_s`, then
        take the network down or silence it. Returns the phase it began in ("" if the
        migration was over by then)."""
        target = PHASE_ORDER.index(fault.phase)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            info = _migration_info(source)
            if info is None or info.get("migration_id") in (previous, None):
                time.sleep(0.002)  # this send has not begun yet
                continue
            if not info.get("active"):
                return ""  # over before it could be hit
            if PHASE_ORDER.index(info["phase"]) >= target:
                break
            time.sleep(0.002)
        time.sleep(fault.delay_s)
        info = _migration_info(source)
        if info is None or not info.get("active"):
            return ""
        if fault.kind == "outage":
            proxy.outage(fault.network_s)
        else:
            proxy.stall(fault.network_s)
        return str(info["phase"])

    def _inject(self, fault: Fault, source: VmmProcess,
                destination: VmmProcess) -> VmmProcess | None:
        if fault.kind in ("none", "cut", *NETWORK_KINDS):
            return None
        victim = source if fault.kind.endswith("source") else destination
        time.sleep(fault.delay_s)
        if fault.kind.startswith("cancel"):
            try:
                victim.client.cancel_migration()
            except ApiError as exc:  # too late (over, or past the point of no return)
                self._cancel_refused = exc.message
            return None
        if fault.kind.startswith("kill"):
            self._kill(victim)
            return victim
        victim.signal(signal.SIGSTOP)
        time.sleep(fault.stop_s)
        victim.signal(signal.SIGCONT)
        return None

    def _settle(self, source: VmmProcess, destination: VmmProcess,
                killed: VmmProcess | None) -> None:
        """Wait until no side is still migrating."""
        deadline = time.monotonic() + SETTLE_S
        for vmm in (source, destination):
            if vmm is killed:
                continue
            while True:
                info = vmm.client.info()
                active = _active(vmm)
                if info["state"] != "receiving" and not active:
                    break
                assert time.monotonic() < deadline, f"{vmm.socket_path} did not settle: {info}"
                time.sleep(0.05)

    def _judge(self, result: Result, box: dict[str, Any], killed: VmmProcess | None) -> None:
        source, destination = self.source, self.destination
        states = {}
        for name, vmm in (("source", source), ("destination", destination)):
            states[name] = None if vmm is killed else vmm.client.info()["state"]
        running = [name for name, state in states.items() if state == "running"]
        assert len(running) <= 1, f"two running VMs: {states}"
        summary, error = box.get("summary"), box.get("error")
        if summary is not None:
            result.outcome = summary["status"]
            result.reason = summary.get("error") or ""
            result.via_postcopy = bool(summary.get("postcopy"))
        elif error is not None:
            result.outcome = "failed"
            result.reason = str(error)
        if result.fault.kind in NETWORK_KINDS:
            assert result.outcome == "completed", (
                f"{result.fault.describe()}: the network came back within "
                f"reconnect_timeout_s, yet the migration ended {result.outcome}: "
                f"{result.reason} (states {states})")
        if killed is source:
            result.outcome = "source killed"
            result.vm_at = "destination" if running == ["destination"] else "lost"
            return
        if killed is destination and states["source"] == "migrated":
            result.outcome = "destination killed after the hand-over"
            result.vm_at = "lost"  # it ran there, and died with it
            return
        if states["source"] == "paused" and "source stays paused" in result.reason:
            assert states["destination"] != "running", states
            result.outcome = "in doubt"
            source.client.resume()  # the operator's call, once the destination is known idle
            running = ["source"]
        if states["source"] == "paused" and "post-copy failed" in result.reason:
            # Neither side has the whole VM: the destination stopped its own, the source
            # keeps the VM as at the switch-over. Roll back, as the docs tell an operator.
            assert states["destination"] != "running", states
            result.outcome = "post-copy failed"
            source.client.resume()
            running = ["source"]
        assert len(running) == 1, f"{result.fault.describe()}: no running VM: {states}"
        result.vm_at = running[0]
        if result.outcome == "completed":
            assert result.vm_at == "destination" and states["source"] == "migrated", states
        else:
            assert result.vm_at == "source", states
        result.checks.append("one running VM")

    def _recover_and_check(self, result: Result, killed: VmmProcess | None) -> None:
        """Self-check where the VM runs, leak checks, then a clean migration; the VM's
        holder becomes the next run's source."""
        holder = {"source": self.source, "destination": self.destination}.get(result.vm_at)
        if holder is not None:
            assert holder.client.check_guest(60)["ok"], "the guest's self-check failed"
            result.checks.append("self-check")
        for vmm in (self.source, self.destination):
            if vmm is not killed:
                self._check_resources(vmm)
        result.checks.append("no leaks")
        if killed is not None:  # a fresh VMM in place of the dead one
            if killed is self.source:
                self.source = self._spawn(() if holder is not None else self.guest)
            else:
                self.destination = self._spawn(())
        if result.vm_at == "destination":
            self.source, self.destination = self.destination, self.source
        elif result.vm_at == "lost":
            pass  # the new source carries a new VM
        self._ready()
        reply = self.destination.client.receive_migration("tcp:127.0.0.1:0")
        summary = self.source.client.send_migration(
            destination_url=reply["receiver_url"], token=reply["token"], connections=2,
            verify_memory=True)
        assert summary["status"] == "completed", summary
        assert self.destination.client.check_guest(60)["ok"]
        self._settle(self.source, self.destination, None)
        self.source, self.destination = self.destination, self.source
        result.checks.append("clean migration afterwards")

    def _ready(self) -> None:
        """The source holds a running VM and the destination none."""
        if self.source.client.info()["state"] in ("migrated", "shutdown", "empty"):
            self.source.client.create(**_vm_fields(self.guest))
        state = self.destination.client.info()["state"]
        assert state in ("empty", "migrated", "shutdown"), state

    def _check_resources(self, vmm: VmmProcess) -> None:
        """Nothing of a migration is left, and no more fds than before in this state."""
        state = vmm.client.info()["state"]
        held = vmm.client.resources()
        where = f"{vmm.socket_path} ({state})"
        assert held["threads"]["migrate"] == 0, f"{where}: migration threads left: {held}"
        assert held["tcp_listeners"] == 0, f"{where}: a listener was left: {held}"
        assert held["fds"]["tcp"] == 0, f"{where}: TCP sockets left: {held}"
        kind = "vm" if state in ("running", "paused") else "no vm"
        key = (vmm.proc.pid, kind)
        other = held["fds"]["other"]
        baseline = self._baselines.setdefault(key, other)
        assert other <= baseline, f"{where}: {other} fds, {baseline} before: a leak ({held})"

    def close(self) -> None:
        for vmm in (self.source, self.destination):
            vmm.stop()


def _listening(vmm: VmmProcess) -> bool:
    """`vmm` waits for a source that has not authenticated yet (after a wait for the
    handshakes in flight to end: each has its own deadline)."""
    deadline = time.monotonic() + HANDSHAKE_GRACE_S
    while True:
        try:
            info = vmm.client.migration_info()
        except ApiError:
            return False
        if not info.get("active") or info.get("phase") != "listening":
            return False
        if time.monotonic() >= deadline:
            return True
        time.sleep(0.05)


def _migration_info(vmm: VmmProcess) -> dict[str, Any] | None:
    try:
        return vmm.client.migration_info()
    except ApiError:  # none yet (404)
        return None


def _active(vmm: VmmProcess) -> bool:
    try:
        return bool(vmm.client.migration_info().get("active"))
    except ApiError:
        return False


def _vm_fields(guest: tuple[str, ...]) -> dict[str, Any]:
    """`vmig vmm` guest flags -> vm.create fields."""
    fields: dict[str, Any] = {}
    for flag, value in zip(guest[::2], guest[1::2], strict=True):
        name = flag.removeprefix("--").replace("-", "_")
        fields[name] = int(value) if name in ("cpus", "dirty_rate") else value
    return fields
