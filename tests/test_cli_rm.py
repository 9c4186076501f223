"""`qinst rm` through the real entry point and the real libvirtd (qemu:///system), on instances that never boot
(defined, or started with their vCPUs paused): it leaves nothing qinst or libvirt made for the instance (domain,
overlay and seed volumes, a UEFI guest's NVRAM, the console and libvirt logs), needs --force for a running one, and
removes several named at once, touching nothing of another instance."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import RunQinst

from testsupport.virsh import (
    LOG_DIR,
    URI,
    define_instance,
    domains,
    nvram_files,
    remove_domain,
    unique_name,
    volumes,
)

pytestmark = [pytest.mark.libvirt, pytest.mark.promise]


@pytest.fixture(autouse=True)
def _libvirtd() -> None:
    if not os.path.exists("/var/run/libvirt/libvirt-sock"):
        pytest.skip("no libvirtd")


def _made(name: str) -> list[str]:
    """What the host holds of instance `name`."""
    found = [f"domain {d}" for d in domains(name) if d == name]
    found += [f"volume {v}" for v in sorted(volumes(prefix=name)) if v in (f"{name}.qcow2", f"{name}-seed.iso")]
    found += [f"log {p.name}" for p in sorted(LOG_DIR.glob(f"{name}*.log"))]
    return found + [f"nvram {p.name}" for p in nvram_files(name)]


def _env(tmp_path: Path) -> dict[str, str]:
    return {"QINST_CONNECT": URI, "QINST_CACHE_DIR": str(tmp_path / "cache")}


def test_rm_of_a_running_uefi_instance_needs_force_and_then_leaves_nothing(qinst: RunQinst, tmp_path: Path) -> None:
    name = unique_name("rmuefi")
    try:
        define_instance(name, "uefi", start_paused=True)
        before = _made(name)
        assert [f"nvram {name}_VARS.fd"] == [m for m in before if m.startswith("nvram")]  # QEMU runs: NVRAM made
        refused = qinst("rm", name, env=_env(tmp_path))
        assert refused.returncode == 2 and "--force" in refused.stderr
        assert _made(name) == before
        removed = qinst("rm", "--force", name, env=_env(tmp_path))
        assert removed.returncode == 0, removed.stderr
        assert _made(name) == []
    finally:
        remove_domain(name)


def test_rm_of_several_removes_each_and_nothing_of_another(qinst: RunQinst, tmp_path: Path) -> None:
    names = [unique_name("rma"), unique_name("rmb"), unique_name("rmkeep")]
    try:
        for name in names:
            define_instance(name)
        kept = _made(names[2])
        proc = qinst("rm", names[0], names[1], env=_env(tmp_path))
        assert proc.returncode == 0, proc.stderr
        assert _made(names[0]) == [] and _made(names[1]) == []
        assert _made(names[2]) == kept and len(kept) == 5  # domain, two volumes, two logs
    finally:
        for name in names:
            remove_domain(name)
