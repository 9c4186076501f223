"""qinst as a Python library: one function per command, typed values in and out, qinst's error tree, no printing.

    from qemu_instances import api

    settings = api.settings()                      # as `qinst` resolves them: environment, config file
    result = api.up(settings, api.UpRequest("debian-12", name="web1", network="user"))
    rc, out, err = api.run(settings, "web1", ["uname", "-r"])
    api.cp(settings, ["./site"], "web1:/tmp/", recursive=True)
    text = api.ssh_config(settings, ["web1"])      # OpenSSH Host blocks with qinst's checked options
    groups = api.inventory(settings).to_json()       # Ansible's dynamic inventory
    api.rm(settings, "web1", force=True)

Every function raises a `qemu_instances.errors.QinstError` subclass (each carries the CLI's exit code) and never
prints, prompts or exits; progress, where there is any, goes to a callback. The command line (cli.py) is one caller
of these functions, the pytest plugin another. Modules are imported where they are used, so that `import api` stays
as light as the commands that need little (`ls` imports neither the image store nor the launcher).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qemu_instances.errors import QinstError, UsageError
from qemu_instances.settings import Settings
from qemu_instances.settings import resolve as settings

if TYPE_CHECKING:
    from qemu_instances.arch import Arch
    from qemu_instances.doctor import Check as DoctorCheck
    from qemu_instances.download import Progress
    from qemu_instances.fleet import HostAnswer
    from qemu_instances.host import SnapshotInfo
    from qemu_instances.images import CachedImage, ImageRef, Source
    from qemu_instances.instances import Instance, Orphan
    from qemu_instances.inventory import Inventory
    from qemu_instances.launch import UpRequest, UpResult
    from qemu_instances.shards import Merged
    from qemu_instances.smoke import ImageReport, SmokeOptions
    from qemu_instances.snapshots import Created
    from qemu_instances.ssh import SshResult

__all__ = [
    "ImageListing",
    "QinstError",
    "Settings",
    "UpRequest",
    "cp",
    "doctor",
    "get",
    "images",
    "instances",
    "inventory",
    "logs",
    "prune",
    "pull",
    "rm",
    "run",
    "settings",
    "smoke",
    "smoke_merge",
    "snapshot_create",
    "snapshot_delete",
    "snapshot_list",
    "snapshot_restore",
    "ssh_argv",
    "ssh_config",
    "start",
    "stop",
    "up",
]


def __getattr__(name: str) -> Any:
    # The request types, importable from here without importing their heavy modules at `import api`.
    if name == "UpRequest":
        from qemu_instances.launch import UpRequest

        return UpRequest
    if name == "SmokeOptions":
        from qemu_instances.smoke import SmokeOptions

        return SmokeOptions
    raise AttributeError(name)


# -- images ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageListing:
    """One catalog entry as `qinst images` shows it, with what the cache holds of it."""

    name: str
    aliases: tuple[str, ...]
    title: str
    os: str | None
    release: str | None
    arch: str
    digest: str | None
    trust: str | None  # "pinned": the pinned build is verified against its digest
    latest_trust: str | None  # the latest channel: "signed", "unsigned" or None
    aleph_item_hash: str | None
    cached: CachedImage | None
    catalog: str  # where the entry comes from

    def to_json(self) -> dict[str, Any]:
        cached = self.cached
        return {
            "name": self.name,
            "aliases": list(self.aliases),
            "title": self.title,
            "os": self.os,
            "release": self.release,
            "arch": self.arch,
            "digest": self.digest,
            "trust": self.trust,
            "latest_trust": self.latest_trust,
            "aleph_item_hash": self.aleph_item_hash,
            "cached": cached is not None,
            "size": cached.size if cached else None,
            "source": cached.source if cached else None,  # where the cached file came from
            "path": str(cached.path) if cached else None,
            "catalog": self.catalog,
        }


def images(settings: Settings) -> list[ImageListing]:
    """The catalog's entries (built-in and user catalogs), each with its cached file when there is one."""
    from qemu_instances.images import ImageRef, ImageStore, RefKind

    store = ImageStore(settings)
    found = []
    for each in store.catalog:
        for arch in each.arches:
            entry = each.for_arch(arch)
            assert entry is not None
            cached = store.cached(ImageRef(RefKind.CATALOG, entry.name, entry=entry))
            if cached is None and entry.aleph_item_hash:
                cached = store.cached_aleph(entry.aleph_item_hash)  # aleph's own build: another file, its own pin
            listing = ImageListing(
                entry.name, entry.aliases, entry.title, entry.os, entry.release, entry.arch,
                str(entry.digest) if entry.digest else None, "pinned" if entry.digest else None,
                entry.latest_trust, entry.aleph_item_hash, cached, entry.origin,
            )  # fmt: skip
            found.append(listing)
    return found


def resolve(settings: Settings, image: str, *, sha256: str | None = None, sha512: str | None = None) -> ImageRef:
    """IMAGE as `pull` and `up` read it: a catalog name or alias, aleph:<hash>, a local file, a URL + digest."""
    from qemu_instances.images import ImageStore

    return ImageStore(settings).resolve(image, sha256=sha256, sha512=sha512)


