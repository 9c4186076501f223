"""Image references and the verified, content-addressed, locked image cache (`pull`, `images`, `prune`)."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from qemu_instances import aleph
from qemu_instances.catalog import Catalog, CatalogEntry
from qemu_instances.digests import Algorithm, Digest, algorithm_for_checksums, parse_checksums
from qemu_instances.errors import DownloadError, ImageError, UsageError
from qemu_instances.proc import run
from qemu_instances.settings import Settings

if TYPE_CHECKING:  # requests is imported only when something is downloaded: `up` of a cached image stays light
    import requests

    from qemu_instances.download import Progress, RetryPolicy

log = logging.getLogger("qinst")
CHUNK = 1 << 20


class Source(StrEnum):
    UPSTREAM = "upstream"
    ALEPH = "aleph"


class RefKind(StrEnum):
    CATALOG = "catalog"
    ALEPH = "aleph"
    FILE = "file"
    URL = "url"


@dataclass(frozen=True)
class ImageRef:
    """What the user asked for, resolved against the catalog but not yet fetched."""

    kind: RefKind
    text: str
    entry: CatalogEntry | None = None
    url: str | None = None
    digest: Digest | None = None
    path: Path | None = None
    aleph_hash: str | None = None

    @property
    def name(self) -> str:
        """A short name for listings and default instance names."""
        if self.entry:
            return self.entry.name
        if self.kind is RefKind.ALEPH:
            return f"aleph-{self.aleph_hash and self.aleph_hash[:8]}"
        base = (self.path.name if self.path else urlsplit(self.url or "").path.rsplit("/", 1)[-1]) or "image"
        return re.sub(r"\.(qcow2|img|raw)$", "", base)


@dataclass(frozen=True)
class CachedImage:
    """A complete, verified file in the cache."""

    name: str
    digest: Digest
    path: Path
    size: int
    source: str
    format: str
    url: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "digest": str(self.digest),
            "path": str(self.path),
            "size": self.size,
            "source": self.source,
            "format": self.format,
        }


def parse_image_ref(text: str, catalog: Catalog, *, sha256: str | None = None, sha512: str | None = None) -> ImageRef:
    """Parse IMAGE: a catalog name or alias, aleph:<hash>, a local path, or an http(s) URL with a digest."""
    if sha256 and sha512:
        raise UsageError("give --sha256 or --sha512, not both")
    digest = None
    if sha256:
        digest = Digest.of(Algorithm.SHA256, sha256, error=UsageError)
    elif sha512:
        digest = Digest.of(Algorithm.SHA512, sha512, error=UsageError)
    if text.startswith(("http://", "https://")):
        if digest is None:
            raise UsageError(
                f"refusing to download {text} without a digest",
                hint="pass --sha256 HEX or --sha512 HEX: qinst verifies every byte it downloads",
            )
        return ImageRef(RefKind.URL, text, url=text, digest=digest)
    if digest is not None:
        raise UsageError("--sha256/--sha512 apply only to an http(s) URL")
    if text.startswith("aleph:"):
        return ImageRef(RefKind.ALEPH, text, aleph_hash=aleph.validate_item_hash(text.removeprefix("aleph:")))
    if "/" in text or text.startswith(".") or text.endswith((".qcow2", ".img", ".raw")):
        path = Path(text).expanduser()
        if not path.is_file():
            raise ImageError(f"no such image file: {text}")
        return ImageRef(RefKind.FILE, text, path=path.resolve())
    return ImageRef(RefKind.CATALOG, text, entry=catalog.lookup(text))


def mirror_url(url: str, mirror: str | None) -> str:
    """Replace scheme://host of an upstream URL with the mirror's (its path prefix is kept)."""
    if not mirror:
        return url
    parts = urlsplit(url)
    rest = parts.path + (f"?{parts.query}" if parts.query else "")
    return mirror.rstrip("/") + rest


def qemu_img_info(path: Path) -> dict[str, Any]:
    out = run(
        ["qemu-img", "info", "--output=json", "--force-share", path],
        error=ImageError,
        hint="is qemu-utils installed?",
    ).stdout
    try:
        info = json.loads(out)
    except ValueError:
        info = None
    if not isinstance(info, dict):
        raise ImageError(f"qemu-img info {path}: not the JSON object expected: {out[:80]!r}")
    return info


def check_format(path: Path, expected: str | None, origin: str) -> str:
    """The image's format per qemu-img; refuse other formats, backing files, and a mismatch with the catalog."""
    info = qemu_img_info(path)
    fmt = str(info.get("format"))
    if fmt not in ("qcow2", "raw"):
        raise ImageError(f"{origin}: unsupported image format {fmt!r} (qinst takes qcow2 or raw)")
    if info.get("backing-filename"):
        raise ImageError(f"{origin}: refusing an image with a backing file ({info['backing-filename']})")
    if expected and fmt != expected:
        raise ImageError(f"{origin}: expected a {expected} image, qemu-img says {fmt}")
    return fmt


