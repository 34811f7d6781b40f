"""Inject seeded faults into live migrations between real VMMs and check what must hold.

    python benchmarks/faults.py --runs 50 --seed 20261130

Each run migrates a dirtying guest between two `vmig vmm` processes with one fault:
a connection cut after some bytes, SIGKILL or SIGSTOP of either VMM at some moment,
an operator's cancel, a network outage (every connection reset, new ones refused for
0.5-5 s) or a stall of every connection (0.5-5 s) at a seeded moment of a chosen phase
(post-copy included), or none. After each run: a network fault ended completed (the
network came back within reconnect_timeout_s), never two running VMs (exactly one
unless the VMM that held the only copy was killed), the guest's self-check passes
where it runs, the
surviving VMMs hold no migration thread, TCP socket, listener or extra fd, and a
clean migration afterwards succeeds (tests/faults.py has the machinery; the test
suite runs a few of the same faults). The same seed gives the same faults.

Writes docs/results/faults-<seed>.json and prints a table; `--markdown FILE` also
writes the table for docs/faults.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the fault machinery lives with the tests

from faults import FAULT_GUEST, Harness, Result, plan  # noqa: E402
from helpers import kill  # noqa: E402

from vmig import __version__  # noqa: E402
from vmig.api.process import VmmProcess  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--seed", type=int, default=20261130)
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON results (default: docs/results/faults-<seed>.json)")
    parser.add_argument("--markdown", type=Path, default=None,
                        help="also write the results as a markdown table to this file")
    args = parser.parse_args(argv)
    output = args.output or ROOT / "docs" / "results" / f"faults-{args.seed}.json"
    results: list[Result] = []
    failures: list[str] = []
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vmig-faults-") as tmp:
        count = [0]

        def spawn(vm_args: tuple[str, ...]) -> VmmProcess:
            count[0] += 1
            name = f"{tmp}/vmm{count[0]}"
            return VmmProcess.start(f"{name}.sock", vm_args, stderr_path=f"{name}.stderr",
                                    ready_timeout=60)

        harness = Harness(spawn, kill, FAULT_GUEST)
        try:
            for number, fault in enumerate(plan(args.seed, args.runs), 1):
                try:
                    result = harness.run(fault)
                except AssertionError as exc:
                    failures.append(f"run {number}: {fault.describe()}: {exc}")
                    print(f"{number:3} FAILED {fault.describe()}: {exc}", flush=True)
                    break  # the VMMs are in an unknown state: stop here
                results.append(result)
                print(f"{number:3} {result.line()}", flush=True)
        finally:
            harness.close()
    elapsed = time.monotonic() - began
    outcomes = collections.Counter(r.shown_outcome for r in results)
    commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                            capture_output=True, text=True, check=False).stdout.strip()
    record = {
        "seed": args.seed, "runs": args.runs, "passed": len(results), "failures": failures,
        "elapsed_s": round(elapsed, 1), "outcomes": dict(outcomes), "vmig": __version__,
        "commit": commit, "python": platform.python_version(), "kernel": platform.release(),
        "results": [{"fault": r.fault.describe(), "kind": r.fault.kind,
                     "postcopy": r.fault.postcopy, "phase": r.fault.phase or None,
                     "landed": r.landed or None, "outcome": r.outcome,
                     "via_postcopy": r.via_postcopy, "vm_at": r.vm_at, "reason": r.reason,
                     "seconds": round(r.seconds, 2), "checks": r.checks} for r in results],
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=2) + "\n")
    summary = (f"{len(results)} of {args.runs} runs passed every check in {elapsed:.0f} s "
               f"(seed {args.seed}); outcomes: "
               + ", ".join(f"{n} {k}" for k, n in sorted(outcomes.items())))
    print(summary)
    if args.markdown is not None:
        rows = ["| # | fault | began in | outcome | VM at | reason |",
                "|---:|---|---|---|---|---|"]
        for number, result in enumerate(results, 1):
            reason = result.reason.replace("|", "\\|")[:160]
            landing = result.shown_landing.removeprefix(", ").removeprefix("began in ")
            rows.append(f"| {number} | {result.fault.describe()} | {landing} | "
                        f"{result.shown_outcome} | {result.vm_at} | {reason} |")
        args.markdown.write_text(summary + "\n\n" + "\n".join(rows) + "\n")
    return 0 if not failures and len(results) == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
