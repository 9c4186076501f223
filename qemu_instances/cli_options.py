"""The command-line options several commands share, each declared once with its check (mkosi's table of settings,
in Typer): a command takes `timeout: TimeoutOpt = 300.0`, never a copy of the declaration that could lose its check.

Values are checked while the command line is parsed, before the command makes anything (exit 2).
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from qemu_instances.arch import Arch
from qemu_instances.domain import Accel, Firmware
from qemu_instances.errors import QinstError

E = TypeVar("E", bound=Enum)


def _seconds(param: typer.CallbackParam, value: float | None) -> float | None:
    from qemu_instances.validate import seconds

    return None if value is None else seconds(value, param.opts[0])


def _output_file(param: typer.CallbackParam, value: Path | None) -> Path | None:
    from qemu_instances.validate import output_file

    return None if value is None else output_file(value, param.opts[0])


def _source(param: typer.CallbackParam, value: str) -> str:
    return choice(("upstream", "aleph"), value, param.opts[0])


def choice(choices: tuple[str, ...], value: str, option: str) -> str:
    if value not in choices:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(choices)}", param_hint=option)
    return value


def enum_list(enum: type[E], text: str, option: str) -> tuple[E, ...]:
    """A comma-separated list of an enum's values (`--firmware bios,uefi`), each once, in the order given."""
    values = []
    for part in text.split(","):
        try:
            values.append(enum(part.strip()))
        except ValueError:
            choices = ", ".join(str(m.value) for m in enum)
            raise typer.BadParameter(f"{part.strip()!r} is not one of {choices}", param_hint=option) from None
    return tuple(dict.fromkeys(values))


def _firmwares(param: typer.CallbackParam, value: str | None) -> str | None:
    if value is not None:
        enum_list(Firmware, value, param.opts[0])  # checked here; the command reads the list again
    return value


def timeout(help: str) -> Any:
    """--timeout SECONDS: a finite number above zero."""
    return typer.Option("--timeout", callback=_seconds, help=help)


def output_file(name: str, help: str) -> Any:
    """A file qinst writes: its folder must exist and be writable (checked before anything runs)."""
    return typer.Option(name, callback=_output_file, help=help)


JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")]
AccelOpt = Annotated[Accel, typer.Option("--accel", help="auto | kvm | tcg.")]
FirmwareOpt = Annotated[
    str | None,
    typer.Option(
        "--firmware",
        metavar="bios|uefi|FIRMWARE",
        help="bios | uefi (default: bios on x86_64, uefi on aarch64). With --confidential sev: the confidential "
        "OVMF, a catalog firmware, aleph:<hash> or a file (default aleph-sev-ovmf).",
    ),
]


def _confidential(param: typer.CallbackParam, value: str | None) -> str | None:
    if value is not None and value != "sev":
        from qemu_instances.errors import UsageError

        raise UsageError(f"--confidential {value[:40]!r}: only sev (AMD SEV) is supported")
    return value


def _sev_policy(param: typer.CallbackParam, value: str) -> str:
    from qemu_instances.sev import parse_policy

    parse_policy(value)  # checked here; the command reads it again
    return value


ConfidentialOpt = Annotated[
    str | None,
    typer.Option(
        "--confidential",
        metavar="sev",
        callback=_confidential,
        help="sev: an AMD SEV guest, started paused and run only once its launch measurement is checked.",
    ),
]
SevSessionOpt = Annotated[
    Path | None,
    typer.Option(
        "--sev-session",
        metavar="PREFIX",
        help="The guest owner's sevctl session files (PREFIX_tik.bin, PREFIX_godh.b64, PREFIX_session.b64).",
    ),
]
SevPolicyOpt = Annotated[
    str,
    typer.Option(
        "--sev-policy", metavar="POLICY", callback=_sev_policy, help="SEV policy (0x1: no debugging; SEV-ES refused)."
    ),
]
FirmwaresOpt = Annotated[
    str | None,
    typer.Option("--firmware", callback=_firmwares, help="bios, uefi or both (bios,uefi); default: each arch's own."),
]


def _arches(param: typer.CallbackParam, value: str | None) -> str | None:
    if value is not None:
        arches(value, param.opts[0])
    return value


