"""qinst's instances: list them, start, stop and remove them, and prune what none of them uses.

libvirt is the only record: everything qinst needs later lives in the domain's <metadata>. That record is untrusted
input (anyone who can define a domain can write it): every field is validated when it is read, with the validators
used when it was written, and the files and volumes an instance owns derive from its name, never from the record.
Launching is launch.py.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qemu_instances.console import console_log_name, console_log_path
from qemu_instances.digests import Digest
from qemu_instances.domain import METADATA_NS, Metadata, Network, NetworkKind, validate_name
from qemu_instances.errors import HypervisorError, UsageError
from qemu_instances.host import POOL_NAME, UPLOADING, VERIFIED, Domain, Host, forget_snapshots, snapshot_count
from qemu_instances.logs import log
from qemu_instances.seed import validate_hostname, validate_instance_id, validate_user
from qemu_instances.settings import Settings
from qemu_instances.ssh import KEY_LINE, SshHop, key_checker

if TYPE_CHECKING:  # `ls` imports neither the image store (requests, the catalog) nor the readiness loop
    from qemu_instances.images import ImageStore

INVALID = "invalid"  # the state `ls` shows for a record that does not validate
_UNKNOWN = Metadata(image="-", digest="", user="", network=Network(NetworkKind.NONE))


@dataclass
class Instance:
    """A qinst domain as libvirt reports it; `invalid` says why its metadata was refused (empty when valid)."""

    name: str
    state: str
    metadata: Metadata
    invalid: str = ""
    snapshots: int = 0

    @property
    def address(self) -> str:
        m = self.metadata
        return f"{m.ssh_host}:{m.ssh_port}" if m.ssh_host else "-"

    def require_valid(self) -> None:
        if self.invalid:
            raise UsageError(
                f"instance {self.name!r} has invalid qinst metadata ({self.invalid})",
                hint=f"qinst acts on it no further; remove it with: qinst rm --force {self.name}",
            )

    def to_json(self) -> dict[str, Any]:
        m = self.metadata
        data = {
            "name": self.name,
            "state": INVALID if self.invalid else self.state,
            "image": m.image,
            "digest": m.digest,
            "network": str(m.network),
            "ssh": {"host": m.ssh_host or None, "port": m.ssh_port, "user": m.user},
            "created": m.created,
            "accel": str(m.accel or ""),
            "arch": str(m.arch),
            "forwards": [f.to_json() for f in m.forwards],
            "mounts": [mount.to_json() for mount in m.mounts],
            "snapshots": self.snapshots,
        }
        if self.invalid:
            data["invalid"] = self.invalid
        return data


def disk_volume(name: str) -> str:
    return f"{name}.qcow2"


def seed_volume(name: str) -> str:
    return f"{name}-seed.iso"


def owned_volumes(host: Host, name: str) -> tuple[str, ...]:
    """The pool volumes an instance named `name` owns (the console log is one on a remote host)."""
    local = (disk_volume(name), seed_volume(name))
    return local if host.is_local else (*local, console_log_name(name))


def validate_metadata(name: str, meta: Metadata) -> Metadata:
    """Check every field read back from libvirt as it was checked when written; UsageError names the first bad one."""
    validate_name(name)
    validate_user(meta.user)
    if meta.digest:  # a record without one pins no image (prune keeps nothing for it)
        Digest.parse(meta.digest, error=UsageError)
    if meta.instance_id:
        validate_instance_id(meta.instance_id)
    if not 1 <= meta.ssh_port <= 65535:
        raise UsageError(f"invalid ssh-port {meta.ssh_port}")
    if meta.ssh_host:
        try:
            ipaddress.ip_address(meta.ssh_host)
        except ValueError:
            validate_hostname(meta.ssh_host)  # a lease gives an address; anything else must at least be a name
    for line in meta.host_keys.splitlines():
        if line.strip() and not KEY_LINE.fullmatch(line.strip()):
            raise UsageError("invalid host-keys line")
    if meta.private_key and (not Path(meta.private_key).is_absolute() or any(c < " " for c in meta.private_key)):
        raise UsageError("invalid private-key path")
    if meta.created and not valid_timestamp(meta.created):
        raise UsageError(f"invalid created time {meta.created[:40]!r} (an ISO 8601 time with its zone)")
    if meta.console_log and Path(meta.console_log).name != console_log_name(name):
        raise UsageError("console-log is not this instance's console log")
    strangers = set(meta.volumes) - {disk_volume(name), seed_volume(name), console_log_name(name)}
    if strangers:
        raise UsageError(f"volumes names another instance's volume {sorted(strangers)[0][:80]!r}")
    return meta


def valid_timestamp(text: str) -> bool:
    """An ISO 8601 time with its zone, as `up` writes it (a naive one cannot be compared with now)."""
    import datetime as dt

    try:
        return len(text) <= 64 and dt.datetime.fromisoformat(text).tzinfo is not None
    except (ValueError, OverflowError):
        return False


def _instance(dom: Domain) -> Instance | None:
    """The instance on `dom`; None for a domain without qinst's metadata; `invalid` set for a bad record."""
    return record_of(dom.name, dom.state()[0], dom.metadata(METADATA_NS))


