"""Instances: launch (`up`), list, start, stop and remove qinst's libvirt domains.

libvirt is the only record: everything qinst needs later lives in the domain's <metadata>.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import logging
import secrets
import socket
import string
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import libvirt

from qemu_instances import seed as seeds
from qemu_instances.digests import Digest
from qemu_instances.domain import (
    METADATA_KEY,
    METADATA_NS,
    Accel,
    Firmware,
    InstanceSpec,
    Metadata,
    Network,
    NetworkKind,
    domain_xml,
    metadata_from_domain_xml,
    validate_name,
)
from qemu_instances.download import Progress
from qemu_instances.errors import GuestFailed, GuestTimeout, HypervisorError, UsageError
from qemu_instances.host import POOL_NAME, VERIFIED, Host, libvirt_errors
from qemu_instances.images import CachedImage, ImageRef, ImageStore, Source, qemu_img_info
from qemu_instances.remote import SshHop
from qemu_instances.settings import Settings
from qemu_instances.sshkeys import SshKey, resolve_keys
from qemu_instances.wait import (
    KEY_LINE,
    Console,
    ConsoleLog,
    ConsoleStream,
    GuestPaused,
    KeyCheck,
    Probe,
    Readiness,
    check_host_keys,
    check_host_keys_via,
    wait_for_ssh,
    wait_ready,
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


@dataclass(frozen=True)
class UpRequest:
    """`qinst up`'s inputs, before anything is resolved."""

    image: str
    name: str | None = None
    cpus: int = 2
    memory_mib: int = 1024
    disk_gib: int = 10
    ssh_keys: tuple[Path, ...] = ()
    user: str | None = None
    user_data: Path | None = None
    network: str | None = None
    ssh_port: int | None = None
    accel: Accel = Accel.AUTO
    firmware: Firmware = Firmware.BIOS
    wait: bool = True
    timeout: float = 300.0
    source: Source = Source.UPSTREAM
    latest: bool = False
    extra_config: dict[str, Any] | None = None  # more cloud-config (smoke checks)


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


@dataclass
class UpResult:
    instance: Instance
    timings: dict[str, float] = field(default_factory=dict)
    ready: bool = False


def _created_at() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def default_name(image: str) -> str:
    base = "".join(c if c in string.ascii_lowercase + string.digits else "-" for c in image.lower()).strip("-")
    suffix = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(4))
    return f"{base[:58] or 'vm'}-{suffix}"


def console_log_path(host: Host, pool: Any, name: str) -> Path:
    """Where virtlogd records the serial console: libvirt's log directory on a local daemon; on a remote one,
    the pool's directory, so that `qinst logs` can download it as a volume."""
    if not host.is_local:
        return host.pool_path(pool) / f"{name}-console.log"
    if host.is_system:
        return Path("/var/log/libvirt/qemu") / f"{name}-console.log"
    return Path.home() / ".cache/libvirt/qemu/log" / f"{name}-console.log"


def open_console(host: Host, dom: Any, path: str) -> Console:
    """The console as recorded in its file (local daemons) or as a libvirt console stream (remote ones)."""
    return ConsoleLog(Path(path)) if host.is_local else ConsoleStream(host.conn, dom)


def host_key_scanner(host: Host) -> KeyCheck:
    """How to ask a guest's SSH server for its host key: directly, or through the remote libvirt host."""
    hop = SshHop.from_uri(host.uri)
    return check_host_keys if hop is None else check_host_keys_via(hop.ssh_options())


def _state(dom: Any) -> tuple[str, str]:
    with libvirt_errors("cannot read the domain's state"):
        state, reason = dom.state()
    return STATES.get(state, "unknown"), str(reason)


def _lookup(host: Host, name: str) -> Any | None:
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
    return Instance(name, _state(dom)[0], meta) if meta else None


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
    dom = _lookup(host, name)
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


