"""The `qinst` command line: parse, call one function of the library (api.py), print. No business logic here.

Shared options are declared once in cli_options.py; errors reach the user through one printer (`report_error`) and
one map from exceptions, signals included, to exit codes (`errors.as_error`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from qemu_instances import api, cli_tools
from qemu_instances import cli_options as opt
from qemu_instances.arch import Arch
from qemu_instances.cli_app import app_for, joined_words
from qemu_instances.cli_output import ProgressBar, age, print_json, say, size, table
from qemu_instances.domain import Accel, Firmware
from qemu_instances.errors import Interrupted, QinstError, SmokeFailed, as_error, handle_signals
from qemu_instances.logs import configure as configure_logging
from qemu_instances.logs import debugging
from qemu_instances.proc import replace_process
from qemu_instances.settings import DEFAULT_ALEPH_API, DEFAULT_IPFS_GATEWAY, Settings
from qemu_instances.text import printable, printable_lines

if TYPE_CHECKING:
    from qemu_instances.instances import Instance
    from qemu_instances.smoke import ImageReport


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


@app.callback()
def _global(
    ctx: typer.Context,
    connect: opt.ConnectOpt = None,
    cache_dir: opt.CacheDirOpt = None,
    catalog: opt.CatalogOpt = None,
    mirror: opt.MirrorOpt = None,
    aleph_api: opt.AlephApiOpt = DEFAULT_ALEPH_API,
    ipfs_gateway: opt.IpfsGatewayOpt = DEFAULT_IPFS_GATEWAY,
    host: opt.HostOpt = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show debug logs and tracebacks.")] = False,
) -> None:
    configure_logging(debug)
    if mirror and not mirror.startswith(("http://", "https://")):
        raise typer.BadParameter("expected an http(s) URL", param_hint="--mirror")
    ctx.obj = api.settings(
        connect=connect, cache_dir=cache_dir, catalogs=tuple(catalog or ()), mirror=mirror,
        aleph_api=aleph_api, ipfs_gateway=ipfs_gateway, host=host,
    )  # fmt: skip


def _settings(ctx: typer.Context, *, connects: bool = False) -> Settings:
    """The global settings; `connects` for commands that talk to the chosen libvirt host."""
    settings: Settings = ctx.obj
    if settings.host == "auto" and connects:
        raise typer.BadParameter("'auto' places new instances: only 'qinst up' takes it", param_hint="--host")
    return settings


# -- images ------------------------------------------------------------------------------------------------------------


@app.command()
def images(ctx: typer.Context, as_json: opt.JsonOpt = False) -> None:
    """List catalog images, and whether each is cached."""
    found = api.images(_settings(ctx))
    if as_json:
        print_json([row.to_json() for row in found])
        return
    rows = []
    for r in found:
        cached = f"{size(r.cached.size)} ({r.cached.source})" if r.cached else "no"
        trust = ",".join([*([r.trust] if r.trust else []), *([f"latest:{r.latest_trust}"] if r.latest_trust else [])])
        rows.append([r.name, ",".join(r.aliases) or "-", r.arch, cached, (r.digest or "-")[:19], trust or "-", r.title])
    table(rows, ["NAME", "ALIASES", "ARCH", "CACHED", "DIGEST", "TRUST", "TITLE"])


@app.command()
def pull(
    ctx: typer.Context,
    image: opt.ImageArg,
    source: opt.SourceOpt = "upstream",
    latest: opt.LatestOpt = False,
    sha256: opt.Sha256Opt = None,
    sha512: opt.Sha512Opt = None,
    arch: opt.ArchOpt = None,
    as_json: opt.JsonOpt = False,
) -> None:
    """Download an image into the cache and verify it."""
    with ProgressBar(f"pull {image}") as progress:
        pulled = api.pull(
            _settings(ctx), image, source=source, latest=latest, sha256=sha256, sha512=sha512, progress=progress,
            arch=Arch.parse(arch) if arch else None,
        )  # fmt: skip
    if as_json:
        data = pulled.to_json()
        print_json({k: data[k] for k in ("name", "digest", "path", "size", "source")})
    else:
        sys.stdout.write(f"{pulled.name}  {pulled.digest}\n{pulled.path}  ({size(pulled.size)})\n")


@app.command()
def prune(ctx: typer.Context, as_json: opt.JsonOpt = False) -> None:
    """Remove cached images that no instance uses, and stale partial downloads."""
    removed = api.prune(_settings(ctx, connects=True))
    if as_json:
        print_json([{"path": p, "size": s} for p, s in removed])
        return
    for path, bytes_ in removed:
        sys.stdout.write(f"removed {path} ({size(bytes_)})\n")
    say(f"removed {len(removed)} item(s)" if removed else "nothing to prune")


# -- instances ---------------------------------------------------------------------------------------------------------


@app.command()
def up(
    ctx: typer.Context,
    image: opt.ImageArg,
    name: Annotated[str | None, typer.Option("--name", help="Instance name (default <image>-<4 chars>).")] = None,
    cpus: opt.CpusOpt = 2,
    memory: opt.MemoryOpt = 1024,
    disk: Annotated[int, typer.Option("--disk", min=1, help="Disk size in GiB (the root fs grows to it).")] = 10,
    ssh_key: opt.SshKeysOpt = None,
    user: Annotated[str | None, typer.Option("--user", help="Login user (default: the image's).")] = None,
    user_data: opt.UserDataOpt = None,
    network: opt.NetworkOpt = None,
    ssh_port: opt.SshPortOpt = None,
    accel: opt.AccelOpt = Accel.AUTO,
    firmware: opt.FirmwareOpt = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait until cloud-init finished and SSH answers.")] = (
        True
    ),
    timeout_: Annotated[
        float | None, opt.timeout("Seconds to wait for the guest (default 300; 3x that for another arch's).")
    ] = None,
    source: opt.SourceOpt = "upstream",
    latest: opt.LatestOpt = False,
    arch: opt.ArchOpt = None,
    sha256: opt.Sha256Opt = None,
    sha512: opt.Sha512Opt = None,
    host_key_types: opt.HostKeyTypesOpt = "ed25519,ecdsa",
    ignore_cloud_init_errors: Annotated[
        bool, typer.Option("--ignore-cloud-init-errors", help="Succeed (with a warning) when cloud-init had errors.")
    ] = False,
    forward: opt.ForwardOpt = None,
    mount: opt.MountOpt = None,
    confidential: opt.ConfidentialOpt = None,
    sev_session: opt.SevSessionOpt = None,
    sev_policy: opt.SevPolicyOpt = "0x1",
    as_json: opt.JsonOpt = False,
) -> None:
    """Launch an instance and wait until it is ready."""
    from qemu_instances import seed as seeds
    from qemu_instances.images import Source
    from qemu_instances.launch import UpRequest, split_firmware
    from qemu_instances.sev import parse_policy

    boot, sev_firmware = split_firmware(firmware, confidential)
    request = UpRequest(
        image=image, name=name, cpus=cpus, memory_mib=memory, disk_gib=disk, ssh_keys=tuple(ssh_key or ()),
        user=user, user_data=user_data, network=network, ssh_port=ssh_port, accel=accel, firmware=boot,
        wait=wait, timeout=timeout_, source=Source(source), latest=latest, arch=Arch.parse(arch) if arch else None,
        sha256=sha256, sha512=sha512, modules=as_json, host_key_types=seeds.host_key_types(host_key_types),
        ignore_cloud_init_errors=ignore_cloud_init_errors, forwards=tuple(forward or ()), mounts=tuple(mount or ()),
        confidential=confidential, sev_firmware=sev_firmware, sev_session=sev_session,
        sev_policy=parse_policy(sev_policy),
    )  # fmt: skip
    settings = _settings(ctx)
    if settings.host == "auto":
        settings = api.placed(settings, memory)
        say(f"placing {image} on host {settings.host} (the most free memory)")
    with ProgressBar(f"pull {image}") as progress:
        result = api.up(settings, request, progress=progress)
    inst, meta = result.instance, result.instance.metadata
    if as_json:
        print_json(
            {"host": settings.host, **inst.to_json(), "ready": result.ready, "timings": result.timings,
             "profile": result.profile, "slowest_modules": [{"module": m, "seconds": s} for m, s in result.modules]}
        )  # fmt: skip
        return
    if result.ready:
        say(f"{inst.name} is ready ({', '.join(f'{k} {v}s' for k, v in result.timings.items())})")
    else:
        say(f"{inst.name} is starting (not waiting for it)")
    sys.stdout.write(f"{inst.name}\n")
    where = f"{meta.user}@{meta.ssh_host}" + (f" -p {meta.ssh_port}" if meta.ssh_port != 22 else "")
    say(f"connect: qinst ssh {inst.name}    (ssh {where})")


def _forwards(inst: Instance) -> str:
    return ",".join(f"{f.addr}:{f.host_port}->{f.guest_port}" for f in inst.metadata.forwards) or "-"


@app.command("ls")
def list_(
    ctx: typer.Context,
    all_hosts: Annotated[bool, typer.Option("--all-hosts", help="Every host of the config file, in parallel.")] = False,
    as_json: opt.JsonOpt = False,
) -> None:
    """List qinst's instances: name, state, image, address, age."""
    if all_hosts:
        _list_all_hosts(ctx, as_json)
        return
    found = api.instances(_settings(ctx, connects=True), snapshots=as_json)  # the count costs a call per domain
    if as_json:
        print_json([i.to_json() for i in found.instances] + [o.to_json() for o in found.orphans])
        return
    rows = [
        [i.name, i.to_json()["state"], i.metadata.image, i.address, age(i.metadata.created), _forwards(i)]
        for i in found.instances
    ]
    table(
        rows + [[o.name, "orphan", "-", "-", "-", "-"] for o in found.orphans],
        ["NAME", "STATE", "IMAGE", "ADDRESS", "AGE", "FORWARDS"],
    )


