"""Pulling images into the cache, against a real HTTP server on 127.0.0.1 that mirrors the upstream paths.

The user-visible cases go through the real `qinst` entry point; the fault-injection details that need many retries
call the library with a fast retry policy, so that no test waits for the CLI's real backoff.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import os
import random
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import RunQinst, qinst_argv, qinst_env
from httpserver import HTTPServer
from mirror import (
    DEBIAN_HOST,
    DEBIAN_LATEST,
    DEBIAN_PINNED,
    DEBIAN_SUMS,
    UBUNTU_LATEST,
    UBUNTU_SUMS,
    Image,
    Mirror,
    describe,
    make_qcow2,
)

from qemu_instances.catalog import Catalog
from qemu_instances.digests import Digest
from qemu_instances.download import RetryPolicy, download_verified, new_session
from qemu_instances.errors import DownloadError, UsageError
from qemu_instances.images import ImageStore, Source
from qemu_instances.settings import Settings

FAST = RetryPolicy(backoff=0.01, max_backoff=0.02, timeout=(5.0, 5.0))
http = pytest.mark.http


def store_for(mirror: Mirror, cache: Path, policy: RetryPolicy = FAST) -> ImageStore:
    settings = Settings(cache_dir=cache, catalogs=(mirror.catalog,), mirror=mirror.url, aleph_api=mirror.url)
    return ImageStore(settings, policy=policy)


def upstream_store(upstream: Path, cache: Path, policy: RetryPolicy = FAST) -> ImageStore:
    """A store whose catalog's upstream hosts are the local server (no mirror)."""
    return ImageStore(Settings(cache_dir=cache, catalogs=(upstream,)), policy=policy)


def upstream_args(upstream: Path, cache: Path) -> list[str]:
    return ["--catalog", str(upstream), "--cache-dir", str(cache)]


def cache_files(cache: Path) -> list[str]:
    """What the cache directory holds, lock files aside (they stay, empty, by design)."""
    images = cache / "images"
    return sorted(p.name for p in images.iterdir() if not p.name.endswith(".lock")) if images.is_dir() else []


