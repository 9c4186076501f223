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
