"""images.py: IMAGE references (catalog name or alias, aleph:<hash>, local path, or URL with --sha256/--sha512),
and the image store through the library: pulls with a fast retry policy against a real HTTP server on 127.0.0.1,
local files, the latest channel, and prune of the cache and its temporaries."""

from __future__ import annotations

import fcntl
import hashlib
import random
import socket
from pathlib import Path

import pytest
from conftest import FAST, FAST_TWO_TRIES, cache_files, store_for
from mirror import DEBIAN_HOST, DEBIAN_LATEST, DEBIAN_PINNED, DEBIAN_SUMS, Image, Mirror, describe

from qemu_instances.catalog import Catalog
from qemu_instances.digests import Algorithm, Digest
from qemu_instances.download import RetryPolicy
from qemu_instances.errors import CatalogError, DigestMismatch, DownloadError, ImageError, UsageError
from qemu_instances.images import ImageStore, RefKind, Source, mirror_url, parse_image_ref
from qemu_instances.settings import Settings

SHA256 = "ab" * 32
SHA512 = "cd" * 64
ITEM = "b6ff5c3a8205d1ca4c7c3369300eeafff498b558f71b851aa2114afd0a532717"


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog.load()


@pytest.mark.parametrize(
    ("text", "name"), [("debian-12", "debian-12"), ("bookworm", "debian-12"), ("jammy", "ubuntu-22.04")]
)
def test_catalog_name_or_alias(catalog: Catalog, text: str, name: str) -> None:
    ref = parse_image_ref(text, catalog)
    assert ref.kind is RefKind.CATALOG
    assert ref.entry is not None and ref.entry.name == name
    assert ref.name == name
    assert ref.url is None and ref.digest is None  # the entry carries them


def test_unknown_catalog_name(catalog: Catalog) -> None:
    with pytest.raises(CatalogError, match="unknown image 'debain-12'") as info:
        parse_image_ref("debain-12", catalog)
    assert info.value.exit_code == 3
    assert "debian-12" in (info.value.hint or "")


def test_aleph_item(catalog: Catalog) -> None:
    ref = parse_image_ref(f"aleph:{ITEM.upper()}", catalog)
    assert ref.kind is RefKind.ALEPH
    assert ref.aleph_hash == ITEM
    assert ref.entry is None
    assert ref.name == f"aleph-{ITEM[:8]}"


@pytest.mark.parametrize("text", ["aleph:", "aleph:1234", f"aleph:{'x' * 64}", f"aleph:{ITEM}0"])
def test_bad_aleph_item_is_a_usage_error(catalog: Catalog, text: str) -> None:
    with pytest.raises(UsageError, match="invalid aleph item hash") as info:
        parse_image_ref(text, catalog)
    assert info.value.exit_code == 2


@pytest.mark.parametrize("text", ["./disk.qcow2", "disk.qcow2", "sub/disk.raw", "disk.img"])
def test_local_path(catalog: Catalog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / text).write_bytes(b"\0" * 512)
    ref = parse_image_ref(text, catalog)
    assert ref.kind is RefKind.FILE
    assert ref.path == (tmp_path / text).resolve()
    assert ref.path.is_absolute()
    assert ref.name == "disk"


