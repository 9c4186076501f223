"""Image references and the verified, content-addressed, locked image cache (`pull`, `images`, `prune`)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from qemu_instances.arch import Arch
from qemu_instances.catalog import Catalog, CatalogEntry, FirmwareEntry, http_url
from qemu_instances.digests import Algorithm, Digest, algorithm_for_checksums, hash_file, parse_checksums
from qemu_instances.errors import DigestMismatch, DownloadError, ImageError, QinstError, UsageError
from qemu_instances.files import MAX_RECORD, locked, parse_json, read_bounded, replace_durably, write_atomically
from qemu_instances.logs import log
from qemu_instances.proc import run
from qemu_instances.settings import Settings
from qemu_instances.text import printable

if TYPE_CHECKING:  # requests is imported only when something is downloaded: `up` of a cached image stays light
    import requests

    from qemu_instances.download import Progress, RetryPolicy

CHUNK = 1 << 20
GONE = (404, 410)  # HTTP statuses that say a file is not (or no longer) there


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
    entry: CatalogEntry | None = None  # as pinned for `arch`
    arch: Arch = Arch.X86_64  # the guest architecture asked for (a file or URL: taken on the user's word)
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
    aleph_item_hash: str | None = None  # the aleph STORE message this file was pulled through
    virtual_size: int | None = None  # the disk size the image gives the guest (qemu-img's, recorded when cached)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "digest": str(self.digest),
            "path": str(self.path),
            "size": self.size,
            "source": self.source,
            "format": self.format,
        }


def parse_image_ref(
    text: str,
    catalog: Catalog,
    *,
    sha256: str | None = None,
    sha512: str | None = None,
    arch: Arch | None = None,
) -> ImageRef:
    """Parse IMAGE: a catalog name or alias (pinned for `arch`; default the host's, or the entry's own when it has
    no build for the host's), aleph:<hash>, a local path, or an http(s) URL with a digest."""
    asked, arch = arch, arch or Arch.host()
    if sha256 and sha512:
        raise UsageError("give --sha256 or --sha512, not both")
    digest = None
    if sha256:
        digest = Digest.of(Algorithm.SHA256, sha256, error=UsageError)
    elif sha512:
        digest = Digest.of(Algorithm.SHA512, sha512, error=UsageError)
    if text.startswith(("http://", "https://")):
        try:
            http_url(text)
        except ValueError as exc:
            raise UsageError(f"bad image URL {text!r}: {exc}") from exc
        if digest is None:
            raise UsageError(
                f"refusing to download {text} without a digest",
                hint="pass --sha256 HEX or --sha512 HEX: qinst verifies every byte it downloads",
            )
        return ImageRef(RefKind.URL, text, url=text, digest=digest, arch=arch)
    if digest is not None:
        raise UsageError("--sha256/--sha512 apply only to an http(s) URL")
    if text.startswith("aleph:"):
        from qemu_instances import aleph  # imported where used: `images` and a cached `up` need none of it

        return ImageRef(
            RefKind.ALEPH, text, aleph_hash=aleph.validate_item_hash(text.removeprefix("aleph:")), arch=arch
        )
    if "/" in text or text.startswith(".") or text.endswith((".qcow2", ".img", ".raw")):
        path = Path(text).expanduser()
        if not path.is_file():
            raise ImageError(f"no such image file: {text}")
        return ImageRef(RefKind.FILE, text, path=path.resolve(), arch=arch)
    entry = catalog.lookup(text)
    if asked is None and str(arch) not in entry.arches and entry.arches:
        arch = Arch(entry.arches[0])  # an entry of one other architecture: that is the image asked for
    pinned = entry.for_arch(arch)
    if pinned is None:
        raise ImageError(
            f"image {entry.name} has no {arch} build in the catalog (it has: {', '.join(entry.arches)})",
            hint=f"use --arch {entry.arches[0]}, or add [images.{entry.name}.{arch}] to a catalog (--catalog)",
        )
    return ImageRef(RefKind.CATALOG, text, entry=pinned, arch=arch)


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
    return inspect_image(path, expected, origin)[0]


MAX_VIRTUAL_SIZE = 1 << 50  # 1 PiB: a recorded virtual size beyond it is not believed


def valid_virtual_size(value: object) -> int | None:
    """A virtual size read back from qemu-img or a cache record (untrusted): a positive int, else None."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_VIRTUAL_SIZE:
        return value
    return None


def inspect_image(path: Path, expected: str | None, origin: str) -> tuple[str, int | None]:
    """check_format's checks; returns the format and the virtual size (recorded in the cache: `up` needs it)."""
    info = qemu_img_info(path)
    fmt = str(info.get("format"))
    if fmt not in ("qcow2", "raw"):
        raise ImageError(f"{origin}: unsupported image format {fmt!r} (qinst takes qcow2 or raw)")
    if info.get("backing-filename") or info.get("full-backing-filename"):
        backing = info.get("backing-filename") or info.get("full-backing-filename")
        raise ImageError(f"{origin}: refusing an image with a backing file ({backing})")
    specific = info.get("format-specific") or {}
    data = specific.get("data") if isinstance(specific, dict) else None
    if isinstance(data, dict) and data.get("data-file"):
        # The guest would read and write whatever host file the image names.
        raise ImageError(f"{origin}: refusing a qcow2 image with an external data file ({data['data-file']})")
    if info.get("encrypted") or (isinstance(data, dict) and data.get("encrypt")):
        raise ImageError(f"{origin}: refusing an encrypted image (qinst boots images without a key)")
    if expected and fmt != expected:
        raise ImageError(f"{origin}: expected a {expected} image, qemu-img says {fmt}")
    return fmt, valid_virtual_size(info.get("virtual-size"))


class Cache:
    """Complete, verified images named by their digest, each with a small JSON record beside it."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "images"

    def path(self, digest: Digest) -> Path:
        return self.dir / digest.filename

    def ensure(self) -> None:
        """Create the cache directory, private to the user (0700): images and partial downloads live there."""
        try:
            self.dir.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.dir.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise UsageError(
                f"cannot create the cache directory {self.dir}: {exc.strerror}", hint="pass a writable --cache-dir"
            ) from exc

    def get(self, digest: Digest) -> CachedImage | None:
        path = self.path(digest)
        try:
            st = path.lstat()
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None  # a symlink or anything else planted under an image's name is not an image
        try:
            raw = read_bounded(path.with_name(path.name + ".json"), "cache record", MAX_RECORD, follow=False)
            record = parse_json(raw, "cache record")
        except (OSError, QinstError):
            record = {}  # a missing, planted (link, FIFO) or corrupt record: the image is verified by its name
        if not isinstance(record, dict):
            record = {}  # a corrupt record ([] or a number) is ignored: the image itself is verified by its name

        def field(key: str, default: str | None) -> str | None:
            value = record.get(key)
            return value if isinstance(value, str) else default

        return CachedImage(
            name=printable(field("name", None) or "")[:64] or digest.filename[:19],
            digest=digest,
            path=path,
            size=st.st_size,
            source=printable(field("source", "unknown") or "unknown"),
            format=printable(field("format", "unknown") or "unknown"),
            url=field("url", None),
            aleph_item_hash=field("aleph_item_hash", None),
            virtual_size=valid_virtual_size(record.get("virtual_size")),
        )

    def entries(self) -> list[CachedImage]:
        if not self.dir.is_dir():
            return []
        found = (self.get(d) for p in self.dir.iterdir() if (d := Digest.from_filename(p.name)) is not None)
        return sorted((c for c in found if c), key=lambda c: c.name)

    @contextmanager
    def lock(self, digest: Digest) -> Iterator[None]:
        """Hold the per-image lock: concurrent pulls of one image wait here and then find it cached."""
        self.ensure()
        with locked(self.dir / f".{digest.filename}.lock", error=ImageError):
            yield

    def record(self, image: CachedImage) -> None:
        data: dict[str, str | int | None] = {
            "name": image.name,
            "source": image.source,
            "format": image.format,
            "url": image.url,
        }
        if image.aleph_item_hash:
            data["aleph_item_hash"] = image.aleph_item_hash
        if image.virtual_size:
            data["virtual_size"] = image.virtual_size
        write_atomically(
            image.path.with_name(image.path.name + ".json"), json.dumps(data, indent=1).encode(), mode=0o600
        )

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
            if p.is_symlink():
                stale.append(p)  # qinst makes no links: a planted or dangling one goes (the link, not its target)
                continue
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
    """Whether a process holds an flock on path (a missing file, or a link or FIFO planted there, is not locked)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
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
    size: int | None = None  # the expected size, when the catalog gives it: a longer body stops at once
    fallbacks: tuple[str, ...] = ()  # tried in order when a server answers 404/410/413 (aleph: the IPFS gateway;
    # a mirrored pin: its upstream URL)
    aleph_item_hash: str | None = None


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

    def resolve(
        self, text: str, *, sha256: str | None = None, sha512: str | None = None, arch: Arch | None = None
    ) -> ImageRef:
        firmware = self.catalog.firmware.get(text)
        if firmware is not None and not (sha256 or sha512):  # a catalog firmware: its aleph message, or its URL
            if firmware.aleph_item_hash:
                return parse_image_ref(f"aleph:{firmware.aleph_item_hash}", self.catalog)
            assert firmware.url is not None
            return parse_image_ref(firmware.url, self.catalog, sha256=firmware.digest.hex)
        return parse_image_ref(text, self.catalog, sha256=sha256, sha512=sha512, arch=arch)

    def cached(self, ref: ImageRef) -> CachedImage | None:
        """The cached file for ref's pinned digest, if any (no network)."""
        digest = ref.digest or (ref.entry.digest if ref.entry else None)
        return self.cache.get(digest) if digest else None

    def virtual_size(self, image: CachedImage) -> int:
        """The guest disk size the cached image gives: from its record (written when it was cached), else from
        qemu-img, then recorded so that the next `up` spawns no qemu-img."""
        if image.virtual_size:
            return image.virtual_size
        virtual = valid_virtual_size(qemu_img_info(image.path).get("virtual-size")) or 0
        if virtual:
            with contextlib.suppress(OSError), self.cache.lock(image.digest):
                self.cache.record(replace(image, virtual_size=virtual))
        return virtual

    def cached_aleph(self, item_hash: str) -> CachedImage | None:
        """A cached file pulled through aleph message item_hash (its own pin, not the upstream digest)."""
        return next((c for c in self.cache.entries() if c.aleph_item_hash == item_hash), None)

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
        if latest and source is Source.UPSTREAM and ref.kind is RefKind.CATALOG:
            return self._fetch_latest(ref, progress)
        plan = self._plan(ref, source, latest)
        firmware = self.catalog.firmware_for_aleph(plan.aleph_item_hash) if plan.aleph_item_hash else None
        if firmware is not None:
            return self._fetch_firmware(plan, firmware, progress)
        try:
            return self._fetch(plan, progress)
        except DownloadError as exc:
            entry = ref.entry
            if exc.status not in GONE or plan.source != "upstream" or entry is None:
                raise
            # The pin wins, always: a pinned build that is gone is an error, never a reason to take whatever a
            # checksum file (a mirror's, or an old signed one) says. --latest is the user's choice to make.
            raise ImageError(
                f"the pinned build of {entry.name} is gone: {exc.message}",
                hint=f"'qinst pull --latest {entry.name}' takes the newest build, verified against its "
                "checksum file; or pin another build in a catalog (--catalog)"
                if entry.latest_url and entry.checksums_url
                else "pin another build in a catalog (--catalog), or pull a local image file",
            ) from exc

    def _fetch_firmware(self, plan: _Plan, firmware: FirmwareEntry, progress: Progress | None) -> CachedImage:
        """A catalog firmware pulled through its aleph message: the message verified, the bytes verified against
        it, and then against the published validation hash (the file's sha256), which must agree with both."""
        where = f"firmware {firmware.name} (aleph message {plan.aleph_item_hash})"
        if plan.digest.algorithm is Algorithm.SHA256 and plan.digest != firmware.digest:
            raise ImageError(
                f"{where} names the file sha256:{plan.digest.hex}, not the published validation hash {firmware.digest}",
                hint="nothing was downloaded; the aleph message and the catalog disagree",
            )
        image = self._fetch(replace(plan, name=firmware.name), progress)
        if plan.digest.algorithm is not Algorithm.SHA256:  # an IPFS item: its CID verified it, now its sha256
            actual = hash_file(image.path, Algorithm.SHA256)
            if actual != firmware.digest:
                with self.cache.lock(image.digest):
                    self.cache.remove(image.digest)
                raise ImageError(
                    f"{where}: the file's sha256 is {actual}, not the published validation hash {firmware.digest}",
                    hint="nothing was kept in the cache",
                )
        return image

    def _fetch_latest(self, ref: ImageRef, progress: Progress | None) -> CachedImage:
        """The latest build. Its directory is a moving link upstream: when a new build lands during the download,
        the bytes match neither digest; re-read the checksum file once and fetch the new build if it changed."""
        plan = self._plan(ref, Source.UPSTREAM, latest=True)
        try:
            return self._fetch(plan, progress)
        except DigestMismatch:
            again = self._plan(ref, Source.UPSTREAM, latest=True)
            if again.digest == plan.digest:
                raise
            log.warning("a new build of %s was published during the download; fetching it", plan.name)
            return self._fetch(again, progress)

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
            from qemu_instances import aleph

            found = aleph.resolve(
                item,
                api=self.settings.aleph_api,
                gateway=self.settings.ipfs_gateway,
                session=self._session,
                policy=self.policy,
            )
            fmt = entry.format if entry else None
            return _Plan(
                ref.name,
                found.url,
                found.digest,
                found.source,
                fmt,
                fallbacks=found.urls[1:],
                aleph_item_hash=found.item_hash,
            )
        assert entry is not None
        if latest:
            if not (entry.latest_url and entry.checksums_url):
                raise ImageError(f"image {entry.name} has no latest channel (latest_url and checksums_url)")
            url = mirror_url(entry.latest_url, self.settings.mirror)
            return _Plan(entry.name, url, self._latest_digest(entry), "upstream-latest", entry.format)
        if not (entry.url and entry.digest):
            raise ImageError(f"image {entry.name} has no upstream url", hint="use --source aleph")
        url = mirror_url(entry.url, self.settings.mirror)
        # A pin the mirror does not have may come from upstream: the same pin verifies it.
        upstream = (entry.url,) if url != entry.url else ()
        return _Plan(entry.name, url, entry.digest, "upstream", entry.format, entry.size, fallbacks=upstream)

    def _checksums_url(self, entry: CatalogEntry) -> str:
        """Where the checksum file is read: through the mirror only when its signature is checked, else upstream."""
        assert entry.checksums_url
        return mirror_url(entry.checksums_url, self.settings.mirror) if entry.signed else entry.checksums_url

    def _checksums(self, entry: CatalogEntry) -> str:
        """The latest channel's checksum file, trusted: signed by the entry's keyring and not older than one already
        accepted (freshness.py), or unsigned and read over its own upstream host only (redirects included)."""
        assert entry.checksums_url
        from qemu_instances.download import Redirects, fetch_bytes

        url = self._checksums_url(entry)
        rule = Redirects.HTTPS if entry.signed else Redirects.SAME_HOST
        try:
            data = fetch_bytes(url, session=self._session, policy=self.policy, redirects=rule)
        except DownloadError as exc:
            if entry.signed or not self.settings.mirror:
                raise
            host = urlsplit(url).hostname
            raise DownloadError(
                f"{exc} (an unsigned checksum file is read only from its upstream host {host}, never through a mirror)",
                hint="pull without --mirror when the upstream host is reachable, or pull a local image file",
                status=exc.status,
            ) from exc
        if entry.signed:
            from qemu_instances.signatures import keyring_path, verify_detached

            assert entry.checksums_signature_url and entry.signing_keys
            sig_url = mirror_url(entry.checksums_signature_url, self.settings.mirror)
            try:
                signature = fetch_bytes(
                    sig_url, session=self._session, policy=self.policy, limit=1 << 20, redirects=Redirects.HTTPS
                )
            except DownloadError as exc:
                raise ImageError(f"cannot fetch the signature of {url}: {exc}", hint=exc.hint) from exc
            signer = verify_detached(data, signature, keyring_path(entry.signing_keys), what=url)
            log.debug("%s: good signature by %s made at %s", url, signer.fingerprint, signer.created)
            from qemu_instances import freshness

            # Keyed by the catalog's own URL: the same channel whichever mirror served it.
            freshness.accept(self.settings.cache_dir, entry.checksums_url, signer.created, signer.fingerprint)
        return data.decode("utf-8", "replace")

    def _latest_digest(self, entry: CatalogEntry) -> Digest:
        assert entry.latest_url and entry.checksums_url
        url = self._checksums_url(entry)
        algorithm = algorithm_for_checksums(url)
        text = self._checksums(entry)
        filename = urlsplit(entry.latest_url).path.rsplit("/", 1)[-1]
        sums = parse_checksums(text, algorithm)
        if filename not in sums:
            raise ImageError(f"{url} lists no {algorithm} digest for {filename}")
        return sums[filename]

    def _fetch(self, plan: _Plan, progress: Progress | None) -> CachedImage:
        with self.cache.lock(plan.digest):
            found = self.cache.get(plan.digest)
            if found:
                return found
            dest = self.cache.path(plan.digest)
            fmt, virtual = "unknown", None

            def check(path: Path) -> None:
                # Before the file takes its name: the cache holds only images qinst can use.
                nonlocal fmt, virtual
                fmt, virtual = inspect_image(path, plan.format, plan.url)

            url, size = self._download(plan, dest, progress, check)
            image = CachedImage(
                plan.name, plan.digest, dest, size, plan.source, fmt, url, plan.aleph_item_hash, virtual_size=virtual
            )
            self.cache.record(image)
            return image

    def _download(
        self, plan: _Plan, dest: Path, progress: Progress | None, check: Callable[[Path], None]
    ) -> tuple[str, int]:
        """Download plan's file from its URL, or from its fallbacks in turn on 404/410/413; return (url, size).
        Every URL is verified against the same pin."""
        from qemu_instances.download import download_verified

        urls = (plan.url, *plan.fallbacks)
        refused: list[DownloadError] = []  # what each earlier URL answered (404/410/413)
        for i, url in enumerate(urls):
            try:
                size = download_verified(
                    url,
                    dest,
                    plan.digest,
                    session=self._session,
                    progress=progress,
                    policy=self.policy,
                    check=check,
                    size=plan.size,
                )
                return url, size
            except DigestMismatch as exc:
                if plan.digest.algorithm is not Algorithm.CID:
                    raise
                actual = exc.actual.removeprefix("cid:")
                raise ImageError(
                    f"CID mismatch for {url}: expected {plan.digest.hex}, the bytes received give {actual}",
                    hint="nothing was cached: the server sent other bytes, or the file was not imported with Kubo's "
                    "defaults (256 KiB chunks, balanced layout, 174 links), the only import qinst can recompute",
                ) from exc
            except DownloadError as exc:
                if exc.status in (*GONE, 413) and i < len(urls) - 1:
                    refused.append(exc)
                    log.info("%s answered HTTP %s; trying %s", url, exc.status, urls[i + 1])
                    continue
                if not refused:
                    raise
                # Say what every URL answered (a mirror's 404, then upstream's 404 or no network), not only the last.
                gone = exc.status in GONE and all(e.status in GONE for e in refused)
                earlier = "; ".join(e.message for e in refused)
                hint = (
                    "the mirror does not hold the pinned file: add it there, or pull with --latest"
                    if plan.fallbacks and plan.source == "upstream"
                    else exc.hint
                )
                raise DownloadError(
                    f"{earlier}; then {exc.message}", hint=hint, status=exc.status if gone else None
                ) from exc
        raise AssertionError("no URL to download from")

    def _import_file(self, path: Path) -> CachedImage:
        """A local image, identified by its own sha256, copied into the cache (hashing while copying)."""
        import tempfile  # here: `images` and a cached `up` make no temporary file

        check_format(path, None, str(path))  # refuse early, before copying gigabytes
        self.cache.ensure()
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
                fmt, virtual = inspect_image(tmp, None, str(path))  # the copy is what the cache will hold
                with self.cache.lock(digest):
                    found = self.cache.get(digest)
                    if found:
                        return found
                    replace_durably(tmp, self.cache.path(digest))
                    image = CachedImage(
                        path.stem, digest, self.cache.path(digest), size, "local", fmt, virtual_size=virtual
                    )
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
            try:
                st = tmp.lstat()
                if stat.S_ISDIR(st.st_mode):
                    shutil.rmtree(tmp)
                else:
                    tmp.unlink(missing_ok=True)  # a symlink is removed itself, never followed
            except FileNotFoundError:
                continue  # gone meanwhile
            except OSError as exc:
                log.warning("cannot remove %s: %s", tmp, exc.strerror)
                continue
            removed.append((tmp, st.st_size if stat.S_ISREG(st.st_mode) else 0))
        return removed
