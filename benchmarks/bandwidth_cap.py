"""max_bandwidth lowered in the middle of a migration: how closely vmig and QEMU hold it.

What orchestrators do (libvirt's ``migrate-setspeed``, QEMU's ``migrate-set-parameters
max-bandwidth``): start a migration with one cap and lower it while it runs. Both
programs migrate the same idle guest, whose RAM is a file on /dev/shm full of random
bytes, over loopback TCP with ``--connections`` streams (vmig ``connections``; QEMU
multifd with as many channels), in one run:

1. the migration starts capped at ``--start-cap`` bytes/s;
2. after ``--before-s`` seconds the cap goes down to ``--cap`` (vmig:
   ``vm.migration-set-parameters``; QEMU: ``migrate-set-parameters``);
3. ``--after-s`` seconds later the migration is cancelled (the guest runs on at the
   source; neither program is near the end of the guest's memory by then).

The bytes on the wire are read the same way for both, from the kernel: the sum of
``bytes_acked`` of every TCP socket to the destination's port (``ss -tin``), every
``SAMPLE_S``. The rate held is the slope of those bytes over the window from
``--settle-s`` after the change to the cancel, and per 1 s window; "held within 10%"
is that slope within 10% of the new cap. Controls as in compare_qemu.py: a fresh copy
of the RAM file per run, both processes idle before the migration, twice the guest
size touched and freed right before it, the programs' order rotated per repetition.

    ./dev bench bandwidth_cap.py                 # 1G guest, 4 connections, 3 repeats
    ./dev bench bandwidth_cap.py --quick         # smoke run: 256M, 1 repeat
    ./dev bench bandwidth_cap.py --replot docs/results/bandwidth-cap.json

Writes docs/results/bandwidth-cap.json (``--quick``: bandwidth-cap-quick.json) and
docs/images/bandwidth-cap.png, and prints a markdown table of medians.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from compare_qemu import (
    QEMU,
    READY_TIMEOUT_S,
    SHM,
    QemuProcess,
    _incoming_port,
    fill_random,
    fresh_copy,
    machine_info,
    save_chart,
    touch_and_free,
    wait_idle,
)

from vmig.api.process import VmmProcess
from vmig.units import format_size, parse_size

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
IMAGES = ROOT / "docs" / "images"
PROGRAMS = ("vmig", "qemu")
SAMPLE_S = 0.1
TOLERANCE = 0.10  # the goal: the new cap held within 10 %
WINDOW_S = 1.0
_ACKED = re.compile(r"bytes_acked:(\d+)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory", default=None, help="guest RAM (default 1G; --quick 256M)")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--start-cap", default=None,
                        help="the cap at the start, bytes/s (default 150M; --quick 60M)")
    parser.add_argument("--cap", default=None,
                        help="the cap it is lowered to (default 50M; --quick 20M)")
    parser.add_argument("--before-s", type=float, default=2.0)
    parser.add_argument("--after-s", type=float, default=None,
                        help="seconds at the new cap before the cancel (default 8; --quick 4)")
    parser.add_argument("--settle-s", type=float, default=1.0,
                        help="seconds after the change not counted (the change settling)")
    parser.add_argument("--repeat", type=int, default=None, help="default 3; --quick 1")
    parser.add_argument("--impl", default="vmig,qemu", help="programs: vmig,qemu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--replot", type=Path, default=None, metavar="JSON")
    args = parser.parse_args(argv)
    quick = args.quick
    args.memory = args.memory or ("256M" if quick else "1G")
    args.memory_bytes = parse_size(args.memory, "--memory")
    args.start_cap_bytes = parse_size(args.start_cap or ("60M" if quick else "150M"),
                                      "--start-cap")
    args.cap_bytes = parse_size(args.cap or ("20M" if quick else "50M"), "--cap")
    args.after_s = args.after_s if args.after_s is not None else (4.0 if quick else 8.0)
    args.repeat = args.repeat or (1 if quick else 3)
    args.programs = [p for p in args.impl.split(",") if p]
    if any(p not in PROGRAMS for p in args.programs):
        parser.error(f"--impl: choose from {', '.join(PROGRAMS)}")
    planned = args.start_cap_bytes * args.before_s + args.cap_bytes * args.after_s
    if planned > 0.8 * args.memory_bytes:
        parser.error(f"--memory: {format_size(args.memory_bytes)} would be sent before the "
                     f"cancel ({format_size(int(planned))} planned); give more memory")
    name = "bandwidth-cap-quick" if quick else "bandwidth-cap"
    args.output = RESULTS / f"{name}.json"
    args.image = IMAGES / f"{name}.png"
    return args


# --- measuring, the same for both ------------------------------------------------------------


def acked_bytes(port: int) -> int:
    """Bytes the destination acknowledged on every TCP socket to `port` (the kernel's
    count, whatever the program): what went over the wire."""
    out = subprocess.run(["ss", "-tinH", "state", "established", "dport", f"= :{port}"],
                         capture_output=True, text=True, check=True).stdout
    return sum(int(m) for m in _ACKED.findall(out))


class WireSampler:
    """Samples acked_bytes(port) every SAMPLE_S on a thread of its own."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.began = time.monotonic()
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wire-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self.samples.append((round(time.monotonic() - self.began, 3),
                                 acked_bytes(self.port)))

    def now(self) -> float:
        return time.monotonic() - self.began

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def slope(samples: list[tuple[float, int]], start: float, end: float) -> float | None:
    """Least-squares bytes per second of the samples in [start, end]."""
    points = [(t, b) for t, b in samples if start <= t <= end]
    if len(points) < 3:
        return None
    return statistics.linear_regression([t for t, _ in points],
                                        [float(b) for _, b in points]).slope


