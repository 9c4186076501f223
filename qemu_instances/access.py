"""Reaching an instance: the `ssh` command line with a checked host key, and the recorded console."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from qemu_instances.errors import QinstError, UsageError
from qemu_instances.host import Host
from qemu_instances.instances import Instance
from qemu_instances.proc import run
from qemu_instances.remote import SshHop
from qemu_instances.settings import Settings
from qemu_instances.wait import KEY_LINE, known_hosts_line


def known_hosts_file(inst: Instance, settings: Settings) -> Path:
    """Write the instance's known_hosts (from the host keys recorded at `up`) and return its path."""
    meta = inst.metadata
    keys = KEY_LINE.findall(meta.host_keys)
    if not keys:
        raise UsageError(
            f"qinst has no verified host key for {inst.name}",
            hint="it is recorded when 'qinst up' sees the guest ready; wait for that, or see 'qinst logs'",
        )
    if not meta.ssh_host:
        raise UsageError(f"{inst.name} has no known address (network {meta.network})")
    directory = settings.cache_dir / "known_hosts"
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / inst.name
    tmp = path.with_name(f".{inst.name}.tmp")
    tmp.write_text(known_hosts_line(meta.ssh_host, meta.ssh_port, keys))
    os.replace(tmp, path)
    return path


def ssh_argv(inst: Instance, settings: Settings, command: Sequence[str] = ()) -> list[str]:
    """The system ssh's argv for the instance: its user, port, key and known_hosts; host keys checked strictly."""
    if shutil.which("ssh") is None:
        raise QinstError("ssh not found", hint="install openssh-client")
    if inst.state != "running":
        raise UsageError(f"instance {inst.name!r} is {inst.state}", hint=f"start it: qinst start {inst.name}")
    meta = inst.metadata
    argv = [
        "ssh",
        "-o", f"UserKnownHostsFile={known_hosts_file(inst, settings)}",
        "-o", "StrictHostKeyChecking=yes",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "LogLevel=ERROR",
        "-p", str(meta.ssh_port),
    ]  # fmt: skip
    hop = SshHop.from_uri(settings.connect)
    if hop is not None:
        # The guest's address (a forward on the host's loopback, or a NAT address) is reached through the host.
        argv += hop.ssh_options()
    if meta.private_key and Path(meta.private_key).exists():
        argv += ["-i", meta.private_key, "-o", "IdentitiesOnly=yes"]
    argv.append(f"{meta.user}@{meta.ssh_host}")
    if command:
        argv += ["--", *command]
    return argv


def console_text(host: Host, inst: Instance) -> str:
    """The serial console as recorded by virtlogd: a local file, or a volume of the pool on a remote host."""
    path = Path(inst.metadata.console_log)
    if not host.is_local:
        return host.download_volume(host.pool(create=False), path.name).decode("utf-8", "replace")
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    except OSError as exc:
        raise QinstError(f"cannot read {path}: {exc.strerror}") from exc


def ssh_run(inst: Instance, settings: Settings, command: Sequence[str], timeout: float = 60.0) -> SshResult:
    """Run a command in the instance over SSH (batch mode, host key checked); never raises for its exit status."""
    argv = ssh_argv(inst, settings, command)
    argv[1:1] = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]
    started = time.monotonic()
    try:
        proc = run(argv, timeout=timeout, check=False)
    except QinstError as exc:  # timed out
        return SshResult(255, "", exc.message, time.monotonic() - started)
    return SshResult(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started)


@dataclass(frozen=True)
class SshResult:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0
