"""Prune against the real libvirtd (qemu:///system): an image that a defined qinst domain names is kept.

The shared `qinst` pool of this machine belongs to every test running on it, so prune is pointed at a pool of
this test's own (a transient directory pool with a unique name) holding base volumes of both images.
"""

from __future__ import annotations

import os
import secrets
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest
from mirror import make_qcow2

from qemu_instances import host as host_module
from qemu_instances import instances
from qemu_instances.domain import METADATA_NS, Metadata
from qemu_instances.errors import UsageError
from qemu_instances.images import ImageStore
from qemu_instances.settings import Settings

pytestmark = pytest.mark.libvirt
URI = "qemu:///system"


def _define(conn: Any, name: str, digest: str) -> Any:
    """A defined (never started) qinst domain whose metadata names `digest`."""
    root = ET.Element("domain", type="qemu")
    ET.SubElement(root, "name").text = name
    ET.SubElement(root, "memory", unit="MiB").text = "64"
    ET.SubElement(ET.SubElement(root, "os"), "type", arch="x86_64", machine="q35").text = "hvm"
    node = ET.fromstring(Metadata(image="kept", digest=digest, user="u", network="none").to_xml())
    for el in node.iter():
        el.tag = f"{{{METADATA_NS}}}{el.tag}"
    ET.SubElement(root, "metadata").append(node)
    return conn.defineXML(ET.tostring(root, encoding="unicode"))


@pytest.fixture
def own_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    name = f"qinst-prune-{secrets.token_hex(3)}"
    directory = tmp_path / "pool"
    directory.mkdir()
    directory.chmod(0o755)
    conn = libvirt.open(URI)
    root = ET.Element("pool", type="dir")
    ET.SubElement(root, "name").text = name
    ET.SubElement(ET.SubElement(root, "target"), "path").text = str(directory)
    pool = conn.storagePoolCreateXML(ET.tostring(root, encoding="unicode"), 0)
    monkeypatch.setattr(host_module, "POOL_NAME", name)
    monkeypatch.setattr(instances, "POOL_NAME", name)
    try:
        yield pool
    finally:
        for vol in pool.listAllVolumes():
            vol.delete(0)
        pool.destroy()
        conn.close()


def _volume(pool: Any, name: str) -> None:
    xml = f"<volume><name>{name}</name><capacity unit='bytes'>1024</capacity>"
    xml += "<target><format type='raw'/></target></volume>"
    pool.createXML(xml, 0)


def test_prune_keeps_the_image_of_a_defined_instance(tmp_path: Path, own_pool: Any) -> None:
    settings = Settings(connect=URI, cache_dir=tmp_path / "cache")
    store = ImageStore(settings)
    kept = store.pull(store.resolve(str(make_qcow2(tmp_path / "kept.qcow2", 1, seed=21).file)))
    gone = store.pull(store.resolve(str(make_qcow2(tmp_path / "gone.qcow2", 1, seed=22).file)))
    for image in (kept, gone):
        _volume(own_pool, image.digest.filename)
        _volume(own_pool, image.digest.filename + host_module.VERIFIED)
    name = f"qinst-prune-{secrets.token_hex(3)}"
    conn = libvirt.open(URI)
    dom = _define(conn, name, str(kept.digest))
    try:
        removed = dict(instances.prune(settings, store))
    finally:
        dom.undefine()
        conn.close()
    assert set(removed) == {
        str(gone.path),
        f"volume {own_pool.name()}/{gone.digest.filename}",
        f"volume {own_pool.name()}/{gone.digest.filename}{host_module.VERIFIED}",
    }
    assert removed[str(gone.path)] == gone.size
    assert kept.path.exists() and not gone.path.exists()
    own_pool.refresh(0)
    assert sorted(own_pool.listVolumes()) == [kept.digest.filename, kept.digest.filename + host_module.VERIFIED]


def _filled_volume(pool: Any, directory: Path, name: str, size: int) -> None:
    """A volume whose bytes really take `size` bytes on the host (a sparse one would take none)."""
    _volume(pool, name)
    (directory / name).write_bytes(b"\x01" * size)
    pool.refresh(0)