class _Cleanup:
    """What `up` created so far, removed in reverse order if it fails."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.actions: list[tuple[str, Callable[[], object]]] = []

    def add(self, what: str, action: Callable[[], object]) -> None:
        self.actions.append((what, action))

    def run(self) -> None:
        for what, action in reversed(self.actions):
            try:
                action()
            except Exception as exc:  # keep removing the rest
                log.warning("could not remove %s: %s", what, exc)
        self.actions.clear()


def _undefine(dom: Any) -> None:
    with contextlib.suppress(libvirt.libvirtError):
        if dom.isActive():
            dom.destroy()
    flags = libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
    with libvirt_errors("cannot undefine the domain"):
        dom.undefineFlags(flags)


def _choose_network(host: Host, text: str | None) -> Network:
    if text:
        network = Network.parse(text)
    elif host.is_system and "default" in host.network_names():
        network = Network(NetworkKind.DEFAULT, "default")
    else:
        network = Network(NetworkKind.USER)
    if network.kind in (NetworkKind.DEFAULT, NetworkKind.NETWORK):
        if network.source not in host.network_names():
            raise UsageError(f"libvirt has no network named {network.source!r}", hint="'qinst doctor' lists them")
        host.ensure_network_active(network.source)
    return network


def _ssh_host(host: Host, dom: Any, network: Network) -> Callable[[], str | None]:
    if network.kind is NetworkKind.USER:
        return lambda: "127.0.0.1"
    if network.kind is NetworkKind.NONE:
        return lambda: None

    def lease_address() -> str | None:
        try:
            ifaces = dom.interfaceAddresses(libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE, 0)
        except libvirt.libvirtError:
            return None
        for iface in (ifaces or {}).values():
            for addr in iface.get("addrs") or []:
                if addr.get("type") == libvirt.VIR_IP_ADDR_TYPE_IPV4:
                    return str(addr["addr"])
        return None

    return lease_address


def _private_key(keys: list[SshKey]) -> str:
    for key in keys:
        if key.private_path is not None:
            return str(key.private_path)
    return ""


def _read_user_data(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read user-data {path}: {exc.strerror}") from exc


def _set_metadata(dom: Any, meta: Metadata) -> None:
    flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG
    with contextlib.suppress(libvirt.libvirtError):
        if dom.isActive():
            flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
    with libvirt_errors("cannot record the instance's metadata"):
        dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, meta.to_xml(), METADATA_KEY, METADATA_NS, flags)


@dataclass(frozen=True)
class _Inputs:
    """`up`'s inputs, checked and resolved before anything is created."""

    req: UpRequest
    name: str
    ref: ImageRef
    user: str
    keys: tuple[SshKey, ...]
    seed: seeds.SeedSpec
    iso: bytes


@dataclass
class _Run:
    """One `up` in progress: the connection, what it made so far, its timings and observers."""

    host: Host
    cleanup: _Cleanup
    t0: float
    progress: Progress | None
    readiness: Readiness
    cancel: threading.Event
    timeout: float
    timings: dict[str, float] = field(default_factory=dict)

    def lap(self, phase: str, since: float) -> None:
        self.timings[phase] = round(time.monotonic() - since, 2)


