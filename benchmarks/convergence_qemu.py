"""vmig and QEMU side by side on the same dirtying guest, over the same capped link.

The guest is vmig's own (``vmig vmm`` boots it; QEMU boots the same program as a
Multiboot kernel with ``-kernel``, its parameters on the command line), rewriting its
working set in order at a steady rate: about 25%, 50%, 100% and 200% of the link.
The link is a veth pair between this network namespace (the source) and a new one
(the destination), with a ``tbf`` queueing discipline at ``--link`` bytes/s on the
source's end (tests/netns.py); neither program has a bandwidth cap of its own (vmig:
none given; QEMU: ``max-bandwidth`` 1 TiB/s), so the link is the limit for both.

For each rate, on both programs, one migration per mode:

- ``precopy``: pre-copy alone, cancelled at ``--precopy-timeout`` s if it has not
  converged by then ("did not converge"; the guest runs on at the source);
- ``auto-converge``: the vCPUs are throttled until it converges (vmig
  ``auto_converge``; QEMU capability ``auto-converge``, both 20% then 10 points more
  per step), cancelled at ``--timeout`` s;
- ``postcopy``: post-copy after ``--postcopy-after`` pre-copy passes (vmig
  ``postcopy_after_iterations``; QEMU ``postcopy-ram``, and ``migrate-start-postcopy``
  once query-migrate's ``dirty-sync-count`` shows that many passes done).

Both get the same ``downtime-limit`` (``--downtime-ms``) and one migration stream.
Per run: total time, downtime, bytes sent, the throttle reached, and the guest's own
progress (pages written per second, read from its status page through the RAM files:
benchmarks/guest_status.py) before, during and after the migration, and in post-copy
at the destination. Controls as in the other scripts (docs/performance.md, "Measuring
on these machines"): fresh processes and RAM files per run, twice the guest size
touched and freed before each run, the order of programs and modes rotated per rate
and repetition.

    ./dev bench convergence_qemu.py                # the full run (about 10 minutes, at most 15)
    ./dev bench convergence_qemu.py --quick        # smoke run: one rate, short timeouts
    ./dev bench convergence_qemu.py --replot docs/results/convergence-qemu.json

Writes docs/results/convergence-qemu.json (``--quick``: convergence-qemu-quick.json),
docs/images/convergence-qemu.png and convergence-qemu-timeline.png, and prints a
markdown table of medians.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import convergence_report as report
import guest_runs
from compare_qemu import QEMU, machine_info

from vmig.units import PAGE_SIZE, parse_size

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import netns  # noqa: E402  (tests/netns.py: the namespace, the veth pair, tbf)

RESULTS = ROOT / "docs" / "results"
IMAGES = ROOT / "docs" / "images"
MODES = ("precopy", "auto-converge", "postcopy")
PROGRAMS = ("vmig", "qemu")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory", default=None, help="guest RAM (default: 512M; --quick: 256M)")
    parser.add_argument("--working-set", default=None,
                        help="memory the guest rewrites (default: 256M; --quick: 128M)")
    parser.add_argument("--link", default="100M",
                        help="the link's rate in bytes/s, K/M/G suffixes (default: 100M)")
    parser.add_argument("--rates", default=None,
                        help="dirty rates in percent of the link (default: 25,50,100,200; "
                             "--quick: 200)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"from {', '.join(MODES)}")
    parser.add_argument("--programs", default=",".join(PROGRAMS), help="vmig and/or qemu")
    parser.add_argument("--precopy-timeout", type=float, default=None,
                        help="seconds before plain pre-copy is cancelled (default: 20; "
                             "--quick: 8)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds before auto-converge or post-copy is cancelled "
                             "(default: 60; --quick: 40)")
    parser.add_argument("--postcopy-after", type=int, default=2,
                        help="pre-copy passes before post-copy (default: 2)")
    parser.add_argument("--downtime-ms", type=int, default=300,
                        help="downtime budget of both (default: 300)")
    parser.add_argument("--kernel", type=Path, default=None,
                        help="the guest image QEMU boots as a Multiboot kernel (default: "
                             "vmig's, built if need be)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per setup (default: 1)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 256M, one rate (200%%), short timeouts")
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON results (default: docs/results/convergence-qemu.json; "
                             "--quick: convergence-qemu-quick.json)")
    parser.add_argument("--images", type=Path, default=IMAGES,
                        help="directory for the charts (default: docs/images)")
    parser.add_argument("--replot", type=Path, default=None, metavar="JSON",
                        help="measure nothing: reprint the table and redraw the charts of "
                             "an earlier results file")
    args = parser.parse_args(argv)
    quick = args.quick
    args.memory = args.memory or ("256M" if quick else "512M")
    args.working_set = args.working_set or ("128M" if quick else "256M")
    args.precopy_timeout = args.precopy_timeout or (8.0 if quick else 20.0)
    args.timeout = args.timeout or (40.0 if quick else 60.0)
    args.label = "convergence-qemu" + ("-quick" if quick else "")
    args.output = args.output or RESULTS / f"{args.label}.json"
    try:
        args.rate_list = [int(r) for r in (args.rates or ("200" if quick else "25,50,100,200"))
                          .split(",") if r.strip()]
    except ValueError:
        parser.error(f"--rates: expected percentages like 25,50,100,200, got {args.rates!r}")
    args.mode_list = _choices(parser, "--modes", args.modes, MODES)
    args.program_list = _choices(parser, "--programs", args.programs, PROGRAMS)
    for flag in ("memory", "working_set", "link"):
        setattr(args, f"{flag}_bytes", parse_size(getattr(args, flag)))
    if not args.rate_list or min(args.rate_list) <= 0 or args.repeat < 1:
        parser.error("need rates > 0 and --repeat >= 1")
    return args


def _choices(parser: argparse.ArgumentParser, flag: str, text: str,
             allowed: tuple[str, ...]) -> list[str]:
    chosen = [item.strip() for item in text.split(",") if item.strip()]
    unknown = sorted(set(chosen) - set(allowed))
    if unknown or not chosen:
        parser.error(f"{flag}: choose from {', '.join(allowed)} (got {text!r})")
    return list(dict.fromkeys(chosen))


def dirty_pages_per_s(percent: int, link_bytes: int) -> int:
    """The guest's dirty rate, in pages per second, for `percent` of the link."""
    return max(1, round(percent / 100 * link_bytes / PAGE_SIZE))


