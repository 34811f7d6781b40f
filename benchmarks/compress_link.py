"""Where compression pays: migration over a 1 Gbit/s link between two network namespaces.

The destination VMM runs in a network namespace joined to the host by a veth pair
whose host end carries a ``tbf`` qdisc at ``--rate`` (tests/netns.py, as the two-host
test does), so the source's data crosses a link like a 1 Gbit/s NIC. The source's RAM
is a /dev/shm file filled before the VMM starts, either with text-like pages (words
drawn from a small vocabulary: zstd level 1 shrinks it about 2.3x, as it does much
of a real guest's memory) or with random bytes (does not compress: the control). Each
memory kind is migrated without compression and with ``--compress zstd`` (level 1)
and ``zstd:3``; per run: total time, bytes of guest memory sent, bytes on the wire,
CPU seconds of both VMMs, and the guest's self-check at the destination.

Controls as in benchmarks/compare_qemu.py: fresh VMMs and a fresh RAM file per run,
twice the guest size touched and freed before each run, the order of the settings
rotated per repetition, medians with min-max.

    ./dev bench compress_link.py --memory 1G --repeat 3

Writes docs/results/compress-link.json and docs/images/compress-link.png and prints a
table. Needs root and iproute2 (./dev installs it).
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

import numpy as np
from compare_qemu import cpu_seconds, machine_info, save_chart, touch_and_free

from vmig.api.process import VmmProcess
from vmig.units import MiB, format_size, parse_size

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import netns  # noqa: E402  (tests/netns.py: the namespace, the veth pair, tbf)

RESULTS = ROOT / "docs" / "results"
IMAGES = ROOT / "docs" / "images"
SHM = Path("/dev/shm")
FILL_CHUNK = 64 * MiB
READY_TIMEOUT_S = 120.0
COMPRESSIONS = (None, "zstd", "zstd:3")
KINDS = ("text", "random")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory", default="1G", help="guest RAM (default: 1G)")
    parser.add_argument("--rate", default="1gbit", help="tbf rate of the link (default: 1gbit)")
    parser.add_argument("--connections", type=int, default=4, help="(default: 4)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per setting (default: 1)")
    parser.add_argument("--output", type=Path, default=RESULTS / "compress-link.json")
    parser.add_argument("--chart", type=Path, default=IMAGES / "compress-link.png")
    args = parser.parse_args(argv)
    args.memory_bytes = parse_size(args.memory, "memory size")
    return args


def fill(path: Path, size: int, kind: str) -> None:
    """`size` bytes of text-like pages (random words of a 4,096-word vocabulary) or random."""
    rng = np.random.default_rng()
    vocabulary = [bytes(rng.integers(97, 123, rng.integers(2, 10), dtype=np.uint8)) + b" "
                  for _ in range(4096)]
    with open(path, "wb") as out:
        left = size
        while left:
            chunk = min(left, FILL_CHUNK)
            if kind == "random":
                out.write(rng.bytes(chunk))
            else:
                text = b"".join(vocabulary[i] for i in rng.integers(0, 4096, chunk // 4))
                out.write(text[:chunk].ljust(chunk, b"."))
            left -= chunk


def one_run(args: argparse.Namespace, ns: netns.Namespace, kind: str,
            compress: str | None, index: int) -> dict[str, Any]:
    memory_file = SHM / f"vmig-compress-{os.getpid()}-{index}.ram"
    destination = source = None
    with tempfile.TemporaryDirectory(prefix="vmig-compress-") as tmp:
        try:
            fill(memory_file, args.memory_bytes, kind)
            touch_and_free(2 * args.memory_bytes)
            destination = VmmProcess.start(f"{tmp}/dst.sock", stderr_path=f"{tmp}/dst.err",
                                           ready_timeout=READY_TIMEOUT_S, prefix=ns.exec_prefix)
            source = VmmProcess.start(
                f"{tmp}/src.sock", ["--memory", args.memory, "--memory-file", str(memory_file),
                                    "--working-set", "16M"],
                stderr_path=f"{tmp}/src.err", ready_timeout=READY_TIMEOUT_S)
            time.sleep(1.0)  # the guest stamps its working set, then idles
            reply = destination.client.receive_migration(f"tcp:{ns.ns_addr}:0")
            before = cpu_seconds(source.proc.pid), cpu_seconds(destination.proc.pid)
            summary = source.client.send_migration(
                destination_url=reply["receiver_url"], token=reply["token"],
                connections=args.connections, compress=compress)
            after = cpu_seconds(source.proc.pid), cpu_seconds(destination.proc.pid)
            check = destination.client.check_guest(120)
        finally:
            for vmm in (source, destination):
                if vmm is not None:
                    vmm.stop()
            with contextlib.suppress(FileNotFoundError):
                memory_file.unlink()
    print(f"  {kind}, {compress or 'no compression'}: {summary['elapsed_ms'] / 1000:.2f} s, "
          f"{format_size(summary['wire_bytes'])} on the wire", file=sys.stderr, flush=True)
    return {"kind": kind, "compress": compress, "status": summary["status"],
            "total_ms": summary["elapsed_ms"], "bytes_sent": summary["bytes_transferred"],
            "wire_bytes": summary["wire_bytes"], "downtime_ms": summary["downtime_ms"],
            "cpu_s": {"source": round(after[0] - before[0], 3),
                      "destination": round(after[1] - before[1], 3)},
            "check_ok": check["ok"]}


def medians(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for kind in KINDS:
        for compress in COMPRESSIONS:
            mine = [r for r in runs if r["kind"] == kind and r["compress"] == compress]
            if not mine:
                continue

            def stat(get: Any, runs: list[dict[str, Any]] = mine) -> dict[str, float]:
                values = [get(r) for r in runs]
                return {"median": statistics.median(values), "min": min(values),
                        "max": max(values)}

            rows.append({"kind": kind, "compress": compress, "runs": len(mine),
                         "total_ms": stat(lambda r: r["total_ms"]),
                         "wire_bytes": stat(lambda r: r["wire_bytes"]),
                         "bytes_sent": stat(lambda r: r["bytes_sent"]),
                         "cpu_s": stat(lambda r: sum(r["cpu_s"].values())),
                         "all_checks_ok": all(r["check_ok"] for r in mine)})
    for row in rows:  # against the same memory without compression
        plain = next(r for r in rows if r["kind"] == row["kind"] and r["compress"] is None)
        row["speedup"] = plain["total_ms"]["median"] / row["total_ms"]["median"]
        row["wire_ratio"] = row["bytes_sent"]["median"] / row["wire_bytes"]["median"]
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print("| memory | compression | total s | speed-up | on the wire | shrunk | CPU s (both) |")
    print("|---|---|--:|--:|--:|--:|--:|")
    for row in rows:
        seconds = {key: value / 1000 for key, value in row["total_ms"].items()}
        print(f"| {row['kind']} | {row['compress'] or 'none'} "
              f"| {seconds['median']:.2f} ({seconds['min']:.2f}-{seconds['max']:.2f}) "
              f"| {row['speedup']:.2f}x | {format_size(int(row['wire_bytes']['median']))} "
              f"| {row['wire_ratio']:.2f}x | {row['cpu_s']['median']:.2f} |")


def chart(rows: list[dict[str, Any]], args: argparse.Namespace) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(8, 4.5))
    width = 0.25
    for offset, compress in enumerate(COMPRESSIONS):
        mine = [r for r in rows if r["compress"] == compress]
        xs = [KINDS.index(r["kind"]) + (offset - 1) * width for r in mine]
        ys = [r["total_ms"]["median"] / 1000 for r in mine]
        low = [(r["total_ms"]["median"] - r["total_ms"]["min"]) / 1000 for r in mine]
        high = [(r["total_ms"]["max"] - r["total_ms"]["median"]) / 1000 for r in mine]
        axis.bar(xs, ys, width=width, yerr=[low, high], capsize=3,
                 label=compress or "no compression")
        for x, r in zip(xs, mine, strict=True):
            axis.text(x, r["total_ms"]["max"] / 1000,
                      format_size(int(r["wire_bytes"]["median"])), ha="center", va="bottom",
                      fontsize=7)
    axis.set_xticks(range(len(KINDS)), ["text-like memory (compresses)", "random memory"])
    axis.set_ylabel("total time, s (labels: bytes on the wire)")
    axis.legend(fontsize=8)
    axis.grid(True, axis="y", alpha=0.3)
    axis.set_title(f"{format_size(args.memory_bytes)} guest over a {args.rate} link (tbf, "
                   f"network namespace), {args.connections} connections; medians of "
                   f"{args.repeat}", fontsize=10)
    return save_chart(fig, args.chart)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = netns.available()
    if problem:
        print(f"compress_link.py: network namespaces {problem}", file=sys.stderr)
        return 2
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    settings = [(kind, compress) for kind in KINDS for compress in COMPRESSIONS]
    runs: list[dict[str, Any]] = []
    with netns.two_hosts() as ns:
        ns.cap(args.rate)
        index = 0
        for repeat in range(args.repeat):
            shift = repeat * len(settings) // max(args.repeat, 1)
            for kind, compress in settings[shift:] + settings[:shift]:
                index += 1
                print(f"run {index}: {kind}, {compress or 'no compression'}", file=sys.stderr,
                      flush=True)
                runs.append(one_run(args, ns, kind, compress, index))
    rows = medians(runs)
    result = {"command": [Path(sys.executable).name, *sys.argv],
              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "machine": machine_info(None), "started": started,
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "medians": rows, "runs": runs}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print_table(rows)
    print(f"results: {os.path.relpath(args.output)}\nchart: {os.path.relpath(chart(rows, args))}")
    return 0 if all(row["all_checks_ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
