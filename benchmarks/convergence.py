"""Convergence under a bandwidth cap: plain pre-copy, auto-converge and post-copy.

A guest that dirties memory about five times faster than the link may carry (2 vCPUs
rewriting their working set flat out, about 240 MB/s, against ``--max-bandwidth
50M``) is migrated between two real ``vmig vmm`` processes over loopback, once per
mode and repetition:

- ``precopy``: pre-copy alone; it never converges and cancels at
  ``--precopy-timeout`` s (the source keeps running);
- ``auto-converge``: the vCPUs are throttled in steps until it converges;
- ``postcopy-1`` and ``postcopy-4``: post-copy after ``--postcopy-after`` pre-copy
  iterations, over 1 and over 4 connections (faults served on their own connection,
  the owed pages pushed over all of them).

Per run: total time, downtime, bytes sent, the throttle reached, post-copy's pages,
faults and fault latency (p50/p99, measured at the destination), and the guest's own
progress: its heartbeat and the working-set pages it wrote, sampled on whichever side
runs it every 100 ms, as rates before, during and after the migration (how much the
guest was slowed). Every run gets fresh VMMs; the order of the modes rotates per
repetition; before each run the benchmark touches and frees RAM so that neither VMM
allocates host-cold memory (docs/performance.md, "Measuring on these machines").

This is vmig alone, over loopback with its own bandwidth cap; convergence_qemu.py runs
the same guest under vmig and QEMU side by side over a tbf-capped link.

    ./dev bench convergence.py --repeat 3

Writes docs/results/convergence.json (every run and its samples, medians) and
docs/images/convergence.png, and prints a table of medians.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from compare_qemu import cpu_seconds, machine_info, save_chart, touch_and_free
from guest_status import Periodic, rate, write_rates

from vmig.api.process import VmmProcess
from vmig.errors import ApiError
from vmig.units import format_size, parse_size

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
IMAGES = ROOT / "docs" / "images"
READY_TIMEOUT_S = 120.0
SETTLE_S = 1.0  # the guest runs flat out this long before and after the migration
MODES = ("precopy", "auto-converge", "postcopy-1", "postcopy-4")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory", default="512M", help="guest RAM (default: 512M)")
    parser.add_argument("--working-set", default="128M",
                        help="memory the 2 vCPUs rewrite flat out (default: 128M)")
    parser.add_argument("--max-bandwidth", default="50M", help="the cap (default: 50M)")
    parser.add_argument("--connections", type=int, default=2,
                        help="connections for precopy and auto-converge (default: 2)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="timeout_s of the converging modes (default: 60)")
    parser.add_argument("--precopy-timeout", type=float, default=20.0,
                        help="timeout_s of plain pre-copy, which never converges here: a "
                             "longer wait only costs time (default: 20)")
    parser.add_argument("--postcopy-after", type=int, default=3,
                        help="postcopy_after_iterations (default: 3)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma-separated, from {', '.join(MODES)}")
    parser.add_argument("--repeat", type=int, default=1, help="runs per mode (default: 1)")
    parser.add_argument("--output", type=Path, default=RESULTS / "convergence.json")
    parser.add_argument("--chart", type=Path, default=IMAGES / "convergence.png")
    args = parser.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(args.modes) - set(MODES))
    if unknown:
        parser.error(f"--modes: unknown {', '.join(unknown)}; choose from {', '.join(MODES)}")
    for flag in ("memory", "working_set", "max_bandwidth"):
        setattr(args, f"{flag}_bytes", parse_size(getattr(args, flag)))
    return args


def mode_parameters(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """send-migration parameters for one mode."""
    common: dict[str, Any] = {"max_bandwidth": args.max_bandwidth, "timeout_s": args.timeout,
                              "connections": args.connections}
    if mode == "auto-converge":
        return common | {"auto_converge": True}
    if mode.startswith("postcopy-"):
        return common | {"postcopy": True, "postcopy_after_iterations": args.postcopy_after,
                         "connections": int(mode.split("-")[1])}
    return common | {"timeout_s": args.precopy_timeout}


class Sampler(Periodic):
    """Samples the guest's counters on whichever VMM runs it, every 100 ms."""

    def __init__(self, source: VmmProcess, destination: VmmProcess) -> None:
        super().__init__()
        self._vmms = {"source": source, "destination": destination}

    def sample(self) -> dict[str, Any] | None:
        """The counters of the side whose VM runs now (None while neither runs)."""
        for side, vmm in self._vmms.items():
            with contextlib.suppress(ApiError, OSError):
                info = vmm.client.info()
                if info["state"] == "running" and info["heartbeat"] is not None:
                    return {"t": round(self.elapsed(), 3), "side": side,
                            "heartbeat": info["heartbeat"],
                            "pages_written": info["pages_written"],
                            "throttle_percent": info.get("throttle_percent", 0)}
        return None