class Launcher:
    """Runs `qinst up`: resolve, pull, create volumes, define, start, wait; undo everything on failure."""

    def __init__(self, settings: Settings, store: ImageStore | None = None) -> None:
        self.settings = settings
        self.store = store or ImageStore(settings)

    def up(
        self,
        req: UpRequest,
        progress: Progress | None = None,
        *,
        readiness: Readiness | None = None,
        cancel: threading.Event | None = None,
        timings: dict[str, float] | None = None,
    ) -> UpResult:
        """Launch req's instance; `readiness` and `timings` record the phases reached and their seconds (also
        when it fails), `cancel` stops it."""
        t0 = time.monotonic()
        inputs = self._inputs(req)
        image = self._pull(inputs.ref, req, progress)
        with Host(self.settings.connect) as host:
            if _lookup(host, inputs.name) is not None:
                raise UsageError(f"an instance or domain named {inputs.name!r} already exists")
            run = _Run(
                host,
                _Cleanup(host),
                t0,
                progress,
                readiness or Readiness(),
                cancel or threading.Event(),
                req.timeout,
                timings if timings is not None else {},
            )
            run.lap("download", t0)
            try:
                return self._launch(run, inputs, image)
            except (GuestTimeout, GuestFailed) as exc:
                if isinstance(exc, GuestPaused):
                    run.cleanup.run()
                    raise
                # The guest booted: keep it for inspection.
                name = inputs.name
                exc.hint = f"the instance is kept for inspection: 'qinst logs {name}'; remove it with 'qinst rm {name}'"
                raise
            except BaseException:
                run.cleanup.run()
                raise

    def _inputs(self, req: UpRequest) -> _Inputs:
        """Check everything the user gave, and build the seed, before anything is created."""
        name = validate_name(req.name) if req.name else None
        if req.cpus < 1 or req.memory_mib < 64 or req.disk_gib < 1:
            raise UsageError("--cpus must be >= 1, --memory >= 64 MiB and --disk >= 1 GiB")
        if req.ssh_port is not None and not 1 <= req.ssh_port <= 65535:
            raise UsageError(f"invalid --ssh-port {req.ssh_port}")
        if req.network:
            Network.parse(req.network)
        ref = self.store.resolve(req.image)
        user = seeds.validate_user(req.user or (ref.entry.default_user if ref.entry else "cloud"))
        keys = tuple(resolve_keys(list(req.ssh_keys), self.settings.config_dir))
        name = name or default_name(ref.name)
        seed = seeds.SeedSpec(
            hostname=name,
            instance_id=seeds.new_instance_id(),
            user=user,
            ssh_keys=tuple(k.public for k in keys),
            user_data=_read_user_data(req.user_data),
            user_data_source=str(req.user_data) if req.user_data else None,
            extra_config=req.extra_config,
        )
        return _Inputs(req, name, ref, user, keys, seed, seeds.build_seed_iso(seed))  # also checks the user-data

    def _pull(self, ref: ImageRef, req: UpRequest, progress: Progress | None) -> CachedImage:
        if not req.latest and req.source is Source.UPSTREAM:
            cached = self.store.cached(ref)
            if cached:
                return cached
        return self.store.pull(ref, source=req.source, latest=req.latest, progress=progress)

    def _launch(self, run: _Run, inputs: _Inputs, image: CachedImage) -> UpResult:
        host, cleanup, req, name = run.host, run.cleanup, inputs.req, inputs.name
        t_define = time.monotonic()
        network = _choose_network(host, req.network)
        pool = host.pool()
        base = host.base_volume(pool, image.digest.filename, image.path, image.digest, run.progress)
        disk_name, seed_name = f"{name}.qcow2", f"{name}-seed.iso"
        virtual = int(qemu_img_info(image.path).get("virtual-size", 0))
        host.overlay_volume(pool, disk_name, base, req.disk_gib * GiB, image.format, virtual)
        cleanup.add(f"volume {disk_name}", lambda: host.delete_volume(pool, disk_name))
        seed_vol = host.upload_volume(pool, seed_name, io.BytesIO(inputs.iso), len(inputs.iso))
        cleanup.add(f"volume {seed_name}", lambda: host.delete_volume(pool, seed_name))
        ssh_port = 22
        if network.kind is NetworkKind.USER:
            # The forward listens on the daemon's host: a port free here says nothing about a remote one.
            ssh_port = req.ssh_port or (free_port() if host.is_local else 20000 + secrets.randbelow(30000))
        console = console_log_path(host, pool, name)
        with libvirt_errors("cannot read the disk volume"):
            disk_path = pool.storageVolLookupByName(disk_name).path()
            seed_path = seed_vol.path()
        accel = req.accel
        if accel is Accel.AUTO:
            kvm = host.kvm_available()
            accel = Accel.KVM if kvm.usable else Accel.TCG
            if not kvm.usable:
                log.info("KVM is not usable here (%s): using TCG software emulation, which is slower", kvm.reason)
        meta = Metadata(
            image=inputs.ref.name,
            digest=str(image.digest),
            user=inputs.user,
            network=str(network),
            ssh_host="127.0.0.1" if network.kind is NetworkKind.USER else "",
            ssh_port=ssh_port,
            created=_created_at(),
            instance_id=inputs.seed.instance_id,
            private_key=_private_key(list(inputs.keys)),
            console_log=str(console),
            accel=str(accel),
            volumes=(disk_name, seed_name) if host.is_local else (disk_name, seed_name, console.name),
        )
        spec = InstanceSpec(
            name=name,
            cpus=req.cpus,
            memory_mib=req.memory_mib,
            disk_path=disk_path,
            seed_path=seed_path,
            console_log=str(console),
            network=network,
            accel=accel,
            firmware=req.firmware,
            ssh_port=ssh_port,
            metadata=meta,
        )
        dom, spec = self._start(host, cleanup, spec, fallback=req.accel is Accel.AUTO)
        run.lap("define", t_define)
        if not req.wait:
            run.lap("total", run.t0)
            return UpResult(Instance(name, "running", spec.metadata), run.timings)
        run.readiness.restart()
        try:
            keys_seen = self._wait(run, dom, spec)
        except GuestPaused:
            if req.accel is not Accel.AUTO or spec.accel is not Accel.KVM:
                raise
            log.warning("the guest paused under KVM (KVM is present but fails here): relaunching it under TCG")
            _undefine(dom)
            spec = _with_accel(spec, Accel.TCG)
            dom = self._define_and_start(host, cleanup, spec)
            run.readiness.restart()
            keys_seen = self._wait(run, dom, spec)
        run.timings.update(run.readiness.durations())
        run.lap("total", run.t0)
        meta = replace(
            spec.metadata,
            ssh_host=_ssh_host(host, dom, spec.network)() or "",
            host_keys="\n".join(f"{k} {b}" for k, b in keys_seen),
        )
        _set_metadata(dom, meta)
        return UpResult(Instance(name, "running", meta), run.timings, ready=True)

    def _start(self, host: Host, cleanup: _Cleanup, spec: InstanceSpec, *, fallback: bool) -> tuple[Any, InstanceSpec]:
        """Define and start; with --accel auto, a KVM guest that QEMU cannot start is started again under TCG."""
        try:
            return self._define_and_start(host, cleanup, spec), spec
        except HypervisorError as exc:
            if not (fallback and spec.accel is Accel.KVM):
                raise
            log.warning("the guest does not start under KVM (%s): using TCG software emulation", exc.message)
        spec = _with_accel(spec, Accel.TCG)
        return self._define_and_start(host, cleanup, spec), spec

    def _define_and_start(self, host: Host, cleanup: _Cleanup, spec: InstanceSpec) -> Any:
        xml = domain_xml(spec)
        with libvirt_errors(f"libvirt refused the domain {spec.name}"):
            dom = host.conn.defineXML(xml)
        try:
            with libvirt_errors(f"cannot start {spec.name}"):
                dom.create()
        except BaseException:
            _undefine(dom)
            _remove_logs(host, spec.name, spec.console_log)
            raise
        cleanup.add(f"logs of {spec.name}", lambda: _remove_logs(host, spec.name, spec.console_log))
        cleanup.add(f"domain {spec.name}", lambda: _undefine(dom))
        return dom

    def _wait(self, run: _Run, dom: Any, spec: InstanceSpec) -> list[tuple[str, str]]:
        probe = Probe(
            state=lambda: _state(dom),
            console=open_console(run.host, dom, spec.console_log),
            ssh_host=_ssh_host(run.host, dom, spec.network),
            ssh_port=spec.ssh_port,
            cancelled=run.cancel.is_set,
            scan=host_key_scanner(run.host),
        )
        try:
            return wait_ready(probe, timeout=run.timeout, readiness=run.readiness)
        finally:
            probe.console.close()


