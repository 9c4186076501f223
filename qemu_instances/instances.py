"""qinst's instances: list them, start, stop and remove them, and prune what none of them uses.

libvirt is the only record: everything qinst needs later lives in the domain's <metadata>. Launching is launch.py.
"""

from __future__ import annotations

import contextlib
import logging
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import libvirt

from qemu_instances.digests import Digest
from qemu_instances.domain import (
    NAME_RE,
    Metadata,
    metadata_from_domain_xml,
)
from qemu_instances.errors import HypervisorError, UsageError
from qemu_instances.host import POOL_NAME, VERIFIED, Host, libvirt_errors
from qemu_instances.images import ImageStore
from qemu_instances.remote import SshHop
from qemu_instances.settings import Settings
from qemu_instances.wait import (
    KEY_LINE,
    KeyCheck,
    check_host_keys,
    check_host_keys_via,
    wait_for_ssh,
)

log = logging.getLogger("qinst")
GiB = 1 << 30
STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: "nostate",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "running",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutting-down",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended",
}


@dataclass
class Instance:
    """A qinst domain as libvirt reports it."""

    name: str
    state: str
    metadata: Metadata

    @property
    def address(self) -> str:
        m = self.metadata
        return f"{m.ssh_host}:{m.ssh_port}" if m.ssh_host else "-"

    def to_json(self) -> dict[str, Any]:
        m = self.metadata
        return {
            "name": self.name,
            "state": self.state,
            "image": m.image,
            "digest": m.digest,
            "network": m.network,
            "ssh": {"host": m.ssh_host or None, "port": m.ssh_port, "user": m.user},
            "created": m.created,
            "accel": m.accel,
        }


def host_key_scanner(host: Host) -> KeyCheck:
    """How to ask a guest's SSH server for its host key: directly, or through the remote libvirt host."""
    hop = SshHop.from_uri(host.uri)
    return check_host_keys if hop is None else check_host_keys_via(hop.ssh_options())


def state_of(dom: Any) -> tuple[str, str]:
    with libvirt_errors("cannot read the domain's state"):
        state, reason = dom.state()
    return STATES.get(state, "unknown"), str(reason)


def lookup(host: Host, name: str) -> Any | None:
    try:
        return host.conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise HypervisorError(f"cannot look up domain {name}: {exc.get_error_message()}") from exc


def _instance(dom: Any) -> Instance | None:
    with libvirt_errors("cannot read a domain's XML"):
        xml = dom.XMLDesc(0)
        name = dom.name()
    meta = metadata_from_domain_xml(xml)
    return Instance(name, state_of(dom)[0], meta) if meta else None


def list_instances(host: Host) -> list[Instance]:
    """qinst's domains (those carrying its metadata), by name."""
    with libvirt_errors("cannot list domains"):
        domains = host.conn.listAllDomains(0)
    found = []
    for dom in domains:
        try:
            inst = _instance(dom)
        except HypervisorError:
            continue  # a domain removed while we looked
        if inst:
            found.append(inst)
    return sorted(found, key=lambda i: i.name)


def get_instance(host: Host, name: str) -> tuple[Any, Instance]:
    dom = lookup(host, name)
    inst = _instance(dom) if dom is not None else None
    if dom is None or inst is None:
        raise UsageError(f"no qinst instance named {name!r}", hint="'qinst ls' lists them")
    return dom, inst


# The volumes `up` makes for an instance NAME, before its domain exists (the console log: on remote hosts).
INSTANCE_VOLUMES = (".qcow2", "-seed.iso", "-console.log")
ORPHAN_GRACE = 600.0  # seconds: younger volumes without a domain may belong to an `up` still running


@dataclass(frozen=True)
class Orphan:
    """Volumes of an instance whose domain does not exist (an `up` killed before it defined the domain)."""

    name: str
    volumes: tuple[str, ...]
    age: float | None = None  # seconds since the newest volume changed, when libvirt says

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "state": "orphan", "volumes": list(self.volumes)}


def orphans(host: Host) -> list[Orphan]:
    """Instance volumes in qinst's pool named for no domain at all, grouped by instance name."""
    if POOL_NAME not in host.pool_names():
        return []
    pool = host.pool(create=False)
    with libvirt_errors("cannot list domains"):
        names = {dom.name() for dom in host.conn.listAllDomains(0)}
    found: dict[str, list[str]] = {}
    for vol in host.volume_names(pool):
        for suffix in INSTANCE_VOLUMES:
            name = vol.removesuffix(suffix)
            if vol.endswith(suffix) and NAME_RE.fullmatch(name) and name not in names:
                found.setdefault(name, []).append(vol)
    return [Orphan(name, tuple(vols), _newest_age(host, pool, vols)) for name, vols in sorted(found.items())]


def _newest_age(host: Host, pool: Any, vols: list[str]) -> float | None:
    ages = []
    for name in vols:
        vol = host.volume(pool, name)
        with contextlib.suppress(libvirt.libvirtError, ET.ParseError, ValueError):
            mtime = ET.fromstring(vol.XMLDesc(0)).findtext("target/timestamps/mtime") if vol else None
            if mtime:
                ages.append(time.time() - float(mtime))
    return min(ages) if ages else None


