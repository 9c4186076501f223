"""Base volumes on a remote libvirt host: uploaded once through a libvirt stream, hashed, marked; a volume without
its `.verified` marker, truncated or corrupted, is re-hashed and replaced.

The remote host is the real libvirtd reached over SSH (qemu+ssh://root@127.0.0.1 through the sshd of
test_remote.py), with a transient pool of this test's own, so no volume another test made (a hard link of a local
launch) can stand in for an upload.
"""

from __future__ import annotations

import hashlib
import io
import secrets
import subprocess
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest
from mirror import make_qcow2
from test_remote import Sshd, sshd  # noqa: F401  (the fixture)

from qemu_instances.digests import Algorithm, Digest, hash_file
from qemu_instances.errors import HypervisorError
from qemu_instances.host import VERIFIED, Host, _hard_link, _send

pytestmark = pytest.mark.libvirt


@pytest.fixture
def remote(sshd: Sshd, tmp_path: Path) -> Iterator[tuple[Host, Any, Path]]:  # noqa: F811
    """(remote Host, its pool object, the pool's directory): a fresh transient directory pool."""
    directory = tmp_path / "pool"
    directory.mkdir()
    root = ET.Element("pool", type="dir")
    ET.SubElement(root, "name").text = f"qinst-upload-{secrets.token_hex(3)}"
    ET.SubElement(ET.SubElement(root, "target"), "path").text = str(directory)
    with Host(sshd.uri) as host:
        assert not host.is_local
        pool = host.conn.storagePoolCreateXML(ET.tostring(root, encoding="unicode"), 0)
        try:
            yield host, pool, directory
        finally:
            for vol in pool.listAllVolumes():
                vol.delete(0)
            pool.destroy()


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, Digest]:
    path = make_qcow2(tmp_path / "base.qcow2", 2, seed=31).file
    return path, hash_file(path, Algorithm.SHA512)


def _sha512(path: Path) -> str:
    return hashlib.sha512(path.read_bytes()).hexdigest()


def test_upload_verified_marked_and_not_repeated(remote: tuple[Host, Any, Path], image: tuple[Path, Digest]) -> None:
    host, pool, directory = remote
    source, digest = image
    vol = host.base_volume(pool, digest.filename, source, digest)
    uploaded = directory / digest.filename
    assert vol.path() == str(uploaded)
    assert _sha512(uploaded) == digest.hex and uploaded.stat().st_ino != source.stat().st_ino  # a copy, not a link
    assert (directory / (digest.filename + VERIFIED)).read_text() == str(digest)
    before = uploaded.stat()
    host.base_volume(pool, digest.filename, source, digest)
    after = uploaded.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), "uploaded twice"


