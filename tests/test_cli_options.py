"""The options several commands share (cli_options.py), through the real `qinst` entry point: every duration option
refuses what is not a positive number of seconds, and --user-data takes only a small regular file. Exit 2, one clear
line, no traceback; nothing reaches libvirt or the network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import RunQinst, one_clear_error

from testsupport.testdriver import TEST_URI, run_qinst


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "0"])
@pytest.mark.parametrize("command", [["up", "debian-12"], ["start", "x"], ["smoke", "debian-12"]])
def test_timeout_must_be_finite_and_positive(
    qinst: RunQinst, offline_env: dict[str, str], command: list[str], value: str
) -> None:
    one_clear_error(qinst(*command, f"--timeout={value}", env=offline_env), 2, "--timeout")


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
    qinst: RunQinst, offline_env: dict[str, str], tmp_path: Path, command: str, case: str
) -> None:
    path = _user_data_cases(tmp_path)[case]
    args = ["seed", "--out", str(tmp_path / "s.iso")] if command == "seed" else ["up", "debian-12"]
    # a FIFO read would block: the timeout fails it
    proc = qinst(*args, "--user-data", path, env=offline_env, timeout=30)
    one_clear_error(proc, 2, "--user-data")
    assert len(proc.stderr.strip().splitlines()) <= 2  # the newline in the name is not printed raw
    assert not (tmp_path / "s.iso").exists()


def test_every_duration_option_refuses_what_is_not_a_duration(tmp_path: Path) -> None:
    for value in ("nan", "-5", "inf", "0"):
        proc = run_qinst(TEST_URI, tmp_path, "snapshot", "restore", "web1", "a", "--timeout", value)
        assert proc.returncode == 2, (value, proc.stderr)
        assert "--timeout must be a number of seconds above 0" in proc.stderr


@pytest.mark.promise
@pytest.mark.parametrize(
    "args",
    [
        ["smoke", "debian-12", "--junit", "/proc/qinst-r.xml"],
        ["smoke", "debian-12", "--summary", "/proc/qinst-s.md"],
        ["smoke", "merge", "results.json", "--junit", "/proc/qinst-r.xml"],
        ["seed", "--out", "/proc/qinst-seed.iso"],
    ],
)
def test_an_output_file_in_a_folder_nobody_can_write_is_refused_before_anything_runs(
    qinst: RunQinst, offline_env: dict[str, str], tmp_path: Path, args: list[str]
) -> None:
    """The folder exists and its permission bits would let root in, but nothing can be made there (/proc): the
    option is refused by a real write, at once (exit 2), not after a smoke run or a seed build."""
    (tmp_path / "results.json").write_text('{"schema": "qinst-smoke/1", "results": []}')
    option = args[-2]
    one_clear_error(qinst(*args, env=offline_env, timeout=30), 2, f"{option}: cannot write in /proc")
