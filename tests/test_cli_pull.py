"""`qinst pull` through the real entry point, against a real HTTP server on 127.0.0.1 that mirrors the upstream
paths: the catalog's pin, resumes and retries, `--latest`, local files, concurrent pulls and `kill -9` mid-download;
a mirror never chooses the bytes (an unsigned checksum file is read only from the entry's own upstream host, and
never through a redirect off HTTPS or off that host); bodies stopped at the pinned size; exit codes and messages.

The fault-injection details that need many retries are in test_images.py and test_download.py, through the library
with a fast retry policy."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import RunQinst, cache_files, no_traceback, store_for, wait_for
from httpserver import HTTPServer, serving
from mirror import (
    DEBIAN_HOST,
    DEBIAN_LATEST,
    DEBIAN_PINNED,
    DEBIAN_SUMS,
    UBUNTU_LATEST,
    UBUNTU_SUMS,
    Image,
    Mirror,
    make_qcow2,
)
from signing import SigningKey

from qemu_instances.catalog import Catalog
from qemu_instances.digests import Digest
from qemu_instances.download import RetryPolicy
from qemu_instances.errors import DownloadError
from testsupport.qinst import qinst_argv, qinst_env


def upstream_args(upstream: Path, cache: Path) -> list[str]:
    return ["--catalog", str(upstream), "--cache-dir", str(cache)]


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


@pytest.mark.http
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


@pytest.mark.http
def test_plain_output_names_digest_and_path(qinst: RunQinst, mirror: Mirror, tmp_path: Path) -> None:
    proc = qinst(*mirror.args(tmp_path / "cache"), "pull", "debian-12")
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.splitlines()
    assert first == f"debian-12  {mirror.images.pinned.sha512}"
    assert second.startswith(str(tmp_path / "cache" / "images" / mirror.images.pinned.sha512.replace(":", "-")))
    assert proc.stderr == ""  # no progress bar when stderr is not a terminal


@pytest.mark.http
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


@pytest.mark.http
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


@pytest.mark.http
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


@pytest.mark.http
def test_url_not_found(qinst: RunQinst, mirror: Mirror, tmp_path: Path) -> None:
    url = f"{mirror.url}/images/nothing-here.qcow2"
    proc = qinst("--cache-dir", str(tmp_path / "cache"), "pull", url, "--sha256", "a" * 64)
    stderr = assert_clean_error(proc, 3)
    assert url in stderr
    assert "404" in stderr
    assert cache_files(tmp_path / "cache") == []


@pytest.mark.http
def test_url_with_digest(qinst: RunQinst, mirror: Mirror, tmp_path: Path) -> None:
    url = f"{mirror.url}{UBUNTU_LATEST}"
    proc = qinst("--cache-dir", str(tmp_path), "pull", url, "--sha256", mirror.images.ubuntu.sha256_hex, "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["source"] == "url"
    assert data["name"] == "ubuntu-22.04-server-cloudimg-amd64"
    assert_cached(data, mirror.images.ubuntu, mirror.images.ubuntu.sha256)


@pytest.mark.http
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


@pytest.mark.http
def test_range_ignored_restarts_cleanly(qinst: RunQinst, mirror: Mirror, tmp_path: Path) -> None:
    mirror.server.fault(DEBIAN_PINNED, cut_after=1_000_000, ignore_range=True)
    data = pull_json(qinst, mirror, tmp_path / "cache", "debian-12")
    assert_cached(data, mirror.images.pinned, mirror.images.pinned.sha512)
    first, second = mirror.server.hits(DEBIAN_PINNED)
    assert first.sent == 1_000_000
    assert second.range == "bytes=1000000-"
    assert (second.status, second.sent) == (200, mirror.images.pinned.size)  # whole file, from byte 0


@pytest.mark.http
def test_server_errors_then_success(qinst: RunQinst, mirror: Mirror, tmp_path: Path) -> None:
    mirror.server.fault(DEBIAN_PINNED, fail_times=2, fail_status=503)
    data = pull_json(qinst, mirror, tmp_path / "cache", "debian-12")
    assert_cached(data, mirror.images.pinned, mirror.images.pinned.sha512)
    assert [h.status for h in mirror.server.hits(DEBIAN_PINNED)] == [503, 503, 200]


@pytest.mark.http
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


@pytest.mark.http
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


@pytest.mark.http
def test_latest_checksum_file_without_the_image(
    qinst: RunQinst, mirror: Mirror, upstream: Path, tmp_path: Path
) -> None:
    mirror.server.add(DEBIAN_SUMS, f"{'a' * 128}  debian-12-genericcloud-arm64.qcow2\n".encode())
    stderr = assert_clean_error(qinst(*upstream_args(upstream, tmp_path / "cache"), "pull", "debian-12", "--latest"), 3)
    assert f"{mirror.url}{DEBIAN_SUMS} lists no sha512 digest for debian-12-genericcloud-amd64.qcow2" in stderr
    assert not mirror.server.hits(DEBIAN_LATEST)


@pytest.mark.http
def test_latest_checksum_mismatch(qinst: RunQinst, mirror: Mirror, upstream: Path, tmp_path: Path) -> None:
    mirror.server.add(DEBIAN_LATEST, mirror.images.pinned.data)  # the SUMS file still names the latest build
    stderr = assert_clean_error(qinst(*upstream_args(upstream, tmp_path / "cache"), "pull", "debian-12", "--latest"), 3)
    assert f"expected {mirror.images.latest.sha512}" in stderr
    assert cache_files(tmp_path / "cache") == []


@pytest.mark.http
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


@pytest.mark.http
def test_pinned_build_gone_without_latest_channel(qinst: RunQinst, mirror: Mirror, tmp_path: Path) -> None:
    """Gone on the mirror: the same pin is tried upstream (unreachable here); both answers are said."""
    catalog = tmp_path / "gone.toml"
    catalog.write_text(f'[images.gone]\nurl = "{DEBIAN_HOST}/images/gone.qcow2"\ndigest = "{"sha256:" + "0" * 64}"\n')
    proc = qinst(*mirror.args(tmp_path / "cache"), "--catalog", str(catalog), "pull", "gone")
    stderr = assert_clean_error(proc, 3)
    assert f"{mirror.url}/images/gone.qcow2: HTTP 404" in stderr
    assert f"then cannot download {DEBIAN_HOST}/images/gone.qcow2: cannot resolve cloud.debian.org" in stderr
    assert "warning" not in stderr


@pytest.mark.http
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


def flock_waiters(path: Path) -> int:
    """Processes blocked in flock() on `path`, from /proc/locks ("-> FLOCK ..." lines name the file's inode)."""
    try:
        inode = path.stat().st_ino
    except FileNotFoundError:
        return 0
    lines = Path("/proc/locks").read_text().splitlines()
    return sum(1 for line in lines if "->" in line and "FLOCK" in line and line.split()[-3].endswith(f":{inode}"))


@pytest.mark.http
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


# -- usage errors and missing images -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "suggestion"), [("debian-14", "debian-13"), ("jamy", "jammy"), ("bokworm", "bookworm")]
)
def test_unknown_image_suggests_close_names(qinst: RunQinst, tmp_path: Path, name: str, suggestion: str) -> None:
    proc = qinst("--cache-dir", str(tmp_path), "pull", name)
    assert proc.returncode == 3
    assert proc.stderr.splitlines()[0] == f"qinst: error: unknown image '{name}'"
    hint = proc.stderr.splitlines()[1]
    assert hint.startswith("hint: did you mean")
    assert suggestion in hint
    no_traceback(proc.stderr)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["pull", "https://example.org/x.qcow2"], "refusing to download https://example.org/x.qcow2 without a digest"),
        (["pull", "https://example.org/x.qcow2", "--sha256", "a" * 64, "--sha512", "b" * 128], "not both"),
        (["pull", "https://example.org/x.qcow2", "--sha512", "a" * 64], "expected 128 hex digits"),
        (["pull", "debian-12", "--sha256", "a" * 64], "only to an http(s) URL"),
        (["pull", "aleph:1234"], "invalid aleph item hash"),
        (["pull", "debian-12", "--source", "ipfs"], "'ipfs' is not one of upstream, aleph"),
        (["pull"], "Missing argument"),
        (["pull", "debian-12", "--bogus"], "No such option"),
        (["--mirror", "ftp://mirror.lan", "images"], "expected an http(s) URL"),
        (["frobnicate"], "No such command"),
    ],
)
def test_usage_errors_exit_2(qinst: RunQinst, tmp_path: Path, args: list[str], needle: str) -> None:
    proc = qinst("--cache-dir", str(tmp_path), *args)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr
    assert proc.stdout == ""
    no_traceback(proc.stderr)
    assert not (tmp_path / "images").exists()  # nothing was fetched or created


