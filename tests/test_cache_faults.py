"""The image cache under hostile or broken conditions: local images that reach outside themselves, planted links,
oversized bodies, corrupt records, bad options, and `kill -9` in the middle of a download (issues 10 and 11)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import RunQinst, qinst_argv, qinst_env
from mirror import DEBIAN_PINNED, Mirror, make_qcow2

from qemu_instances.digests import Digest
from qemu_instances.download import RetryPolicy, download_verified, new_session
from qemu_instances.errors import DownloadError, ImageError
from qemu_instances.images import ImageStore
from qemu_instances.settings import Settings

FAST = RetryPolicy(attempts=2, backoff=0.01, max_backoff=0.02, timeout=(5.0, 5.0))


def cached(cache: Path) -> list[str]:
    images = cache / "images"
    return sorted(p.name for p in images.iterdir() if not p.name.endswith(".lock")) if images.is_dir() else []


def wait_for(condition: Any, what: str, deadline: float = 30.0) -> None:
    """Poll condition() until it holds; fail after deadline seconds."""
    end = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


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
    assert cached(cache) == []


def test_a_plain_local_qcow2_is_still_taken(qinst: RunQinst, tmp_path: Path) -> None:
    image = make_qcow2(tmp_path / "plain.qcow2", 1, seed=21)
    proc = qinst("--cache-dir", str(tmp_path / "cache"), "pull", str(image.file), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["digest"] == image.sha256


# Partial downloads and the cache directory.


@pytest.mark.http
def test_a_planted_partial_symlink_is_not_followed(mirror: Mirror, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    store = ImageStore(Settings(cache_dir=cache, catalogs=(mirror.catalog,), mirror=mirror.url), policy=FAST)
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


def test_the_cache_directory_is_private(qinst: RunQinst, tmp_path: Path) -> None:
    image = make_qcow2(tmp_path / "plain.qcow2", 1, seed=22)
    cache = tmp_path / "new" / "cache"
    assert qinst("--cache-dir", str(cache), "pull", str(image.file)).returncode == 0
    assert stat.S_IMODE((cache / "images").stat().st_mode) == 0o700
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700


class _Endless(BaseHTTPRequestHandler):
    """Answers with a body that never ends, counting what it managed to write before the client hung up."""

    protocol_version = "HTTP/1.1"
    announce: int | None = None  # a Content-Length to announce (and then exceed), or none (close-delimited)
    written: list[int]

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        if self.announce is not None:
            self.send_header("Content-Length", str(self.announce))
        self.send_header("Connection", "close")
        self.end_headers()
        sent = 0
        try:
            while sent < 1 << 30:
                self.wfile.write(b"\0" * 65536)
                sent += 65536
        except OSError:
            pass
        finally:
            self.written.append(sent)
            self.close_connection = True


@pytest.fixture
def endless() -> Iterator[tuple[str, type[_Endless]]]:
    handler = type("Handler", (_Endless,), {"written": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/image.qcow2", handler
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.http
@pytest.mark.parametrize("announce", [None, 1 << 20])
def test_a_body_longer_than_expected_stops_at_once(
    endless: tuple[str, type[_Endless]], tmp_path: Path, announce: int | None
) -> None:
    url, handler = endless
    handler.announce = announce
    dest = tmp_path / "images" / f"sha256-{'5' * 64}"
    dest.parent.mkdir()
    digest = Digest.parse(f"sha256:{'5' * 64}")
    size = 2 << 20  # the catalog's `size`; with a Content-Length of 1 MiB that is the tighter bound
    with pytest.raises((DownloadError, ImageError)) as info:
        download_verified(url, dest, digest, session=new_session(), policy=FAST, size=size)
    if announce is None:
        assert "more than the expected 2097152 bytes" in str(info.value)
    else:
        # Exactly Content-Length bytes are read, never the rest: then the digest decides.
        assert "digest mismatch" in str(info.value)
    wait_for(lambda: handler.written, "the server to notice the client went away")
    assert handler.written[0] < 64 << 20  # the client stopped long before the endless body's gigabyte
    assert list(dest.parent.iterdir()) == []  # nothing kept, not even a partial file


@pytest.mark.http
def test_a_content_length_above_the_catalog_size_is_refused(
    endless: tuple[str, type[_Endless]], tmp_path: Path
) -> None:
    url, handler = endless
    handler.announce = 10 << 20
    dest = tmp_path / f"sha256-{'6' * 64}"
    with pytest.raises(DownloadError, match="announces 10485760 bytes, more than the expected 1048576"):
        download_verified(url, dest, Digest.parse(f"sha256:{'6' * 64}"), session=new_session(), size=1 << 20)
    assert list(tmp_path.iterdir()) == []


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
    assert cached(cache) == []


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


def test_prune_copes_with_planted_and_dangling_symlinks(qinst: RunQinst, tmp_path: Path) -> None:
    pytest.importorskip("libvirt")
    cache = tmp_path / "cache"
    image = make_qcow2(tmp_path / "p.qcow2", 1, seed=25)
    args = ["--connect", "test:///default", "--cache-dir", str(cache)]
    assert qinst(*args, "pull", str(image.file)).returncode == 0
    images = cache / "images"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    target_file = tmp_path / "outside-file"
    target_file.write_text("keep")
    links = {
        images / f".sha256-{'7' * 64}.part": tmp_path / "nowhere",  # dangling
        images / ".import-dir.tmp": outside,  # a directory symlink
        images / f"sha256-{'8' * 64}": target_file,  # a link posing as an image
    }
    for link, target in links.items():
        link.symlink_to(target)
    proc = qinst(*args, "images", "--json")  # the posing link is not a cached image
    assert proc.returncode == 0, proc.stderr
    proc = qinst(*args, "prune", "--json")
    assert proc.returncode == 0, proc.stderr
    removed = {r["path"] for r in json.loads(proc.stdout)}
    assert removed == {str(images / f"sha256-{image.sha256_hex}"), *(str(p) for p in links)}
    assert cached(cache) == []
    assert (outside / "keep").read_text() == "keep" and target_file.read_text() == "keep"  # targets untouched


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
    assert cached(cache) == []
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
