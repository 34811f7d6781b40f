"""Packaging: a wheel built from a fresh clone carries the guest and runs without gcc.

The wheel is built once per module from a `git clone` of this repository's HEAD
(so this tests committed code), then installed into clean venvs with the
dependencies pinned by requirements.lock: one venv of the Python running the
tests, where `vmig demo` must pass with no compiler on PATH, and one of
python3.12 where that exists, where vmig must import and `vmig --help` run.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LOCK = "requirements.lock"
#: What must not be on the PATH an installed vmig runs with.
BUILD_TOOLS = ("gcc", "cc", "as", "ld", "objcopy")
#: The few system tools that PATH offers besides the venv's bin.
SYSTEM_TOOLS = ("sh", "env", "cat", "id", "uname")
GUEST_FILES = ("guest.bin", "guest.stamp")
DEMO_TIMEOUT_S = 180
STEP_TIMEOUT_S = 300

pytestmark = pytest.mark.timeout(600)


def _run(argv: list[str | Path], *, timeout: float = STEP_TIMEOUT_S,
         env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    """Run a command; return its stdout, or fail the test with its whole output."""
    argv = [str(arg) for arg in argv]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=cwd, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(argv)} exited {proc.returncode}\n"
                    f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc.stdout


def _clean_env(path: str | None = None) -> dict[str, str]:
    """The environment without anything that would point Python back at the checkout."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    if path is not None:
        env["PATH"] = path
    return env


def _make_venv(python: str | Path, venv: Path, wheel: Path, lock: Path) -> Path:
    """A clean venv of `python` with the wheel installed (dependencies pinned by the lock)."""
    _run([python, "-m", "venv", venv], env=_clean_env())
    _run([venv / "bin" / "python", "-m", "pip", "install", "--disable-pip-version-check",
          "-c", lock, wheel], env=_clean_env())
    return venv


def _bare_path(venv: Path, tools: Path) -> str:
    """PATH with only the venv's bin and a folder of a few system tools: no compiler."""
    tools.mkdir(exist_ok=True)
    for name in SYSTEM_TOOLS:
        found = shutil.which(name)
        if found and not (tools / name).exists():
            (tools / name).symlink_to(found)
    path = f"{venv / 'bin'}{os.pathsep}{tools}"
    for tool in BUILD_TOOLS:
        assert shutil.which(tool, path=path) is None, f"{tool} is on the test PATH {path}"
    return path