def arches(text: str, option: str = "--arch") -> tuple[Arch, ...]:
    """A comma-separated list of architectures (x86_64, aarch64 or amd64, arm64), each once, in the order given."""
    try:
        return tuple(dict.fromkeys(Arch.parse(part, option) for part in text.split(",")))
    except QinstError as exc:
        raise typer.BadParameter(exc.message.split(": ", 1)[-1], param_hint=option) from None


ArchOpt = Annotated[
    str | None,
    typer.Option("--arch", callback=_arches, help="x86_64 or aarch64 (amd64, arm64); default: this host's."),
]
ArchesOpt = Annotated[
    str | None,
    typer.Option("--arch", callback=_arches, help="x86_64, aarch64 or both (x86_64,aarch64); default: this host's."),
]
SourceOpt = Annotated[str, typer.Option("--source", callback=_source, help="upstream or aleph.")]
LatestOpt = Annotated[bool, typer.Option("--latest", help="Take the newest build, checked against its SUMS file.")]
CpusOpt = Annotated[int, typer.Option("--cpus", min=1, help="Virtual CPUs.")]
MemoryOpt = Annotated[int, typer.Option("--memory", min=64, help="Memory in MiB.")]
SshKeysOpt = Annotated[
    list[Path] | None, typer.Option("--ssh-key", help="Public key file (repeatable).", show_default=False)
]
UserDataOpt = Annotated[Path | None, typer.Option("--user-data", help="cloud-config, script or multipart.")]
NameArg = Annotated[str, typer.Argument(help="Instance name.")]
ImageArg = Annotated[str, typer.Argument(help="Catalog name or alias, aleph:<hash>, local file, or URL.")]
NetworkOpt = Annotated[
    str | None, typer.Option("--network", help="default | network:NAME | bridge:DEV | user | user:restrict | none.")
]
SshPortOpt = Annotated[
    int | None, typer.Option("--ssh-port", min=1, max=65535, help="Host port for SSH (user network).")
]
ForwardOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--forward",
        metavar="[ADDR:]HOSTPORT:GUESTPORT",
        show_default=False,
        help="Forward a TCP port (repeatable; user-mode networks; ADDR defaults to 127.0.0.1).",
    ),
]
MountOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--mount",
        metavar="HOSTDIR[:GUESTDIR][:rw]",
        show_default=False,
        help="Share a folder of the libvirt host (repeatable; read-only unless :rw, enforced by the host; a remote "
        "host's own folder). With :rw, root in the guest can create root-owned and set-uid files in it.",
    ),
]

# `qinst smoke`'s own options.
_Strings = list[str] | None
JunitOpt = Annotated[Path | None, output_file("--junit", "Write a JUnit XML report here.")]
SummaryOpt = Annotated[Path | None, output_file("--summary", "Write a Markdown summary here.")]
ParallelOpt = Annotated[
    int | None, typer.Option("--parallel", min=1, help="Boots at once (default: what cores and memory allow).")
]
# --artifacts is checked (and made) after every other option: a refused option leaves no empty folder behind.
ArtifactsOpt = Annotated[
    Path | None, typer.Option("--artifacts", help="Console, logs, journal and results.json go here.")
]
KeepFailedOpt = Annotated[bool, typer.Option("--keep-failed", help="Keep failed instances for inspection.")]
SmokeNetworkOpt = Annotated[str, typer.Option("--network", help="Network for the guests (as for up).")]
HostsOpt = Annotated[
    str | None, typer.Option("--hosts", help="Spread the images over these hosts (a,b: config file names).")
]
ChecksOpt = Annotated[Path | None, typer.Option("--checks", help="TOML file of [[check]] tables: more checks to run.")]
CheckOpt = Annotated[_Strings, typer.Option("--check", help="NAME=COMMAND: a check that must exit 0 (repeatable).")]
SkipOpt = Annotated[_Strings, typer.Option("--skip", help="Skip this check (repeatable).")]
AllowWarningOpt = Annotated[
    _Strings, typer.Option("--allow-warning", help="REGEX: a cloud-init.log WARNING line to accept (repeatable).")
]
AllowFailedUnitOpt = Annotated[
    _Strings, typer.Option("--allow-failed-unit", help="GLOB: a failed unit to accept (repeatable).")
]
SmokeUserDataOpt = Annotated[Path | None, typer.Option("--user-data", help="More user data, merged over smoke's own.")]
SmokeCpusOpt = Annotated[int | None, typer.Option("--cpus", help="vCPUs per guest (default: cores shared).")]
SmokeMemoryOpt = Annotated[int, typer.Option("--memory", help="MiB per guest.")]
RetriesOpt = Annotated[int, typer.Option("--retries", help="Boot a failed image again up to N times.")]
BaselineOpt = Annotated[
    Path | None, typer.Option("--baseline", help="A previous run's JSON results to compare timings with.")
]
ThresholdOpt = Annotated[
    float, typer.Option("--regression-threshold", help="Slower than X times the baseline (and 5 s) fails.")
]
Sha256Opt = Annotated[str | None, typer.Option("--sha256", help="Digest of a URL image.")]
Sha512Opt = Annotated[str | None, typer.Option("--sha512", help="Digest of a URL image.")]


