"""benchmarks/raw_limit.py, the limit every comparison is measured against: its pair of
processes must carry every byte of the file, by each method, or its figure means nothing."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parents[2] / "benchmarks"))

import itertools

import raw_limit

from vmig.units import PAGE_SIZE, MiB


@pytest.mark.parametrize("connections", [1, 3, 8])
def test_the_slices_cover_the_file_once_page_aligned(connections: int) -> None:
    size = 1001 * PAGE_SIZE
    parts = raw_limit.slices(size, connections)
    assert len(parts) == connections
    assert parts[0][0] == 0 and sum(length for _, length in parts) == size
    for (offset, length), (following, _) in itertools.pairwise(parts):
        assert offset + length == following and offset % PAGE_SIZE == 0


@pytest.mark.parametrize(("method", "prealloc"), [("sendfile", False), ("sendmsg", True)])
def test_the_pair_carries_every_byte(tmp_path: Path, method: str, prealloc: bool) -> None:
    path = tmp_path / "ram"
    path.write_bytes(os.urandom(8 * MiB))
    result = raw_limit.measure(path, 8 * MiB, 3, method, prealloc)
    assert result["method"] == method and result["total_ms"] > 0
    assert set(result["cpu_s"]) == {"source", "destination"}


def test_bytes_that_differ_fail_the_measurement(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ram"
    path.write_bytes(os.urandom(4 * MiB))
    # the file's digest as this process computes it, of other bytes than the receiver got
    monkeypatch.setattr(raw_limit, "_digest", lambda data: "0" * 32)
    with pytest.raises(RuntimeError, match="differ"):
        raw_limit.measure(path, 4 * MiB, 2, "sendfile", False)
