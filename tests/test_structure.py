"""The package's layout holds: libvirt stays behind host.py, guest SSH command lines are built in ssh.py only."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "qemu_instances"


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_only_host_imports_libvirt() -> None:
    # Nothing is excluded: smoke.py did not import libvirt at this branch's base either.
    importers = sorted(p.name for p in PACKAGE.glob("*.py") if {"libvirt", "libvirt_qemu"} & _imports(p))
    assert importers == ["host.py"]


def test_ssh_options_are_built_in_ssh_py_only() -> None:
    # The strict options are spelled in one place; every other module asks ssh.py for them.
    spelled = sorted(p.name for p in PACKAGE.glob("*.py") if "StrictHostKeyChecking=" in p.read_text())
    assert spelled == ["ssh.py"]


def test_ssh_py_takes_plain_values() -> None:
    # ssh.py must not depend on instances (host → ssh → instances → host would be a cycle).
    assert not {"instances", "host", "launch", "access"} & {
        n.module.rsplit(".", 1)[-1]
        for n in ast.walk(ast.parse((PACKAGE / "ssh.py").read_text()))
        if isinstance(n, ast.ImportFrom) and n.module
    }


def _internal_imports(path: Path) -> set[str]:
    """Every qemu_instances module `path` imports, anywhere in it: at the top, inside functions, under TYPE_CHECKING."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qemu_instances"):
            base = node.module.split(".")
            if len(base) > 1:
                found.add(base[1])
            else:  # from qemu_instances import x, y
                found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("qemu_instances.")}
    return {name for name in found if (PACKAGE / f"{name}.py").exists()} - {path.stem}


def _cycles() -> list[list[str]]:
    graph = {p.stem: _internal_imports(p) for p in PACKAGE.glob("*.py")}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def test_imports_run_one_way() -> None:
    """No import cycle, counting lazy (function-level) and TYPE_CHECKING imports: a cycle hidden by a late import is
    still two modules that cannot be read, changed or tested apart."""
    assert _cycles() == []
