"""Boot image detection and parsing (vmig.vmm.images, vmig.vmm.multiboot): pure, on
images built here byte by byte; each refusal says what is wrong in one line."""

from __future__ import annotations

import struct

import pytest

from vmig.config import BootFormat, VmConfig
from vmig.errors import ConfigError
from vmig.units import MiB
from vmig.vmm import multiboot
from vmig.vmm.images import MAX_RAW_BYTES, RAW_LOAD_GPA, parse_image

MEMORY = 64 * MiB
MAGIC = multiboot.HEADER_MAGIC


def _sector(body: bytes = b"\xfa\xf4", size: int = 512) -> bytes:
    image = bytearray(size)
    image[:len(body)] = body
    image[510:512] = b"\x55\xaa"
    return bytes(image)


def _header(flags: int, checksum: int | None = None, fields: tuple[int, ...] = ()) -> bytes:
    if checksum is None:
        checksum = -(MAGIC + flags) & 0xFFFFFFFF
    return struct.pack("<III", MAGIC, flags, checksum) + struct.pack(f"<{len(fields)}I", *fields)


def _address_kernel(load: int = 0x100000, bss_end: int = 0, at: int = 64,
                    size: int = 4096) -> bytes:
    """A flat kernel whose header (at file offset `at`) says where it goes."""
    image = bytearray(size)
    header = _header(multiboot.FLAG_ADDRESS_FIELDS | multiboot.FLAG_MEMORY_INFO,
                     fields=(load + at, load, 0, bss_end, load + at + 32))
    image[at:at + len(header)] = header
    return bytes(image)


def _elf32(segments: list[tuple[int, bytes, int]], entry: int, klass: int = 1) -> bytes:
    """An ELF32 executable with PT_LOAD (paddr, data, memsz) segments and a Multiboot
    header at the start of the first segment's data."""
    phoff, phentsize = 52, 32
    offset = phoff + phentsize * len(segments)
    headers, blobs = b"", b""
    for paddr, data, memsz in segments:
        headers += struct.pack("<8I", 1, offset + len(blobs), paddr, paddr, len(data), memsz,
                               7, 4)
        blobs += data
    ident = b"\x7fELF" + bytes((klass, 1, 1)) + bytes(9)
    elf = ident + struct.pack("<HHIIIIIHHHHHH", 2, 3, 1, entry, phoff, 0, 0, 52, phentsize,
                              len(segments), 40, 0, 0)
    return elf + headers + blobs


def test_a_boot_sector_is_raw_and_goes_to_7c00() -> None:
    image = _sector()
    plan = parse_image(image, MEMORY)
    assert plan.format is BootFormat.RAW and plan.entry == RAW_LOAD_GPA
    assert [(s.gpa, s.data) for s in plan.segments] == [(RAW_LOAD_GPA, image)]
    assert len(plan.sha256) == 64


def test_a_raw_image_may_run_past_its_first_sector_up_to_640k() -> None:
    assert parse_image(_sector(size=MAX_RAW_BYTES), MEMORY).format is BootFormat.RAW
    with pytest.raises(ConfigError, match=r"raw boot image is 623617 bytes: at most 623616 "
                                          r"fit between 0x7c00 and the end of conventional"):
        parse_image(_sector(size=MAX_RAW_BYTES + 1), MEMORY)


@pytest.mark.parametrize("image", [bytes(512), b"\x55\xaa", _sector()[:511],
                                   bytes(510) + b"\xaa\x55"],
                         ids=["no-signature", "short", "cut", "swapped"])
def test_without_0x55aa_or_a_multiboot_header_the_file_is_refused(image: bytes) -> None:
    with pytest.raises(ConfigError, match=r"neither a Multiboot kernel \(no magic 0x1BADB002 "
                                          r"in its first 8192 bytes\) nor a raw boot image"):
        parse_image(image, MEMORY)


def test_a_multiboot_header_past_8k_is_not_seen() -> None:
    image = bytes(8192) + _header(multiboot.FLAG_MEMORY_INFO)
    with pytest.raises(ConfigError, match="neither a Multiboot kernel"):
        parse_image(image, MEMORY)


def test_a_bad_multiboot_checksum_is_refused() -> None:
    image = _header(0, checksum=0x12345678) + bytes(64)
    with pytest.raises(ConfigError, match=r"Multiboot header at offset 0x0 has a bad "
                                          r"checksum 0x12345678"):
        parse_image(image, MEMORY)


@pytest.mark.parametrize(("flags", "named"), [(1 << 2, r"bit 2 \(video mode information\)"),
                                              (1 << 7 | 1 << 15, r"bit 7 \(unknown\), bit 15")])
def test_required_flags_the_vmm_cannot_meet_are_refused(flags: int, named: str) -> None:
    with pytest.raises(ConfigError, match=r"requires what the VMM does not offer: " + named):
        parse_image(_header(flags) + bytes(64), MEMORY)


def test_optional_flags_above_bit_16_are_ignored() -> None:
    kernel = _elf32([(0x100000, _header(1 << 20 | 3) + bytes(20), 0x2000)], 0x100000)
    assert parse_image(kernel, MEMORY).format is BootFormat.MULTIBOOT