def pull(
    settings: Settings,
    image: str,
    *,
    source: Source | str = "upstream",
    latest: bool = False,
    sha256: str | None = None,
    sha512: str | None = None,
    progress: Progress | None = None,
    arch: Arch | None = None,
) -> CachedImage:
    """Download IMAGE (its `arch` build, default the host's) into the cache and verify it (nothing unverified is
    ever cached)."""
    from qemu_instances.images import ImageStore, Source

    store = ImageStore(settings)
    ref = store.resolve(image, sha256=sha256, sha512=sha512, arch=arch)
    return store.pull(ref, source=Source(source), latest=latest, progress=progress)


def prune(settings: Settings) -> list[tuple[str, int]]:
    """Remove cached images and base volumes no instance uses, stale partial downloads and old orphans."""
    from qemu_instances.images import ImageStore
    from qemu_instances.instances import prune as prune_unused

    return prune_unused(settings, ImageStore(settings))


# -- instances -------------------------------------------------------------------------------------------------------


def up(settings: Settings, request: UpRequest, *, progress: Progress | None = None) -> UpResult:
    """Launch an instance; with request.wait (the default) return when cloud-init finished and SSH offers the host
    key the guest printed. settings.host == "auto" places it on the configured host with the most free memory."""
    from qemu_instances.launch import Launcher

    if settings.host == "auto":
        settings = placed(settings, request.memory_mib)
    return Launcher(settings).up(request, progress=progress)


def placed(settings: Settings, memory_mib: int) -> Settings:
    """The settings of the configured host with the most free memory that fits memory_mib."""
    from qemu_instances.fleet import for_host, place

    return for_host(settings, place(settings, memory_mib))


def _connect(settings: Settings) -> Settings:
    if settings.host == "auto":
        raise UsageError("--host auto places new instances: only 'up' takes it")
    return settings


@dataclass(frozen=True)
class Listing:
    instances: list[Instance]
    orphans: list[Orphan] = field(default_factory=list)  # volumes of an `up` killed before its domain existed


def instances(settings: Settings, *, snapshots: bool = False) -> Listing:
    """qinst's instances on the chosen host (an invalid record is listed as such, never an error)."""
    from qemu_instances.instances import list_instances, open_host, orphans

    with open_host(_connect(settings)) as host:
        return Listing(list_instances(host, snapshots=snapshots), orphans(host))


def instances_everywhere(settings: Settings) -> list[HostAnswer[list[Instance]]]:
    """Every configured host's instances, asked in parallel; a host that does not answer carries its error."""
    from qemu_instances.fleet import list_all

    return list_all(settings)


def get(settings: Settings, name: str) -> Instance:
    """The instance named `name` (UsageError when there is none, or its record is invalid)."""
    from qemu_instances.instances import get_instance, open_host

    with open_host(_connect(settings)) as host:
        return get_instance(host, name)[1]


def ssh_argv(settings: Settings, name: str, command: Sequence[str] = ()) -> list[str]:
    """The system ssh's argv for the running instance: its user, port, key and verified known_hosts."""
    from qemu_instances.access import ssh_argv as argv

    return argv(get(settings, name), settings, command)


def ssh_config(settings: Settings, names: Sequence[str] = ()) -> str:
    """OpenSSH `Host` blocks with `qinst ssh`'s checked options (qinst's known_hosts of the verified keys, strict
    checking): for `names` (each must be running, with a verified key), else every running instance that has one."""
    from qemu_instances.instances import get_instance, list_instances, open_host
    from qemu_instances.sshconfig import render

    with open_host(_connect(settings)) as host:
        found = [get_instance(host, n)[1] for n in dict.fromkeys(names)] if names else list_instances(host)
    return render(found, settings, named=bool(names))


def inventory(settings: Settings) -> Inventory:
    """Ansible's dynamic inventory of the host's instances: groups by image, host and state, and for each instance
    the connection variables that keep host-key checking on with qinst's known_hosts."""
    from qemu_instances.instances import list_instances, open_host
    from qemu_instances.inventory import build

    with open_host(_connect(settings)) as host:
        return build(list_instances(host), settings)


def run(settings: Settings, name: str, command: Sequence[str], *, timeout: float = 60.0) -> SshResult:
    """Run a command in the instance over its checked SSH connection; never raises for its exit status."""
    from qemu_instances.access import ssh_run

    return ssh_run(get(settings, name), settings, command, timeout)


def cp(settings: Settings, sources: Sequence[str], dest: str, *, recursive: bool = False) -> None:
    """Copy between this machine and one instance (`NAME:PATH` is a path in instance NAME), like scp."""
    from qemu_instances.transfer import copy, plan

    copy_plan = plan(sources, dest)
    copy(get(settings, copy_plan.instance), settings, copy_plan, recursive=recursive)


