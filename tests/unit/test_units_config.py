"""Size parsing and VM configuration validation."""

import pytest

from vmig.config import VmConfig, Workload
from vmig.errors import ConfigError
from vmig.units import GiB, MiB, format_size, parse_size


@pytest.mark.parametrize(("text", "expected"), [
    ("4096", 4096), ("256M", 256 * MiB), ("256MiB", 256 * MiB), ("1g", GiB),
    ("1.5G", 3 * GiB // 2), ("2 GB", 2 * GiB), (512, 512),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "12Q", "M", "-1", "1..5G", "ten"])
def test_parse_size_rejects_garbage_with_one_line(text):
    with pytest.raises(ConfigError) as info:
        parse_size(text, "memory size")
    assert "memory size" in str(info.value) and "\n" not in str(info.value)


def test_format_size():
    assert format_size(256 * MiB) == "256 MiB"
    assert format_size(1536 * MiB) == "1.5 GiB"


def test_config_defaults_and_round_trip():
    config = VmConfig.build(memory="256M", cpus=2, workload="dirty")
    assert config.workload is Workload.DIRTY
    assert config.working_set_bytes == 64 * MiB
    assert VmConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"memory": "2M"}, "between"),
    ({"memory": "100T"}, "between"),
    ({"memory": "255M"}, "multiple of 2 MiB"),
    ({"cpus": 0}, "cpus"),
    ({"cpus": 17}, "cpus"),
    ({"memory": "64M", "working_set": "100M"}, "does not fit"),
    ({"working_set": "1000"}, "multiple of 4 KiB"),
    ({"workload": "busy"}, "workload"),
    ({"order": "backwards"}, "order"),
    ({"dirty_rate": -1}, "dirty rate"),
])
def test_config_rejects_bad_values(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        VmConfig.build(**kwargs)