def run_order(args: argparse.Namespace) -> list[tuple[int, str, str]]:
    """(rate, mode, program) of every run: per rate and repetition, the modes and the
    programs rotate by one, so that neither program nor any mode always goes first."""
    order = []
    setups = [(mode, program) for mode in args.mode_list for program in args.program_list]
    for turn, (repeat, rate) in enumerate(itertools.product(range(args.repeat),
                                                            args.rate_list)):
        del repeat
        shift = turn % len(setups)
        order += [(rate, mode, program) for mode, program in setups[shift:] + setups[:shift]]
    return order


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds every finally: processes, files, the namespace


def replot(args: argparse.Namespace) -> int:
    data = json.loads(args.replot.read_text())
    report.show(data, args.images, data["settings"]["label"])
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot is not None:
        return replot(args)
    signal.signal(signal.SIGTERM, _terminate)
    problem = netns.available()
    qemu = shutil.which(QEMU)
    if problem is None and "qemu" in args.program_list and qemu is None:
        problem = f"{QEMU} not found (./dev bench installs Debian's qemu-system-x86)"
    if problem is not None:
        print(f"convergence_qemu: {problem}", file=sys.stderr)
        return 2
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    machine = machine_info(qemu)
    order = run_order(args)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="vmig-convq-") as tmp, netns.two_hosts() as ns:
        ns.cap(f"{args.link_bytes * 8}bit", burst="1mb")
        for serial, (rate, mode, program) in enumerate(order, 1):
            print(f"[{serial}/{len(order)}] {rate}% of the link, {mode}, {program}",
                  file=sys.stderr, flush=True)
            setup = guest_runs.Setup(args=args, ns=ns, qemu=qemu, rate_percent=rate,
                                     dirty_pages_per_s=dirty_pages_per_s(rate, args.link_bytes),
                                     mode=mode, program=program,
                                     workdir=Path(tmp) / f"run-{serial}", serial=serial)
            run = guest_runs.one_run(setup)
            runs.append(run)
            print(f"  {report.progress_line(run)}", file=sys.stderr, flush=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                if k not in ("replot", "images", "output")}
    result = {"command": [Path(sys.executable).name, *sys.argv], "settings": settings,
              "machine": machine, "started": started,
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "definitions": report.DEFINITIONS, "rows": report.summarise(runs),
              "runs": runs}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    report.show(result, args.images, args.label)
    print(f"results: {os.path.relpath(args.output)}")
    # A plain pre-copy cancelled at its timeout is a result ("did not converge"), not a
    # failure: the guest runs on at the source, and its self-check says so.
    failed = [run for run in runs if run.get("check_ok") is False
              or (run.get("error") and run.get("status") != "cancelled")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

