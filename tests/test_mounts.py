"""Host folder mounts: parsing, the metadata record, the driver choice, the domain XML and the guest's fstab."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import libvirt
import pytest
import yaml
from test_domain import _spec

from qemu_instances import seed as seeds
from qemu_instances.domain import domain_xml, metadata_from_domain_xml
from qemu_instances.errors import QinstError, UsageError
from qemu_instances.mounts import Driver, Mount, choose_driver, cloud_config, parse_mounts


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/srv/data", Mount("/srv/data", "/srv/data", True)),
        ("/srv/data:/mnt/data", Mount("/srv/data", "/mnt/data", True)),
        ("/srv/data:rw", Mount("/srv/data", "/srv/data", False)),
        ("/srv/data/:/mnt/d:rw", Mount("/srv/data", "/mnt/d", False)),
        ("/srv/data:/mnt/d:ro", Mount("/srv/data", "/mnt/d", True)),
    ],
)
def test_parse(text: str, expected: Mount) -> None:
    assert Mount.parse(text) == expected
    assert Mount.from_record(expected.record()) == expected


@pytest.mark.parametrize(
    "text", ["", "rel/dir", "/a:/b:/c", "/a b", "/a,b", "/a/../etc", "/srv:/etc", "/srv:rel", "/srv:/x:rx", "/srv:/"]
)
def test_parse_refuses(text: str) -> None:
    with pytest.raises(UsageError):
        Mount.parse(text)


@pytest.mark.parametrize("record", ["virtiofs:ro:/a", "nfs:ro:/a:/b", "virtiofs:wr:/a:/b", "9p:rw:/a:/b c"])
def test_bad_records_are_refused(record: str) -> None:
    with pytest.raises(QinstError, match="invalid mount"):
        Mount.from_record(record)


def test_local_host_dir_must_exist(tmp_path: Path) -> None:
    assert parse_mounts([f"{tmp_path}:/mnt/x"], Driver.NINEP, local=True)[0].driver is Driver.NINEP
    with pytest.raises(UsageError, match="is not a folder on this host"):
        parse_mounts([f"{tmp_path}/missing"], Driver.VIRTIOFS, local=True)
    assert parse_mounts([f"{tmp_path}/missing"], Driver.VIRTIOFS, local=False)  # the remote host's folder
    with pytest.raises(UsageError, match="share a guest folder"):
        parse_mounts([f"{tmp_path}:/mnt/x", f"{tmp_path}:/mnt/x:rw"], Driver.VIRTIOFS, local=True)


def _caps(*drivers: str) -> str:
    values = "".join(f"<value>{d}</value>" for d in drivers)
    return f"<domainCapabilities><devices><filesystem supported='yes'><enum name='driverType'>{values}</enum>" + (
        "</filesystem></devices></domainCapabilities>"
    )


def test_driver_choice() -> None:
    assert choose_driver(_caps("path", "handle"), local=True)[0] is Driver.NINEP
    assert choose_driver(_caps("path", "virtiofs"), local=False)[0] is Driver.VIRTIOFS
    driver, why = choose_driver(_caps("path", "virtiofs"), local=True)
    assert (driver is Driver.VIRTIOFS) == Path("/usr/lib/qemu/virtiofsd").exists()
    assert str(driver) in why


def test_domain_xml_virtiofs_and_9p() -> None:
    spec = _spec()
    mounts = (Mount("/srv/a", "/mnt/a", True).record(), Mount("/srv/b", "/mnt/b", False, Driver.NINEP).record())
    spec = replace(spec, metadata=replace(spec.metadata, mounts=mounts))
    root = ET.fromstring(domain_xml(spec))
    fs = root.findall("devices/filesystem")
    assert [f.get("accessmode") for f in fs] == ["passthrough", "mapped"]
    assert fs[0].find("driver").get("type") == "virtiofs"  # type: ignore[union-attr]
    assert [f.find("target").get("dir") for f in fs] == ["qinst0", "qinst1"]  # type: ignore[union-attr]
    assert [f.find("source").get("dir") for f in fs] == ["/srv/a", "/srv/b"]  # type: ignore[union-attr]
    assert fs[1].find("readonly") is None
    assert root.find("memoryBacking/source").get("type") == "memfd"  # type: ignore[union-attr]
    assert root.find("memoryBacking/access").get("mode") == "shared"  # type: ignore[union-attr]
    assert metadata_from_domain_xml(domain_xml(spec)) == spec.metadata

    only_9p = replace(spec, metadata=replace(spec.metadata, mounts=(Mount("/srv", "/m", True, Driver.NINEP).record(),)))
    root = ET.fromstring(domain_xml(only_9p))
    assert root.find("memoryBacking") is None
    assert root.find("devices/filesystem/readonly") is not None  # 9p: QEMU refuses the writes


def test_libvirt_accepts_the_filesystems() -> None:
    spec = _spec()
    mounts = (Mount("/srv/a", "/mnt/a", True).record(), Mount("/srv/b", "/mnt/b", True, Driver.NINEP).record())
    conn = libvirt.open("test:///default")
    try:
        dom = conn.defineXML(domain_xml(replace(spec, metadata=replace(spec.metadata, mounts=mounts))))
        try:
            assert len(ET.fromstring(dom.XMLDesc(0)).findall("devices/filesystem")) == 2
        finally:
            dom.undefine()
    finally:
        conn.close()


def test_seed_mounts_them_from_fstab() -> None:
    mounts = (Mount("/srv/a", "/mnt/a", True), Mount("/srv/b", "/mnt/b", False, Driver.NINEP))
    spec = seeds.SeedSpec(
        hostname="vm1", instance_id="i-1", user="debian", ssh_keys=(), extra_config=cloud_config(mounts)
    )
    config = yaml.safe_load(seeds.render_user_data(spec))
    fstab = config["write_files"][0]
    assert fstab["path"] == "/etc/fstab" and fstab["append"] is True
    assert "qinst0 /mnt/a virtiofs ro,nofail 0 0\n" in fstab["content"]
    assert "qinst1 /mnt/b 9p trans=virtio,version=9p2000.L,msize=262144,rw,nofail 0 0\n" in fstab["content"]
    assert config["runcmd"][-4:] == [["mkdir", "-p", "/mnt/a"], ["mount", "/mnt/a"], ["mkdir", "-p", "/mnt/b"],
                                     ["mount", "/mnt/b"]]  # fmt: skip
    assert cloud_config(()) == {}
