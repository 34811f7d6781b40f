"""The layering in docs/architecture.md, checked on the import statements themselves."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import vmig

PACKAGE = Path(vmig.__file__).parent

# Lowest first; a module may import from its own layer or any layer below.
LAYERS: list[tuple[str, ...]] = [
    ("vmig.errors", "vmig.units", "vmig.ranges", "vmig.config", "vmig.guest.layout",
     "vmig.guest", "vmig"),
    ("vmig.proto", "vmig.migration.policy"),
    ("vmig.kvm", "vmig.memory", "vmig.guest.build"),
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
    "vmig.api.client": ("vmig.vmm", "vmig.migration", "vmig.kvm", "vmig.transport"),
}
#: The pure core does no I/O and keeps no threads or clocks of its own.
PURE = ("vmig.proto", "vmig.ranges", "vmig.migration.policy")
IMPURE_STDLIB = {"socket", "threading", "time", "os", "select", "selectors", "ctypes", "fcntl",
                 "mmap", "subprocess", "asyncio"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _layer(module: str) -> int:
    best, best_len = -1, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    if best < 0:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS and the docs")
    return best


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


MODULES = sorted(PACKAGE.rglob("*.py"))


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
    stdlib = {name.split(".")[0] for name in _imports(path)}
    assert not stdlib & IMPURE_STDLIB, f"{_module_name(path)} imports {stdlib & IMPURE_STDLIB}"
