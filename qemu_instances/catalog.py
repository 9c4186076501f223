"""The image catalog: the built-in data file plus user catalogs that add or override entries by name."""

from __future__ import annotations

import difflib
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from qemu_instances import cid as cids
from qemu_instances.digests import Digest
from qemu_instances.errors import CatalogError, ImageError, QinstError
from qemu_instances.files import MAX_CATALOG, decode_text, parse_toml, read_bounded
from qemu_instances.text import printable

BUILTIN = "built-in catalog"
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}", re.ASCII)
_DEFAULT_USERS = {
    "debian": "debian",
    "ubuntu": "ubuntu",
    "fedora": "fedora",
    "centos": "cloud-user",
    "rocky": "rocky",
    "almalinux": "almalinux",
}


def http_url(text: str) -> str:
    """An http(s) URL with a host, or ValueError saying what is wrong."""
    try:
        parts = urlsplit(text)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ValueError(f"is not a valid URL ({exc})") from exc
    if parts.scheme not in ("http", "https") or not host:
        raise ValueError("must be an http(s) URL with a host")
    if any(ch.isspace() or unicodedata.category(ch) == "Cc" for ch in text):
        raise ValueError("must not contain spaces or control characters")
    return text


# Validators take the raw TOML value and return the entry's value, or raise ValueError with what is wrong.
def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a non-empty string")
    return value


def _display(value: Any) -> str:
    text = printable(_text(value)).strip()
    if not text:
        raise ValueError("must hold printable text")
    return text


def _url(value: Any) -> str:
    return http_url(_text(value))


def _format(value: Any) -> str:
    if value not in ("qcow2", "raw"):
        raise ValueError("must be 'qcow2' or 'raw' (qinst boots only those)")
    return str(value)


def _aliases(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(a, str) and _NAME.fullmatch(a) for a in value):
        raise ValueError("must be a list of image names (lower-case letters, digits, '.', '_', '-')")
    return tuple(value)


def _digest(value: Any) -> Digest:
    if not isinstance(value, str):
        raise ValueError("must be a string like 'sha512:<hex>'")
    try:
        return Digest.parse(value, error=CatalogError)
    except CatalogError as exc:
        raise ValueError(str(exc)) from exc


def _aleph_hash(value: Any) -> str:
    """An aleph message hash: 64 lower-case hex digits (sha256), or a CID (Qm..., bafy...) as aleph.py accepts."""
    if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value):
        return value
    if isinstance(value, str) and value[:2] in ("Qm", "ba"):
        try:
            return str(cids.parse(value))
        except ImageError:
            pass
    raise ValueError("must be 64 lower-case hex digits or a CID (Qm..., bafy...)")


def _user(value: Any) -> str:
    if not isinstance(value, str) or not _USER.fullmatch(value):
        raise ValueError("must be a user name (lower-case letters, digits, '_', '-', starting with a letter)")
    if value == "root":
        raise ValueError("must not be root (cloud images lock root; qinst logs in as an unprivileged user)")
    return value


def _arch(value: Any) -> str:
    from qemu_instances.arch import Arch

    if not isinstance(value, str):
        raise ValueError("must be x86_64 (amd64) or aarch64 (arm64)")
    try:
        return str(Arch.parse(value))
    except QinstError as exc:
        raise ValueError("must be x86_64 (amd64) or aarch64 (arm64)") from exc


