"""Progress an orchestrator can use, with real VMMs: `progress_percent` never goes
backwards over a migration of several pre-copy passes, and libvirt's job figures
(virDomainGetJobStats) are there and plausible."""

from __future__ import annotations

import contextlib
import itertools
import os
import tempfile
from collections.abc import Iterator
from typing import Any

from helpers import Spawn, receive
from prometheus_client.parser import text_string_to_metric_families

from vmig.units import PAGE_SIZE, MiB

# Dirties 8,000 pages/s (33 MB/s, random order) of a 32 MiB working set, against a 40 MB/s
# cap: each pass finds most of what it sent dirtied again, so pre-copy takes several passes
# (about 7) to reach a 100 ms downtime, and data processed over processed + remaining falls
# at each pass's end. The first pass (40 MiB with the zeros: chunks of 16, 16 and 8 MiB)
# reads 80% before its last chunk and 68% after it, once the ~20 MiB the guest dirtied
# meanwhile are added; even a guest at half its pace would dirty enough for that fall.
DIRTYING_GUEST = ("--memory", "128M", "--cpus", "2", "--workload", "dirty", "--working-set",
                  "32M", "--dirty-rate", "8000")
SEVERAL_PASSES = {"max_bandwidth": "40M", "downtime_ms": 100, "timeout_s": 60}
POLL_S = 0.02
ZEROS = 8 * MiB  # written as zeros at the top of guest memory, which the guest never touches


@contextlib.contextmanager
def memory_file_with_zeros() -> Iterator[str]:
    """A 128 MiB memory file (tmpfs) whose top 8 MiB are zeros written, not holes: memory
    that holds data to the first pass, and that it finds zero (`zero_pages`)."""
    fd, path = tempfile.mkstemp(prefix="vmig-progress-", dir="/dev/shm")
    try:
        os.ftruncate(fd, 128 * MiB)
        os.pwrite(fd, bytes(ZEROS), 128 * MiB - ZEROS)
        os.close(fd)
        yield path
    finally:
        os.unlink(path)


def test_progress_never_goes_backwards_over_several_iterations(spawn_vmm: Spawn) -> None:
    with memory_file_with_zeros() as path:
        migrate_and_watch(spawn_vmm, path)


def migrate_and_watch(spawn_vmm: Spawn, memory_file: str) -> None:
    destination = spawn_vmm()
    source = spawn_vmm(*DIRTYING_GUEST, "--memory-file", memory_file)
    url, auth = receive(destination)
    started = source.client.send_migration(wait=False, destination_url=url, **auth,
                                           **SEVERAL_PASSES)
    polls: list[dict[str, Any]] = []
    summary = source.client.wait_for_migration(started["id"], on_info=polls.append,
                                               poll_s=POLL_S)
    assert summary["status"] == "completed", summary
    progress = [info["progress_percent"] for info in polls]
    assert None not in progress, progress
    assert progress == sorted(progress), progress  # never backwards
    assert progress[-1] == 100.0, progress
    assert all(info["progress_percent"] < 100 for info in polls
               if info["phase"] != "completed"), progress
    # the total grew as the guest dirtied pages: the plain ratio fell at least once (a
    # poll while the sender sets up knows no total yet: 0% done, the total unknown)
    measured = [info for info in polls if info["data_total_bytes"] is not None]
    assert all(info["progress_percent"] == 0.0 and info["data_processed_bytes"] == 0
               for info in polls if info["data_total_bytes"] is None), polls
    totals = [info["data_total_bytes"] for info in measured]
    ratios = [info["data_processed_bytes"] / info["data_total_bytes"] * 100
              for info in measured]
    assert any(later < before for before, later in itertools.pairwise(ratios)), ratios
    assert totals[-1] > totals[0], totals
    # libvirt's figures: present, plausible
    processed = [info["data_processed_bytes"] for info in polls]
    assert processed == sorted(processed) and processed[-1] > 32 << 20, processed
    assert summary["iterations"] >= 3, summary
    assert summary["zero_pages"] >= ZEROS // PAGE_SIZE, summary
    assert summary["normal_pages"] * PAGE_SIZE == summary["bytes_transferred"], summary
    assert summary["data_remaining_bytes"] == 0 and summary["expected_remaining_ms"] == 0
    assert summary["data_total_bytes"] == summary["data_processed_bytes"]
    assert summary["elapsed_ms"] > summary["setup_ms"] > 0
    assert summary["downtime_ms"] > 0
    running = [info for info in polls if info["phase"] == "precopy"
               and info["iterations"] >= 1]
    assert running, polls
    assert all(info["bandwidth_bytes_per_s"] > 0 for info in running), running
    assert any(info["expected_remaining_ms"] > 0 for info in running), running
    # the guest's 8,000 pages/s, fewer distinct ones (random order repeats pages)
    assert all(8000 * 0.25 < info["dirty_rate_pages_per_s"] < 8000 * 1.5
               for info in running), running
    assert summary["compressed_bytes"] == summary["compressed_pages"] == 0  # not asked for
    at_destination = destination.client.migration_info()
    assert at_destination["progress_percent"] == 100.0, at_destination
    assert destination.client.check_guest(60)["ok"]


