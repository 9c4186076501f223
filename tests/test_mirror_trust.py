"""A mirror never chooses the bytes: an unsigned checksum file is read only from the entry's own upstream host, so a
mirror that hides the pinned build and serves its own SHA512SUMS and image gets nothing cached (issue 10, section 2).

Two local servers: `mirror` (the mirror fixture) and `upstream` (the entry's own host, a second 127.0.0.1 server).
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import urllib3
from conftest import RunQinst
from httpserver import HTTPServer, serving
from mirror import DEBIAN_HOST, DEBIAN_LATEST, DEBIAN_PINNED, DEBIAN_SUMS, Mirror
from signing import SigningKey

from qemu_instances.download import RetryPolicy, _network_error, fetch_bytes, new_session
from qemu_instances.errors import DigestMismatch, DownloadError
from qemu_instances.images import ImageStore
from qemu_instances.settings import Settings

pytestmark = pytest.mark.http
FAST = RetryPolicy(backoff=0.01, max_backoff=0.02, timeout=(5.0, 5.0))


@pytest.fixture
def origin() -> Iterator[HTTPServer]:
    """The entry's own upstream host (cloud.debian.org's stand-in)."""
    with serving() as server:
        yield server


def catalog_on(mirror: Mirror, origin: HTTPServer, tmp_path: Path) -> Path:
    path = tmp_path / "origin.toml"
    path.write_text(mirror.catalog.read_text().replace(DEBIAN_HOST, origin.url))
    return path


def cached(cache: Path) -> list[str]:
    images = cache / "images"
    return sorted(p.name for p in images.iterdir() if not p.name.endswith(".lock")) if images.is_dir() else []


def pull(qinst: RunQinst, mirror: Mirror, catalog: Path, cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return qinst("--mirror", mirror.url, "--catalog", str(catalog), "--cache-dir", str(cache), "pull", *args)


def hide_pin_and_substitute(mirror: Mirror) -> bytes:
    """The attack: 404 for the pinned path; the mirror's own latest image and a SHA512SUMS that names it."""
    mirror.server.remove(DEBIAN_PINNED)
    substitute = mirror.images.ubuntu
    mirror.server.add(DEBIAN_LATEST, substitute.data)
    mirror.server.add(DEBIAN_SUMS, f"{substitute.sha512_hex}  debian-12-genericcloud-amd64.qcow2\n".encode())
    return substitute.data


def test_mirror_hiding_the_pin_cannot_choose_the_bytes(
    qinst: RunQinst, mirror: Mirror, origin: HTTPServer, tmp_path: Path
) -> None:
    """The pin wins: the mirror's 404 sends qinst upstream for the same pin (gone there too here), and no checksum
    file is read at all: exit 3, nothing cached."""
    hide_pin_and_substitute(mirror)
    cache = tmp_path / "cache"
    proc = pull(qinst, mirror, catalog_on(mirror, origin, tmp_path), cache, "debian-12")
    assert proc.returncode == 3, proc.stderr
    error, hint = proc.stderr.splitlines()[-2:]  # after the line saying the mirror's 404 sends qinst upstream
    assert error.startswith("qinst: error: the pinned build of debian-12 is gone: ")
    assert f"{mirror.url}{DEBIAN_PINNED}: HTTP 404" in error and f"then cannot download {origin.url}" in error
    assert hint.startswith("hint: 'qinst pull --latest debian-12'")
    assert not mirror.server.hits(DEBIAN_SUMS)  # the mirror's checksum file is never read...
    assert not mirror.server.hits(DEBIAN_LATEST)  # ...nor its substitute image requested
    assert not origin.hits(DEBIAN_SUMS)  # nor upstream's: a pinned pull reads no checksum file
    assert [h.target for h in origin.hits()] == [DEBIAN_PINNED]  # only the pin, upstream
    assert cached(cache) == []