def _remove_orphan(host: Host, orphan: Orphan) -> list[tuple[str, int]]:
    """Delete an orphan's volumes and console log; (volume, size) of each volume deleted."""
    from qemu_instances.launch import console_log_path  # launch imports this module

    pool = host.pool(create=False)
    removed = []
    for name in orphan.volumes:
        vol = host.volume(pool, name)
        size = vol.info()[2] if vol is not None else 0
        if host.delete_volume(pool, name):
            removed.append((name, size))
    remove_logs(host, orphan.name, str(console_log_path(host, pool, orphan.name)))
    return removed


def prune(settings: Settings, store: ImageStore) -> list[tuple[str, int]]:
    """Remove cached images and base volumes that no instance uses, stale partial downloads, and the volumes of
    instances whose domain is gone (older than ORPHAN_GRACE)."""
    removed: list[tuple[str, int]] = []
    with Host(settings.connect) as host:
        for orphan in orphans(host):
            if orphan.age is None or orphan.age > ORPHAN_GRACE:
                removed += [(f"volume {POOL_NAME}/{vol}", size) for vol, size in _remove_orphan(host, orphan)]
        in_use = {i.metadata.digest for i in list_instances(host)}
        pool = host.pool(create=False) if POOL_NAME in host.pool_names() else None
        if pool is not None:
            for vol_name in host.volume_names(pool):
                digest = Digest.from_filename(vol_name.removesuffix(VERIFIED))
                if digest is None or str(digest) in in_use:
                    continue
                vol = host.volume(pool, vol_name)
                size = vol.info()[2] if vol is not None else 0
                if host.delete_volume(pool, vol_name):
                    removed.append((f"volume {POOL_NAME}/{vol_name}", size))
    removed += [(str(path), size) for path, size in store.prune(in_use)]
    return removed


def undefine(dom: Any) -> None:
    with contextlib.suppress(libvirt.libvirtError):
        if dom.isActive():
            dom.destroy()
    flags = libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
    with libvirt_errors("cannot undefine the domain"):
        dom.undefineFlags(flags)


def open_host(settings: Settings) -> Host:
    """A connection to the chosen libvirt host (a context manager)."""
    return Host(settings.connect)


def remove(host: Host, name: str, *, force: bool = False) -> list[str]:
    """Remove instance `name`: its domain and every volume qinst made for it. Returns what was removed."""
    if lookup(host, name) is None and (orphan := next((o for o in orphans(host) if o.name == name), None)):
        return [f"volume {vol}" for vol, _ in _remove_orphan(host, orphan)]
    dom, inst = get_instance(host, name)
    if inst.state not in ("shutoff", "crashed") and not force:
        raise UsageError(f"instance {name!r} is {inst.state}", hint=f"stop it first, or: qinst rm --force {name}")
    undefine(dom)
    removed = [f"domain {name}"]
    pool = host.pool(create=False)
    if not host.is_local:
        host.volume_names(pool)  # refreshes the pool: the console log is a file virtlogd made there
    for vol in inst.metadata.volumes:
        if host.delete_volume(pool, vol):
            removed.append(f"volume {vol}")
    remove_logs(host, name, inst.metadata.console_log)
    return removed


def remove_logs(host: Host, name: str, console_log: str) -> None:
    """The console record and libvirt's own log of the domain (same directory), on a local daemon."""
    if not console_log or not host.is_local:
        return
    console = Path(console_log)
    for path in (console, console.with_name(f"{name}.log")):
        with contextlib.suppress(OSError):
            path.unlink()


def stop(host: Host, name: str, *, force: bool = False, timeout: float = 60.0) -> str:
    """Shut the guest down (ACPI), or power it off with force or when it does not stop in time."""
    dom, inst = get_instance(host, name)
    if inst.state == "shutoff":
        return "already stopped"
    if not force:
        with libvirt_errors(f"cannot shut down {name}"):
            dom.shutdown()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if state_of(dom)[0] == "shutoff":
                return "stopped"
            time.sleep(0.5)
        log.warning("%s did not shut down within %.0f s; powering it off", name, timeout)
    with libvirt_errors(f"cannot power off {name}"):
        dom.destroy()
    return "powered off"


def start(host: Host, name: str, *, wait: bool = True, timeout: float = 300.0) -> Instance:
    """Start a stopped instance; with wait, return once SSH offers the host key recorded at `up`."""
    dom, inst = get_instance(host, name)
    if inst.state != "running":
        with libvirt_errors(f"cannot start {name}"):
            dom.create()
        inst = replace(inst, state="running")
    recorded = set(KEY_LINE.findall(inst.metadata.host_keys))
    if wait and recorded and inst.metadata.ssh_host:
        wait_for_ssh(
            inst.metadata.ssh_host,
            inst.metadata.ssh_port,
            recorded,
            lambda: state_of(dom),
            timeout,
            host_key_scanner(host),
        )
    return inst
