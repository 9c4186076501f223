"""qinst's config file (TOML in the platform config dir): the table of libvirt hosts.

[hosts.lab1]
uri = "qemu+ssh://root@lab1.example/system"
"""

from __future__ import annotations

import re
from pathlib import Path

from qemu_instances.errors import ConfigError, UsageError
from qemu_instances.files import MAX_CONFIG, decode_text, parse_toml, read_bounded

CONFIG_NAME = "config.toml"
_HOST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def load_hosts(config_dir: Path) -> dict[str, str]:
    """Host name -> libvirt URI, from config_dir/config.toml (empty when there is no file)."""
    path = config_dir / CONFIG_NAME
    try:
        data = read_bounded(path, "config file", MAX_CONFIG, error=ConfigError)
    except FileNotFoundError:
        return {}
    # tomllib is imported only when there is a file: ~0.002 s of every command
    return _hosts(path, parse_toml(decode_text(data, str(path), ConfigError), str(path), ConfigError))


def _hosts(path: Path, data: dict[str, object]) -> dict[str, str]:
    unknown = sorted(set(data) - {"hosts"})
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r} (hosts go under [hosts.NAME])")
    table = data.get("hosts", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: key 'hosts' must be a table of [hosts.NAME] entries, not {type(table).__name__}")
    hosts: dict[str, str] = {}
    for name, entry in table.items():
        if not _HOST_NAME.fullmatch(name) or name == "auto":
            raise ConfigError(f"{path}: invalid host name {name!r} in key 'hosts'")
        if not isinstance(entry, dict) or set(entry) != {"uri"} or not isinstance(entry["uri"], str):
            raise ConfigError(f'{path}: key hosts.{name} needs exactly one key, uri = "qemu+ssh://..."')
        hosts[name] = entry["uri"]
    return hosts


def host_uri(hosts: dict[str, str], name: str, config_dir: Path) -> str:
    if name not in hosts:
        known = ", ".join(sorted(hosts)) or f"none (add [hosts.NAME] uri = ... to {config_dir / CONFIG_NAME})"
        raise UsageError(f"unknown host {name!r}", hint=f"known hosts: {known}")
    return hosts[name]
