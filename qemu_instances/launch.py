"""`qinst up`: check the request and pull the image, then plan (name, port, accelerators, metadata, spec: nothing
is created), provision (volumes, seed) and boot (define, start, wait; one loop over the accelerators to try).
On failure everything it made is removed (an ExitStack; a guest that booted but is not ready is kept)."""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import socket
import string
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qemu_instances import kvmverdict
from qemu_instances import seed as seeds
from qemu_instances.arch import Arch
from qemu_instances.console import console_log_path, open_console
from qemu_instances.domain import (
    METADATA_KEY,
    METADATA_NS,
    Accel,
    Confidential,
    Firmware,
    InstanceSpec,
    Metadata,
    Network,
    NetworkKind,
    domain_xml,
    validate_name,
)
from qemu_instances.errors import GuestFailed, GuestTimeout, HypervisorError, QinstError, UsageError
from qemu_instances.faults import _test_pause
from qemu_instances.files import read_option_file
from qemu_instances.forwarding import Forward, check_free, parse_forwards
from qemu_instances.host import POOL_NAME, Domain, Host, uri_is_local, uri_is_test_driver
from qemu_instances.images import CachedImage, ImageRef, ImageStore, Source
from qemu_instances.instances import (
    Instance,
    disk_volume,
    owned_volumes,
    record_of,
    remove_logs,
    seed_volume,
)
from qemu_instances.logs import log
from qemu_instances.mounts import Mount
from qemu_instances.mounts import cloud_config as mounts_cloud_config
from qemu_instances.mounts import resolve as resolve_mounts
from qemu_instances.ports import HOSTFWD_TAKEN, start_with_port
from qemu_instances.seals import SealStore
from qemu_instances.settings import Settings
from qemu_instances.sev import LaunchInfo, Session, SevSupport, check_measurement
from qemu_instances.ssh import HostKey, SshHop, key_checker
from qemu_instances.sshkeys import SshKey, resolve_keys
from qemu_instances.wait import CloudInitErrors, GuestPaused, Probe, Readiness, wait_ready

if TYPE_CHECKING:
    from qemu_instances.download import Progress

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
    firmware: Firmware | None = None  # default: BIOS for x86_64, UEFI for aarch64 (its only firmware)
    wait: bool = True
    timeout: float | None = None  # seconds; default WAIT for a native guest, EMULATED x that for another arch's
    arch: Arch | None = None  # default: the host's
    sha256: str | None = None  # the digest of an http(s) URL image
    sha512: str | None = None
    source: Source = Source.UPSTREAM
    latest: bool = False
    extra_config: dict[str, Any] | None = None  # more cloud-config (smoke checks)
    ignore_cloud_init_errors: bool = False  # a reachable guest whose cloud-init had errors is a success
    modules: bool = False  # once ready, read cloud-init's slowest modules from its log (one more SSH command)
    host_key_types: tuple[str, ...] = seeds.DEFAULT_HOST_KEY_TYPES  # empty: the image's own choice
    confidential: str | None = None  # "sev": an AMD SEV guest, attested before it runs (sev.py)
    sev_firmware: str | None = None  # the confidential OVMF: a catalog firmware name, aleph:<hash> or a file
    sev_session: Path | None = None  # the guest owner's sevctl session files: PREFIX of PREFIX_tik.bin, ...
    sev_policy: int = 0x1
    disk_cache: str | None = None  # the overlay's cache mode: "unsafe" for smoke's throwaway guests, never `up`'s
    forwards: tuple[str, ...] = ()  # --forward [ADDR:]HOSTPORT:GUESTPORT (user-mode networks)
    mounts: tuple[str, ...] = ()  # --mount HOSTDIR[:GUESTDIR][:rw]


@dataclass
class UpResult:
    instance: Instance
    timings: dict[str, float] = field(default_factory=dict)
    ready: bool = False
    profile: dict[str, float] = field(default_factory=dict)  # the guest's boot phases (bootprofile.console_phases)
    modules: list[tuple[str, float]] = field(default_factory=list)  # cloud-init's slowest modules, when asked for


