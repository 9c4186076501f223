"""The `qinst` command line: parse, call one library function, print. No business logic here."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from qemu_instances.errors import Interrupted, QinstError, SmokeFailed, as_error, handle_signals
from qemu_instances.logs import configure as configure_logging
from qemu_instances.logs import debugging
from qemu_instances.settings import (
    DEFAULT_ALEPH_API,
    DEFAULT_IPFS_GATEWAY,
    Settings,
    default_cache_dir,
    default_connect_uri,
)
from qemu_instances.text import printable, printable_lines

if TYPE_CHECKING:
    from qemu_instances.download import Progress
    from qemu_instances.images import ImageStore


def _new_app() -> typer.Typer:
    return typer.Typer(
        name="qinst",
        help="Launch QEMU instances from official Debian and Ubuntu cloud images through libvirt.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,  # a traceback with locals would print keys and user-data
        rich_markup_mode=None,  # plain help and one-line usage errors; rich is imported only for progress bars
        context_settings={"help_option_names": ["-h", "--help"]},
    )


app = _new_app()

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")]


@app.callback()
def _global(
    ctx: typer.Context,
    connect: Annotated[
        str | None,
        typer.Option("--connect", envvar="QINST_CONNECT", metavar="URI", help="libvirt URI.", show_default=False),
    ] = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            "--cache-dir", envvar="QINST_CACHE_DIR", metavar="DIR", help="Download cache.", show_default=False
        ),
    ] = None,
    catalog: Annotated[
        list[Path] | None,
        typer.Option(
            "--catalog",
            envvar="QINST_CATALOG",
            metavar="FILE",
            help="Extra catalog file (repeatable).",
            show_default=False,
        ),
    ] = None,
    mirror: Annotated[
        str | None,
        typer.Option("--mirror", envvar="QINST_MIRROR", metavar="URL", help="Replace scheme://host of upstream URLs."),
    ] = None,
    aleph_api: Annotated[
        str, typer.Option("--aleph-api", envvar="QINST_ALEPH_API", metavar="URL", help="aleph.im API base.")
    ] = (DEFAULT_ALEPH_API),
    ipfs_gateway: Annotated[
        str,
        typer.Option(
            "--ipfs-gateway", envvar="QINST_IPFS_GATEWAY", metavar="URL", help="IPFS gateway for aleph ipfs items."
        ),
    ] = (DEFAULT_IPFS_GATEWAY),
    host: Annotated[
        str | None,
        typer.Option(
            "--host",
            envvar="QINST_HOST",
            metavar="NAME",
            help="A host of the config file's [hosts] table (up: or auto).",
        ),
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show debug logs and tracebacks.")] = False,
) -> None:
    from qemu_instances.config import host_uri, load_hosts
    from qemu_instances.settings import default_config_dir

    configure_logging(debug)
    if mirror and not mirror.startswith(("http://", "https://")):
        raise typer.BadParameter("expected an http(s) URL", param_hint="--mirror")
    config_dir = default_config_dir()
    hosts = load_hosts(config_dir)
    if host and host != "auto":
        connect = host_uri(hosts, host, config_dir)  # --host wins over --connect / QINST_CONNECT
    ctx.obj = Settings(
        connect=connect or default_connect_uri(),
        cache_dir=(cache_dir or default_cache_dir()).expanduser().absolute(),
        config_dir=config_dir,
        catalogs=tuple(catalog or ()),
        mirror=mirror,
        aleph_api=aleph_api,
        ipfs_gateway=ipfs_gateway,
        hosts=hosts,
        host=host,
    )


def _settings(ctx: typer.Context, *, connects: bool = False) -> Settings:
    """The global settings; `connects` for commands that talk to the chosen libvirt host."""
    settings: Settings = ctx.obj
    if settings.host == "auto" and connects:
        raise typer.BadParameter("'auto' places new instances: only 'qinst up' takes it", param_hint="--host")
    return settings


def _print_json(data: Any) -> None:
    import json

    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def _table(rows: list[list[str]], header: list[str]) -> None:
    rows = [[printable(str(c)) for c in row] for row in rows]  # names and records come from libvirt and files
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        sys.stdout.write("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


class _ProgressBar:
    """A rich progress bar on stderr when it is a terminal; silent otherwise."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> Progress | None:
        if not sys.stderr.isatty():
            return None
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

        self._progress = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task(self.label, total=None)

        def update(done: int, total: int | None) -> None:
            self._progress.update(self._task, completed=done, total=total)

        return update

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()


# Option callbacks: values checked while parsing, before the command makes anything.
def _seconds(param: typer.CallbackParam, value: float) -> float:
    from qemu_instances.validate import seconds

    return seconds(value, param.opts[0])