def _with_accel(spec: InstanceSpec, accel: Accel) -> InstanceSpec:
    return replace(spec, accel=accel, metadata=replace(spec.metadata, accel=str(accel)))


def open_host(settings: Settings) -> Host:
    """A connection to the chosen libvirt host (a context manager)."""
    return Host(settings.connect)


def remove(host: Host, name: str, *, force: bool = False) -> list[str]:
    """Remove instance `name`: its domain and every volume qinst made for it. Returns what was removed."""
    dom, inst = get_instance(host, name)
    if inst.state not in ("shutoff", "crashed") and not force:
        raise UsageError(f"instance {name!r} is {inst.state}", hint=f"stop it first, or: qinst rm --force {name}")
    _undefine(dom)
    removed = [f"domain {name}"]
    pool = host.pool(create=False)
    if not host.is_local:
        host.volume_names(pool)  # refreshes the pool: the console log is a file virtlogd made there
    for vol in inst.metadata.volumes:
        if host.delete_volume(pool, vol):
            removed.append(f"volume {vol}")
    _remove_logs(host, name, inst.metadata.console_log)
    return removed


def _remove_logs(host: Host, name: str, console_log: str) -> None:
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
            if _state(dom)[0] == "shutoff":
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
            lambda: _state(dom),
            timeout,
            host_key_scanner(host),
        )
    return inst