@dataclass(frozen=True)
class _Inputs:
    """`up`'s inputs, checked and resolved before anything is created."""

    req: UpRequest
    name: str
    ref: ImageRef
    user: str
    keys: tuple[SshKey, ...]
    seed: seeds.SeedSpec
    iso: Future[bytes]  # built on a thread while `up` waits on libvirt (see _in_background)


def _in_background(work: Callable[[], bytes]) -> Future[bytes]:
    """Run `work` on a thread of its own: the seed ISO's CPU time (pycdlib's import, ~15 ms, and the build) then
    overlaps `up`'s waits on libvirt (connect, the overlay volume) instead of adding to them."""
    future: Future[bytes] = Future()

    def run() -> None:
        try:
            future.set_result(work())
        except BaseException as exc:  # re-raised where the ISO is needed
            future.set_exception(exc)

    threading.Thread(target=run, name="seed-iso").start()
    return future


NAME_TRIES = 8  # generated names drawn before giving up (36^4 names per image: a clash is rare)


def _taken(host: Host, name: str) -> bool:
    """Whether a domain, or an instance volume (an orphan's), already has this name: never reused, never removed."""
    if host.lookup(name) is not None:
        return True
    if POOL_NAME not in host.pool_names():
        return False
    pool = host.pool(create=False)
    return any(host.volume(pool, vol) is not None for vol in (disk_volume(name), seed_volume(name)))


def _created_at() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def default_name(image: str) -> str:
    base = "".join(c if c in string.ascii_lowercase + string.digits else "-" for c in image.lower()).strip("-")
    import random  # SystemRandom (os.urandom) is what `secrets` draws from, without its hmac and OpenSSL imports

    suffix = "".join(random.SystemRandom().choice(string.ascii_lowercase + string.digits) for _ in range(4))
    return f"{base[:58] or 'vm'}-{suffix}"


def _choose_network(host: Host, text: str | None) -> Network:
    if text:
        network = Network.parse(text)
    elif host.is_system and "default" in host.network_names():
        network = Network(NetworkKind.DEFAULT, "default")
    else:
        network = Network(NetworkKind.USER)
    if network.kind in (NetworkKind.DEFAULT, NetworkKind.NETWORK) and network.source not in host.network_names():
        raise UsageError(f"libvirt has no network named {network.source!r}", hint="'qinst doctor' lists them")
    return network


WAIT = 300.0  # seconds `up` waits for a native guest by default
EMULATED = 3.0  # an emulated guest (another architecture than the host's) gets this many times longer


def wait_seconds(asked: float | None, *, native: bool, default: float = WAIT) -> float:
    """How long to wait for a guest: what was asked, else `default` for a native guest and EMULATED times that for
    one of another architecture (emulated instruction by instruction)."""
    if asked is not None:
        return asked
    return default if native else default * EMULATED


DEFAULT_SEV_FIRMWARE = "aleph-sev-ovmf"  # the catalog's: aleph.im's confidential OVMF


def split_firmware(text: str | None, confidential: str | None) -> tuple[Firmware | None, str | None]:
    """`up --firmware`: bios or uefi; with --confidential, the confidential OVMF (a catalog firmware, aleph:<hash> or
    a file; `uefi` or nothing means the catalog's) -> (boot firmware, confidential firmware)."""
    kind = text.lower() if text else None
    if not confidential:
        if kind is None or kind in ("bios", "uefi"):
            return (Firmware(kind) if kind else None), None
        raise UsageError(
            f"--firmware {str(text)[:60]!r}: bios or uefi",
            hint="a confidential firmware (a catalog firmware, aleph:<hash> or a file) goes with --confidential sev",
        )
    if kind == "bios":
        raise UsageError("--confidential sev boots the confidential OVMF (UEFI), not --firmware bios")
    return Firmware.UEFI, (DEFAULT_SEV_FIRMWARE if kind in (None, "uefi") else text)


