"""Side by side: vmig against QEMU's own live migration, on the same machine, in one run.

Both migrate an idle guest whose RAM is a file on /dev/shm full of random bytes (no
page is zero or a hole) over loopback TCP, for every combination of

- destination: ``fresh`` (RAM faulted in as pages arrive) or ``prealloc`` (vmig:
  ``receive-migration --prealloc SIZE``; QEMU: ``memory-backend-file,prealloc=on``);
- connections: vmig ``--connections N``; QEMU plain migration for N=1 and multifd
  with ``multifd-channels`` N for N>1;
- security: ``plain`` (vmig has no unauthenticated mode over tcp, so this is vmig's
  token mode against QEMU without TLS; ``token`` is accepted as another name for it)
  or ``tls`` (mutual TLS 1.3 on both, one set of certificates made here with openssl).

The guests: ``vmig vmm --memory-file COPY --working-set 16M`` (the guest stamps its
working set, the rest stays random) and ``qemu-system-x86_64 -enable-kvm`` with a
``memory-backend-file`` on COPY, no disk (the firmware idles), driven over QMP.
QEMU gets ``max-bandwidth`` 1 TiB/s (its default caps at 128 MiB/s) and the same
``downtime-limit`` as vmig (300 ms).

Controls (host-cold RAM on these machines, see docs/performance.md): every run gets
its own fresh copy of the random RAM file (copied before the run, not timed); both
processes must be idle before the migration starts (QEMU's firmware boots for seconds
here); right before every migration the benchmark touches and frees twice the guest
size, so neither side allocates host-cold RAM; the order of the setups rotates per
repetition, vmig and QEMU alternate; medians of ``--repeat`` runs with min-max.

And the limit of every setup, in the same rotation (``raw``, benchmarks/raw_limit.py): a
plain sender and receiver process over the same connections, no protocol, fed from a
fresh copy of the same RAM file into a fresh or preallocated memfd; vmig and QEMU are
also reported as fractions of it.

Per run: total time and throughput (guest bytes / total time), downtime, CPU
seconds (user + sys from /proc/PID/stat) of the source and the destination process
over the migration, bytes sent, and a check at the destination (vmig: check-guest;
QEMU: destination running, source paused, and the two RAM files compared page by
page). Also measured once: the cost of one connection's handshake (plain TCP, token,
TLS) in vmig's own transport code.

    ./dev bench compare_qemu.py --memory 1G --connections 1,2,4,8 --repeat 3
    ./dev bench compare_qemu.py --quick        # smoke run: 256M, 1 repeat, 1 and 4
    ./dev bench compare_qemu.py --replot docs/results/compare-qemu-1G.json

The VMMs run ``python -m vmig``, which imports vmig from the working directory first. To
measure another commit (say, while vmig/ has uncommitted changes), clone it, build its
guest there (``python -m vmig.guest.build``) and run this script from the clone's
directory with PYTHONPATH set to it; the JSON records the commit measured.

Writes docs/results/compare-qemu-<label>.json (every run, machine info, medians,
goals), docs/images/compare-qemu-<label>-{throughput,cpu,downtime,limit}.png, and prints a
markdown table of medians with the vmig/QEMU ratio per row.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import itertools
import json
import math
import mmap
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import raw_limit

import vmig as vmig_package
from vmig import __version__
from vmig.api.process import VmmProcess
from vmig.proto import ConnectionRole
from vmig.transport.address import parse_url
from vmig.transport.channel import Identity, SenderChannel, receive_handshake
from vmig.transport.endpoint import Listener, dial
from vmig.transport.security import Security, TlsSide, generate_token, load_tls, token_bytes
from vmig.units import PAGE_SIZE, MiB, format_size, parse_size

ROOT = Path(__file__).resolve().parents[1]
# The tree the measured vmig comes from (the VMMs run `python -m vmig` from the same one):
# this checkout, or another one put first with PYTHONPATH (a frozen copy of a commit).
VMIG_TREE = Path(vmig_package.__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
IMAGES = ROOT / "docs" / "images"
SHM = Path("/dev/shm")
QEMU = "qemu-system-x86_64"
CLK_TCK = os.sysconf("SC_CLK_TCK")
FILL_CHUNK = 64 * MiB
COMPARE_CHUNK = 64 * MiB
READY_TIMEOUT_S = 120.0
QMP_TIMEOUT_S = 60.0
MIGRATION_TIMEOUT_S = 600.0
MAX_BANDWIDTH = 1 << 40  # bytes/s: QEMU's default max-bandwidth is 128 MiB/s
HANDSHAKE_WARMUP = 5
# Before a migration both processes must be idle: QEMU's firmware keeps a vCPU busy for
# about 4 s after start on these machines (emulated), vmig's guest for well under 1 s.
IDLE_CPU_SHARE = 0.05  # CPU-seconds per second below which a process counts as idle
IDLE_WINDOW_S = 0.5
IDLE_TIMEOUT_S = 60.0
MODES = ("plain", "tls")
DESTINATIONS = ("fresh", "prealloc")
IMPLS = ("vmig", "qemu")
RAW = "raw"  # raw_limit's plain pair: the physical limit of every setup, in the same run
PR_SET_PDEATHSIG = 1  # linux/prctl.h
_LIBC = ctypes.CDLL(None, use_errno=True)


# --- arguments ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory", default=None, help="guest RAM (default: 2G; --quick: 256M)")
    parser.add_argument("--working-set", default="16M",
                        help="memory the vmig guest stamps (default: 16M)")
    parser.add_argument("--connections", default=None,
                        help="comma-separated connection counts (default: 1,2,4,8; "
                             "--quick: 1,4)")
    parser.add_argument("--modes", default="plain,tls",
                        help="plain (vmig token vs QEMU without TLS; 'token' is the same) "
                             "and/or tls (default: plain,tls)")
    parser.add_argument("--destinations", default="fresh,prealloc",
                        help="fresh and/or prealloc (default: both)")
    parser.add_argument("--impls", default="vmig,qemu,raw", help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=None,
                        help="runs per setup (default: 3; --quick: 1)")
    parser.add_argument("--downtime-ms", type=int, default=300,
                        help="downtime budget of both (default: 300)")
    parser.add_argument("--handshakes", type=int, default=50,
                        help="connections timed per kind in the handshake measurement "
                             "(default: 50; 0 skips it)")
    parser.add_argument("--no-compare", action="store_true",
                        help="skip comparing QEMU's source and destination RAM files")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 256M, 1 repeat, connections 1,4")
    parser.add_argument("--label", default=None,
                        help="names the outputs (default: the memory size, e.g. 1G; "
                             "--quick: quick)")
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON results (default: docs/results/compare-qemu-<label>.json)")
    parser.add_argument("--images", type=Path, default=IMAGES,
                        help="directory for the PNG charts (default: docs/images)")
    parser.add_argument("--no-charts", action="store_true", help="write no charts")
    parser.add_argument("--replot", type=Path, default=None, metavar="JSON",
                        help="measure nothing: redraw the charts and reprint the table and "
                             "goals of an earlier results file")
    args = parser.parse_args(argv)
    args.label_given = args.label
    args.memory = args.memory or ("256M" if args.quick else "2G")
    args.connections = args.connections or ("1,4" if args.quick else "1,2,4,8")
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.label = args.label or ("quick" if args.quick else args.memory)
    args.output = args.output or RESULTS / f"compare-qemu-{args.label}.json"
    try:
        args.connection_counts = [int(c) for c in args.connections.split(",") if c.strip()]
    except ValueError:
        parser.error(f"--connections: expected numbers like 1,2,4,8, got {args.connections!r}")
    args.mode_list = _choices(parser, "--modes", args.modes, MODES, {"token": "plain"})
    args.destination_list = _choices(parser, "--destinations", args.destinations,
                                     DESTINATIONS, {})
    args.impl_list = _choices(parser, "--impls", args.impls, (*IMPLS, RAW), {})
    if not args.connection_counts or min(args.connection_counts) < 1 or args.repeat < 1:
        parser.error("need connection counts >= 1 and --repeat >= 1")
    args.memory_bytes = parse_size(args.memory, "memory size")
    if args.memory_bytes % (2 * MiB):
        parser.error("--memory must be a multiple of 2 MiB")
    return args


def _choices(parser: argparse.ArgumentParser, flag: str, text: str, allowed: tuple[str, ...],
             aliases: dict[str, str]) -> list[str]:
    chosen: list[str] = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        item = aliases.get(item, item)
        if item not in allowed:
            parser.error(f"{flag}: {item!r} is not one of {', '.join(allowed)}")
        if item not in chosen:
            chosen.append(item)
    if not chosen:
        parser.error(f"{flag}: nothing chosen")
    return chosen


@dataclass(frozen=True)
class Setup:
    """One configuration of the comparison."""

    impl: str  # vmig, qemu or raw
    mode: str  # plain or tls
    destination: str  # fresh or prealloc
    connections: int

    @property
    def key(self) -> tuple[str, str, int]:
        """What a vmig setup and its QEMU counterpart share."""
        return (self.mode, self.destination, self.connections)

    def describe(self) -> str:
        return f"{self.impl} {self.mode} {self.destination} {self.connections}c"


def setup_orders(args: argparse.Namespace) -> list[list[Setup]]:
    """The setups of every repetition: vmig and QEMU alternate; each repetition starts
    a further part into the list (rotation), so every setup runs early, midway and late."""
    base = [Setup(impl, mode, destination, count)
            for count in args.connection_counts for mode in args.mode_list
            for destination in args.destination_list for impl in args.impl_list]
    orders = []
    for repeat in range(args.repeat):
        shift = round(repeat * len(base) / args.repeat)
        orders.append(base[shift:] + base[:shift])
    return orders


# --- the machine --------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """user + sys CPU time of process `pid` (all its threads), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


