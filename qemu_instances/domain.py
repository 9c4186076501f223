"""Domain XML for an instance, built with ElementTree, and qinst's <metadata> record on it."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import Any

from qemu_instances.arch import Arch
from qemu_instances.errors import UsageError
from qemu_instances.forwarding import Forward
from qemu_instances.mounts import Driver, Mount, readonly_helper, tag

METADATA_NS = "http://qinst.invalid/xmlns/instance/1"
METADATA_KEY = "qinst"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
USER_NETDEV = "qinstnet0"
_LISTS = {"volumes": "volume", "forwards": "forward", "mounts": "mount"}  # Metadata's list fields: their items


class Accel(StrEnum):
    AUTO = "auto"
    KVM = "kvm"
    TCG = "tcg"

    @property
    def domain_type(self) -> str:
        return "kvm" if self is Accel.KVM else "qemu"


class Firmware(StrEnum):
    BIOS = "bios"
    UEFI = "uefi"


class NetworkKind(StrEnum):
    DEFAULT = "default"
    NETWORK = "network"
    BRIDGE = "bridge"
    USER = "user"
    NONE = "none"


@dataclass(frozen=True)
class Network:
    """--network: default | network:NAME | bridge:DEV | user | user:restrict | none."""

    kind: NetworkKind
    source: str = ""  # the libvirt network or bridge device
    restrict: bool = False  # user mode: the guest reaches nothing but its forwarded ports

    @classmethod
    def parse(cls, text: str) -> Network:
        kind, _, arg = text.partition(":")
        if kind == "user" and arg in ("", "restrict"):
            return cls(NetworkKind.USER, restrict=arg == "restrict")
        if kind in ("network", "bridge") and re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", arg):
            return cls(NetworkKind(kind), arg)
        if kind in ("default", "none") and not arg:
            return cls(NetworkKind(kind), "default" if kind == "default" else "")
        raise UsageError(
            f"invalid --network {text!r}", hint="use default, network:NAME, bridge:DEV, user, user:restrict or none"
        )

    def __str__(self) -> str:
        if self.kind in (NetworkKind.NETWORK, NetworkKind.BRIDGE):
            return f"{self.kind}:{self.source}"
        return "user:restrict" if self.restrict else str(self.kind)


def validate_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise UsageError(
            f"invalid instance name {name!r}",
            hint="use 1-63 lower-case letters, digits and '-', starting with a letter or digit",
        )
    return name


@dataclass(frozen=True)
class Metadata:
    """What qinst records on a domain it created: libvirt is the only store of instance state.

    The record is typed here, once: a value given as text (read back from libvirt, or written by a test) is parsed
    and validated by the same parser `up` used, and anything that does not parse raises ValueError (or UsageError):
    a record read back is untrusted input (instances.record_of turns any failure into an `invalid` instance).
    """

    image: str
    digest: str
    user: str
    network: Network
    ssh_host: str = ""
    ssh_port: int = 22
    created: str = ""
    instance_id: str = ""
    private_key: str = ""  # path of the private key matching the injected public key, when known
    host_keys: str = ""  # the guest's host keys as printed on its console (public keys)
    console_log: str = ""
    accel: Accel | None = None  # the accelerator it was started with (kvm or tcg)
    arch: Arch = Arch.X86_64  # the guest's architecture (a record without one is an x86_64 guest's)
    volumes: tuple[str, ...] = ()  # volume names in the pool that belong to this instance
    forwards: tuple[Forward, ...] = ()  # `up --forward` rules
    mounts: tuple[Mount, ...] = ()  # `up --mount` folders

    def __post_init__(self) -> None:
        def typed(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        if isinstance(self.network, str):
            typed("network", Network.parse(self.network))
        if isinstance(self.accel, str):
            if self.accel not in ("", "kvm", "tcg"):
                raise UsageError(f"invalid accel {self.accel[:20]!r}")
            typed("accel", Accel(self.accel) if self.accel else None)
        if isinstance(self.arch, str):
            typed("arch", Arch.parse(self.arch or "x86_64", "arch"))
        typed("forwards", tuple(_recorded_forward(f) if isinstance(f, str) else f for f in self.forwards))
        typed("mounts", tuple(Mount.from_record(m) if isinstance(m, str) else m for m in self.mounts))
        typed("volumes", tuple(self.volumes))

    def _text(self, name: str) -> str | tuple[str, ...]:
        value = getattr(self, name)
        if name == "forwards":
            return tuple(str(f) for f in value)
        if name == "mounts":
            return tuple(m.record() for m in value)
        if name == "volumes":
            return tuple(value)
        return "" if value is None else str(value)

    def to_xml(self) -> str:
        root = ET.Element("instance")
        for f in fields(self):
            value = self._text(f.name)
            if f.name in _LISTS:
                vols = ET.SubElement(root, f.name)
                for v in value:
                    ET.SubElement(vols, _LISTS[f.name]).text = v
            else:
                ET.SubElement(root, f.name.replace("_", "-")).text = str(value)
        return ET.tostring(root, encoding="unicode")

    @classmethod
    def from_xml(cls, text: str) -> Metadata:
        """The record in `text` (qinst's <instance> element), typed and validated field by field."""
        root = ET.fromstring(text)
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in _LISTS:
                values[f.name] = tuple(v.text or "" for v in root.iterfind(f"{f.name}/{_LISTS[f.name]}"))
                continue
            node = root.find(f.name.replace("_", "-"))
            if node is not None:
                values[f.name] = _port(node.text or "") if f.name == "ssh_port" else (node.text or "")
        values.setdefault("network", "")
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        """The record as `ls --json` and the API show it: text, numbers and the forwards' and mounts' own JSON."""
        data: dict[str, Any] = {f.name: self._text(f.name) for f in fields(self)}
        data["ssh_port"] = self.ssh_port
        data["forwards"] = [f.to_json() for f in self.forwards]
        data["mounts"] = [m.to_json() for m in self.mounts]
        data["volumes"] = list(self.volumes)
        return data


def _port(text: str) -> int:
    if not text:
        return 0  # an empty element: no port, refused by validate_metadata like any other 0
    if not text.isdigit() or len(text) > 5:
        raise UsageError(f"invalid ssh-port {text[:20]!r}")
    return int(text)


def _recorded_forward(text: str) -> Forward:
    """A forward read back: it must parse, and be written exactly as qinst writes it."""
    try:
        forward = Forward.parse(text)
    except UsageError:
        forward = None
    if forward is None or str(forward) != text:
        raise UsageError(f"the instance's metadata records an invalid forward {text[:80]!r}")
    return forward


@dataclass(frozen=True)
class Confidential:
    """An AMD SEV launch: the stateless firmware (a file on the libvirt host) and the guest owner's session."""

    firmware: str  # the confidential OVMF (one stateless pflash file: it is what the SEV measurement covers)
    cbitpos: int  # from the host's domain capabilities
    reduced_phys_bits: int
    policy: int
    dh_cert: str  # base64: the owner's Diffie-Hellman certificate (sevctl's PREFIX_godh.b64)
    session: str  # base64: the launch session (sevctl's PREFIX_session.b64)


@dataclass(frozen=True)
class InstanceSpec:
    """Everything the domain XML needs, resolved."""

    name: str
    cpus: int
    memory_mib: int
    disk_path: str  # the overlay volume's path
    seed_path: str  # the seed ISO volume's path
    console_log: str
    network: Network
    accel: Accel
    firmware: Firmware
    ssh_port: int
    metadata: Metadata
    arch: Arch = Arch.X86_64
    disk_cache: str | None = None  # the overlay's cache mode (None: QEMU's default); "unsafe" only for throwaways
    confidential: Confidential | None = None  # an AMD SEV guest (x86_64 under KVM only)


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    node = ET.SubElement(parent, tag, attrs)
    if text is not None:
        node.text = text
    return node


def _root_slot(device: ET.Element, slot: int) -> None:
    """Put a PCI device on q35's root bus as an integrated endpoint: libvirt then adds no pcie-root-port for it,
    one device (and one hot-plug controller) less for the guest kernel to probe at boot (see README, Guest hardware).
    """
    _sub(device, "address", type="pci", domain="0x0000", bus="0x00", slot=f"0x{slot:02x}", function="0x0")


def _disk(
    devices: ET.Element,
    path: str,
    target: str,
    fmt: str,
    slot: int,
    *,
    readonly: bool = False,
    cache: str | None = None,
) -> None:
    disk = _sub(devices, "disk", type="file", device="disk")
    driver = _sub(disk, "driver", name="qemu", type=fmt, discard="unmap" if not readonly else "ignore")
    if cache:
        driver.set("cache", cache)
    _sub(disk, "source", file=path)
    # virtio: Debian's cloud kernel has no AHCI driver, so a SATA CD-ROM on q35 would be invisible to it.
    _sub(disk, "target", dev=target, bus="virtio")
    if readonly:
        _sub(disk, "readonly")
    _root_slot(disk, slot)


def _interface(devices: ET.Element, network: Network) -> None:
    if network.kind in (NetworkKind.DEFAULT, NetworkKind.NETWORK):
        iface = _sub(devices, "interface", type="network")
        _sub(iface, "source", network=network.source)
    elif network.kind is NetworkKind.BRIDGE:
        iface = _sub(devices, "interface", type="bridge")
        _sub(iface, "source", bridge=network.source)
    else:
        return
    _sub(iface, "model", type="virtio")


def _extra_hostfwds(forwards: tuple[Forward, ...]) -> str:
    """`up --forward` rules, beside the SSH one."""
    return "".join(f",{f.hostfwd}" for f in forwards)


def _filesystems(devices: ET.Element, mounts: tuple[Mount, ...]) -> None:
    """`up --mount` folders: virtiofs (passthrough is the only mode virtiofsd has) or 9p (mapped); a read-only one
    is read-only on the host, whatever the guest remounts."""
    for index, mount in enumerate(mounts):
        virtiofs = mount.driver is Driver.VIRTIOFS
        fs = _sub(devices, "filesystem", type="mount", accessmode="passthrough" if virtiofs else "mapped")
        if virtiofs:
            _sub(fs, "driver", type="virtiofs")
            if mount.readonly:  # libvirt 9.0 refuses <readonly/> on virtiofs: qinst's virtiofsd binds the folder ro
                _sub(fs, "binary", path=readonly_helper())
        _sub(fs, "source", dir=mount.host_dir)
        _sub(fs, "target", dir=tag(index))
        if mount.readonly and not virtiofs:  # QEMU refuses the guest's writes
            _sub(fs, "readonly")


def _shared_memory(root: ET.Element, mounts: tuple[Mount, ...]) -> None:
    """virtiofs needs the guest's memory shared with virtiofsd."""
    if any(m.driver is Driver.VIRTIOFS for m in mounts):
        backing = _sub(root, "memoryBacking")
        _sub(backing, "source", type="memfd")
        _sub(backing, "access", mode="shared")


def _user_network(root: ET.Element, network: Network, ssh_port: int, forwards: tuple[Forward, ...] = ()) -> None:
    # Debian 12's libvirt has passt disabled, so <portForward> is refused: user-mode networking (SLIRP) with a
    # hostfwd bound to 127.0.0.1 goes on QEMU's command line, with its NIC on a fixed slot of q35's root bus.
    netdev = f"user,id={USER_NETDEV},hostfwd=tcp:127.0.0.1:{ssh_port}-:22" + _extra_hostfwds(forwards)
    if network.restrict:
        netdev += ",restrict=on"
    cmdline = ET.SubElement(root, f"{{{QEMU_NS}}}commandline")
    for arg in ("-netdev", netdev, "-device", f"virtio-net-pci,netdev={USER_NETDEV},bus=pcie.0,addr=0x1e"):
        ET.SubElement(cmdline, f"{{{QEMU_NS}}}arg", value=arg)


def domain_xml(spec: InstanceSpec) -> str:
    """The libvirt domain XML for spec (q35 for x86_64, virt for aarch64; virtio everywhere; the serial console
    recorded to a file)."""
    ET.register_namespace("qemu", QEMU_NS)
    ET.register_namespace(METADATA_KEY, METADATA_NS)
    accel = Accel.TCG if spec.accel is Accel.AUTO else spec.accel
    root = ET.Element("domain", type=accel.domain_type)
    _sub(root, "name", spec.name)
    _sub(root, "title", f"qinst: {spec.metadata.image}")
    meta = _sub(root, "metadata")
    meta.append(_namespaced(ET.fromstring(spec.metadata.to_xml())))
    _sub(root, "memory", str(spec.memory_mib), unit="MiB")
    _sub(root, "vcpu", str(spec.cpus))
    os_el = _sub(root, "os")
    if spec.firmware is Firmware.UEFI:
        os_el.set("firmware", "efi")
        fw = _sub(os_el, "firmware")
        # Secure boot needs SMM, which TCG cannot provide here; cloud images boot without it.
        _sub(fw, "feature", enabled="no", name="secure-boot")
        _sub(fw, "feature", enabled="no", name="enrolled-keys")
    _sub(os_el, "type", "hvm", arch=str(spec.arch), machine=spec.arch.machine)
    _sub(os_el, "boot", dev="hd")
    features = _sub(root, "features")
    _sub(features, "acpi")
    if spec.arch is Arch.X86_64:
        _sub(features, "apic")
    if accel is Accel.KVM:
        _sub(root, "cpu", mode="host-passthrough")
    elif spec.arch.tcg_cpu:
        cpu = _sub(root, "cpu", mode="custom", match="exact", check="none")
        _sub(cpu, "model", spec.arch.tcg_cpu, fallback="forbid")
    else:
        _sub(root, "cpu", mode="maximum", check="none")
    clock = _sub(root, "clock", offset="utc")
    if spec.arch is Arch.X86_64:
        # virt-install's timers for modern guests: no HPET (KVM guests use kvmclock; under TCG the guest falls back
        # to acpi_pm), RTC ticks caught up, PIT ticks delayed rather than injected in a burst.
        _sub(clock, "timer", name="rtc", tickpolicy="catchup")
        _sub(clock, "timer", name="pit", tickpolicy="delay")
        _sub(clock, "timer", name="hpet", present="no")
    _sub(root, "on_poweroff", "destroy")
    _sub(root, "on_reboot", "restart")
    _sub(root, "on_crash", "destroy")
    devices = _sub(root, "devices")
    # Guest hardware chosen by bench/hardware.py (README, "Guest hardware"): the disks, the virtio-serial
    # controller and the RNG on q35's root bus (slots 0x02-0x05; the user-mode NIC sits at 0x1e), no USB
    # controller (no tablet or keyboard is needed without graphics), no memory balloon.
    _disk(devices, spec.disk_path, "vda", "qcow2", 0x02, cache=spec.disk_cache)
    _disk(devices, spec.seed_path, "vdb", "raw", 0x03, readonly=True)
    _root_slot(_sub(devices, "controller", type="virtio-serial", index="0"), 0x04)
    _sub(devices, "controller", type="usb", model="none")
    _interface(devices, spec.network)
    # The first serial port: an ISA UART (ttyS0) on x86_64, the virt machine's PL011 (ttyAMA0) on aarch64. The
    # images' kernel command lines write to it: cloud-init's host keys and final line are read from its log.
    serial = _sub(devices, "serial", type="pty")
    _sub(serial, "log", file=spec.console_log, append="off")
    _sub(serial, "target", port="0")
    console = _sub(devices, "console", type="pty")
    _sub(console, "target", type="serial", port="0")
    channel = _sub(devices, "channel", type="unix")
    _sub(channel, "target", type="virtio", name="org.qemu.guest_agent.0")
    rng = _sub(devices, "rng", model="virtio")  # entropy for the guest's first boot (sshd's host keys)
    _sub(rng, "backend", "/dev/urandom", model="random")
    _root_slot(rng, 0x05)
    _sub(devices, "memballoon", model="none")
    _filesystems(devices, spec.metadata.mounts)
    _shared_memory(root, spec.metadata.mounts)
    if spec.network.kind is NetworkKind.USER:
        _user_network(root, spec.network, spec.ssh_port, spec.metadata.forwards)
    if spec.confidential is not None:
        _confidential(root, spec.confidential)
    return ET.tostring(root, encoding="unicode")


def _confidential(root: ET.Element, sev: Confidential) -> None:
    """An AMD SEV guest (libvirt's launch_security_sev kbase): the firmware as one read-only, stateless pflash (no
    NVRAM: the measurement covers exactly that file), memory locked (encrypted pages cannot be swapped), virtio
    devices through the IOMMU (the guest's DMA goes through bounce buffers it shares on purpose), no option ROM on
    the NIC (iPXE is not SEV-aware), no reboot (a rebooted guest would run unmeasured), and the launch security
    parameters: the host's C-bit position and the owner's policy, certificate and session."""
    os_el = root.find("os")
    assert os_el is not None
    os_el.attrib.pop("firmware", None)
    for child in os_el.findall("firmware"):
        os_el.remove(child)
    loader = ET.Element("loader", readonly="yes", type="pflash", stateless="yes")
    loader.text = sev.firmware
    os_el.insert(1, loader)
    backing = root.find("memoryBacking")
    if backing is None:
        backing = _sub(root, "memoryBacking")
    _sub(backing, "locked")
    on_reboot = root.find("on_reboot")
    if on_reboot is not None:
        on_reboot.text = "destroy"
    devices = root.find("devices")
    assert devices is not None
    for disk in devices.iterfind("disk"):
        driver = disk.find("driver")
        if driver is not None:
            driver.set("iommu", "on")
    for device in (*devices.iterfind("controller[@type='virtio-serial']"), *devices.iterfind("rng"),
                   *devices.iterfind("interface")):  # fmt: skip
        _sub(device, "driver", iommu="on")
    for iface in devices.iterfind("interface"):
        _sub(iface, "rom", enabled="no")
    for arg in root.iterfind(f"{{{QEMU_NS}}}commandline/{{{QEMU_NS}}}arg"):
        if arg.get("value", "").startswith("virtio-net-pci,"):
            arg.set("value", arg.get("value", "") + ",iommu_platform=on,romfile=")
    security = _sub(root, "launchSecurity", type="sev")
    _sub(security, "cbitpos", str(sev.cbitpos))
    _sub(security, "reducedPhysBits", str(sev.reduced_phys_bits))
    _sub(security, "policy", f"0x{sev.policy:04x}")
    _sub(security, "dhCert", sev.dh_cert)
    _sub(security, "session", sev.session)


def _namespaced(element: ET.Element) -> ET.Element:
    """Move element and its children into qinst's metadata namespace."""
    for node in element.iter():
        node.tag = f"{{{METADATA_NS}}}{node.tag}"
    return element


def metadata_from_domain_xml(xml: str) -> Metadata | None:
    """qinst's record from a domain's XML, or None for a domain qinst did not create.

    The XML is untrusted (anyone who can define a domain writes it): what cannot be read is a UsageError."""
    try:
        root = ET.fromstring(xml)
        node = root.find(f"metadata/{{{METADATA_NS}}}instance")
        if node is None:
            return None
        for el in node.iter():
            el.tag = el.tag.split("}", 1)[-1]
        return Metadata.from_xml(ET.tostring(node, encoding="unicode"))
    except UsageError as exc:
        raise UsageError(f"unreadable qinst metadata: {exc.message[:200]}") from exc
    except (ET.ParseError, ValueError, TypeError) as exc:
        raise UsageError(f"unreadable qinst metadata: {str(exc)[:100]!r}") from exc