def _list_all_hosts(ctx: typer.Context, as_json: bool) -> None:
    answers = api.instances_everywhere(_settings(ctx))
    rows: list[dict[str, Any]] = []
    for answer in answers:
        if answer.error is not None:
            say(f"qinst: warning: host {answer.host} is unreachable: {answer.error}")
            rows.append({"host": answer.host, "error": answer.error})
        rows += [{"host": answer.host, **i.to_json()} for i in answer.value or []]
    if as_json:
        print_json(rows)
    else:
        table(
            [[r["host"], r["name"], r["state"], r["image"], f"{r['ssh']['host'] or '-'}:{r['ssh']['port']}",
              age(r["created"])] for r in rows if "error" not in r],
            ["HOST", "NAME", "STATE", "IMAGE", "ADDRESS", "AGE"],
        )  # fmt: skip
    if all(a.error is not None for a in answers):
        raise typer.Exit(4)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def ssh(
    ctx: typer.Context,
    name: opt.NameArg,
    command: Annotated[list[str] | None, typer.Argument(help="Command to run (after --).")] = None,
) -> None:
    """Open SSH to an instance (or run a command), checking its host key."""
    replace_process(api.ssh_argv(_settings(ctx, connects=True), name, [*(command or []), *ctx.args]))


@app.command()
def cp(
    ctx: typer.Context,
    paths: Annotated[list[str], typer.Argument(help="SRC... DST; NAME:PATH is a path in instance NAME.")],
    recursive: Annotated[bool, typer.Option("-r", "--recursive", help="Copy folders.")] = False,
) -> None:
    """Copy files between this machine and an instance (scp, host key checked)."""
    if len(paths) < 2:
        raise typer.BadParameter("give at least a source and a destination", param_hint="SRC... DST")
    api.cp(_settings(ctx, connects=True), paths[:-1], paths[-1], recursive=recursive)


