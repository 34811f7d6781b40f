"""The last protocol-2 release of vmig (db2c624), checked out from this repository's own
history, to run against HEAD (tests/e2e/test_protocol_compat.py) and to read HEAD's
version-1 documents (tests/unit/test_state_downgrade.py).

`checkout(directory)` adds a detached git worktree of OLD_COMMIT and removes it on the
way out, whatever happened (``git worktree remove --force``, then ``git worktree
prune``). Its code runs in this interpreter (the .venv's, whose packages it needs) with
``PYTHONPATH`` at the worktree and the worktree as working directory, so ``import vmig``
finds the old package before HEAD's editable install (`checkout` checks that it does).
`build_guest()` builds the old guest there, as that release built it
(``python -m vmig.guest.build``); `vmm_prefix` runs ``python -m vmig vmm`` that way
(``env -C DIR PYTHONPATH=DIR``, a prefix for `spawn_vmm`).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

#: The last commit whose migration protocol is version 2 (its documents version 1).
OLD_COMMIT = "db2c624"
GIT_TIMEOUT_S = 60
BUILD_TIMEOUT_S = 300
TESTS_DIR = Path(__file__).resolve().parent


class OldReleaseError(RuntimeError):
    """The old release cannot be checked out or run here (a shallow clone, say)."""


def _git(*args: str, cwd: Path) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=GIT_TIMEOUT_S, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise OldReleaseError(f"git {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout.strip()


def repository_root() -> Path:
    """The top of the checkout these tests run from."""
    return Path(_git("rev-parse", "--show-toplevel", cwd=TESTS_DIR))


@dataclass
class OldRelease:
    """A worktree of OLD_COMMIT and how to run its code."""

    path: Path
    commit: str
    _guest_built: bool = field(default=False, repr=False)

    @property
    def env(self) -> dict[str, str]:
        """This process's environment, with the old code first on the import path."""
        return {**os.environ, "PYTHONPATH": str(self.path)}

    @property
    def vmm_prefix(self) -> tuple[str, ...]:
        """Prefix `python -m vmig vmm ...` with this to run the old VMM."""
        return ("env", "-C", str(self.path), f"PYTHONPATH={self.path}")

    def python(self, code: str, stdin: str = "", timeout: float = 60) -> str:
        """Run `code` in this interpreter against the old package; its stdout. A failure
        is an AssertionError with the old code's stderr."""
        proc = subprocess.run([sys.executable, "-c", code], cwd=self.path, env=self.env,
                              input=stdin, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, (f"{OLD_COMMIT}'s code failed (exit {proc.returncode}):"
                                      f"\n{proc.stderr}")
        return proc.stdout

    def imported_from(self) -> Path:
        """Where ``import vmig`` finds the package in the old environment."""
        return Path(self.python("import vmig; print(vmig.__file__)").strip())

    def build_guest(self) -> Path:
        """Build the old release's guest in its worktree (once); the image's path."""
        image = self.path / "vmig" / "guest" / "_build" / "guest.bin"
        if self._guest_built:
            return image
        proc = subprocess.run([sys.executable, "-m", "vmig.guest.build"], cwd=self.path,
                              env=self.env, capture_output=True, text=True,
                              timeout=BUILD_TIMEOUT_S, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise OldReleaseError(f"building {OLD_COMMIT}'s guest failed: "
                                  f"{proc.stderr.strip() or proc.stdout.strip()}")
        if not image.is_file():
            raise OldReleaseError(f"{OLD_COMMIT}'s guest build left no {image}")
        self._guest_built = True
        return image


@contextlib.contextmanager
def checkout(directory: Path, commit: str = OLD_COMMIT, root: Path | None = None
             ) -> Iterator[OldRelease]:
    """A worktree of `commit` (from the history of `root`, by default this checkout)
    under `directory`, removed on the way out.

    Raises OldReleaseError when the repository's history lacks `commit` (a shallow
    clone: ``git fetch --unshallow`` brings it) or its code is not what gets imported.
    """
    root = repository_root() if root is None else root
    try:
        full = _git("rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}", cwd=root)
    except OldReleaseError:
        shallow = _git("rev-parse", "--is-shallow-repository", cwd=root) == "true"
        hint = " (this clone is shallow: git fetch --unshallow)" if shallow else ""
        raise OldReleaseError(f"commit {commit}, the last protocol-2 release, is not in the "
                              f"history of {root}{hint}; the compatibility tests need "
                              "it") from None
    path = directory / f"vmig-{commit}"
    _git("worktree", "add", "--detach", str(path), full, cwd=root)
    try:
        release = OldRelease(path, full)
        package = release.imported_from()
        if not package.is_relative_to(path):
            raise OldReleaseError(f"with PYTHONPATH={path}, import vmig found {package}, "
                                  f"not {commit}'s code")
        yield release
    finally:
        with contextlib.suppress(OldReleaseError, subprocess.TimeoutExpired):
            _git("worktree", "remove", "--force", str(path), cwd=root)
        with contextlib.suppress(OldReleaseError, subprocess.TimeoutExpired):
            _git("worktree", "prune", cwd=root)