def one_run(mode: str, args: argparse.Namespace, index: int) -> dict[str, Any]:
    """Fresh VMMs, one migration in `mode`, everything measured; VMMs stopped on every way out."""
    touch_and_free(2 * args.memory_bytes)
    with tempfile.TemporaryDirectory(prefix="vmig-conv-") as tmp:
        source_args = ["--memory", args.memory, "--cpus", "2", "--workload", "dirty",
                       "--working-set", args.working_set, "--dirty-rate", "0"]
        destination = source = None
        try:
            destination = VmmProcess.start(f"{tmp}/dst.sock", stderr_path=f"{tmp}/dst.err",
                                           ready_timeout=READY_TIMEOUT_S)
            source = VmmProcess.start(f"{tmp}/src.sock", source_args,
                                      stderr_path=f"{tmp}/src.err",
                                      ready_timeout=READY_TIMEOUT_S)
            reply = destination.client.receive_migration("tcp:127.0.0.1:0")
            with Sampler(source, destination) as sampler:
                time.sleep(SETTLE_S)
                began = sampler.elapsed()
                cpu_before = cpu_seconds(source.proc.pid), cpu_seconds(destination.proc.pid)
                try:
                    summary = source.client.send_migration(
                        destination_url=reply["receiver_url"], token=reply["token"],
                        **mode_parameters(mode, args))
                except ApiError as exc:  # a failed migration: its summary is migration-info
                    summary = source.client.migration_info() | {"api_error": str(exc)}
                ended = sampler.elapsed()
                cpu_after = cpu_seconds(source.proc.pid), cpu_seconds(destination.proc.pid)
                time.sleep(SETTLE_S)
            incoming = None
            with contextlib.suppress(ApiError):
                incoming = destination.client.migration_info()
            completed = summary["status"] == "completed"
            runner = destination if completed else source
            check = runner.client.check_guest(120)
        finally:
            for vmm in (source, destination):
                if vmm is not None:
                    vmm.stop()
    samples = sampler.samples
    postcopy = (incoming or {}).get("postcopy") or summary.get("postcopy") or None
    print(f"  {mode}: {summary['status']} in {summary['elapsed_ms'] / 1000:.1f} s, downtime "
          f"{summary['downtime_ms']} ms, sent {format_size(summary['bytes_transferred'])}",
          file=sys.stderr, flush=True)
    return {
        "mode": mode, "index": index, "status": summary["status"],
        "error": summary.get("error"),
        "total_ms": summary["elapsed_ms"], "downtime_ms": summary["downtime_ms"],
        "bytes_sent": summary["bytes_transferred"], "wire_bytes": summary.get("wire_bytes"),
        "iterations": summary["iterations"],
        "throughput_bytes_per_s": summary["throughput_bytes_per_s"],
        "throttle_percent_max": max((s["throttle_percent"] for s in samples), default=0),
        "postcopy": postcopy,
        "cpu_s": {"source": round(cpu_after[0] - cpu_before[0], 3),
                  "destination": round(cpu_after[1] - cpu_before[1], 3)},
        "guest": {
            key: {"before": rate(samples, 0, began, key),
                  "during": rate(samples, began, ended, key),
                  # post-copy: the guest runs at the destination before the migration ends
                  "postcopy": rate([s for s in samples if s["side"] == "destination"],
                                   began, ended, key),
                  "after": rate(samples, ended, ended + SETTLE_S + 1, key)}
            for key in ("heartbeat", "pages_written")},
        "runs_at_the_end": "destination" if completed else "source",
        "check_ok": check["ok"],
        "window_s": [round(began, 3), round(ended, 3)],
        "samples": samples,
    }


