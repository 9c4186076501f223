"""`qinst doctor`: what works on this host, and what to do where it does not."""

from __future__ import annotations

import contextlib
import secrets
import shutil
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path

from qemu_instances import kvmverdict
from qemu_instances.arch import Arch
from qemu_instances.errors import HypervisorError
from qemu_instances.host import POOL_NAME, Host, domain_capabilities
from qemu_instances.mounts import choose_driver
from qemu_instances.sev import SevSupport


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    hint: str = ""
    required: bool = True

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def _version(n: int) -> str:
    return f"{n // 1_000_000}.{n // 1000 % 1000}.{n % 1000}"


def kvm_boot_probe(host: Host, seconds: float = 3.0) -> tuple[bool, str]:
    """Start a tiny diskless KVM guest: on hosts where KVM is present but broken it pauses at once."""
    root = ET.Element("domain", type="kvm")
    name = f"qinst-kvm-probe-{secrets.token_hex(3)}"
    ET.SubElement(root, "name").text = name
    ET.SubElement(root, "memory", unit="MiB").text = "32"
    os_el = ET.SubElement(root, "os")
    ET.SubElement(os_el, "type", arch="x86_64").text = "hvm"
    ET.SubElement(root, "cpu", mode="host-passthrough")  # as `qinst up` asks for it under KVM
    ET.SubElement(root, "devices")
    try:
        dom = host.start_transient(ET.tostring(root, encoding="unicode"), "a KVM guest does not start")
    except HypervisorError as exc:
        _remove_probe_log(host, name)
        return False, exc.message
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if dom.state()[0] == "paused":
                return False, "present, but a KVM guest pauses at once (KVM internal error / emulation failure)"
            time.sleep(0.2)
        return True, "a KVM guest runs"
    finally:
        with contextlib.suppress(HypervisorError):
            dom.destroy()
        _remove_probe_log(host, name)


def _remove_probe_log(host: Host, name: str) -> None:
    """libvirt's log of the probe domain: the probe leaves nothing behind."""
    if host.is_local and host.is_system:
        with contextlib.suppress(OSError):
            (Path("/var/log/libvirt/qemu") / f"{name}.log").unlink()


def _verdict_check(host: Host, cache_dir: Path) -> Check:
    """What `up --accel auto` remembers of KVM on this host (kvmverdict.py), and how to make it try again."""
    key = kvmverdict.host_key(host.uri, host.hypervisor_version(), host.is_local)
    verdict = kvmverdict.recall(cache_dir, key)
    if verdict is None:
        return Check("kvm-memo", True, "nothing remembered: 'up --accel auto' tries KVM first", required=False)
    return Check(
        "kvm-memo",
        False,
        f"KVM failed here on {verdict.recorded} ({verdict.reason}): 'up --accel auto' starts under TCG at once",
        f"after fixing KVM: qinst doctor --reset-kvm (or delete {verdict.path}); a new QEMU or kernel forgets it",
        required=False,
    )


def _uefi_firmware(host: Host, arch: Arch) -> bool:
    """Whether libvirt finds UEFI firmware for `arch` guests (its domain capabilities list a loader)."""
    try:
        caps = ET.fromstring(domain_capabilities(host, str(arch), arch.machine))
    except (HypervisorError, ET.ParseError):
        return False
    return any((v.text or "").strip() for v in caps.iterfind("os/loader/value"))


