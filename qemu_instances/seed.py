"""cloud-init NoCloud seeds: user-data, meta-data and network-config from templates, as an ISO in memory.

Templates in `cloudinit_templates/` are data: values are filled in as Python objects and the result is
serialised with yaml.safe_dump, so no hostname, key or user value can alter the YAML around it.
User data is never logged: it may hold secrets.
"""

from __future__ import annotations

import copy
import functools
import io
import os
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePath
from time import struct_time
from typing import TYPE_CHECKING, Any

from qemu_instances.errors import QinstError, UsageError
from qemu_instances.sshkeys import parse_public_key

if TYPE_CHECKING:  # yaml, pycdlib, email (and the rest) are imported where used: `ls` and `rm` need the validators
    from email.message import Message
    from email.mime.text import MIMEText

VOLUME_LABEL = "cidata"  # what NoCloud looks for (or CIDATA)
# Every date in the ISO: a fixed instant, so the same inputs give the same bytes (2020-01-01T00:00:00Z).
SEED_EPOCH = 1577836800.0

# The seed's files: real name (Rock Ridge and Joliet) -> ISO 9660 name (d-characters only, no '-').
ISO_NAMES = {
    "user-data": "/USER_DATA.;1",
    "meta-data": "/META_DATA.;1",
    "network-config": "/NETWORK_CONFIG.;1",
    "vendor-data": "/VENDOR_DATA.;1",
}

# The user-data formats qinst accepts: first-line prefix -> MIME type of its part in a multipart message.
PART_TYPES = {
    "#!": "text/x-shellscript",
    "#include": "text/x-include-url",
    "#cloud-boothook": "text/cloud-boothook",
}
ACCEPTED_FORMATS = "#cloud-config, a #! script, #include, #cloud-boothook, or a MIME multipart message"

# In a multipart message, cloud-init merges each cloud-config part into the ones before it with that part's
# Merge-Type. Ours comes last and neither replaces the user's values nor drops their list items: the same
# rules as merge_cloud_config, applied by cloud-init.
OUR_PART_MERGE_TYPE = "dict(recurse_array,no_replace)+list(append)"

_HOSTNAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", re.IGNORECASE | re.ASCII)
_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}", re.ASCII)
_INSTANCE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}", re.ASCII)
_PLACEHOLDER = re.compile(r"\$\{([a-z_]+)\}")


@functools.cache
def _yaml_loader() -> Any:
    """libyaml's loader when PyYAML was built with it: the same safe constructors, several times faster."""
    import yaml

    return getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True)
class SeedSpec:
    """Everything that goes into one NoCloud seed; validated on construction."""

    hostname: str
    instance_id: str
    user: str
    ssh_keys: tuple[str, ...]
    user_data: bytes | None = None
    user_data_source: str | None = None  # the file the user data came from, for messages
    network_config: bytes | None = None
    extra_config: Mapping[str, Any] | None = None  # more cloud-config (the smoke template), merged like user data
    vendor_data: bytes | None = None
    network_config_source: str | None = None
    host_key_types: tuple[str, ...] = ()  # the SSH host keys made at first boot (empty: the image's own choice)

    def __post_init__(self) -> None:
        validate_hostname(self.hostname)
        validate_instance_id(self.instance_id)
        validate_user(self.user)
        for key in self.ssh_keys:
            parse_public_key(key, "SSH key")
        for kind in self.host_key_types:
            if kind not in HOST_KEY_TYPES:
                raise UsageError(f"unknown SSH host key type {kind[:20]!r}", hint=f"use {', '.join(HOST_KEY_TYPES)}")


HOST_KEY_TYPES = ("ed25519", "ecdsa", "rsa")  # what cloud-init's ssh_genkeytypes takes (dsa long gone)
# What `up` and smoke make by default: an emulated guest takes 15-18 s to make an RSA host key at first boot, and a
# client that needs one is rare (OpenSSH prefers ed25519). `--host-key-types rsa,ecdsa,ed25519` restores them all.
DEFAULT_HOST_KEY_TYPES = ("ed25519", "ecdsa")


def host_key_types(text: str) -> tuple[str, ...]:
    """`--host-key-types`: a comma-separated list of ed25519, ecdsa, rsa; `image` for the image's own choice."""
    if text.strip() == "image":
        return ()
    kinds = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    bad = [k for k in kinds if k not in HOST_KEY_TYPES]
    if bad or not kinds:
        raise UsageError(
            f"--host-key-types: unknown type {(bad or [text])[0][:20]!r}",
            hint=f"a comma-separated list of {', '.join(HOST_KEY_TYPES)}, or image",
        )
    return kinds


