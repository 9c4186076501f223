"""`qinst inventory`: Ansible's dynamic-inventory script protocol (`--list`, `--host NAME`) over qinst's instances.

Every instance is in the group `qinst` and in one group per image, libvirt host and state (`image_debian_12`,
`host_local`, `state_running`). Its host variables carry the address, port, user and key, and an ssh argument line
built from ssh.py's one option list (`-F /dev/null`, strict host-key checking against qinst's known_hosts of the
verified keys, the ProxyCommand through a remote libvirt host), so Ansible checks host keys as `qinst ssh` does.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from qemu_instances import ssh
from qemu_instances.errors import UsageError
from qemu_instances.instances import Instance
from qemu_instances.settings import Settings
from qemu_instances.sshconfig import target

ALL = "qinst"
_NOT_GROUP = re.compile(r"[^A-Za-z0-9_]")


def group_name(prefix: str, value: str) -> str:
    """An Ansible-safe group name: letters, digits and underscores, never starting with a digit."""
    return f"{prefix}_{_NOT_GROUP.sub('_', value)}"[:200]


def host_label(settings: Settings) -> str:
    """The libvirt host's name for groups: the configured host name (--host), else the URI's host, else local."""
    return settings.host or urlsplit(settings.connect).hostname or "local"


@dataclass(frozen=True)
class Inventory:
    groups: dict[str, list[str]]  # group -> instance names (ALL's children are the other groups)
    hostvars: dict[str, dict[str, Any]]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (instance, why it is not in the inventory)

    def to_json(self) -> dict[str, Any]:
        """`--list`: the groups, each with its hosts, and every host's variables under _meta.hostvars."""
        data: dict[str, Any] = {
            ALL: {"hosts": sorted(self.hostvars), "children": sorted(g for g in self.groups if g != ALL)},
        }
        for name, hosts in sorted(self.groups.items()):
            if name != ALL:
                data[name] = {"hosts": sorted(hosts)}
        data["_meta"] = {"hostvars": self.hostvars}
        return data

    def host(self, name: str) -> dict[str, Any]:
        """`--host NAME`: its variables ({} for a name the inventory does not hold, as the protocol has it)."""
        return self.hostvars.get(name, {})


def hostvars(inst: Instance, settings: Settings) -> dict[str, Any]:
    """Ansible's connection variables for the instance, host-key checking on whatever ansible.cfg says."""
    tgt = target(inst, settings)
    meta = inst.metadata
    found: dict[str, Any] = {
        "ansible_host": tgt.host,
        "ansible_port": tgt.port,
        "ansible_user": tgt.user,
        # Ansible turns strict host-key checking off before these options when host_key_checking is off (and the
        # first value wins in ssh): a host variable beats ansible.cfg and ANSIBLE_HOST_KEY_CHECKING.
        "ansible_ssh_host_key_checking": True,
        "ansible_ssh_common_args": shlex.join(ssh.ssh_options(tgt)),
        "qinst_image": meta.image,
        "qinst_state": inst.state,
        "qinst_arch": str(meta.arch),
        "qinst_libvirt_host": host_label(settings),
        "qinst_network": str(meta.network),
    }
    if tgt.key_file and Path(tgt.key_file).exists():
        found["ansible_ssh_private_key_file"] = tgt.key_file
    return found


def build(instances: Sequence[Instance], settings: Settings) -> Inventory:
    """The inventory of `instances` (those of one libvirt host). An invalid record, or an instance without an
    address, is left out with the reason (Ansible would otherwise reach its name with the user's own ssh setup)."""
    groups: dict[str, list[str]] = {ALL: []}
    variables: dict[str, dict[str, Any]] = {}
    skipped: list[tuple[str, str]] = []
    host_group = group_name("host", host_label(settings))
    for inst in instances:
        try:
            variables[inst.name] = hostvars(inst, settings)
        except UsageError as exc:
            skipped.append((inst.name, exc.message))
            continue
        groups[ALL].append(inst.name)
        for group in (group_name("image", inst.metadata.image), host_group, group_name("state", inst.state)):
            groups.setdefault(group, []).append(inst.name)
    return Inventory(groups, variables, skipped)