def firmware_for(arch: Arch, asked: Firmware | None) -> Firmware:
    """The firmware a guest of `arch` boots with: the one asked for, else BIOS for x86_64 and UEFI for aarch64;
    UsageError for one the architecture cannot use (aarch64 has no BIOS)."""
    if asked is None:
        return Firmware.BIOS if arch.bios else Firmware.UEFI
    if asked is Firmware.BIOS and not arch.bios:
        raise UsageError(
            f"{arch} guests boot only under UEFI, not with --firmware bios",
            hint="use --firmware uefi, or leave --firmware out",
        )
    return asked


def _check_arch(host: Host, arch: Arch) -> None:
    """Refuse, before anything is made, a guest architecture this host's QEMU cannot run (its emulator missing)."""
    if not host.is_test_driver and not host.domain_types(str(arch)):
        raise HypervisorError(
            f"this host's libvirt offers no {arch} guests (no qemu-system-{arch} emulator)",
            hint=f"install {arch.emulator_package} and {arch.firmware_package} on the libvirt host; 'qinst doctor' "
            "lists the architectures it can run",
        )


def _kvm_for_another_arch(arch: Arch, host_arch: str) -> UsageError:
    return UsageError(
        f"KVM cannot run an {arch} guest on this {host_arch} host", hint="use --accel auto or tcg (software emulation)"
    )


def _refuse_kvm_for_another_arch(uri: str, arch: Arch) -> None:
    """`--accel kvm` for a guest of another architecture than this machine's, on a local daemon: refused before the
    download. A remote host's architecture is known once connected (_accelerators refuses it there)."""
    if uri_is_local(uri) and not uri_is_test_driver(uri) and arch is not Arch.host():
        raise _kvm_for_another_arch(arch, str(Arch.host()))


def _accelerators(
    host: Host, wanted: Accel, cache_dir: Path | None = None, arch: Arch = Arch.X86_64
) -> tuple[Accel, ...]:
    """The accelerators to try, in order: --accel auto tries KVM when it looks usable and has not failed on this
    host before (kvmverdict.py), then TCG. A guest of another architecture than the host's runs under TCG at once
    (KVM runs only guests of its own architecture): said once, never a failed KVM start first."""
    native = host.is_test_driver or host.host_arch() in ("", str(arch))
    if not native:
        if wanted is Accel.KVM:
            raise _kvm_for_another_arch(arch, host.host_arch())
        log.info("an %s guest on this %s host runs under TCG (software emulation, several times slower)",
                 arch, host.host_arch())  # fmt: skip
        return (Accel.TCG,)
    if wanted is not Accel.AUTO:
        return (wanted,)
    if cache_dir is not None:
        failed = kvmverdict.recall(cache_dir, _kvm_key(host))
        if failed is not None:
            log.info(
                "KVM failed on this host before (%s): starting under TCG; 'qinst doctor --reset-kvm' tries KVM again",
                failed.reason,
            )
            return (Accel.TCG,)
    kvm = host.kvm_available(str(arch))
    if not kvm.usable:
        log.info("KVM is not usable here (%s): using TCG software emulation, which is slower", kvm.reason)
        return (Accel.TCG,)
    if cache_dir is not None and (paused := _paused_kvm_instance(host)):
        # An earlier `up --no-wait` started it under KVM and returned before it paused: learn from it.
        reason = f"instance {paused} paused under KVM (emulation failure)"
        kvmverdict.remember(cache_dir, _kvm_key(host), reason)
        log.info("KVM fails on this host (%s): starting under TCG; remove %s with 'qinst rm --force'", reason, paused)
        return (Accel.TCG,)
    return (Accel.KVM, Accel.TCG)


