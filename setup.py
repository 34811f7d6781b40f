"""The one build step pyproject.toml cannot declare: the guest image goes into the wheel.

`build_py` (which every wheel build runs) also compiles the guest with gcc and
binutils, through `vmig.guest.build.build_image()`, and adds its image and stamp
to the built package as `vmig/guest/_build/guest.bin` and `guest.stamp`. An
installed vmig then uses that image and never needs a compiler. An editable
install (`pip install -e .`) skips this: a checkout builds the guest on demand.
Everything else about the package is in pyproject.toml.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
GUEST_FILES = ("guest.bin", "guest.stamp")  # what the wheel carries of vmig/guest/_build


def _load_guest_build():
    """vmig.guest.build from this source tree (it imports only vmig's stdlib-only core)."""
    sys.path.insert(0, str(HERE))
    try:
        from vmig.guest import build as guest_build
    finally:
        sys.path.remove(str(HERE))
    if Path(guest_build.__file__).resolve() != HERE / "vmig" / "guest" / "build.py":
        raise RuntimeError(f"setup.py imported {guest_build.__file__}, not this tree's build.py")
    return guest_build


class BuildPyWithGuest(build_py):
    """build_py that also builds the guest image into the package."""

    def _guest_targets(self) -> list[str]:
        target = Path(self.build_lib) / "vmig" / "guest" / "_build"
        return [str(target / name) for name in GUEST_FILES]

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        guest_build = _load_guest_build()
        with tempfile.TemporaryDirectory(prefix="vmig-guest-") as tmp:
            try:
                guest_build.build_image(Path(tmp))
            except guest_build.GuestError as exc:
                raise SystemExit(f"error: {exc}") from exc
            for name, target in zip(GUEST_FILES, self._guest_targets(), strict=True):
                self.mkpath(str(Path(target).parent))
                self.copy_file(str(Path(tmp) / name), target, preserve_times=False)
                print(f"vmig: guest image built into {target}")

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        if not getattr(self, "editable_mode", False):
            outputs += self._guest_targets()
        return outputs


setup(cmdclass={"build_py": BuildPyWithGuest})
