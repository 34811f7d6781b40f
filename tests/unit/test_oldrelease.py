"""tests/oldrelease.py: a commit the history lacks fails with a message that says so,
and the old release's worktree is gone afterwards, whatever happened inside."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from oldrelease import OLD_COMMIT, OldReleaseError, checkout, repository_root


def _worktrees() -> str:
    return subprocess.run(["git", "worktree", "list", "--porcelain"], cwd=repository_root(),
                          capture_output=True, text=True, check=True).stdout


def test_a_commit_the_history_lacks_is_a_clear_failure(tmp_path: Path) -> None:
    with pytest.raises(OldReleaseError, match=r"commit 0{40}, the last protocol-2 release, "
                                              r"is not in the history of"), \
            checkout(tmp_path, commit="0" * 40):
        pass
    assert not list(tmp_path.iterdir())


def test_a_shallow_clone_says_so(tmp_path: Path) -> None:
    shallow = tmp_path / "shallow"
    subprocess.run(["git", "clone", "-q", "--depth=1", f"file://{repository_root()}",
                    str(shallow)], check=True, capture_output=True)
    with pytest.raises(OldReleaseError, match=f"commit {OLD_COMMIT}, .* \\(this clone is "
                                              "shallow: git fetch --unshallow"), \
            checkout(tmp_path / "old", root=shallow):
        pass


def test_the_worktree_is_removed_even_when_the_body_fails(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="inside"), checkout(tmp_path) as release:
        assert release.commit.startswith(OLD_COMMIT)
        assert (release.path / "vmig" / "memory.py").is_file()  # db2c624's layout
        assert str(release.path) in _worktrees()
        raise RuntimeError("inside")
    assert not release.path.exists()
    assert str(release.path) not in _worktrees()
