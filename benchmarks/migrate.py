"""Benchmark live migration between two real `vmig vmm` processes over loopback TCP.

For every run it starts a fresh destination VMM (empty) and a fresh source VMM
with a guest, migrates the guest, and records the sender's summary (total
time, throughput, downtime, iterations, bytes), the wall time of the request,
the CPU time (user + sys, from /proc/PID/stat) each VMM process spent during
the migration and in all, the source's peak RSS beyond guest memory (RssAnon +
RssFile, sampled every 10 ms), and whether the guest's self-check passed at the
destination. Runs are interleaved (1, 2, 4, 8, 1, 2, ...) so that drift on a
shared machine spreads over every configuration, and right before each send (both VMMs
started, an idle guest booted) twice the guest size is touched and freed, so that
neither VMM allocates host-cold RAM during the migration.

With ``--prefill random`` the source's RAM is a file on /dev/shm filled with
random bytes *before* the VMM starts, so no page is a hole or zero (as in the
QEMU baselines); the guest then stamps only its working set.

    python benchmarks/migrate.py --memory 1G --workload idle --prefill random \\
        --connections 1,2,4,8 --repeat 3

Results go to benchmarks/results/migrate-<timestamp>.json (gitignored) and a
table of medians is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from compare_qemu import (
    cpu_seconds,
    fill_random,
    machine_info,
    make_certificates,
    touch_and_free,
    wait_idle,
)

from vmig.api.process import VmmProcess
from vmig.units import format_size, parse_size

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHM = Path("/dev/shm")
READY_TIMEOUT_S = 120.0
SETTLE_S = 1.0  # a dirtying guest runs this long before the migration starts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory", default="1G", help="guest RAM (default: 1G)")
    parser.add_argument("--cpus", type=int, default=1, help="vCPUs (default: 1)")
    parser.add_argument("--workload", choices=("idle", "dirty"), default="idle")
    parser.add_argument("--working-set", default=None,
                        help="memory the guest stamps (and rewrites if dirty); default: the VMM's")
    parser.add_argument("--dirty-rate", type=int, default=None,
                        help="pages/s the dirty workload rewrites (default: the VMM's, 10000)")
    parser.add_argument("--connections", default="1,2,4,8",
                        help="comma-separated connection counts (default: 1,2,4,8)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per connection count")
    parser.add_argument("--prefill", choices=("random", "zero75", "none"), default="none",
                        help="random: back the source RAM with a /dev/shm file full of random "
                             "bytes (no holes, no zero pages); zero75: the same, but 3 of every "
                             "4 pages written as zeros (data, not holes)")
    parser.add_argument("--compress", default=None,
                        help="send-migration --compress (zstd or zstd:LEVEL)")
    parser.add_argument("--tls", action="store_true",
                        help="mutual TLS (certificates made with openssl) instead of a token")
    parser.add_argument("--downtime-ms", type=int, default=300)
    parser.add_argument("--verify-memory", action="store_true",
                        help="compare memory digests on both sides (adds to the downtime)")
    parser.add_argument("--dst-prealloc", action="store_true",
                        help="destination faults its RAM in before listening (receive-migration "
                             "--prealloc), like QEMU's 'dst prealloc' baselines")
    parser.add_argument("--no-check", action="store_true",
                        help="skip the guest self-check at the destination")
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON results (default: benchmarks/results/migrate-<time>.json)")
    args = parser.parse_args(argv)
    try:
        args.connection_counts = [int(c) for c in args.connections.split(",") if c.strip()]
    except ValueError:
        parser.error(f"--connections: expected numbers like 1,2,4,8, got {args.connections!r}")
    if not args.connection_counts or args.repeat < 1:
        parser.error("need at least one connection count and --repeat >= 1")
    args.memory_bytes = parse_size(args.memory, "memory size")
    return args


# --- measuring --------------------------------------------------------------------------------


def memory_status(pid: int) -> dict[str, int]:
    """RssAnon, RssFile and RssShmem of process `pid`, in bytes (/proc/PID/status)."""
    figures = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("RssAnon", "RssFile", "RssShmem"):
                figures[name] = int(value.split()[0]) * 1024
    return figures


class RssPeak:
    """The highest RSS beyond guest memory (RssAnon + RssFile; guest memory is a shared
    memfd or file, counted in RssShmem) of a process, sampled every 10 ms."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.baseline = self._beyond_guest()
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _beyond_guest(self) -> int:
        figures = memory_status(self.pid)
        return figures["RssAnon"] + figures["RssFile"]

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            with contextlib.suppress(OSError, KeyError):
                self.peak = max(self.peak, self._beyond_guest())

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return {"before": self.baseline, "peak": self.peak}