def _output_file(param: typer.CallbackParam, value: Path | None) -> Path | None:
    from qemu_instances.validate import output_file

    return None if value is None else output_file(value, param.opts[0])


def _output_dir(param: typer.CallbackParam, value: Path | None) -> Path | None:
    from qemu_instances.validate import output_dir

    return None if value is None else output_dir(value, param.opts[0])


def _store(ctx: typer.Context) -> ImageStore:
    from qemu_instances.images import ImageStore

    return ImageStore(_settings(ctx))


@app.command()
def images(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List catalog images, and whether each is cached."""
    from qemu_instances.images import ImageRef, RefKind

    store = _store(ctx)
    rows: list[dict[str, Any]] = []
    for entry in store.catalog:
        cached = store.cached(ImageRef(RefKind.CATALOG, entry.name, entry=entry))
        if cached is None and entry.aleph_item_hash:
            cached = store.cached_aleph(entry.aleph_item_hash)  # aleph's own build: another file, its own pin
        rows.append(
            {
                "name": entry.name,
                "aliases": list(entry.aliases),
                "title": entry.title,
                "os": entry.os,
                "release": entry.release,
                "arch": entry.arch,
                "digest": str(entry.digest) if entry.digest else None,
                "trust": "pinned" if entry.digest else None,  # the pinned build: verified against the digest
                "latest_trust": entry.latest_trust,  # the latest channel: "signed", "unsigned" or None
                "aleph_item_hash": entry.aleph_item_hash,
                "cached": cached is not None,
                "size": cached.size if cached else None,
                "source": cached.source if cached else None,  # where the cached file came from
                "path": str(cached.path) if cached else None,
                "catalog": entry.origin,
            }
        )
    if as_json:
        _print_json(rows)
        return
    _table(
        [
            [
                r["name"],
                ",".join(r["aliases"]) or "-",
                r["arch"],
                f"{_size(r['size'])} ({r['source']})" if r["cached"] else "no",
                (r["digest"] or "-")[:19],
                _trust(r["trust"], r["latest_trust"]),
                r["title"],
            ]
            for r in rows
        ],
        ["NAME", "ALIASES", "ARCH", "CACHED", "DIGEST", "TRUST", "TITLE"],
    )


def _trust(pinned: str | None, latest: str | None) -> str:
    """The TRUST column: how the pinned build and the latest channel are verified, e.g. "pinned,latest:unsigned"."""
    parts = [pinned] if pinned else []
    if latest:
        parts.append(f"latest:{latest}")
    return ",".join(parts) or "-"


@app.command()
def pull(
    ctx: typer.Context,
    image: Annotated[str, typer.Argument(help="Catalog name or alias, aleph:<hash>, local file, or URL.")],
    source: Annotated[str, typer.Option("--source", help="upstream or aleph.")] = "upstream",
    latest: Annotated[bool, typer.Option("--latest", help="Take the newest build, checked against its SUMS file.")] = (
        False
    ),
    sha256: Annotated[str | None, typer.Option("--sha256", help="Digest of a URL image.")] = None,
    sha512: Annotated[str | None, typer.Option("--sha512", help="Digest of a URL image.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Download an image into the cache and verify it."""
    from qemu_instances.images import Source

    src = _choice(Source, source, "--source")
    store = _store(ctx)
    ref = store.resolve(image, sha256=sha256, sha512=sha512)
    with _ProgressBar(f"pull {ref.name}") as progress:
        pulled = store.pull(ref, source=src, latest=latest, progress=progress)
    if as_json:
        data = pulled.to_json()
        _print_json({k: data[k] for k in ("name", "digest", "path", "size", "source")})
    else:
        sys.stdout.write(f"{pulled.name}  {pulled.digest}\n{pulled.path}  ({_size(pulled.size)})\n")


@app.command()
def prune(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Remove cached images that no instance uses, and stale partial downloads."""
    from qemu_instances.instances import prune as prune_unused

    removed = prune_unused(_settings(ctx, connects=True), _store(ctx))
    if as_json:
        _print_json([{"path": p, "size": s} for p, s in removed])
        return
    for path, size in removed:
        sys.stdout.write(f"removed {path} ({_size(size)})\n")
    sys.stderr.write(f"removed {len(removed)} item(s)\n" if removed else "nothing to prune\n")


@app.command()
def up(
    ctx: typer.Context,
    image: Annotated[str, typer.Argument(help="Catalog name or alias, aleph:<hash>, local file, or URL.")],
    name: Annotated[str | None, typer.Option("--name", help="Instance name (default <image>-<4 chars>).")] = None,
    cpus: Annotated[int, typer.Option("--cpus", min=1, help="Virtual CPUs.")] = 2,
    memory: Annotated[int, typer.Option("--memory", min=64, help="Memory in MiB.")] = 1024,
    disk: Annotated[int, typer.Option("--disk", min=1, help="Disk size in GiB (the root fs grows to it).")] = 10,
    ssh_key: Annotated[
        list[Path] | None, typer.Option("--ssh-key", help="Public key file (repeatable).", show_default=False)
    ] = None,
    user: Annotated[str | None, typer.Option("--user", help="Login user (default: the image's).")] = None,
    user_data: Annotated[Path | None, typer.Option("--user-data", help="cloud-config, script or multipart.")] = None,
    network: Annotated[
        str | None,
        typer.Option("--network", help="default | network:NAME | bridge:DEV | user | user:restrict | none."),
    ] = None,
    ssh_port: Annotated[
        int | None, typer.Option("--ssh-port", min=1, max=65535, help="Host port for SSH (user network).")
    ] = None,
    accel: Annotated[str, typer.Option("--accel", help="auto | kvm | tcg.")] = "auto",
    firmware: Annotated[str, typer.Option("--firmware", help="bios | uefi.")] = "bios",
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait until cloud-init finished and SSH answers.")] = (
        True
    ),
    timeout: Annotated[float, typer.Option("--timeout", callback=_seconds, help="Seconds to wait for the guest.")] = (
        300.0
    ),
    source: Annotated[str, typer.Option("--source", help="upstream or aleph.")] = "upstream",
    latest: Annotated[bool, typer.Option("--latest", help="Take the newest upstream build.")] = False,
    ignore_cloud_init_errors: Annotated[
        bool, typer.Option("--ignore-cloud-init-errors", help="Succeed (with a warning) when cloud-init had errors.")
    ] = False,
    forward: Annotated[
        list[str] | None,
        typer.Option(
            "--forward",
            metavar="[ADDR:]HOSTPORT:GUESTPORT",
            help="Forward a TCP port (repeatable; user-mode networks; ADDR defaults to 127.0.0.1).",
            show_default=False,
        ),
    ] = None,
    mount: Annotated[
        list[str] | None,
        typer.Option(
            "--mount",
            metavar="HOSTDIR[:GUESTDIR][:rw]",
            help="Share a folder of the libvirt host (repeatable; a remote host's own folder). Read-only unless :rw,"
            " enforced by the host; with :rw, root in the guest can make root-owned and set-uid files in it.",
            show_default=False,
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Launch an instance and wait until it is ready."""
    from qemu_instances.domain import Accel, Firmware
    from qemu_instances.images import Source
    from qemu_instances.launch import Launcher, UpRequest

    request = UpRequest(
        image=image,
        name=name,
        cpus=cpus,
        memory_mib=memory,
        disk_gib=disk,
        ssh_keys=tuple(ssh_key or ()),
        user=user,
        user_data=user_data,
        network=network,
        ssh_port=ssh_port,
        accel=_choice(Accel, accel, "--accel"),
        firmware=_choice(Firmware, firmware, "--firmware"),
        wait=wait,
        timeout=timeout,
        source=_choice(Source, source, "--source"),
        latest=latest,
        ignore_cloud_init_errors=ignore_cloud_init_errors,
        forwards=tuple(forward or ()),
        mounts=tuple(mount or ()),
    )
    settings = _settings(ctx)
    if settings.host == "auto":
        from qemu_instances.fleet import for_host, place

        settings = for_host(settings, place(settings, memory))
        sys.stderr.write(f"placing {image} on host {settings.host} (the most free memory)\n")
    with _ProgressBar(f"pull {image}") as progress:
        result = Launcher(settings).up(request, progress=progress)
    inst, meta = result.instance, result.instance.metadata
    if as_json:
        data = {"host": settings.host, **inst.to_json()}
        data["ready"] = result.ready
        data["timings"] = result.timings
        _print_json(data)
        return
    if result.ready:
        sys.stderr.write(f"{inst.name} is ready ({', '.join(f'{k} {v}s' for k, v in result.timings.items())})\n")
    else:
        sys.stderr.write(f"{inst.name} is starting (not waiting for it)\n")
    sys.stdout.write(f"{inst.name}\n")
    where = f"{meta.user}@{meta.ssh_host}" + (f" -p {meta.ssh_port}" if meta.ssh_port != 22 else "")
    sys.stderr.write(f"connect: qinst ssh {inst.name}    (ssh {where})\n")


@app.command("ls")
def list_(
    ctx: typer.Context,
    all_hosts: Annotated[bool, typer.Option("--all-hosts", help="Every host of the config file, in parallel.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """List qinst's instances: name, state, image, address, age."""
    from qemu_instances.instances import list_instances, open_host, orphans

    if all_hosts:
        _list_all_hosts(ctx, as_json)
        return
    with open_host(_settings(ctx, connects=True)) as host:
        found = list_instances(host, snapshots=as_json)  # the count costs a call per domain
        lost = orphans(host)  # volumes of an `up` killed before its domain was defined: 'qinst rm NAME'
    if as_json:
        _print_json([i.to_json() for i in found] + [o.to_json() for o in lost])
        return
    _table(
        [
            [i.name, i.to_json()["state"], i.metadata.image, i.address, _age(i.metadata.created), _forwards(i)]
            for i in found
        ]
        + [[o.name, "orphan", "-", "-", "-", "-"] for o in lost],
        ["NAME", "STATE", "IMAGE", "ADDRESS", "AGE", "FORWARDS"],
    )


def _forwards(inst: Any) -> str:
    from qemu_instances.forwarding import Forward

    shown = [Forward.parse(f) for f in inst.metadata.forwards]
    return ",".join(f"{f.addr}:{f.host_port}->{f.guest_port}" for f in shown) or "-"


def _list_all_hosts(ctx: typer.Context, as_json: bool) -> None:
    from qemu_instances.fleet import list_all

    answers = list_all(_settings(ctx))
    rows: list[dict[str, Any]] = []
    for answer in answers:
        if answer.error is not None:
            sys.stderr.write(f"qinst: warning: host {answer.host} is unreachable: {answer.error}\n")
            rows.append({"host": answer.host, "error": answer.error})
        rows += [{"host": answer.host, **i.to_json()} for i in answer.value or []]
    if as_json:
        _print_json(rows)
    else:
        _table(
            [
                [r["host"], r["name"], r["state"], r["image"], f"{r['ssh']['host'] or '-'}:{r['ssh']['port']}",
                 _age(r["created"])]
                for r in rows
                if "error" not in r
            ],
            ["HOST", "NAME", "STATE", "IMAGE", "ADDRESS", "AGE"],
        )  # fmt: skip
    if all(a.error is not None for a in answers):
        raise typer.Exit(4)


def _age(created: str) -> str:
    import datetime as dt

    try:
        seconds = (dt.datetime.now(dt.UTC) - dt.datetime.fromisoformat(created)).total_seconds()
    except ValueError:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def ssh(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Instance name.")],
    command: Annotated[list[str] | None, typer.Argument(help="Command to run (after --).")] = None,
) -> None:
    """Open SSH to an instance (or run a command), checking its host key."""
    import os

    from qemu_instances.access import ssh_argv
    from qemu_instances.instances import get_instance, open_host

    settings = _settings(ctx, connects=True)
    with open_host(settings) as host:
        _, inst = get_instance(host, name)
    argv = ssh_argv(inst, settings, [*(command or []), *ctx.args])
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp(argv[0], argv)


@app.command()
def cp(
    ctx: typer.Context,
    paths: Annotated[list[str], typer.Argument(help="SRC... DST; NAME:PATH is a path in instance NAME.")],
    recursive: Annotated[bool, typer.Option("-r", "--recursive", help="Copy folders.")] = False,
) -> None:
    """Copy files between this machine and an instance (scp, host key checked)."""
    from qemu_instances.instances import get_instance, open_host
    from qemu_instances.transfer import copy, plan

    if len(paths) < 2:
        raise typer.BadParameter("give at least a source and a destination", param_hint="SRC... DST")
    copy_plan = plan(paths[:-1], paths[-1])
    settings = _settings(ctx, connects=True)
    with open_host(settings) as host:
        _, inst = get_instance(host, copy_plan.instance)
    copy(inst, settings, copy_plan, recursive=recursive)


@app.command()
def forward(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Instance name.")],
    forwards: Annotated[list[str], typer.Argument(metavar="[ADDR:]HOSTPORT:GUESTPORT...", help="TCP forwards.")],
) -> None:
    """Forward ports to an instance while this runs (an SSH tunnel; any network). Ctrl-C ends it."""
    from qemu_instances.forwarding import check_free, parse_forwards, run_tunnel, tunnel_argv
    from qemu_instances.instances import get_instance, open_host

    parsed = parse_forwards(forwards)
    check_free(parsed)
    settings = _settings(ctx, connects=True)
    with open_host(settings) as host:
        _, inst = get_instance(host, name)
    argv = tunnel_argv(inst, settings, parsed)

    def ready() -> None:
        for f in parsed:
            sys.stderr.write(f"forwarding {f.addr}:{f.host_port} -> {name}:{f.guest_port}\n")
        sys.stderr.write("press Ctrl-C to stop\n")

    try:
        run_tunnel(argv, parsed, ready)
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM, SIGHUP: main() gives the exit code (130, 143, 129)
        sys.stderr.write("stopped\n")
        raise


snapshot_app = typer.Typer(help="Snapshots of an instance: create, list, restore, delete.", no_args_is_help=True)
app.add_typer(snapshot_app, name="snapshot")


@snapshot_app.command("create")
def snapshot_create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Instance name.")],
    snap: Annotated[str, typer.Argument(help="Snapshot name.")],
) -> None:
    """Snapshot an instance: with its memory when it runs, its disk only when it is stopped."""
    from qemu_instances import snapshots
    from qemu_instances.instances import open_host

    with open_host(_settings(ctx, connects=True)) as host:
        made = snapshots.create(host, name, snap)
    kind = "memory and disk: restore resumes it running" if made.memory else "disk only: the instance was stopped"
    sys.stderr.write(f"{name}: snapshot {snap} created ({kind})\n")


@snapshot_app.command("list")
def snapshot_list(
    ctx: typer.Context, name: Annotated[str, typer.Argument(help="Instance name.")], as_json: JsonOpt = False
) -> None:
    """List an instance's snapshots, oldest first."""
    import datetime as dt

    from qemu_instances import snapshots
    from qemu_instances.instances import open_host

    with open_host(_settings(ctx, connects=True)) as host:
        found = snapshots.snapshots(host, name)
    rows: list[dict[str, Any]] = [
        {
            "name": s.name,
            "created": dt.datetime.fromtimestamp(s.created, dt.UTC).isoformat(),
            "state": s.state,
            "memory": s.memory,
        }
        for s in found
    ]
    if as_json:
        _print_json(rows)
        return
    _table(
        [[r["name"], r["created"], r["state"], "memory+disk" if r["memory"] else "disk"] for r in rows],
        ["NAME", "CREATED", "STATE", "KIND"],
    )


@snapshot_app.command("restore")
def snapshot_restore(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Instance name.")],
    snap: Annotated[str, typer.Argument(help="Snapshot name.")],
    timeout: Annotated[
        float, typer.Option("--timeout", callback=_seconds, help="Seconds to wait for SSH after the restore.")
    ] = 300.0,
) -> None:
    """Return an instance to a snapshot (running again if the snapshot holds its memory)."""
    from qemu_instances import snapshots
    from qemu_instances.instances import open_host

    with open_host(_settings(ctx, connects=True)) as host:
        inst = snapshots.restore(host, name, snap, timeout=timeout)
    sys.stderr.write(f"{name}: restored to {snap} ({inst.state})\n")


@snapshot_app.command("delete")
def snapshot_delete(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Instance name.")],
    snap: Annotated[str, typer.Argument(help="Snapshot name.")],
) -> None:
    """Delete one snapshot of an instance."""
    from qemu_instances import snapshots
    from qemu_instances.instances import open_host

    with open_host(_settings(ctx, connects=True)) as host:
        snapshots.delete(host, name, snap)
    sys.stderr.write(f"{name}: snapshot {snap} deleted\n")


@app.command()
def console(ctx: typer.Context, name: Annotated[str, typer.Argument(help="Instance name.")]) -> None:
    """Attach to an instance's serial console (leave with Ctrl-]])."""
    import os
    import shutil

    from qemu_instances.instances import get_instance, open_host

    settings = _settings(ctx, connects=True)
    with open_host(settings) as host:
        get_instance(host, name)
    if shutil.which("virsh") is None:
        raise QinstError("virsh not found", hint="install libvirt-clients")
    os.execvp("virsh", ["virsh", "--connect", settings.connect, "console", name])


@app.command()
def logs(ctx: typer.Context, name: Annotated[str, typer.Argument(help="Instance name.")]) -> None:
    """Print an instance's serial console as recorded."""
    from qemu_instances.access import console_text
    from qemu_instances.instances import get_instance, open_host

    with open_host(_settings(ctx, connects=True)) as host:
        _, inst = get_instance(host, name)
        sys.stdout.write(console_text(host, inst))


@app.command()
def stop(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Instance name.")],
    force: Annotated[bool, typer.Option("--force", help="Power off at once.")] = False,
) -> None:
    """Shut an instance down (ACPI; powered off if it does not stop within a minute)."""
    from qemu_instances import instances

    with instances.open_host(_settings(ctx, connects=True)) as host:
        outcome = instances.stop(host, name, force=force)
    sys.stderr.write(f"{name}: {outcome}\n")


@app.command()
def start(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Instance name.")],
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait until SSH answers.")] = True,
    timeout: Annotated[float, typer.Option("--timeout", callback=_seconds, help="Seconds to wait for SSH.")] = 300.0,
) -> None:
    """Start a stopped instance (and wait until SSH answers with its recorded host key)."""
    from qemu_instances import instances

    with instances.open_host(_settings(ctx, connects=True)) as host:
        instances.start(host, name, wait=wait, timeout=timeout)
    sys.stderr.write(f"{name}: started\n")


@app.command()
def rm(
    ctx: typer.Context,
    names: Annotated[list[str], typer.Argument(help="Instance names.")],
    force: Annotated[bool, typer.Option("--force", "-f", help="Remove running instances too.")] = False,
) -> None:
    """Remove instances: the domain and every volume qinst made for it."""
    from qemu_instances import instances

    failed: QinstError | None = None
    with instances.open_host(_settings(ctx, connects=True)) as host:
        for name in names:
            try:
                removed = instances.remove(host, name, force=force)
            except QinstError as exc:
                report_error(exc)  # and go on with the other names
                failed = exc
                continue
            sys.stderr.write(f"removed {', '.join(removed)}\n")
    if failed:
        raise typer.Exit(failed.exit_code)


@app.command()
def smoke(
    ctx: typer.Context,
    images: Annotated[list[str], typer.Argument(help="Images to boot-test.")],
    junit: Annotated[
        Path | None, typer.Option("--junit", callback=_output_file, help="Write a JUnit XML report here.")
    ] = None,
    parallel: Annotated[
        int | None, typer.Option("--parallel", min=1, help="Boots at once (default: what cores and memory allow).")
    ] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", callback=_seconds, help="Seconds each image may take to become ready.")
    ] = 600.0,
    # Checked (and made) by validate.output_dir in the body, after every other option: a refused option leaves
    # no empty folder behind.
    artifacts: Annotated[
        Path | None, typer.Option("--artifacts", help="Console, logs, journal and results.json go here.")
    ] = None,
    keep_failed: Annotated[bool, typer.Option("--keep-failed", help="Keep failed instances for inspection.")] = False,
    accel: Annotated[str, typer.Option("--accel", help="auto | kvm | tcg.")] = "auto",
    network: Annotated[str, typer.Option("--network", help="Network for the guests (as for up).")] = "user",
    hosts: Annotated[
        str | None, typer.Option("--hosts", help="Spread the images over these hosts (a,b: config file names).")
    ] = None,
    checks_file: Annotated[
        Path | None, typer.Option("--checks", help="TOML file of [[check]] tables: more checks to run.")
    ] = None,
    check: Annotated[
        list[str] | None, typer.Option("--check", help="NAME=COMMAND: a check that must exit 0 (repeatable).")
    ] = None,
    skip: Annotated[list[str] | None, typer.Option("--skip", help="Skip this check (repeatable).")] = None,
    allow_warning: Annotated[
        list[str] | None,
        typer.Option("--allow-warning", help="REGEX: a cloud-init.log WARNING line to accept (repeatable)."),
    ] = None,
    allow_failed_unit: Annotated[
        list[str] | None, typer.Option("--allow-failed-unit", help="GLOB: a failed unit to accept (repeatable).")
    ] = None,
    firmware: Annotated[str, typer.Option("--firmware", help="bios, uefi or both (bios,uefi).")] = "bios",
    user_data: Annotated[
        Path | None, typer.Option("--user-data", help="More user data, merged over smoke's own.")
    ] = None,
    cpus: Annotated[int | None, typer.Option("--cpus", help="vCPUs per guest (default: cores shared).")] = None,
    memory: Annotated[int, typer.Option("--memory", help="MiB per guest.")] = 1024,
    latest: Annotated[bool, typer.Option("--latest", help="Today's upstream build (verified), not the pin.")] = False,
    retries: Annotated[int, typer.Option("--retries", help="Boot a failed image again up to N times.")] = 0,
    baseline: Annotated[
        Path | None, typer.Option("--baseline", help="A previous run's JSON results to compare timings with.")
    ] = None,
    regression_threshold: Annotated[
        float, typer.Option("--regression-threshold", help="Slower than X times the baseline (and 5 s) fails.")
    ] = 1.25,
    summary: Annotated[
        Path | None, typer.Option("--summary", callback=_output_file, help="Write a Markdown summary here.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Boot each image, run the checks in it, and report (exit 6 if any failed)."""
    import math

    from qemu_instances import checks
    from qemu_instances.domain import Accel, Firmware, Network
    from qemu_instances.files import read_option_file
    from qemu_instances.smoke import ImageReport, SmokeOptions, run_smoke, write_reports
    from qemu_instances.smokereport import load_baseline, results_json
    from qemu_instances.validate import output_dir

    # Everything the user gave is checked before anything boots (--junit, --summary, --timeout, --parallel by
    # their option callbacks).
    if retries < 0 or (cpus is not None and cpus < 1) or memory < 256:
        raise typer.BadParameter("--retries must be >= 0, --cpus >= 1 and --memory >= 256 (MiB)")
    if not math.isfinite(regression_threshold) or regression_threshold < 1.0:
        raise typer.BadParameter("must be a number >= 1", param_hint="--regression-threshold")
    Network.parse(network)
    accelerator = _choice(Accel, accel, "--accel")
    firmwares = tuple(dict.fromkeys(_choice(Firmware, f.strip(), "--firmware") for f in firmware.split(",")))
    read_option_file(user_data, "--user-data")  # as up checks it, once rather than at each image's launch
    user_checks = checks.load_checks(checks_file) if checks_file else []
    user_checks += [checks.parse_check_option(c) for c in check or []]
    planned = tuple(checks.plan(user_checks, skip or []))
    allow_warnings = tuple(checks.compile_regex(r, "--allow-warning") for r in allow_warning or [])
    last_night = load_baseline(baseline) if baseline else None
    if artifacts is not None:
        output_dir(artifacts, "--artifacts")  # made last: a refused option leaves no empty folder behind
    opts = SmokeOptions(
        timeout=timeout,
        parallel=parallel,
        artifacts=artifacts,
        keep_failed=keep_failed,
        accel=accelerator,
        network=network,
        hosts=tuple(h.strip() for h in hosts.split(",") if h.strip()) if hosts else (),
        cpus=cpus,
        memory_mib=memory,
        firmwares=firmwares,
        user_data=user_data,
        latest=latest,
        checks=planned,
        skipped=tuple(dict.fromkeys(skip or [])),
        allow_warnings=allow_warnings,
        allow_failed_units=tuple(allow_failed_unit or []),
        retries=retries,
        baseline=last_night,
        regression_threshold=regression_threshold,
    )
    done: list[ImageReport] = []

    def report_line(report: ImageReport) -> None:
        done.append(report)
        flaky = f", flaky: passed on attempt {report.attempts}" if report.flaky else ""
        if report.passed:
            sys.stderr.write(f"PASS {report.suite} ({len(report.checks)} checks, {report.seconds:.1f} s{flaky})\n")
        else:
            first = report.failed[0] if report.failed else None
            why = f"{first.name}: {first.message}" if first else "no check passed"
            kept = f" (kept: {report.instance})" if report.kept else ""
            sys.stderr.write(f"FAIL {report.suite}: {(why.splitlines() or [''])[0]}{kept}\n")

    def write(reports: list[ImageReport]) -> None:
        write_reports(reports, junit=junit, summary=summary, artifacts=artifacts, baseline=opts.baseline)

    # Ctrl-C and SIGTERM (main() raises it as a KeyboardInterrupt) stop every boot and remove every instance in
    # run_smoke; the reports of what finished are written here, and main() gives exit 130 / 143.
    try:
        reports = run_smoke(_settings(ctx, connects=True), images, opts, on_done=report_line)
    except BaseException:
        write(done)  # what finished
        raise
    write(reports)
    if as_json:
        _print_json(results_json(reports))
    failed = [r.suite for r in reports if not r.passed]
    if failed:
        raise SmokeFailed(f"{len(failed)} of {len(reports)} image(s) failed: {', '.join(failed)}")


@app.command()
def seed(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", callback=_output_file, help="Where to write the ISO.")],
    hostname: Annotated[str, typer.Option("--hostname", help="Guest host name.")] = "qinst",
    instance_id: Annotated[
        str | None, typer.Option("--instance-id", help="cloud-init instance id (default random).")
    ] = (None),
    ssh_key: Annotated[
        list[Path] | None, typer.Option("--ssh-key", help="Public key file (repeatable).", show_default=False)
    ] = None,
    user: Annotated[str, typer.Option("--user", help="Default user.")] = "cloud",
    user_data: Annotated[Path | None, typer.Option("--user-data", help="cloud-config, script or multipart.")] = None,
    network_config: Annotated[Path | None, typer.Option("--network-config", help="Network config (v1/v2).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Write a cloud-init NoCloud seed ISO (label cidata) and nothing else."""
    from qemu_instances import seed as seeds
    from qemu_instances.files import read_option_file, write_atomically
    from qemu_instances.sshkeys import resolve_keys

    keys = resolve_keys(list(ssh_key or ()), _settings(ctx).config_dir)
    spec = seeds.SeedSpec(
        hostname=seeds.validate_hostname(hostname),
        instance_id=instance_id or seeds.new_instance_id(),
        user=user,
        ssh_keys=tuple(k.public for k in keys),
        user_data=read_option_file(user_data, "--user-data"),
        user_data_source=str(user_data) if user_data else None,
        network_config=read_option_file(network_config, "--network-config"),
        network_config_source=str(network_config) if network_config else None,
    )
    files = seeds.seed_files(spec)
    iso = seeds.iso_from_files(files)  # built whole before anything is written
    try:
        write_atomically(out, iso)
    except OSError as exc:
        raise QinstError(f"cannot write {out}: {exc.strerror}") from exc
    if as_json:
        _print_json(
            {
                "path": str(out),
                "size": len(iso),
                "hostname": spec.hostname,
                "instance_id": spec.instance_id,
                "user": spec.user,
                "ssh_keys": [k.public.split()[0] + " " + k.public.split()[1][-12:] for k in keys],
                "files": {name: len(data) for name, data in files.items()},
            }
        )
    else:
        sys.stderr.write(f"wrote {out} ({len(iso)} bytes, instance-id {spec.instance_id})\n")


@app.command()
def doctor(
    ctx: typer.Context,
    as_json: JsonOpt = False,
    reset_kvm: Annotated[
        bool, typer.Option("--reset-kvm", help="Forget that KVM failed here: the next 'up' tries KVM again.")
    ] = False,
) -> None:
    """Check what works on this host: libvirt, KVM (really usable), TCG, pool, networks, tools."""
    from qemu_instances.doctor import run_checks

    settings = _settings(ctx, connects=True)
    if reset_kvm:
        from qemu_instances.kvmverdict import forget

        sys.stderr.write(f"forgot {len(forget(settings.cache_dir))} remembered KVM verdict(s)\n")
    checks = run_checks(settings.connect, settings.cache_dir)
    if as_json:
        _print_json([c.to_json() for c in checks])
    else:
        for c in checks:
            status = "ok" if c.ok else ("FAIL" if c.required else "no")
            sys.stdout.write(f"{status:<5}{c.name:<12}{c.detail}\n")
            if c.hint and not c.ok:
                sys.stdout.write(f"{'':<17}-> {c.hint}\n")
    if any(c.required and not c.ok for c in checks):
        raise typer.Exit(4)


def _choice(enum: Any, value: str, option: str) -> Any:
    try:
        return enum(value)
    except ValueError:
        choices = ", ".join(m.value for m in enum)
        raise typer.BadParameter(f"{value!r} is not one of {choices}", param_hint=option) from None


def report_error(exc: QinstError) -> None:
    """The one way an error reaches the user: a line, and the hint with the fix when there is one."""
    message = printable_lines(exc.message)  # it may quote names, records and console lines from elsewhere
    sys.stderr.write(f"qinst: error: {message}\n" + (f"hint: {printable_lines(exc.hint)}\n" if exc.hint else ""))


# The global options (_global's) that take a value: the word after one is not a command name.
GLOBAL_VALUE_OPTIONS = frozenset(
    {"--connect", "--cache-dir", "--catalog", "--mirror", "--aleph-api", "--ipfs-gateway", "--host"}
)


def _command_name(args: list[str]) -> str | None:
    """The command `args` run, after the global options; None when they ask for help or name no command."""
    words = iter(args)
    for word in words:
        if word in ("-h", "--help", "--"):
            return None
        if word in GLOBAL_VALUE_OPTIONS:
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def app_for(args: list[str]) -> typer.Typer:
    """The app holding only the command `args` run: typer builds the options of every command it holds on each
    run (~0.04 s, a third of `qinst ls`). Help, no command or an unknown one get the whole app: its listing, its
    error."""
    from typer.main import get_command_name

    name = _command_name(args)
    commands = [
        c for c in app.registered_commands if (c.name or get_command_name(getattr(c.callback, "__name__", ""))) == name
    ]
    groups = [g for g in app.registered_groups if g.name == name]
    if not commands and not groups:
        return app
    one = _new_app()
    one.registered_callback = app.registered_callback
    one.registered_commands = commands
    one.registered_groups = groups
    return one


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app and map every error to a message and the documented exit code.

    Typer (standalone) handles usage errors itself: a message and exit 2.
    """
    configure_logging(False)  # --debug turns on debug logs once the options are parsed
    handle_signals()
    try:
        try:
            args = list(sys.argv[1:] if argv is None else argv)
            app_for(args)(args=args, prog_name="qinst")
        except SystemExit as exc:
            # Typer turns Ctrl-C into a silent exit 130: give it (and SIGTERM) the one path below.
            interrupt = exc.__context__.__cause__ if exc.__context__ is not None else None
            if isinstance(interrupt, KeyboardInterrupt):
                raise interrupt from None
            raise
    except (Exception, KeyboardInterrupt) as exc:
        error = as_error(exc)
        if debugging() and not isinstance(error, Interrupted):
            import traceback

            traceback.print_exception(exc)
        report_error(error)
        raise SystemExit(error.exit_code) from None