def test_absolute_and_home_paths(catalog: Catalog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = tmp_path / "x.qcow2"
    image.write_bytes(b"\0")
    assert parse_image_ref(str(image), catalog).path == image
    monkeypatch.setenv("HOME", str(tmp_path))
    assert parse_image_ref("~/x.qcow2", catalog).path == image


@pytest.mark.parametrize("text", ["./missing.qcow2", "/nonexistent/disk.img", "missing.raw"])
def test_missing_local_file_is_an_image_error(
    catalog: Catalog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ImageError, match="no such image file") as info:
        parse_image_ref(text, catalog)
    assert info.value.exit_code == 3


def test_a_directory_is_not_an_image(catalog: Catalog, tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no such image file"):
        parse_image_ref(str(tmp_path), catalog)


@pytest.mark.parametrize(
    ("kwargs", "digest"),
    [
        ({"sha256": SHA256}, Digest(Algorithm.SHA256, SHA256)),
        ({"sha512": SHA512.upper()}, Digest(Algorithm.SHA512, SHA512)),
    ],
)
def test_url_with_digest(catalog: Catalog, kwargs: dict[str, str], digest: Digest) -> None:
    url = "https://example.org/images/fedora-40.qcow2?token=1"
    ref = parse_image_ref(url, catalog, **kwargs)
    assert ref.kind is RefKind.URL
    assert ref.url == url
    assert ref.digest == digest
    assert ref.name == "fedora-40"


def test_url_without_digest_is_refused(catalog: Catalog) -> None:
    with pytest.raises(UsageError, match="without a digest") as info:
        parse_image_ref("http://example.org/x.qcow2", catalog)
    assert info.value.exit_code == 2
    assert "--sha256" in (info.value.hint or "")


def test_both_digests_are_refused(catalog: Catalog) -> None:
    with pytest.raises(UsageError, match="not both"):
        parse_image_ref("https://example.org/x.qcow2", catalog, sha256=SHA256, sha512=SHA512)


@pytest.mark.parametrize("kwargs", [{"sha256": SHA512}, {"sha512": SHA256}, {"sha256": "g" * 64}])
def test_malformed_digest_is_a_usage_error(catalog: Catalog, kwargs: dict[str, str]) -> None:
    with pytest.raises(UsageError, match="hex digits"):
        parse_image_ref("https://example.org/x.qcow2", catalog, **kwargs)


def test_digest_applies_only_to_urls(catalog: Catalog) -> None:
    with pytest.raises(UsageError, match="only to an http"):
        parse_image_ref("debian-12", catalog, sha256=SHA256)


@pytest.mark.parametrize(
    ("url", "mirror", "expected"),
    [
        ("https://cloud.debian.org/images/cloud/x.qcow2", None, "https://cloud.debian.org/images/cloud/x.qcow2"),
        (
            "https://cloud.debian.org/images/cloud/x.qcow2",
            "http://127.0.0.1:8000",
            "http://127.0.0.1:8000/images/cloud/x.qcow2",
        ),
        ("https://cloud.debian.org/images/x.qcow2", "http://m.lan/debian/", "http://m.lan/debian/images/x.qcow2"),
        ("https://h.example:8443/a/b?c=d", "https://m.lan", "https://m.lan/a/b?c=d"),
    ],
)
def test_mirror_url(url: str, mirror: str | None, expected: str) -> None:
    assert mirror_url(url, mirror) == expected


# -- the image store: pulls, retries, resumes, local files, prune ------------------------------------------------------


def upstream_store(upstream: Path, cache: Path, policy: RetryPolicy = FAST) -> ImageStore:
    """A store whose catalog's upstream hosts are the local server (no mirror)."""
    return ImageStore(Settings(cache_dir=cache, catalogs=(upstream,)), policy=policy)


@pytest.mark.http
@pytest.mark.parametrize("status", [500, 502, 504, 429])
def test_transient_statuses_are_retried(mirror: Mirror, tmp_path: Path, status: int) -> None:
    mirror.server.fault(DEBIAN_PINNED, fail_times=3, fail_status=status)
    store = store_for(mirror, tmp_path / "cache")
    image = store.pull(store.resolve("debian-12"))
    assert image.path.read_bytes() == mirror.images.pinned.data
    assert len(mirror.server.hits(DEBIAN_PINNED)) == 4


@pytest.mark.http
def test_persistent_server_errors_give_up(mirror: Mirror, tmp_path: Path) -> None:
    mirror.server.fault(DEBIAN_PINNED, fail_times=100, fail_status=503)
    store = store_for(mirror, tmp_path / "cache", RetryPolicy(attempts=3, backoff=0.01))
    with pytest.raises(DownloadError, match="gave up after 3 attempts") as info:
        store.pull(store.resolve("debian-12"))
    assert "HTTP 503" in str(info.value)
    assert len(mirror.server.hits(DEBIAN_PINNED)) == 3
    assert cache_files(tmp_path / "cache") == []


@pytest.mark.http
def test_client_errors_are_not_retried(mirror: Mirror, tmp_path: Path) -> None:
    mirror.server.fault(DEBIAN_PINNED, fail_times=1, fail_status=403)
    store = store_for(mirror, tmp_path / "cache")
    with pytest.raises(DownloadError, match="HTTP 403") as info:
        store.pull(store.resolve("debian-12"))
    assert info.value.status == 403
    assert len(mirror.server.hits(DEBIAN_PINNED)) == 1
    assert not mirror.server.hits(DEBIAN_SUMS)  # no fallback for anything but "gone"


@pytest.mark.http
def test_repeated_cuts_keep_making_progress(mirror: Mirror, tmp_path: Path) -> None:
    # More cuts than RetryPolicy.attempts: each attempt moves forward, so the download does not give up.
    mirror.server.fault(DEBIAN_PINNED, cut_after=600_000, cut_times=4)
    store = store_for(mirror, tmp_path / "cache", RetryPolicy(attempts=2, backoff=0.01))
    image = store.pull(store.resolve("debian-12"))
    assert image.path.read_bytes() == mirror.images.pinned.data
    ranges = [h.range for h in mirror.server.hits(DEBIAN_PINNED)]
    assert ranges == [None, "bytes=600000-", "bytes=1200000-", "bytes=1800000-", "bytes=2400000-"]


@pytest.mark.http
def test_partial_longer_than_the_file_restarts(mirror: Mirror, tmp_path: Path) -> None:
    image = mirror.images.pinned
    images = tmp_path / "cache" / "images"
    images.mkdir(parents=True)
    (images / f".{image.sha512.replace(':', '-')}.part").write_bytes(image.data + b"junk")
    store = store_for(mirror, tmp_path / "cache")
    pulled = store.pull(store.resolve("debian-12"))
    assert pulled.path.read_bytes() == image.data
    hits = mirror.server.hits(DEBIAN_PINNED)
    assert [(h.range, h.status) for h in hits] == [(f"bytes={image.size + 4}-", 416), (None, 200)]


@pytest.mark.http
def test_complete_partial_is_verified_without_downloading(mirror: Mirror, tmp_path: Path) -> None:
    # A pull that died between the last byte and the rename.
    image = mirror.images.pinned
    images = tmp_path / "cache" / "images"
    images.mkdir(parents=True)
    (images / f".{image.sha512.replace(':', '-')}.part").write_bytes(image.data)
    store = store_for(mirror, tmp_path / "cache")
    pulled = store.pull(store.resolve("debian-12"))
    assert pulled.path.read_bytes() == image.data
    assert [(h.status, h.sent) for h in mirror.server.hits(DEBIAN_PINNED)] == [(416, 0)]


@pytest.mark.http
def test_connection_refused_is_retried_then_reported(tmp_path: Path) -> None:
    # A port this test holds bound but not listening: every attempt is refused at once.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}/x.qcow2"
        store = ImageStore(Settings(cache_dir=tmp_path), policy=FAST)
        with pytest.raises(DownloadError) as info:
            store.pull(store.resolve(url, sha256="a" * 64))
    assert str(info.value).startswith(f"cannot download {url}: ")
    assert "gave up after 5 attempts" in str(info.value)
    assert info.value.exit_code == 3


@pytest.mark.http
def test_raw_image_from_catalog(mirror: Mirror, tmp_path: Path) -> None:
    raw = random.Random(6).randbytes(2 << 20)
    mirror.server.add("/images/raw-disk.img", raw)
    catalog = tmp_path / "raw.toml"
    catalog.write_text(
        f'[images.rawdisk]\nformat = "raw"\nurl = "{DEBIAN_HOST}/images/raw-disk.img"\n'
        f'digest = "sha256:{hashlib.sha256(raw).hexdigest()}"\n'
    )
    settings = Settings(cache_dir=tmp_path / "cache", catalogs=(catalog,), mirror=mirror.url)
    store = ImageStore(settings, policy=FAST)
    image = store.pull(store.resolve("rawdisk"))
    assert (image.format, image.size, image.source) == ("raw", len(raw), "upstream")
    assert store.cache.get(image.digest) == image  # the record beside the file says the same


@pytest.mark.http
def test_prune_removes_images_and_stale_partials(mirror: Mirror, upstream: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    store = store_for(mirror, cache)
    direct = upstream_store(upstream, cache)
    kept = direct.pull(direct.resolve("debian-12"), latest=True)
    gone = store.pull(store.resolve("debian-12"))
    stale = cache / "images" / f".sha256-{'1' * 64}.part"
    stale.write_bytes(b"x" * 1000)
    orphan = cache / "images" / f"sha256-{'2' * 64}.json"
    orphan.write_text("{}")
    removed = store.prune({str(kept.digest)})
    assert sorted(removed) == sorted([(gone.path, gone.size), (stale, 1000), (orphan, 2)])
    assert cache_files(cache) == [kept.path.name, f"{kept.path.name}.json"]
    assert store.prune({str(kept.digest)}) == []
    assert [p for p, _ in store.prune(set())] == [kept.path]
    assert cache_files(cache) == []


def test_prune_spares_files_of_pulls_in_progress(tmp_path: Path) -> None:
    store = ImageStore(Settings(cache_dir=tmp_path))
    digest = Digest.parse(f"sha256:{'3' * 64}")
    importing = tmp_path / "images" / ".import-abc123.tmp"
    with store.cache.lock(digest):
        partial = store.cache.dir / f".{digest.filename}.part"
        partial.write_bytes(b"in progress")
        with importing.open("wb") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # as an import of a local file holds its temporary copy
            f.write(b"copying")
            f.flush()
            assert store.prune(set()) == []
        assert partial.exists()
    assert sorted(store.prune(set())) == sorted([(partial, 11), (importing, 7)])


def test_prune_empty_or_missing_cache(tmp_path: Path) -> None:
    assert ImageStore(Settings(cache_dir=tmp_path / "none")).prune(set()) == []


def test_pull_local_file_twice_keeps_one_copy(local_qcow2: Image, tmp_path: Path) -> None:
    store = ImageStore(Settings(cache_dir=tmp_path))
    first = store.pull(store.resolve(str(local_qcow2.file)))
    second = store.pull(store.resolve(str(local_qcow2.file)))
    assert first == second
    assert first.format == "qcow2"
    assert len(cache_files(tmp_path)) == 2  # the image and its record, no temporary left


def test_local_raw_file_is_described_by_its_digest(tmp_path: Path) -> None:
    raw = tmp_path / "blob.raw"
    raw.write_bytes(random.Random(4).randbytes(100_000))
    store = ImageStore(Settings(cache_dir=tmp_path / "cache"))
    image = store.pull(store.resolve(str(raw)))
    assert (image.format, image.digest) == ("raw", Digest.parse(describe(raw).sha256))


@pytest.mark.parametrize("option", [{"latest": True}, {"source": Source.ALEPH}])
def test_local_file_refuses_latest_and_aleph(local_qcow2: Image, tmp_path: Path, option: dict[str, object]) -> None:
    store = ImageStore(Settings(cache_dir=tmp_path))
    with pytest.raises(UsageError):
        store.pull(store.resolve(str(local_qcow2.file)), **option)


# -- a planted partial file --------------------------------------------------------------------------------------------


@pytest.mark.http
def test_a_planted_partial_symlink_is_not_followed(mirror: Mirror, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    store = ImageStore(Settings(cache_dir=cache, catalogs=(mirror.catalog,), mirror=mirror.url), policy=FAST_TWO_TRIES)
    digest = Digest.parse(mirror.images.pinned.sha512)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    store.cache.ensure()
    part = store.cache.dir / f".{digest.filename}.part"
    part.symlink_to(victim)
    with pytest.raises(DownloadError, match=r"^refusing to write .*: it is a symbolic link, not qinst's") as info:
        store.pull(store.resolve("debian-12"))
    assert info.value.exit_code == 3
    assert victim.read_bytes() == b"precious\n"
    assert not mirror.server.hits(DEBIAN_PINNED)  # refused before any byte was fetched
    assert not store.cache.get(digest)


# -- the latest channel moving under a download ------------------------------------------------------------------------


@pytest.mark.http
def test_a_new_latest_build_landing_mid_download_is_fetched(mirror: Mirror, upstream: Path, tmp_path: Path) -> None:
    # The latest directory is a moving link: the checksum file and image change while qinst downloads.
    old, new = mirror.images.latest, mirror.images.pinned
    store = ImageStore(Settings(cache_dir=tmp_path / "cache", catalogs=(upstream,)), policy=FAST)
    moved = []

    def progress(done: int, total: int | None) -> None:
        if not moved:
            moved.append(done)
            mirror.server.add(DEBIAN_SUMS, f"{new.sha512_hex}  debian-12-genericcloud-amd64.qcow2\n".encode())
            mirror.server.add(DEBIAN_LATEST, new.data)

    # The connection drops after 1 MB of the old build; the resumed request gets the rest of the new one.
    mirror.server.fault(DEBIAN_LATEST, cut_after=1_000_000)
    image = store.pull(store.resolve("debian-12"), latest=True, progress=progress)
    assert moved and image.path.read_bytes() == new.data
    assert str(image.digest) == new.sha512
    assert len(mirror.server.hits(DEBIAN_SUMS)) == 2
    assert [h.range for h in mirror.server.hits(DEBIAN_LATEST)] == [None, "bytes=1000000-", None]
    assert old.sha512 != new.sha512


@pytest.mark.http
def test_a_latest_mismatch_that_is_not_a_new_build_still_fails(mirror: Mirror, upstream: Path, tmp_path: Path) -> None:
    mirror.server.add(DEBIAN_LATEST, mirror.images.pinned.data)
    store = ImageStore(Settings(cache_dir=tmp_path / "cache", catalogs=(upstream,)), policy=FAST)
    with pytest.raises(DigestMismatch):
        store.pull(store.resolve("debian-12"), latest=True)
    assert cache_files(tmp_path / "cache") == []


# -- prune and the cache's temporaries ---------------------------------------------------------------------------------


DIGEST = Digest.parse(f"sha256:{'5' * 64}")


@pytest.mark.promise
def test_a_record_being_written_under_the_image_lock_is_spared(tmp_path: Path) -> None:
    store = ImageStore(Settings(cache_dir=tmp_path))
    store.cache.dir.mkdir(parents=True)
    record_tmp = store.cache.dir / f".{DIGEST.filename}.json.tmp"  # as Cache.record writes it
    record_tmp.write_text("{}")
    with store.cache.lock(DIGEST):
        assert store.prune(set()) == []
    assert store.prune(set()) == [(record_tmp, 2)]


@pytest.mark.promise
def test_hidden_json_files_and_directories_are_temporaries(tmp_path: Path) -> None:
    store = ImageStore(Settings(cache_dir=tmp_path))
    store.cache.dir.mkdir(parents=True)
    hidden = store.cache.dir / f".{DIGEST.filename}.json"
    hidden.write_text("{}")
    left = store.cache.dir / ".import-abc.tmp"
    left.mkdir()
    (left / "part").write_bytes(b"x")
    removed = {p for p, _ in store.prune(set())}
    assert removed == {hidden, left}
    assert not hidden.exists() and not left.exists()


@pytest.mark.promise
def test_an_import_holding_its_own_temporary_is_spared(tmp_path: Path) -> None:
    store = ImageStore(Settings(cache_dir=tmp_path))
    store.cache.dir.mkdir(parents=True)
    tmp = store.cache.dir / ".import-xyz.tmp"
    with tmp.open("wb") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        assert store.prune(set()) == []
    assert [p for p, _ in store.prune(set())] == [tmp]


@pytest.mark.promise
def test_planted_links_are_removed_not_followed_and_count_no_bytes(tmp_path: Path) -> None:
    store = ImageStore(Settings(cache_dir=tmp_path / "cache"))
    store.cache.dir.mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious" * 100)
    links = [store.cache.dir / name for name in (".a.part", "b.qcow2", ".c.json", "dangling")]
    for link in links[:3]:
        link.symlink_to(victim)
    links[3].symlink_to(tmp_path / "nowhere")
    emptied = store.cache.dir / ".d.tmp"  # a directory temporary: its size is not a file's
    emptied.mkdir()
    removed = dict(store.prune(set()))
    assert removed == {**dict.fromkeys(links, 0), emptied: 0}
    assert victim.read_bytes() == b"precious" * 100
    assert list(store.cache.dir.iterdir()) == []


@pytest.mark.promise
def test_prune_goes_on_past_temporaries_it_cannot_remove(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stale temporary removed meanwhile (by another prune), or one that cannot be removed, does not stop prune
    from removing the others."""
    store = ImageStore(Settings(connect="test:///default", cache_dir=tmp_path / "cache"))
    store.cache.dir.mkdir(parents=True, exist_ok=True)
    real = store.cache.dir / ".partial-of-a-dead-pull"
    real.write_bytes(b"x" * 100)
    gone = store.cache.dir / ".removed-by-another-prune"
    unremovable = store.cache.dir / ("." + "n" * 300)  # lstat() fails (name too long): an OSError, not "gone"
    monkeypatch.setattr(store.cache, "stale_temporaries", lambda: [gone, unremovable, real])
    assert store.prune(set()) == [(real, 100)]
    assert not real.exists()
