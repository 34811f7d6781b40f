"""Shared test machinery: the `kvm` marker's rules and `spawn_vmm`, a real VMM subprocess.

`kvm` tests (everything under tests/kvm and tests/e2e, plus any test marked
`kvm`) are skipped where /dev/kvm does not exist. Where it does exist, a
`kvm` test that ends up skipped counts as FAILED: on a machine that can run
them, a skip would only hide a broken test.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from oldrelease import OldRelease, OldReleaseError, checkout
from tlsfiles import TlsDirs, make_tls_dirs

from vmig.api.process import VmmProcess
from vmig.errors import VmmUnreachableError

KVM_DEVICE = "/dev/kvm"
TESTS_DIR = Path(__file__).resolve().parent
KVM_DIRS = ("kvm", "e2e")  # tests under tests/<these>/ get the kvm marker
SPAWN_TIMEOUT_S = 30.0


def kvm_present() -> bool:
    return os.path.exists(KVM_DEVICE)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark tests under tests/kvm and tests/e2e `kvm`; skip `kvm` tests without /dev/kvm."""
    present = kvm_present()
    for item in items:
        try:
            relative = Path(str(item.path)).resolve().relative_to(TESTS_DIR)
        except ValueError:
            relative = None
        if relative is not None and relative.parts and relative.parts[0] in KVM_DIRS:
            item.add_marker(pytest.mark.kvm)
        if item.get_closest_marker("kvm") is not None and not present:
            item.add_marker(pytest.mark.skip(reason=f"needs {KVM_DEVICE}"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A `kvm` test that is skipped on a machine with /dev/kvm is reported as failed."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if (report.skipped and not hasattr(report, "wasxfail")
            and item.get_closest_marker("kvm") is not None and kvm_present()):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = (f"kvm test was skipped although {KVM_DEVICE} exists "
                           f"(a skip here would hide a failure): {reason}")


SpawnVmm = Callable[..., VmmProcess]


@pytest.fixture
def spawn_vmm(tmp_path: Path) -> Iterator[SpawnVmm]:
    """`spawn_vmm(*args)`: start `python -m vmig vmm --api-socket <tmp>/api.sock ARGS...`.

    Returns once ping answers (fails the test with the VMM's stderr if it
    exits first or takes over 30 s). The result has `.client`, `.proc`,
    `.socket_path` and `.stderr_text()`. On teardown each VMM is asked to stop
    (vmm.shutdown, then SIGTERM, then SIGKILL) and its socket file must be gone.
    """
    started: list[VmmProcess] = []

    def spawn(*args: str, socket_path: str | None = None,
              ready_timeout: float = SPAWN_TIMEOUT_S, prefix: tuple[str, ...] = ()
              ) -> VmmProcess:
        index = len(started)
        name = "api.sock" if index == 0 else f"api-{index}.sock"
        path = socket_path or str(tmp_path / name)
        stderr_path = str(tmp_path / f"vmm-{index}.stderr")
        try:
            vmm = VmmProcess.start(path, args, stderr_path=stderr_path,
                                   ready_timeout=ready_timeout, prefix=prefix)
        except VmmUnreachableError as exc:
            text = Path(stderr_path).read_text(errors="replace") if os.path.exists(
                stderr_path) else ""
            pytest.fail(f"{exc}\n--- vmig vmm stderr ---\n{text}", pytrace=False)
        started.append(vmm)
        return vmm

    yield spawn

    problems = []
    for vmm in started:
        code = vmm.stop()
        if os.path.lexists(vmm.socket_path):
            problems.append(f"VMM pid {vmm.proc.pid} (exit status {code}) left its socket "
                            f"{vmm.socket_path} behind\n{vmm.stderr_text()}")
    assert not problems, "\n".join(problems)


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsDirs:
    """A CA with a destination (server) and a source (client) directory, made by openssl."""
    return make_tls_dirs(tmp_path_factory.mktemp("tls"), "trusted")


@pytest.fixture(scope="session")
def other_tls(tmp_path_factory: pytest.TempPathFactory) -> TlsDirs:
    """The same layout from another CA, which the `tls` directories do not trust."""
    return make_tls_dirs(tmp_path_factory.mktemp("tls"), "other")


@pytest.fixture(scope="session")
def old_release(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OldRelease]:
    """db2c624, the last protocol-2 release, in a git worktree of this repository's
    history (tests/oldrelease.py); removed at the end of the session. No such commit (a
    shallow clone) fails the test: a skip would hide that compatibility went untested."""
    try:
        with checkout(tmp_path_factory.mktemp("old-release")) as release:
            yield release
    except OldReleaseError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture
def restored_logging() -> Iterator[None]:
    """For a test that sets up logging (vmig.logs.configure, `vmig vmm` in-process): the
    root logger's handlers and level, and vmig.cli's level, as they were before."""
    root, ready = logging.getLogger(), logging.getLogger("vmig.cli")
    handlers, level, ready_level = list(root.handlers), root.level, ready.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    ready.setLevel(ready_level)