def validate_hostname(name: str) -> str:
    """Return `name` in lower case if it is an RFC 1123 host name label; UsageError otherwise."""
    if not _HOSTNAME.fullmatch(name):
        raise UsageError(
            f"invalid host name {name!r}",
            hint="use 1 to 63 letters, digits and '-', starting and ending with a letter or digit",
        )
    return name.lower()


def validate_user(name: str) -> str:
    """Return `name` if it is a usable login name for the default user; UsageError otherwise."""
    if not _USER.fullmatch(name) or name == "root":
        raise UsageError(
            f"invalid user name {name!r}",
            hint="use up to 32 lower-case letters, digits, '_' and '-', starting with a letter; not root",
        )
    return name


def validate_instance_id(instance_id: str) -> str:
    """Return `instance_id` if it is a plain token (letters, digits, . _ : -); UsageError otherwise."""
    if not _INSTANCE_ID.fullmatch(instance_id):
        raise UsageError(
            f"invalid instance id {instance_id!r}",
            hint="use up to 128 letters, digits, '.', '_', ':' and '-', starting with a letter or digit",
        )
    return instance_id


def new_instance_id() -> str:
    """A fresh random instance id, so that cloud-init treats the boot as a new instance's first."""
    return "i-" + os.urandom(8).hex()  # what secrets.token_hex(8) does, without its import (hmac, OpenSSL)


def load_template(name: str) -> dict[str, Any]:
    """The template `cloudinit_templates/<name>.yaml` as data (a fresh copy the caller may change)."""
    return copy.deepcopy(_parsed_template(name))


@functools.cache
def _parsed_template(name: str) -> dict[str, Any]:
    import yaml

    import cloudinit_templates  # a plain folder of data: its files sit next to its __init__ when installed

    resource = Path(cloudinit_templates.__file__).with_name(f"{name}.yaml")
    try:
        data = yaml.load(resource.read_text(encoding="utf-8"), Loader=_yaml_loader())
    except FileNotFoundError as exc:
        raise QinstError(f"cloud-init template {name}.yaml is missing from the installation") from exc
    if not isinstance(data, dict):
        raise QinstError(f"cloud-init template {name}.yaml is not a mapping")
    return data


def _fill(node: Any, values: Mapping[str, Any]) -> Any:
    """Replace every string that is exactly ${name} with values[name], as a whole value; None drops the key."""
    if isinstance(node, dict):
        filled = {key: _fill(value, values) for key, value in node.items()}
        return {key: value for key, value in filled.items() if value is not None}
    if isinstance(node, list):
        return [_fill(item, values) for item in node]
    if isinstance(node, str) and (match := _PLACEHOLDER.fullmatch(node)):
        if match[1] not in values:
            raise QinstError(f"cloud-init template uses unknown value {node}")
        return copy.deepcopy(values[match[1]])
    return node