def _paused_kvm_instance(host: Host) -> str | None:
    """A qinst instance started under KVM that paused by itself (not by a user), if there is one."""
    for dom, by_user in host.paused_domains():
        if by_user:
            continue
        try:
            inst = record_of(dom.name, "paused", dom.metadata(METADATA_NS))
        except HypervisorError:
            continue  # gone meanwhile
        # Another domain's record that does not validate says nothing about KVM (and never fails this launch).
        if inst is not None and not inst.invalid and inst.metadata.accel is Accel.KVM:
            return printable_name(inst.name)
    return None


def printable_name(name: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in name)[:64]


def _kvm_key(host: Host) -> kvmverdict.HostKey:
    return kvmverdict.host_key(host.uri, host.hypervisor_version(), host.is_local)


def _ssh_host(dom: Domain, network: Network) -> Callable[[], str | None]:
    if network.kind is NetworkKind.USER:
        return lambda: "127.0.0.1"
    if network.kind is NetworkKind.NONE:
        return lambda: None
    return dom.lease_address


def _private_key(keys: Sequence[SshKey]) -> str:
    return next((str(k.private_path) for k in keys if k.private_path is not None), "")


def _quietly(what: str, action: Callable[[], object]) -> Callable[[], None]:
    """An undo step that logs its own failure, so that the steps after it still run."""

    def undo() -> None:
        try:
            action()
        except Exception as exc:
            log.warning("could not remove %s: %s", what, exc)

    return undo


@dataclass(frozen=True)
class Plan:
    """What `up` makes, decided before anything is created: the name, the port, the accelerators, the spec."""

    req: UpRequest
    name: str
    ref: ImageRef
    image: CachedImage
    seed: seeds.SeedSpec
    iso: bytes | Future[bytes]
    network: Network
    ssh_port: int
    accels: tuple[Accel, ...]
    console_log: Path
    spec: InstanceSpec  # disk and seed paths are filled in by provision()
    sev: SevInputs | None = None  # a confidential launch: what its attestation needs


@dataclass(frozen=True)
class SevInputs:
    """A confidential launch's inputs, checked before anything is made: the host's SEV parameters, the owner's
    session, the firmware (verified by hash in the cache) and its launch digest, the policy."""

    support: SevSupport
    session: Session
    firmware: CachedImage
    digest: bytes  # the firmware's SEV launch digest (GCTX.LD): the sha256 of the file
    policy: int


def attest(dom: Domain, sev: SevInputs) -> None:
    """The paused confidential guest runs only when the host measured what its owner expects (sev.py): the launch
    measurement is read through libvirt and checked; a mismatch is raised (the caller's undo destroys the guest)."""
    info = LaunchInfo.from_params(dom.launch_security_info())
    check_measurement(sev.session.tik, info, sev.digest, sev.policy)
    log.info("SEV launch measurement verified (firmware sha256 %s, policy %#x): resuming", sev.digest.hex(), sev.policy)
    dom.resume()


@dataclass
class _Run:
    """One `up` in progress: its connection, its undo steps, its timings and observers."""

    host: Host
    undo: contextlib.ExitStack
    t0: float
    progress: Progress | None
    readiness: Readiness
    cancel: threading.Event
    timeout: float
    timings: dict[str, float] = field(default_factory=dict)
    profile: dict[str, float] = field(default_factory=dict)
    t_define: float = 0.0  # when planning began: "define" times plan, provision and define together
    ignore_cloud_init_errors: bool = False

    def lap(self, phase: str, since: float) -> None:
        self.timings[phase] = round(time.monotonic() - since, 2)