def record_of(name: str, state: str, text: str | None) -> Instance | None:
    """The instance named `name` from its metadata element's text (None: not qinst's domain)."""
    if text is None:
        return None
    try:
        return Instance(name, state, validate_metadata(name, Metadata.from_xml(text)))
    except UsageError as exc:
        reason = exc.message
    except Exception as exc:  # anything a hostile record can raise makes it invalid, never a crash
        reason = f"unreadable metadata: {type(exc).__name__}: {str(exc)[:100]!r}"
    log.debug("instance %r: invalid metadata: %s", name, reason)
    return Instance(name, state, _UNKNOWN, invalid=reason)


def list_instances(host: Host, *, snapshots: bool = False) -> list[Instance]:
    """qinst's domains (those carrying its metadata), by name; with `snapshots`, each one's snapshot count (one
    more call per domain, so only when asked)."""
    found = []
    for dom, state, text in host.domain_records(METADATA_NS):
        try:
            inst = record_of(dom.name, state, text)
            if inst and snapshots and not inst.invalid:
                inst = replace(inst, snapshots=snapshot_count(dom))
        except HypervisorError:
            continue  # a domain removed while we looked
        if inst:
            found.append(inst)
    return sorted(found, key=lambda i: i.name)


def get_instance(host: Host, name: str, *, valid: bool = True) -> tuple[Domain, Instance]:
    """The domain and instance named `name`; with `valid`, an instance whose metadata was refused is an error."""
    dom = host.lookup(name)
    inst = _instance(dom) if dom is not None else None
    if dom is None or inst is None:
        raise UsageError(f"no qinst instance named {name!r}", hint="'qinst ls' lists them")
    if valid:
        inst.require_valid()
    return dom, inst


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
    names = {dom.name for dom in host.domains()}
    found: dict[str, list[str]] = {}
    for vol in host.volume_names(pool):
        for suffix in (disk_volume(""), seed_volume(""), console_log_name("")):
            name = vol.removesuffix(suffix)
            if vol.endswith(suffix) and _valid_name(name) and name not in names:
                found.setdefault(name, []).append(vol)
    return [Orphan(name, tuple(vols), _newest_age(host, pool, vols)) for name, vols in sorted(found.items())]


def _valid_name(name: str) -> bool:
    try:
        validate_name(name)
    except UsageError:
        return False
    return True


def _newest_age(host: Host, pool: Any, vols: list[str]) -> float | None:
    ages = []
    for name in vols:
        vol = host.volume(pool, name)
        age = host.volume_age(vol) if vol is not None else None
        if age is not None:
            ages.append(age)
    return min(ages) if ages else None


def _remove_orphan(host: Host, orphan: Orphan) -> list[tuple[str, int]]:
    """Delete an orphan's volumes and console log; (volume, size) of each volume deleted."""
    pool = host.pool(create=False)
    removed = []
    for name in orphan.volumes:
        vol = host.volume(pool, name)
        size = host.volume_size(vol) if vol is not None else 0
        if host.delete_volume(pool, name):
            removed.append((name, size))
    remove_logs(host, orphan.name)
    return removed


def prune(settings: Settings, store: ImageStore) -> list[tuple[str, int]]:
    """Remove cached images and base volumes that no instance uses, stale partial downloads, and the volumes of
    instances whose domain is gone (older than ORPHAN_GRACE). A base volume whose upload is claimed and alive
    (Host.upload_alive) is kept with its claim; a stale claim goes with its volume.

    While any instance's record is invalid, nothing is pruned: which image it uses cannot be known.
    """
    removed: list[tuple[str, int]] = []
    with Host(settings.connect) as host:
        found = list_instances(host)
        invalid = [i.name for i in found if i.invalid]
        if invalid:
            raise UsageError(
                f"instance {invalid[0]!r} has invalid qinst metadata: cannot tell which images are in use",
                hint=f"remove it first: qinst rm --force {invalid[0]}",
            )
        for orphan in orphans(host):
            if orphan.age is None or orphan.age > ORPHAN_GRACE:
                removed += [(f"volume {POOL_NAME}/{vol}", size) for vol, size in _remove_orphan(host, orphan)]
        in_use = {i.metadata.digest for i in found}
        pool = host.pool(create=False) if POOL_NAME in host.pool_names() else None
        if pool is not None:
            alive: dict[str, bool] = {}  # base volume name -> its claimed upload is going on (judged once)
            for vol_name in host.volume_names(pool):
                base = vol_name.removesuffix(VERIFIED).removesuffix(UPLOADING)
                digest = Digest.from_filename(base)
                if digest is None or str(digest) in in_use:
                    continue
                if base not in alive:
                    alive[base] = host.upload_alive(pool, base)
                if alive[base]:
                    continue  # another client is uploading it: an `up` is about to use it
                vol = host.volume(pool, vol_name)
                size = host.volume_size(vol) if vol is not None else 0
                if host.delete_volume(pool, vol_name):
                    removed.append((f"volume {POOL_NAME}/{vol_name}", size))
    removed += [(str(path), size) for path, size in store.prune(in_use)]
    return removed


