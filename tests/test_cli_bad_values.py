"""Bad values through the real `qinst` entry point: exit 2 (3 for the config file), one clear line, no traceback.

Nothing here reaches libvirt or the network: every value is refused while the command line is checked.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import RunQinst


def _one_clear_error(proc: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and "unexpected failure" not in proc.stderr
    for word in words:
        assert word in proc.stderr, proc.stderr


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A private HOME and config dir, an SSH key, and a libvirt URI that must never be reached."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(home / ".ssh/id_ed25519")], check=True)
    return {
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "QINST_CACHE_DIR": str(tmp_path / "cache"),
        "QINST_CONNECT": "test:///nonexistent-qinst-must-not-connect",
        "SSH_AUTH_SOCK": "",
    }


@pytest.mark.parametrize("out", ["/", ".", "", "..", "/nonexistent-qinst/seed.iso"])
def test_seed_out_without_a_file_name_or_folder(qinst: RunQinst, env: dict[str, str], out: str) -> None:
    _one_clear_error(qinst("seed", "--out", out, env=env), 2, "--out")


def test_seed_out_an_existing_folder(qinst: RunQinst, env: dict[str, str], tmp_path: Path) -> None:
    _one_clear_error(qinst("seed", "--out", str(tmp_path), env=env), 2, "--out", "is a folder")


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "0"])
@pytest.mark.parametrize("command", [["up", "debian-12"], ["start", "x"], ["smoke", "debian-12"]])
def test_timeout_must_be_finite_and_positive(
    qinst: RunQinst, env: dict[str, str], command: list[str], value: str
) -> None:
    _one_clear_error(qinst(*command, f"--timeout={value}", env=env), 2, "--timeout")


@pytest.mark.parametrize(
    "option", [["--cpus", "0"], ["--memory", "-1"], ["--memory", "0"], ["--disk", "0"], ["--ssh-port", "0"],
               ["--ssh-port", "70000"]]
)  # fmt: skip
def test_up_sizes_out_of_range(qinst: RunQinst, env: dict[str, str], option: list[str]) -> None:
    _one_clear_error(qinst("up", "debian-12", *option, env=env), 2, option[0])


def test_smoke_parallel_zero(qinst: RunQinst, env: dict[str, str]) -> None:
    _one_clear_error(qinst("smoke", "debian-12", "--parallel", "0", env=env), 2, "--parallel")


def test_smoke_junit_in_a_missing_folder_is_refused_before_booting(qinst: RunQinst, env: dict[str, str]) -> None:
    _one_clear_error(qinst("smoke", "debian-12", "--junit", "/nonexistent/r.xml", env=env), 2, "--junit")


@pytest.mark.parametrize("where", ["/proc/qinst-artifacts", "FILE/sub"])
def test_smoke_unwritable_artifacts_is_refused_before_booting(
    qinst: RunQinst, env: dict[str, str], tmp_path: Path, where: str
) -> None:
    (tmp_path / "FILE").write_text("a file, not a folder")
    path = where if where.startswith("/") else str(tmp_path / where)
    _one_clear_error(qinst("smoke", "debian-12", "--artifacts", path, env=env), 2, "--artifacts")


def _user_data_cases(tmp_path: Path) -> dict[str, str]:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    big = tmp_path / "big"
    with big.open("wb") as f:
        f.write(b"#cloud-config\n")
        f.truncate(16 * 1024 * 1024 + 1)
    newline = tmp_path / "user\ndata"
    newline.write_text("#cloud-config\n")
    (tmp_path / "folder").mkdir()
    return {
        "fifo": str(fifo),
        "folder": str(tmp_path / "folder"),
        "dev-zero": "/dev/zero",
        "big": str(big),
        "newline": str(newline),
    }


@pytest.mark.parametrize("case", ["fifo", "folder", "dev-zero", "big", "newline"])
@pytest.mark.parametrize("command", ["seed", "up"])
def test_user_data_that_is_not_a_small_regular_file(
    qinst: RunQinst, env: dict[str, str], tmp_path: Path, command: str, case: str
) -> None:
    path = _user_data_cases(tmp_path)[case]
    args = ["seed", "--out", str(tmp_path / "s.iso")] if command == "seed" else ["up", "debian-12"]
    proc = qinst(*args, "--user-data", path, env=env, timeout=30)  # a FIFO read would block: the timeout fails it
    _one_clear_error(proc, 2, "--user-data")
    assert len(proc.stderr.strip().splitlines()) <= 2  # the newline in the name is not printed raw
    assert not (tmp_path / "s.iso").exists()


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"hosts = 5\n", ["'hosts'", "config.toml"]),
        (b'[hosts.lab]\nuri = "qemu:///system"\n# \xff\xfe\n', ["not UTF-8", "config.toml"]),
        (b"[hosts.lab]\nuri = 5\n", ["hosts.lab", "config.toml"]),
    ],
)
def test_malformed_config_file(qinst: RunQinst, env: dict[str, str], content: bytes, words: list[str]) -> None:
    config = Path(env["XDG_CONFIG_HOME"]) / "qinst" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_bytes(content)
    _one_clear_error(qinst("images", env=env), 3, *words)


def test_config_file_that_is_a_fifo_does_not_hang(qinst: RunQinst, env: dict[str, str]) -> None:
    config = Path(env["XDG_CONFIG_HOME"]) / "qinst" / "config.toml"
    config.parent.mkdir(parents=True)
    os.mkfifo(config)
    _one_clear_error(qinst("images", env=env, timeout=30), 3, "config.toml", "not a regular file")
