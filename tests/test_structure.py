"""The package's layout holds: libvirt stays behind host.py, guest SSH command lines are built in ssh.py only,
imports run one way. And tests/ mirrors the package: a module's tests are found by its name."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "qemu_instances"
TESTS = Path(__file__).resolve().parent
TESTSUPPORT = TESTS.parent / "testsupport"
# Test modules about the whole package rather than one module or one command.
CROSS_CUTTING = {
    "properties",  # Hypothesis over every parser and validator
    "style",  # ruff and mypy
    "structure",  # this file
    "docs",  # the README and the MkDocs site
    "speed",  # what each command imports and spawns
    "signals",  # SIGTERM, SIGINT and SIGHUP through the real entry point
}
# Test modules not folded yet into the file of the module they test (named here): each is a debt, not a precedent.
UNFOLDED: dict[str, str] = {}


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


def _commands() -> set[str]:
    """The commands of the real `qinst`, as the user types them ("smoke merge" for a command of a group)."""
    from typer.main import get_command

    from qemu_instances.cli import app

    group = get_command(app)
    return set(group.commands)  # type: ignore[attr-defined]


def test_every_test_module_is_named_for_a_module_a_command_or_the_whole_package() -> None:
    """tests/test_<module>.py for a module of qemu_instances/, tests/test_cli_<command>.py for the scenarios of one
    command through the real entry point, or one of the few files about the whole package (CROSS_CUTTING)."""
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    commands = {"cli_" + name.replace("-", "_").replace(" ", "_") for name in _commands()}
    assert "cli_up" in commands and "up" not in modules  # the CLI was read, and `up` is not a module's name
    named = modules | commands | CROSS_CUTTING
    stray = sorted(
        p.name for p in TESTS.glob("test_*.py") if p.stem.removeprefix("test_") not in named and p.name not in UNFOLDED
    )
    assert set(UNFOLDED.values()) <= modules
    assert stray == [], "name each test module for the module or the command it tests (or see CROSS_CUTTING)"


def test_no_test_module_imports_another() -> None:
    """Shared fixtures and fakes live in conftest.py, the helper modules of tests/ and testsupport/: a test module
    imported by another would run its tests twice and tie the two together. Imports inside functions count."""
    files = sorted(TESTS.glob("*.py")) + sorted(TESTSUPPORT.glob("*.py"))
    assert len(files) > 10
    importers = sorted(f"{p.name} imports {name}" for p in files for name in _imports(p) if name.startswith("test_"))
    assert importers == []