class Cache:
    """Complete, verified images named by their digest, each with a small JSON record beside it."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "images"

    def path(self, digest: Digest) -> Path:
        return self.dir / digest.filename

    def get(self, digest: Digest) -> CachedImage | None:
        path = self.path(digest)
        if not path.is_file():
            return None
        try:
            record = json.loads(path.with_name(path.name + ".json").read_text())
        except (OSError, ValueError):
            record = {}
        return CachedImage(
            name=record.get("name", digest.filename[:19]),
            digest=digest,
            path=path,
            size=path.stat().st_size,
            source=record.get("source", "unknown"),
            format=record.get("format", "unknown"),
            url=record.get("url"),
        )

    def entries(self) -> list[CachedImage]:
        if not self.dir.is_dir():
            return []
        found = (self.get(d) for p in self.dir.iterdir() if (d := Digest.from_filename(p.name)) is not None)
        return sorted((c for c in found if c), key=lambda c: c.name)

    @contextmanager
    def lock(self, digest: Digest) -> Iterator[None]:
        """Hold the per-image lock: concurrent pulls of one image wait here and then find it cached."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with (self.dir / f".{digest.filename}.lock").open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def record(self, image: CachedImage) -> None:
        data = {"name": image.name, "source": image.source, "format": image.format, "url": image.url}
        target = image.path.with_name(image.path.name + ".json")
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, target)

    def remove(self, digest: Digest) -> None:
        path = self.path(digest)
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".json").unlink(missing_ok=True)

    def stale_temporaries(self) -> list[Path]:
        """Partial downloads, temporary files and orphaned records that no running pull holds."""
        if not self.dir.is_dir():
            return []
        stale = []
        for p in self.dir.iterdir():
            if p.name.endswith(".json") and not p.name.startswith("."):
                image = p.with_name(p.name.removesuffix(".json"))
                if (
                    Digest.from_filename(image.name)
                    and not image.exists()
                    and not _locked(self.dir / f".{image.name}.lock")
                ):
                    stale.append(p)  # the record of an image that is gone
                continue
            if not p.name.startswith(".") or p.name.endswith(".lock"):
                continue
            digest_name = p.name[1:].split(".", 1)[0]
            # A download's files are held through its image's lock; an import's temporary file is locked itself.
            holder = self.dir / f".{digest_name}.lock" if Digest.from_filename(digest_name) else p
            if not _locked(holder):
                stale.append(p)
        return stale


