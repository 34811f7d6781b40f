"""How late a real-time thread wakes on this machine: the scheduling floor of a fault.

A miniature cyclictest: one process, its thread at SCHED_FIFO priority 1 (as vmig's
post-copy fault threads; the default priority where that is not allowed), sleeps
``--interval-us`` at a time until SIGTERM or SIGINT and records how much later than
asked it woke. On exit it prints one JSON object: the wake-ups, p50, p99, p99.9 and max
lateness in ms, and whether it ran in real time. A remote fault crosses at least three
such wake-ups (the destination's fault thread, the source's answering thread, the
destination's receiving thread), so the probe's p99, taken beside the same migration,
is a floor under the fault latency's that no code in the fault path can go below.

    python benchmarks/wakeup_probe.py [--interval-us 500]   # stop it with SIGTERM
"""

from __future__ import annotations

import argparse
import array
import json
import math
import os
import signal
import sys
import time


def percentile(ordered: list[float], fraction: float) -> float:
    """Nearest rank of sorted, non-empty `ordered`."""
    return ordered[max(math.ceil(fraction * len(ordered)), 1) - 1]


def summary(late_s: array.array) -> dict[str, object]:
    """The lateness figures in ms (None where nothing was measured)."""
    ordered = sorted(late_s)
    figures: dict[str, object] = {"wakeups": len(ordered)}
    for name, fraction in (("p50_ms", 0.5), ("p99_ms", 0.99), ("p999_ms", 0.999),
                           ("max_ms", 1.0)):
        figures[name] = round(percentile(ordered, fraction) * 1e3, 3) if ordered else None
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interval-us", type=int, default=500,
                        help="how long each sleep asks for (default: 500)")
    args = parser.parse_args(argv)
    interval = args.interval_us / 1e6
    stop = False
    marked_at: int | None = None  # the index of the first wake-up after SIGUSR1

    def on_stop(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    def on_mark(signum: int, frame: object) -> None:
        nonlocal marked_at
        marked_at = len(late)

    late = array.array("d")
    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGUSR1, on_mark)
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        realtime = True
    except OSError:
        realtime = False
    clock = time.monotonic
    while not stop:
        asked = clock() + interval
        time.sleep(interval)
        late.append(max(clock() - asked, 0.0))
    marked = late[marked_at:] if marked_at is not None else array.array("d")
    json.dump({"realtime": realtime, "interval_us": args.interval_us,
               "all": summary(late), "marked": summary(marked)}, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