def test_url_latest_is_a_usage_error(qinst: RunQinst, tmp_path: Path) -> None:
    proc = qinst("--cache-dir", str(tmp_path), "pull", "https://e.example/x.img", "--sha256", "a" * 64, "--latest")
    assert proc.returncode == 2
    assert "--latest apply to catalog images" in proc.stderr


def test_missing_local_file_exits_3(qinst: RunQinst, tmp_path: Path) -> None:
    proc = qinst("--cache-dir", str(tmp_path), "pull", "/nonexistent/disk.qcow2", "--json")
    assert proc.returncode == 3
    assert proc.stdout == ""
    assert proc.stderr == "qinst: error: no such image file: /nonexistent/disk.qcow2\n"


# -- local images that reach outside themselves, the cache directory, sizes, corrupt records, kill -9 ------------------


# Local images that reach outside themselves are refused (issue 10, section 4).


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


@pytest.mark.parametrize("kind", ["data-file", "backing-file", "encrypted"])
def test_local_images_reaching_outside_are_refused(qinst: RunQinst, tmp_path: Path, kind: str) -> None:
    image = tmp_path / f"{kind}.qcow2"
    if kind == "data-file":
        target = tmp_path / "host-secret.raw"
        target.write_bytes(b"secret" * 1000)
        qemu_img("create", "-f", "qcow2", "-o", f"data_file={target}", str(image), "1M")
        needle = f"external data file ({target})"
    elif kind == "backing-file":
        base = tmp_path / "base.qcow2"
        qemu_img("create", "-f", "qcow2", str(base), "1M")
        qemu_img("create", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(image))
        needle = f"backing file ({base})"
    else:
        # LUKS times its key derivation with the thread's CPU clock, which a loaded host can fail to advance
        # ("Unable to get accurate CPU usage"): a few tries.
        for attempt in range(5):
            try:
                qemu_img(
                    "create", "--object", "secret,id=sec0,data=passphrase", "-f", "qcow2",
                    "-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=50", str(image), "1M",
                )  # fmt: skip
                break
            except subprocess.CalledProcessError:
                if attempt == 4:
                    raise
        needle = "encrypted image"
    cache = tmp_path / "cache"
    proc = qinst("--cache-dir", str(cache), "pull", str(image))
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.startswith(f"qinst: error: {image}: refusing ")
    assert needle in proc.stderr.splitlines()[0]
    assert cache_files(cache) == []