def wait_idle(*pids: int) -> float:
    """Wait until every process in `pids` used under IDLE_CPU_SHARE of a CPU over one
    IDLE_WINDOW_S window; return the seconds waited (RuntimeError after IDLE_TIMEOUT_S)."""
    began = time.monotonic()
    while True:
        before = [cpu_seconds(pid) for pid in pids]
        time.sleep(IDLE_WINDOW_S)
        used = [cpu_seconds(pid) - start for pid, start in zip(pids, before, strict=True)]
        if max(used) < IDLE_CPU_SHARE * IDLE_WINDOW_S:
            return time.monotonic() - began
        if time.monotonic() - began > IDLE_TIMEOUT_S:
            raise RuntimeError(f"processes {pids} still busy after {IDLE_TIMEOUT_S:g} s "
                               f"({', '.join(f'{u:.2f}' for u in used)} CPU-s per "
                               f"{IDLE_WINDOW_S:g} s)")


def machine_info(qemu: str | None) -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo
                      if line.startswith("model name")), "")
    mem_total = 0
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1]) * 1024

    def git(*words: str) -> str:
        return subprocess.run(["git", "-C", str(VMIG_TREE), *words], capture_output=True,
                              text=True, check=False).stdout.strip()

    qemu_version = ""
    if qemu:
        qemu_version = subprocess.run([qemu, "--version"], capture_output=True, text=True,
                                      check=False).stdout.splitlines()[0]
    return {"cpu_model": model, "cpus": os.cpu_count(), "memory_bytes": mem_total,
            "kernel": platform.release(), "python": platform.python_version(),
            "vmig": __version__, "vmig_from_this_checkout": VMIG_TREE == ROOT,
            "commit": git("describe", "--always", "--dirty"),
            # uncommitted changes in vmig/ are part of what was measured
            "vmig_uncommitted": git("status", "--porcelain", "--", "vmig").splitlines(),
            "qemu": qemu_version, "kvm": os.path.exists("/dev/kvm"),
            "load_average": os.getloadavg()}


# --- host memory controls ----------------------------------------------------------------------


def fill_random(path: Path, size: int, zero_fraction: float = 0.0) -> None:
    """Write `size` random bytes to `path`: no page is zero, and no two pages repeat (a
    fresh generator per file); with `zero_fraction` 0.75, three pages of every four are
    zeros instead (written, not holes)."""
    rng = np.random.default_rng()
    keep = max(1, round(1 / (1 - zero_fraction)))  # every keep-th page holds data
    with open(path, "wb") as out:
        left = size
        while left:
            chunk = min(left, FILL_CHUNK)
            data = rng.bytes(chunk)
            if keep > 1:
                pages = np.frombuffer(bytearray(data), dtype=np.uint8).reshape(-1, 4096)
                pages[np.arange(len(pages)) % keep != 0] = 0
                data = pages.tobytes()
            out.write(data)
            left -= chunk


def fresh_copy(template: Path, path: Path) -> None:
    """A new file with the template's bytes (new pages: no sharing with the template)."""
    shutil.copyfile(template, path)


def touch_and_free(size: int) -> float:
    """Allocate `size` bytes of anonymous memory, write every page, free it; return seconds.

    On these machines RAM freed back to the outer host costs ~5x more to touch again;
    this leaves `size` bytes of recently used (warm) free RAM for what runs next.
    """
    began = time.monotonic()
    area = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        pages = np.frombuffer(area, dtype=np.uint8)
        pages[::PAGE_SIZE] = 1
        del pages
    finally:
        area.close()
    return time.monotonic() - began


