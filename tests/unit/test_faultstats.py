"""Post-copy fault latency (vmig.migration.faultstats): the log2 µs histogram, the
percentiles, the blocktime, and how the view and /metrics carry them."""

from __future__ import annotations

from prometheus_client.core import HistogramMetricFamily

from vmig.api.prometheus import _POSTCOPY_HISTOGRAMS, _histograms
from vmig.migration.faultstats import BUCKETS, FaultStats, bucket, nearest_rank
from vmig.migration.figures import POSTCOPY
from vmig.migration.metrics import MigrationMetrics

US = 1e-6


def test_bucket_i_holds_latencies_from_2_to_the_i_up_to_2_to_the_i_plus_1_us() -> None:
    assert [bucket(us) for us in (0, 0.5, 1, 1.99)] == [0, 0, 0, 0]
    assert [bucket(us) for us in (2, 3.9, 4, 7.99, 8)] == [1, 1, 2, 2, 3]
    assert bucket(255.9) == 7 and bucket(256) == 8 and bucket(511.9) == 8  # QEMU's example
    assert bucket(1000) == 9 and bucket(1024) == 10  # 1 ms is in [512, 1024) µs
    assert bucket(2.0 ** 32) == BUCKETS - 1 == 32 and bucket(1e15) == 32


def test_the_histogram_counts_every_served_fault_in_its_bucket() -> None:
    stats = FaultStats()
    for i, latency_us in enumerate((1, 3, 3, 300, 300, 300, 5000)):
        stats.asked(i)
        stats.served(i, i + latency_us * US)
    figures = stats.figures(100.0)
    dist = figures["fault_latency_dist"]
    assert len(dist) == BUCKETS and sum(dist) == figures["fault_latency_count"] == 7
    assert {i: n for i, n in enumerate(dist) if n} == {0: 1, 1: 2, 8: 3, 12: 1}
    assert figures["fault_latency_max_ms"] == 5.0
    assert figures["fault_latency_sum_ms"] == round((1 + 6 + 900 + 5000) / 1000, 3)


def test_percentiles_are_nearest_rank_and_ordered() -> None:
    assert nearest_rank([1.0], 0.5) == nearest_rank([1.0], 0.99) == 1.0
    ordered = [float(i) for i in range(1, 101)]
    assert nearest_rank(ordered, 0.5) == 50.0 and nearest_rank(ordered, 0.99) == 99.0
    ten = [float(i) for i in range(1, 11)]  # p99 of 10 is the 10th (rank ceil(9.9))
    assert nearest_rank(ten, 0.5) == 5.0 and nearest_rank(ten, 0.99) == 10.0
    stats = FaultStats()
    for i in range(100):  # 1 .. 100 µs, out of order
        latency = ((i * 37) % 100 + 1) * US
        stats.asked(i)
        stats.served(i, i + latency)
    figures = stats.figures(1000.0)
    assert figures["fault_latency_p50_ms"] == 0.05 and figures["fault_latency_p99_ms"] == 0.099
    assert figures["fault_latency_max_ms"] == 0.1


def test_no_faults_no_percentiles() -> None:
    figures = FaultStats().figures(5.0)
    assert figures["fault_latency_count"] == 0 and sum(figures["fault_latency_dist"]) == 0
    assert figures["fault_latency_p50_ms"] is figures["fault_latency_p99_ms"] is None
    assert figures["fault_latency_max_ms"] is None and figures["blocktime_ms"] == 0.0


def test_the_sample_stays_bounded_and_the_max_exact() -> None:
    stats = FaultStats(reservoir=64)
    for i in range(10_000):
        stats.asked(i)
        stats.served(i, i + (i % 50 + 1) * US)
    stats.asked(20_000)
    stats.served(20_000, 20_000 + 0.5)  # one slow fault, likely not in the sample
    assert len(stats._samples) == 64 and stats.count == 10_001
    figures = stats.figures(30_000.0)
    assert figures["fault_latency_max_ms"] == 500.0
    assert figures["fault_latency_p50_ms"] <= figures["fault_latency_p99_ms"] <= 500.0


def test_blocktime_is_the_union_of_the_waits() -> None:
    stats = FaultStats()
    stats.asked(10.0)       # A waits 10 .. 13
    stats.asked(11.0)       # B waits 11 .. 12: inside A's wait, adds nothing
    stats.served(11.0, 12.0)
    stats.served(10.0, 13.0)
    assert stats.blocktime_s(20.0) == 3.0
    stats.asked(20.0)       # C waits 20 .. 22, D 21 .. 24: overlapping, 4 s together
    stats.asked(21.0)
    stats.served(20.0, 22.0)
    assert stats.blocktime_s(23.0) == 6.0  # D still waits: counted up to now
    stats.served(21.0, 24.0)
    assert stats.blocktime_s(99.0) == 7.0
    assert stats.figures(99.0)["blocktime_ms"] == 7000.0


