"""arch.py: the guest architectures, their names and what each needs; and arm64 across the package: the catalog's
arm64 pins against real published checksum files, the aarch64 domain (validated, and defined on the real libvirtd),
the smoke matrix's suites, a firmware an architecture cannot boot refused. Real arm64 boots: test_cli_up.py and
test_cli_smoke.py."""

from __future__ import annotations

import secrets
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest
from conftest import RunQinst, one_clear_error

from qemu_instances.arch import Arch
from qemu_instances.catalog import Catalog
from qemu_instances.domain import Accel, Firmware, InstanceSpec, domain_xml
from qemu_instances.errors import UsageError
from qemu_instances.host import Host
from qemu_instances.launch import firmware_for
from qemu_instances.signatures import keyring_path, verify_detached
from qemu_instances.smoke import jobs
from qemu_instances.smokereport import ImageReport
from testsupport.testdriver import instance_spec


@pytest.mark.parametrize(("text", "arch"), [("x86_64", Arch.X86_64), ("AMD64", Arch.X86_64), ("arm64", Arch.AARCH64),
                                            (" aarch64 ", Arch.AARCH64)])  # fmt: skip
def test_debian_and_kernel_names_are_both_accepted(text: str, arch: Arch) -> None:
    assert Arch.parse(text) is arch


@pytest.mark.parametrize("text", ["", "arm", "i386", "ppc64el", "x86-64", "aarch 64"])
def test_other_names_are_refused_with_the_option_named(text: str) -> None:
    with pytest.raises(UsageError, match="--arch: unknown architecture") as err:
        Arch.parse(text)
    assert err.value.hint == "use x86_64 (amd64) or aarch64 (arm64)"


def test_what_each_architecture_needs() -> None:
    assert (Arch.X86_64.machine, Arch.X86_64.console, Arch.X86_64.bios) == ("q35", "ttyS0", True)
    assert (Arch.AARCH64.machine, Arch.AARCH64.console, Arch.AARCH64.bios) == ("virt", "ttyAMA0", False)
    assert (Arch.AARCH64.emulator_package, Arch.AARCH64.firmware_package) == ("qemu-system-arm", "qemu-efi-aarch64")
    assert (Arch.X86_64.debian, Arch.AARCH64.debian) == ("amd64", "arm64")


# -- the catalog's arm64 pins, against the real published data (tests/data: copies of ../shared/reference/realdata) --

DATA = Path(__file__).with_name("data")


def _sums(path: Path) -> dict[str, str]:
    """name -> hex digest of a SHA256SUMS / SHA512SUMS file ('*' binary markers dropped)."""
    return {name.lstrip("*"): digest for digest, name in (line.split() for line in path.read_text().splitlines())}


def _lima_pins() -> dict[str, str]:
    """url -> digest of the pins.md table (lima's templates)."""
    rows = [line.split("|") for line in (DATA / "pins.md").read_text().splitlines() if line.startswith("| ")]
    return {cells[3].strip(): cells[4].strip() for cells in rows if cells[3].strip().startswith("https://")}


def test_the_arm64_pins_are_the_published_ones() -> None:
    """Each aarch64 pin is the digest a real published checksum file (signed, for Ubuntu) or lima's template gives
    for that exact file name, and is not the amd64 pin."""
    catalog = Catalog.load()
    jammy = DATA / "ubuntu/jammy-22.04-release-20260722"
    verify_detached((jammy / "SHA256SUMS").read_bytes(), (jammy / "SHA256SUMS.gpg").read_bytes(),
                    keyring_path("ubuntu-cloud-images"), what="jammy SHA256SUMS")  # fmt: skip
    published = {
        "ubuntu-22.04": "sha256:" + _sums(jammy / "SHA256SUMS")["ubuntu-22.04-server-cloudimg-arm64.img"],
        "debian-12": "sha512:" + _sums(DATA / "debian/bookworm-latest-sample/SHA512SUMS")[
            "debian-12-genericcloud-arm64.qcow2"],
    }  # fmt: skip
    lima = _lima_pins()
    for name in ("debian-12", "debian-13", "ubuntu-22.04", "ubuntu-24.04"):
        arm, amd = catalog.lookup(name).for_arch(Arch.AARCH64), catalog.lookup(name).for_arch(Arch.X86_64)
        assert arm is not None and amd is not None
        assert arm.url and "arm64" in arm.url.rsplit("/", 1)[1] and "amd64" not in arm.url
        assert arm.latest_url and "arm64" in arm.latest_url.rsplit("/", 1)[1]
        assert arm.digest != amd.digest
        expected = published.get(name) or lima[arm.url]
        assert str(arm.digest) == expected, name
    assert catalog.lookup("debian-11").arches == ("x86_64",)  # no arm64 pin published for it here


# -- the aarch64 domain --


