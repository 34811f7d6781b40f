"""Snapshot files: a paused VM's `state.json` and `memory.bin` in a directory.

`write_snapshot` writes both atomically (a temporary file, fsync, rename);
`read_snapshot` reads them back into fresh guest memory, naming the file at fault.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from vmig.errors import SnapshotError
from vmig.memory import GuestMemory
from vmig.vmm.state import MachineState

__all__ = ["SNAPSHOT_MEMORY_FILE", "SNAPSHOT_STATE_FILE", "read_snapshot", "write_snapshot"]

SNAPSHOT_STATE_FILE = "state.json"
SNAPSHOT_MEMORY_FILE = "memory.bin"


def read_snapshot(directory: str, memory_file: str | None = None
                  ) -> tuple[MachineState, GuestMemory]:
    """The saved state and a new GuestMemory (a memfd, or `memory_file`) holding the
    saved memory; SnapshotError names what is missing or wrong."""
    folder = Path(directory)
    if not folder.is_dir():  # say what is wrong with the directory, not with a file in it
        raise SnapshotError(f"snapshot directory {folder} does not exist" if not folder.exists()
                            else f"snapshot directory {folder} is not a directory")
    state_path, memory_path = folder / SNAPSHOT_STATE_FILE, folder / SNAPSHOT_MEMORY_FILE
    try:
        state = MachineState.from_json(state_path.read_bytes())
    except FileNotFoundError:
        raise SnapshotError(f"{folder} is not a vmig snapshot: {state_path.name} "
                            "is missing") from None
    except OSError as exc:
        raise SnapshotError(f"cannot read {state_path}: {exc.strerror}") from None
    size = state.config.memory_bytes
    try:
        actual = memory_path.stat().st_size
    except OSError:
        raise SnapshotError(f"snapshot {folder} has no {memory_path.name}") from None
    if actual != size:
        raise SnapshotError(f"snapshot memory {memory_path} holds {actual} bytes, "
                            f"the VM state says {size}")
    memory = GuestMemory.create(size, memory_file)
    try:
        view = memory.view(0, size)
        try:
            with open(memory_path, "rb") as source:
                done = 0
                while done < size:
                    n = source.readinto(view[done:])
                    if not n:
                        raise SnapshotError(f"{memory_path} ended early")
                    done += n
        finally:
            view.release()
    except OSError as exc:
        memory.close()
        raise SnapshotError(f"cannot read {memory_path}: {exc.strerror}") from None
    except BaseException:
        memory.close()
        raise
    return state, memory


def write_snapshot(directory: str, state: MachineState, memory: GuestMemory) -> None:
    """Write `state.json` and `memory.bin` into `directory` (created if needed)."""
    folder = Path(directory)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _write_file_atomic(folder / SNAPSHOT_MEMORY_FILE,
                           memory.view(0, memory.size))
        _write_file_atomic(folder / SNAPSHOT_STATE_FILE, state.to_json().encode())
    except OSError as exc:
        raise SnapshotError(f"cannot write snapshot to {folder}: "
                            f"{exc.strerror or exc}") from None


def _write_file_atomic(path: Path, data: bytes | memoryview) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    finally:
        if isinstance(data, memoryview):
            data.release()
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