def test_a_plain_local_qcow2_is_still_taken(qinst: RunQinst, tmp_path: Path) -> None:
    image = make_qcow2(tmp_path / "plain.qcow2", 1, seed=21)
    proc = qinst("--cache-dir", str(tmp_path / "cache"), "pull", str(image.file), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["digest"] == image.sha256


def test_the_cache_directory_is_private(qinst: RunQinst, tmp_path: Path) -> None:
    image = make_qcow2(tmp_path / "plain.qcow2", 1, seed=22)
    cache = tmp_path / "new" / "cache"
    assert qinst("--cache-dir", str(cache), "pull", str(image.file)).returncode == 0
    assert stat.S_IMODE((cache / "images").stat().st_mode) == 0o700
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700


@pytest.mark.http
def test_the_catalog_size_reaches_the_download(qinst: RunQinst, mirror: Mirror, tmp_path: Path) -> None:
    catalog = tmp_path / "sized.toml"
    image = mirror.images.pinned
    catalog.write_text(
        f'[images.sized]\nurl = "{mirror.url}{DEBIAN_PINNED}"\ndigest = "{image.sha512}"\nsize = {image.size - 1}\n'
    )
    cache = tmp_path / "cache"
    proc = qinst("--catalog", str(catalog), "--cache-dir", str(cache), "pull", "sized")
    assert proc.returncode == 3, proc.stderr
    assert f"announces {image.size} bytes, more than the expected {image.size - 1}" in proc.stderr
    assert cache_files(cache) == []


# Bad values: a clean error and the documented exit code (issue 11, section 3).


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["pull", "http://[::1", "--sha256", "0" * 64], 2, "bad image URL 'http://[::1'"),
        (["pull", "https:///x.qcow2", "--sha256", "0" * 64], 2, "with a host"),
        (["--cache-dir", "/proc/qinst-cache", "pull", "LOCAL"], 2, "cannot create the cache directory"),
    ],
)
def test_bad_values_exit_cleanly(qinst: RunQinst, tmp_path: Path, args: list[str], code: int, needle: str) -> None:
    local = make_qcow2(tmp_path / "l.qcow2", 1, seed=23)
    args = [str(local.file) if a == "LOCAL" else a for a in args]
    if "--cache-dir" not in args:
        args = ["--cache-dir", str(tmp_path / "cache"), *args]
    proc = qinst(*args)
    assert proc.returncode == code, proc.stderr
    assert proc.stderr.startswith("qinst: error: ") and needle in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("record", ["[]", "5", '"x"', "{", '{"name": 5, "source": ["x"], "format": null}', "\xff"])