def windows(samples: list[tuple[float, int]], start: float, end: float) -> list[float]:
    """The rate in each whole WINDOW_S from `start` (first and last sample in it)."""
    rates = []
    left = start
    while left + WINDOW_S <= end + 1e-9:
        points = [(t, b) for t, b in samples if left <= t <= left + WINDOW_S]
        if len(points) >= 2:
            (t0, b0), (t1, b1) = points[0], points[-1]
            rates.append((b1 - b0) / (t1 - t0))
        left += WINDOW_S
    return rates


def figures(args: argparse.Namespace, sampler: WireSampler, changed_at: float,
            ended_at: float) -> dict[str, Any]:
    before = slope(sampler.samples, changed_at - args.before_s + 0.5, changed_at)
    after = slope(sampler.samples, changed_at + args.settle_s, ended_at)
    per_window = windows(sampler.samples, changed_at + args.settle_s, ended_at)
    held = None if after is None else after / args.cap_bytes
    return {"rate_before_bytes_per_s": before, "rate_after_bytes_per_s": after,
            "held_fraction": held, "window_rates_bytes_per_s": per_window,
            "window_fraction_min": min(per_window) / args.cap_bytes if per_window else None,
            "window_fraction_max": max(per_window) / args.cap_bytes if per_window else None,
            "held_within_10pct": held is not None and abs(held - 1) <= TOLERANCE,
            "changed_at_s": round(changed_at, 3), "ended_at_s": round(ended_at, 3),
            "samples": sampler.samples}


def _wait(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout:g} s")
        time.sleep(0.02)


# --- vmig ------------------------------------------------------------------------------------


def run_vmig(args: argparse.Namespace, workdir: Path, ram: Path) -> dict[str, Any]:
    destination = source = None
    try:
        destination = VmmProcess.start(str(workdir / "dst.sock"),
                                       stderr_path=str(workdir / "dst.err"),
                                       ready_timeout=READY_TIMEOUT_S)
        source = VmmProcess.start(str(workdir / "src.sock"),
                                  ["--memory", args.memory, "--working-set", "16M",
                                   "--memory-file", str(ram)],
                                  stderr_path=str(workdir / "src.err"),
                                  ready_timeout=READY_TIMEOUT_S)
        listening = destination.client.receive_migration("tcp:127.0.0.1:0")
        port = int(listening["receiver_url"].rsplit(":", 1)[1])
        wait_idle(source.proc.pid, destination.proc.pid)
        touch_and_free(2 * args.memory_bytes)
        sampler = WireSampler(port)
        try:
            source.client.send_migration(
                destination_url=listening["receiver_url"], token=listening["token"],
                connections=args.connections, max_bandwidth=str(args.start_cap_bytes),
                timeout_s=600, wait=False)
            _wait(lambda: source.client.migration_info().get("phase") == "precopy",
                  "pre-copy")
            started_at = sampler.now()
            time.sleep(max(0.0, started_at + args.before_s - sampler.now()))
            changed_at = sampler.now()
            source.client.migration_set_parameters(max_bandwidth=str(args.cap_bytes))
            time.sleep(args.after_s)
            ended_at = sampler.now()
            source.client.cancel_migration()
            info = source.client.migration_info()
        finally:
            sampler.close()
        state = source.client.info()["state"]
    finally:
        for vmm in (source, destination):
            if vmm is not None:
                vmm.stop()
    result = figures(args, sampler, changed_at, ended_at)
    result.update(status=info.get("status"), source_state=state,
                  ok=info.get("status") == "cancelled" and state == "running")
    return result


