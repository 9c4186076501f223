"""Resolved global settings (command-line options and their environment variables)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from qemu_instances.errors import ConfigError

DEFAULT_ALEPH_API = "https://api2.aleph.im"
DEFAULT_IPFS_GATEWAY = "https://ipfs.aleph.im"


def default_connect_uri() -> str:
    return "qemu:///system" if os.geteuid() == 0 else "qemu:///session"


def default_cache_dir() -> Path:
    return _xdg_dir("XDG_CACHE_HOME", ".cache")


def default_config_dir() -> Path:
    return _xdg_dir("XDG_CONFIG_HOME", ".config")


def _xdg_dir(variable: str, fallback: str) -> Path:
    """$variable/qinst when the variable holds an absolute path, else ~/fallback/qinst: the XDG base directories as
    platformdirs resolves them on Linux (root included: it has no site directories by default; a relative HOME
    counts as unset), without its import (~0.004 s of every command)."""
    path = os.environ.get(variable, "")
    if os.path.isabs(path):
        return Path(path, "qinst")
    home = os.environ.get("HOME", "")
    if not os.path.isabs(home):
        import pwd

        try:
            home = pwd.getpwuid(os.getuid()).pw_dir
        except KeyError:
            home = ""
        if not os.path.isabs(home):
            raise ConfigError(f"no home directory for ~/{fallback}/qinst", hint=f"set HOME or {variable}")
    return Path(home, fallback, "qinst")


@dataclass(frozen=True)
class Settings:
    connect: str = field(default_factory=default_connect_uri)
    cache_dir: Path = field(default_factory=default_cache_dir)
    config_dir: Path = field(default_factory=default_config_dir)
    catalogs: tuple[Path, ...] = ()
    mirror: str | None = None
    aleph_api: str = DEFAULT_ALEPH_API
    ipfs_gateway: str = DEFAULT_IPFS_GATEWAY
    hosts: dict[str, str] = field(default_factory=dict)  # [hosts.NAME] uri = ... from the config file
    host: str | None = None  # the host name --host chose ("auto": placement by `up`)


def resolve(
    *,
    connect: str | None = None,
    cache_dir: Path | None = None,
    catalogs: tuple[Path, ...] | list[Path] = (),
    mirror: str | None = None,
    aleph_api: str = DEFAULT_ALEPH_API,
    ipfs_gateway: str = DEFAULT_IPFS_GATEWAY,
    host: str | None = None,
) -> Settings:
    """The settings as `qinst` resolves its global options (each also read from its QINST_* variable by the CLI):
    --host NAME (a [hosts] entry of the config file) wins over --connect; "auto" is placement, for `up` only."""
    from qemu_instances.config import host_uri, load_hosts
    from qemu_instances.errors import UsageError

    if mirror and not mirror.startswith(("http://", "https://")):
        raise UsageError(f"--mirror {mirror!r}: expected an http(s) URL")
    config_dir = default_config_dir()
    hosts = load_hosts(config_dir)
    if host and host != "auto":
        connect = host_uri(hosts, host, config_dir)
    return Settings(
        connect=connect or default_connect_uri(),
        cache_dir=(cache_dir or default_cache_dir()).expanduser().absolute(),
        config_dir=config_dir,
        catalogs=tuple(catalogs),
        mirror=mirror,
        aleph_api=aleph_api,
        ipfs_gateway=ipfs_gateway,
        hosts=hosts,
        host=host,
    )