def test_prune_reports_the_bytes_each_volume_freed_and_keeps_other_volumes(tmp_path: Path, own_pool: Any) -> None:
    settings = Settings(connect=URI, cache_dir=tmp_path / "cache")
    store = ImageStore(settings)
    gone = store.pull(store.resolve(str(make_qcow2(tmp_path / "gone.qcow2", 1, seed=23).file)))
    directory = tmp_path / "pool"
    _filled_volume(own_pool, directory, "aaa-disk.qcow2", 512)  # an instance's disk: not a base volume
    _filled_volume(own_pool, directory, gone.digest.filename, 8192)
    _filled_volume(own_pool, directory, gone.digest.filename + host_module.VERIFIED, 4096)
    removed = dict(instances.prune(settings, store))
    assert removed[f"volume {own_pool.name()}/{gone.digest.filename}"] == 8192
    assert removed[f"volume {own_pool.name()}/{gone.digest.filename}{host_module.VERIFIED}"] == 4096
    own_pool.refresh(0)
    assert own_pool.listVolumes() == ["aaa-disk.qcow2"]


def test_prune_keeps_a_base_volume_whose_upload_is_claimed_and_alive(tmp_path: Path, own_pool: Any) -> None:
    """Another client is uploading an image no instance uses yet (its `up` is about to): the volume and its claim
    stay. Once neither changed for STALE_UPLOAD seconds (the client died), both go."""
    settings = Settings(connect=URI, cache_dir=tmp_path / "cache")
    store = ImageStore(settings)
    image = store.pull(store.resolve(str(make_qcow2(tmp_path / "up.qcow2", 1, seed=24).file)))
    directory = tmp_path / "pool"
    name, claim = image.digest.filename, image.digest.filename + host_module.UPLOADING
    _filled_volume(own_pool, directory, claim, 32)
    _filled_volume(own_pool, directory, name, 4096)
    # other images' volumes, listed before and after the claimed one (volumes are judged in name order): pruned all
    # the same, the claimed image is skipped, not the end of the pass
    unused = [f"sha256-{secrets.token_hex(32)}" for _ in range(3)] + ["sha512-" + "f" * 128]
    for other in unused:
        _filled_volume(own_pool, directory, other, 4096)
        _filled_volume(own_pool, directory, other + host_module.VERIFIED, 4096)
    removed = dict(instances.prune(settings, store))
    expected = {f"volume {own_pool.name()}/{v}" for other in unused for v in (other, other + host_module.VERIFIED)}
    assert {key for key in removed if key.startswith("volume ")} == expected
    own_pool.refresh(0)
    assert sorted(own_pool.listVolumes()) == sorted([name, claim])
    # either of them fresh keeps both: a claim just made (no byte written yet), a volume still being written
    old, now = time.time() - host_module.STALE_UPLOAD - 60, time.time()
    for stale, fresh in ((name, claim), (claim, name)):
        os.utime(directory / stale, (old, old))
        os.utime(directory / fresh, (now, now))
        own_pool.refresh(0)
        assert not any(key.startswith("volume ") for key in dict(instances.prune(settings, store))), stale
    os.utime(directory / name, (old, old))
    own_pool.refresh(0)
    removed = dict(instances.prune(settings, store))
    assert {f"volume {own_pool.name()}/{name}", f"volume {own_pool.name()}/{claim}"} <= set(removed)
    own_pool.refresh(0)
    assert own_pool.listVolumes() == []


