"""`qinst up`: resolve the image, pull it, make the volumes and the seed, define and start the domain, wait until
the guest is ready; on failure remove everything it made (a guest that booted but is not ready is kept)."""

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
from typing import TYPE_CHECKING, Any

import libvirt

from qemu_instances import seed as seeds
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
    validate_name,
)
from qemu_instances.errors import GuestFailed, GuestTimeout, HypervisorError, UsageError
from qemu_instances.forwarding import Forward, check_free, parse_forwards
from qemu_instances.host import Host, libvirt_errors
from qemu_instances.images import CachedImage, ImageRef, ImageStore, Source, qemu_img_info
from qemu_instances.instances import Instance, host_key_scanner, lookup, remove_logs, state_of, undefine
from qemu_instances.mounts import Mount
from qemu_instances.mounts import cloud_config as mounts_cloud_config
from qemu_instances.mounts import resolve as resolve_mounts
from qemu_instances.settings import Settings
from qemu_instances.sshkeys import SshKey, resolve_keys
from qemu_instances.wait import Console, ConsoleLog, ConsoleStream, GuestPaused, Probe, Readiness, wait_ready

if TYPE_CHECKING:
    from qemu_instances.download import Progress

log = logging.getLogger("qinst")
GiB = 1 << 30


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
    forwards: tuple[str, ...] = ()  # --forward [ADDR:]HOSTPORT:GUESTPORT (user-mode networks)
    mounts: tuple[str, ...] = ()  # --mount HOSTDIR[:GUESTDIR][:rw]


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
            if lookup(host, inputs.name) is not None:
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
        parse_forwards(req.forwards, taken=[req.ssh_port] if req.ssh_port else [])
        for text in req.mounts:
            Mount.parse(text)
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
        forwards, mounts, iso = self._forwards_and_mounts(host, network, inputs)
        pool = host.pool()
        base = host.base_volume(pool, image.digest.filename, image.path, image.digest, run.progress)
        disk_name, seed_name = f"{name}.qcow2", f"{name}-seed.iso"
        virtual = int(qemu_img_info(image.path).get("virtual-size", 0))
        host.overlay_volume(pool, disk_name, base, req.disk_gib * GiB, image.format, virtual)
        cleanup.add(f"volume {disk_name}", lambda: host.delete_volume(pool, disk_name))
        seed_vol = host.upload_volume(pool, seed_name, io.BytesIO(iso), len(iso))
        cleanup.add(f"volume {seed_name}", lambda: host.delete_volume(pool, seed_name))
        ssh_port = 22
        if network.kind is NetworkKind.USER:
            # The forward listens on the daemon's host: a port free here says nothing about a remote one.
            ssh_port = req.ssh_port or (free_port() if host.is_local else 20000 + secrets.randbelow(30000))
            while not req.ssh_port and ssh_port in {f.host_port for f in forwards}:
                ssh_port = free_port() if host.is_local else 20000 + secrets.randbelow(30000)
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
            forwards=tuple(str(f) for f in forwards),
            mounts=tuple(m.record() for m in mounts),
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
            undefine(dom)
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

    def _forwards_and_mounts(
        self, host: Host, network: Network, inputs: _Inputs
    ) -> tuple[tuple[Forward, ...], tuple[Mount, ...], bytes]:
        """--forward rules (user-mode networks only; free here when the host is this machine), --mount folders with
        the host's driver, and the seed ISO that mounts them."""
        req = inputs.req
        forwards = parse_forwards(req.forwards, taken=[req.ssh_port] if req.ssh_port else [])
        if forwards and network.kind is not NetworkKind.USER:
            raise UsageError(
                f"--forward needs a user-mode network (--network user), not {network}",
                hint="on other networks, open forwards while you need them: qinst forward NAME HOSTPORT:GUESTPORT",
            )
        if host.is_local:
            check_free(forwards)
        mounts = resolve_mounts(host, req.mounts)
        if not mounts:
            return forwards, mounts, inputs.iso
        extra = seeds.merge_cloud_config(inputs.seed.extra_config or {}, mounts_cloud_config(mounts))
        return forwards, mounts, seeds.build_seed_iso(replace(inputs.seed, extra_config=extra))

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
            undefine(dom)
            remove_logs(host, spec.name, spec.console_log)
            raise
        cleanup.add(f"logs of {spec.name}", lambda: remove_logs(host, spec.name, spec.console_log))
        cleanup.add(f"domain {spec.name}", lambda: undefine(dom))
        return dom

    def _wait(self, run: _Run, dom: Any, spec: InstanceSpec) -> list[tuple[str, str]]:
        probe = Probe(
            state=lambda: state_of(dom),
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
