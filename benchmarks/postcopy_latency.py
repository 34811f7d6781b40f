"""Post-copy fault latency at the destination, as QEMU 10.1 reports it, with the push on.

A guest whose vCPUs touch their working set flat out in random order (``--workload
dirty --dirty-rate 0``, 2 GiB, 2 vCPUs) is migrated between two real ``vmig vmm``
processes over loopback with post-copy forced early: ``postcopy_after_iterations`` 1
and ``downtime_ms`` 0 (pre-copy cannot converge, so the first pass ends in post-copy).
It goes over ``--connections`` 8 with no bandwidth cap, so the background push of the
owed pages runs at full speed while the vCPUs' faults are served on the FAULT
connection. After each run the destination's ``vm.migration-info`` gives the remote
faults' service time (vCPU fault read off userfaultfd -> page installed and the vCPU
woken): the log2 µs histogram (QEMU's ``postcopy-latency-dist``), count, p50, p99, max,
the blocktime and the per-vCPU blocktime (summed over the vCPUs in the table;
docs/migration-info.md).

Anchors: QEMU's published remote-fault latency is about 10 ms without its
postcopy-preempt channel and about 0.5 ms with it; the goal here is p99 <= 1 ms with
the push running. Every run gets fresh VMMs, and RAM is touched and freed before each
(docs/performance.md, "Measuring on these machines").

    ./dev bench postcopy_latency.py --repeat 5

Writes docs/results/postcopy-latency.json (every run, medians with ranges) and
docs/images/postcopy-latency.png (the histogram), and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from compare_qemu import machine_info, save_chart, touch_and_free

from vmig.api.process import VmmProcess
from vmig.units import parse_size

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
IMAGES = ROOT / "docs" / "images"
READY_TIMEOUT_S = 120.0
PROBE = Path(__file__).with_name("wakeup_probe.py")
MARK_POLL_S = 0.01  # how often the source's phase is read until post-copy begins
SETTLE_S = 1.0  # the guest runs flat out this long before the migration starts
#: Published QEMU remote-fault latencies (ms) and the goal, shown beside the results.
QEMU_NO_PREEMPT_MS = 10.0
QEMU_PREEMPT_MS = 0.5
GOAL_P99_MS = 1.0
#: The wake-up probe's lateness during post-copy (benchmarks/wakeup_probe.py).
PROBE_FIGURES = ("probe_postcopy_p99_ms", "probe_postcopy_p999_ms", "probe_postcopy_max_ms")
FIGURES = ("fault_latency_count", "fault_latency_p50_ms", "fault_latency_p99_ms",
           "fault_latency_max_ms", "blocktime_ms", "faults_served", "pages")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory", default="2G", help="guest RAM (default: 2G)")
    parser.add_argument("--cpus", type=int, default=2, help="vCPUs (default: 2)")
    parser.add_argument("--working-set", default=None,
                        help="memory the vCPUs touch (default: half the RAM)")
    parser.add_argument("--connections", type=int, default=8,
                        help="connections; the push goes over all (default: 8)")
    parser.add_argument("--downtime-ms", type=int, default=0,
                        help="downtime_ms; 0: a dirtying guest never converges, so the first "
                             "pass always ends in post-copy (default: 0)")
    parser.add_argument("--timeout", type=float, default=300.0, help="timeout_s")
    parser.add_argument("--repeat", type=int, default=5, help="runs (default: 5)")
    parser.add_argument("--output", type=Path, default=RESULTS / "postcopy-latency.json")
    parser.add_argument("--chart", type=Path, default=IMAGES / "postcopy-latency.png")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.connections < 1:
        parser.error("need --repeat >= 1 and --connections >= 1")
    args.memory_bytes = parse_size(args.memory, "memory size")
    if args.working_set is None:
        args.working_set = f"{args.memory_bytes // 2 >> 20}M"
    return args


def one_run(args: argparse.Namespace) -> dict[str, Any]:
    """Fresh VMMs, one post-copy migration, the destination's fault figures."""
    touch_and_free(2 * args.memory_bytes)
    with tempfile.TemporaryDirectory(prefix="vmig-bench-") as tmp:
        destination = source = None
        try:
            destination = VmmProcess.start(f"{tmp}/dst.sock", stderr_path=f"{tmp}/dst.err",
                                           ready_timeout=READY_TIMEOUT_S)
            source = VmmProcess.start(
                f"{tmp}/src.sock", ["--memory", args.memory, "--cpus", str(args.cpus),
                                    "--workload", "dirty", "--dirty-rate", "0",
                                    "--order", "random", "--working-set", args.working_set],
                stderr_path=f"{tmp}/src.err", ready_timeout=READY_TIMEOUT_S)
            time.sleep(SETTLE_S)
            reply = destination.client.receive_migration("tcp:127.0.0.1:0")
            probe = subprocess.Popen([sys.executable, str(PROBE)], stdout=subprocess.PIPE,
                                     text=True)
            try:
                started = source.client.send_migration(
                    wait=False, destination_url=reply["receiver_url"], token=reply["token"],
                    connections=args.connections, postcopy=True, postcopy_after_iterations=1,
                    downtime_ms=args.downtime_ms, timeout_s=args.timeout)
                mark_postcopy(source, probe)
                summary = source.client.wait_for_migration(started["id"])
            finally:
                probe.terminate()
                wakeups = json.loads(probe.communicate(timeout=30)[0])
            incoming = destination.client.migration_info()
            check = destination.client.check_guest(120)
        finally:
            for vmm in (source, destination):
                if vmm is not None:
                    vmm.stop()
    postcopy = incoming.get("postcopy") or {}
    return {
        "status": summary["status"], "switchover": summary.get("switchover"),
        "total_ms": summary["elapsed_ms"], "downtime_ms": summary["downtime_ms"],
        "connections": summary["connections"],
        **{name: postcopy.get(name) for name in FIGURES},
        "fault_latency_dist": postcopy.get("fault_latency_dist") or [],
        "vcpu_blocktime_ms": postcopy.get("vcpu_blocktime_ms") or [],
        "vcpu_blocktime_total_ms": (round(sum(postcopy["vcpu_blocktime_ms"]), 3)
                                    if postcopy.get("vcpu_blocktime_ms") else None),
        "check_ok": check["ok"],
        "wakeup_probe": wakeups,
        "probe_postcopy_p99_ms": wakeups["marked"]["p99_ms"],
        "probe_postcopy_p999_ms": wakeups["marked"]["p999_ms"],
        "probe_postcopy_max_ms": wakeups["marked"]["max_ms"],
    }