def pull_json(qinst: RunQinst, mirror: Mirror, cache: Path, *args: str) -> dict[str, object]:
    proc = qinst(*mirror.args(cache), "pull", *args, "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert isinstance(data, dict)
    return data


def assert_cached(data: dict[str, object], image: Image, digest: str) -> None:
    assert data["digest"] == digest
    path = Path(str(data["path"]))
    assert path.name == digest.replace(":", "-")
    assert path.read_bytes() == image.data
    assert data["size"] == image.size


def assert_clean_error(proc: subprocess.CompletedProcess[str], code: int) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("qinst: ")
    return proc.stderr


@http
def test_pull_catalog_image(qinst: RunQinst, mirror: Mirror, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    data = pull_json(qinst, mirror, cache, "debian-12")
    assert set(data) == {"name", "digest", "path", "size", "source"}
    assert data["name"] == "debian-12"
    assert data["source"] == "upstream"
    assert_cached(data, mirror.images.pinned, mirror.images.pinned.sha512)
    name = mirror.images.pinned.sha512.replace(":", "-")
    assert cache_files(cache) == [name, f"{name}.json"]  # no partial or temporary file left behind
    assert len(mirror.server.hits(DEBIAN_PINNED)) == 1

    # Cached: the alias finds it without touching the network.
    again = pull_json(qinst, mirror, cache, "bookworm")
    assert again == data
    assert len(mirror.server.hits()) == 1


@http
def test_plain_output_names_digest_and_path(qinst: RunQinst, mirror: Mirror, tmp_path: Path) -> None:
    proc = qinst(*mirror.args(tmp_path / "cache"), "pull", "debian-12")
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.splitlines()
    assert first == f"debian-12  {mirror.images.pinned.sha512}"
    assert second.startswith(str(tmp_path / "cache" / "images" / mirror.images.pinned.sha512.replace(":", "-")))
    assert proc.stderr == ""  # no progress bar when stderr is not a terminal


@http
def test_digest_mismatch_caches_nothing(qinst: RunQinst, mirror: Mirror, tmp_path: Path) -> None:
    impostor = mirror.images.latest
    mirror.server.add(DEBIAN_PINNED, impostor.data)
    cache = tmp_path / "cache"
    stderr = assert_clean_error(qinst(*mirror.args(cache), "pull", "debian-12"), 3)
    assert "digest mismatch" in stderr
    assert f"{mirror.url}{DEBIAN_PINNED}" in stderr
    assert f"expected {mirror.images.pinned.sha512}" in stderr
    assert f"got {impostor.sha512}" in stderr
    assert cache_files(cache) == []  # neither the image nor its partial


@http
def test_mirror_cannot_substitute_a_pinned_file(qinst: RunQinst, mirror: Mirror, tmp_path: Path) -> None:
    # The built-in catalog (no --catalog): the mirror serves other bytes at the real pinned path.
    builtin = Catalog.load().lookup("debian-12")
    assert builtin.url == DEBIAN_HOST + DEBIAN_PINNED
    args = ["--mirror", mirror.url, "--cache-dir", str(tmp_path / "cache")]
    stderr = assert_clean_error(qinst(*args, "pull", "debian-12"), 3)
    assert f"expected {builtin.digest}" in stderr
    assert f"got {mirror.images.pinned.sha512}" in stderr
    assert mirror.server.hits(DEBIAN_PINNED)  # it really went to the mirror
    assert cache_files(tmp_path / "cache") == []


@http
def test_mirror_from_the_environment(qinst: RunQinst, mirror: Mirror, tmp_path: Path) -> None:
    env = {
        "QINST_MIRROR": mirror.url,
        "QINST_CACHE_DIR": str(tmp_path / "env-cache"),
        "QINST_CATALOG": f"{tmp_path / 'empty.toml'}{os.pathsep}{mirror.catalog}",
    }
    (tmp_path / "empty.toml").write_text("")
    proc = qinst("pull", "debian-12", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert_cached(json.loads(proc.stdout), mirror.images.pinned, mirror.images.pinned.sha512)
    assert str(tmp_path / "env-cache") in json.loads(proc.stdout)["path"]


@http
def test_url_not_found(qinst: RunQinst, mirror: Mirror, tmp_path: Path) -> None:
    url = f"{mirror.url}/images/nothing-here.qcow2"
    proc = qinst("--cache-dir", str(tmp_path / "cache"), "pull", url, "--sha256", "a" * 64)
    stderr = assert_clean_error(proc, 3)
    assert url in stderr
    assert "404" in stderr
    assert cache_files(tmp_path / "cache") == []


@http
def test_url_with_digest(qinst: RunQinst, mirror: Mirror, tmp_path: Path) -> None:
    url = f"{mirror.url}{UBUNTU_LATEST}"
    proc = qinst("--cache-dir", str(tmp_path), "pull", url, "--sha256", mirror.images.ubuntu.sha256_hex, "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["source"] == "url"
    assert data["name"] == "ubuntu-22.04-server-cloudimg-amd64"
    assert_cached(data, mirror.images.ubuntu, mirror.images.ubuntu.sha256)


@http
def test_connection_cut_then_resumed(qinst: RunQinst, mirror: Mirror, tmp_path: Path) -> None:
    cut = 1_500_000
    mirror.server.fault(DEBIAN_PINNED, cut_after=cut)
    data = pull_json(qinst, mirror, tmp_path / "cache", "debian-12")
    assert_cached(data, mirror.images.pinned, mirror.images.pinned.sha512)
    first, second = mirror.server.hits(DEBIAN_PINNED)
    assert (first.range, first.status, first.sent) == (None, 200, cut)
    # Every byte received before the cut was kept: the resume asks for exactly the rest.
    assert (second.range, second.status) == (f"bytes={cut}-", 206)
    assert second.sent == mirror.images.pinned.size - cut


@http
def test_range_ignored_restarts_cleanly(qinst: RunQinst, mirror: Mirror, tmp_path: Path) -> None:
    mirror.server.fault(DEBIAN_PINNED, cut_after=1_000_000, ignore_range=True)
    data = pull_json(qinst, mirror, tmp_path / "cache", "debian-12")
    assert_cached(data, mirror.images.pinned, mirror.images.pinned.sha512)
    first, second = mirror.server.hits(DEBIAN_PINNED)
    assert first.sent == 1_000_000
    assert second.range == "bytes=1000000-"
    assert (second.status, second.sent) == (200, mirror.images.pinned.size)  # whole file, from byte 0


@http
def test_server_errors_then_success(qinst: RunQinst, mirror: Mirror, tmp_path: Path) -> None:
    mirror.server.fault(DEBIAN_PINNED, fail_times=2, fail_status=503)
    data = pull_json(qinst, mirror, tmp_path / "cache", "debian-12")
    assert_cached(data, mirror.images.pinned, mirror.images.pinned.sha512)
    assert [h.status for h in mirror.server.hits(DEBIAN_PINNED)] == [503, 503, 200]


@http
@pytest.mark.parametrize("status", [500, 502, 504, 429])
def test_transient_statuses_are_retried(mirror: Mirror, tmp_path: Path, status: int) -> None:
    mirror.server.fault(DEBIAN_PINNED, fail_times=3, fail_status=status)
    store = store_for(mirror, tmp_path / "cache")
    image = store.pull(store.resolve("debian-12"))
    assert image.path.read_bytes() == mirror.images.pinned.data
    assert len(mirror.server.hits(DEBIAN_PINNED)) == 4


@http
def test_persistent_server_errors_give_up(mirror: Mirror, tmp_path: Path) -> None:
    mirror.server.fault(DEBIAN_PINNED, fail_times=100, fail_status=503)
    store = store_for(mirror, tmp_path / "cache", RetryPolicy(attempts=3, backoff=0.01))
    with pytest.raises(DownloadError, match="gave up after 3 attempts") as info:
        store.pull(store.resolve("debian-12"))
    assert "HTTP 503" in str(info.value)
    assert len(mirror.server.hits(DEBIAN_PINNED)) == 3
    assert cache_files(tmp_path / "cache") == []


@http
def test_client_errors_are_not_retried(mirror: Mirror, tmp_path: Path) -> None:
    mirror.server.fault(DEBIAN_PINNED, fail_times=1, fail_status=403)
    store = store_for(mirror, tmp_path / "cache")
    with pytest.raises(DownloadError, match="HTTP 403") as info:
        store.pull(store.resolve("debian-12"))
    assert info.value.status == 403
    assert len(mirror.server.hits(DEBIAN_PINNED)) == 1
    assert not mirror.server.hits(DEBIAN_SUMS)  # no fallback for anything but "gone"


@http
def test_repeated_cuts_keep_making_progress(mirror: Mirror, tmp_path: Path) -> None:
    # More cuts than RetryPolicy.attempts: each attempt moves forward, so the download does not give up.
    mirror.server.fault(DEBIAN_PINNED, cut_after=600_000, cut_times=4)
    store = store_for(mirror, tmp_path / "cache", RetryPolicy(attempts=2, backoff=0.01))
    image = store.pull(store.resolve("debian-12"))
    assert image.path.read_bytes() == mirror.images.pinned.data
    ranges = [h.range for h in mirror.server.hits(DEBIAN_PINNED)]
    assert ranges == [None, "bytes=600000-", "bytes=1200000-", "bytes=1800000-", "bytes=2400000-"]


@http
def test_interrupted_download_is_resumed_by_the_next_pull(qinst: RunQinst, mirror: Mirror, tmp_path: Path) -> None:
    image = mirror.images.pinned
    cache = tmp_path / "cache"
    mirror.server.fault(DEBIAN_PINNED, cut_after=2_000_000)
    store = store_for(mirror, cache, RetryPolicy(attempts=1))
    with pytest.raises(DownloadError, match="gave up after 1 attempts"):
        store.pull(store.resolve("debian-12"))
    name = image.sha512.replace(":", "-")
    assert cache_files(cache) == [f".{name}.part"]
    assert (cache / "images" / f".{name}.part").read_bytes() == image.data[:2_000_000]

    data = pull_json(qinst, mirror, cache, "debian-12")
    assert_cached(data, image, image.sha512)
    assert mirror.server.hits(DEBIAN_PINNED)[-1].range == "bytes=2000000-"
    assert cache_files(cache) == [name, f"{name}.json"]


@http
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


@http
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


@http
def test_range_answered_from_another_offset_is_not_appended(http_server: HTTPServer, tmp_path: Path) -> None:
    data = random.Random(7).randbytes(300_000)
    url = http_server.add("/blob", data)
    dest, part = tmp_path / "blob", tmp_path / ".blob.part"
    part.write_bytes(data[:1000])
    http_server.fault("/blob", wrong_range=True)
    digest = Digest.parse(f"sha256:{hashlib.sha256(data).hexdigest()}")
    assert download_verified(url, dest, digest, session=new_session(), policy=FAST) == len(data)
    assert dest.read_bytes() == data
    assert not part.exists()
    assert [(h.range, h.status) for h in http_server.hits("/blob")] == [("bytes=1000-", 206), (None, 200)]


@http
def test_downloads_ask_for_identity_encoding(http_server: HTTPServer, tmp_path: Path) -> None:
    data = b"x" * 5000
    url = http_server.add("/blob", data)
    digest = Digest.parse(f"sha256:{hashlib.sha256(data).hexdigest()}")
    download_verified(url, tmp_path / "blob", digest, session=new_session(), policy=FAST)
    (hit,) = http_server.hits("/blob")
    assert hit.headers["Accept-Encoding"] == "identity"


@http
@pytest.mark.parametrize("cut", [None, 100_000])
def test_content_encoding_is_decoded_before_hashing(http_server: HTTPServer, tmp_path: Path, cut: int | None) -> None:
    # A server that compresses anyway: the digest is the file's, so the bytes kept are the decoded ones. Random
    # data compresses to more bytes than it has, and a resume cannot use offsets into the compressed stream.
    data = random.Random(8).randbytes(300_000)
    url = http_server.add("/blob", gzip.compress(data), Content_Encoding="gzip")
    if cut:
        http_server.fault("/blob", cut_after=cut)
    digest = Digest.parse(f"sha256:{hashlib.sha256(data).hexdigest()}")
    assert download_verified(url, tmp_path / "blob", digest, session=new_session(), policy=FAST) == len(data)
    assert (tmp_path / "blob").read_bytes() == data
    statuses = [h.status for h in http_server.hits("/blob")]
    assert statuses == ([200] if cut is None else [200, 206, 200])


@http
def test_a_body_not_in_the_encoding_it_claims_is_an_error_saying_so(http_server: HTTPServer, tmp_path: Path) -> None:
    """Content-Encoding: gzip over bytes that are not gzip: a one-line error with urllib3's reason (not retried)."""
    data = random.Random(9).randbytes(10_000)
    url = http_server.add("/blob", data, Content_Encoding="gzip")
    digest = Digest.parse(f"sha256:{hashlib.sha256(data).hexdigest()}")
    with pytest.raises(DownloadError, match=f"^cannot download {re.escape(url)}: .*failed to decode it"):
        download_verified(url, tmp_path / "blob", digest, session=new_session(), policy=FAST)
    assert not (tmp_path / "blob").exists()


@http
@pytest.mark.parametrize(("name", "image_attr"), [("debian-12", "latest"), ("jammy", "ubuntu")])
def test_latest(qinst: RunQinst, mirror: Mirror, upstream: Path, tmp_path: Path, name: str, image_attr: str) -> None:
    image: Image = getattr(mirror.images, image_attr)
    digest = image.sha512 if name == "debian-12" else image.sha256  # SHA512SUMS vs SHA256SUMS
    proc = qinst(*upstream_args(upstream, tmp_path / "cache"), "pull", name, "--latest", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["source"] == "upstream-latest"
    assert_cached(data, image, digest)
    sums = DEBIAN_SUMS if name == "debian-12" else UBUNTU_SUMS
    assert len(mirror.server.hits(sums)) == 1
    # Ubuntu's checksum file is signed (and checked); Debian's is not and has no signature to fetch.
    assert len(mirror.server.hits(sums + ".gpg")) == (1 if name == "jammy" else 0)


@http
def test_latest_checksum_file_without_the_image(
    qinst: RunQinst, mirror: Mirror, upstream: Path, tmp_path: Path
) -> None:
    mirror.server.add(DEBIAN_SUMS, f"{'a' * 128}  debian-12-genericcloud-arm64.qcow2\n".encode())
    stderr = assert_clean_error(qinst(*upstream_args(upstream, tmp_path / "cache"), "pull", "debian-12", "--latest"), 3)
    assert f"{mirror.url}{DEBIAN_SUMS} lists no sha512 digest for debian-12-genericcloud-amd64.qcow2" in stderr
    assert not mirror.server.hits(DEBIAN_LATEST)


@http
def test_latest_checksum_mismatch(qinst: RunQinst, mirror: Mirror, upstream: Path, tmp_path: Path) -> None:
    mirror.server.add(DEBIAN_LATEST, mirror.images.pinned.data)  # the SUMS file still names the latest build
    stderr = assert_clean_error(qinst(*upstream_args(upstream, tmp_path / "cache"), "pull", "debian-12", "--latest"), 3)
    assert f"expected {mirror.images.latest.sha512}" in stderr
    assert cache_files(tmp_path / "cache") == []


@http
def test_pinned_build_gone_is_an_error_never_a_fallback(
    qinst: RunQinst, mirror: Mirror, upstream: Path, tmp_path: Path
) -> None:
    """The pin wins: a pinned build that is gone is exit 3 with the way out (--latest), never whatever build the
    latest channel's checksum file names."""
    mirror.server.remove(DEBIAN_PINNED)
    proc = qinst(*upstream_args(upstream, tmp_path / "cache"), "pull", "debian-12", "--json")
    stderr = assert_clean_error(proc, 3)
    assert "the pinned build of debian-12 is gone" in stderr
    assert "HTTP 404" in stderr
    assert "hint: 'qinst pull --latest debian-12' takes the newest build" in stderr
    assert mirror.server.hits(DEBIAN_SUMS) == [], "the checksum file was read"
    assert cache_files(tmp_path / "cache") == []


@http
def test_pinned_build_gone_without_latest_channel(qinst: RunQinst, mirror: Mirror, tmp_path: Path) -> None:
    """Gone on the mirror: the same pin is tried upstream (unreachable here); both answers are said."""
    catalog = tmp_path / "gone.toml"
    catalog.write_text(f'[images.gone]\nurl = "{DEBIAN_HOST}/images/gone.qcow2"\ndigest = "{"sha256:" + "0" * 64}"\n')
    proc = qinst(*mirror.args(tmp_path / "cache"), "--catalog", str(catalog), "pull", "gone")
    stderr = assert_clean_error(proc, 3)
    assert f"{mirror.url}/images/gone.qcow2: HTTP 404" in stderr
    assert f"then cannot download {DEBIAN_HOST}/images/gone.qcow2: cannot resolve cloud.debian.org" in stderr
    assert "warning" not in stderr


@http
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


@http
def test_format_mismatch_caches_nothing(qinst: RunQinst, mirror: Mirror, tmp_path: Path) -> None:
    raw = random.Random(5).randbytes(1 << 20)
    mirror.server.add("/images/raw-disk.img", raw)
    catalog = tmp_path / "fmt.toml"
    catalog.write_text(
        f'[images.rawdisk]\nformat = "qcow2"\nurl = "{DEBIAN_HOST}/images/raw-disk.img"\n'
        f'digest = "sha256:{hashlib.sha256(raw).hexdigest()}"\n'
    )
    proc = qinst(*mirror.args(tmp_path / "cache"), "--catalog", str(catalog), "pull", "rawdisk")
    stderr = assert_clean_error(proc, 3)
    assert "expected a qcow2 image, qemu-img says raw" in stderr
    assert cache_files(tmp_path / "cache") == []


@http
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


def flock_waiters(path: Path) -> int:
    """Processes blocked in flock() on `path`, from /proc/locks ("-> FLOCK ..." lines name the file's inode)."""
    try:
        inode = path.stat().st_ino
    except FileNotFoundError:
        return 0
    lines = Path("/proc/locks").read_text().splitlines()
    return sum(1 for line in lines if "->" in line and "FLOCK" in line and line.split()[-3].endswith(f":{inode}"))


@http
def test_concurrent_pulls_download_once(mirror: Mirror, tmp_path: Path) -> None:
    # The body is held back (a very slow link) until the 7 other processes wait on the image's lock while the
    # first one downloads: the test proves the overlap instead of hoping for it.
    fault = mirror.server.fault(DEBIAN_PINNED, delay=0.5)
    cache = tmp_path / "cache"
    argv = [*qinst_argv(), *mirror.args(cache), "pull", "debian-12", "--json"]
    procs = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=qinst_env())
        for _ in range(8)
    ]
    lock = cache / "images" / f".{Digest.parse(mirror.images.pinned.sha512).filename}.lock"
    deadline = time.monotonic() + 120
    while flock_waiters(lock) < 7:
        assert time.monotonic() < deadline, f"the 8 pulls never overlapped ({flock_waiters(lock)} waiting)"
        assert all(p.poll() is None for p in procs), "a pull ended before the others waited on the lock"
        time.sleep(0.05)
    fault.delay = 0.0
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    assert [code for code, _, _ in results] == [0] * 8, [err for _, _, err in results]
    outputs = [json.loads(out) for _, out, _ in results]
    assert all(o == outputs[0] for o in outputs)
    assert_cached(outputs[0], mirror.images.pinned, mirror.images.pinned.sha512)
    assert len(mirror.server.hits(DEBIAN_PINNED)) == 1  # the body was served exactly once


@http
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


@pytest.mark.skipif(
    not (Path(__file__).parents[1] / "qemu_instances" / "instances.py").exists(),
    reason="qinst prune needs qemu_instances/instances.py, not written yet",
)
def test_prune_command(qinst: RunQinst, tmp_path: Path) -> None:
    pytest.importorskip("libvirt")
    cache = tmp_path / "cache"
    local = make_qcow2(tmp_path / "disk.qcow2", 1, seed=11)
    # libvirt's in-memory test driver: no instance uses the image, and no shared pool is touched.
    args = ["--connect", "test:///default", "--cache-dir", str(cache)]
    assert qinst(*args, "pull", str(local.file)).returncode == 0
    partial = cache / "images" / f".sha256-{'4' * 64}.part"
    partial.write_bytes(b"x")
    proc = qinst(*args, "prune", "--json")
    assert proc.returncode == 0, proc.stderr
    removed = {r["path"]: r["size"] for r in json.loads(proc.stdout)}
    assert removed == {str(cache / "images" / f"sha256-{local.sha256_hex}"): local.size, str(partial): 1}
    assert cache_files(cache) == []
    again = qinst(*args, "prune")
    assert (again.returncode, again.stdout, again.stderr) == (0, "", "nothing to prune\n")


# Local files: no server needed.


@pytest.fixture(scope="module")
def local_qcow2(tmp_path_factory: pytest.TempPathFactory) -> Image:
    return make_qcow2(tmp_path_factory.mktemp("local") / "disk.qcow2", 1, seed=10)


def test_pull_local_qcow2(qinst: RunQinst, local_qcow2: Image, tmp_path: Path) -> None:
    # The relative path is resolved from qinst's working directory (tmp_path).
    (tmp_path / "disk.qcow2").write_bytes(local_qcow2.data)
    proc = qinst("--cache-dir", str(tmp_path / "cache"), "pull", "./disk.qcow2", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["name"] == "disk"
    assert data["source"] == "local"
    assert_cached(data, local_qcow2, local_qcow2.sha256)
    assert (tmp_path / "disk.qcow2").exists()  # copied, not moved
    assert cache_files(tmp_path / "cache") == [
        f"sha256-{local_qcow2.sha256_hex}",
        f"sha256-{local_qcow2.sha256_hex}.json",
    ]


def test_pull_local_file_twice_keeps_one_copy(local_qcow2: Image, tmp_path: Path) -> None:
    store = ImageStore(Settings(cache_dir=tmp_path))
    first = store.pull(store.resolve(str(local_qcow2.file)))
    second = store.pull(store.resolve(str(local_qcow2.file)))
    assert first == second
    assert first.format == "qcow2"
    assert len(cache_files(tmp_path)) == 2  # the image and its record, no temporary left


def test_pull_local_qcow2_with_backing_file(qinst: RunQinst, local_qcow2: Image, tmp_path: Path) -> None:
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-f", "qcow2", "-F", "qcow2", "-b", local_qcow2.file, overlay],
        check=True,
        capture_output=True,
    )
    stderr = assert_clean_error(qinst("--cache-dir", str(tmp_path / "cache"), "pull", str(overlay)), 3)
    assert "backing file" in stderr
    assert str(local_qcow2.file) in stderr
    assert cache_files(tmp_path / "cache") == []


def test_pull_local_unsupported_format(qinst: RunQinst, tmp_path: Path) -> None:
    vdi = tmp_path / "disk.img"
    subprocess.run(["qemu-img", "create", "-f", "vdi", vdi, "16M"], check=True, capture_output=True)
    stderr = assert_clean_error(qinst("--cache-dir", str(tmp_path / "cache"), "pull", str(vdi)), 3)
    assert "unsupported image format 'vdi'" in stderr


def test_pull_missing_local_file(qinst: RunQinst, tmp_path: Path) -> None:
    stderr = assert_clean_error(qinst("--cache-dir", str(tmp_path / "cache"), "pull", "./nope.qcow2"), 3)
    assert "no such image file: ./nope.qcow2" in stderr


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
