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

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from vmig import __version__
from vmig.api.controller import EMPTY, RECEIVING, Vmm
from vmig.migration.figures import POSTCOPY, SUMMARY_FIGURES, Figure
from vmig.migration.metrics import Phase, Status

#: Every state vm.info can report; `vmig_vm_state` has one series per state.
VM_STATES = (EMPTY, RECEIVING, "running", "paused", "shutdown", "failed", "migrated")



def _exported(figures: tuple[Figure, ...]) -> tuple[tuple[str, str, str, str, float], ...]:
    """(view key, metric name, help, kind, divisor) of the figures that name a metric;
    vmig.migration.figures is the one source. Figures in ms are exported in seconds."""
    return tuple((figure.name, figure.prometheus[0], figure.help, figure.prometheus[1],
                  1000 if figure.unit == "ms" else 1)
                 for figure in figures if figure.prometheus is not None)


#: The migration's single figures, and those of its `postcopy` object (its histograms
#: apart: `_histograms`).
_MIGRATION_FIGURES = _exported(SUMMARY_FIGURES)
_POSTCOPY_FIGURES = tuple(f for f in _exported(POSTCOPY.figures) if f[3] != "histogram")
_POSTCOPY_HISTOGRAMS = tuple(f for f in _exported(POSTCOPY.figures) if f[3] == "histogram")


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
        yield from _single_figures(_MIGRATION_FIGURES, view, side)
        verified = GaugeMetricFamily("vmig_migration_memory_verified", "1 once the memory "
                                     "digests matched", labels=["side"])
        verified.add_metric([side], int(bool(view.get("memory_verified"))))
        yield verified
        yield from _single_figures(_POSTCOPY_FIGURES, view.get("postcopy") or {}, side)
        yield from _histograms(_POSTCOPY_HISTOGRAMS, view.get("postcopy") or {}, side)
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


def _single_figures(figures: tuple[tuple[str, str, str, str, float], ...],
                    view: dict[str, Any], side: str) -> Iterator[Metric]:
    """One family per figure of `view` that is known (an unknown one is left out)."""
    for key, name, documentation, kind, divisor in figures:
        value = view.get(key)
        if value is not None:
            family = _family(kind, name, documentation, ["side"])
            family.add_metric([side], value / divisor if divisor != 1 else value)
            yield family


def _histograms(figures: tuple[tuple[str, str, str, str, float], ...],
                view: dict[str, Any], side: str) -> Iterator[Metric]:
    """A Prometheus histogram, in seconds, of each log2 µs bucket list of `view` that is not
    empty (bucket i, [2^i, 2^(i+1)) µs, is counted up to `le` 2^(i+1) µs; the last bucket,
    open-ended, only in +Inf). The sum is the figure's `..._sum_ms` companion
    (`fault_latency_dist` -> `fault_latency_sum_ms`)."""
    for key, name, documentation, _, _ in figures:
        counts = view.get(key) or []
        if not counts:
            continue
        buckets, seen = [], 0
        for i, count in enumerate(counts[:-1]):
            seen += count
            buckets.append((repr(2.0 ** (i + 1) / 1e6), seen))
        buckets.append(("+Inf", seen + counts[-1]))
        total_ms = view.get(key.removesuffix("_dist") + "_sum_ms") or 0.0
        family = HistogramMetricFamily(name, documentation, labels=["side"])
        family.add_metric([side], buckets, sum_value=total_ms / 1000)
        yield family


def registry(vmm: Vmm) -> CollectorRegistry:
    """A registry of its own (not prometheus_client's global one) holding `vmm`'s collector."""
    owned = CollectorRegistry(auto_describe=False)
    owned.register(VmmCollector(vmm))
    return owned