# --- QEMU ------------------------------------------------------------------------------------


def run_qemu(args: argparse.Namespace, qemu: str, workdir: Path, ram: Path) -> dict[str, Any]:
    destination_ram = SHM / f"{ram.stem}-dst.ram"
    destination = source = None
    try:
        destination = QemuProcess(qemu, "dst", workdir, destination_ram, args.memory_bytes,
                                  incoming=True)
        source = QemuProcess(qemu, "src", workdir, ram, args.memory_bytes)
        capabilities = [{"capability": "events", "state": True}]
        parameters: dict[str, Any] = {"max-bandwidth": args.start_cap_bytes}
        if args.connections > 1:
            capabilities.append({"capability": "multifd", "state": True})
            parameters["multifd-channels"] = args.connections
        for side in (destination, source):
            side.execute("migrate-set-capabilities", {"capabilities": capabilities})
            side.execute("migrate-set-parameters", parameters)
        destination.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
        port = _incoming_port(destination)
        wait_idle(source.pid, destination.pid)
        touch_and_free(2 * args.memory_bytes)
        sampler = WireSampler(port)
        try:
            source.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
            _wait(lambda: source.execute("query-migrate").get("status") == "active", "active")
            started_at = sampler.now()
            time.sleep(max(0.0, started_at + args.before_s - sampler.now()))
            changed_at = sampler.now()
            source.execute("migrate-set-parameters", {"max-bandwidth": args.cap_bytes})
            time.sleep(args.after_s)
            ended_at = sampler.now()
            source.execute("migrate_cancel")
            _wait(lambda: source.execute("query-migrate").get("status") == "cancelled",
                  "cancelled")
            status = source.execute("query-status").get("status")
        finally:
            sampler.close()
    finally:
        for side in (source, destination):
            if side is not None:
                side.stop()
        with contextlib.suppress(FileNotFoundError):
            destination_ram.unlink()
    result = figures(args, sampler, changed_at, ended_at)
    result.update(status="cancelled", source_state=status, ok=status == "running")
    return result


# --- the run ---------------------------------------------------------------------------------


