"""`qinst ssh-config`: OpenSSH `Host` blocks for instances, so that ssh -F, scp, rsync, git and editors use the
checked connection of `qinst ssh` (qinst's known_hosts of the verified keys, strict host-key checking, no agent).

The options themselves come from ssh.py (ssh.config_lines: the same list `qinst ssh` passes with -o); this module
only picks the instances and turns each into its SSH target.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from qemu_instances import ssh
from qemu_instances.access import known_hosts_file, ssh_target
from qemu_instances.errors import UsageError
from qemu_instances.instances import Instance
from qemu_instances.settings import Settings

HEADER = (
    "# Written by `qinst ssh-config`: host keys are checked against the keys each guest printed on its console.\n"
    "# Use with `ssh -F FILE NAME`, or `Include FILE` at the top of ~/.ssh/config (before any `Host *`).\n"
)


def target(inst: Instance, settings: Settings) -> ssh.SshTarget:
    """The instance's SSH target whatever its state (Ansible lists stopped instances too). Without a recorded host
    key its known_hosts is /dev/null: with strict checking, every key is refused, never accepted."""
    inst.require_valid()
    meta = inst.metadata
    if not meta.ssh_host:
        raise UsageError(f"{inst.name} has no known address (network {meta.network})")
    try:
        known = known_hosts_file(inst, settings)
    except UsageError:
        known = Path("/dev/null")
    return ssh.SshTarget(
        host=meta.ssh_host,
        port=meta.ssh_port,
        user=meta.user,
        known_hosts=known,
        key_file=meta.private_key,
        hop=ssh.SshHop.from_uri(settings.connect),
    )


def block(inst: Instance, settings: Settings) -> str:
    """One running instance's `Host NAME` block (UsageError when it is not running or has no verified key)."""
    return "\n".join(ssh.config_lines(inst.name, ssh_target(inst, settings))) + "\n"


def render(instances: Sequence[Instance], settings: Settings, *, named: bool) -> str:
    """The config text for `instances`. With `named` (the user named them) each must be usable, else UsageError;
    otherwise the running, valid instances with a verified host key and an address are written, the rest left out."""
    blocks = []
    for inst in instances:
        if not named and (
            inst.invalid or inst.state != "running" or not inst.metadata.ssh_host or not inst.metadata.host_keys
        ):
            continue
        blocks.append(block(inst, settings))
    return HEADER + "".join(f"\n{b}" for b in blocks)
