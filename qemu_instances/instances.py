"""qinst's instances: list them, start, stop and remove them, and prune what none of them uses.

libvirt is the only record: everything qinst needs later lives in the domain's <metadata>. Launching is launch.py.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import libvirt

from qemu_instances.digests import Digest
from qemu_instances.domain import (
    Metadata,
    metadata_from_domain_xml,
)
from qemu_instances.errors import HypervisorError, UsageError
from qemu_instances.forwarding import Forward
from qemu_instances.host import POOL_NAME, VERIFIED, Host, forget_snapshots, libvirt_errors, snapshot_count
from qemu_instances.images import ImageStore
from qemu_instances.mounts import Mount
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
    snapshots: int = 0

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
            "forwards": [Forward.parse(f).to_json() for f in m.forwards],
            "mounts": [Mount.from_record(r).to_json() for r in m.mounts],
            "snapshots": self.snapshots,
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
    return Instance(name, state_of(dom)[0], meta, snapshot_count(dom)) if meta else None


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


def prune(settings: Settings, store: ImageStore) -> list[tuple[str, int]]:
    """Remove cached images and base volumes that no instance uses, and stale partial downloads."""
    removed: list[tuple[str, int]] = []
    with Host(settings.connect) as host:
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
    dom, inst = get_instance(host, name)
    if inst.state not in ("shutoff", "crashed") and not force:
        raise UsageError(f"instance {name!r} is {inst.state}", hint=f"stop it first, or: qinst rm --force {name}")
    if inst.snapshots:
        forget_snapshots(dom)  # libvirt keeps a domain with snapshots; the snapshots go with the overlay volume
    undefine(dom)
    removed = [f"domain {name}"] + ([f"{inst.snapshots} snapshot(s)"] if inst.snapshots else [])
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
    virtiofsd = console.parent.glob(f"{name}-fs*-virtiofsd.log")  # libvirt's log of each --mount's virtiofsd
    for path in (console, console.with_name(f"{name}.log"), *virtiofsd):
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
