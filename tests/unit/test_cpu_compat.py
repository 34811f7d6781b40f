"""The destination's CPUID and TSC checks, on plain entries (the saved state's form)."""

import pytest

from vmig.cpu_compat import FEATURE_BITS, features, missing_features, tsc_change_refusal


def _entry(function: int, index: int = 0, flags: int = 0, **registers: int) -> dict[str, int]:
    return {"function": function, "index": index, "flags": flags, "eax": 0, "ebx": 0,
            "ecx": 0, "edx": 0, **registers}


HOST = [_entry(1, ecx=(1 << 0) | (1 << 19), edx=(1 << 0) | (1 << 25) | (1 << 26)),
        _entry(7, flags=1, ebx=1 << 0),
        _entry(7, index=1, flags=1, eax=0xFFFF),
        _entry(0x80000001, edx=(1 << 29) | (1 << 11))]


def test_a_host_lacks_nothing_it_offers_itself():
    assert missing_features(HOST, HOST) == []
    assert {"sse3", "sse4_1", "fpu", "sse", "sse2", "fsgsbase", "lm", "syscall"} <= features(HOST)


def test_missing_features_are_named_and_sorted():
    guest = [_entry(1, ecx=(1 << 28) | (1 << 26) | 1, edx=1),
             _entry(7, flags=1, ebx=(1 << 5) | 1, edx=1 << 29),
             _entry(0x80000001, edx=(1 << 29) | (1 << 27))]
    assert missing_features(guest, HOST) == ["arch_capabilities", "avx", "avx2", "rdtscp",
                                              "xsave"]


def test_control_register_mirrors_are_not_compared():
    guest = [_entry(1, ecx=(1 << 27) | (1 << 31))]  # osxsave, hypervisor
    assert missing_features(guest, HOST) == []


def test_leaf_7_is_read_from_subleaf_0_only():
    guest = [_entry(7, index=1, flags=1, ebx=1 << 5)]  # subleaf 1's ebx is not avx2
    assert missing_features(guest, HOST) == []


def test_every_table_register_names_each_bit_once():
    for (leaf, _, register), bits in FEATURE_BITS.items():
        assert all(0 <= bit < 32 for bit in bits), (leaf, register)
        assert len(set(bits.values())) == len(bits), (leaf, register)


@pytest.mark.parametrize(("source", "dest", "refused"), [
    (2_600_000, 2_600_000, False),
    (2_600_000, 2_600_650, False),  # exactly 250 ppm
    (2_600_000, 2_600_651, True),
    (2_600_000, 2_599_349, True),
    (2_600_000, 3_000_000, True),
])
def test_tsc_frequency_tolerance(source, dest, refused):
    message = tsc_change_refusal(source, dest)
    assert (message is not None) is refused
    if refused:
        assert f"{source} kHz" in message and f"{dest} kHz" in message
        assert "\n" not in message


def test_tsc_tolerance_is_a_parameter():
    assert tsc_change_refusal(1_000_000, 1_001_000, tolerance_ppm=1000) is None
    assert tsc_change_refusal(1_000_000, 1_001_001, tolerance_ppm=1000) is not None
