"""The config file (config.py) through the real `qinst` entry point: a malformed file, or one that is not a regular
file, is exit 3 naming the file, never a hang or a traceback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import RunQinst, one_clear_error


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"hosts = 5\n", ["'hosts'", "config.toml"]),
        (b'[hosts.lab]\nuri = "qemu:///system"\n# \xff\xfe\n', ["not UTF-8", "config.toml"]),
        (b"[hosts.lab]\nuri = 5\n", ["hosts.lab", "config.toml"]),
    ],
)
def test_malformed_config_file(qinst: RunQinst, offline_env: dict[str, str], content: bytes, words: list[str]) -> None:
    config = Path(offline_env["XDG_CONFIG_HOME"]) / "qinst" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_bytes(content)
    one_clear_error(qinst("images", env=offline_env), 3, *words)


def test_config_file_that_is_a_fifo_does_not_hang(qinst: RunQinst, offline_env: dict[str, str]) -> None:
    config = Path(offline_env["XDG_CONFIG_HOME"]) / "qinst" / "config.toml"
    config.parent.mkdir(parents=True)
    os.mkfifo(config)
    one_clear_error(qinst("images", env=offline_env, timeout=30), 3, "config.toml", "not a regular file")