def test_the_header_address_fields_say_where_the_kernel_goes() -> None:
    image = _address_kernel(bss_end=0x100000 + 4096 + 8192)
    plan = parse_image(image, MEMORY)
    assert plan.format is BootFormat.MULTIBOOT and plan.entry == 0x100000 + 64 + 32
    [segment] = plan.segments
    assert (segment.gpa, segment.data, segment.zero_bytes) == (0x100000, image, 8192)


def test_elf32_segments_are_loaded_by_physical_address() -> None:
    text = _header(multiboot.FLAG_MEMORY_INFO) + b"\x90" * 20
    kernel = _elf32([(0x100000, text, len(text)), (0x200000, b"data", 0x3000)], 0x10000C)
    plan = parse_image(kernel, MEMORY)
    assert plan.entry == 0x10000C
    assert [(s.gpa, s.data, s.zero_bytes) for s in plan.segments] == [
        (0x100000, text, 0), (0x200000, b"data", 0x3000 - 4)]


def test_elf64_and_missing_address_information_are_refused() -> None:
    text = _header(0) + bytes(20)
    with pytest.raises(ConfigError, match="is not a little-endian ELF32 file"):
        parse_image(_elf32([(0x100000, text, 64)], 0x100000, klass=2), MEMORY)
    with pytest.raises(ConfigError, match=r"not ELF and its header has no address fields "
                                          r"\(flag bit 16\)"):
        parse_image(text + bytes(64), MEMORY)


@pytest.mark.parametrize("load", [0x6000, 0x7800, 0x5800])
def test_a_kernel_overlapping_the_trampoline_and_mbi_is_refused(load: int) -> None:
    with pytest.raises(ConfigError, match=r"overlaps the VMM's trampoline and Multiboot "
                                          r"information at 0x6000-0x8000"):
        parse_image(_address_kernel(load=load), MEMORY)


def test_just_above_the_trampoline_and_mbi_is_fine() -> None:
    assert parse_image(_address_kernel(load=0x8000), MEMORY).segments[0].gpa == 0x8000


def test_a_kernel_larger_than_guest_memory_is_refused() -> None:
    kernel = _elf32([(0x100000, _header(0) + bytes(20), 64 * MiB)], 0x100000)
    with pytest.raises(ConfigError, match=r"Multiboot segment 0x100000-0x4100000 does not "
                                          r"fit in 64 MiB of guest memory"):
        parse_image(kernel, MEMORY)


def test_the_information_holds_memory_sizes_map_and_command_line() -> None:
    pieces = dict(multiboot.information(MEMORY, "a b=c"))
    info = pieces[multiboot.MBI_GPA]
    flags, lower, upper = struct.unpack_from("<III", info)
    assert flags == 1 | 1 << 2 | 1 << 6 | 1 << 9 and (lower, upper) == (640, 63 * 1024)
    assert pieces[multiboot.CMDLINE_GPA] == b"a b=c\0"
    length, address = struct.unpack_from("<II", info, 44)
    entries = [struct.unpack_from("<IQQI", pieces[address], i) for i in range(0, length, 24)]
    assert entries == [(20, 0, 0xA0000, 1), (20, 0xA0000, 0x60000, 2),
                       (20, 0x100000, MEMORY - 0x100000, 1)]
    for gpa, data in (*pieces.items(), *multiboot.trampoline(0x100000)):
        assert gpa >= multiboot.RESERVED_START and gpa + len(data) <= multiboot.RESERVED_END


def test_a_command_line_too_long_for_its_page_is_refused() -> None:
    multiboot.information(MEMORY, "x" * multiboot.MAX_CMDLINE)
    with pytest.raises(ConfigError, match=r"boot_cmdline is 3584 bytes; at most 3583"):
        multiboot.information(MEMORY, "x" * (multiboot.MAX_CMDLINE + 1))


def test_the_trampoline_enters_with_the_multiboot_magic_and_information() -> None:
    code = b"".join(data for _, data in multiboot.trampoline(0x12345678))
    assert b"\xb8" + struct.pack("<I", 0x2BADB002) in code  # mov eax, magic
    assert b"\xbb" + struct.pack("<I", multiboot.MBI_GPA) in code  # mov ebx, MBI
    assert b"\xea" + struct.pack("<IH", 0x12345678, 0x08) in code  # jmp 0x08:entry


def test_own_guest_fields_do_not_apply_to_a_boot_image() -> None:
    for field, value in (("workload", "dirty"), ("dirty_rate", 5), ("working_set", "8M"),
                         ("order", "sequential"), ("seed", 3)):
        with pytest.raises(ConfigError, match=f"{field} does not apply to a boot image"):
            VmConfig.build(boot_image="/x.img", **{field: value})
    with pytest.raises(ConfigError, match="a boot image runs on 1 vCPU"):
        VmConfig.build(boot_image="/x.img", cpus=2)
    with pytest.raises(ConfigError, match="boot_cmdline needs boot_image"):
        VmConfig.build(boot_cmdline="quiet")


def test_a_boot_configuration_survives_its_plain_form() -> None:
    config = VmConfig(boot_image="/x.img", boot_format=BootFormat.MULTIBOOT,
                      boot_sha256="ab" * 32, boot_cmdline="quiet")
    data = config.to_dict()
    assert data["boot_format"] == "multiboot"
    assert VmConfig.from_dict(data) == config
    assert VmConfig.from_dict({k: v for k, v in VmConfig().to_dict().items()
                               if not k.startswith("boot_")}) == VmConfig()
