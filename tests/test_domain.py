"""Domain XML and qinst's metadata: built as data, read back, accepted by libvirt's test driver."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import replace

import libvirt
import pytest

from qemu_instances.domain import (
    METADATA_NS,
    QEMU_NS,
    Accel,
    Firmware,
    Metadata,
    Network,
    domain_xml,
    metadata_from_domain_xml,
    validate_name,
)
from qemu_instances.errors import UsageError
from testsupport.testdriver import GOOD_RECORD, instance_spec


def test_user_network_forwards_ssh_from_loopback_only() -> None:
    root = ET.fromstring(domain_xml(instance_spec()))
    args = [a.get("value") for a in root.iter(f"{{{QEMU_NS}}}arg")]
    assert args[0] == "-netdev"
    assert "hostfwd=tcp:127.0.0.1:2222-:22" in args[1]
    assert args[3].startswith("virtio-net-pci,netdev=qinstnet0,bus=pcie.0")
    assert root.find("devices/interface") is None


def test_restricted_user_network() -> None:
    root = ET.fromstring(domain_xml(instance_spec(network=Network.parse("user:restrict"))))
    args = [a.get("value") for a in root.iter(f"{{{QEMU_NS}}}arg")]
    assert args[1].endswith(",restrict=on")


def test_tcg_domain_devices() -> None:
    root = ET.fromstring(domain_xml(instance_spec()))
    assert root.get("type") == "qemu"
    assert root.find("os/type").get("machine") == "q35"  # type: ignore[union-attr]
    assert root.find("cpu").get("mode") == "maximum"  # type: ignore[union-attr]
    disks = root.findall("devices/disk")
    assert [d.find("target").get("bus") for d in disks] == ["virtio", "virtio"]  # type: ignore[union-attr]
    assert disks[1].find("readonly") is not None
    assert root.find("devices/serial/log").get("file").endswith("vm1-console.log")  # type: ignore[union-attr]
    assert root.find("devices/channel/target").get("name") == "org.qemu.guest_agent.0"  # type: ignore[union-attr]
    assert root.find("devices/rng").get("model") == "virtio"  # type: ignore[union-attr]


def test_lean_guest_hardware() -> None:
    """What bench/hardware.py measured as fastest without losing a feature (README, Guest hardware)."""
    root = ET.fromstring(domain_xml(instance_spec()))
    assert root.find("devices/controller[@type='usb']").get("model") == "none"  # type: ignore[union-attr]
    assert root.find("devices/memballoon").get("model") == "none"  # type: ignore[union-attr]
    assert root.find("devices/video") is None and root.find("devices/graphics") is None
    timers = {t.get("name"): t.attrib for t in root.iterfind("clock/timer")}
    assert timers["hpet"]["present"] == "no"
    assert timers["rtc"]["tickpolicy"] == "catchup" and timers["pit"]["tickpolicy"] == "delay"
    # The PCI devices sit on q35's root bus, each in its own slot, clear of the user-mode NIC's 0x1e.
    addresses = [a for a in root.iterfind("devices/*/address") if a.get("type") == "pci"]
    assert len(addresses) == 4  # two disks, the virtio-serial controller (agent channel), the RNG
    assert {a.get("bus") for a in addresses} == {"0x00"}
    slots = [int(a.get("slot", ""), 16) for a in addresses]
    assert len(set(slots)) == len(slots) and 0x1E not in slots and all(0 < s < 0x1E for s in slots)
    args = [a.get("value") for a in root.iter(f"{{{QEMU_NS}}}arg")]
    assert args[3].endswith("bus=pcie.0,addr=0x1e")


def test_kvm_keeps_host_passthrough_and_the_same_devices() -> None:
    tcg = ET.fromstring(domain_xml(instance_spec()))
    kvm = ET.fromstring(domain_xml(instance_spec(accel=Accel.KVM)))
    assert kvm.find("cpu").get("mode") == "host-passthrough"  # type: ignore[union-attr]
    assert ET.tostring(kvm.find("devices")) == ET.tostring(tcg.find("devices"))  # type: ignore[arg-type]
    assert ET.tostring(kvm.find("clock")) == ET.tostring(tcg.find("clock"))  # type: ignore[arg-type]


def test_kvm_and_uefi_without_secure_boot() -> None:
    root = ET.fromstring(domain_xml(instance_spec(accel=Accel.KVM, firmware=Firmware.UEFI)))
    assert root.get("type") == "kvm"
    assert root.find("os").get("firmware") == "efi"  # type: ignore[union-attr]
    features = {f.get("name"): f.get("enabled") for f in root.iterfind("os/firmware/feature")}
    assert features == {"secure-boot": "no", "enrolled-keys": "no"}


@pytest.mark.parametrize(
    ("text", "xml_type", "source"),
    [("default", "network", "default"), ("network:lab", "network", "lab"), ("bridge:br0", "bridge", "br0")],
)
def test_libvirt_networks(text: str, xml_type: str, source: str) -> None:
    root = ET.fromstring(domain_xml(instance_spec(network=Network.parse(text))))
    iface = root.find("devices/interface")
    assert iface is not None and iface.get("type") == xml_type
    assert source in (iface.find("source").attrib.values())  # type: ignore[union-attr]
    assert root.find(f"{{{QEMU_NS}}}commandline") is None


def test_no_network() -> None:
    root = ET.fromstring(domain_xml(instance_spec(network=Network.parse("none"))))
    assert root.find("devices/interface") is None
    assert root.find(f"{{{QEMU_NS}}}commandline") is None


@pytest.mark.parametrize("text", ["bogus", "user:open", "network:", "bridge:a b", "default:x"])
def test_bad_networks_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError):
        Network.parse(text)


@pytest.mark.parametrize("name", ["-vm", "VM", "a_b", "a" * 64, "", "vm\n", "vm;rm"])
def test_bad_names(name: str) -> None:
    with pytest.raises(UsageError):
        validate_name(name)


def test_hostile_values_stay_data() -> None:
    meta = Metadata(image="x</image><evil/>&amp;", digest="d", user="u", network="user", volumes=("a&b",))
    xml = domain_xml(instance_spec(metadata=meta))
    back = metadata_from_domain_xml(xml)
    assert back == meta
    assert ET.fromstring(xml).find(".//evil") is None


def test_metadata_round_trip_through_libvirt_test_driver() -> None:
    """The test driver keeps our namespaced <metadata> and returns it in the domain XML."""
    conn = libvirt.open("test:///default")
    try:
        xml = domain_xml(instance_spec(network=Network.parse("none")))
        dom = conn.defineXML(xml)
        try:
            back = metadata_from_domain_xml(dom.XMLDesc(0))
            assert back == instance_spec().metadata
            element = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS)
            assert "vm1-seed.iso" in element
            changed = replace(back, host_keys="ssh-ed25519 AAAA", volumes=())  # type: ignore[type-var]
            dom.setMetadata(
                libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                changed.to_xml(),
                "qinst",
                METADATA_NS,
                libvirt.VIR_DOMAIN_AFFECT_CONFIG,
            )
            assert metadata_from_domain_xml(dom.XMLDesc(0)) == changed
        finally:
            dom.undefine()
    finally:
        conn.close()


def test_foreign_domain_has_no_metadata() -> None:
    assert metadata_from_domain_xml("<domain type='qemu'><name>x</name></domain>") is None


# -- the record's round trip through the domain XML --------------------------------------------------------------------


def _domain_xml(meta_xml: str) -> str:
    return f"<domain><name>vm1</name><metadata>{meta_xml}</metadata></domain>"


@pytest.mark.promise
def test_the_record_survives_the_domain_xml() -> None:
    meta_xml = GOOD_RECORD.to_xml().replace("<instance>", f'<instance xmlns="{METADATA_NS}">', 1)
    assert metadata_from_domain_xml(_domain_xml(meta_xml)) == GOOD_RECORD


@pytest.mark.promise
def test_a_domain_without_qinst_metadata_is_not_an_instance() -> None:
    assert metadata_from_domain_xml("<domain><name>x</name></domain>") is None
    assert metadata_from_domain_xml(_domain_xml('<instance xmlns="http://other.invalid/ns"/>')) is None
    assert metadata_from_domain_xml(_domain_xml("<instance/>")) is None  # not in qinst's namespace


@pytest.mark.promise
def test_missing_fields_take_their_defaults_and_empty_ones_are_empty() -> None:
    xml = f'<instance xmlns="{METADATA_NS}"><image>i</image><digest/><user>u</user><network>user</network>'
    xml += "<ssh-port/><volumes><volume/></volumes></instance>"
    meta = metadata_from_domain_xml(_domain_xml(xml))
    assert meta == Metadata(image="i", digest="", user="u", network="user", ssh_port=0, volumes=("",))


@pytest.mark.promise
def test_fields_outside_qinst_namespace_are_read_not_a_crash() -> None:
    xml = f'<instance xmlns="{METADATA_NS}"><image xmlns="">i</image><digest/><user>u</user>'
    meta = metadata_from_domain_xml(_domain_xml(xml + "<network>user</network></instance>"))
    assert meta is not None and (meta.image, meta.user, str(meta.network)) == ("i", "u", "user")


@pytest.mark.promise
def test_a_record_with_a_non_numeric_port_is_refused() -> None:
    xml = f'<instance xmlns="{METADATA_NS}"><image>i</image><digest/><user>u</user><network>user</network>'
    with pytest.raises(UsageError, match=r"^unreadable qinst metadata: .*22x"):  # says what is wrong
        metadata_from_domain_xml(_domain_xml(xml + "<ssh-port>22x</ssh-port></instance>"))