@app.command()
def forward(
    ctx: typer.Context,
    name: opt.NameArg,
    forwards: Annotated[list[str], typer.Argument(metavar="[ADDR:]HOSTPORT:GUESTPORT...", help="TCP forwards.")],
) -> None:
    """Forward ports to an instance while this runs (an SSH tunnel; any network). Ctrl-C ends it."""
    from qemu_instances.tunnel import run_tunnel

    argv, parsed = api.forward_argv(_settings(ctx, connects=True), name, forwards)

    def ready() -> None:
        for f in parsed:
            say(f"forwarding {f.addr}:{f.host_port} -> {name}:{f.guest_port}")
        say("press Ctrl-C to stop")

    try:
        run_tunnel(argv, parsed, ready)
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM, SIGHUP: main() gives the exit code (130, 143, 129)
        say("stopped")
        raise


snapshot_app = typer.Typer(help="Snapshots of an instance: create, list, restore, delete.", no_args_is_help=True)
app.add_typer(snapshot_app, name="snapshot")
SnapArg = Annotated[str, typer.Argument(help="Snapshot name.")]


@snapshot_app.command("create")
def snapshot_create(ctx: typer.Context, name: opt.NameArg, snap: SnapArg) -> None:
    """Snapshot an instance: with its memory when it runs, its disk only when it is stopped."""
    made = api.snapshot_create(_settings(ctx, connects=True), name, snap)
    kind = "memory and disk: restore resumes it running" if made.memory else "disk only: the instance was stopped"
    say(f"{name}: snapshot {snap} created ({kind})")