def pages_differing(path_a: Path, path_b: Path, size: int) -> int:
    """How many 4 KiB pages of the first `size` bytes differ between two files."""
    differing = 0
    with open(path_a, "rb") as file_a, open(path_b, "rb") as file_b:
        for offset in range(0, size, COMPARE_CHUNK):
            length = min(COMPARE_CHUNK, size - offset)
            a = np.frombuffer(file_a.read(length), dtype=np.uint64).reshape(-1, PAGE_SIZE // 8)
            b = np.frombuffer(file_b.read(length), dtype=np.uint64).reshape(-1, PAGE_SIZE // 8)
            differing += int(np.count_nonzero((a != b).any(axis=1)))
    return differing


# --- certificates -------------------------------------------------------------------------------


def make_certificates(directory: Path) -> tuple[Path, Path]:
    """A CA, a server certificate naming 127.0.0.1 and a client certificate, with openssl.

    Returns (server directory, client directory), laid out as vmig's --tls-dir and
    QEMU's tls-creds-x509 both expect: ca-cert.pem + server-cert.pem/server-key.pem,
    ca-cert.pem + client-cert.pem/client-key.pem.
    """
    ca, server, client = directory / "ca", directory / "server", directory / "client"
    for path in (ca, server, client):
        path.mkdir(parents=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*words: str | Path) -> None:
        subprocess.run(["openssl", *map(str, words)], check=True, capture_output=True)

    openssl("req", "-x509", *ec, "-days", "2", "-subj", "/CN=compare-qemu CA",
            "-keyout", ca / "ca-key.pem", "-out", ca / "ca-cert.pem")
    openssl("req", "-new", *ec, "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout", server / "server-key.pem", "-out", server / "server.csr")
    openssl("x509", "-req", "-in", server / "server.csr", "-CA", ca / "ca-cert.pem",
            "-CAkey", ca / "ca-key.pem", "-CAcreateserial", "-copy_extensions", "copy",
            "-days", "2", "-out", server / "server-cert.pem")
    openssl("req", "-new", *ec, "-subj", "/CN=compare-qemu source",
            "-keyout", client / "client-key.pem", "-out", client / "client.csr")
    openssl("x509", "-req", "-in", client / "client.csr", "-CA", ca / "ca-cert.pem",
            "-CAkey", ca / "ca-key.pem", "-CAcreateserial", "-days", "2",
            "-out", client / "client-cert.pem")
    for side in (server, client):
        shutil.copy(ca / "ca-cert.pem", side / "ca-cert.pem")
        for key in side.glob("*-key.pem"):
            key.chmod(0o600)
        for csr in side.glob("*.csr"):
            csr.unlink()
    return server, client


# --- QEMU over QMP ------------------------------------------------------------------------------


class QmpError(RuntimeError):
    """QMP answered with an error, or the monitor went away."""


class Qmp:
    """A minimal QMP client on a UNIX socket: JSON lines, events kept as they arrive."""

    def __init__(self, path: Path, timeout: float = QMP_TIMEOUT_S) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(path))
            self._file = self.sock.makefile("rb")
            greeting = self._read()
            if "QMP" not in greeting:
                raise QmpError(f"not a QMP greeting: {greeting}")
            self.events: list[dict[str, Any]] = []
            self.execute("qmp_capabilities")
        except BaseException:
            self.sock.close()
            raise

    def _read(self) -> dict[str, Any]:
        line = self._file.readline()
        if not line:
            raise QmpError("QEMU closed its monitor")
        return json.loads(line)

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        self.sock.sendall(json.dumps(message).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
            elif "error" in reply:
                raise QmpError(f"{command}: {reply['error'].get('desc', reply['error'])}")
            elif "return" in reply:
                return reply["return"]

    def wait_event(self, name: str, statuses: tuple[str, ...] | None = None,
                   timeout: float = MIGRATION_TIMEOUT_S) -> dict[str, Any]:
        """Block (no polling) until event `name` has come, with a status in `statuses`
        if given (the events already read count too)."""
        seen = 0
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events[seen:]:
                if event["event"] == name and (
                        statuses is None or event.get("data", {}).get("status") in statuses):
                    return event
            seen = len(self.events)
            left = deadline - time.monotonic()
            if left <= 0:
                raise QmpError(f"no {name} event within {timeout:g} s")
            self.sock.settimeout(left)
            try:
                message = self._read()
            finally:
                self.sock.settimeout(QMP_TIMEOUT_S)
            if "event" in message:
                self.events.append(message)

    def event_time(self, name: str, **data: Any) -> float | None:
        """Timestamp (seconds, host clock) of the first event `name` whose data has `data`."""
        for event in self.events:
            if event["event"] == name and all(event.get("data", {}).get(key) == value
                                              for key, value in data.items()):
                stamp = event["timestamp"]
                return stamp["seconds"] + stamp["microseconds"] / 1e6
        return None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
        self.sock.close()


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it if the benchmark dies (a safety net)."""
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class QemuProcess:
    """One qemu-system-x86_64 with its QMP monitor; `stop()` it on every way out."""

    def __init__(self, binary: str, name: str, workdir: Path, ram: Path, size: int, *,
                 prealloc: bool = False, incoming: bool = False,
                 tls: tuple[Path, str] | None = None, machine: Sequence[str] | None = None,
                 prefix: Sequence[str] = ()) -> None:
        """`machine`: the QEMU command without its monitor (e.g. qemu_guest.qemu_command's
        for vmig's guest); default: an idle machine with its RAM in `ram`. `prefix` runs
        QEMU through another command (``ip netns exec NAME``, which execs it: same pid)."""
        self.name = name
        self.log = workdir / f"{name}.log"
        self.qmp_path = workdir / f"{name}.qmp"
        backend = f"memory-backend-file,id=ram,size={size},mem-path={ram},share=on"
        if prealloc:
            backend += ",prealloc=on"
        if machine is None:
            machine = [binary, "-enable-kvm", "-m", f"{size // MiB}M", "-object", backend,
                       "-machine", "pc,memory-backend=ram", "-nographic", "-nodefaults"]
        command = [*prefix, *machine, "-name", name,
                   "-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        if tls is not None:
            directory, endpoint = tls
            command += ["-object", f"tls-creds-x509,id=tls0,dir={directory},"
                                   f"endpoint={endpoint},verify-peer=on"]
        if incoming:
            command += ["-incoming", "defer"]
        self.command = command
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT,
                                         preexec_fn=_die_with_parent)
        self.qmp: Qmp | None = None
        try:
            self.qmp = self._connect()
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _connect(self) -> Qmp:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise QmpError(f"QEMU ({self.name}) exited with status {self.proc.returncode}: "
                               f"{self.log_tail()}")
            if self.qmp_path.exists():
                with contextlib.suppress(ConnectionRefusedError, FileNotFoundError):
                    return Qmp(self.qmp_path)
            if time.monotonic() > deadline:
                raise QmpError(f"QEMU ({self.name}) gave no QMP monitor within "
                               f"{READY_TIMEOUT_S:g} s")
            time.sleep(0.05)

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        assert self.qmp is not None
        return self.qmp.execute(command, arguments)

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            lines = [line for line in self.log.read_text(errors="replace").splitlines()
                     if line.strip() and "host doesn't support requested feature" not in line]
            return " | ".join(lines[-3:]) or "(no output)"
        return "(no log)"

    def stop(self) -> None:
        """quit over QMP, then SIGKILL after 5 s; reaps the process and closes the monitor."""
        if self.proc.poll() is None and self.qmp is not None:
            with contextlib.suppress(QmpError, OSError):
                self.qmp.execute("quit")
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.qmp is not None:
            self.qmp.close()
        with contextlib.suppress(FileNotFoundError):
            self.qmp_path.unlink()


# --- one run ------------------------------------------------------------------------------------


@dataclass
class Context:
    """What every run shares: settings, the random RAM template, certificates, paths."""

    args: argparse.Namespace
    qemu: str | None
    template: Path
    workdir: Path
    tls_server: Path
    tls_client: Path
    serial: Iterator[int]


def run_vmig(ctx: Context, setup: Setup, workdir: Path, source_ram: Path) -> dict[str, Any]:
    """Two fresh `vmig vmm` processes, one migration; both stopped on every way out."""
    args = ctx.args
    tls = setup.mode == "tls"
    destination = source = None
    try:
        destination = VmmProcess.start(str(workdir / "dst.sock"),
                                       stderr_path=str(workdir / "dst.err"),
                                       ready_timeout=READY_TIMEOUT_S)
        source = VmmProcess.start(
            str(workdir / "src.sock"),
            ["--memory", args.memory, "--working-set", args.working_set,
             "--memory-file", str(source_ram)],
            stderr_path=str(workdir / "src.err"), ready_timeout=READY_TIMEOUT_S)
        listening = destination.client.receive_migration(
            "tcp:127.0.0.1:0",
            prealloc=args.memory if setup.destination == "prealloc" else None,
            tls_dir=str(ctx.tls_server) if tls else None)
        idle_s = wait_idle(source.proc.pid, destination.proc.pid)
        warm_s = touch_and_free(2 * args.memory_bytes)
        before = {"source": cpu_seconds(source.proc.pid),
                  "destination": cpu_seconds(destination.proc.pid)}
        began = time.monotonic()
        summary = source.client.send_migration(
            destination_url=listening["receiver_url"], connections=setup.connections,
            downtime_ms=args.downtime_ms, token=listening.get("token"),
            tls_dir=str(ctx.tls_client) if tls else None)
        wall_s = time.monotonic() - began
        after = {"source": cpu_seconds(source.proc.pid),
                 "destination": cpu_seconds(destination.proc.pid)}
        check = destination.client.check_guest(120)
        state = destination.client.info()["state"]
    finally:
        for vmm in (source, destination):
            if vmm is not None:
                vmm.stop()
    cpu = {side: round(after[side] - before[side], 3) for side in after}
    # The summary's names changed once (duration_ms -> elapsed_ms, bytes_sent ->
    # bytes_transferred, with setup_ms added); both are read, the whole of it is kept.
    return {
        "security": listening.get("security"),
        "connections_used": summary["connections"],
        "total_ms": summary.get("elapsed_ms", summary.get("duration_ms")),
        "wall_ms": round(wall_s * 1000, 1),
        "downtime_ms": summary["downtime_ms"],
        "setup_ms": summary.get("setup_ms"),
        "bytes_sent": summary.get("bytes_transferred", summary.get("bytes_sent")),
        "iterations": summary["iterations"],
        "cpu_s": cpu,
        "idle_wait_s": round(idle_s, 2),
        "warm_s": round(warm_s, 3),
        "warnings": summary["warnings"],
        "summary": summary,
        "check": {"ok": bool(check["ok"]) and state == "running", "destination_state": state,
                  "pages_checked": check.get("pages_checked"),
                  "bad_pages": check.get("bad_pages")},
    }


def run_raw(ctx: Context, setup: Setup, workdir: Path, source_ram: Path) -> dict[str, Any]:
    """The setup's physical limit: raw_limit's pair of processes once per method (plain:
    sendfile and sendmsg; TLS: sendmsg), each after the warm-up touch; the best counts."""
    tls = setup.mode == "tls"
    size = ctx.args.memory_bytes
    methods = ("sendmsg",) if tls else raw_limit.METHODS
    results = [raw_limit.measure(source_ram, size, setup.connections, method,
                                 setup.destination == "prealloc",
                                 ctx.tls_server if tls else None,
                                 ctx.tls_client if tls else None,
                                 before_send=lambda: touch_and_free(2 * size))
               for method in methods]
    best = min(results, key=lambda result: result["total_ms"])
    return {"total_ms": best["total_ms"], "downtime_ms": None, "cpu_s": best["cpu_s"],
            "method": best["method"], "methods": results, "check": {"ok": True}}


def run_qemu(ctx: Context, setup: Setup, workdir: Path, source_ram: Path) -> dict[str, Any]:
    """Two fresh QEMU processes, one migration over QMP; both stopped on every way out."""
    args = ctx.args
    assert ctx.qemu is not None
    size = args.memory_bytes
    destination_ram = SHM / f"{source_ram.stem}-dst.ram"
    tls = setup.mode == "tls"
    destination = source = None
    try:
        destination = QemuProcess(
            ctx.qemu, "dst", workdir, destination_ram, size,
            prealloc=setup.destination == "prealloc", incoming=True,
            tls=(ctx.tls_server, "server") if tls else None)
        source = QemuProcess(ctx.qemu, "src", workdir, source_ram, size,
                             tls=(ctx.tls_client, "client") if tls else None)
        capabilities = [{"capability": "events", "state": True}]
        if setup.connections > 1:
            capabilities.append({"capability": "multifd", "state": True})
        parameters: dict[str, Any] = {"downtime-limit": args.downtime_ms,
                                      "max-bandwidth": MAX_BANDWIDTH}
        if setup.connections > 1:
            parameters["multifd-channels"] = setup.connections
        if tls:
            parameters["tls-creds"] = "tls0"
        for qemu in (destination, source):
            qemu.execute("migrate-set-capabilities", {"capabilities": capabilities})
            qemu.execute("migrate-set-parameters", parameters)
        destination.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
        port = _incoming_port(destination)
        idle_s = wait_idle(source.pid, destination.pid)
        warm_s = touch_and_free(2 * size)
        before = {"source": cpu_seconds(source.pid), "destination": cpu_seconds(destination.pid)}
        began = time.monotonic()
        source.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        _wait_migration(source)
        source_done_s = time.monotonic() - began
        _wait_migration(destination)
        assert destination.qmp is not None
        destination.qmp.wait_event("RESUME")  # the guest runs there
        destination_info = destination.execute("query-migrate")
        status = destination.execute("query-status")
        wall_s = time.monotonic() - began
        after = {"source": cpu_seconds(source.pid), "destination": cpu_seconds(destination.pid)}
        # QEMU 7.2's source says "completed" (event and query-migrate) while it is still in
        # finish-migrate, before it fills in total-time and downtime (0 until then, seen
        # with multifd): wait for postmigrate, then ask for its own figures.
        source_status = _settled_status(source)
        info = source.execute("query-migrate")
        destination.execute("stop")  # freeze its RAM for the comparison
        differing = None if args.no_compare else pages_differing(source_ram, destination_ram,
                                                                 size)
        assert source.qmp is not None and destination.qmp is not None
        started_at = source.qmp.event_time("MIGRATION", status="setup")
        paused_at = source.qmp.event_time("STOP")
        received_at = destination.qmp.event_time("MIGRATION", status="completed")
        resumed_at = destination.qmp.event_time("RESUME")
    finally:
        for qemu in (source, destination):
            if qemu is not None:
                qemu.stop()
        with contextlib.suppress(FileNotFoundError):
            destination_ram.unlink()
    ram = info.get("ram", {})

    def span_ms(start: float | None, end: float | None) -> float | None:
        return None if start is None or end is None else round((end - start) * 1000, 1)

    end_to_end_ms = span_ms(started_at, resumed_at or received_at)
    # Like vmig's figures, which end when the destination acknowledges (it resumed the
    # guest first): from the source's start to the destination running the guest.
    total_ms = end_to_end_ms if end_to_end_ms is not None else float(info["total-time"])
    downtime_ms = span_ms(paused_at, resumed_at)
    return {
        "connections_used": setup.connections + (1 if setup.connections > 1 else 0),
        "total_ms": total_ms,
        "wall_ms": round(wall_s * 1000, 1),
        "source_done_ms": round(source_done_s * 1000, 1),
        "downtime_ms": downtime_ms if downtime_ms is not None else float(info["downtime"]),
        "qemu_total_ms": info.get("total-time"),
        "qemu_downtime_ms": info.get("downtime"),
        "qemu_setup_ms": info.get("setup-time"),
        "end_to_end_ms": end_to_end_ms,
        "bytes_sent": ram.get("transferred"),
        "qemu_ram": ram,
        "cpu_s": {side: round(after[side] - before[side], 3) for side in after},
        "idle_wait_s": round(idle_s, 2),
        "warm_s": round(warm_s, 3),
        "check": {"ok": (status.get("status") == "running"
                         and source_status.get("status") == "postmigrate"
                         and destination_info.get("status") == "completed"
                         and (differing is None or differing * 1000 < size // PAGE_SIZE)),
                  "destination_state": status.get("status"),
                  "source_state": source_status.get("status"),
                  "pages_differing": differing},
    }


def _incoming_port(destination: QemuProcess) -> int:
    """The port QEMU chose for `tcp:127.0.0.1:0` (query-migrate's socket-address)."""
    for address in destination.execute("query-migrate").get("socket-address", []):
        if address.get("type") == "inet":
            return int(address["port"])
    raise QmpError("the destination QEMU does not say which port it listens on")


def _settled_status(qemu: QemuProcess, timeout: float = 10.0) -> dict[str, Any]:
    """query-status once the run state has left finish-migrate (or after `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        status = qemu.execute("query-status")
        if status.get("status") != "finish-migrate" or time.monotonic() > deadline:
            return status
        time.sleep(0.01)


def _wait_migration(qemu: QemuProcess) -> None:
    """Wait for the MIGRATION event that ends it (events, not polling: a query-migrate
    every few milliseconds would cost QEMU CPU time that vmig's blocking request does
    not); raise if it failed."""
    assert qemu.qmp is not None
    event = qemu.qmp.wait_event("MIGRATION", ("completed", "failed", "cancelled"))
    status = event["data"]["status"]
    if status != "completed":
        info = qemu.execute("query-migrate")
        raise QmpError(f"QEMU ({qemu.name}) migration {status}: "
                       f"{info.get('error-desc', '')} {qemu.log_tail()}")


def one_run(ctx: Context, setup: Setup, repeat: int) -> dict[str, Any]:
    """A fresh copy of the RAM file, one migration, everything measured and cleaned up."""
    serial = next(ctx.serial)
    source_ram = SHM / f"compare-qemu-{os.getpid()}-{serial}.ram"
    run: dict[str, Any] = {"impl": setup.impl, "mode": setup.mode,
                           "destination": setup.destination,
                           "connections": setup.connections, "repeat": repeat,
                           "serial": serial, "started": time.strftime("%H:%M:%S"),
                           "load_average_1min": os.getloadavg()[0]}
    workdir = ctx.workdir / f"run-{serial}"
    workdir.mkdir()
    try:
        fresh_copy(ctx.template, source_ram)
        runner = {"vmig": run_vmig, "qemu": run_qemu, RAW: run_raw}[setup.impl]
        run.update(runner(ctx, setup, workdir, source_ram))
        run["throughput_bytes_per_s"] = ctx.args.memory_bytes / (run["total_ms"] / 1000)
        run["cpu_total_s"] = round(sum(run["cpu_s"].values()), 3)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # recorded, and the benchmark goes on with the next run
        run["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        with contextlib.suppress(FileNotFoundError):
            source_ram.unlink()
        shutil.rmtree(workdir, ignore_errors=True)
    return run


# --- the handshake ------------------------------------------------------------------------------


def handshake_costs(ctx: Context, samples: int) -> dict[str, Any]:
    """Time one connection's setup in vmig's transport code, per kind of security.

    tcp: connect + hello + admit (no authentication; what a plain TCP migration would
    do); token: the same plus the challenge and both HMAC proofs; tls: a TLS 1.3
    handshake with both certificates checked, then hello + admit. Sender side, one
    process, loopback; medians of `samples` connections after a short warm-up.
    """
    token = token_bytes(generate_token())
    kinds = {
        "tcp": (Security(), Security(), None),
        "token": (Security(token=token), Security(token=token), token),
        "tls": (Security(tls=load_tls(str(ctx.tls_server), TlsSide.SERVER)),
                Security(tls=load_tls(str(ctx.tls_client), TlsSide.CLIENT)), None),
    }
    result: dict[str, Any] = {}
    for name, (server_side, client_side, key) in kinds.items():
        listener = Listener(parse_url("tcp:127.0.0.1:0"), server_side)
        total = samples + HANDSHAKE_WARMUP
        failures: list[str] = []

        def serve(listener: Listener = listener, key: bytes | None = key,
                  total: int = total, failures: list[str] = failures) -> None:
            served = 0
            while served < total:
                accepted = listener.accept()
                if accepted is None:
                    continue
                served += 1
                try:
                    stream = listener.secure(*accepted, time.monotonic() + 10)
                    channel = receive_handshake(stream, token=key, admit=lambda hello: None)
                    channel.close()
                except Exception as exc:
                    failures.append(str(exc))

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        times = []
        try:
            for _ in range(total):
                began = time.perf_counter()
                stream = dial(listener.address, client_side)
                channel = SenderChannel(stream, Identity(ConnectionRole.MEMORY, os.urandom(16),
                                                         index=1), token=key)
                times.append(time.perf_counter() - began)
                channel.close()
        finally:
            server.join(10)
            listener.close()
        measured = sorted(times[HANDSHAKE_WARMUP:])
        result[name] = {"median_ms": round(statistics.median(measured) * 1000, 3),
                        "min_ms": round(measured[0] * 1000, 3),
                        "max_ms": round(measured[-1] * 1000, 3),
                        "samples": len(measured), "server_failures": failures}
    result["token_extra_ms"] = round(result["token"]["median_ms"] - result["tcp"]["median_ms"], 3)
    result["tls_extra_ms"] = round(result["tls"]["median_ms"] - result["tcp"]["median_ms"], 3)
    return result


# --- medians, ratios, goals ---------------------------------------------------------------------


METRICS = ("total_ms", "throughput_bytes_per_s", "downtime_ms", "cpu_total_s", "bytes_sent")


def summarise(runs: list[dict[str, Any]], setups: list[Setup]) -> list[dict[str, Any]]:
    """Median, min and max of every metric per setup (failed runs left out, counted)."""
    rows = []
    for setup in setups:
        mine = [run for run in runs if (run["impl"], run["mode"], run["destination"],
                                        run["connections"]) == (setup.impl, *setup.key)]
        good = [run for run in mine if "error" not in run]
        row: dict[str, Any] = {"impl": setup.impl, "mode": setup.mode,
                               "destination": setup.destination,
                               "connections": setup.connections, "runs": len(good),
                               "failed": len(mine) - len(good),
                               "checks_ok": all(run["check"]["ok"] for run in good)}
        values = {metric: [run[metric] for run in good if run.get(metric) is not None]
                  for metric in METRICS}
        values["source_cpu_s"] = [run["cpu_s"]["source"] for run in good]
        values["destination_cpu_s"] = [run["cpu_s"]["destination"] for run in good]
        for metric, series in values.items():
            if series:
                row[metric] = {"median": statistics.median(series), "min": min(series),
                               "max": max(series)}
        rows.append(row)
    return rows


def pair_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (mode, destination, connections): vmig's and QEMU's medians, ratios."""
    by_key = {(row["impl"], row["mode"], row["destination"], row["connections"]): row
              for row in rows}
    pairs = []
    for (impl, mode, destination, count), vmig in by_key.items():
        if impl != "vmig":
            continue
        qemu = by_key.get(("qemu", mode, destination, count))
        raw = by_key.get((RAW, mode, destination, count))
        pair: dict[str, Any] = {"mode": mode, "destination": destination,
                                "connections": count, "vmig": vmig, "qemu": qemu, RAW: raw}
        limit = _median(raw, "throughput_bytes_per_s")
        for impl, row in (("vmig", vmig), ("qemu", qemu)):
            got = _median(row, "throughput_bytes_per_s")
            if limit and got:
                pair[f"{impl}_of_limit"] = got / limit
        if qemu is not None:
            for metric, name in (("throughput_bytes_per_s", "throughput_ratio"),
                                 ("cpu_total_s", "cpu_ratio"), ("downtime_ms", "downtime_ratio")):
                if metric in vmig and metric in qemu and qemu[metric]["median"]:
                    pair[name] = vmig[metric]["median"] / qemu[metric]["median"]
        pairs.append(pair)
    order = {name: index for index, name in enumerate(MODES + DESTINATIONS)}
    pairs.sort(key=lambda p: (order[p["mode"]], order[p["destination"]], p["connections"]))
    return pairs


def _median(row: dict[str, Any] | None, metric: str) -> float | None:
    stat = (row or {}).get(metric)
    return stat["median"] if stat else None


def evaluate_goals(pairs: list[dict[str, Any]], handshake: dict[str, Any] | None
                   ) -> list[dict[str, Any]]:
    """The project's goals, each met or not, with the ratios behind the verdict."""

    def ratio_goal(text: str, metric: str, target: float, rows: list[dict[str, Any]],
                   at_most: bool = False, against: str = "qemu") -> dict[str, Any]:
        ratios = [(p["mode"], p["destination"], p["connections"], p[metric])
                  for p in rows if metric in p]
        passed = [r for r in ratios if (r[3] <= target if at_most else r[3] >= target)]
        detail = ", ".join(f"{m}/{d}/{c}c {v:.2f}x" for m, d, c, v in ratios)
        geomean = {}  # over the connection counts: one figure per mode and destination
        for mode, destination in sorted({(r[0], r[1]) for r in ratios}):
            group = [r[3] for r in ratios if (r[0], r[1]) == (mode, destination)]
            geomean[f"{mode}/{destination}"] = math.exp(statistics.mean(map(math.log, group)))
        detail += "; geometric mean over connection counts: " + ", ".join(
            f"{k} {v:.2f}x" for k, v in geomean.items())
        best = {}
        if not at_most:  # each at its best connection count, per mode and destination
            for mode, destination in sorted({(p["mode"], p["destination"]) for p in rows}):
                group = [p for p in rows if (p["mode"], p["destination"]) == (mode, destination)
                         and metric in p]
                if group:
                    top = {impl: max(p[impl]["throughput_bytes_per_s"]["median"]
                                     for p in group) for impl in ("vmig", against)}
                    best[f"{mode}/{destination}"] = top["vmig"] / top[against]
            detail += "; best against best: " + ", ".join(f"{k} {v:.2f}x"
                                                          for k, v in best.items())
        return {"goal": text, "met": len(passed) == len(ratios) if ratios else None,
                "rows_met": len(passed), "rows": len(ratios),
                "ratios": [{"mode": m, "destination": d, "connections": c, "ratio": v}
                           for m, d, c, v in ratios], "geomean": geomean,
                "best_against_best": best,
                "detail": detail}

    goals = [
        ratio_goal("vmig over TLS >= 2x QEMU over TLS (throughput)", "throughput_ratio", 2.0,
                   [p for p in pairs if p["mode"] == "tls"]),
        ratio_goal("preallocated destination >= 85% of the same run's raw limit "
                   "(throughput, unencrypted)", "vmig_of_limit", 0.85,
                   [p for p in pairs if p["mode"] == "plain"
                    and p["destination"] == "prealloc"], against=RAW),
        ratio_goal("fresh destination >= 1.2x QEMU fresh (throughput, unencrypted)",
                   "throughput_ratio", 1.2,
                   [p for p in pairs if p["mode"] == "plain" and p["destination"] == "fresh"]),
        ratio_goal("preallocated destination >= 1.3x QEMU prealloc (throughput, unencrypted)",
                   "throughput_ratio", 1.3,
                   [p for p in pairs if p["mode"] == "plain"
                    and p["destination"] == "prealloc"]),
        ratio_goal("CPU seconds of both processes <= 0.8x QEMU's", "cpu_ratio", 0.8, pairs,
                   at_most=True),
    ]
    if handshake is not None:
        # Token mode differs from plain TCP only in the handshake: after it both use the
        # same stream code. Its cost per migration: one extra exchange per connection,
        # connections opened one after another.
        costs = []
        for p in pairs:
            if p["mode"] == "plain" and "total_ms" in p["vmig"]:
                extra = handshake["token_extra_ms"] * p["connections"]
                costs.append((p["destination"], p["connections"],
                              extra / p["vmig"]["total_ms"]["median"]))
        worst = max((c[2] for c in costs), default=None)
        goals.append({
            "goal": "vmig token mode within 5% of plain TCP",
            "met": None if worst is None else worst <= 0.05,
            "detail": (f"token handshake {handshake['token']['median_ms']:.2f} ms against "
                       f"{handshake['tcp']['median_ms']:.2f} ms without authentication: "
                       f"{handshake['token_extra_ms']:.3f} ms more per connection; "
                       + ", ".join(f"{d}/{c}c {share * 100:.2f}% of the total time"
                                   for d, c, share in costs)),
            "worst_share": worst,
        })
    return goals


# --- output -------------------------------------------------------------------------------------


def _cell(stat: dict[str, float] | None, scale: float = 1.0, digits: int = 2) -> str:
    if not stat:
        return "-"
    return (f"{stat['median'] * scale:.{digits}f} "
            f"({stat['min'] * scale:.{digits}f}-{stat['max'] * scale:.{digits}f})")


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def markdown_table(pairs: list[dict[str, Any]]) -> str:
    """Medians (min-max) per setup, vmig next to QEMU, with the ratio per row."""
    lines = [
        "| security | destination | conns | vmig GB/s | QEMU GB/s | ratio | limit GB/s | "
        "vmig / limit | QEMU / limit | "
        "vmig downtime ms | QEMU downtime ms | vmig CPU s | QEMU CPU s | CPU ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    names = {"plain": "vmig token / QEMU plain", "tls": "TLS both"}
    for p in pairs:
        vmig, qemu = p["vmig"], p["qemu"] or {}
        failed = vmig["failed"] + qemu.get("failed", 0)
        checks = vmig["checks_ok"] and qemu.get("checks_ok", True)
        note = ("" if checks else " (check failed)") + (f" ({failed} failed)" if failed else "")
        lines.append(
            f"| {names[p['mode']]} | {p['destination']} | {p['connections']}{note} | "
            f"{_cell(vmig.get('throughput_bytes_per_s'), 1e-9)} | "
            f"{_cell(qemu.get('throughput_bytes_per_s'), 1e-9)} | "
            f"{_ratio(p.get('throughput_ratio'))} | "
            f"{_cell((p.get(RAW) or {}).get('throughput_bytes_per_s'), 1e-9)} | "
            f"{_share(p.get('vmig_of_limit'))} | {_share(p.get('qemu_of_limit'))} | "
            f"{_cell(vmig.get('downtime_ms'), 1, 0)} | {_cell(qemu.get('downtime_ms'), 1, 0)} | "
            f"{_cell(vmig.get('cpu_total_s'))} | {_cell(qemu.get('cpu_total_s'))} | "
            f"{_ratio(p.get('cpu_ratio'))} |")
    return "\n".join(lines)


def charts(pairs: list[dict[str, Any]], args: argparse.Namespace) -> list[Path]:
    """Throughput, CPU seconds and downtime against connections, one panel per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"plain": "unencrypted (vmig: token, QEMU: plain TCP)",
              "tls": "mutual TLS 1.3 (both)"}
    styles = {("vmig", "fresh"): ("tab:blue", "-", "o"),
              ("vmig", "prealloc"): ("tab:blue", "--", "s"),
              ("qemu", "fresh"): ("tab:orange", "-", "o"),
              ("qemu", "prealloc"): ("tab:orange", "--", "s")}
    metrics = (("throughput", "throughput_bytes_per_s", 1e-9, "GB/s (guest bytes / total time)",
                False),
               ("cpu", "cpu_total_s", 1.0, "CPU seconds, source + destination", False),
               ("downtime", "downtime_ms", 1.0, "downtime, ms (log scale)", True))
    modes = [m for m in MODES if any(p["mode"] == m for p in pairs)]
    written = []
    args.images.mkdir(parents=True, exist_ok=True)
    for name, metric, scale, ylabel, log in metrics:
        fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False,
                                 sharey=True)
        for axis, mode in zip(axes[0], modes, strict=True):
            for (impl, destination), (color, line, marker) in styles.items():
                points = [(p["connections"], (p[impl] or {}).get(metric)) for p in pairs
                          if p["mode"] == mode and p["destination"] == destination]
                points = [(c, s) for c, s in points if s]
                if not points:
                    continue
                xs = [c for c, _ in points]
                ys = [s["median"] * scale for _, s in points]
                low = [(s["median"] - s["min"]) * scale for _, s in points]
                high = [(s["max"] - s["median"]) * scale for _, s in points]
                label = f"{'vmig' if impl == 'vmig' else 'QEMU 7.2'}, {destination} destination"
                axis.errorbar(xs, ys, yerr=[low, high], color=color, linestyle=line,
                              marker=marker, capsize=3, label=label)
            axis.set_xscale("log", base=2)
            axis.set_xticks(args.connection_counts, [str(c) for c in args.connection_counts])
            axis.set_xlabel("connections (QEMU: multifd channels; 1 = plain migration)")
            axis.set_title(titles[mode], fontsize=10)
            axis.grid(True, alpha=0.3)
            if log:
                axis.set_yscale("log")
        if not log:  # after every panel is drawn: the shared scale then fits them all
            axes[0][0].set_ylim(bottom=0)
        axes[0][0].set_ylabel(ylabel)
        axes[0][-1].legend(fontsize=8)
        fig.suptitle(f"vmig vs QEMU 7.2: {format_size(args.memory_bytes)} idle guest, random "
                     f"RAM, loopback; medians of {args.repeat} (bars: min-max)", fontsize=10)
        written.append(save_chart(fig, args.images / f"compare-qemu-{args.label}-{name}.png"))
    if any(f"{impl}_of_limit" in p for p in pairs for impl in IMPLS):
        written.append(limit_chart(pairs, args, modes, titles, styles, plt))
    return written


def limit_chart(pairs: list[dict[str, Any]], args: argparse.Namespace, modes: list[str],
                titles: dict[str, str], styles: dict[tuple[str, str], tuple[str, str, str]],
                plt: Any) -> Path:
    """Throughput as a fraction of the same run's raw limit, against connections."""
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False,
                             sharey=True)
    for axis, mode in zip(axes[0], modes, strict=True):
        for (impl, destination), (color, line, marker) in styles.items():
            points = [(p["connections"], p[f"{impl}_of_limit"]) for p in pairs
                      if p["mode"] == mode and p["destination"] == destination
                      and f"{impl}_of_limit" in p]
            if points:
                label = f"{'vmig' if impl == 'vmig' else 'QEMU 7.2'}, {destination} destination"
                axis.plot([c for c, _ in points], [share * 100 for _, share in points],
                          color=color, linestyle=line, marker=marker, label=label)
        axis.axhline(100, color="grey", linewidth=1)
        axis.set_xscale("log", base=2)
        axis.set_xticks(args.connection_counts, [str(c) for c in args.connection_counts])
        axis.set_xlabel("connections (QEMU: multifd channels; 1 = plain migration)")
        axis.set_title(titles[mode], fontsize=10)
        axis.grid(True, alpha=0.3)
    axes[0][0].set_ylim(bottom=0)
    axes[0][0].set_ylabel("% of the raw limit (plain pair, same setup, same run)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"vmig and QEMU 7.2 as a share of the raw limit: "
                 f"{format_size(args.memory_bytes)}, medians of {args.repeat}", fontsize=10)
    return save_chart(fig, args.images / f"compare-qemu-{args.label}-limit.png")


def save_chart(fig: Any, path: Path) -> Path:
    """Lay `fig` out, write it to `path` as PNG (its directory made if need be), close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --- main ---------------------------------------------------------------------------------------


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through every finally: processes, files


def replot(args: argparse.Namespace) -> int:
    """Charts, table and goals again from the results file `args.replot`."""
    data = json.loads(args.replot.read_text())
    for name in ("connection_counts", "memory_bytes", "repeat"):
        setattr(args, name, data["settings"][name])
    # charts named after the file (compare-qemu-LABEL.json), unless --label says otherwise
    args.label = args.label_given or args.replot.stem.removeprefix("compare-qemu-")
    pairs = pair_rows(data["medians"])
    report(args, pairs, data["handshake"], evaluate_goals(pairs, data["handshake"]), args.replot,
           [] if args.no_charts else charts(pairs, args))
    return 0


def report(args: argparse.Namespace, pairs: list[dict[str, Any]],
           handshake: dict[str, Any] | None, goals: list[dict[str, Any]], output: Path,
           images: list[Path]) -> None:
    print(f"\n{format_size(args.memory_bytes)} idle guest (random RAM), loopback, "
          f"medians of {args.repeat} (min-max); ratio = vmig / QEMU\n")
    print(markdown_table(pairs))
    if handshake is not None:
        print("\nhandshake per connection, median ms: " + ", ".join(
            f"{k} {handshake[k]['median_ms']:.3f} ({handshake[k]['min_ms']:.3f}-"
            f"{handshake[k]['max_ms']:.3f})" for k in ("tcp", "token", "tls")))
    print("\ngoals:")
    for goal in goals:
        verdict = {True: "met", False: "NOT met", None: "no data"}[goal["met"]]
        print(f"- {goal['goal']}: {verdict} ({goal['detail']})")
    print(f"\nresults: {_shown(output)}")
    for image in images:
        print(f"chart: {_shown(image)}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot is not None:
        return replot(args)
    signal.signal(signal.SIGTERM, _terminate)
    qemu = shutil.which(QEMU)
    if "qemu" in args.impl_list and qemu is None:
        print(f"compare_qemu: {QEMU} not found; run it with ./dev bench compare_qemu.py "
              "(installs Debian's qemu-system-x86)", file=sys.stderr)
        return 2
    shadow = Path.cwd().resolve()
    if (shadow / "vmig" / "__init__.py").exists() and shadow != VMIG_TREE:
        # `python -m vmig` puts the working directory first: the VMMs would run that vmig
        print(f"compare_qemu: the VMMs would import vmig from {shadow}, this script from "
              f"{VMIG_TREE}; run it from {VMIG_TREE} (or without PYTHONPATH)", file=sys.stderr)
        return 2
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    machine = machine_info(qemu)
    orders = setup_orders(args)
    total = sum(len(order) for order in orders)
    runs: list[dict[str, Any]] = []
    handshake = None
    template = SHM / f"compare-qemu-{os.getpid()}-template.ram"
    with tempfile.TemporaryDirectory(prefix="compare-qemu-") as tmp:
        try:
            tls_server, tls_client = make_certificates(Path(tmp) / "tls")
            ctx = Context(args, qemu, template, Path(tmp), tls_server, tls_client,
                          itertools.count(1))
            print(f"filling {format_size(args.memory_bytes)} with random bytes",
                  file=sys.stderr, flush=True)
            fill_random(template, args.memory_bytes)
            if args.handshakes:
                handshake = handshake_costs(ctx, args.handshakes)
                print("handshake per connection (median ms): " + ", ".join(
                    f"{k} {handshake[k]['median_ms']:.3f}" for k in ("tcp", "token", "tls")),
                    file=sys.stderr, flush=True)
            done = 0
            for repeat, order in enumerate(orders, 1):
                for setup in order:
                    done += 1
                    run = one_run(ctx, setup, repeat)
                    runs.append(run)
                    print(f"[{done}/{total}] repeat {repeat}: {setup.describe()}: "
                          + _progress(run), file=sys.stderr, flush=True)
        finally:
            with contextlib.suppress(FileNotFoundError):
                template.unlink()
    rows = summarise(runs, orders[0])
    pairs = pair_rows(rows)
    goals = evaluate_goals(pairs, handshake)
    machine["commit_at_end"] = machine_info(None)["commit"]
    settings = {name: value for name, value in vars(args).items()
                if name not in ("output", "images", "replot", "label_given")}
    result = {"command": [Path(sys.executable).name, *sys.argv], "settings": settings,
              "machine": machine, "started": started,
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "definitions": DEFINITIONS, "handshake": handshake, "medians": rows,
              "pairs": [{k: v for k, v in p.items() if k not in ("vmig", "qemu", RAW)}
                        for p in pairs],
              "goals": goals, "runs": runs}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    report(args, pairs, handshake, goals, args.output,
           [] if args.no_charts else charts(pairs, args))
    failed = [run for run in runs if "error" in run or not run["check"]["ok"]]
    return 1 if failed else 0


DEFINITIONS = {
    "total_ms": "vmig: the sender's duration_ms (first connection to the destination's "
                "acknowledgement of COMPLETE, sent after it resumed the guest). QEMU: from the "
                "source's MIGRATION setup event to the destination's RESUME event (QMP event "
                "timestamps, one host clock); QEMU's own total-time is qemu_total_ms",
    "throughput_bytes_per_s": "guest RAM bytes / total_ms",
    "downtime_ms": "vmig: the sender's downtime_ms (pause to the acknowledgement of "
                   "COMPLETE). QEMU: source STOP event to destination RESUME event; QEMU's "
                   "own figure is qemu_downtime_ms",
    "cpu_s": "user + sys of each process (all threads) from /proc/PID/stat, from just "
             "before the migration request until it is over on both sides",
    "raw": "raw_limit.py's pair of processes, no protocol: the same RAM file over the same "
           "number of TCP connections (plain: sendfile and sendmsg, the faster counts; TLS: "
           "sendmsg into ssl), received with recv_into into a new memfd (prealloc: faulted "
           "in first); total_ms from the first connect to the last slice's answer",
    "vmig_of_limit": "vmig's median throughput / the raw pair's, same setup and run",
    "bytes_sent": "vmig: summary bytes_sent (guest memory bytes); QEMU: ram.transferred",
    "connections_used": "TCP connections carrying the migration: vmig's count includes its "
                        "main connection; QEMU multifd-N opens N channels plus its main one",
}


def _progress(run: dict[str, Any]) -> str:
    if "error" in run:
        return f"FAILED: {run['error']}"
    check = "ok" if run["check"]["ok"] else f"CHECK FAILED {run['check']}"
    downtime = "-" if run["downtime_ms"] is None else f"{run['downtime_ms']:.0f}"
    return (f"{run['throughput_bytes_per_s'] / 1e9:.2f} GB/s, {run['total_ms']:.0f} ms, "
            f"downtime {downtime} ms, CPU {run['cpu_s']['source']:.2f}+"
            f"{run['cpu_s']['destination']:.2f} s, {check}")


def _shown(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(ROOT))
    return str(path)


if __name__ == "__main__":
    sys.exit(main())