# --- one run ----------------------------------------------------------------------------------


def one_run(args: argparse.Namespace, connections: int, index: int) -> dict[str, Any]:
    """Fresh VMMs, one migration, everything measured; the VMMs are stopped on every way out."""
    memory_file = SHM / f"vmig-bench-{os.getpid()}-{index}.ram" if args.prefill != "none" \
        else None
    with tempfile.TemporaryDirectory(prefix="vmig-bench-") as tmp:
        source_args = ["--memory", args.memory, "--cpus", str(args.cpus),
                       "--workload", args.workload]
        if args.working_set:
            source_args += ["--working-set", args.working_set]
        if args.dirty_rate is not None:
            source_args += ["--dirty-rate", str(args.dirty_rate)]
        destination = source = None
        try:
            if memory_file is not None:
                fill_random(memory_file, args.memory_bytes,
                            0.75 if args.prefill == "zero75" else 0.0)
                source_args += ["--memory-file", str(memory_file)]
            destination = VmmProcess.start(f"{tmp}/dst.sock", stderr_path=f"{tmp}/dst.err",
                                           ready_timeout=READY_TIMEOUT_S)
            source = VmmProcess.start(f"{tmp}/src.sock", source_args,
                                      stderr_path=f"{tmp}/src.err",
                                      ready_timeout=READY_TIMEOUT_S)
            if args.workload == "dirty":
                time.sleep(SETTLE_S)
            tls = make_certificates(Path(tmp) / "tls") if args.tls else None
            reply = destination.client.receive_migration(
                "tcp:127.0.0.1:0", prealloc=args.memory if args.dst_prealloc else None,
                tls_dir=None if tls is None else str(tls[0]))
            url = reply["receiver_url"]
            auth = ({"tls_dir": str(tls[1])} if tls is not None
                    else {"token": reply["token"]})
            if args.workload != "dirty":
                wait_idle(source.proc.pid, destination.proc.pid)  # booted and stamped
            # right before the send, after the prefill and both VMMs' start-up: neither
            # VMM then allocates host-cold RAM during the migration (compare_qemu.py)
            touch_and_free(2 * args.memory_bytes)
            before = {"source": cpu_seconds(source.proc.pid),
                      "destination": cpu_seconds(destination.proc.pid)}
            rss = RssPeak(source.proc.pid)
            began = time.monotonic()
            summary = source.client.send_migration(
                destination_url=url, connections=connections, downtime_ms=args.downtime_ms,
                verify_memory=args.verify_memory, compress=args.compress, **auth)
            wall_s = time.monotonic() - began
            source_rss = rss.stop()
            after = {"source": cpu_seconds(source.proc.pid),
                     "destination": cpu_seconds(destination.proc.pid)}
            check = None if args.no_check else destination.client.check_guest(120)
            state = destination.client.info()["state"]
        finally:
            for vmm in (source, destination):
                if vmm is not None:
                    vmm.stop()
            if memory_file is not None:
                with contextlib.suppress(FileNotFoundError):
                    memory_file.unlink()
    return {
        "connections": summary["connections"],
        "requested_connections": connections,
        "total_ms": summary["elapsed_ms"],
        "wall_ms": round(wall_s * 1000, 1),
        "throughput_bytes_per_s": summary["throughput_bytes_per_s"],
        "downtime_ms": summary["downtime_ms"],
        "iterations": summary["iterations"],
        "bytes_sent": summary["bytes_transferred"],
        "wire_bytes": summary["wire_bytes"],
        "zero_pages": summary["zero_pages"],
        "memory_verified": summary["memory_verified"],
        "warnings": summary["warnings"],
        "source_rss_beyond_guest": source_rss,
        "cpu_s": {side: round(after[side] - before[side], 3) for side in after},
        "cpu_total_s": {side: round(value, 3) for side, value in after.items()},
        "destination_state": state,
        "check_ok": None if check is None else check["ok"],
    }


