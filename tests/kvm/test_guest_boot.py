"""vmig hands its guest the command line a Multiboot loader would (vmig.guest.cmdline),
and the guest runs what it says."""

from pathlib import Path

import pytest

from vmig.config import VmConfig
from vmig.guest import cmdline
from vmig.vmm.machine import Machine, install_kick_handler

pytestmark = pytest.mark.kvm


def test_vmig_writes_the_rendered_command_line_and_the_guest_follows_it(tmp_path: Path):
    install_kick_handler()
    log = tmp_path / "serial.log"
    config = VmConfig.build(memory="64M", cpus=2, workload="dirty", working_set="12M",
                            dirty_rate=3000, order="sequential", seed=99, serial_log=str(log))
    with Machine.boot(config) as machine:
        text = cmdline.render(config, machine.tsc_khz)
        result = machine.check_guest()
    serial = log.read_text()
    assert f"vmig guest: command line: {text}\n" in serial
    assert ("vmig guest: 2 vCPUs, workload dirty, order sequential, rate 3000 pages/s, "
            "working set 3072 pages, booted by vmig\n") in serial
    assert result["ok"] and result["pages_checked"] == 3072
