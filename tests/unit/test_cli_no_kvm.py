"""`vmig vmm` on a host without a usable /dev/kvm: one line, exit 1, no socket left behind.

Where /dev/kvm exists, a private mount namespace hides it behind /dev/null
(needs root and unshare); where it does not exist, the test runs as it is.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

KVM = "/dev/kvm"


def _command(socket_path: Path) -> tuple[list[str], str]:
    vmm = [sys.executable, "-m", "vmig", "vmm", "--api-socket", str(socket_path),
           "--memory", "64M"]
    if not os.path.exists(KVM):
        return vmm, f"vmig: error: {KVM} does not exist"
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        pytest.skip("hiding /dev/kvm needs root and unshare")
    probe = subprocess.run([unshare, "-m", "true"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip("cannot create a mount namespace here")
    script = f'mount --bind /dev/null {KVM} && exec "$@"'
    return [unshare, "-m", "sh", "-c", script, "sh", *vmm], f"vmig: error: {KVM} is not a KVM"


def test_vmm_without_kvm_fails_with_one_line(tmp_path: Path) -> None:
    socket_path = tmp_path / "api.sock"
    command, expected = _command(socket_path)
    result = subprocess.run(command, capture_output=True, text=True, timeout=120,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 1, result
    assert result.stderr.startswith(expected), result.stderr
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
    assert not socket_path.exists()