def test_compressed_chunks_are_counted(spawn_vmm: Spawn) -> None:
    destination = spawn_vmm()
    source = spawn_vmm("--memory", "128M", "--cpus", "1", "--working-set", "16M")
    url, auth = receive(destination)
    summary = source.client.send_migration(destination_url=url, **auth, compress="zstd")
    assert summary["status"] == "completed", summary
    assert 0 < summary["compressed_bytes"] < summary["bytes_transferred"], summary
    assert summary["compressed_pages"] * PAGE_SIZE <= summary["bytes_transferred"], summary
    assert summary["compressed_pages"] > 0 and summary["progress_percent"] == 100.0
    received = destination.client.migration_info()
    assert received["compressed_pages"] == summary["compressed_pages"], received


# Dirties flat out (2 vCPUs, about 240 MB/s) against a 50 MiB/s cap: pre-copy never
# converges, so the migration switches to post-copy after 2 passes.
FAST_GUEST = ("--memory", "128M", "--cpus", "2", "--workload", "dirty", "--working-set", "32M",
              "--dirty-rate", "0")


def test_progress_goes_on_through_postcopy(spawn_vmm: Spawn) -> None:
    destination = spawn_vmm()
    source = spawn_vmm(*FAST_GUEST)
    url, auth = receive(destination)
    started = source.client.send_migration(wait=False, destination_url=url, **auth,
                                           max_bandwidth="50M", postcopy=True,
                                           postcopy_after_iterations=2, timeout_s=60)
    polls: list[dict[str, Any]] = []
    summary = source.client.wait_for_migration(started["id"], on_info=polls.append,
                                               poll_s=POLL_S)
    assert summary["status"] == "completed", summary
    progress = [info["progress_percent"] for info in polls]
    assert progress == sorted(progress) and progress[-1] == 100.0, progress
    owed = [info for info in polls if info["phase"] == "postcopy"]
    assert owed, [info["phase"] for info in polls]
    for info in owed:  # what is left is what post-copy still owes
        assert info["data_remaining_bytes"] == info["postcopy"]["pages_left"] * PAGE_SIZE
    # libvirt's MEMORY_POSTCOPY_REQS: the guest's requests for missing pages, answered
    assert summary["postcopy"]["faults_served"] > 0, summary
    received = destination.client.migration_info()
    assert received["postcopy"]["faults_served"] > 0 and received["progress_percent"] == 100
    # QEMU's postcopy-latency-dist: every remote fault timed is in one bucket; a remote
    # fault is a fault served, so there are no more of them
    latency = received["postcopy"]
    assert 0 < latency["fault_latency_count"] <= latency["faults_served"], latency
    assert sum(latency["fault_latency_dist"]) == latency["fault_latency_count"], latency
    assert len(latency["fault_latency_dist"]) == 33, latency
    assert (0 <= latency["fault_latency_p50_ms"] <= latency["fault_latency_p99_ms"]
            <= latency["fault_latency_max_ms"] <= latency["fault_latency_sum_ms"]), latency
    assert 0 < latency["blocktime_ms"] <= latency["fault_latency_sum_ms"], latency
    # per vCPU (UFFD_FEATURE_THREAD_ID): each waited within the union, and they did wait
    per_vcpu = latency["vcpu_blocktime_ms"]
    assert len(per_vcpu) == 2 and sum(per_vcpu) > 0, latency
    assert all(0 <= ms <= latency["blocktime_ms"] + 0.01 for ms in per_vcpu), latency
    scraped = {(s.name, s.labels.get("le")): s.value
               for family in text_string_to_metric_families(destination.client.metrics())
               for s in family.samples}
    histogram = "vmig_migration_postcopy_fault_latency_seconds"
    assert scraped[(histogram + "_count", None)] == latency["fault_latency_count"], scraped
    assert scraped[(histogram + "_bucket", "+Inf")] == latency["fault_latency_count"]