def test_a_corrupt_cache_record_is_ignored(qinst: RunQinst, tmp_path: Path, record: str) -> None:
    image = make_qcow2(tmp_path / "rec.qcow2", 1, seed=24)
    cache = tmp_path / "cache"
    assert qinst("--cache-dir", str(cache), "pull", str(image.file)).returncode == 0
    json_path = cache / "images" / f"sha256-{image.sha256_hex}.json"
    json_path.write_bytes(record.encode("latin-1"))
    proc = qinst("--cache-dir", str(cache), "pull", str(image.file), "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["digest"] == image.sha256
    assert isinstance(data["name"], str) and isinstance(data["source"], str)


# kill -9 mid-download (issue 11, section 4).


def start_pull_and_kill(mirror: Mirror, cache: Path, part: Path, cwd: Path) -> int:
    """Start `qinst pull debian-12` on a slow link, SIGKILL it once bytes are in the partial file; its size then."""
    mirror.server.fault(DEBIAN_PINNED, delay=0.05)  # ~1.3 MB/s: the 3 MiB image takes seconds
    proc = subprocess.Popen(
        [*qinst_argv(), *mirror.args(cache), "pull", "debian-12"],
        env=qinst_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=cwd,
    )
    try:
        wait_for(lambda: part.exists() and part.stat().st_size > 0, "bytes to flow into the partial file")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    mirror.server.fault(DEBIAN_PINNED)  # full speed again
    return part.stat().st_size


@pytest.mark.http
def test_kill_9_mid_download_then_pull_again(qinst: RunQinst, mirror: Mirror, tmp_path: Path) -> None:
    pytest.importorskip("libvirt")
    cache = tmp_path / "cache"
    image = mirror.images.pinned
    final = cache / "images" / image.sha512.replace(":", "-")
    part = final.with_name(f".{final.name}.part")

    killed_at = start_pull_and_kill(mirror, cache, part, tmp_path)
    assert 0 < killed_at < image.size
    assert not final.exists()  # the cache never holds an unverified file under an image's name
    listing = qinst(*mirror.args(cache), "images", "--json")
    assert [r["cached"] for r in json.loads(listing.stdout) if r["name"] == "debian-12"] == [False]

    # The next pull resumes where the killed one stopped, and verifies the whole file.
    again = qinst(*mirror.args(cache), "pull", "debian-12", "--json")
    assert again.returncode == 0, again.stderr
    assert Path(json.loads(again.stdout)["path"]).read_bytes() == image.data
    assert mirror.server.hits(DEBIAN_PINNED)[-1].range == f"bytes={killed_at}-"
    assert not part.exists()

    # Killed again (after the image was pruned): prune removes the stale partial; the next pull starts over.
    prune = ["--connect", "test:///default", "--cache-dir", str(cache), "prune", "--json"]
    assert qinst(*prune).returncode == 0
    start_pull_and_kill(mirror, cache, part, tmp_path)
    pruned = qinst(*prune)
    assert pruned.returncode == 0, pruned.stderr
    assert {r["path"] for r in json.loads(pruned.stdout)} == {str(part)}
    assert cache_files(cache) == []
    last = qinst(*mirror.args(cache), "pull", "debian-12", "--json")
    assert last.returncode == 0, last.stderr
    assert mirror.server.hits(DEBIAN_PINNED)[-1].range is None  # from byte 0
    assert final.read_bytes() == image.data


def test_a_planted_record_link_is_not_written_through(qinst: RunQinst, tmp_path: Path) -> None:
    image = make_qcow2(tmp_path / "r.qcow2", 1, seed=26)
    cache = tmp_path / "cache"
    (cache / "images").mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (cache / "images" / f".sha256-{image.sha256_hex}.json.tmp").symlink_to(victim)
    proc = qinst("--cache-dir", str(cache), "pull", str(image.file), "--json")
    assert proc.returncode == 0, proc.stderr
    assert victim.read_text() == "precious"
    record = json.loads((cache / "images" / f"sha256-{image.sha256_hex}.json").read_text())
    assert record["source"] == "local"


# -- a mirror never chooses the bytes ----------------------------------------------------------------------------------


@pytest.fixture
def origin() -> Iterator[HTTPServer]:
    """The entry's own upstream host (cloud.debian.org's stand-in)."""
    with serving() as server:
        yield server


def catalog_on(mirror: Mirror, origin: HTTPServer, tmp_path: Path) -> Path:
    path = tmp_path / "origin.toml"
    path.write_text(mirror.catalog.read_text().replace(DEBIAN_HOST, origin.url))
    return path


def pull(qinst: RunQinst, mirror: Mirror, catalog: Path, cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return qinst("--mirror", mirror.url, "--catalog", str(catalog), "--cache-dir", str(cache), "pull", *args)


def hide_pin_and_substitute(mirror: Mirror) -> bytes:
    """The attack: 404 for the pinned path; the mirror's own latest image and a SHA512SUMS that names it."""
    mirror.server.remove(DEBIAN_PINNED)
    substitute = mirror.images.ubuntu
    mirror.server.add(DEBIAN_LATEST, substitute.data)
    mirror.server.add(DEBIAN_SUMS, f"{substitute.sha512_hex}  debian-12-genericcloud-amd64.qcow2\n".encode())
    return substitute.data


@pytest.mark.http
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
    assert cache_files(cache) == []


@pytest.mark.http
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
    assert cache_files(cache) == sorted([f"sha512-{pinned.sha512_hex}", f"sha512-{pinned.sha512_hex}.json"])
    assert not mirror.server.hits(DEBIAN_SUMS) and not origin.hits(DEBIAN_SUMS)


@pytest.mark.http
def test_upstream_bytes_that_are_not_the_pin_are_refused(
    qinst: RunQinst, mirror: Mirror, origin: HTTPServer, tmp_path: Path
) -> None:
    hide_pin_and_substitute(mirror)
    origin.add(DEBIAN_PINNED, mirror.images.latest.data)  # another build under the pinned name
    cache = tmp_path / "cache"
    proc = pull(qinst, mirror, catalog_on(mirror, origin, tmp_path), cache, "debian-12")
    assert proc.returncode == 3, proc.stderr
    assert f"expected {mirror.images.pinned.sha512}" in proc.stderr
    assert cache_files(cache) == []


@pytest.mark.http
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


@pytest.mark.http
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
    assert cache_files(tmp_path / "cache") == []


@pytest.mark.http
@pytest.mark.promise
def test_a_checksum_file_that_leaves_https_at_its_second_redirect_is_refused(
    qinst: RunQinst, tls_origin: HTTPServer, http_server: HTTPServer, tls_cert: Path, mirror: Mirror, tmp_path: Path
) -> None:
    """Every hop is checked, not only the first: a move on the upstream host itself (allowed), then plain http."""
    image = mirror.images.latest
    http_server.add("/SHA512SUMS", f"{image.sha512_hex}  disk.qcow2\n".encode())
    tls_origin.redirect("/latest/SHA512SUMS", "/moved/SHA512SUMS")
    tls_origin.redirect("/moved/SHA512SUMS", f"{http_server.url}/SHA512SUMS")
    tls_origin.add("/latest/disk.qcow2", image.data)
    proc = _pull_latest(qinst, _latest_catalog(tmp_path, tls_origin), tmp_path / "cache", tls_cert)
    assert proc.returncode == 3, proc.stderr
    assert "it leaves HTTPS" in proc.stderr
    assert tls_origin.hits("/moved/SHA512SUMS") and not http_server.hits()
    assert cache_files(tmp_path / "cache") == []


@pytest.mark.http
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


@pytest.mark.http
def test_an_unsigned_checksum_file_moved_on_its_own_host_is_followed(
    qinst: RunQinst, tls_origin: HTTPServer, tls_cert: Path, mirror: Mirror, tmp_path: Path
) -> None:
    image = mirror.images.latest
    tls_origin.add("/20261203/SHA512SUMS", f"{image.sha512_hex}  disk.qcow2\n".encode())
    tls_origin.redirect("/latest/SHA512SUMS", "/20261203/SHA512SUMS", 301)
    tls_origin.add("/latest/disk.qcow2", image.data)
    proc = _pull_latest(qinst, _latest_catalog(tmp_path, tls_origin), tmp_path / "cache", tls_cert)
    assert proc.returncode == 0, proc.stderr
    assert cache_files(tmp_path / "cache") == sorted([f"sha512-{image.sha512_hex}", f"sha512-{image.sha512_hex}.json"])


@pytest.mark.http
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


@pytest.mark.http
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
