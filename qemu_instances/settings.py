"""Resolved global settings (command-line options and their environment variables)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs

DEFAULT_ALEPH_API = "https://api2.aleph.im"
DEFAULT_IPFS_GATEWAY = "https://ipfs.aleph.im"


def default_connect_uri() -> str:
    return "qemu:///system" if os.geteuid() == 0 else "qemu:///session"


def default_cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir("qinst"))


def default_config_dir() -> Path:
    return Path(platformdirs.user_config_dir("qinst"))


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
