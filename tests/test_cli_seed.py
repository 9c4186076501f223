"""`qinst seed` through the real entry point: the ISO it writes, and nothing written on bad input."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import RunQinst, one_clear_error


def test_seed_writes_a_cidata_iso(qinst: RunQinst, tmp_path: Path) -> None:
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    out = tmp_path / "seed.iso"
    run = qinst(
        "seed", "--out", str(out), "--hostname", "web-1", "--instance-id", "i-42", "--ssh-key", str(key),
        "--user", "alice", "--json", env={"HOME": str(tmp_path)},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    data = json.loads(run.stdout)
    assert data["hostname"] == "web-1" and data["instance_id"] == "i-42" and data["user"] == "alice"
    assert set(data["files"]) == {"user-data", "meta-data"} and data["size"] == out.stat().st_size
    blkid = subprocess.run(["blkid", "-p", "-o", "export", str(out)], capture_output=True, text=True, check=True)
    assert "LABEL=cidata" in blkid.stdout and "TYPE=iso9660" in blkid.stdout
    assert "PRIVATE KEY" not in out.read_bytes().decode("latin-1")


def test_seed_bad_input_writes_nothing(qinst: RunQinst, tmp_path: Path) -> None:
    out = tmp_path / "seed.iso"
    bad_name = qinst("seed", "--out", str(out), "--hostname", "bad\nname", env={"HOME": str(tmp_path)})
    assert bad_name.returncode == 2 and "invalid host name" in bad_name.stderr
    key = tmp_path / "lonely"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    key.with_suffix(".pub").unlink()  # a private key with no public half beside it
    private = qinst("seed", "--out", str(out), "--ssh-key", str(key), env={"HOME": str(tmp_path)})
    assert private.returncode == 2 and "private key" in private.stderr
    assert "PRIVATE" not in private.stderr + private.stdout  # the key itself is never printed
    missing = qinst("seed", "--out", str(out), "--ssh-key", str(tmp_path / "nope.pub"), env={"HOME": str(tmp_path)})
    assert missing.returncode == 2
    bad_yaml = tmp_path / "user-data"
    bad_yaml.write_text("#cloud-config\nruncmd: [a, b\n")
    broken = qinst("seed", "--out", str(out), "--user-data", str(bad_yaml), env={"HOME": str(tmp_path)})
    assert broken.returncode == 2 and "line" in broken.stderr and "Traceback" not in broken.stderr
    assert not out.exists() and not list(tmp_path.glob(".seed.iso*"))


# -- bad --out values --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("out", ["/", ".", "", "..", "/nonexistent-qinst/seed.iso"])
def test_seed_out_without_a_file_name_or_folder(qinst: RunQinst, offline_env: dict[str, str], out: str) -> None:
    one_clear_error(qinst("seed", "--out", out, env=offline_env), 2, "--out")


def test_seed_out_an_existing_folder(qinst: RunQinst, offline_env: dict[str, str], tmp_path: Path) -> None:
    one_clear_error(qinst("seed", "--out", str(tmp_path), env=offline_env), 2, "--out", "is a folder")
