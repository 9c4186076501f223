"""`qinst snapshot create|list|restore|delete`: libvirt's internal snapshots of an instance.

A running guest is snapshotted with its memory (restore resumes it running, with the same SSH host key); a
stopped guest gets a disk-only snapshot. Internal snapshots live inside the qcow2 overlay (the read-only seed ISO
is left out by libvirt), so `rm` removes them with the volume. libvirt cannot save the memory of a guest with UEFI
firmware (its NVRAM is raw) or with a shared folder (virtiofs and 9p devices cannot be migrated): such a guest
is snapshotted when it is stopped.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from qemu_instances.errors import UsageError
from qemu_instances.host import (
    Host,
    SnapshotInfo,
    create_snapshot,
    delete_snapshot,
    list_snapshots,
    revert_snapshot,
)
from qemu_instances.instances import Instance, get_instance, start

SNAP_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class Created:
    name: str
    memory: bool  # with the guest's memory (it was running), else disk only


def validate_snapshot_name(name: str) -> str:
    if not SNAP_RE.fullmatch(name):
        raise UsageError(
            f"invalid snapshot name {name!r}", hint="use 1-64 letters, digits, '.', '_' or '-', starting with one"
        )
    return name


def _uefi(domain_xml: str) -> bool:
    os_el = ET.fromstring(domain_xml).find("os")
    return os_el is not None and (os_el.get("firmware") == "efi" or os_el.find("loader") is not None)


def create(host: Host, name: str, snap: str) -> Created:
    """Snapshot instance `name`: with memory when it runs, disk-only when it is stopped."""
    validate_snapshot_name(snap)
    dom, inst = get_instance(host, name)
    running = inst.state in ("running", "paused")
    if running:
        xml = dom.xml()
        why = "UEFI firmware" if _uefi(xml) else "shared folders (--mount)" if inst.metadata.mounts else None
        if why:
            raise UsageError(
                f"libvirt cannot save the memory of {name} ({why})",
                hint=f"stop it for a disk-only snapshot: qinst stop {name} && qinst snapshot create {name} {snap}",
            )
    if any(s.name == snap for s in list_snapshots(dom)):
        raise UsageError(f"{name} already has a snapshot named {snap!r}")
    create_snapshot(dom, snap, f"qinst: {'memory and disks' if running else 'disks only'}")
    return Created(snap, running)


def snapshots(host: Host, name: str) -> list[SnapshotInfo]:
    dom, _ = get_instance(host, name)
    return list_snapshots(dom)


def restore(host: Host, name: str, snap: str, *, timeout: float = 300.0) -> Instance:
    """Return the instance to snapshot `snap`. A snapshot with memory resumes running, and returns once SSH
    answers with the host key recorded at `up`; a disk-only one leaves the instance stopped."""
    validate_snapshot_name(snap)
    dom, _ = get_instance(host, name)
    revert_snapshot(dom, snap)
    _, inst = get_instance(host, name)
    if inst.state == "running":
        inst = start(host, name, wait=True, timeout=timeout)
    return inst


def delete(host: Host, name: str, snap: str) -> None:
    validate_snapshot_name(snap)
    dom, _ = get_instance(host, name)
    delete_snapshot(dom, snap)
