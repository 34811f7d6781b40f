"""What this VMM process holds: file descriptors by kind, threads by kind, TCP listeners.

`vmm.resources` answers with it, so that operators (and the fault-injection suite)
can see that a migration, whatever became of it, gave back every socket, thread
and listener it took. Read from /proc/self and `threading.enumerate()`.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any

_TCP_LISTEN = "0A"  # st of a listening socket in /proc/net/tcp


def _socket_inodes(table: str) -> tuple[set[str], set[str]]:
    """(every socket inode, the listening ones) in a /proc/self/net table."""
    inodes: set[str] = set()
    listening: set[str] = set()
    with contextlib.suppress(OSError), open(f"/proc/self/net/{table}") as lines:
        next(lines, None)
        for line in lines:
            fields = line.split()
            if table.startswith("tcp") and len(fields) > 9:
                inodes.add(fields[9])
                if fields[3] == _TCP_LISTEN:
                    listening.add(fields[9])
            elif table == "unix" and len(fields) > 6:
                inodes.add(fields[6])
    return inodes, listening


def process_resources() -> dict[str, Any]:
    """fds by kind, threads by kind, and how many of our TCP sockets listen."""
    tcp, listening = set(), set()
    for table in ("tcp", "tcp6"):
        found, listens = _socket_inodes(table)
        tcp |= found
        listening |= listens
    unix, _ = _socket_inodes("unix")
    fds = {"total": 0, "tcp": 0, "unix": 0, "other": 0}
    listeners = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # closed meanwhile (the listing's own fd, say)
        fds["total"] += 1
        if target.startswith("socket:["):
            inode = target[8:-1]
            if inode in tcp:
                fds["tcp"] += 1
                listeners += inode in listening
                continue
            if inode in unix:
                fds["unix"] += 1
                continue
        fds["other"] += 1
    threads = {"total": 0, "vcpu": 0, "migrate": 0, "other": 0}
    for thread in threading.enumerate():
        threads["total"] += 1
        kind = ("vcpu" if thread.name.startswith("vcpu") else
                "migrate" if thread.name.startswith("migrate-") else "other")
        threads[kind] += 1
    return {"pid": os.getpid(), "fds": fds, "threads": threads, "tcp_listeners": listeners}