def summarise(args: argparse.Namespace, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for program in args.programs:
        mine = [r for r in runs if r["program"] == program and r.get("held_fraction")]
        if not mine:
            rows.append({"program": program, "runs": 0})
            continue

        def stat(key: str, runs: list[dict[str, Any]] = mine) -> dict[str, float]:
            values = [r[key] for r in runs if r.get(key) is not None]
            return {"median": statistics.median(values), "min": min(values),
                    "max": max(values)}

        rows.append({"program": program, "runs": len(mine), "held_fraction": stat("held_fraction"),
                     "window_fraction_min": stat("window_fraction_min"),
                     "window_fraction_max": stat("window_fraction_max"),
                     "start_fraction": {k: v / args.start_cap_bytes for k, v in
                                        stat("rate_before_bytes_per_s").items()},
                     "held_within_10pct": all(r["held_within_10pct"] for r in mine)})
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    def cell(stat: dict[str, float] | None) -> str:
        if not stat:
            return "-"
        return f"{stat['median']:.3f} ({stat['min']:.3f}-{stat['max']:.3f})"

    lines = ["| program | rate / start cap | rate / new cap | 1 s windows / new cap, "
             "lowest | highest | within 10 % |", "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['program']} | {cell(row.get('start_fraction'))} | "
                     f"{cell(row.get('held_fraction'))} | "
                     f"{cell(row.get('window_fraction_min'))} | "
                     f"{cell(row.get('window_fraction_max'))} | "
                     f"{'yes' if row.get('held_within_10pct') else 'no'} |")
    return "\n".join(lines)


def chart(result: dict[str, Any], path: Path) -> Path:
    """Bytes per second on the wire over time, each run aligned on its change of cap."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = result["settings"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    colours = {"vmig": "tab:blue", "qemu": "tab:orange"}
    labelled: set[str] = set()
    for run in result["runs"]:
        samples = run.get("samples")
        if not samples:
            continue
        times = [t - run["changed_at_s"] for t, _ in samples]
        rates = [(b1 - b0) / (t1 - t0) / 1e6 for (t0, b0), (t1, b1)
                 in zip(samples[::3], samples[3::3], strict=False)]
        label = run["program"] if run["program"] not in labelled else None
        labelled.add(run["program"])
        ax.plot(times[::3][1:len(rates) + 1], rates, color=colours[run["program"]],
                alpha=0.7, label=label)
    ax.step([-settings["before_s"], 0, settings["after_s"]],
            [settings["start_cap_bytes"] / 1e6, settings["cap_bytes"] / 1e6,
             settings["cap_bytes"] / 1e6], where="post", color="black", linestyle="--",
            label="cap")
    ax.set_xlabel("seconds since the cap was lowered")
    ax.set_ylabel("MB/s on the wire (0.3 s windows)")
    ax.set_title(f"max_bandwidth lowered mid-migration ({settings['connections']} connections)")
    ax.legend()
    return save_chart(fig, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot is not None:
        result = json.loads(args.replot.read_text())
        print(chart(result, IMAGES / f"{args.replot.stem}.png"))
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    qemu = shutil.which(QEMU)
    if "qemu" in args.programs and qemu is None:
        print(f"bandwidth_cap: {QEMU} not found; run it with ./dev bench bandwidth_cap.py",
              file=sys.stderr)
        return 2
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    runs: list[dict[str, Any]] = []
    template = SHM / "bandwidth-cap-template.ram"
    with tempfile.TemporaryDirectory(prefix="bandwidth-cap-") as tmp:
        try:
            fill_random(template, args.memory_bytes)
            serial = 0
            for repeat in range(args.repeat):
                order = args.programs[repeat % len(args.programs):] + \
                    args.programs[:repeat % len(args.programs)]
                for program in order:
                    serial += 1
                    workdir = Path(tmp) / f"run-{serial}"
                    workdir.mkdir()
                    ram = SHM / f"bandwidth-cap-{serial}.ram"
                    fresh_copy(template, ram)
                    run: dict[str, Any] = {"program": program, "repeat": repeat + 1}
                    try:
                        run.update(run_vmig(args, workdir, ram) if program == "vmig"
                                   else run_qemu(args, qemu or "", workdir, ram))
                    except Exception as exc:
                        run["error"] = f"{type(exc).__name__}: {exc}"
                    finally:
                        with contextlib.suppress(FileNotFoundError):
                            ram.unlink()
                    runs.append(run)
                    held = run.get("held_fraction")
                    print(f"[{serial}] {program}: " + (run["error"] if "error" in run else
                          f"{held:.3f} of the new cap, ok={run['ok']}"), file=sys.stderr,
                          flush=True)
        finally:
            with contextlib.suppress(FileNotFoundError):
                template.unlink()
    rows = summarise(args, runs)
    settings = {k: v for k, v in vars(args).items() if k not in ("output", "image", "replot")}
    result = {"settings": settings, "machine": machine_info(qemu), "started": started,
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "medians": rows,
              "runs": runs}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\n{format_size(args.memory_bytes)} idle guest, {args.connections} connections, "
          f"cap {format_size(args.start_cap_bytes)}/s lowered to "
          f"{format_size(args.cap_bytes)}/s; medians of {args.repeat} (min-max)\n")
    print(markdown_table(rows))
    print(f"\nresults: {args.output}\nchart: {chart(result, args.image)}")
    return 1 if any("error" in r or not r.get("ok") for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