@snapshot_app.command("list")
def snapshot_list(ctx: typer.Context, name: opt.NameArg, as_json: opt.JsonOpt = False) -> None:
    """List an instance's snapshots, oldest first."""
    import datetime as dt

    rows: list[dict[str, Any]] = [
        {"name": s.name, "created": dt.datetime.fromtimestamp(s.created, dt.UTC).isoformat(), "state": s.state,
         "memory": s.memory}
        for s in api.snapshot_list(_settings(ctx, connects=True), name)
    ]  # fmt: skip
    if as_json:
        print_json(rows)
        return
    table(
        [[r["name"], r["created"], r["state"], "memory+disk" if r["memory"] else "disk"] for r in rows],
        ["NAME", "CREATED", "STATE", "KIND"],
    )


@snapshot_app.command("restore")
def snapshot_restore(
    ctx: typer.Context,
    name: opt.NameArg,
    snap: SnapArg,
    timeout_: Annotated[float, opt.timeout("Seconds to wait for SSH after the restore.")] = 300.0,
) -> None:
    """Return an instance to a snapshot (running again if the snapshot holds its memory)."""
    inst = api.snapshot_restore(_settings(ctx, connects=True), name, snap, timeout=timeout_)
    say(f"{name}: restored to {snap} ({inst.state})")


@snapshot_app.command("delete")
def snapshot_delete(ctx: typer.Context, name: opt.NameArg, snap: SnapArg) -> None:
    """Delete one snapshot of an instance."""
    api.snapshot_delete(_settings(ctx, connects=True), name, snap)
    say(f"{name}: snapshot {snap} deleted")


@app.command()
def console(ctx: typer.Context, name: opt.NameArg) -> None:
    """Attach to an instance's serial console (leave with Ctrl-]])."""
    import shutil

    settings = _settings(ctx, connects=True)
    api.get(settings, name)
    if shutil.which("virsh") is None:
        raise QinstError("virsh not found", hint="install libvirt-clients")
    replace_process(["virsh", "--connect", settings.connect, "console", name])


@app.command()
def logs(ctx: typer.Context, name: opt.NameArg) -> None:
    """Print an instance's serial console as recorded."""
    sys.stdout.write(api.logs(_settings(ctx, connects=True), name))


@app.command()
def stop(
    ctx: typer.Context,
    name: opt.NameArg,
    force: Annotated[bool, typer.Option("--force", help="Power off at once.")] = False,
) -> None:
    """Shut an instance down (ACPI; powered off if it does not stop within a minute)."""
    say(f"{name}: {api.stop(_settings(ctx, connects=True), name, force=force)}")


@app.command()
def start(
    ctx: typer.Context,
    name: opt.NameArg,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait until SSH answers.")] = True,
    timeout_: Annotated[float, opt.timeout("Seconds to wait for SSH.")] = 300.0,
) -> None:
    """Start a stopped instance (and wait until SSH answers with its recorded host key)."""
    api.start(_settings(ctx, connects=True), name, wait=wait, timeout=timeout_)
    say(f"{name}: started")


@app.command()
def rm(
    ctx: typer.Context,
    names: Annotated[list[str], typer.Argument(help="Instance names.")],
    force: Annotated[bool, typer.Option("--force", "-f", help="Remove running instances too.")] = False,
) -> None:
    """Remove instances: the domain and every volume qinst made for it."""
    settings = _settings(ctx, connects=True)
    failed: QinstError | None = None
    for name in names:
        try:
            removed = api.rm(settings, name, force=force)
        except QinstError as exc:
            report_error(exc)  # and go on with the other names
            failed = exc
            continue
        say(f"removed {', '.join(removed)}")
    if failed:
        raise typer.Exit(failed.exit_code)


