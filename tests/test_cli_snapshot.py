"""`qinst snapshot` through the real entry point and the real libvirtd (qemu:///system), on an instance that never
boots: its internal snapshots live inside the qcow2 overlay, and `snapshot delete` must remove that snapshot's data
there (read back with `qemu-img snapshot -l`), not only libvirt's record of it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import RunQinst

from testsupport.virsh import URI, define_instance, remove_domain, unique_name, virsh

pytestmark = [pytest.mark.libvirt, pytest.mark.promise]


@pytest.fixture(autouse=True)
def _libvirtd() -> None:
    if not os.path.exists("/var/run/libvirt/libvirt-sock"):
        pytest.skip("no libvirtd")


def _in_qcow2(overlay: Path) -> list[str]:
    """The internal snapshots the qcow2 file itself holds (-U: libvirt may hold the image open)."""
    out = subprocess.run(
        ["qemu-img", "snapshot", "-l", "-U", str(overlay)], capture_output=True, text=True, check=True
    ).stdout
    return [line.split()[1] for line in out.splitlines()[2:] if line.strip()]


def _forget_snapshots(name: str) -> None:
    """Drop libvirt's records of the domain's snapshots, so that remove_domain can undefine it."""
    for snap in virsh("snapshot-list", "--name", name).stdout.split():
        virsh("snapshot-delete", name, snap, "--metadata")


def test_snapshot_delete_removes_its_data_from_the_qcow2_and_keeps_the_others(qinst: RunQinst, tmp_path: Path) -> None:
    name = unique_name("snapdel")
    env = {"QINST_CONNECT": URI, "QINST_CACHE_DIR": str(tmp_path / "cache")}
    try:
        overlay = define_instance(name)  # defined, never started: each snapshot is disk-only, inside the overlay
        for snap in ("a", "b"):
            made = qinst("snapshot", "create", name, snap, env=env)
            assert made.returncode == 0, made.stderr
        assert _in_qcow2(overlay) == ["a", "b"]
        deleted = qinst("snapshot", "delete", name, "a", env=env)
        assert deleted.returncode == 0, deleted.stderr
        assert _in_qcow2(overlay) == ["b"]  # a's data is gone from the file, b's stays
        listed = qinst("snapshot", "list", name, env=env)
        assert listed.returncode == 0 and "b" in listed.stdout.split() and "a" not in listed.stdout.split()
    finally:
        _forget_snapshots(name)
        remove_domain(name)