def test_a_truncated_volume_is_replaced_even_when_marked(
    remote: tuple[Host, Any, Path], image: tuple[Path, Digest]
) -> None:
    host, pool, directory = remote
    source, digest = image
    host.base_volume(pool, digest.filename, source, digest)
    with (directory / digest.filename).open("r+b") as f:
        f.truncate(source.stat().st_size // 2)
    pool.refresh(0)
    host.base_volume(pool, digest.filename, source, digest)
    assert _sha512(directory / digest.filename) == digest.hex


def test_an_unmarked_volume_is_rehashed_and_replaced_when_corrupt(
    remote: tuple[Host, Any, Path], image: tuple[Path, Digest]
) -> None:
    host, pool, directory = remote
    source, digest = image
    host.base_volume(pool, digest.filename, source, digest)
    host.delete_volume(pool, digest.filename + VERIFIED)
    with (directory / digest.filename).open("r+b") as f:  # same size, one byte changed
        f.seek(4096)
        byte = f.read(1)
        f.seek(4096)
        f.write(bytes([byte[0] ^ 0xFF]))
    host.base_volume(pool, digest.filename, source, digest)
    assert _sha512(directory / digest.filename) == digest.hex
    assert (directory / (digest.filename + VERIFIED)).read_text() == str(digest)


def test_an_unmarked_complete_volume_is_rehashed_marked_and_kept(
    remote: tuple[Host, Any, Path], image: tuple[Path, Digest]
) -> None:
    host, pool, directory = remote
    source, digest = image
    host.base_volume(pool, digest.filename, source, digest)
    host.delete_volume(pool, digest.filename + VERIFIED)
    before = (directory / digest.filename).stat()
    host.base_volume(pool, digest.filename, source, digest)
    after = (directory / digest.filename).stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert (directory / (digest.filename + VERIFIED)).read_text() == str(digest)


def test_bytes_that_do_not_match_the_digest_leave_no_volume(
    remote: tuple[Host, Any, Path], image: tuple[Path, Digest]
) -> None:
    host, pool, _ = remote
    source, _ = image
    wrong = Digest(Algorithm.SHA512, "0" * 128)
    with pytest.raises(HypervisorError, match=f"the bytes sent for {wrong.filename} do not match its digest"):
        host.base_volume(pool, wrong.filename, source, wrong)
    pool.refresh(0)
    assert pool.listVolumes() == []
    with pytest.raises(libvirt.libvirtError):
        pool.storageVolLookupByName(wrong.filename + VERIFIED)


# -- another client's upload of the same image: awaited until its marker appears, never trusted before -------------


def _unmarked(host: Host, pool: Any, image: tuple[Path, Digest]) -> tuple[str, str]:
    """A complete volume of another client's upload, its marker not yet written: (name, marker)."""
    source, digest = image
    with source.open("rb") as f:
        host.upload_volume(pool, digest.filename, f, source.stat().st_size)
    return digest.filename, digest.filename + VERIFIED


def test_a_concurrent_upload_is_used_only_once_marked(
    remote: tuple[Host, Any, Path], image: tuple[Path, Digest]
) -> None:
    host, pool, directory = remote
    name, marker = _unmarked(host, pool, image)
    written = threading.Timer(2.0, lambda: (directory / marker).write_text(str(image[1])))
    written.start()
    try:
        vol = host._await_upload(pool, name, marker, timeout=20)
    finally:
        written.join()
    assert vol.name() == name
    assert (directory / marker).exists(), "returned before the other client's marker was written"


def test_a_concurrent_upload_that_failed_is_said(remote: tuple[Host, Any, Path], image: tuple[Path, Digest]) -> None:
    host, pool, _ = remote
    name = image[1].filename
    with pytest.raises(HypervisorError, match=f"^the concurrent upload of volume {name} failed; run the command"):
        host._await_upload(pool, name, name + VERIFIED, timeout=20)


def test_a_concurrent_upload_is_not_awaited_forever(remote: tuple[Host, Any, Path], image: tuple[Path, Digest]) -> None:
    host, pool, _ = remote
    name, marker = _unmarked(host, pool, image)
    started = time.monotonic()
    with pytest.raises(HypervisorError, match=f"^volume {name} is being uploaded by another client for over 3 s$"):
        host._await_upload(pool, name, marker, timeout=3.0)
    assert 3.0 <= time.monotonic() - started < 30


def test_upload_progress_counts_the_bytes_sent(remote: tuple[Host, Any, Path], image: tuple[Path, Digest]) -> None:
    host, pool, _ = remote
    source, digest = image
    calls: list[tuple[int, int | None]] = []
    host.base_volume(pool, digest.filename, source, digest, progress=lambda done, total: calls.append((done, total)))
    size = source.stat().st_size
    assert calls and calls[-1] == (size, size)
    assert [done for done, _ in calls] == sorted({done for done, _ in calls}) and all(t == size for _, t in calls)


class _ShortSends:
    """A libvirt stream that takes at most `limit` bytes per send, as virStreamSend may."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.received = bytearray()

    def send(self, data: bytes) -> int:
        taken = data[: self.limit]
        self.received += taken
        return len(taken)


def test_a_send_that_takes_part_of_a_chunk_is_continued_not_repeated() -> None:
    data = secrets.token_bytes(3 * 256 * 1024 + 777)
    stream = _ShortSends(100_003)
    hasher = hashlib.sha512()
    _send(stream, io.BytesIO(data), len(data), hasher, None)  # type: ignore[arg-type]
    assert bytes(stream.received) == data
    assert hasher.hexdigest() == hashlib.sha512(data).hexdigest()


# -- a local daemon: the cached file is hard-linked into the pool, never copied -------------------------------------


@pytest.fixture
def local(tmp_path: Path) -> Iterator[tuple[Host, Any, Path]]:
    """(local Host, its pool object, the pool's directory): a fresh transient directory pool on qemu:///system."""
    directory = tmp_path / "pool"
    directory.mkdir()
    root = ET.Element("pool", type="dir")
    ET.SubElement(root, "name").text = f"qinst-link-{secrets.token_hex(3)}"
    ET.SubElement(ET.SubElement(root, "target"), "path").text = str(directory)
    with Host("qemu:///system") as host:
        assert host.is_local
        pool = host.conn.storagePoolCreateXML(ET.tostring(root, encoding="unicode"), 0)
        try:
            yield host, pool, directory
        finally:
            for vol in pool.listAllVolumes():
                vol.delete(0)
            pool.destroy()


def test_a_local_base_volume_is_the_cached_file_itself(
    local: tuple[Host, Any, Path], image: tuple[Path, Digest]
) -> None:
    host, pool, directory = local
    source, digest = image
    vol = host.base_volume(pool, digest.filename, source, digest)
    assert vol.name() == digest.filename and vol.path() == str(directory / digest.filename)
    assert (directory / digest.filename).stat().st_ino == source.stat().st_ino  # a link: no second copy
    again = host.base_volume(pool, digest.filename, source, digest)  # a local volume needs no marker
    assert again.path() == vol.path() and not (directory / (digest.filename + VERIFIED)).exists()


def test_linking_an_already_linked_file_succeeds_and_another_filesystem_is_said(tmp_path: Path) -> None:
    source = tmp_path / "image"
    source.write_bytes(b"image")
    assert _hard_link(source, tmp_path / "link") is True
    assert (tmp_path / "link").stat().st_ino == source.stat().st_ino
    assert _hard_link(source, tmp_path / "link") is True  # another launch linked it a moment ago
    with tempfile.NamedTemporaryFile(dir="/dev/shm") as elsewhere:  # tmpfs: another filesystem than tmp_path
        assert _hard_link(Path(elsewhere.name), tmp_path / "cross") is False  # cannot link: upload instead
    assert not (tmp_path / "cross").exists()


def test_an_unmarked_sparse_volume_is_rehashed_with_its_holes(
    remote: tuple[Host, Any, Path], image: tuple[Path, Digest]
) -> None:
    """A volume whose zeros are holes on the host (copied sparse) has the same bytes: it is marked and kept."""
    host, pool, directory = remote
    source, digest = image
    host.base_volume(pool, digest.filename, source, digest)
    host.delete_volume(pool, digest.filename + VERIFIED)
    volume = directory / digest.filename
    subprocess.run(["cp", "--sparse=always", str(source), str(volume)], check=True)
    assert volume.stat().st_blocks * 512 < source.stat().st_size  # really has holes
    pool.refresh(0)
    before = volume.stat()
    host.base_volume(pool, digest.filename, source, digest)
    after = volume.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert (directory / (digest.filename + VERIFIED)).read_text() == str(digest)


def test_an_upload_racing_another_clients_waits_for_its_marker(
    remote: tuple[Host, Any, Path], image: tuple[Path, Digest], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another client creates the volume just after this one looked for it: this upload fails to create it, and
    the other's volume is used once its marker appears: not deleted, not uploaded again, not trusted before."""
    host, pool, directory = remote
    name, marker = _unmarked(host, pool, image)
    before = (directory / name).stat()
    looked: list[str] = []
    real_volume = host.volume

    def looked_up_before_the_other_client_created_it(p: Any, n: str) -> Any:
        if n == name and not looked:
            looked.append(n)
            return None
        return real_volume(p, n)

    monkeypatch.setattr(host, "volume", looked_up_before_the_other_client_created_it)
    written = threading.Timer(2.0, lambda: (directory / marker).write_text(str(image[1])))
    written.start()
    try:
        vol = host.base_volume(pool, name, image[0], image[1])
    finally:
        written.join()
    assert looked == [name] and vol.name() == name
    after = (directory / name).stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert (directory / marker).read_text() == str(image[1])
