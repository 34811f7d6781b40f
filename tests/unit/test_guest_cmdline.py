"""The guest's command line as vmig renders it (the guest parses it: tests/kvm)."""

import pytest

from vmig.config import VmConfig
from vmig.errors import GuestError
from vmig.guest import cmdline, layout


def test_render_names_every_parameter_in_a_fixed_order():
    config = VmConfig.build(memory="256M", cpus=2, workload="dirty", working_set="32M",
                            dirty_rate=20_000, order="sequential", seed=7)
    assert cmdline.render(config, 2_245_780) == (
        "cpus=2 workload=dirty order=sequential dirty_rate=20000 working_set=32M seed=7 "
        "tsc_khz=2245780")


@pytest.mark.parametrize(("size", "text"), [
    ("4K", "working_set=4K"), ("1028K", "working_set=1028K"), ("2G", "working_set=2G"),
])
def test_working_set_takes_the_largest_exact_suffix(size, text):
    config = VmConfig.build(memory="4G", working_set=size)
    assert text in cmdline.render(config, 1)


def test_defaults_are_vmconfigs():
    defaults = cmdline.c_defaults()
    assert f"#define DEFAULT_WORKING_SET 0x{VmConfig().working_set_bytes:x}ULL" in defaults
    assert f"#define DEFAULT_WORKLOAD 0x{layout.WORKLOAD_IDLE:x}ULL" in defaults
    assert f"#define DEFAULT_ORDER 0x{layout.ORDER_RANDOM:x}ULL" in defaults


def test_a_command_line_too_long_for_the_config_page_is_refused(monkeypatch):
    monkeypatch.setattr(layout, "CMDLINE_SIZE", 16)
    with pytest.raises(GuestError, match="at most 15 fit"):
        cmdline.render(VmConfig(), 1)