def merge_cloud_config(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge overlay over base: mappings merge, lists are appended, the overlay's other values win."""
    merged = dict(copy.deepcopy(base))
    for key, value in overlay.items():
        if key in merged and isinstance(merged[key], Mapping) and isinstance(value, Mapping):
            merged[key] = merge_cloud_config(merged[key], value)
        elif key in merged and isinstance(merged[key], list) and isinstance(value, list):
            merged[key] = merged[key] + copy.deepcopy(value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def cloud_config(spec: SeedSpec) -> dict[str, Any]:
    """qinst's cloud-config for spec: the filled user-data template with spec.extra_config merged over it."""
    # No keys at all: leave ssh_authorized_keys out, as cloud-init's schema refuses an empty list.
    values = {"hostname": spec.hostname, "user": spec.user, "ssh_keys": list(spec.ssh_keys) or None}
    config: dict[str, Any] = _fill(load_template("user-data"), values)
    if spec.host_key_types:
        config["ssh_genkeytypes"] = list(spec.host_key_types)
    if spec.extra_config:
        config = merge_cloud_config(config, spec.extra_config)
    return config


def dump_cloud_config(config: Mapping[str, Any]) -> bytes:
    """config as a #cloud-config document."""
    return b"#cloud-config\n" + _dump_yaml(config)


def _dump_yaml(data: Mapping[str, Any]) -> bytes:
    import yaml

    # A wide line keeps each SSH key on one line, which is easier to read in the guest.
    text = yaml.safe_dump(dict(data), sort_keys=False, default_flow_style=False, allow_unicode=True, width=4096)
    return text.encode("utf-8")


def render_user_data(spec: SeedSpec) -> bytes:
    """The seed's user-data: one merged #cloud-config, or a MIME multipart when the user's data needs it."""
    ours = cloud_config(spec)
    if spec.user_data is None:
        return dump_cloud_config(ours)
    source = spec.user_data_source or "user-data"
    text = _decode(spec.user_data, source)
    first_line = text.split("\n", 1)[0].rstrip("\r")
    if first_line.rstrip() == "#cloud-config":
        theirs = _load_mapping(text, source, "a #cloud-config")
        if "hostname" in theirs and "fqdn" not in theirs:
            ours = {**ours, "fqdn": theirs["hostname"]}  # keep /etc/hosts in step with the user's host name
        return dump_cloud_config(merge_cloud_config(ours, theirs))
    if _looks_like_mime(first_line):
        return _multipart(_user_mime_parts(spec.user_data, source), ours)
    for prefix, mime_type in PART_TYPES.items():
        if first_line.startswith(prefix):
            return _multipart([_text_part(text, mime_type, PurePath(source).name)], ours)
    # The offending line is not quoted back: user data may hold secrets, and error output ends up in logs.
    raise UsageError(
        f"{source}: unrecognised user data format (from its first line)",
        hint=f"accepted: {ACCEPTED_FORMATS}",
    )


def _decode(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{source} is not UTF-8 text") from exc


def _load_mapping(text: str, source: str, what: str) -> dict[str, Any]:
    """Parse text as a YAML mapping; UsageError naming source, line and column otherwise."""
    import yaml

    try:
        data = yaml.load(text, Loader=_yaml_loader())
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise UsageError(f"{source}: invalid YAML at {where}: {exc.problem or exc.context}") from exc
    except yaml.YAMLError as exc:
        raise UsageError(f"{source}: invalid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{source}: {what} must be a YAML mapping of keys, not a {type(data).__name__}")
    return data


def _looks_like_mime(first_line: str) -> bool:
    header = first_line.lower()
    return header.startswith("content-type:") or header.startswith("mime-version:")


def _user_mime_parts(data: bytes, source: str) -> list[Message]:
    import email
    import email.policy
    from email.message import Message

    message = email.message_from_bytes(data, policy=email.policy.compat32)
    if message.get_content_maintype() != "multipart":
        raise UsageError(
            f"{source}: a MIME message must be multipart (Content-Type: multipart/mixed)",
            hint=f"accepted: {ACCEPTED_FORMATS}",
        )
    parts = [part for part in message.get_payload() if isinstance(part, Message)]
    if not parts:
        raise UsageError(f"{source}: the MIME multipart message has no parts")
    return parts


def _text_part(text: str, mime_type: str, filename: str) -> MIMEText:
    from email.mime.text import MIMEText

    subtype = mime_type.partition("/")[2]
    charset = "us-ascii" if text.isascii() else "utf-8"
    part = MIMEText(text, subtype, charset)
    part.add_header("Content-Disposition", "attachment", filename=filename)
    return part


def _multipart(user_parts: list[Message], ours: Mapping[str, Any]) -> bytes:
    """A multipart/mixed message, as cloud-init documents it: the user's parts, then qinst's cloud-config."""
    from email.mime.multipart import MIMEMultipart

    our_part = _text_part(dump_cloud_config(ours).decode("utf-8"), "text/cloud-config", "qinst.cfg")
    our_part["Merge-Type"] = OUR_PART_MERGE_TYPE
    parts = [*user_parts, our_part]
    message = MIMEMultipart()
    for part in parts:
        message.attach(part)
    # email picks a random boundary; derive one from the content instead, so the bytes are reproducible.
    import hashlib

    body = b"".join(part.as_bytes() for part in parts)
    message.set_boundary("==qinst-" + hashlib.sha256(body).hexdigest()[:32] + "==")
    return message.as_bytes()


def render_meta_data(spec: SeedSpec) -> bytes:
    """The seed's meta-data: instance-id and local-hostname."""
    values = {"instance_id": spec.instance_id, "hostname": spec.hostname}
    return _dump_yaml(_fill(load_template("meta-data"), values))


def default_network_config() -> bytes:
    """The template network-config (v2, DHCPv4 on every en* interface), for when it is asked for."""
    return _dump_yaml(load_template("network-config"))


def render_network_config(spec: SeedSpec) -> bytes | None:
    """spec's network-config, unchanged once checked to be a YAML mapping with version 1 or 2."""
    if spec.network_config is None:
        return None
    source = spec.network_config_source or "network-config"
    config = _load_mapping(_decode(spec.network_config, source), source, "a network-config")
    inner = config.get("network", config)
    if not isinstance(inner, Mapping) or inner.get("version") not in (1, 2):
        raise UsageError(f"{source}: a network-config needs 'version: 1' or 'version: 2'")
    return spec.network_config


def spec_from_files(
    *,
    hostname: str,
    instance_id: str | None,
    ssh_keys: Sequence[Path],
    user: str,
    user_data: Path | None,
    network_config: Path | None,
    config_dir: Path,
) -> SeedSpec:
    """`qinst seed`'s inputs, read and checked: the keys (or the defaults), user-data and network-config files."""
    from qemu_instances.files import read_option_file
    from qemu_instances.sshkeys import resolve_keys

    keys = resolve_keys(list(ssh_keys), config_dir)
    return SeedSpec(
        hostname=validate_hostname(hostname),
        instance_id=validate_instance_id(instance_id) if instance_id else new_instance_id(),
        user=validate_user(user),
        ssh_keys=tuple(k.public for k in keys),
        user_data=read_option_file(user_data, "--user-data"),
        user_data_source=str(user_data) if user_data else None,
        network_config=read_option_file(network_config, "--network-config"),
        network_config_source=str(network_config) if network_config else None,
    )


def seed_files(spec: SeedSpec) -> dict[str, bytes]:
    """The seed's files by name: user-data, meta-data, and network-config and vendor-data when given."""
    files = {"user-data": render_user_data(spec), "meta-data": render_meta_data(spec)}
    network_config = render_network_config(spec)
    if network_config is not None:
        files["network-config"] = network_config
    if spec.vendor_data is not None:
        files["vendor-data"] = spec.vendor_data
    return files


def build_seed_iso(spec: SeedSpec) -> bytes:
    """The NoCloud seed for spec as ISO 9660 bytes (label cidata, Rock Ridge and Joliet names), reproducibly."""
    return iso_from_files(seed_files(spec))


def iso_from_files(files: Mapping[str, bytes]) -> bytes:
    """An ISO labelled cidata holding `files` at its root; the same files always give the same bytes."""
    import pycdlib
    import pycdlib.pycdlibexception

    out = io.BytesIO()
    with _fixed_clock():
        iso = pycdlib.PyCdlib()
        try:
            iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=VOLUME_LABEL, sys_ident="LINUX")
            for name, data in files.items():
                if name not in ISO_NAMES:
                    raise QinstError(f"a NoCloud seed has no file named {name!r}")
                iso.add_fp(io.BytesIO(data), len(data), ISO_NAMES[name], rr_name=name, joliet_path=f"/{name}")
            iso.write_fp(out)
        except pycdlib.pycdlibexception.PyCdlibException as exc:
            raise QinstError(f"could not build the seed ISO: {exc}") from exc
        finally:
            iso.close()
    return out.getvalue()


class _FixedClock:
    """Stands in for the `time` module inside pycdlib: a clock stopped at SEED_EPOCH, in UTC."""

    def time(self) -> float:
        return SEED_EPOCH

    def localtime(self, seconds: float | None = None) -> struct_time:
        return time.gmtime(SEED_EPOCH if seconds is None else seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


# pycdlib stamps volume descriptors, directory records and Rock Ridge entries with time.time() in new(),
# add_fp() and write_fp(), in local time, and has no parameter to pin them (pycdlib issue #113). The modules
# that read the clock see a stopped one while a seed is built; the lock keeps concurrent builds from
# restoring each other's clock.
_clock_lock = threading.Lock()


@contextmanager
def _fixed_clock() -> Iterator[None]:
    import pycdlib.dates
    import pycdlib.headervd
    import pycdlib.pycdlib

    modules = (pycdlib.pycdlib, pycdlib.headervd, pycdlib.dates)
    with _clock_lock:
        saved = [vars(module)["time"] for module in modules]
        try:
            for module in modules:
                vars(module)["time"] = _FixedClock()
            yield
        finally:
            for module, original in zip(modules, saved, strict=True):
                vars(module)["time"] = original
