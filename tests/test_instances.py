"""instances.py: the metadata read back from libvirt, checked field by field; records that break nothing else;
hostile metadata through the real `qinst` on a test-driver host file; `start`'s host-key check against a real sshd;
orphan volumes; and prune against the real libvirtd (qemu:///system): an image a defined qinst domain names is kept.
"""

from __future__ import annotations

import json
import os
import secrets
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import libvirt
import pytest
from conftest import RunQinst
from mirror import make_qcow2

from qemu_instances import host as host_module
from qemu_instances import instances
from qemu_instances.domain import METADATA_NS, Metadata
from qemu_instances.errors import GuestFailed, UsageError
from qemu_instances.host import Host
from qemu_instances.images import ImageStore
from qemu_instances.instances import disk_volume, remove_logs, start, validate_metadata
from qemu_instances.settings import Settings
from testsupport.hostkeys import HostKeySshd
from testsupport.testdriver import GOOD_RECORD, NS, RECORD_KEY, record_domain_xml, sample_record

# -- metadata read back from libvirt is checked field by field ---------------------------------------------------------


@pytest.mark.promise
def test_a_valid_record_passes_unchanged() -> None:
    assert validate_metadata("vm1", GOOD_RECORD) is GOOD_RECORD


@pytest.mark.promise
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"user": "-oProxyCommand=x"}, "invalid user name"),
        ({"user": "root"}, "invalid user name"),
        ({"network": "bogus:thing"}, "network"),
        ({"digest": "sha512:xyz"}, "sha512"),
        ({"instance_id": "-id"}, "invalid instance id"),
        ({"ssh_port": 0}, "invalid ssh-port 0"),
        ({"ssh_port": 65536}, "invalid ssh-port 65536"),
        ({"ssh_port": -22}, "invalid ssh-port -22"),
        ({"ssh_host": "-oProxyCommand=x"}, "invalid host name"),
        ({"ssh_host": "a b"}, "invalid host name"),
        ({"host_keys": f"{RECORD_KEY}\nnot a key\n"}, "invalid host-keys line"),
        ({"host_keys": f"{RECORD_KEY} root@vm"}, "invalid host-keys line"),
        ({"private_key": "relative/id"}, "invalid private-key path"),
        ({"private_key": "/home/u/id\nProxyCommand x"}, "invalid private-key path"),
        ({"private_key": "/home/u/id\x1f"}, "invalid private-key path"),
        ({"accel": "xen"}, "invalid accel 'xen'"),
        ({"accel": "KVM"}, "invalid accel"),
        ({"console_log": "/var/log/other-console.log"}, "console-log is not this instance's console log"),
        ({"volumes": ("other.qcow2",)}, "volumes names another instance's volume 'other.qcow2'"),
        ({"volumes": (disk_volume("vm1"), "debian-12-sha512.qcow2")}, "another instance's volume"),
    ],
)
def test_each_bad_field_is_refused_with_its_name(change: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        validate_metadata("vm1", replace(GOOD_RECORD, **change))  # type: ignore[arg-type]


@pytest.mark.promise
def test_long_bad_values_are_cut_in_the_message() -> None:
    with pytest.raises(UsageError, match=r"^invalid accel 'xxxxxxxxxxxxxxxxxxxx'$"):
        validate_metadata("vm1", replace(GOOD_RECORD, accel="x" * 30))
    with pytest.raises(UsageError, match=r"^volumes names another instance's volume '" + "v" * 80 + "'$"):
        validate_metadata("vm1", replace(GOOD_RECORD, volumes=("v" * 100, "w" * 100)))


@pytest.mark.promise
def test_a_bad_name_is_refused() -> None:
    with pytest.raises(UsageError, match="invalid instance name"):
        validate_metadata("-vm1", GOOD_RECORD)


@pytest.mark.promise
@pytest.mark.parametrize(
    "change",
    [
        {"ssh_port": 1},
        {"ssh_port": 65535},
        {"ssh_host": "::1"},
        {"ssh_host": "vm1-host"},
        {"ssh_host": ""},
        {"digest": ""},  # pins no image
        {"instance_id": ""},
        {"private_key": ""},
        {"private_key": "/home/u/my keys/id"},  # a space is not a control character
        {"host_keys": ""},
        {"host_keys": f"\n  \n{RECORD_KEY}\n\n"},  # blank lines are not keys
        {"host_keys": f"  {RECORD_KEY}  "},
        {"accel": ""},
        {"accel": "kvm"},
        {"console_log": ""},
        {"volumes": ()},
    ],
)
def test_the_edges_of_each_field_are_accepted(change: dict[str, object]) -> None:
    meta = replace(GOOD_RECORD, **change)  # type: ignore[arg-type]
    assert validate_metadata("vm1", meta) is meta


@pytest.mark.promise
def test_recorded_forwards_and_mounts_are_validated() -> None:
    """`up --forward`/`--mount` rules read back from libvirt are untrusted: a valid record passes, a forged one
    (a port out of range, a mount of a relative or '..' path) is refused."""
    good = replace(GOOD_RECORD, forwards=("127.0.0.1:8080:80",), mounts=("virtiofs:ro:/srv/data:/mnt/data",))
    assert validate_metadata("vm1", good) is good
    for bad, message in [
        ({"forwards": ("127.0.0.1:8080:99999",)}, "invalid forward '127.0.0.1:8080:99999'"),
        ({"forwards": ("8080",)}, "invalid forward '8080'"),
        ({"mounts": ("virtiofs:ro:srv:/mnt",)}, "invalid mount 'virtiofs:ro:srv:/mnt'"),
        ({"mounts": ("virtiofs:rw:/srv/../etc:/mnt",)}, "invalid mount"),
    ]:
        with pytest.raises(UsageError, match=message):
            validate_metadata("vm1", replace(good, **bad))  # type: ignore[arg-type]


# -- one bad record breaks nothing else; logs removed by exact name ----------------------------------------------------


def test_every_way_a_record_can_break_is_invalid_never_a_crash() -> None:
    bad = [
        "<instance><created>2026-11-01T10:00:00</created></instance>",
        "<instance><ssh-port>99999999999999999999999999</ssh-port></instance>",
        "<instance><forwards><forward>1:2:3:4</forward></forwards></instance>",
        "<instance><mounts><mount>virtiofs:ro://etc:/etc</mount></mounts></instance>",
        "<instance" + "><a>" * 2000 + "</a>" * 2000 + "</instance>",
        "not xml at all",
        '<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaaaaaaaa">]><instance>&a;</instance>',
    ]
    for text in bad:
        inst = instances.record_of("web1", "running", text)
        assert inst is not None and inst.invalid, text[:60]


def test_removing_an_instances_logs_touches_no_other_instances(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    mine = ["web-fs-console.log", "web-fs.log", "web-fs-fs0-virtiofsd.log", "web-fs-fs12-virtiofsd.log"]
    theirs = ["web-fsdata-console.log", "web-fsdata-fs0-virtiofsd.log", "web-fs1-virtiofsd.log.old", "web-fsx.log"]
    for name in mine + theirs:
        (logs / name).write_text("x")
    monkeypatch.setattr(instances, "console_log_path", lambda host, pool, name: logs / f"{name}-console.log")

    class Local:
        is_local = True

    remove_logs(Local(), "web-fs")  # type: ignore[arg-type]
    assert sorted(p.name for p in logs.iterdir()) == sorted(theirs)


# -- hostile metadata through the real entry point ---------------------------------------------------------------------


def _node(tmp_path: Path, name: str, fields: str, state: str = "running") -> str:
    """A test-driver host file holding one domain with the given qinst <metadata> children; its URI."""
    path = tmp_path / "node.xml"
    path.write_text(
        f"""<node>
  <domain type="test" xmlns:test="http://libvirt.org/schemas/domain/test/1.0">
    <name>{name}</name><memory>65536</memory><os><type>hvm</type></os>
    <metadata><q:instance xmlns:q="{NS}">{fields}</q:instance></metadata>
    <test:runstate>{1 if state == "running" else 5}</test:runstate>
  </domain>
</node>"""
    )
    return f"test://{path}"


def _fields(**override: str) -> str:
    values = {
        "image": "debian-12",
        "digest": "sha256:" + "ab" * 32,
        "user": "cloud",
        "network": "user",
        "ssh-host": "127.0.0.1",
        "ssh-port": "2222",
        "host-keys": "ssh-ed25519 " + "A" * 68,
        **override,
    }
    return "".join(f"<q:{k}>{v}</q:{k}>" for k, v in values.items())


def test_a_valid_record_is_listed(qinst: RunQinst, tmp_path: Path) -> None:
    uri = _node(tmp_path, "good", _fields())
    listed = qinst("--connect", uri, "ls", "--json")
    assert listed.returncode == 0, listed.stderr
    assert '"state": "running"' in listed.stdout and '"invalid"' not in listed.stdout


def test_user_with_an_ssh_option_is_refused(qinst: RunQinst, tmp_path: Path) -> None:
    witness = tmp_path / "pwned"
    uri = _node(tmp_path, "evil", _fields(user=f"-oProxyCommand=touch {witness}"))
    listed = qinst("--connect", uri, "ls")
    assert listed.returncode == 0 and "evil  invalid" in listed.stdout, listed.stdout + listed.stderr
    debug = qinst("--debug", "--connect", uri, "ls")
    assert "invalid user name" in debug.stderr
    entered = qinst("--connect", uri, "ssh", "evil", "--", "true")
    assert entered.returncode == 2 and "invalid qinst metadata" in entered.stderr
    assert "rm --force evil" in entered.stderr
    assert not witness.exists()


def test_a_bad_port_does_not_break_ls_for_the_others(qinst: RunQinst, tmp_path: Path) -> None:
    uri = _node(tmp_path, "badport", _fields(**{"ssh-port": "abc"}))
    listed = qinst("--connect", uri, "ls", "--json")
    assert listed.returncode == 0, listed.stderr
    assert '"state": "invalid"' in listed.stdout
    pruned = qinst("--connect", uri, "--cache-dir", str(tmp_path / "cache"), "prune")
    assert pruned.returncode == 2 and "rm --force badport" in pruned.stderr


def test_console_log_elsewhere_is_neither_printed_nor_deleted(qinst: RunQinst, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("do not print me\n")
    uri = _node(tmp_path, "peek", _fields(**{"console-log": str(secret)}), state="shutoff")
    logs = qinst("--connect", uri, "logs", "peek")
    assert logs.returncode == 2 and "do not print me" not in logs.stdout
    removed = qinst("--connect", uri, "rm", "peek")
    assert removed.returncode == 2  # invalid: only rm --force acts on it
    forced = qinst("--connect", uri, "rm", "--force", "peek")
    assert forced.returncode == 0, forced.stderr
    assert secret.read_text() == "do not print me\n"


def test_volumes_of_another_instance_are_refused(qinst: RunQinst, tmp_path: Path) -> None:
    vols = "<q:volumes><q:volume>victim.qcow2</q:volume></q:volumes>"
    uri = _node(tmp_path, "thief", _fields() + vols, state="shutoff")
    listed = qinst("--connect", uri, "--debug", "ls")
    assert "thief  invalid" in listed.stdout and "victim.qcow2" in listed.stderr


# -- `start` checks the recorded host key (a real sshd, libvirt's test driver) -----------------------------------------


def _qinst_domain(conn: object, name: str, meta: Metadata) -> object:
    root = ET.Element("domain", type="test")
    ET.SubElement(root, "name").text = name
    ET.SubElement(root, "memory", unit="MiB").text = "64"
    ET.SubElement(ET.SubElement(root, "os"), "type").text = "hvm"
    node = ET.fromstring(meta.to_xml())
    for el in node.iter():
        el.tag = f"{{{METADATA_NS}}}{el.tag}"
    ET.SubElement(root, "metadata").append(node)
    return conn.defineXML(ET.tostring(root, encoding="unicode"))  # type: ignore[attr-defined]


@pytest.mark.parametrize("recorded", ["other", "key"])
def test_start_refuses_a_server_with_a_key_other_than_the_recorded_one(
    hostkey_sshd: HostKeySshd, recorded: str
) -> None:
    """`start` on a domain (libvirt's test driver) whose recorded address is the sshd."""
    key = getattr(hostkey_sshd, recorded)
    meta = Metadata(
        image="qinst-test", digest="sha512:" + "0" * 128, user="debian", network="user",
        ssh_host="127.0.0.1", ssh_port=hostkey_sshd.port, host_keys=f"{key[0]} {key[1]}",
    )  # fmt: skip
    with Host("test:///default") as host:
        dom = _qinst_domain(host.conn, f"hostkeys-{recorded}", meta)
        try:
            if recorded == "other":
                with pytest.raises(GuestFailed, match="offers host keys that were not recorded"):
                    start(host, f"hostkeys-{recorded}", timeout=20)
            else:
                assert start(host, f"hostkeys-{recorded}", timeout=20).state == "running"
        finally:
            if dom.isActive():  # type: ignore[attr-defined]
                dom.destroy()  # type: ignore[attr-defined]
            dom.undefine()  # type: ignore[attr-defined]


# -- orphan volumes (libvirt's test driver) ----------------------------------------------------------------------------


NODE_XML = """<node>
  <domain type="test"><name>alive</name><memory>65536</memory><os><type>hvm</type></os></domain>
  <pool type="dir">
    <name>qinst</name>
    <target><path>/qinst-test-pool</path></target>
    <volume type="file"><name>gone-1.qcow2</name><capacity>1024</capacity></volume>
    <volume type="file"><name>gone-1-seed.iso</name><capacity>512</capacity></volume>
    <volume type="file"><name>alive.qcow2</name><capacity>1024</capacity></volume>
    <volume type="file"><name>alive-seed.iso</name><capacity>512</capacity></volume>
    <volume type="file"><name>notes.txt</name><capacity>1</capacity></volume>
  </pool>
</node>
"""


@pytest.mark.libvirt
def test_ls_rm_and_prune_of_orphan_volumes(qinst: RunQinst, tmp_path: Path) -> None:
    """libvirt's test driver: a pool holding an orphan's volumes, a live domain's, and a stranger's file."""
    pytest.importorskip("libvirt")
    node = tmp_path / "node.xml"
    node.write_text(NODE_XML)
    args = ["--connect", f"test://{node}", "--cache-dir", str(tmp_path / "cache")]

    listed = qinst(*args, "ls", "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == [
        {"name": "gone-1", "state": "orphan", "volumes": ["gone-1-seed.iso", "gone-1.qcow2"]}
    ]
    table = qinst(*args, "ls").stdout.splitlines()
    assert table[1].split() == ["gone-1", "orphan", "-", "-", "-", "-"]

    rm = qinst(*args, "rm", "gone-1")
    assert rm.returncode == 0, rm.stderr
    assert "volume gone-1.qcow2" in rm.stderr and "volume gone-1-seed.iso" in rm.stderr
    assert qinst(*args, "rm", "alive").returncode == 2  # a domain that is not qinst's: its volumes are not orphans

    pruned = qinst(*args, "prune", "--json")  # each command is a fresh test-driver state: the orphan is back
    assert pruned.returncode == 0, pruned.stderr
    assert json.loads(pruned.stdout) == [
        {"path": "volume qinst/gone-1-seed.iso", "size": 512},
        {"path": "volume qinst/gone-1.qcow2", "size": 1024},
    ]


# -- prune against the real libvirtd -----------------------------------------------------------------------------------


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


@pytest.mark.libvirt
@pytest.mark.promise
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


@pytest.mark.libvirt
@pytest.mark.promise
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


@pytest.mark.libvirt
@pytest.mark.promise
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


@pytest.mark.libvirt
@pytest.mark.promise
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


@pytest.mark.libvirt
@pytest.mark.promise
def test_prune_without_a_qinst_pool_still_prunes_the_cache(tmp_path: Path, test_driver: Any) -> None:
    settings = Settings(connect="test:///default", cache_dir=tmp_path / "cache")
    store = ImageStore(settings)
    gone = store.pull(store.resolve(str(make_qcow2(tmp_path / "gone.qcow2", 1, seed=24).file)))
    assert instances.prune(settings, store) == [(str(gone.path), gone.size)]
    assert not gone.path.exists()
    assert host_module.POOL_NAME not in test_driver.listStoragePools()  # nothing was created to prune it


@pytest.mark.libvirt
@pytest.mark.promise
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


@pytest.mark.promise
@pytest.mark.parametrize("state", ["running", "paused"])
def test_rm_of_a_running_or_paused_instance_needs_force(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, state: str
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    name = f"rm-{state}"
    with Host("test:///default") as host:
        dom = host.conn.defineXML(record_domain_xml(name, sample_record()))
        try:
            dom.create()
            if state == "paused":
                dom.suspend()
            with pytest.raises(UsageError, match=f"is {state}") as err:
                instances.remove(host, name)
            assert f"qinst rm --force {name}" in (err.value.hint or "")
            assert host.lookup(name) is not None and dom.isActive()
            assert instances.remove(host, name, force=True)[0] == f"domain {name}"
            assert host.lookup(name) is None
        finally:
            if host.lookup(name) is not None:
                dom.destroy()
                dom.undefine()
