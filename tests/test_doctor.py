"""doctor.py's checks against the real libvirtd (qemu:///system), without booting anything: which architectures run
here and how (KVM only for the host's own, TCG for the others), and the sev line, which a host without AMD SEV
fails without being an unhealthy host (never required). The whole `qinst doctor` with its KVM boot probe:
tests/test_cli_doctor.py (a VM test)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from qemu_instances import doctor
from qemu_instances.arch import Arch
from qemu_instances.host import Host
from testsupport.virsh import URI

pytestmark = [pytest.mark.libvirt, pytest.mark.promise]


@pytest.fixture(autouse=True)
def _libvirtd() -> None:
    if not os.path.exists("/var/run/libvirt/libvirt-sock"):
        pytest.skip("no libvirtd")


@pytest.mark.parametrize("kvm_usable", [True, False])
def test_kvm_is_said_only_for_the_hosts_own_architecture(kvm_usable: bool) -> None:
    with Host(URI) as host:
        native = host.host_arch()
        checks = {c.name: c for c in doctor.arch_checks(host, kvm_usable)}
    assert set(checks) == {f"arch-{a}" for a in Arch}
    assert all(not c.required for c in checks.values())
    own = checks[f"arch-{native}"]
    assert own.ok and ("under KVM" in own.detail) is kvm_usable
    others = [c for name, c in checks.items() if name != f"arch-{native}" and c.ok]
    assert others, "this host's QEMU emulates another architecture (qemu-system-arm is installed for the arm64 tests)"
    for check in others:  # another architecture is emulated, whatever KVM does for the host's own
        assert "KVM" not in check.detail and "TCG (software emulation), another architecture" in check.detail


def test_a_host_without_sev_says_so_and_is_not_unhealthy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor, "kvm_boot_probe", lambda host, seconds=3.0: (False, "not probed here"))
    checks = {c.name: c for c in doctor.run_checks(URI)}
    domcaps = subprocess.run(["virsh", "-c", URI, "domcapabilities"], capture_output=True, text=True, check=True)
    sev = checks["sev"]
    assert sev.ok is ("<sev supported='yes'" in domcaps.stdout) and "SEV" in sev.detail
    assert sev.required is False  # doctor's exit status is about what qinst needs: SEV is for --confidential only
    if not sev.ok:
        assert "--confidential sev" in sev.hint


def test_doctor_prints_names_and_details_in_columns_that_never_run_together(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`qinst doctor`'s table: a check name longer than the others (arch-aarch64) is still followed by a space, every
    detail starts in the same column, and a hint lines up under the details; exit 4 when a required check fails."""
    from typer.testing import CliRunner

    from qemu_instances import api, cli
    from qemu_instances.doctor import Check

    checks = [
        Check("tcg", True, "software emulation available"),
        Check("arch-aarch64", True, "aarch64 guests under TCG", required=False),
        Check("pool", False, "no pool", hint="create it"),
        Check("networks", True, "evil\x1b]0;pwned\x07\u202e(inactive)", hint="\x9b2J", required=False),
    ]
    monkeypatch.setattr(api, "doctor", lambda settings: checks)
    env = {"QINST_CACHE_DIR": str(tmp_path), "LIBVIRT_DEFAULT_URI": "test:///default"}
    result = CliRunner().invoke(cli.app, ["--connect", "test:///default", "doctor"], env=env, prog_name="qinst")
    assert result.exit_code == 4, result.output
    lines = result.output.splitlines()
    assert lines[1] == "ok   arch-aarch64 aarch64 guests under TCG"
    starts = {line.index(c.detail) for line, c in zip(lines[:3], checks[:3], strict=True)}
    assert starts == {5 + len("arch-aarch64") + 1}  # one column for every detail
    assert lines[3] == " " * (5 + len("arch-aarch64") + 1) + "-> create it"
    # a network name another user of the daemon chose cannot retitle or recolour the terminal, or reverse the text
    assert lines[4] == "ok   networks     evil]0;pwned(inactive)" and len(lines) == 5
