"""The layering in docs/architecture.md, checked on the import statements themselves."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import vmig

PACKAGE = Path(vmig.__file__).parent
ROOT = "vmig"  # the package itself (vmig/__init__.py), not everything below it

# Lowest first; a module may import from its own layer or any layer below.
LAYERS: list[tuple[str, ...]] = [
    ("vmig.errors", "vmig.units", "vmig.ranges", "vmig.config", "vmig.logs", "vmig.guest.layout",
     "vmig.guest.cmdline", "vmig.guest.status", "vmig.guest", "vmig.cpu_compat", ROOT),
    ("vmig.proto", "vmig.migration.policy", "vmig.migration.documents"),
    ("vmig.kvm", "vmig.memory", "vmig.uffd", "vmig.zeropages", "vmig.guest.build"),
    ("vmig.transport", "vmig.vmm"),
    ("vmig.migration",),
    ("vmig.api",),
    ("vmig.cli", "vmig.demo", "vmig.watch", "vmig.__main__"),
]
#: Siblings that must not know each other even where the layers would allow it.
FORBIDDEN = {
    "vmig.transport": ("vmig.kvm", "vmig.vmm", "vmig.memory", "vmig.migration"),
    "vmig.proto": ("vmig.kvm", "vmig.vmm", "vmig.memory", "vmig.transport", "vmig.config"),
    "vmig.kvm": ("vmig.memory", "vmig.vmm", "vmig.transport"),
    "vmig.uffd": ("vmig.kvm", "vmig.memory", "vmig.vmm", "vmig.transport"),
    "vmig.zeropages": ("vmig.kvm", "vmig.memory", "vmig.uffd", "vmig.vmm", "vmig.transport"),
}
#: The pure core does no I/O, keeps no threads or clocks of its own, and builds only
#: on the other pure pieces.
PURE = ("vmig.proto", "vmig.ranges", "vmig.migration.policy", "vmig.cpu_compat")
PURE_MAY_IMPORT = ("vmig.errors", "vmig.units", "vmig.ranges", "vmig.proto")
IMPURE_STDLIB = {"socket", "threading", "time", "os", "select", "selectors", "ctypes", "fcntl",
                 "mmap", "signal", "subprocess", "asyncio"}
#: What may only be loaded by the code that runs a VM.
VMM_SIDE = ("vmig.vmm", "vmig.kvm", "vmig.memory", "vmig.uffd")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, *, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _within(module: str, prefix: str) -> bool:
    return module == prefix or (prefix != ROOT and module.startswith(prefix + "."))


def _layer(module: str) -> int:
    best, best_len = -1, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if _within(module, prefix) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    if best < 0:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS and the docs")
    return best


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_an_unlisted_module_is_in_no_layer() -> None:
    with pytest.raises(AssertionError, match="in no layer"):
        _layer("vmig.newthing")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _module_name(p))
def test_imports_follow_the_layers(path: Path) -> None:
    module = _module_name(path)
    own = _layer(module)
    for name in _imports(path):
        if not name.startswith("vmig"):
            continue
        assert _layer(name) <= own, f"{module} (layer {own}) imports {name} ({_layer(name)})"
        for owner, banned in FORBIDDEN.items():
            if _within(module, owner):
                assert not any(_within(name, b) for b in banned), f"{module} imports {name}"


@pytest.mark.parametrize("path", [p for p in MODULES
                                  if any(_within(_module_name(p), m) for m in PURE)],
                         ids=lambda p: _module_name(p))
def test_pure_core_does_no_io(path: Path) -> None:
    names = _imports(path)
    stdlib = {name.split(".")[0] for name in names}
    assert not stdlib & IMPURE_STDLIB, f"{_module_name(path)} imports {stdlib & IMPURE_STDLIB}"
    for name in names:
        if name.split(".")[0] == "vmig":
            assert name.startswith(PURE_MAY_IMPORT), f"{_module_name(path)} imports {name}"


def test_client_depends_on_errors_stdlib_and_httpx_only() -> None:
    """`vmig remote` must stay light: the client never loads the engine or KVM code."""
    for name in _imports(PACKAGE / "api" / "client.py"):
        root = name.split(".")[0]
        assert name == "vmig.errors" or root in sys.stdlib_module_names or root == "httpx", name


def test_only_the_controller_imports_the_vmm() -> None:
    for path in sorted((PACKAGE / "api").glob("*.py")):
        uses_vmm = any(name.startswith(VMM_SIDE) for name in _imports(path))
        assert uses_vmm == (path.name == "controller.py"), path.name


def test_cli_loads_the_vmm_only_when_running_one() -> None:
    heavy = ("vmig.vmm", "vmig.kvm", "vmig.api.controller", "vmig.api.server", "uvicorn", "fastapi")
    for module in ("cli.py", "demo.py"):
        for name in _imports(PACKAGE / module, top_level_only=True):
            assert not name.startswith(heavy), f"{module} imports {name} at the top"
