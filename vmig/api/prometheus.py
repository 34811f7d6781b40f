"""`GET /metrics`: the VMM's figures in Prometheus' text format (prometheus_client).

`VmmCollector` reads the live objects on every scrape: the `Vmm` controller's
`info()` (the VM and its guest's counters) and `migration_info()` (the view of the
running or last migration's `MigrationMetrics`). Nothing is mirrored into counters
by hand, so a scrape and `vm.info` / `vm.migration-info` taken at the same moment
agree. A figure that is unknown (None in the view) is left out, not reported as 0.

Every migration metric carries ``side`` ("send" or "receive"); per-connection ones
also ``index`` and ``role`` (main, memory, fault). Times are in seconds, rates in
bytes per second, as Prometheus' conventions have them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from vmig import __version__
from vmig.api.controller import EMPTY, RECEIVING, Vmm
from vmig.migration.metrics import Phase, Status

#: Every state vm.info can report; `vmig_vm_state` has one series per state.
VM_STATES = (EMPTY, RECEIVING, "running", "paused", "shutdown", "failed", "migrated")

# (view key, metric name, help, kind, divisor): the migration's single figures.
_MIGRATION_FIGURES: tuple[tuple[str, str, str, str, float], ...] = (
    ("bytes_transferred", "vmig_migration_bytes", "Guest page bytes sent (side send) or "
     "received (side receive)", "counter", 1),
    ("wire_bytes", "vmig_migration_wire_bytes", "Page payload bytes on the wire (compressed "
     "chunks as compressed)", "counter", 1),
    ("precopy_bytes", "vmig_migration_precopy_bytes", "Page bytes moved while the guest ran",
     "counter", 1),
    ("switchover_bytes", "vmig_migration_switchover_bytes", "Page bytes moved after the pause",
     "counter", 1),
    ("normal_pages", "vmig_migration_normal_pages", "Pages moved with their bytes", "counter", 1),
    ("zero_pages", "vmig_migration_zero_pages", "Zero pages skipped or sent as zero ranges",
     "counter", 1),
    ("iterations", "vmig_migration_iterations", "Pre-copy passes (sender only)", "counter", 1),
    ("bytes_remaining", "vmig_migration_remaining_bytes", "Bytes still to send in this pass",
     "gauge", 1),
    ("memory_bytes", "vmig_migration_memory_bytes", "Guest memory size", "gauge", 1),
    ("data_bytes", "vmig_migration_data_bytes", "Guest memory that held data at the start",
     "gauge", 1),
    ("elapsed_ms", "vmig_migration_elapsed_seconds", "Time since the migration started "
     "(stops at its end)", "gauge", 1000),
    ("setup_ms", "vmig_migration_setup_seconds", "Time until the first pages moved", "gauge",
     1000),
    ("downtime_ms", "vmig_migration_downtime_seconds", "How long the guest was paused",
     "gauge", 1000),
    ("expected_downtime_ms", "vmig_migration_expected_downtime_seconds", "The pause a "
     "switch-over now would take", "gauge", 1000),
    ("throughput_bytes_per_s", "vmig_migration_throughput_bytes_per_second", "Page bytes over "
     "the whole migration's time", "gauge", 1),
    ("bandwidth_bytes_per_s", "vmig_migration_bandwidth_bytes_per_second", "Send rate measured "
     "per pre-copy pass", "gauge", 1),
    ("dirty_rate_bytes_per_s", "vmig_migration_dirty_rate_bytes_per_second", "How fast the "
     "guest dirties memory (sender only)", "gauge", 1),
    ("max_bandwidth_bytes_per_s", "vmig_migration_max_bandwidth_bytes_per_second",
     "The bandwidth cap, if any", "gauge", 1),
    ("throttle_percent", "vmig_migration_throttle_percent", "Auto-converge's vCPU throttle",
     "gauge", 1),
    ("connections", "vmig_migration_connections", "Connections opened", "gauge", 1),
    ("connections_lost", "vmig_migration_connections_lost", "Connections lost mid-migration",
     "gauge", 1),
    ("reconnects", "vmig_migration_reconnects", "Connections resumed after a loss", "gauge",
     1),
)
_POSTCOPY_FIGURES = (
    ("pages", "vmig_migration_postcopy_pages", "Pages owed at the switch to post-copy",
     "gauge"),
    ("pages_left", "vmig_migration_postcopy_pages_left", "Owed pages still missing", "gauge"),
    ("faults_served", "vmig_migration_postcopy_faults", "Page faults answered", "counter"),
)


def _family(kind: str, name: str, documentation: str, labels: list[str]) -> Metric:
    if kind == "counter":
        return CounterMetricFamily(name, documentation, labels=labels)
    return GaugeMetricFamily(name, documentation, labels=labels)


class VmmCollector(Collector):
    """Collects `vmm`'s figures on each scrape (see the module's docstring)."""

    def __init__(self, vmm: Vmm) -> None:
        self._vmm = vmm

    def collect(self) -> Iterator[Metric]:
        version = GaugeMetricFamily("vmig_info", "The VMM's version", labels=["version"])
        version.add_metric([__version__], 1)
        yield version
        yield from self._vm(self._vmm.info())
        migration = self._vmm.migration_info()
        if migration is not None:
            yield from self._migration(migration)
        yield GaugeMetricFamily("vmig_event_streams", "Clients following vmm.events now",
                                value=self._vmm.events.streams)

    @staticmethod
    def _vm(info: dict[str, Any]) -> Iterator[Metric]:
        state = GaugeMetricFamily("vmig_vm_state", "1 for the VM's state now, 0 for the others",
                                  labels=["state"])
        for name in VM_STATES:
            state.add_metric([name], 1 if info.get("state") == name else 0)
        yield state
        for key, name, documentation in (
                ("memory_bytes", "vmig_vm_memory_bytes", "Guest memory size"),
                ("cpus", "vmig_vm_vcpus", "vCPUs"),
                ("throttle_percent", "vmig_vm_throttle_percent", "vCPU throttle now")):
            if info.get(key) is not None:
                yield GaugeMetricFamily(name, documentation, value=info[key])
        for key, name, documentation in (
                ("heartbeat", "vmig_guest_heartbeat", "The guest's heartbeat (all vCPUs)"),
                ("pages_written", "vmig_guest_pages_written", "Pages the guest has written")):
            if info.get(key) is not None:
                yield CounterMetricFamily(name, documentation, value=info[key])
        vcpus = info.get("vcpus") or []
        if vcpus:
            exits = CounterMetricFamily("vmig_vcpu_exits", "KVM_RUN exits per vCPU",
                                        labels=["vcpu"])
            for vcpu in vcpus:
                exits.add_metric([str(vcpu["id"])], vcpu["exits"])
            yield exits

    @staticmethod
    def _migration(view: dict[str, Any]) -> Iterator[Metric]:
        side = view["role"]
        info = GaugeMetricFamily("vmig_migration_info", "The running or last migration",
                                 labels=["side", "migration_id", "peer"])
        info.add_metric([side, view.get("migration_id") or "", view.get("peer") or ""], 1)
        yield info
        active = GaugeMetricFamily("vmig_migration_active", "1 while the migration runs",
                                   labels=["side"])
        active.add_metric([side], int(bool(view.get("active"))))
        yield active
        phase = GaugeMetricFamily("vmig_migration_phase", "1 for the migration's phase now",
                                  labels=["side", "phase"])
        for name in Phase:
            phase.add_metric([side, name.value], 1 if view.get("phase") == name.value else 0)
        yield phase
        status = GaugeMetricFamily("vmig_migration_status", "1 for the migration's status now "
                                   "(QEMU's names)", labels=["side", "status"])
        for name in Status:
            status.add_metric([side, name.value], 1 if view.get("status") == name.value else 0)
        yield status
        for key, name, documentation, kind, divisor in _MIGRATION_FIGURES:
            value = view.get(key)
            if value is not None:
                family = _family(kind, name, documentation, ["side"])
                family.add_metric([side], value / divisor if divisor != 1 else value)
                yield family
        verified = GaugeMetricFamily("vmig_migration_memory_verified", "1 once the memory "
                                     "digests matched", labels=["side"])
        verified.add_metric([side], int(bool(view.get("memory_verified"))))
        yield verified
        postcopy = view.get("postcopy")
        if postcopy is not None:
            for key, name, documentation, kind in _POSTCOPY_FIGURES:
                if postcopy.get(key) is not None:
                    family = _family(kind, name, documentation, ["side"])
                    family.add_metric([side], postcopy[key])
                    yield family
        labels = ["side", "index", "role"]
        sent = CounterMetricFamily("vmig_migration_connection_bytes", "Page bytes per "
                                   "connection (QEMU's multifd counters)", labels=labels)
        chunks = CounterMetricFamily("vmig_migration_connection_chunks", "Chunks acknowledged "
                                     "per connection", labels=labels)
        lost = GaugeMetricFamily("vmig_migration_connection_lost", "1 if the connection was "
                                 "lost mid-migration", labels=labels)
        for connection in view.get("per_connection") or ():
            values = [side, str(connection["index"]), connection["role"]]
            sent.add_metric(values, connection["bytes"])
            chunks.add_metric(values, connection["chunks"])
            lost.add_metric(values, int(connection["lost"] is not None))
        yield from (sent, chunks, lost)


def registry(vmm: Vmm) -> CollectorRegistry:
    """A registry of its own (not prometheus_client's global one) holding `vmm`'s collector."""
    owned = CollectorRegistry(auto_describe=False)
    owned.register(VmmCollector(vmm))
    return owned