def _locked(path: Path) -> bool:
    """Whether a process holds an flock on path (a missing file is not locked)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also releases our lock
    return False


@dataclass(frozen=True)
class _Plan:
    name: str
    url: str
    digest: Digest
    source: str
    format: str | None = None


class ImageStore:
    """Pull images into the cache and list or prune it."""

    def __init__(
        self, settings: Settings, catalog: Catalog | None = None, *, policy: RetryPolicy | None = None
    ) -> None:
        self.settings = settings
        self.catalog = catalog if catalog is not None else Catalog.load(settings.catalogs)
        self.cache = Cache(settings.cache_dir)
        self._policy = policy
        self._requests: requests.Session | None = None

    @property
    def policy(self) -> RetryPolicy:
        from qemu_instances.download import RetryPolicy

        return self._policy or RetryPolicy()

    @property
    def _session(self) -> requests.Session:
        if self._requests is None:
            from qemu_instances.download import new_session

            self._requests = new_session()
        return self._requests

    def resolve(self, text: str, *, sha256: str | None = None, sha512: str | None = None) -> ImageRef:
        return parse_image_ref(text, self.catalog, sha256=sha256, sha512=sha512)

    def cached(self, ref: ImageRef) -> CachedImage | None:
        """The cached file for ref's pinned digest, if any (no network)."""
        digest = ref.digest or (ref.entry.digest if ref.entry else None)
        return self.cache.get(digest) if digest else None

    def pull(
        self,
        ref: ImageRef,
        *,
        source: Source = Source.UPSTREAM,
        latest: bool = False,
        progress: Progress | None = None,
    ) -> CachedImage:
        """Make sure ref's image is in the cache, verified; download it if needed."""
        if ref.kind is RefKind.FILE:
            if source is Source.ALEPH or latest:
                raise UsageError("--source aleph and --latest apply to catalog images, not local files")
            assert ref.path is not None
            return self._import_file(ref.path)
        plan = self._plan(ref, source, latest)
        try:
            return self._fetch(plan, progress)
        except DownloadError as exc:
            entry = ref.entry
            gone = exc.status in (404, 410) and source is Source.UPSTREAM and not latest
            if not (gone and entry and entry.latest_url and entry.checksums_url):
                raise
            log.warning(
                "the pinned build of %s is gone upstream (%s); using the latest build, verified against %s",
                entry.name,
                exc,
                mirror_url(entry.checksums_url, self.settings.mirror),
            )
            return self._fetch(self._plan(ref, source, latest=True), progress)

    def _plan(self, ref: ImageRef, source: Source, latest: bool) -> _Plan:
        entry = ref.entry
        if ref.kind is RefKind.URL:
            if source is Source.ALEPH or latest:
                raise UsageError("--source aleph and --latest apply to catalog images, not URLs")
            assert ref.url and ref.digest
            return _Plan(ref.name, ref.url, ref.digest, "url")
        # An entry with only an aleph item hash (no upstream url) has aleph as its only source.
        aleph_only = entry is not None and not entry.url and entry.aleph_item_hash is not None
        if ref.kind is RefKind.ALEPH or source is Source.ALEPH or aleph_only:
            if latest:
                raise UsageError("--latest applies to upstream sources, not aleph")
            item = ref.aleph_hash or (entry.aleph_item_hash if entry else None)
            if not item:
                raise ImageError(f"image {ref.name} has no aleph item hash in its catalog entry")
            found = aleph.resolve(item, api=self.settings.aleph_api, session=self._session, policy=self.policy)
            return _Plan(ref.name, found.url, found.digest, "aleph", entry.format if entry else None)
        assert entry is not None
        if latest:
            if not (entry.latest_url and entry.checksums_url):
                raise ImageError(f"image {entry.name} has no latest channel (latest_url and checksums_url)")
            url = mirror_url(entry.latest_url, self.settings.mirror)
            return _Plan(entry.name, url, self._latest_digest(entry), "upstream-latest", entry.format)
        if not (entry.url and entry.digest):
            raise ImageError(f"image {entry.name} has no upstream url", hint="use --source aleph")
        return _Plan(entry.name, mirror_url(entry.url, self.settings.mirror), entry.digest, "upstream", entry.format)

    def _latest_digest(self, entry: CatalogEntry) -> Digest:
        assert entry.latest_url and entry.checksums_url
        sums_url = mirror_url(entry.checksums_url, self.settings.mirror)
        algorithm = algorithm_for_checksums(sums_url)
        from qemu_instances.download import fetch_bytes

        text = fetch_bytes(sums_url, session=self._session, policy=self.policy).decode("utf-8", "replace")
        filename = urlsplit(entry.latest_url).path.rsplit("/", 1)[-1]
        sums = parse_checksums(text, algorithm)
        if filename not in sums:
            raise ImageError(f"{sums_url} lists no {algorithm} digest for {filename}")
        return sums[filename]

    def _fetch(self, plan: _Plan, progress: Progress | None) -> CachedImage:
        with self.cache.lock(plan.digest):
            found = self.cache.get(plan.digest)
            if found:
                return found
            dest = self.cache.path(plan.digest)
            fmt = "unknown"

            def check(path: Path) -> None:
                # Before the file takes its name: the cache holds only images qinst can use.
                nonlocal fmt
                fmt = check_format(path, plan.format, plan.url)

            from qemu_instances.download import download_verified

            size = download_verified(
                plan.url, dest, plan.digest, session=self._session, progress=progress, policy=self.policy, check=check
            )
            image = CachedImage(plan.name, plan.digest, dest, size, plan.source, fmt, plan.url)
            self.cache.record(image)
            return image

    def _import_file(self, path: Path) -> CachedImage:
        """A local image, identified by its own sha256, copied into the cache (hashing while copying)."""
        from qemu_instances.download import replace_durably

        check_format(path, None, str(path))  # refuse early, before copying gigabytes
        self.cache.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=self.cache.dir, prefix=".import-", suffix=".tmp")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as dst:
                fcntl.flock(dst, fcntl.LOCK_EX)  # tells prune that this temporary file is in use
                h, size = Algorithm.SHA256.new(), 0
                try:
                    with path.open("rb") as src:
                        while chunk := src.read(CHUNK):
                            h.update(chunk)
                            dst.write(chunk)
                            size += len(chunk)
                    dst.flush()
                except OSError as exc:
                    raise ImageError(f"cannot copy {path} into the cache: {exc.strerror}") from exc
                digest = Digest(Algorithm.SHA256, h.hexdigest())
                fmt = check_format(tmp, None, str(path))  # the copy is what the cache will hold
                with self.cache.lock(digest):
                    found = self.cache.get(digest)
                    if found:
                        return found
                    replace_durably(tmp, self.cache.path(digest))
                    image = CachedImage(path.stem, digest, self.cache.path(digest), size, "file", fmt)
                    self.cache.record(image)
                    return image
        finally:
            tmp.unlink(missing_ok=True)

    def prune(self, in_use: set[str]) -> list[tuple[Path, int]]:
        """Delete cached images whose digest is not in in_use, and stale temporaries; return what went."""
        removed: list[tuple[Path, int]] = []
        for image in self.cache.entries():
            if str(image.digest) in in_use:
                continue
            with self.cache.lock(image.digest):
                self.cache.remove(image.digest)
            removed.append((image.path, image.size))
        for tmp in self.cache.stale_temporaries():
            size = tmp.stat().st_size
            if tmp.is_dir():
                shutil.rmtree(tmp)
            else:
                tmp.unlink(missing_ok=True)
            removed.append((tmp, size))
        return removed
