"""The physical limit of one comparison run: a plain sender and receiver, no protocol.

Two processes, as vmig's and QEMU's source and destination are: the receiver maps a new
memfd the size of the guest (``fresh``: pages fault in as bytes land; ``prealloc``:
faulted in first, as ``--prealloc`` does) and fills it from N TCP connections with
``recv_into`` straight into the mapping; the sender reads the same RAM file the guests
migrate and writes slice i of it on connection i, with ``sendfile`` from the file
(the socket takes the pages, no copy) or with ``sendmsg`` from an mmap of it (``tls``:
``ssl`` sockets, TLS 1.3 with the comparison's certificates; there is no sendfile
into TLS). Each connection sends a 16-byte header (offset, length), its slice, and
waits for a one-byte answer once the receiver holds all of it: the time is from the
first connect to the last answer, the same span as a migration's total time.

`measure()` runs one transfer with two fresh processes and returns its figures;
``compare_qemu.py`` calls it for every setup and reports vmig and QEMU as fractions
of the best method's throughput. Run alone:

    ./dev bench raw_limit.py --memory 2G --connections 8 --method sendfile
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import mmap
import os
import resource
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vmig.memory.backing import MemoryBacking
from vmig.transport.security import TlsSide, load_tls
from vmig.units import PAGE_SIZE, parse_size

HEADER = struct.Struct("<QQ")  # offset, length of the connection's slice
SOCKET_BUFFER = 16 << 20  # as vmig's streams ask for
SEND_PIECE = 64 << 20  # sendmsg/sendfile call size: big enough that calls cost nothing
METHODS = ("sendfile", "sendmsg")
TIMEOUT_S = 300.0


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        part = sock.recv(size - len(data))
        if not part:
            raise ConnectionError("the peer closed early")
        data += part
    return data


def _digest(data: memoryview) -> str:
    """What the receiver holds, to check that the limit carried every byte (untimed)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)


def slices(size: int, connections: int) -> list[tuple[int, int]]:
    """(offset, length) per connection: page-aligned, together exactly `size`."""
    pages = size // PAGE_SIZE
    bounds = [pages * i // connections * PAGE_SIZE for i in range(connections + 1)]
    return [(start, end - start) for start, end in itertools.pairwise(bounds)]


# --- the receiver -------------------------------------------------------------------------------


def receive(size: int, connections: int, prealloc: bool, tls_dir: str | None) -> dict[str, Any]:
    """Listen, print the port, take `connections` slices into a new memfd; the figures."""
    context = load_tls(tls_dir, TlsSide.SERVER).context if tls_dir else None
    with MemoryBacking.create(size) as memory, socket.create_server(("127.0.0.1", 0)) as server:
        if prealloc:
            memory.populate()
        server.listen(connections)
        print(f"READY {server.getsockname()[1]}", flush=True)
        cpu_before = _cpu_seconds()
        errors: list[str] = []

        def serve(conn: socket.socket) -> None:
            try:
                with conn:
                    if context is not None:
                        conn = context.wrap_socket(conn, server_side=True)
                    offset, length = HEADER.unpack(_recv_exact(conn, HEADER.size))
                    view = memory.buffer[offset:offset + length]
                    try:
                        done = 0
                        while done < length:
                            got = conn.recv_into(view[done:], length - done)
                            if not got:
                                raise ConnectionError("the sender closed early")
                            done += got
                    finally:
                        view.release()
                    conn.sendall(b"k")
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

        threads = []
        for _ in range(connections):
            conn, _peer = server.accept()
            _tune(conn)
            conn.settimeout(TIMEOUT_S)
            thread = threading.Thread(target=serve, args=(conn,))
            thread.start()
            threads.append(thread)
        for thread in threads:
            thread.join()
        cpu_s = round(_cpu_seconds() - cpu_before, 3)
        return {"cpu_s": cpu_s, "errors": errors, "digest": _digest(memory.buffer)}


# --- the sender ---------------------------------------------------------------------------------


def _send_file(sock: socket.socket, fd: int, offset: int, length: int) -> None:
    end = offset + length
    while offset < end:
        sent = os.sendfile(sock.fileno(), fd, offset, min(SEND_PIECE, end - offset))
        if sent == 0:
            raise ConnectionError("sendfile sent nothing: the receiver is gone")
        offset += sent


def _send_views(sock: socket.socket, area: memoryview, offset: int, length: int) -> None:
    for start in range(offset, offset + length, SEND_PIECE):
        sock.sendall(area[start:min(start + SEND_PIECE, offset + length)])


def send(path: str, port: int, size: int, connections: int, method: str,
         tls_dir: str | None) -> dict[str, Any]:
    """Send slice i of the file at `path` on connection i; the figures."""
    context = load_tls(tls_dir, TlsSide.CLIENT).context if tls_dir else None
    if context is not None and method == "sendfile":
        raise ValueError("sendfile does not go into TLS: use sendmsg")
    fd = os.open(path, os.O_RDONLY)
    area = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
    view = memoryview(area)
    errors: list[str] = []
    try:
        cpu_before, began = _cpu_seconds(), time.monotonic()

        def one(offset: int, length: int) -> None:
            try:
                with socket.create_connection(("127.0.0.1", port), TIMEOUT_S) as sock:
                    _tune(sock)
                    sock.settimeout(None)  # blocking: os.sendfile on a timeout socket is EAGAIN
                    conn = (context.wrap_socket(sock, server_hostname="127.0.0.1")
                            if context is not None else sock)
                    conn.sendall(HEADER.pack(offset, length))
                    if method == "sendfile":
                        _send_file(conn, fd, offset, length)
                    else:
                        _send_views(conn, view, offset, length)
                    if _recv_exact(conn, 1) != b"k":
                        raise ConnectionError("the receiver answered something else")
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=one, args=part) for part in slices(size, connections)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds = time.monotonic() - began
        return {"seconds": round(seconds, 4), "cpu_s": round(_cpu_seconds() - cpu_before, 3),
                "errors": errors}
    finally:
        view.release()
        area.close()
        os.close(fd)