def forward_argv(settings: Settings, name: str, forwards: Sequence[str]) -> tuple[list[str], tuple[Any, ...]]:
    """The ssh -N -L argv that forwards `forwards` ([ADDR:]HOSTPORT:GUESTPORT) to the instance, and the parsed
    forwards; the host ports are free right now."""
    from qemu_instances.forwarding import check_free, parse_forwards
    from qemu_instances.tunnel import tunnel_argv

    parsed = parse_forwards(forwards)
    check_free(parsed)
    return tunnel_argv(get(settings, name), settings, parsed), parsed


def stop(settings: Settings, name: str, *, force: bool = False) -> str:
    """Shut the instance down (ACPI; powered off after 60 s, or at once with force); says what happened."""
    from qemu_instances import instances as inst

    with inst.open_host(_connect(settings)) as host:
        return inst.stop(host, name, force=force)


def start(settings: Settings, name: str, *, wait: bool = True, timeout: float = 300.0) -> Instance:
    """Start a stopped instance; with wait, return once SSH offers the host key recorded at `up`."""
    from qemu_instances import instances as inst

    with inst.open_host(_connect(settings)) as host:
        return inst.start(host, name, wait=wait, timeout=timeout)


def rm(settings: Settings, name: str, *, force: bool = False) -> list[str]:
    """Remove the instance: its domain and every volume and log qinst made for it; what went."""
    from qemu_instances import instances as inst

    with inst.open_host(_connect(settings)) as host:
        return inst.remove(host, name, force=force)


def logs(settings: Settings, name: str) -> str:
    """The instance's serial console as recorded (its last 64 MiB)."""
    from qemu_instances.console import recorded
    from qemu_instances.instances import get_instance, open_host

    with open_host(_connect(settings)) as host:
        get_instance(host, name)
        return recorded(host, name)


def snapshot_create(settings: Settings, name: str, snap: str) -> Created:
    from qemu_instances import snapshots
    from qemu_instances.instances import open_host

    with open_host(_connect(settings)) as host:
        return snapshots.create(host, name, snap)


def snapshot_list(settings: Settings, name: str) -> list[SnapshotInfo]:
    from qemu_instances import snapshots
    from qemu_instances.instances import open_host

    with open_host(_connect(settings)) as host:
        return snapshots.snapshots(host, name)


def snapshot_restore(settings: Settings, name: str, snap: str, *, timeout: float = 300.0) -> Instance:
    from qemu_instances import snapshots
    from qemu_instances.instances import open_host

    with open_host(_connect(settings)) as host:
        return snapshots.restore(host, name, snap, timeout=timeout)


def snapshot_delete(settings: Settings, name: str, snap: str) -> None:
    from qemu_instances import snapshots
    from qemu_instances.instances import open_host

    with open_host(_connect(settings)) as host:
        snapshots.delete(host, name, snap)


# -- smoke, seed, doctor ---------------------------------------------------------------------------------------------


def smoke(
    settings: Settings,
    images: Sequence[str],
    options: SmokeOptions | None = None,
    *,
    on_done: Callable[[ImageReport], None] | None = None,
) -> list[ImageReport]:
    """Boot-test every image (x firmware x arch): one report each, in order. Reports are not written here:
    `write_reports` does that (the CLI writes them even when a run is interrupted)."""
    from qemu_instances.smoke import SmokeOptions, run_smoke

    return run_smoke(_connect(settings), images, options or SmokeOptions(), on_done=on_done)


def smoke_merge(files: Sequence[Path]) -> Merged:
    """The results.json of several smoke runs (the shards of one matrix) as one run's results, in the matrix's order;
    `.passed` is False when a result failed or a shard K/N is missing. Write the reports with `smoke.write_reports`."""
    from qemu_instances.shards import merge

    if not files:
        raise UsageError("give the results.json files to merge")
    return merge(files)


def seed(
    settings: Settings,
    *,
    hostname: str = "qinst",
    instance_id: str | None = None,
    ssh_keys: Sequence[Path] = (),
    user: str = "cloud",
    user_data: Path | None = None,
    network_config: Path | None = None,
) -> tuple[bytes, Any, dict[str, bytes]]:
    """A cloud-init NoCloud seed ISO (label cidata): (the ISO's bytes, its SeedSpec, the files in it)."""
    from qemu_instances import seed as seeds

    spec = seeds.spec_from_files(
        hostname=hostname, instance_id=instance_id, ssh_keys=ssh_keys, user=user, user_data=user_data,
        network_config=network_config, config_dir=settings.config_dir,
    )  # fmt: skip
    files = seeds.seed_files(spec)
    return seeds.iso_from_files(files), spec, files


def doctor(settings: Settings, *, reset_kvm: bool = False) -> list[DoctorCheck]:
    """What works on this host: libvirt, TCG, KVM (a real KVM guest is started), pool, networks, tools."""
    from qemu_instances.doctor import run_checks

    settings = _connect(settings)
    if reset_kvm:
        from qemu_instances.kvmverdict import forget

        forget(settings.cache_dir)
    return run_checks(settings.connect, settings.cache_dir)


def with_host(settings: Settings, host: str) -> Settings:
    """The settings for one configured host (the config file's [hosts] table)."""
    from qemu_instances.fleet import for_host

    return for_host(settings, host)