def _aarch64_spec(tmp_path: Path, accel: Accel = Accel.TCG) -> InstanceSpec:
    return instance_spec(
        name=f"qinst-arm-{secrets.token_hex(3)}", arch=Arch.AARCH64, firmware=Firmware.UEFI, accel=accel,
        console_log=str(tmp_path / "console.log"),
    )  # fmt: skip


def test_the_aarch64_domain_is_a_virt_machine_with_uefi(tmp_path: Path) -> None:
    spec = _aarch64_spec(tmp_path)
    xml = domain_xml(spec)
    path = tmp_path / "domain.xml"
    path.write_text(xml)
    proc = subprocess.run(["virt-xml-validate", str(path), "domain"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    root = ET.fromstring(xml)
    os_type = root.find("os/type")
    assert os_type is not None and (os_type.get("arch"), os_type.get("machine")) == ("aarch64", "virt")
    assert root.find("os").get("firmware") == "efi"  # type: ignore[union-attr]
    assert root.find("features/apic") is None and root.find("clock/timer") is None  # x86 only
    cpu = root.find("cpu")  # TCG: cortex-a72, not max (no pointer authentication computed in software)
    assert cpu is not None and cpu.get("mode") == "custom" and cpu.findtext("model") == "cortex-a72"
    x86 = ET.fromstring(domain_xml(instance_spec(accel=Accel.TCG)))
    assert x86.find("cpu").get("mode") == "maximum"  # type: ignore[union-attr]
    assert root.find("devices/serial/log").get("file") == spec.console_log  # type: ignore[union-attr]
    kvm = ET.fromstring(domain_xml(_aarch64_spec(tmp_path, Accel.KVM)))
    assert kvm.get("type") == "kvm" and kvm.find("cpu").get("mode") == "host-passthrough"  # type: ignore[union-attr]
    bios = instance_spec(arch=Arch.AARCH64, firmware=Firmware.BIOS)
    with pytest.raises(UsageError, match="aarch64 guests boot only under UEFI"):
        firmware_for(bios.arch, bios.firmware)


@pytest.mark.libvirt
def test_the_real_libvirtd_gives_the_aarch64_domain_a_pl011_console(tmp_path: Path) -> None:
    """Defined (not started) on this host's libvirtd: QEMU's aarch64 emulator, UEFI, and the PL011 that the
    console log, readiness and host-key capture read (ttyAMA0)."""
    if not Path("/var/run/libvirt/libvirt-sock").exists():
        pytest.skip("no libvirtd")
    spec = _aarch64_spec(tmp_path)
    with Host("qemu:///system") as host:
        if "qemu" not in host.domain_types(str(Arch.AARCH64)):
            pytest.skip("no qemu-system-aarch64 on this host")
        dom = host.conn.defineXML(domain_xml(spec))
        try:
            root = ET.fromstring(dom.XMLDesc(0))
        finally:
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
    assert (root.findtext("devices/emulator") or "").endswith("qemu-system-aarch64")
    assert root.find("os").get("firmware") == "efi"  # type: ignore[union-attr]  # AAVMF, chosen when it starts
    target = root.find("devices/serial/target")
    assert target is not None and target.get("type") == "system-serial"
    assert root.find("devices/serial/target/model").get("name") == "pl011"  # type: ignore[union-attr]


# -- the matrix: a firmware an architecture cannot use is refused, not dropped --


@pytest.mark.parametrize("command", ["up", "smoke"])
def test_bios_for_an_aarch64_guest_is_refused_before_anything_runs(
    qinst: RunQinst, offline_env: dict[str, str], command: str
) -> None:
    args = ["--arch", "x86_64,aarch64"] if command == "smoke" else ["--arch", "arm64"]
    proc = qinst(command, "debian-12", *args, "--firmware", "bios", env=offline_env)
    one_clear_error(proc, 2, "aarch64 guests boot only under UEFI")


def test_the_smoke_matrix_names_each_architectures_suites() -> None:
    matrix = jobs(["debian-12", "ubuntu-24.04"], [None], [Arch.X86_64, Arch.AARCH64])
    assert [(j.image, str(j.arch), str(j.firmware), j.label) for j in matrix] == [
        ("debian-12", "x86_64", "bios", "debian-12-bios"),
        ("debian-12", "aarch64", "uefi", "debian-12-aarch64-uefi"),
        ("ubuntu-24.04", "x86_64", "bios", "ubuntu-24-04-bios"),
        ("ubuntu-24.04", "aarch64", "uefi", "ubuntu-24-04-aarch64-uefi"),
    ]
    both = jobs(["debian-12"], [Firmware.BIOS, Firmware.UEFI], [Arch.X86_64])
    assert [j.label for j in both] == ["debian-12-bios", "debian-12-uefi"]
    names = [ImageReport(image=j.image, firmware=str(j.firmware), arch=str(j.arch)).suite for j in matrix[:2]]
    assert names == ["debian-12[bios]", "debian-12[aarch64,uefi]"]