# --- one measurement, two processes ------------------------------------------------------------


def measure(path: Path, size: int, connections: int, method: str, prealloc: bool,
            tls_dir: Path | None = None, tls_client_dir: Path | None = None,
            before_send: Callable[[], None] | None = None) -> dict[str, Any]:
    """One transfer between a new receiver and a new sender process; `before_send` runs
    once the receiver is ready (compare_qemu's warm-up touch). RuntimeError on failure."""
    script = str(Path(__file__).resolve())
    common = ["--memory", str(size), "--connections", str(connections)]
    receiver = subprocess.Popen(
        [sys.executable, script, "receive", *common, *(["--prealloc"] if prealloc else []),
         *(["--tls-dir", str(tls_dir)] if tls_dir else [])],
        stdout=subprocess.PIPE, text=True)
    try:
        assert receiver.stdout is not None
        ready = receiver.stdout.readline().split()
        if ready[:1] != ["READY"]:
            raise RuntimeError(f"the raw receiver did not start: {ready}")
        if before_send is not None:
            before_send()
        sender = subprocess.run(
            [sys.executable, script, "send", *common, "--file", str(path), "--port", ready[1],
             "--method", method, *(["--tls-dir", str(tls_client_dir)] if tls_client_dir else [])],
            capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
        out, _ = receiver.communicate(timeout=TIMEOUT_S)
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
    if sender.returncode or receiver.returncode:
        raise RuntimeError(f"raw pair failed: sender {sender.returncode} {sender.stderr[-500:]}"
                           f" receiver {receiver.returncode}")
    sent, received = json.loads(sender.stdout), json.loads(out)
    if sent["errors"] or received["errors"]:
        raise RuntimeError(f"raw pair failed: {sent['errors'] + received['errors']}")
    with open(path, "rb") as file, mmap.mmap(file.fileno(), size, prot=mmap.PROT_READ) as area:
        if received["digest"] != _digest(memoryview(area)):
            raise RuntimeError("raw pair failed: the receiver's bytes differ from the file's")
    return {"method": method, "total_ms": round(sent["seconds"] * 1000, 1),
            "cpu_s": {"source": sent["cpu_s"], "destination": received["cpu_s"]}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("role", choices=("receive", "send", "both"))
    parser.add_argument("--memory", default="1G")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--method", choices=METHODS, default="sendfile")
    parser.add_argument("--prealloc", action="store_true")
    parser.add_argument("--tls-dir", default=None)
    parser.add_argument("--file", default=None, help="send: the file to send")
    parser.add_argument("--port", type=int, default=0, help="send: the receiver's port")
    args = parser.parse_args(argv)
    size = parse_size(args.memory, "memory size")
    if args.role == "receive":
        print(json.dumps(receive(size, args.connections, args.prealloc, args.tls_dir)))
    elif args.role == "send":
        print(json.dumps(send(args.file, args.port, size, args.connections, args.method,
                              args.tls_dir)))
    else:  # both: a random file on /dev/shm, one transfer, the figures
        from compare_qemu import fill_random  # it imports this module: not at the top

        path = Path(f"/dev/shm/raw-limit-{os.getpid()}.ram")
        try:
            fill_random(path, size)
            result = measure(path, size, args.connections, args.method, args.prealloc)
            result["gb_per_s"] = round(size / result["total_ms"] * 1000 / 1e9, 2)
            print(json.dumps(result))
        finally:
            path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