def test_a_pin_missing_on_the_mirror_comes_from_upstream_verified(
    qinst: RunQinst, mirror: Mirror, origin: HTTPServer, tmp_path: Path
) -> None:
    pinned = mirror.images.pinned
    hide_pin_and_substitute(mirror)
    origin.add(DEBIAN_PINNED, pinned.data)
    cache = tmp_path / "cache"
    proc = pull(qinst, mirror, catalog_on(mirror, origin, tmp_path), cache, "debian-12", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["digest"] == pinned.sha512
    assert cached(cache) == sorted([f"sha512-{pinned.sha512_hex}", f"sha512-{pinned.sha512_hex}.json"])
    assert not mirror.server.hits(DEBIAN_SUMS) and not origin.hits(DEBIAN_SUMS)


def test_upstream_bytes_that_are_not_the_pin_are_refused(
    qinst: RunQinst, mirror: Mirror, origin: HTTPServer, tmp_path: Path
) -> None:
    hide_pin_and_substitute(mirror)
    origin.add(DEBIAN_PINNED, mirror.images.latest.data)  # another build under the pinned name
    cache = tmp_path / "cache"
    proc = pull(qinst, mirror, catalog_on(mirror, origin, tmp_path), cache, "debian-12")
    assert proc.returncode == 3, proc.stderr
    assert f"expected {mirror.images.pinned.sha512}" in proc.stderr
    assert cached(cache) == []


def test_latest_through_a_mirror_reads_the_unsigned_checksum_file_upstream(
    qinst: RunQinst, mirror: Mirror, origin: HTTPServer, tmp_path: Path
) -> None:
    genuine = mirror.images.latest
    origin.add(DEBIAN_SUMS, f"{genuine.sha512_hex}  debian-12-genericcloud-amd64.qcow2\n".encode())
    cache = tmp_path / "cache"
    proc = pull(qinst, mirror, catalog_on(mirror, origin, tmp_path), cache, "debian-12", "--latest", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["digest"] == genuine.sha512
    assert [h.target for h in origin.hits()] == [DEBIAN_SUMS]  # only the checksum file from upstream
    assert len(mirror.server.hits(DEBIAN_LATEST)) == 1  # the bytes from the mirror, verified
    assert not mirror.server.hits(DEBIAN_SUMS)


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


def test_a_latest_mismatch_that_is_not_a_new_build_still_fails(mirror: Mirror, upstream: Path, tmp_path: Path) -> None:
    mirror.server.add(DEBIAN_LATEST, mirror.images.pinned.data)
    store = ImageStore(Settings(cache_dir=tmp_path / "cache", catalogs=(upstream,)), policy=FAST)
    with pytest.raises(DigestMismatch):
        store.pull(store.resolve("debian-12"), latest=True)
    assert cached(tmp_path / "cache") == []


# Network failures read as one human line.


def test_connection_refused_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        url = f"http://127.0.0.1:{port}/SHA512SUMS"
        with pytest.raises(DownloadError) as info:
            fetch_bytes(url, session=new_session(), policy=RetryPolicy(attempts=2, backoff=0.01))
    message = str(info.value)
    assert (
        message == f"cannot download {url}: cannot connect to 127.0.0.1: connection refused (gave up after 2 attempts)"
    )
    assert info.value.hint and "--mirror" in info.value.hint and "--source aleph" in info.value.hint


def test_name_resolution_failure_is_one_line() -> None:
    # urllib3's own exception chain for an unresolvable host, as requests raises it (built offline: no DNS query).
    pool = urllib3.HTTPSConnectionPool("cloud.debian.org", 443)
    conn = urllib3.connection.HTTPSConnection("cloud.debian.org", 443)
    reason = urllib3.exceptions.NameResolutionError("cloud.debian.org", conn, socket.gaierror(-2, "Name unknown"))
    exc = requests.ConnectionError(urllib3.exceptions.MaxRetryError(pool, "/x", reason))
    url = "https://cloud.debian.org/images/cloud/bookworm/latest/SHA512SUMS"
    assert _network_error(url, exc) == "cannot resolve cloud.debian.org (no network or DNS?)"
    assert "HTTPSConnectionPool" in str(exc)  # what the user used to see


# -- redirects: a checksum file never leaves HTTPS, an unsigned one never leaves its host (issue 21) -------------------


@pytest.fixture
def tls_origin(tls_cert: Path) -> Iterator[HTTPServer]:
    """The entry's upstream host over HTTPS (a certificate the client trusts through REQUESTS_CA_BUNDLE)."""
    with serving(tls_cert) as server:
        yield server


def _latest_catalog(tmp_path: Path, origin: HTTPServer, *, signed: SigningKey | None = None) -> Path:
    extra = ""
    if signed is not None:
        extra = f'checksums_signature_url = "{origin.url}/latest/SHA256SUMS.gpg"\nsigning_keys = "{signed.keyring}"\n'
    name = "SHA256SUMS" if signed else "SHA512SUMS"
    path = tmp_path / "tls.toml"
    path.write_text(
        f'[images.tls]\nurl = "{origin.url}/pinned.qcow2"\ndigest = "sha256:{"0" * 64}"\n'
        f'latest_url = "{origin.url}/latest/disk.qcow2"\nchecksums_url = "{origin.url}/latest/{name}"\n{extra}'
    )
    return path


def _pull_latest(qinst: RunQinst, catalog: Path, cache: Path, tls_cert: Path) -> subprocess.CompletedProcess[str]:
    return qinst(
        "--catalog", str(catalog), "--cache-dir", str(cache), "pull", "tls", "--latest",
        env={"REQUESTS_CA_BUNDLE": str(tls_cert)},
    )  # fmt: skip


def test_an_unsigned_checksum_file_redirected_to_http_is_refused(
    qinst: RunQinst, tls_origin: HTTPServer, http_server: HTTPServer, tls_cert: Path, mirror: Mirror, tmp_path: Path
) -> None:
    """The attack: the upstream host's HTTPS answer redirects the unsigned SHA512SUMS to plain http elsewhere."""
    image = mirror.images.latest
    http_server.add("/SHA512SUMS", f"{image.sha512_hex}  disk.qcow2\n".encode())
    tls_origin.redirect("/latest/SHA512SUMS", f"{http_server.url}/SHA512SUMS")
    tls_origin.add("/latest/disk.qcow2", image.data)
    proc = _pull_latest(qinst, _latest_catalog(tmp_path, tls_origin), tmp_path / "cache", tls_cert)
    assert proc.returncode == 3, proc.stderr
    assert "refusing a redirect of " in proc.stderr and "it leaves HTTPS" in proc.stderr
    assert not http_server.hits() and not tls_origin.hits("/latest/disk.qcow2")
    assert cached(tmp_path / "cache") == []


def test_an_unsigned_checksum_file_redirected_to_another_https_host_is_refused(
    qinst: RunQinst, tls_origin: HTTPServer, tls_cert: Path, mirror: Mirror, tmp_path: Path
) -> None:
    image = mirror.images.latest
    with serving(tls_cert) as elsewhere:
        elsewhere.add("/SHA512SUMS", f"{image.sha512_hex}  disk.qcow2\n".encode())
        tls_origin.redirect("/latest/SHA512SUMS", f"{elsewhere.url}/SHA512SUMS")
        proc = _pull_latest(qinst, _latest_catalog(tmp_path, tls_origin), tmp_path / "cache", tls_cert)
        assert proc.returncode == 3, proc.stderr
        assert "an unsigned checksum file is read from 127.0.0.1 only" in proc.stderr
        assert not elsewhere.hits()


def test_an_unsigned_checksum_file_moved_on_its_own_host_is_followed(
    qinst: RunQinst, tls_origin: HTTPServer, tls_cert: Path, mirror: Mirror, tmp_path: Path
) -> None:
    image = mirror.images.latest
    tls_origin.add("/20261203/SHA512SUMS", f"{image.sha512_hex}  disk.qcow2\n".encode())
    tls_origin.redirect("/latest/SHA512SUMS", "/20261203/SHA512SUMS", 301)
    tls_origin.add("/latest/disk.qcow2", image.data)
    proc = _pull_latest(qinst, _latest_catalog(tmp_path, tls_origin), tmp_path / "cache", tls_cert)
    assert proc.returncode == 0, proc.stderr
    assert cached(tmp_path / "cache") == sorted([f"sha512-{image.sha512_hex}", f"sha512-{image.sha512_hex}.json"])


def test_a_signed_checksum_file_or_its_signature_redirected_to_http_is_refused(
    qinst: RunQinst,
    tls_origin: HTTPServer,
    http_server: HTTPServer,
    tls_cert: Path,
    mirror: Mirror,
    test_key: SigningKey,
    tmp_path: Path,
) -> None:
    image = mirror.images.ubuntu
    sums = f"{image.sha256_hex} *disk.qcow2\n".encode()
    catalog = _latest_catalog(tmp_path, tls_origin, signed=test_key)
    tls_origin.add("/latest/disk.qcow2", image.data)
    http_server.add("/SHA256SUMS.gpg", test_key.sign(sums))
    tls_origin.add("/latest/SHA256SUMS", sums)
    tls_origin.redirect("/latest/SHA256SUMS.gpg", f"{http_server.url}/SHA256SUMS.gpg")
    proc = _pull_latest(qinst, catalog, tmp_path / "cache", tls_cert)
    assert proc.returncode == 3, proc.stderr
    assert "it leaves HTTPS" in proc.stderr and not http_server.hits()
    with serving(tls_cert) as elsewhere:  # to another https host: a signed file is checked by its signature
        elsewhere.add("/SHA256SUMS.gpg", test_key.sign(sums))
        tls_origin.redirect("/latest/SHA256SUMS.gpg", f"{elsewhere.url}/SHA256SUMS.gpg")
        proc = _pull_latest(qinst, catalog, tmp_path / "cache", tls_cert)
        assert proc.returncode == 0, proc.stderr


# -- sizes: a download stops at the pinned size, or at qinst's cap (issue 21) ------------------------------------------


def test_an_endless_chunked_body_stops_at_the_pinned_size_and_leaves_nothing(
    qinst: RunQinst, mirror: Mirror, tmp_path: Path
) -> None:
    """A mirror answering the pin with an endless chunked body (no Content-Length): stopped one chunk past the
    catalog's size, exit 3, no .part file, nothing cached."""
    pinned = mirror.images.pinned
    catalog = tmp_path / "sized.toml"
    catalog.write_text(mirror.catalog.read_text().replace(
        f'digest = "{pinned.sha512}"', f'digest = "{pinned.sha512}"\nsize = {len(pinned.data)}', 1
    ))  # fmt: skip
    mirror.server.endless(DEBIAN_PINNED)
    cache = tmp_path / "cache"
    started = time.monotonic()
    proc = qinst("--mirror", mirror.url, "--catalog", str(catalog), "--cache-dir", str(cache), "pull", "debian-12")
    assert proc.returncode == 3, proc.stderr
    assert f"sent more than the expected {len(pinned.data)} bytes; stopped" in proc.stderr
    assert time.monotonic() - started < 30
    assert sorted(p.name for p in (cache / "images").iterdir() if not p.name.endswith(".lock")) == []


def test_an_endless_body_of_an_image_without_a_size_stops_at_the_cap(mirror: Mirror, tmp_path: Path) -> None:
    from qemu_instances.digests import Digest
    from qemu_instances.download import download_verified

    mirror.server.endless("/endless.img")
    (tmp_path / "dl").mkdir()
    dest = tmp_path / "dl" / "sha256-x"
    with pytest.raises(
        DownloadError, match=r"sent more than 8 MiB, qinst's limit for an image whose size is not known"
    ):
        download_verified(
            f"{mirror.url}/endless.img", dest, Digest.parse("sha256:" + "1" * 64),
            session=new_session(), policy=FAST, limit=8 << 20,
        )  # fmt: skip
    assert list((tmp_path / "dl").iterdir()) == []