def mark_postcopy(source: VmmProcess, probe: subprocess.Popen[str]) -> None:
    """Tell the wake-up probe when the source reports post-copy (polled every
    `MARK_POLL_S`; the polling stops there, so post-copy itself runs without it)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        info = source.client.migration_info()
        if info.get("phase") == "postcopy" or not info.get("active", True):
            probe.send_signal(signal.SIGUSR1)
            return
        time.sleep(MARK_POLL_S)


def spread(runs: list[dict[str, Any]], name: str) -> dict[str, float] | None:
    """Median, min and max of a figure over the runs that have it."""
    values = [run[name] for run in runs if run.get(name) is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def cell(figure: dict[str, float] | None, spec: str) -> str:
    if figure is None:
        return "-"
    return (f"{figure['median']:{spec}} ({figure['min']:{spec}} to "
            f"{figure['max']:{spec}})")


def markdown(medians: dict[str, Any], runs: int) -> str:
    rows = [f"Medians of {runs} run(s), (min to max):", "",
            "| figure | vmig | QEMU without preempt | QEMU with preempt | goal |",
            "|---|---:|---:|---:|---:|"]
    anchors = {"fault_latency_p99_ms": ("", "", f"<= {GOAL_P99_MS}"),
               "fault_latency_p50_ms": (f"~{QEMU_NO_PREEMPT_MS}", f"~{QEMU_PREEMPT_MS}", "")}
    for name, spec in (("fault_latency_count", ".0f"), ("faults_served", ".0f"),
                       ("fault_latency_p50_ms", ".3f"), ("fault_latency_p99_ms", ".3f"),
                       ("fault_latency_max_ms", ".3f"), ("blocktime_ms", ".1f"),
                       ("vcpu_blocktime_total_ms", ".1f"),
                       ("pages", ".0f"), ("total_ms", ".0f"), ("downtime_ms", ".1f"),
                       ("probe_postcopy_p99_ms", ".3f"), ("probe_postcopy_p999_ms", ".3f"),
                       ("probe_postcopy_max_ms", ".3f")):
        without, with_preempt, goal = anchors.get(name, ("", "", ""))
        rows.append(f"| `{name}` | {cell(medians[name], spec)} | {without} | "
                    f"{with_preempt} | {goal} |")
    return "\n".join(rows) + "\n"


def chart(runs: list[dict[str, Any]], path: Path) -> Path:
    """The histogram: remote faults per log2 µs bucket, summed over the runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = max((len(run["fault_latency_dist"]) for run in runs), default=0)
    totals = [sum(run["fault_latency_dist"][i] for run in runs
                  if i < len(run["fault_latency_dist"])) for i in range(width)]
    used = [i for i, count in enumerate(totals) if count] or [0]
    shown = range(max(used[0] - 1, 0), min(used[-1] + 2, max(width, 1)))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.bar([2.0 ** i for i in shown], [totals[i] if i < width else 0 for i in shown],
           width=[2.0 ** i for i in shown], align="edge", edgecolor="black",
           label="remote faults, bucket [2^i, 2^(i+1)) µs")
    ax.set_xscale("log", base=2)
    for ms, style, label in ((QEMU_PREEMPT_MS, ":", "QEMU with preempt (~0.5 ms)"),
                             (GOAL_P99_MS, "-", "goal: p99 <= 1 ms"),
                             (QEMU_NO_PREEMPT_MS, "--", "QEMU without preempt (~10 ms)")):
        ax.axvline(ms * 1000, linestyle=style, color="tab:red", label=label)
    ax.set_xlabel("service time of a remote fault (µs, log2)")
    ax.set_ylabel(f"faults (sum of {len(runs)} run(s))")
    ax.legend(fontsize=8)
    ax.set_title("vmig post-copy fault latency at the destination, push at full speed",
                 fontsize=10)
    return save_chart(fig, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine = machine_info(None)
    began = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    runs = []
    for number in range(1, args.repeat + 1):
        print(f"run {number}/{args.repeat}", file=sys.stderr, flush=True)
        runs.append(one_run(args))
    medians = {name: spread(runs, name)
               for name in (*FIGURES, "vcpu_blocktime_total_ms", "total_ms", "downtime_ms",
                            *PROBE_FIGURES)}
    settings = {name: str(value) if isinstance(value, Path) else value
                for name, value in vars(args).items()}
    result = {"command": [Path(sys.executable).name, *sys.argv], "settings": settings,
              "machine": machine, "started": began,
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "anchors_ms": {"qemu_without_preempt": QEMU_NO_PREEMPT_MS,
                             "qemu_with_preempt": QEMU_PREEMPT_MS, "goal_p99": GOAL_P99_MS},
              "runs": runs, "medians": medians}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.memory} guest, {args.cpus} vCPU(s) touching {args.working_set} at random, "
          f"{args.connections} connections, push uncapped")
    print(markdown(medians, len(runs)))
    print(f"results: {args.output}; chart: {chart(runs, args.chart)}")
    postcopied = all(run["fault_latency_count"] is not None for run in runs)
    return 0 if postcopied and all(run["check_ok"] for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