class Launcher:
    """Runs `qinst up`: check the request, pull, plan, provision (volumes, seed), boot; undo everything on failure."""

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
        sev = self._sev_inputs(req, inputs.ref.arch, progress) if req.confidential else None
        image = self._pull(inputs.ref, req, progress)
        with Host(self.settings.connect) as host, contextlib.ExitStack() as undo:
            for _ in range(NAME_TRIES):
                if not _taken(host, inputs.name):
                    break
                if req.name:
                    raise UsageError(f"an instance, domain or volume named {inputs.name!r} already exists")
                inputs = self._inputs(req)  # a generated name that is taken: draw another (and its seed)
            else:
                raise UsageError("could not find a free instance name", hint="give one with --name")
            run = _Run(
                host,
                undo,
                t0,
                progress,
                readiness or Readiness(),
                cancel or threading.Event(),
                wait_seconds(req.timeout, native=host.is_test_driver or host.host_arch() in ("", str(inputs.ref.arch))),
                timings if timings is not None else {},
                ignore_cloud_init_errors=req.ignore_cloud_init_errors,
            )
            run.lap("download", t0)
            run.t_define = time.monotonic()
            plan = replace(plan_launch(host, inputs, image, self.settings.cache_dir, sev), sev=sev)
            try:
                result = self._boot(run, plan, self._provision(run, plan))
            except GuestPaused:
                raise
            except (GuestTimeout, GuestFailed) as exc:
                undo.pop_all()  # the guest booted: keep it for inspection
                name = inputs.name
                if isinstance(exc, CloudInitErrors):
                    raise CloudInitErrors(
                        exc.failures,
                        exc.keys,
                        hint=f"the guest is kept and reachable: 'qinst ssh {name}' works; remove it with "
                        f"'qinst rm --force {name}', or accept such errors with --ignore-cloud-init-errors",
                    ) from exc
                hint = f"the instance is kept for inspection: 'qinst logs {name}'; remove it with 'qinst rm {name}'"
                raise type(exc)(exc.message, hint=hint) from exc
            undo.pop_all()
            return result

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
        ref = self.store.resolve(req.image, sha256=req.sha256, sha512=req.sha512, arch=req.arch)
        firmware_for(ref.arch, req.firmware)
        if req.accel is Accel.KVM:
            _refuse_kvm_for_another_arch(self.settings.connect, ref.arch)
        user = seeds.validate_user(req.user or (ref.entry.default_user if ref.entry else "cloud"))
        keys = tuple(resolve_keys(list(req.ssh_keys), self.settings.config_dir))
        name = name or default_name(ref.name)
        seed = seeds.SeedSpec(
            hostname=name,
            instance_id=seeds.new_instance_id(),
            user=user,
            ssh_keys=tuple(k.public for k in keys),
            user_data=read_option_file(req.user_data, "--user-data"),
            user_data_source=str(req.user_data) if req.user_data else None,
            extra_config=req.extra_config,
            host_key_types=req.host_key_types,
        )
        files = seeds.seed_files(seed)  # also checks the user-data
        return _Inputs(req, name, ref, user, keys, seed, _in_background(lambda: seeds.iso_from_files(files)))

    def _sev_inputs(self, req: UpRequest, arch: Arch, progress: Progress | None) -> SevInputs:
        """A confidential launch's inputs; the host is asked first, so that a host without SEV is refused (exit 4)
        before anything is downloaded or made."""
        if req.confidential != "sev":
            raise UsageError(f"--confidential {req.confidential!r}: only sev (AMD SEV) is supported")
        if req.sev_session is None:
            raise UsageError(
                "--confidential sev needs --sev-session PREFIX (the guest owner's sevctl session files)",
                hint="make them with: sevctl session --name PREFIX PDH_CERT_FILE POLICY (the PDH from the host)",
            )
        if req.accel is Accel.TCG or req.mounts:
            raise UsageError("an SEV guest runs under KVM only, without shared folders (--accel tcg, --mount)")
        if arch is not Arch.X86_64:
            raise UsageError(f"AMD SEV guests are x86_64 guests, not {arch}")
        session = Session.load(req.sev_session)  # the owner's files first: a usage error is said before libvirt
        with Host(self.settings.connect) as host:
            from qemu_instances.host import domain_capabilities

            support = SevSupport.from_domcaps(domain_capabilities(host, "x86_64", "q35"))
        if not support.sev:
            raise HypervisorError(
                f"this host cannot run AMD SEV guests: {support.describe()}",
                hint="'qinst doctor' says what this host can run; SEV needs an AMD EPYC host with SEV enabled",
            )
        firmware = self._pull_firmware(req.sev_firmware, progress)
        from qemu_instances.sev import launch_digest

        return SevInputs(support, session, firmware, launch_digest(firmware.path), req.sev_policy)

    def _pull_firmware(self, text: str | None, progress: Progress | None) -> CachedImage:
        """The confidential firmware, verified by hash into the cache: a catalog firmware (by name: its validation
        hash checked too), aleph:<hash>, or a local file (its own sha256: the owner vouches for it)."""
        return self.store.pull(self.store.resolve(text or DEFAULT_SEV_FIRMWARE), progress=progress)

    def _pull(self, ref: ImageRef, req: UpRequest, progress: Progress | None) -> CachedImage:
        if not req.latest and req.source is Source.UPSTREAM:
            cached = self.store.cached(ref)
            if cached:
                return cached
        return self.store.pull(ref, source=req.source, latest=req.latest, progress=progress)

    def _provision(self, run: _Run, plan: Plan) -> InstanceSpec:
        """The network started, the base volume, the disk overlay and the seed volume; returns the full spec."""
        host, image, name = run.host, plan.image, plan.name
        if plan.network.kind in (NetworkKind.DEFAULT, NetworkKind.NETWORK):
            host.ensure_network_active(plan.network.source)
        pool = host.pool()
        seals = SealStore(self.settings.cache_dir, host.uri)
        base = host.base_volume(pool, image.digest.filename, image.path, image.digest, run.progress, seals=seals)
        virtual = self.store.virtual_size(image)
        disk = host.overlay_volume(pool, disk_volume(name), base, plan.req.disk_gib * GiB, image.format, virtual)
        run.undo.callback(_quietly(f"volume {disk_volume(name)}", lambda: host.delete_volume(pool, disk_volume(name))))
        _test_pause("overlay")
        iso = plan.iso if isinstance(plan.iso, bytes) else plan.iso.result()
        seed_vol = host.upload_volume(pool, seed_volume(name), io.BytesIO(iso), len(iso))
        run.undo.callback(_quietly(f"volume {seed_volume(name)}", lambda: host.delete_volume(pool, seed_volume(name))))
        _test_pause("seed")
        spec = replace(plan.spec, disk_path=host.volume_path(disk), seed_path=host.volume_path(seed_vol))
        if plan.sev is not None:  # the firmware on the host as the verified bytes (a base volume, like an image)
            fw = plan.sev.firmware
            vol = host.base_volume(pool, fw.digest.filename, fw.path, fw.digest, run.progress, seals=seals)
            sev, support = plan.sev, plan.sev.support
            spec = replace(spec, confidential=Confidential(
                host.volume_path(vol), support.cbitpos, support.reduced_phys_bits, sev.policy, sev.session.godh,
                sev.session.session,
            ))  # fmt: skip
        return spec

    def _boot(self, run: _Run, plan: Plan, spec: InstanceSpec) -> UpResult:
        """Define, start and wait, trying each accelerator in turn: a KVM guest that does not start, or that
        pauses at once (KVM present but broken), is started again under the next one. A confidential guest starts
        paused and runs only once its launch measurement is the one expected (attest)."""
        host = run.host
        for n, accel in enumerate(plan.accels):
            spec = _with_accel(spec, accel)
            more = n + 1 < len(plan.accels)
            undo = run.undo.enter_context(contextlib.ExitStack())  # this attempt's logs and domain
            undo.callback(_quietly(f"logs of {plan.name}", lambda: remove_logs(host, plan.name)))
            try:
                # undefines what does not start; a picked port taken before QEMU binds it is picked again (ports.py)
                dom, spec = start_with_port(
                    lambda s: (host.define_and_start(domain_xml(s), s.name, paused=s.confidential is not None), s),
                    spec,
                    _port_picker(host, plan),
                )
            except HypervisorError as exc:
                undo.close()
                if not more or HOSTFWD_TAKEN in exc.message:
                    raise  # a taken port is no reason to leave KVM
                log.warning("the guest does not start under %s (%s): trying %s", accel, exc.message, plan.accels[n + 1])
                self._kvm_failed(run, accel, exc.message)
                continue
            undo.callback(_quietly(f"domain {spec.name}", dom.undefine))
            if plan.sev is not None:
                attest(dom, plan.sev)  # a mismatch is raised: the undo destroys the guest
            elif more and dom.state()[0] == "paused":  # KVM present but failing: the guest paused at once
                log.warning("the guest paused under %s at start: relaunching it under %s", accel, plan.accels[n + 1])
                self._kvm_failed(run, accel, "a KVM guest pauses at once (emulation failure)")
                undo.close()
                continue
            run.lap("define", run.t_define)
            if not plan.req.wait:
                run.lap("total", run.t0)
                return UpResult(Instance(spec.name, "running", spec.metadata), run.timings)
            run.readiness.restart()
            try:
                keys = self._wait(run, dom, spec)
            except GuestPaused:
                if not more:
                    raise
                log.warning("the guest paused under %s (present but failing here): relaunching it under %s",
                            accel, plan.accels[n + 1])  # fmt: skip
                self._kvm_failed(run, accel, "a KVM guest paused while booting (emulation failure)")
                undo.close()
                continue
            run.timings.update(run.readiness.durations())
            run.lap("total", run.t0)
            meta = _record_reachable(dom, spec, keys)
            modules = _slowest_modules(spec.name, meta, self.settings) if plan.req.modules else []
            return UpResult(Instance(spec.name, "running", meta), run.timings, True, run.profile, modules)
        raise AssertionError("plan.accels is never empty")

    def _kvm_failed(self, run: _Run, accel: Accel, reason: str) -> None:
        """Remember that KVM failed on this host (its next launches start under TCG at once)."""
        if accel is Accel.KVM:
            kvmverdict.remember(self.settings.cache_dir, _kvm_key(run.host), reason)

    def _wait(self, run: _Run, dom: Domain, spec: InstanceSpec) -> list[HostKey]:
        probe = Probe(
            state=dom.state,
            console=open_console(run.host, dom, Path(spec.console_log)),
            ssh_host=_ssh_host(dom, spec.network),
            ssh_port=spec.ssh_port,
            cancelled=run.cancel.is_set,
            scan=key_checker(SshHop.from_uri(run.host.uri)),
        )
        _test_pause("wait")
        try:
            return wait_ready(probe, timeout=run.timeout, readiness=run.readiness)
        except CloudInitErrors as exc:
            run.profile = _profile(probe.console.text, run.readiness)
            _record_reachable(dom, spec, exc.keys)  # the guest is reachable: `qinst ssh` works whatever happens next
            if not run.ignore_cloud_init_errors:
                raise
            log.warning("%s (accepted: --ignore-cloud-init-errors)", exc.message.splitlines()[0].rstrip(":"))
            return exc.keys
        finally:
            run.profile = run.profile or _profile(probe.console.text, run.readiness)
            probe.console.close()