def medians(runs: list[dict[str, Any]], modes: list[str]) -> list[dict[str, Any]]:
    rows = []
    for mode in modes:
        mine = [run for run in runs if run["mode"] == mode]

        def median(get: Any, runs: list[dict[str, Any]] = mine) -> float | None:
            values = [v for v in (get(run) for run in runs) if v is not None]
            return statistics.median(values) if values else None

        def slowdown(run: dict[str, Any]) -> float | None:
            during, before = (run["guest"]["pages_written"][k] for k in ("during", "before"))
            return during / before if during is not None and before else None

        rows.append({
            "mode": mode, "runs": len(mine),
            "statuses": sorted({run["status"] for run in mine}),
            "total_ms": median(lambda r: r["total_ms"]),
            "downtime_ms": median(lambda r: r["downtime_ms"]),
            "bytes_sent": median(lambda r: r["bytes_sent"]),
            "throttle_percent_max": median(lambda r: r["throttle_percent_max"]),
            "guest_rate_during_vs_before": median(slowdown),
            "pages_written_per_s_during": median(
                lambda r: r["guest"]["pages_written"]["during"]),
            "guest_rate_postcopy_vs_before": median(
                lambda r: r["guest"]["pages_written"]["postcopy"]
                / r["guest"]["pages_written"]["before"]
                if r["guest"]["pages_written"]["postcopy"] and r["guest"]["pages_written"]["before"]
                else None),
            "heartbeat_per_s_during": median(lambda r: r["guest"]["heartbeat"]["during"]),
            "faults_served": median(lambda r: (r["postcopy"] or {}).get("faults_served")),
            "fault_latency_p50_ms": median(
                lambda r: (r["postcopy"] or {}).get("fault_latency_p50_ms")),
            "fault_latency_p99_ms": median(
                lambda r: (r["postcopy"] or {}).get("fault_latency_p99_ms")),
            "all_checks_ok": all(run["check_ok"] for run in mine),
        })
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    def cell(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    print("| mode | status | total s | downtime ms | sent | throttle % | guest speed during "
          "| ... in post-copy | faults | fault p50 / p99 ms |")
    print("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|")
    for row in rows:
        speed = row["guest_rate_during_vs_before"]
        post = row["guest_rate_postcopy_vs_before"]
        print(f"| {row['mode']} | {'/'.join(row['statuses'])} "
              f"| {cell(row['total_ms'] and row['total_ms'] / 1000, '.1f')} "
              f"| {cell(row['downtime_ms'], '.0f')} "
              f"| {format_size(int(row['bytes_sent'] or 0))} "
              f"| {cell(row['throttle_percent_max'], '.0f')} "
              f"| {cell(speed and speed * 100, '.0f')}% "
              f"| {cell(post and post * 100, '.0f')}% "
              f"| {cell(row['faults_served'], '.0f')} "
              f"| {cell(row['fault_latency_p50_ms'], '.2f')} / "
              f"{cell(row['fault_latency_p99_ms'], '.2f')} |")


def chart(runs: list[dict[str, Any]], rows: list[dict[str, Any]], args: argparse.Namespace
          ) -> Path:
    """Left: the guest's write rate over time, one line per mode (first repetition).
    Right: total time and downtime per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(MODES, ("tab:gray", "tab:orange", "tab:blue", "tab:green"), strict=True))
    fig, (timeline, bars) = plt.subplots(1, 2, figsize=(13, 4.5),
                                         gridspec_kw={"width_ratios": [3, 2]})
    for mode in args.modes:
        run = next(run for run in runs if run["mode"] == mode)
        samples, (began, _ended) = run["samples"], run["window_s"]
        xs, ys = write_rates(samples, began)
        timeline.plot(xs, ys, color=colors[mode], label=f"{mode} ({run['status']})",
                      linewidth=1.2)
        timeline.axvline(run["window_s"][1] - began, color=colors[mode], linestyle=":",
                         linewidth=1)
    timeline.axvline(0, color="black", linewidth=0.8)
    timeline.set_xlabel("seconds since send-migration (dotted: its end)")
    timeline.set_ylabel("guest writes, thousand pages/s (gaps: paused)")
    timeline.set_ylim(bottom=0)
    timeline.grid(True, alpha=0.3)
    timeline.legend(fontsize=8)
    timeline.set_title("how much the guest was slowed", fontsize=10)
    names = [row["mode"] for row in rows]
    positions = range(len(rows))
    total = [(row["total_ms"] or 0) / 1000 for row in rows]
    downtime = [(row["downtime_ms"] or 0) / 1000 for row in rows]
    bars.bar([p - 0.2 for p in positions], total, width=0.4, label="total s",
             color=[colors[n] for n in names])
    bars.bar([p + 0.2 for p in positions], downtime, width=0.4, label="downtime s",
             color="black")
    for p, row in zip(positions, rows, strict=True):
        bars.text(p - 0.2, total[p], "/".join(row["statuses"]), ha="center", va="bottom",
                  fontsize=7)
    bars.set_xticks(list(positions), names, fontsize=8)
    bars.set_ylabel("seconds (medians)")
    bars.legend(fontsize=8)
    bars.grid(True, axis="y", alpha=0.3)
    bars.set_title("total time and downtime", fontsize=10)
    fig.suptitle(f"{format_size(args.memory_bytes)} guest, 2 vCPUs rewriting "
                 f"{format_size(args.working_set_bytes)} flat out, --max-bandwidth "
                 f"{args.max_bandwidth}; {args.repeat} run(s) per mode", fontsize=10)
    return save_chart(fig, args.chart)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    machine = machine_info(None)
    runs: list[dict[str, Any]] = []
    index = 0
    for repeat in range(args.repeat):
        order = args.modes[repeat % len(args.modes):] + args.modes[:repeat % len(args.modes)]
        for mode in order:
            index += 1
            print(f"run {index}: {mode}, repeat {repeat + 1}/{args.repeat}", file=sys.stderr,
                  flush=True)
            runs.append(one_run(mode, args, index))
    rows = medians(runs, args.modes)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result = {"command": [Path(sys.executable).name, *sys.argv], "settings": settings,
              "machine": machine, "started": started,
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "medians": rows, "runs": runs}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print_table(rows)
    print(f"results: {os.path.relpath(args.output)}\nchart: "
          f"{os.path.relpath(chart(runs, rows, args))}")
    return 0 if all(row["all_checks_ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