def test_the_receivers_view_reads_the_live_source_then_the_frozen_figures() -> None:
    metrics = MigrationMetrics("receive")
    stats = FaultStats()
    metrics.update(postcopy_pages=10, postcopy_pages_left=10,
                   fault_latency_source=lambda: stats.figures(5.0))
    stats.asked(1.0)
    stats.served(1.0, 1.0 + 300 * US)
    postcopy = metrics.view()["postcopy"]
    assert list(postcopy) == [figure.name for figure in POSTCOPY.figures]
    assert postcopy["fault_latency_count"] == 1 and postcopy["fault_latency_dist"][8] == 1
    metrics.update(fault_latency=stats.figures(5.0), fault_latency_source=None)
    stats.asked(2.0)
    stats.served(2.0, 3.0)  # after the freeze: not seen
    assert metrics.view()["postcopy"]["fault_latency_count"] == 1


def test_a_sender_has_no_latency_figures() -> None:
    metrics = MigrationMetrics("send")
    metrics.update(postcopy_pages=10, postcopy_pages_left=3, faults_served=4)
    postcopy = metrics.view()["postcopy"]
    assert postcopy["fault_latency_dist"] == [] and postcopy["fault_latency_count"] is None
    assert postcopy["blocktime_ms"] is None and postcopy["faults_served"] == 4
    assert postcopy["vcpu_blocktime_ms"] == []


def test_metrics_export_the_histogram_cumulatively_in_seconds() -> None:
    stats = FaultStats()
    for i, latency_us in enumerate((1, 3, 300, 300)):
        stats.asked(i)
        stats.served(i, i + latency_us * US)
    [family] = _histograms(_POSTCOPY_HISTOGRAMS, stats.figures(9.0), "receive")
    assert isinstance(family, HistogramMetricFamily)
    assert family.name == "vmig_migration_postcopy_fault_latency_seconds"
    samples = {(s.name, s.labels.get("le")): s.value for s in family.samples}
    assert samples[(family.name + "_bucket", "2e-06")] == 1  # bucket 0: under 2 µs
    assert samples[(family.name + "_bucket", "0.000256")] == 2  # buckets 0 .. 7
    assert samples[(family.name + "_bucket", "0.000512")] == 4  # .. 8: the 300 µs ones
    assert samples[(family.name + "_bucket", "+Inf")] == samples[(family.name + "_count",
                                                                    None)] == 4
    assert abs(samples[(family.name + "_sum", None)] - 604 * US) < 1e-9
    assert list(_histograms(_POSTCOPY_HISTOGRAMS, {"fault_latency_dist": []}, "send")) == []


def test_a_snapshot_does_not_move_with_the_faults_after_it() -> None:
    stats = FaultStats()
    stats.asked(1.0)
    stats.served(1.0, 1.0 + 3 * US)
    stats.asked(2.0)  # waiting when the snapshot is taken
    copy = stats.snapshot()
    stats.served(2.0, 4.0)
    stats.asked(5.0)
    stats.served(5.0, 5.5)
    figures = copy.figures(3.0)
    assert figures["fault_latency_count"] == 1 and sum(figures["fault_latency_dist"]) == 1
    assert figures["fault_latency_max_ms"] == 0.003 and figures["blocktime_ms"] == 1000.003
    assert stats.figures(9.0)["fault_latency_count"] == 3


def test_each_vcpu_waits_from_its_fault_to_its_page() -> None:
    stats = FaultStats(vcpus=3)
    stats.asked(10.0)
    stats.vcpu_waiting(0, page=7, at=10.0)
    stats.vcpu_waiting(2, page=7, at=11.0)  # vCPU 2 faults on the same page later
    stats.asked(12.0)
    stats.vcpu_waiting(0, page=9, at=12.0)  # never both at once for one vCPU, but harmless
    stats.served(10.0, 13.0)
    stats.installed(7, 13.0)
    assert stats.vcpu_blocktime_s(14.0) == [3.0 + 2.0, 0.0, 2.0]  # page 9 still waits
    stats.served(12.0, 15.0)
    stats.installed(9, 15.0)
    stats.installed(9, 16.0)  # installed twice (push and answer): counted once
    assert stats.figures(99.0)["vcpu_blocktime_ms"] == [6000.0, 0.0, 2000.0]
    assert stats.figures(99.0)["blocktime_ms"] == 5000.0  # the union: 10 .. 15
    assert FaultStats().figures(1.0)["vcpu_blocktime_ms"] == []
