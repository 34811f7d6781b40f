"""The README's "Using it" block runs as written, with real VMMs.

Two substitutions, and no others: every ``/tmp/`` becomes this test's temporary
directory (so that runs never meet, and nothing is left in /tmp), and port 7000
becomes a free port. The block runs under ``bash -e`` from the repository root (it
activates .venv itself), in a session of its own, so that whatever it started is
killed if it fails half-way.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
RUN_TIMEOUT_S = 120


def using_it_block() -> str:
    """The first ```sh block after the "## Using it" heading."""
    text = README.read_text()
    section = text[text.index("\n## Using it\n"):]
    match = re.search(r"```sh\n(.*?)```", section, re.DOTALL)
    assert match, "README's 'Using it' has no sh block"
    return match[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_using_it_runs_as_written(tmp_path: Path) -> None:
    block = using_it_block()
    assert "/tmp/" in block and ":7000" in block
    work = tmp_path / "tmp"  # stands for /tmp
    work.mkdir()
    script = block.replace("/tmp/", f"{work}/").replace(":7000", f":{free_port()}")
    log = tmp_path / "output"
    with log.open("w") as output:  # a file, not a pipe: a VMM left running cannot hold it up
        proc = subprocess.Popen(["bash", "-e", "-c", script], cwd=ROOT, stdin=subprocess.DEVNULL,
                                stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=RUN_TIMEOUT_S)
        finally:
            if proc.poll() is None or any(work.glob("*.sock")):
                with contextlib.suppress(ProcessLookupError):  # what it started goes with it
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    text = log.read_text()
    assert proc.returncode == 0, text
    assert text.count('"ok": true') == 2, text  # both check-guest runs
    assert '"status": "completed"' in text, text  # migration-info at the destination
    assert "vmig: error" not in text and "Traceback" not in text, text
    assert list(work.iterdir()) == [], "the block left files behind"