# -- smoke, seed, doctor -----------------------------------------------------------------------------------------------


@app.command()
def smoke(
    ctx: typer.Context,
    images: Annotated[list[str], typer.Argument(help="Images to boot-test.")],
    junit: opt.JunitOpt = None,
    parallel: opt.ParallelOpt = None,
    timeout_: Annotated[
        float | None, opt.timeout("Seconds each image may take to become ready (default 600; 3x for another arch's).")
    ] = None,
    artifacts: opt.ArtifactsOpt = None,
    keep_failed: opt.KeepFailedOpt = False,
    accel: opt.AccelOpt = Accel.AUTO,
    network: opt.SmokeNetworkOpt = "user",
    hosts: opt.HostsOpt = None,
    checks_file: opt.ChecksOpt = None,
    check: opt.CheckOpt = None,
    skip: opt.SkipOpt = None,
    allow_warning: opt.AllowWarningOpt = None,
    allow_failed_unit: opt.AllowFailedUnitOpt = None,
    firmware: opt.FirmwaresOpt = None,
    arch: opt.ArchesOpt = None,
    host_key_types: opt.HostKeyTypesOpt = "ed25519,ecdsa",
    user_data: opt.SmokeUserDataOpt = None,
    cpus: opt.SmokeCpusOpt = None,
    memory: opt.SmokeMemoryOpt = 1024,
    latest: opt.LatestOpt = False,
    retries: opt.RetriesOpt = 0,
    baseline: opt.BaselineOpt = None,
    regression_threshold: opt.ThresholdOpt = 1.25,
    summary: opt.SummaryOpt = None,
    shard: opt.ShardOpt = None,
    as_json: opt.JsonOpt = False,
) -> None:
    """Boot each image, run the checks in it, and report (exit 6 if any failed; `smoke merge` joins --shard runs)."""
    from qemu_instances import seed as seeds
    from qemu_instances.smoke import build_options, write_reports
    from qemu_instances.smokereport import results_json

    opts = build_options(
        timeout=timeout_, parallel=parallel, artifacts=artifacts, keep_failed=keep_failed, accel=accel,
        network=network, hosts=hosts, checks_file=checks_file, check=check or (), skip=skip or (),
        allow_warning=allow_warning or (), allow_failed_unit=allow_failed_unit or (),
        firmwares=opt.enum_list(Firmware, firmware, "--firmware") if firmware else (None,),
        arches=opt.arches(arch) if arch else (), user_data=user_data, cpus=cpus, memory=memory,
        host_key_types=seeds.host_key_types(host_key_types),
        latest=latest, retries=retries, baseline=baseline, regression_threshold=regression_threshold, shard=shard,
    )  # fmt: skip
    done: list[ImageReport] = []

    def report_line(report: ImageReport) -> None:
        done.append(report)
        say(_smoke_line(report))

    def write(reports: list[ImageReport]) -> None:
        write_reports(
            reports, junit=junit, summary=summary, artifacts=artifacts, baseline=opts.baseline, shard=opts.shard
        )

    # Ctrl-C and SIGTERM stop every boot and remove every instance in run_smoke; the reports of what finished are
    # written here, and main() gives exit 130 / 143.
    try:
        reports = api.smoke(_settings(ctx, connects=True), images, opts, on_done=report_line)
    except BaseException:
        write(done)  # what finished
        raise
    write(reports)
    if as_json:
        print_json(results_json(reports, (opts.shard.index, opts.shard.count) if opts.shard else None))
    failed = [r.suite for r in reports if not r.passed]
    if failed:
        raise SmokeFailed(f"{len(failed)} of {len(reports)} image(s) failed: {', '.join(failed)}")


cli_tools.register(app)  # smoke merge, ssh-config, inventory


