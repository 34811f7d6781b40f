"""Build the guest's flat binary image from `src/` with gcc and binutils.

The image lives in `_build/guest.bin` (gitignored) beside `_build/guest.stamp`,
the sha256 of the build's inputs (the sources, `layout.py` and this file) it was
built from. In a checkout it is built on demand and rebuilt when an input's
content no longer matches the stamp (without a stamp: when the image is older
than an input). A wheel carries the image and its stamp, built by setup.py's
`build_py` through `build_image()`, so an installed vmig uses them as they are,
whatever the installed files' mtimes, and never needs gcc. Each build runs in
its own temporary directory and is moved into place with atomic renames, so
several processes may call `ensure_guest_image()` at once.

Run ``python -m vmig.guest.build [--force]`` to build and print the image path.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vmig import config
from vmig.errors import GuestError
from vmig.guest import cmdline, layout

GUEST_DIR = Path(__file__).resolve().parent
SRC_DIR = GUEST_DIR / "src"
BUILD_DIR = GUEST_DIR / "_build"
IMAGE_PATH = BUILD_DIR / "guest.bin"
STAMP_PATH = BUILD_DIR / "guest.stamp"
SOURCES = (SRC_DIR / "start.S", SRC_DIR / "guest.c", SRC_DIR / "guest.ld")
# config.py: the command line's defaults (cmdline.c_defaults) come from VmConfig.
INPUTS = (*SOURCES, *(Path(module.__file__).resolve() for module in (layout, cmdline, config)),
          Path(__file__).resolve())
MAX_IMAGE_SIZE = layout.CODE_LIMIT - layout.ENTRY_BASE

# Tool -> the Debian package that provides it.
TOOLS = {"gcc": "gcc", "as": "binutils", "ld": "binutils", "objcopy": "binutils"}

CFLAGS = (
    "-std=gnu11", "-m64", "-march=x86-64", "-mcmodel=small",
    "-ffreestanding", "-fno-pic", "-fno-pie", "-mno-red-zone", "-mgeneral-regs-only",
    "-fno-stack-protector", "-fno-asynchronous-unwind-tables", "-fno-unwind-tables",
    "-fcf-protection=none", "-fno-tree-loop-distribute-patterns",  # no memset/memcpy calls
    "-nostdlib", "-O2", "-Wall", "-Wextra", "-Werror",
)
TOOL_TIMEOUT_S = 120
STDERR_TAIL_LINES = 6


def inputs_digest() -> str:
    """sha256 (hex) over the names and contents of the build's inputs: the stamp's text."""
    digest = hashlib.sha256()
    for path in INPUTS:
        digest.update(path.name.encode() + b"\0")
        digest.update(path.read_bytes() if path.exists() else b"\0missing\0")
    return digest.hexdigest()


def _stale() -> bool:
    """True when the image is missing or out of date with its inputs.

    With a stamp, the image is current exactly while the inputs' contents match
    it (mtimes, which an install or a checkout resets, do not count). An image
    with no sources beside it is a packaged one and is used as it is. An image
    with neither is stale when any input is newer.
    """
    try:
        built = IMAGE_PATH.stat().st_mtime_ns
    except FileNotFoundError:
        return True
    if not any(path.exists() for path in SOURCES):
        return False
    try:
        stamp = STAMP_PATH.read_text().strip()
    except FileNotFoundError:
        return any(path.stat().st_mtime_ns > built for path in INPUTS if path.exists())
    return stamp != inputs_digest()


def _check_tools() -> None:
    """Raise GuestError naming the first missing tool and its Debian package."""
    for tool, package in TOOLS.items():
        if shutil.which(tool) is None:
            raise GuestError(
                f"cannot build the vmig guest: '{tool}' not found on PATH "
                f"(install the Debian package '{package}')"
            )


def _run(argv: list[str]) -> None:
    """Run one build tool; a failure becomes a one-line GuestError with its stderr tail."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)
    except FileNotFoundError as exc:
        package = TOOLS.get(Path(argv[0]).name, "binutils")
        raise GuestError(
            f"cannot build the vmig guest: '{argv[0]}' not found "
            f"(install the Debian package '{package}')"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise GuestError(f"building the vmig guest: {argv[0]} timed out") from exc
    if proc.returncode != 0:
        lines = [line.strip() for line in (proc.stderr or proc.stdout).splitlines()]
        tail = " | ".join([line for line in lines if line][-STDERR_TAIL_LINES:]) or "no output"
        raise GuestError(
            f"building the vmig guest: {Path(argv[0]).name} failed "
            f"(exit {proc.returncode}): {tail}"
        )


def _build(workdir: Path) -> Path:
    """Compile, link and flatten the guest inside `workdir`; return the image path."""
    (workdir / "layout.h").write_text(layout.c_header() + cmdline.c_defaults())
    inc = f"-I{workdir}"
    start_o, guest_o = workdir / "start.o", workdir / "guest.o"
    lds, elf, image = workdir / "guest.lds", workdir / "guest.elf", workdir / "guest.bin"
    _run(["gcc", *CFLAGS, inc, "-c", str(SRC_DIR / "start.S"), "-o", str(start_o)])
    _run(["gcc", *CFLAGS, inc, "-c", str(SRC_DIR / "guest.c"), "-o", str(guest_o)])
    # The linker script takes its addresses from layout.h via the C preprocessor;
    # -undef keeps predefined macros such as `linux` out of it.
    _run(["gcc", "-E", "-P", "-undef", "-x", "c", inc, str(SRC_DIR / "guest.ld"),
          "-o", str(lds)])
    _run(["ld", "-nostdlib", "-static", "--build-id=none", "--fatal-warnings",
          "-T", str(lds), "-o", str(elf), str(start_o), str(guest_o)])
    _run(["objcopy", "-O", "binary", str(elf), str(image)])
    size = image.stat().st_size
    if size > MAX_IMAGE_SIZE:
        raise GuestError(
            f"vmig guest image is {size} bytes; at most {MAX_IMAGE_SIZE} fit between "
            f"ENTRY_BASE {layout.ENTRY_BASE:#x} and CODE_LIMIT {layout.CODE_LIMIT:#x}"
        )
    if size < layout.MAX_CPUS * layout.ENTRY_STRIDE:
        raise GuestError(f"vmig guest image is only {size} bytes: entry stubs missing")
    return image


def build_image(build_dir: Path) -> Path:
    """Build the guest into `build_dir` (guest.bin, guest.stamp, guest.elf, layout.h).

    Returns the image's path. Raises GuestError when a build tool is missing or
    fails, or the image is too big. setup.py calls this to put the image in a wheel.
    """
    _check_tools()
    build_dir.mkdir(parents=True, exist_ok=True)
    started_ns = time.time_ns()
    # Taken before compiling: a source edited during the build no longer matches it.
    stamp = inputs_digest()
    with tempfile.TemporaryDirectory(prefix="build-", dir=build_dir) as tmp:
        workdir = Path(tmp)
        image = _build(workdir)
        # Keep the ELF and the header beside the image for objdump/debugging.
        os.replace(workdir / "guest.elf", build_dir / "guest.elf")
        os.replace(workdir / "layout.h", build_dir / "layout.h")
        # The image's mtime is the build's start, so a source edited during the
        # build still counts as newer; the renames come last and are atomic.
        os.utime(image, ns=(started_ns, started_ns))
        os.replace(image, build_dir / IMAGE_PATH.name)
        (workdir / STAMP_PATH.name).write_text(stamp + "\n")
        os.replace(workdir / STAMP_PATH.name, build_dir / STAMP_PATH.name)
    return build_dir / IMAGE_PATH.name


def ensure_guest_image(force: bool = False) -> Path:
    """Return the path of an up-to-date guest image, building it first if needed.

    Raises GuestError when a build tool is missing or fails, or the image is too big.
    """
    if not force and not _stale():
        return IMAGE_PATH
    return build_image(BUILD_DIR)


def guest_image() -> bytes:
    """The guest image's bytes (built first if needed), to load at layout.ENTRY_BASE."""
    return ensure_guest_image().read_bytes()


def main(argv: list[str] | None = None) -> int:
    """`python -m vmig.guest.build [--force]`: build and print the image path and size."""
    args = sys.argv[1:] if argv is None else argv
    if any(arg not in ("--force", "-f") for arg in args):
        print("usage: python -m vmig.guest.build [--force]", file=sys.stderr)
        return 2
    try:
        path = ensure_guest_image(force=bool(args))
    except GuestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