def _profile(console: str, readiness: Readiness) -> dict[str, float]:
    """The guest's boot phases from its console; the firmware's time is the host's, from running to the kernel."""
    from qemu_instances.bootprofile import console_phases

    marks = readiness.phases
    firmware = marks["kernel"] - marks["running"] if {"kernel", "running"} <= set(marks) else None
    return console_phases(console, firmware)


def _slowest_modules(name: str, meta: Metadata, settings: Settings) -> list[tuple[str, float]]:
    """cloud-init's slowest modules, from its log, over the instance's checked SSH connection (empty if unreadable)."""
    from qemu_instances.access import ssh_run
    from qemu_instances.bootprofile import MODULE_LOG_COMMAND, module_times

    try:
        result = ssh_run(Instance(name, "running", meta), settings, [MODULE_LOG_COMMAND], 60)
    except QinstError as exc:
        log.debug("cannot read cloud-init's log: %s", exc.message)
        return []
    return module_times(result.stdout)


def _record_reachable(dom: Domain, spec: InstanceSpec, keys: list[HostKey]) -> Metadata:
    """Record in the domain the guest's address and the host keys SSH was seen to offer; return that metadata."""
    meta = replace(
        spec.metadata,
        ssh_host=_ssh_host(dom, spec.network)() or "",
        host_keys="\n".join(f"{k} {b}" for k, b in keys),
    )
    dom.set_metadata(meta.to_xml(), METADATA_KEY, METADATA_NS)
    return meta