def _smoke_line(report: ImageReport) -> str:
    if report.passed:
        flaky = f", flaky: passed on attempt {report.attempts}" if report.flaky else ""
        return f"PASS {report.suite} ({len(report.checks)} checks, {report.seconds:.1f} s{flaky})"
    first = report.failed[0] if report.failed else None
    why = f"{first.name}: {first.message}" if first else "no check passed"
    kept = f" (kept: {report.instance})" if report.kept else ""
    return f"FAIL {report.suite}: {(why.splitlines() or [''])[0]}{kept}"


@app.command()
def seed(
    ctx: typer.Context,
    out: Annotated[Path, opt.output_file("--out", "Where to write the ISO.")],
    hostname: Annotated[str, typer.Option("--hostname", help="Guest host name.")] = "qinst",
    instance_id: Annotated[
        str | None, typer.Option("--instance-id", help="cloud-init instance id (default random).")
    ] = None,
    ssh_key: opt.SshKeysOpt = None,
    user: Annotated[str, typer.Option("--user", help="Default user.")] = "cloud",
    user_data: opt.UserDataOpt = None,
    network_config: Annotated[Path | None, typer.Option("--network-config", help="Network config (v1/v2).")] = None,
    as_json: opt.JsonOpt = False,
) -> None:
    """Write a cloud-init NoCloud seed ISO (label cidata) and nothing else."""
    from qemu_instances.files import write_atomically

    iso, spec, files = api.seed(
        _settings(ctx), hostname=hostname, instance_id=instance_id, ssh_keys=tuple(ssh_key or ()), user=user,
        user_data=user_data, network_config=network_config,
    )  # fmt: skip
    try:
        write_atomically(out, iso)  # built whole before anything is written
    except OSError as exc:
        raise QinstError(f"cannot write {out}: {exc.strerror}") from exc
    if as_json:
        print_json(
            {"path": str(out), "size": len(iso), "hostname": spec.hostname, "instance_id": spec.instance_id,
             "user": spec.user, "ssh_keys": [k.split()[0] + " " + k.split()[1][-12:] for k in spec.ssh_keys],
             "files": {name: len(data) for name, data in files.items()}}
        )  # fmt: skip
    else:
        say(f"wrote {out} ({len(iso)} bytes, instance-id {spec.instance_id})")


@app.command()
def doctor(
    ctx: typer.Context,
    as_json: opt.JsonOpt = False,
    reset_kvm: Annotated[
        bool, typer.Option("--reset-kvm", help="Forget that KVM failed here: the next 'up' tries KVM again.")
    ] = False,
) -> None:
    """Check what works on this host: libvirt, KVM (really usable), TCG, pool, networks, tools."""
    settings = _settings(ctx, connects=True)
    if reset_kvm:
        from qemu_instances.kvmverdict import forget

        say(f"forgot {len(forget(settings.cache_dir))} remembered KVM verdict(s)")
    checks = api.doctor(settings)
    if as_json:
        print_json([c.to_json() for c in checks])
    else:
        width = max((len(c.name) + 1 for c in checks), default=0)  # a long name (arch-aarch64) never runs into its text
        for c in checks:
            status = "ok" if c.ok else ("FAIL" if c.required else "no")
            # details quote libvirt: its errors, and network names another user of the daemon chose
            sys.stdout.write(f"{status:<5}{c.name:<{width}}{printable(c.detail)}\n")
            if c.hint and not c.ok:
                sys.stdout.write(f"{'':<{5 + width}}-> {printable(c.hint)}\n")
    if any(c.required and not c.ok for c in checks):
        raise typer.Exit(4)


# -- the entry point ---------------------------------------------------------------------------------------------------


def report_error(exc: QinstError) -> None:
    """The one way an error reaches the user: a line, and the hint with the fix when there is one."""
    message = printable_lines(exc.message)  # it may quote names, records and console lines from elsewhere
    sys.stderr.write(f"qinst: error: {message}\n" + (f"hint: {printable_lines(exc.hint)}\n" if exc.hint else ""))


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app and map every error to a message and the documented exit code.

    Typer (standalone) handles usage errors itself: a message and exit 2.
    """
    configure_logging(False)  # --debug turns on debug logs once the options are parsed
    handle_signals()
    try:
        try:
            args = joined_words(list(sys.argv[1:] if argv is None else argv))
            app_for(app, _new_app, args)(args=args, prog_name="qinst")
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