def arch_checks(host: Host, kvm_usable: bool) -> list[Check]:
    """Which guest architectures this host runs, and how: KVM for its own (when it works), TCG for the others;
    for a missing emulator or firmware, the Debian package to install."""
    native = host.host_arch()
    checks = []
    for arch in Arch:
        types = host.domain_types(str(arch))
        name = f"arch-{arch}"
        if "qemu" not in types and "kvm" not in types:
            checks.append(
                Check(name, False, f"no {arch} guests: QEMU has no {arch} emulator here",
                      f"install {arch.emulator_package} (and {arch.firmware_package})", required=False)
            )  # fmt: skip
            continue
        how = "KVM" if str(arch) == native and kvm_usable else "TCG (software emulation)"
        if str(arch) != native:
            how += f", another architecture than this {native} host's: several times slower"
        firmware = _uefi_firmware(host, arch)
        if not arch.bios and not firmware:
            checks.append(
                Check(name, False, f"{arch} guests need UEFI firmware, and libvirt finds none",
                      f"install {arch.firmware_package}", required=False)
            )  # fmt: skip
            continue
        boots = "BIOS and UEFI" if arch.bios and firmware else "BIOS (no UEFI firmware)" if arch.bios else "UEFI"
        hint = "" if firmware else f"install {arch.firmware_package} for --firmware uefi"
        checks.append(Check(name, True, f"{arch} guests under {how}; {boots}", hint, required=False))
    return checks


def run_checks(uri: str, cache_dir: Path | None = None) -> list[Check]:
    checks = []
    try:
        host = Host(uri)
    except HypervisorError as exc:
        return [Check("libvirt", False, exc.message, exc.hint or "")]
    with host:
        lib, hv = host.versions()
        checks.append(Check("libvirt", True, f"{uri} (libvirt {_version(lib)}, QEMU {_version(hv)})"))
        types = host.domain_types()
        checks.append(
            Check(
                "tcg",
                "qemu" in types,
                "software emulation available" if "qemu" in types else "QEMU offers no x86_64 emulation",
                "" if "qemu" in types else "install qemu-system-x86",
            )
        )
        kvm = host.kvm_available()
        if kvm.usable and host.is_local:
            usable, detail = kvm_boot_probe(host)
        else:
            usable, detail = kvm.usable, kvm.reason
        checks.append(
            Check(
                "kvm",
                usable,
                detail,
                "" if usable else "qinst falls back to TCG (slower); check BIOS virtualization and kvm modules",
                required=False,
            )
        )
        if cache_dir is not None:
            checks.append(_verdict_check(host, cache_dir))
        try:
            checks += arch_checks(host, usable)
        except HypervisorError as exc:
            checks.append(
                Check("arch", False, f"cannot tell which architectures run here: {exc.message}", required=False)
            )
        try:
            pool = host.pool(create=False)
            available = host.pool_free(pool)
            checks.append(
                Check("pool", True, f"{POOL_NAME} at {host.pool_path(pool)}, {available / (1 << 30):.1f} GiB free")
            )
        except HypervisorError:
            checks.append(
                Check("pool", True, f"{POOL_NAME} missing: 'qinst up' creates it at {host.default_pool_path()}")
            )
        nets = [f"{net}({'active' if active else 'inactive'})" for net, active in host.networks()]
        checks.append(
            Check(
                "networks",
                True,
                ", ".join(nets) or "none defined",
                "" if nets else "--network user (user-mode with a port forward) works without any",
                required=False,
            )
        )
        try:
            caps = domain_capabilities(host)
            _, why = choose_driver(caps, local=host.is_local)
            checks.append(Check("mounts", True, f"up --mount shares folders by {why}", required=False))
            sev = SevSupport.from_domcaps(caps)
            hint = (
                ""
                if sev.sev
                else "up --confidential sev needs an AMD EPYC host with SEV enabled in firmware and kvm_amd"
            )
            checks.append(Check("sev", sev.sev, sev.describe(), hint, required=False))
        except HypervisorError as exc:  # a driver without domain capabilities (the test driver)
            checks.append(Check("mounts", False, f"cannot tell how to share folders: {exc.message}", required=False))
    for tool, package in (("qemu-img", "qemu-utils"), ("ssh", "openssh-client"), ("ssh-keyscan", "openssh-client")):
        path = shutil.which(tool)
        checks.append(Check(tool, path is not None, path or "not found", "" if path else f"install {package}"))
    return checks
