"""Reaching an instance: its SSH target (the recorded address, user, host keys, key file and hop) and its console.

The SSH command lines themselves are built in ssh.py; this module only turns an Instance into ssh.py's values.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from qemu_instances import ssh
from qemu_instances.errors import UsageError
from qemu_instances.instances import Instance
from qemu_instances.settings import Settings
from qemu_instances.ssh import KEY_LINE, SshResult

__all__ = ["SshResult", "known_hosts_file", "ssh_argv", "ssh_run", "ssh_target"]


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
    return ssh.write_known_hosts(settings.cache_dir / "known_hosts" / inst.name, meta.ssh_host, meta.ssh_port, keys)


def ssh_target(inst: Instance, settings: Settings) -> ssh.SshTarget:
    """The running instance's SSH target; its metadata was validated when it was read."""
    inst.require_valid()
    if inst.state != "running":
        raise UsageError(f"instance {inst.name!r} is {inst.state}", hint=f"start it: qinst start {inst.name}")
    meta = inst.metadata
    return ssh.SshTarget(
        host=meta.ssh_host,
        port=meta.ssh_port,
        user=meta.user,
        known_hosts=known_hosts_file(inst, settings),
        key_file=meta.private_key,
        hop=ssh.SshHop.from_uri(settings.connect),
    )


def ssh_argv(
    inst: Instance, settings: Settings, command: Sequence[str] = (), *, forwards: Sequence[str] = ()
) -> list[str]:
    """The system ssh's argv for the instance: its user, port, key and known_hosts; host keys checked strictly.
    `forwards` are ssh -L specifications (qinst forward)."""
    ssh.require_ssh()
    return ssh.ssh_argv(ssh_target(inst, settings), command, forwards=forwards)


def ssh_run(inst: Instance, settings: Settings, command: Sequence[str], timeout: float = 60.0) -> SshResult:
    """Run a command in the instance over SSH (batch mode, host key checked); never raises for its exit status."""
    return ssh.run(ssh_target(inst, settings), command, timeout)