def _pick_port(host: Host) -> int:
    """A port for the SSH forward. It listens on the daemon's host: a port free here says nothing of a remote one."""
    if host.is_local:
        return free_port()
    import random

    return 20000 + random.SystemRandom().randrange(30000)


def _port_picker(host: Host, plan: Plan) -> Callable[[], int] | None:
    """How to pick another SSH forward port when the planned one is taken; None when the user chose it."""
    if plan.req.ssh_port or plan.network.kind is not NetworkKind.USER:
        return None
    return lambda: _pick_port(host)


def _forwards_and_mounts(
    host: Host, network: Network, inputs: _Inputs
) -> tuple[tuple[Forward, ...], tuple[Mount, ...], bytes | Future[bytes]]:
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
    arch = inputs.ref.arch
    mounts = resolve_mounts(host, req.mounts, str(arch), arch.machine)
    if not mounts:
        return forwards, mounts, inputs.iso
    extra = seeds.merge_cloud_config(inputs.seed.extra_config or {}, mounts_cloud_config(mounts))
    return forwards, mounts, seeds.build_seed_iso(replace(inputs.seed, extra_config=extra))


def plan_launch(
    host: Host, inputs: _Inputs, image: CachedImage, cache_dir: Path | None = None, sev: SevInputs | None = None
) -> Plan:
    """Decide everything `up` will make: it reads the host (networks, KVM, pool path) but creates nothing."""
    req, name, arch = inputs.req, inputs.name, inputs.ref.arch
    _check_arch(host, arch)
    network = _choose_network(host, req.network)
    forwards, mounts, iso = _forwards_and_mounts(host, network, inputs)
    ssh_port = 22
    if network.kind is NetworkKind.USER:
        ssh_port = req.ssh_port or _pick_port(host)
        while not req.ssh_port and ssh_port in {f.host_port for f in forwards}:
            ssh_port = _pick_port(host)
    console = console_log_path(host, None if host.is_local else host.pool(), name)
    accels = (Accel.KVM,) if sev is not None else _accelerators(host, req.accel, cache_dir, arch)
    meta = Metadata(
        image=inputs.ref.name,
        digest=str(image.digest),
        user=inputs.user,
        network=network,
        ssh_host="127.0.0.1" if network.kind is NetworkKind.USER else "",
        ssh_port=ssh_port,
        created=_created_at(),
        instance_id=inputs.seed.instance_id,
        private_key=_private_key(inputs.keys),
        console_log=str(console),
        accel=accels[0],
        volumes=owned_volumes(host, name),
        forwards=forwards,
        mounts=mounts,
        arch=arch,
    )
    spec = InstanceSpec(
        name=name,
        cpus=req.cpus,
        memory_mib=req.memory_mib,
        disk_path="",
        seed_path="",
        console_log=str(console),
        network=network,
        accel=accels[0],
        firmware=firmware_for(arch, req.firmware),
        ssh_port=ssh_port,
        metadata=meta,
        arch=arch,
        disk_cache=req.disk_cache,
    )
    return Plan(req, name, inputs.ref, image, inputs.seed, iso, network, ssh_port, accels, console, spec)


def _with_accel(spec: InstanceSpec, accel: Accel) -> InstanceSpec:
    return replace(spec, accel=accel, metadata=replace(spec.metadata, accel=accel))
