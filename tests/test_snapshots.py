"""snapshots.py on libvirt's test driver (test:///default, in memory): several snapshots, restore of one that is not
the current one, delete of one among several, disk-only restores leaving the guest stopped, and the refusals (a
memory snapshot of a guest with shared folders, a name taken twice). The snapshot data in the qcow2 itself, with
the real libvirtd and qemu-img: tests/test_cli_snapshot.py."""

from __future__ import annotations

from collections.abc import Iterator

import libvirt
import pytest

from qemu_instances import snapshots
from qemu_instances.errors import HypervisorError, UsageError
from qemu_instances.host import Host
from testsupport.testdriver import TEST_URI, record_domain_xml, sample_record

pytestmark = pytest.mark.promise


@pytest.fixture
def host() -> Iterator[Host]:
    with Host(TEST_URI) as h:
        yield h


def _define(host: Host, name: str, **record: object) -> libvirt.virDomain:
    """A stopped test-driver domain carrying a valid qinst record (no host keys: `start` does not wait for SSH)."""
    return host.conn.defineXML(record_domain_xml(name, sample_record(host_keys="", **record)))


def _gone(dom: libvirt.virDomain) -> None:
    if dom.isActive():
        dom.destroy()
    for snap in dom.listAllSnapshots(0):
        snap.delete(0)  # the test driver knows no METADATA_ONLY
    dom.undefine()


def _current(dom: libvirt.virDomain) -> str:
    return str(dom.snapshotCurrent(0).getName())


def test_restore_of_an_older_snapshot_returns_to_it_not_to_the_current_one(host: Host) -> None:
    dom = _define(host, "snap-older")
    try:
        assert snapshots.create(host, "snap-older", "a") == snapshots.Created("a", memory=False)  # stopped: disk only
        dom.create()
        assert snapshots.create(host, "snap-older", "b") == snapshots.Created("b", memory=True)  # running: memory
        assert _current(dom) == "b"
        inst = snapshots.restore(host, "snap-older", "a")
        assert _current(dom) == "a"
        assert inst.state == "shutoff" and dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF  # as it was at `a`
        inst = snapshots.restore(host, "snap-older", "b")  # and forward again to the later one, running
        assert _current(dom) == "b" and inst.state == "running" and dom.isActive()
    finally:
        _gone(dom)


def test_restoring_a_disk_only_snapshot_leaves_the_instance_stopped(host: Host) -> None:
    dom = _define(host, "snap-disk")
    try:
        snapshots.create(host, "snap-disk", "clean")
        dom.create()
        inst = snapshots.restore(host, "snap-disk", "clean")
        assert inst.state == "shutoff" and not dom.isActive()
    finally:
        _gone(dom)


def test_delete_removes_that_snapshot_only(host: Host) -> None:
    dom = _define(host, "snap-del")
    try:
        for snap in ("a", "b", "c"):
            snapshots.create(host, "snap-del", snap)
        snapshots.delete(host, "snap-del", "a")  # the oldest: b and c descend from it
        assert [s.name for s in snapshots.snapshots(host, "snap-del")] == ["b", "c"]
        snapshots.delete(host, "snap-del", "c")
        assert [s.name for s in snapshots.snapshots(host, "snap-del")] == ["b"]
        with pytest.raises(HypervisorError, match="no snapshot named 'c'"):
            snapshots.delete(host, "snap-del", "c")
    finally:
        _gone(dom)


def test_a_name_taken_twice_is_refused_and_the_first_snapshot_stays(host: Host) -> None:
    dom = _define(host, "snap-twice")
    try:
        snapshots.create(host, "snap-twice", "a")
        dom.create()
        with pytest.raises(UsageError, match="already has a snapshot named 'a'"):
            snapshots.create(host, "snap-twice", "a")
        [kept] = snapshots.snapshots(host, "snap-twice")
        assert (kept.name, kept.state) == ("a", "shutoff")  # the disk-only one taken while stopped
    finally:
        _gone(dom)


def test_a_running_guest_with_shared_folders_gets_no_memory_snapshot(host: Host) -> None:
    dom = _define(host, "snap-mount", mounts=("virtiofs:ro:/srv/data:/srv/data",))
    try:
        dom.create()
        with pytest.raises(UsageError, match=r"shared folders \(--mount\)"):
            snapshots.create(host, "snap-mount", "a")
        assert dom.snapshotNum(0) == 0
        dom.destroy()
        assert snapshots.create(host, "snap-mount", "a") == snapshots.Created("a", memory=False)  # stopped: fine
    finally:
        _gone(dom)


@pytest.mark.parametrize("snap", ["-a", "--help", "a b", "", ".a", "a" * 65])
def test_snapshot_names_that_could_be_options_or_paths_are_refused(host: Host, snap: str) -> None:
    with pytest.raises(UsageError, match="invalid snapshot name"):
        snapshots.validate_snapshot_name(snap)