def _size(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError("must be a positive number of bytes")
    return value


def _keys(value: Any) -> str:
    text = _text(value)
    from qemu_instances.signatures import keyring_path

    try:
        keyring_path(text)
    except ImageError as exc:
        raise ValueError(str(exc)) from exc
    return text


@dataclass(frozen=True)
class _Field:
    key: str
    check: Callable[[Any], Any]
    doc: str


# The keys of an entry, in the order `qinst images --json` and the README describe them.
_FIELDS = {
    f.key: f
    for f in (
        _Field("title", _display, "shown by `qinst images` (control characters are stripped)"),
        _Field("aliases", _aliases, "other names"),
        _Field("os", _display, "debian, ubuntu, ...: picks the default login user"),
        _Field("release", _display, "the release's version"),
        _Field("arch", _arch, "the architecture of the entry's own pin: x86_64 (the default) or aarch64"),
        _Field("format", _format, "qcow2 or raw"),
        _Field("url", _url, "the pinned build"),
        _Field("digest", _digest, "the pin: sha256:<hex> or sha512:<hex>"),
        _Field("size", _size, "the pinned file's size in bytes: a longer download stops at once"),
        _Field("latest_url", _url, "the newest build (--latest, and the fallback when the pin is gone)"),
        _Field("checksums_url", _url, "SHA256SUMS or SHA512SUMS listing latest_url's file"),
        _Field("checksums_signature_url", _url, "a detached OpenPGP signature of checksums_url"),
        _Field("signing_keys", _keys, "a keyring shipped with qinst (ubuntu-cloud-images) or a keyring file"),
        _Field("aleph_item_hash", _aleph_hash, "the aleph.im STORE message of the image"),
        _Field("default_user", _user, "the login user (not root)"),
    )
}
# Keys that only make sense together.
_PAIRS = (("latest_url", "checksums_url"), ("checksums_signature_url", "signing_keys"))
# The keys of one architecture's pin: the entry's own (for `arch`), or a table [images.NAME.ARCH] for another.
_PIN_KEYS = (
    "format", "url", "digest", "size", "latest_url", "checksums_url", "checksums_signature_url", "signing_keys",
    "aleph_item_hash",
)  # fmt: skip
# What an architecture's table takes from the entry when it does not say: the channel's files, usually one for all
# architectures (Ubuntu's SHA256SUMS lists every architecture's images). Never a pin: url, digest, size, latest_url
# and aleph_item_hash name one file.
_SHARED = ("format", "checksums_url", "checksums_signature_url", "signing_keys")
ARCHES = ("x86_64", "aarch64")


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    title: str
    url: str | None
    digest: Digest | None
    aliases: tuple[str, ...] = ()
    os: str | None = None
    release: str | None = None
    arch: str = "x86_64"
    format: str | None = None
    latest_url: str | None = None
    checksums_url: str | None = None
    aleph_item_hash: str | None = None
    default_user: str = "cloud"
    origin: str = BUILTIN
    size: int | None = None
    checksums_signature_url: str | None = None
    signing_keys: str | None = None
    # The pins of the other architectures: (arch, ((key, value), ...)), from [images.NAME.ARCH] tables.
    other_arches: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()

    @property
    def arches(self) -> tuple[str, ...]:
        """The architectures this entry has an image for (its own `arch` first, when it pins one)."""
        own = (self.arch,) if self.url or self.aleph_item_hash else ()
        return own + tuple(a for a, _ in self.other_arches if a != self.arch)

    def for_arch(self, arch: str) -> CatalogEntry | None:
        """This entry as pinned for `arch` (url, digest, latest channel of that architecture); None when it has no
        image for it."""
        if arch == self.arch:
            return self if (self.url or self.aleph_item_hash) else None
        table = dict(dict(self.other_arches).get(arch, ()))
        if not table:
            return None
        pin: dict[str, Any] = {key: None for key in _PIN_KEYS}
        pin |= {key: getattr(self, key) for key in _SHARED}
        pin |= table
        return replace(self, arch=arch, **pin)

    @property
    def signed(self) -> bool:
        """Whether the latest channel's checksum file carries a signature checked against a pinned keyring."""
        return bool(self.checksums_signature_url and self.signing_keys)

    @property
    def latest_trust(self) -> str | None:
        """How the latest channel is verified: "signed", "unsigned" (TLS to the upstream host only), or None."""
        if not (self.latest_url and self.checksums_url):
            return None
        return "signed" if self.signed else "unsigned"


def _entry(name: str, raw: Any, origin: str) -> CatalogEntry:
    where = f"{origin}: [images.{name}]"
    if not _NAME.fullmatch(name):
        raise CatalogError(f"{where}: invalid image name (use lower-case letters, digits, '.', '_', '-')")
    if not isinstance(raw, dict):
        raise CatalogError(f"{where}: expected a table of keys")
    tables = {key: value for key, value in raw.items() if key in ARCHES}
    unknown = sorted(set(raw) - set(_FIELDS) - set(tables))
    if unknown:
        known = ", ".join([*_FIELDS, *(f"[images.{name}.{a}]" for a in ARCHES)])
        raise CatalogError(f"{where}: unknown key {unknown[0]!r}", hint=f"known keys: {known}")
    values = _checked(where, {k: v for k, v in raw.items() if k not in tables}, origin)
    own_pin = ("url" in values and "digest" in values) or "aleph_item_hash" in values
    if not own_pin and (not tables or "url" in values or "digest" in values):
        missing = "digest" if "url" in values else "url"
        raise CatalogError(f"{where}: missing key {missing!r} (an entry needs url and digest, or aleph_item_hash)")
    _check_pairs(where, values)
    values.setdefault("default_user", _DEFAULT_USERS.get(values.get("os", ""), "cloud"))
    arch = values.get("arch", "x86_64")
    others = []
    for other, table in tables.items():
        there = f"{origin}: [images.{name}.{other}]"
        if other == arch and own_pin:
            raise CatalogError(f"{there}: the entry's own pin is already for {arch} (its key arch)")
        if not isinstance(table, dict):
            raise CatalogError(f"{there}: expected a table of keys")
        bad = sorted(set(table) - set(_PIN_KEYS))
        if bad:
            raise CatalogError(
                f"{there}: unknown key {bad[0]!r}", hint=f"an architecture's keys: {', '.join(_PIN_KEYS)}"
            )
        pin = _checked(there, table, origin)
        if not (("url" in pin and "digest" in pin) or "aleph_item_hash" in pin):
            missing = "digest" if "url" in pin else "url"
            raise CatalogError(f"{there}: missing key {missing!r} (a pin needs url and digest, or aleph_item_hash)")
        _check_pairs(there, {**{k: values[k] for k in _SHARED if k in values}, **pin})
        others.append((other, tuple(sorted(pin.items()))))
    if not own_pin and "arch" not in values:
        values["arch"] = others[0][0]  # an entry pinned only in architecture tables: the first one is its own
    return CatalogEntry(
        name=name,
        title=values.pop("title", name),
        url=values.pop("url", None),
        digest=values.pop("digest", None),
        origin=origin,
        other_arches=tuple(others),
        **values,
    )


def _checked(where: str, raw: dict[str, Any], origin: str) -> dict[str, Any]:
    raw = dict(raw)
    keys = raw.get("signing_keys")
    if isinstance(keys, str) and "/" in keys and origin != BUILTIN:
        # A keyring path in a user catalog is relative to that catalog file.
        raw["signing_keys"] = str(Path(origin).parent / Path(keys).expanduser())
    values: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            values[key] = _FIELDS[key].check(value)
        except ValueError as exc:
            raise CatalogError(f"{where}: key {key!r}: {exc}") from exc
    return values


def _check_pairs(where: str, values: dict[str, Any]) -> None:
    for a, b in _PAIRS:
        if (a in values) != (b in values):
            raise CatalogError(f"{where}: {a!r} and {b!r} go together")
    if "checksums_signature_url" in values and "checksums_url" not in values:
        raise CatalogError(f"{where}: 'checksums_signature_url' signs 'checksums_url', which is missing")


@dataclass(frozen=True)
class FirmwareEntry:
    """A firmware file of the catalog's `firmware` section: today the confidential OVMF that AMD SEV guests boot
    (aleph.im's, from the seed's runtimes page). Its digest is the validation hash: the sha256 of the file, which is
    also the SEV launch digest of that firmware."""

    name: str
    title: str
    digest: Digest  # sha256 of the file: checked after any download, and the expected SEV launch digest
    aleph_item_hash: str | None = None
    url: str | None = None
    kind: str = "sev"
    origin: str = BUILTIN


_FIRMWARE_KEYS = ("title", "kind", "digest", "aleph_item_hash", "url")


def _firmware(name: str, raw: Any, origin: str) -> FirmwareEntry:
    where = f"{origin}: [firmware.{name}]"
    if not _NAME.fullmatch(name) or not isinstance(raw, dict):
        raise CatalogError(f"{where}: expected a table of keys under a firmware name (lower-case letters, digits)")
    unknown = sorted(set(raw) - set(_FIRMWARE_KEYS))
    if unknown:
        raise CatalogError(f"{where}: unknown key {unknown[0]!r}", hint=f"known keys: {', '.join(_FIRMWARE_KEYS)}")
    values = _checked(
        where, {k: v for k, v in raw.items() if k in ("digest", "aleph_item_hash", "url", "title")}, origin
    )
    if raw.get("kind", "sev") != "sev":
        raise CatalogError(f"{where}: key 'kind': must be 'sev' (the firmware of AMD SEV guests)")
    digest = values.get("digest")
    if digest is None or digest.algorithm != "sha256":
        raise CatalogError(f"{where}: key 'digest' must be the file's sha256 (sha256:<hex>): the validation hash")
    if "aleph_item_hash" not in values and "url" not in values:
        raise CatalogError(f"{where}: missing key 'aleph_item_hash' or 'url' (where the firmware comes from)")
    return FirmwareEntry(name, values.get("title", name), digest, values.get("aleph_item_hash"), values.get("url"),
                         origin=origin)  # fmt: skip


def parse_catalog(text: str, origin: str) -> list[CatalogEntry]:
    """Entries of one catalog file's text; errors name the file and the offending key."""
    return parse_catalog_file(text, origin)[0]


def parse_catalog_file(text: str, origin: str) -> tuple[list[CatalogEntry], list[FirmwareEntry]]:
    """The [images.NAME] and [firmware.NAME] entries of one catalog file's text."""
    data = parse_toml(text, origin, CatalogError)
    unknown = sorted(set(data) - {"images", "firmware"})
    if unknown:
        raise CatalogError(f"{origin}: unknown top-level key {unknown[0]!r} (entries go under [images.NAME])")
    images = data.get("images", {})
    if not isinstance(images, dict):
        raise CatalogError(f"{origin}: 'images' must be a table of [images.NAME] entries")
    firmware = data.get("firmware", {})
    if not isinstance(firmware, dict):
        raise CatalogError(f"{origin}: 'firmware' must be a table of [firmware.NAME] entries")
    return (
        [_entry(name, raw, origin) for name, raw in images.items()],
        [_firmware(name, raw, origin) for name, raw in firmware.items()],
    )


class Catalog:
    """Entries by name, with aliases; later sources override earlier ones by name."""

    def __init__(self, entries: Iterable[CatalogEntry] = (), firmware: Iterable[FirmwareEntry] = ()) -> None:
        self._entries: dict[str, CatalogEntry] = {}
        for entry in entries:
            self._entries[entry.name] = entry
        self.firmware: dict[str, FirmwareEntry] = {f.name: f for f in firmware}
        for fw in self.firmware.values():  # one namespace: `qinst pull NAME` must mean one thing
            if self.get(fw.name) is not None:
                raise CatalogError(f"{fw.origin}: [firmware.{fw.name}]: an image of the catalog has that name")

    def firmware_for_aleph(self, item_hash: str) -> FirmwareEntry | None:
        """The firmware entry pulled through aleph message item_hash, if the catalog has one."""
        return next((f for f in self.firmware.values() if f.aleph_item_hash == item_hash), None)

    @classmethod
    def load(cls, extra: Iterable[Path] = ()) -> Catalog:
        """The built-in catalog, then each user catalog file in order."""
        # Next to this module in every installation (importlib.resources, for zipped ones, costs `up` ~0.003 s).
        builtin = Path(__file__).with_name("catalog.toml").read_text(encoding="utf-8")
        entries, firmware = parse_catalog_file(builtin, BUILTIN)
        for path in extra:
            try:
                data = read_bounded(Path(path), "catalog", MAX_CATALOG, error=CatalogError)
            except FileNotFoundError:
                raise CatalogError(f"cannot read catalog {path}: no such file") from None
            # TOML is UTF-8 whatever the locale says.
            more, more_firmware = parse_catalog_file(decode_text(data, f"catalog {path}", CatalogError), str(path))
            entries += more
            firmware += more_firmware
        return cls(entries, firmware)

    def __iter__(self) -> Iterator[CatalogEntry]:
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def _aliases(self) -> dict[str, str]:
        return {alias: e.name for e in self._entries.values() for alias in e.aliases}

    def get(self, name: str) -> CatalogEntry | None:
        """The entry named `name` or aliased by it; a name wins over another entry's alias."""
        key = name.lower()
        if key in self._entries:
            return self._entries[key]
        target = self._aliases().get(key)
        return self._entries[target] if target else None

    def lookup(self, name: str) -> CatalogEntry:
        entry = self.get(name)
        if entry is not None:
            return entry
        known = sorted(set(self._entries) | set(self._aliases()))
        close = difflib.get_close_matches(name.lower(), known, n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(close)}?" if close else f"known images: {', '.join(known)}"
        raise CatalogError(f"unknown image {name!r}", hint=hint + " ('qinst images' lists them)")