# --- the table --------------------------------------------------------------------------------


def medians(runs: list[dict[str, Any]], counts: list[int]) -> list[dict[str, Any]]:
    rows = []
    for count in counts:
        mine = [run for run in runs if run["requested_connections"] == count]
        if not mine:
            continue

        def median(key: str, side: str | None = None, runs: list[dict[str, Any]] = mine) -> float:
            return statistics.median(run[key][side] if side else run[key] for run in runs)

        rows.append({
            "connections": count, "runs": len(mine),
            "total_ms": median("total_ms"), "wall_ms": median("wall_ms"),
            "throughput_bytes_per_s": median("throughput_bytes_per_s"),
            "downtime_ms": median("downtime_ms"), "iterations": median("iterations"),
            "bytes_sent": median("bytes_sent"),
            "source_rss_beyond_guest_peak": max(run["source_rss_beyond_guest"]["peak"]
                                                for run in mine),
            "source_cpu_s": median("cpu_s", "source"),
            "destination_cpu_s": median("cpu_s", "destination"),
            "all_checks_ok": all(run["check_ok"] is not False for run in mine),
        })
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    header = (f"{'conns':>5} {'runs':>4} {'total ms':>9} {'GB/s':>6} {'downtime ms':>11} "
              f"{'iters':>5} {'sent':>9} {'src cpu s':>9} {'dst cpu s':>9} {'src rss+':>9}  check")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['connections']:>5} {row['runs']:>4} {row['total_ms']:>9.0f} "
              f"{row['throughput_bytes_per_s'] / 1e9:>6.2f} {row['downtime_ms']:>11.1f} "
              f"{row['iterations']:>5.0f} {format_size(row['bytes_sent']):>9} "
              f"{row['source_cpu_s']:>9.2f} {row['destination_cpu_s']:>9.2f} "
              f"{format_size(row['source_rss_beyond_guest_peak']):>9}  "
              f"{'ok' if row['all_checks_ok'] else 'FAILED'}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    output = args.output or RESULTS / f"migrate-{time.strftime('%Y%m%d-%H%M%S')}.json"
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    machine = machine_info(None)  # the commit again at the end: a change in between would show
    runs: list[dict[str, Any]] = []
    index = 0
    for repeat in range(args.repeat):
        for count in args.connection_counts:
            index += 1
            print(f"run {index}: {count} connection(s), repeat {repeat + 1}/{args.repeat}",
                  file=sys.stderr, flush=True)
            runs.append(one_run(args, count, index))
    rows = medians(runs, args.connection_counts)
    settings = {name: value for name, value in vars(args).items()
                if name not in ("output", "connection_counts")}
    machine["commit_at_end"] = machine_info(None)["commit"]
    result = {"command": [Path(sys.executable).name, *sys.argv],
              "settings": settings, "machine": machine, "started": started,
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "runs": runs, "medians": rows}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.memory} {args.workload} guest, {args.cpus} vCPU(s), prefill {args.prefill}"
          f"{', dst prealloc' if args.dst_prealloc else ''}"
          f"{', verify' if args.verify_memory else ''}; medians of {args.repeat} run(s)")
    print_table(rows)
    print(f"results: {output}")
    return 0 if all(row["all_checks_ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
