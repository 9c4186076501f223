"""The image catalog: the built-in data file plus user catalogs that add or override entries by name."""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from qemu_instances.digests import Digest
from qemu_instances.errors import CatalogError

BUILTIN = "built-in catalog"
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_DEFAULT_USERS = {
    "debian": "debian",
    "ubuntu": "ubuntu",
    "fedora": "fedora",
    "centos": "cloud-user",
    "rocky": "rocky",
    "almalinux": "almalinux",
}
_STR_KEYS = {"title", "os", "release", "arch", "format", "url", "latest_url", "checksums_url", "default_user"}
_KNOWN_KEYS = _STR_KEYS | {"aliases", "digest", "aleph_item_hash"}


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


def _entry(name: str, raw: Any, origin: str) -> CatalogEntry:
    where = f"{origin}: [images.{name}]"
    if not _NAME.fullmatch(name):
        raise CatalogError(f"{where}: invalid image name (use lower-case letters, digits, '.', '_', '-')")
    if not isinstance(raw, dict):
        raise CatalogError(f"{where}: expected a table of keys")
    unknown = sorted(set(raw) - _KNOWN_KEYS)
    if unknown:
        raise CatalogError(f"{where}: unknown key {unknown[0]!r}", hint=f"known keys: {', '.join(sorted(_KNOWN_KEYS))}")
    for key in _STR_KEYS & set(raw):
        if not isinstance(raw[key], str) or not raw[key]:
            raise CatalogError(f"{where}: key {key!r} must be a non-empty string")
    if raw.get("format", "qcow2") not in ("qcow2", "raw"):
        raise CatalogError(f"{where}: key 'format' must be 'qcow2' or 'raw' (qinst boots only those)")
    aliases = raw.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) and _NAME.fullmatch(a) for a in aliases):
        raise CatalogError(f"{where}: key 'aliases' must be a list of image names")
    for key in ("url", "latest_url", "checksums_url"):
        if key in raw and not raw[key].startswith(("https://", "http://")):
            raise CatalogError(f"{where}: key {key!r} must be an http(s) URL")
    digest = None
    if "digest" in raw:
        if not isinstance(raw["digest"], str):
            raise CatalogError(f"{where}: key 'digest' must be a string like 'sha512:<hex>'")
        try:
            digest = Digest.parse(raw["digest"], error=CatalogError)
        except CatalogError as exc:
            raise CatalogError(f"{where}: key 'digest': {exc}") from exc
    aleph = raw.get("aleph_item_hash")
    if aleph is not None and not (isinstance(aleph, str) and re.fullmatch(r"[0-9a-f]{64}", aleph)):
        raise CatalogError(f"{where}: key 'aleph_item_hash' must be 64 lower-case hex digits")
    has_upstream = "url" in raw and digest is not None
    if not has_upstream and aleph is None:
        missing = "digest" if "url" in raw else "url"
        raise CatalogError(f"{where}: missing key {missing!r} (an entry needs url and digest, or aleph_item_hash)")
    if ("latest_url" in raw) != ("checksums_url" in raw):
        raise CatalogError(f"{where}: 'latest_url' and 'checksums_url' go together")
    os_name = raw.get("os")
    return CatalogEntry(
        name=name,
        title=raw.get("title", name),
        url=raw.get("url"),
        digest=digest,
        aliases=tuple(aliases),
        os=os_name,
        release=raw.get("release"),
        arch=raw.get("arch", "x86_64"),
        format=raw.get("format"),
        latest_url=raw.get("latest_url"),
        checksums_url=raw.get("checksums_url"),
        aleph_item_hash=aleph,
        default_user=raw.get("default_user", _DEFAULT_USERS.get(os_name or "", "cloud")),
        origin=origin,
    )


def parse_catalog(text: str, origin: str) -> list[CatalogEntry]:
    """Entries of one catalog file's text; errors name the file and the offending key."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"{origin}: invalid TOML: {exc}") from exc
    unknown = sorted(set(data) - {"images"})
    if unknown:
        raise CatalogError(f"{origin}: unknown top-level key {unknown[0]!r} (entries go under [images.NAME])")
    images = data.get("images", {})
    if not isinstance(images, dict):
        raise CatalogError(f"{origin}: 'images' must be a table of [images.NAME] entries")
    return [_entry(name, raw, origin) for name, raw in images.items()]


class Catalog:
    """Entries by name, with aliases; later sources override earlier ones by name."""

    def __init__(self, entries: Iterable[CatalogEntry] = ()) -> None:
        self._entries: dict[str, CatalogEntry] = {}
        for entry in entries:
            self._entries[entry.name] = entry

    @classmethod
    def load(cls, extra: Iterable[Path] = ()) -> Catalog:
        """The built-in catalog, then each user catalog file in order."""
        builtin = resources.files("qemu_instances").joinpath("catalog.toml").read_text(encoding="utf-8")
        entries = parse_catalog(builtin, BUILTIN)
        for path in extra:
            try:
                # TOML is UTF-8 whatever the locale says.
                text = Path(path).read_bytes().decode("utf-8")
            except OSError as exc:
                raise CatalogError(f"cannot read catalog {path}: {exc.strerror}") from exc
            except UnicodeDecodeError as exc:
                raise CatalogError(f"{path}: not UTF-8 text (byte {exc.start}); TOML files are UTF-8") from exc
            entries += parse_catalog(text, str(path))
        return cls(entries)

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