def _python312() -> str | None:
    """A working python3.12 on this machine, or None."""
    candidates = [shutil.which("python3.12"),
                  *sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3.12")))]
    for candidate in candidates:
        if candidate and subprocess.run(
                [candidate, "-c", "import sys, venv; sys.exit(sys.version_info[:2] != (3, 12))"],
                capture_output=True, timeout=30).returncode == 0:
            return candidate
    return None


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(wheel, lock file) built from a fresh clone of this repository's HEAD."""
    tmp = tmp_path_factory.mktemp("packaging")
    clone = tmp / "clone"
    _run(["git", "clone", "--quiet", REPO, clone])
    assert not (clone / "vmig" / "guest" / "_build").exists()
    started = time.monotonic()
    _run([sys.executable, "-m", "pip", "wheel", "--disable-pip-version-check", "--no-deps",
          "-w", tmp / "dist", clone], env=_clean_env())
    wheels = sorted((tmp / "dist").glob("vmig-*.whl"))
    assert len(wheels) == 1, wheels
    # The image came from the build hook, not from a tree that already had one.
    assert not (clone / "vmig" / "guest" / "_build").exists()
    print(f"wheel built in {time.monotonic() - started:.1f} s: {wheels[0].name}")
    return wheels[0], clone / LOCK


@pytest.fixture(scope="module")
def installed(built: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clean venv (no system site-packages) with the wheel installed."""
    wheel, lock = built
    started = time.monotonic()
    venv = _make_venv(sys.executable, tmp_path_factory.mktemp("venv") / "venv", wheel, lock)
    print(f"venv with the wheel installed in {time.monotonic() - started:.1f} s")
    return venv


def _package_dir(venv: Path, env: dict[str, str], cwd: Path) -> Path:
    out = _run([venv / "bin" / "python", "-c", "import vmig; print(vmig.__file__)"],
               env=env, cwd=cwd)
    package = Path(out.strip()).parent
    assert package.is_relative_to(venv), f"vmig imported from {package}, not the venv"
    return package


def test_the_wheel_carries_the_guest_image_and_its_stamp(built: tuple[Path, Path]) -> None:
    wheel, _ = built
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        image = archive.read("vmig/guest/_build/guest.bin")
    for name in GUEST_FILES:
        assert f"vmig/guest/_build/{name}" in names
    assert "vmig/guest/src/guest.c" in names
    assert not any(name.endswith((".elf", ".o", "layout.h")) for name in names)
    assert 0 < len(image) < 1 << 20


def test_installed_metadata(installed: Path, tmp_path: Path) -> None:
    script = (
        "import importlib.metadata as m, json\n"
        "dist = m.distribution('vmig')\n"
        "md = dist.metadata\n"
        "print(json.dumps({'requires_python': md['Requires-Python'],\n"
        "    'requires_dist': md.get_all('Requires-Dist') or [],\n"
        "    'license': md['License-Expression'] or md['License'],\n"
        "    'license_files': [f.name for f in dist.files or [] if 'LICENSE' in f.name],\n"
        "    'author': md['Author']}))\n"
    )
    meta = json.loads(_run([installed / "bin" / "python", "-c", script],
                           env=_clean_env(), cwd=tmp_path))
    assert meta["requires_python"] == ">=3.11"
    assert meta["license"] == "Apache-2.0"
    assert meta["license_files"], "no LICENSE file in the installed distribution"
    assert meta["author"] == "vmig developers"
    requires = meta["requires_dist"]
    pinned = [req for req in requires if "==" in req.split(";")[0]]  # not `extra == "dev"`
    assert requires and not pinned, requires
    names = {re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].lower().replace("_", "-")
             for req in requires if "extra ==" not in req}
    assert {"fastapi", "numpy", "zstandard", "prometheus-client"} <= names, names


@pytest.mark.kvm
def test_installed_wheel_runs_the_demo_without_a_compiler(installed: Path,
                                                          tmp_path: Path) -> None:
    env = _clean_env(_bare_path(installed, tmp_path / "tools"))
    package = _package_dir(installed, env, tmp_path)
    build_dir = package / "guest" / "_build"
    image = build_dir / "guest.bin"
    before = sorted(path.name for path in build_dir.iterdir())
    assert before == sorted(GUEST_FILES)
    image_stat = image.stat()
    # Sources that look newer than the image (as any install or copy may leave
    # them) must not make an installed vmig try to rebuild it.
    future = time.time() + 3600
    for path in [*(package / "guest" / "src").iterdir(), package / "guest" / "layout.py",
                 package / "guest" / "build.py"]:
        os.utime(path, (future, future))

    out = _run([installed / "bin" / "python", "-m", "vmig.guest.build"], env=env, cwd=tmp_path)
    assert out.startswith(str(image)), out

    started = time.monotonic()
    out = _run([installed / "bin" / "vmig", "demo"], env=env, cwd=tmp_path,
               timeout=DEMO_TIMEOUT_S)
    print(f"vmig demo from the wheel took {time.monotonic() - started:.1f} s")
    assert re.search(r"all good\W+yes", out), out

    assert sorted(path.name for path in build_dir.iterdir()) == before
    assert image.stat().st_mtime_ns == image_stat.st_mtime_ns
    assert image.stat().st_ino == image_stat.st_ino


def test_wheel_imports_and_runs_under_python312(built: tuple[Path, Path],
                                                tmp_path: Path) -> None:
    python = _python312()
    if python is None:
        pytest.skip("no python3.12 on this machine")
    wheel, lock = built
    venv = _make_venv(python, tmp_path / "venv312", wheel, lock)
    env = _clean_env(_bare_path(venv, tmp_path / "tools"))
    version = _run([venv / "bin" / "python", "-c", "import sys; print(sys.version_info[:2])"],
                   env=env, cwd=tmp_path)
    assert version.strip() == "(3, 12)"
    _package_dir(venv, env, tmp_path)
    out = _run([venv / "bin" / "python", "-c",
                "import vmig.cli, vmig.api.app\n"
                "from vmig.guest.build import guest_image\n"
                "print(len(guest_image()))"], env=env, cwd=tmp_path)
    assert int(out) > 0
    out = _run([venv / "bin" / "vmig", "--help"], env=env, cwd=tmp_path)
    assert "Usage:" in out and "demo" in out, out


def test_stale_follows_the_stamp_not_mtimes(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from vmig.guest import build

    src = tmp_path / "src"
    src.mkdir()
    sources = tuple(src / path.name for path in build.SOURCES)
    for path in sources:
        path.write_text(f"/* {path.name} */\n")
    image, stamp = tmp_path / "guest.bin", tmp_path / "guest.stamp"
    monkeypatch.setattr(build, "SOURCES", sources)
    monkeypatch.setattr(build, "INPUTS", sources)
    monkeypatch.setattr(build, "IMAGE_PATH", image)
    monkeypatch.setattr(build, "STAMP_PATH", stamp)

    def age(path: Path, seconds: float) -> None:
        when = time.time() + seconds
        os.utime(path, (when, when))

    assert build._stale()  # no image
    image.write_bytes(b"\x90" * 16)
    age(image, -100)
    assert build._stale()  # no stamp: a newer source counts
    age(image, +100)
    assert not build._stale()  # no stamp, image newer than every source
    stamp.write_text(build.inputs_digest() + "\n")
    age(image, -100)
    assert not build._stale()  # the stamp matches: mtimes do not count
    sources[1].write_text("/* edited */\n")
    age(image, +100)
    assert build._stale()  # content changed, whatever the mtimes
    for path in sources:
        path.unlink()
    assert not build._stale()  # a packaged image without sources beside it