def _host_key_types(param: typer.CallbackParam, value: str) -> str:
    from qemu_instances.seed import host_key_types

    host_key_types(value)  # checked here; the command reads the list again
    return value


HostKeyTypesOpt = Annotated[
    str,
    typer.Option(
        "--host-key-types",
        callback=_host_key_types,
        help="SSH host keys the guest makes at first boot: ed25519,ecdsa,rsa or image (its own choice).",
    ),
]


# The global options, each also read from its QINST_* environment variable.
def _env_option(name: str, env: str, metavar: str, help: str, **kw: Any) -> Any:
    return typer.Option(name, envvar=env, metavar=metavar, help=help, **kw)


ConnectOpt = Annotated[str | None, _env_option("--connect", "QINST_CONNECT", "URI", "libvirt URI.", show_default=False)]
CacheDirOpt = Annotated[
    Path | None, _env_option("--cache-dir", "QINST_CACHE_DIR", "DIR", "Download cache.", show_default=False)
]
CatalogOpt = Annotated[
    list[Path] | None,
    _env_option("--catalog", "QINST_CATALOG", "FILE", "Extra catalog file (repeatable).", show_default=False),
]
MirrorOpt = Annotated[
    str | None, _env_option("--mirror", "QINST_MIRROR", "URL", "Replace scheme://host of upstream URLs.")
]
AlephApiOpt = Annotated[str, _env_option("--aleph-api", "QINST_ALEPH_API", "URL", "aleph.im API base.")]
IpfsGatewayOpt = Annotated[
    str, _env_option("--ipfs-gateway", "QINST_IPFS_GATEWAY", "URL", "IPFS gateway for aleph ipfs items.")
]
HostOpt = Annotated[
    str | None, _env_option("--host", "QINST_HOST", "NAME", "A host of the config file's [hosts] table (up: or auto).")
]


# `qinst smoke --shard`, `smoke merge`, `ssh-config` and `inventory`.
def _shard(param: typer.CallbackParam, value: str | None) -> str | None:
    if value is not None:
        from qemu_instances.shards import Shard

        try:
            Shard.parse(value)  # checked here; build_options reads it again
        except QinstError as exc:
            raise typer.BadParameter(exc.message.split(": ", 1)[-1], param_hint=param.opts[0]) from None
    return value


ShardOpt = Annotated[
    str | None,
    typer.Option(
        "--shard",
        metavar="K/N",
        callback=_shard,
        help="Run only share K of N of the image x arch x firmware matrix (the same split on every CI job).",
    ),
]
MergeFilesArg = Annotated[list[Path], typer.Argument(help="results.json of each shard (or run).", show_default=False)]
NamesArg = Annotated[list[str] | None, typer.Argument(help="Instance names (default: every running one).")]
InventoryListOpt = Annotated[bool, typer.Option("--list", help="Every group and host (the default).")]
InventoryHostOpt = Annotated[str | None, typer.Option("--host", metavar="NAME", help="One instance's variables.")]