def test_prune_removes_the_volumes_of_instances_whose_domain_is_gone_once_past_the_grace(
    tmp_path: Path, own_pool: Any
) -> None:
    """An `up` killed before it defined its domain leaves its disk and seed: prune removes them (each of two such
    instances, sizes reported) once ORPHAN_GRACE passed; a younger one may be an `up` still running: kept."""
    settings = Settings(connect=URI, cache_dir=tmp_path / "cache")
    store = ImageStore(settings)
    directory = tmp_path / "pool"
    tag = secrets.token_hex(3)
    dead = [f"qinst-dead{i}-{tag}" for i in (1, 2)]
    young = f"qinst-young-{tag}"
    old = time.time() - instances.ORPHAN_GRACE - 60
    for name in dead:
        _filled_volume(own_pool, directory, instances.disk_volume(name), 8192)  # whole blocks: the bytes it takes
        _filled_volume(own_pool, directory, instances.seed_volume(name), 4096)
        for vol in (instances.disk_volume(name), instances.seed_volume(name)):
            os.utime(directory / vol, (old, old))
    _filled_volume(own_pool, directory, instances.disk_volume(young), 4096)
    own_pool.refresh(0)
    removed = dict(instances.prune(settings, store))
    assert removed == {
        **{f"volume {own_pool.name()}/{instances.disk_volume(name)}": 8192 for name in dead},
        **{f"volume {own_pool.name()}/{instances.seed_volume(name)}": 4096 for name in dead},
    }
    own_pool.refresh(0)
    assert own_pool.listVolumes() == [instances.disk_volume(young)]


def test_prune_goes_on_past_temporaries_it_cannot_remove(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stale temporary removed meanwhile (by another prune), or one that cannot be removed, does not stop prune
    from removing the others."""
    store = ImageStore(Settings(connect="test:///default", cache_dir=tmp_path / "cache"))
    store.cache.dir.mkdir(parents=True, exist_ok=True)
    real = store.cache.dir / ".partial-of-a-dead-pull"
    real.write_bytes(b"x" * 100)
    gone = store.cache.dir / ".removed-by-another-prune"
    unremovable = store.cache.dir / ("." + "n" * 300)  # lstat() fails (name too long): an OSError, not "gone"
    monkeypatch.setattr(store.cache, "stale_temporaries", lambda: [gone, unremovable, real])
    assert store.prune(set()) == [(real, 100)]
    assert not real.exists()


@pytest.fixture
def test_driver(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """libvirt's test driver (shared within this process); qinst's pool name made unique, so that no prune here
    can reach a real pool even through a wrong connection."""
    name = f"qinst-prune-{secrets.token_hex(3)}"
    monkeypatch.setattr(host_module, "POOL_NAME", name)
    monkeypatch.setattr(instances, "POOL_NAME", name)
    conn = libvirt.open("test:///default")
    try:
        yield conn
    finally:
        conn.close()


def test_prune_without_a_qinst_pool_still_prunes_the_cache(tmp_path: Path, test_driver: Any) -> None:
    settings = Settings(connect="test:///default", cache_dir=tmp_path / "cache")
    store = ImageStore(settings)
    gone = store.pull(store.resolve(str(make_qcow2(tmp_path / "gone.qcow2", 1, seed=24).file)))
    assert instances.prune(settings, store) == [(str(gone.path), gone.size)]
    assert not gone.path.exists()
    assert host_module.POOL_NAME not in test_driver.listStoragePools()  # nothing was created to prune it


def test_prune_refuses_while_an_instance_record_is_invalid(tmp_path: Path, test_driver: Any) -> None:
    settings = Settings(connect="test:///default", cache_dir=tmp_path / "cache")
    store = ImageStore(settings)
    image = store.pull(store.resolve(str(make_qcow2(tmp_path / "img.qcow2", 1, seed=25).file)))
    root = ET.Element("domain", type="test")
    ET.SubElement(root, "name").text = "prune-bad"
    ET.SubElement(root, "memory", unit="MiB").text = "64"
    ET.SubElement(ET.SubElement(root, "os"), "type").text = "hvm"
    node = ET.fromstring(Metadata(image="i", digest="", user="root", network="none").to_xml())  # root: invalid
    for el in node.iter():
        el.tag = f"{{{METADATA_NS}}}{el.tag}"
    ET.SubElement(root, "metadata").append(node)
    dom = test_driver.defineXML(ET.tostring(root, encoding="unicode"))
    try:
        with pytest.raises(UsageError, match=r"^instance 'prune-bad' has invalid qinst metadata: cannot tell which"):
            instances.prune(settings, store)
    finally:
        dom.undefine()
    assert image.path.exists()