def open_host(settings: Settings) -> Host:
    """A connection to the chosen libvirt host (a context manager)."""
    return Host(settings.connect)


def remove(host: Host, name: str, *, force: bool = False) -> list[str]:
    """Remove instance `name`: its domain and every volume and log qinst made for it (named after it).

    An instance with invalid metadata is removed only with force.
    """
    if host.lookup(name) is None and (orphan := next((o for o in orphans(host) if o.name == name), None)):
        return [f"volume {vol}" for vol, _ in _remove_orphan(host, orphan)]  # an `up` killed before define
    dom, inst = get_instance(host, name, valid=False)
    if inst.invalid and not force:
        inst.require_valid()
    if inst.state not in ("shutoff", "crashed") and not force:
        raise UsageError(f"instance {name!r} is {inst.state}", hint=f"stop it first, or: qinst rm --force {name}")
    # libvirt keeps a domain with snapshots: drop their records (the snapshots themselves go with the overlay volume)
    snapshots = forget_snapshots(dom)
    dom.undefine()
    removed = [f"domain {name}"] + ([f"{snapshots} snapshot(s)"] if snapshots else [])
    try:
        validate_name(name)
    except UsageError:
        return removed  # nothing can be derived from a name qinst would not have given: only the domain goes
    if POOL_NAME in host.pool_names():
        pool = host.pool(create=False)
        if not host.is_local:
            host.volume_names(pool)  # refreshes the pool: the console log is a file virtlogd made there
        for vol in owned_volumes(host, name):
            if host.delete_volume(pool, vol):
                removed.append(f"volume {vol}")
    remove_logs(host, name)
    return removed


def remove_logs(host: Host, name: str) -> None:
    """The console record and libvirt's own log of the domain (same directory), on a local daemon."""
    if not host.is_local:
        return
    console = console_log_path(host, None, name)
    # libvirt's log of each --mount's virtiofsd is NAME-fsN-virtiofsd.log: matched exactly, so that another
    # instance's logs (web-fsdata-fs0-virtiofsd.log, when this one is web-fs) are never touched.
    virtiofsd = re.compile(re.escape(name) + r"-fs[0-9]+-virtiofsd\.log")
    try:
        logs = [p for p in console.parent.iterdir() if virtiofsd.fullmatch(p.name)]
    except OSError:
        logs = []
    for path in (console, console.with_name(f"{name}.log"), *logs):
        with contextlib.suppress(OSError):
            path.unlink()


def stop(host: Host, name: str, *, force: bool = False, timeout: float = 60.0) -> str:
    """Shut the guest down (ACPI), or power it off with force or when it does not stop in time."""
    dom, inst = get_instance(host, name)
    if inst.state == "shutoff":
        return "already stopped"
    if not force:
        dom.shutdown()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if dom.state()[0] == "shutoff":
                return "stopped"
            time.sleep(0.5)
        log.warning("%s did not shut down within %.0f s; powering it off", name, timeout)
    dom.destroy()
    return "powered off"


def start(host: Host, name: str, *, wait: bool = True, timeout: float = 300.0) -> Instance:
    """Start a stopped instance; with wait, return once SSH offers the host key recorded at `up`."""
    dom, inst = get_instance(host, name)
    if inst.state != "running":
        dom.start()
        inst = replace(inst, state="running")
    recorded = set(KEY_LINE.findall(inst.metadata.host_keys))
    if wait and recorded and inst.metadata.ssh_host:
        from qemu_instances.wait import wait_for_ssh

        wait_for_ssh(
            inst.metadata.ssh_host,
            inst.metadata.ssh_port,
            recorded,
            dom.state,
            timeout,
            key_checker(SshHop.from_uri(host.uri)),
        )
    return inst
