"""`qinst cp`: copy files between this machine and an instance with the system scp, like `scp`.

`NAME:PATH` names a path in instance NAME; anything else is a local path (write `./a:b` for a local file whose
name has a colon). scp gets the same options as `qinst ssh`: the recorded host keys checked strictly, the instance's
key, and the jump through a remote libvirt host.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from qemu_instances.errors import QinstError, UsageError
from qemu_instances.instances import Instance
from qemu_instances.proc import run
from qemu_instances.settings import Settings

_GUEST_RE = re.compile(r"(?P<name>[a-z0-9][a-z0-9-]{0,62}):(?P<path>.*)", re.DOTALL)


@dataclass(frozen=True)
class Operand:
    """One cp operand: a local path (instance None) or a path in an instance."""

    path: str
    instance: str | None = None

    @classmethod
    def parse(cls, text: str) -> Operand:
        match = _GUEST_RE.fullmatch(text)
        if match is None or text.startswith(("/", "./", "../")):
            return cls(text)
        return cls(match["path"], match["name"])


@dataclass(frozen=True)
class CopyPlan:
    """Which instance takes part, and in which direction."""

    instance: str
    sources: tuple[Operand, ...]
    dest: Operand

    @property
    def upload(self) -> bool:
        return self.dest.instance is not None


def plan(sources: Sequence[str], dest: str) -> CopyPlan:
    """Check the operands: exactly one side is one instance; local sources exist. UsageError otherwise."""
    if not sources:
        raise UsageError("cp needs a source and a destination", hint="qinst cp FILE NAME:PATH, or NAME:PATH FILE")
    srcs, dst = tuple(Operand.parse(s) for s in sources), Operand.parse(dest)
    guests = {o.instance for o in (*srcs, dst) if o.instance is not None}
    if not guests:
        raise UsageError("neither side names an instance", hint="write the instance's side as NAME:PATH")
    if len(guests) > 1:
        raise UsageError(
            f"cp copies between this machine and one instance, not between {' and '.join(sorted(guests))}",
            hint="copy to this machine first, then to the other instance",
        )
    if dst.instance is not None and any(s.instance is not None for s in srcs):
        raise UsageError("source and destination are both in the instance", hint="use 'qinst ssh NAME -- cp ...'")
    if dst.instance is None and any(s.instance is None for s in srcs):
        raise UsageError("sources are either all local or all in the instance")
    for src in srcs:
        if src.instance is None and not Path(src.path).exists():
            raise UsageError(f"no such local file or folder: {src.path}")
        if not src.path:
            raise UsageError("an empty path in the instance", hint="write NAME:PATH, e.g. web1:/etc/hostname")
    return CopyPlan(guests.pop(), srcs, dst)


def scp_argv(inst: Instance, settings: Settings, copy: CopyPlan, *, recursive: bool = False) -> list[str]:
    """The system scp's argv: `qinst ssh`'s options (ssh's -p becomes scp's -P), then the operands."""
    if shutil.which("scp") is None:
        raise QinstError("scp not found", hint="install openssh-client")
    from qemu_instances import ssh
    from qemu_instances.access import ssh_target

    target = ssh_target(inst, settings)
    destination = ssh.destination(target)
    argv = ["scp", *ssh.ssh_options(target), "-o", "BatchMode=yes", "-q"]  # the port is an option: -o Port=N
    if recursive:
        argv.append("-r")

    def operand(o: Operand) -> str:
        if o.instance is not None:
            return f"{destination}:{o.path}"
        # A local path is never read by scp as HOST:PATH (`Backup:copy.txt`) or as an option (`-oX`).
        return o.path if o.path.startswith("/") else f"./{o.path}"

    return [*argv, "--", *(operand(s) for s in copy.sources), operand(copy.dest)]


def copy(inst: Instance, settings: Settings, copy_plan: CopyPlan, *, recursive: bool = False) -> None:
    """Run scp; QinstError with scp's own words when it fails (a missing path in the guest, a folder without -r)."""
    argv = scp_argv(inst, settings, copy_plan, recursive=recursive)
    proc = run(argv, check=False)
    if proc.returncode != 0:
        lines = [line.removeprefix("scp: ") for line in proc.stderr.strip().splitlines() if line.strip()]
        why = "; ".join(lines[-3:]) or f"scp exited with status {proc.returncode}"
        hint = "copy a folder with -r" if "not a regular file" in why else None
        raise QinstError(f"cp failed: {why}", hint=hint)
