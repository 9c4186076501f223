"""`qinst doctor` through the real entry point, against the real libvirtd and QEMU."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import RunQinst

pytestmark = [pytest.mark.vm, pytest.mark.libvirt]


def test_doctor_reports_this_host(qinst: RunQinst, vm_env: dict[str, str]) -> None:
    text = qinst("doctor", env=vm_env, timeout=120)
    assert text.returncode == 0, text.stdout + text.stderr
    assert text.stdout.splitlines()[0].startswith("ok   libvirt")
    checks = {c["name"]: c for c in json.loads(qinst("doctor", "--json", env=vm_env, timeout=120).stdout)}
    assert checks["tcg"]["ok"] is True
    assert checks["kvm"]["detail"]
    caps = subprocess.run(["virsh", "-c", "qemu:///system", "capabilities"], capture_output=True, text=True).stdout
    if not Path("/dev/kvm").exists() or "type='kvm'" not in caps:
        assert checks["kvm"]["ok"] is False  # no KVM to offer: doctor must not claim it
    elif checks["kvm"]["ok"] is False:
        assert "falls back to TCG" in checks["kvm"]["hint"]  # offered but failing (these machines): said so
    assert {"libvirt", "pool", "networks", "qemu-img", "ssh"} <= set(checks)
    # SEV as libvirt's domain capabilities say (these machines: none), never a required check.
    domcaps = subprocess.run(["virsh", "-c", "qemu:///system", "domcapabilities"], capture_output=True, text=True)
    assert checks["sev"]["ok"] is ("<sev supported='yes'" in domcaps.stdout)
    assert checks["sev"]["required"] is False and "SEV" in checks["sev"]["detail"]
