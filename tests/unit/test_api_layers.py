"""Import rules of the control plane (docs: style-anchors D2), checked on the source's AST.

The client must stay light (errors, stdlib, httpx), and only the controller
may reach into the VMM, so that `vmig remote` never loads KVM code.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import vmig

PACKAGE = Path(vmig.__file__).resolve().parent
STDLIB = sys.stdlib_module_names


def imports(path: Path, *, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_client_depends_on_errors_stdlib_and_httpx_only() -> None:
    for name in imports(PACKAGE / "api" / "client.py"):
        root = name.split(".")[0]
        assert name == "vmig.errors" or root in STDLIB or root == "httpx", name


def test_only_the_controller_imports_the_vmm() -> None:
    for path in sorted((PACKAGE / "api").glob("*.py")):
        uses_vmm = any(name.startswith(("vmig.vmm", "vmig.kvm", "vmig.memory"))
                       for name in imports(path))
        assert uses_vmm == (path.name == "controller.py"), path.name


def test_cli_loads_the_vmm_only_when_running_one() -> None:
    heavy = ("vmig.vmm", "vmig.kvm", "vmig.api.controller", "vmig.api.server", "uvicorn",
             "fastapi")
    for module in ("cli.py", "demo.py"):
        for name in imports(PACKAGE / module, top_level_only=True):
            assert not name.startswith(heavy), f"{module} imports {name} at the top"
