"""The pure core imports no I/O, threads or clocks (sans-IO, L0/L1 of the layering)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "vmig"
PURE_MODULES = [
    *sorted((ROOT / "proto").glob("*.py")),
    ROOT / "ranges.py",
    ROOT / "migration" / "policy.py",
]
BANNED = {
    "socket",
    "threading",
    "time",
    "os",
    "select",
    "selectors",
    "asyncio",
    "ctypes",
    "mmap",
    "signal",
    "subprocess",
    "fcntl",
}
ALLOWED_VMIG = ("vmig.errors", "vmig.units", "vmig.ranges", "vmig.proto")


def _imports(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


@pytest.mark.parametrize("path", PURE_MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_pure_module_imports(path):
    for name in _imports(path):
        top = name.split(".")[0]
        assert top not in BANNED, f"{path.name} imports {name}"
        if top == "vmig":
            assert name.startswith(ALLOWED_VMIG), f"{path.name} imports {name} (layering)"
