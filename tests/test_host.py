"""host.py, the libvirt boundary: the `Domain` wrapper on libvirt's test driver (test:///default, in memory), a lost
connection, and base volumes.

Base volumes on a remote libvirt host: uploaded once through a libvirt stream, hashed, marked; a volume without
its `.verified` marker, truncated or corrupted, is re-hashed and replaced.

The remote host is the real libvirtd with a transient pool of the test's own, so no volume another test made (a
hard link of a local launch) can stand in for an upload. Most tests reach it through its local socket as a client
on another machine would (`_Streamed`: no hard link, every byte through a libvirt stream), which takes
milliseconds; one test goes through SSH (qemu+ssh://root@127.0.0.1, conftest's `sshd`), which takes seconds. The
waits on another client's upload poll every UPLOAD_POLL seconds (made short here) and take it over after `stale`
seconds (given short): no test waits seconds of real time. Each of those tests fails by a deadline (DEADLINE)
instead of hanging, whatever a broken upload loop does (scripts/mutation.sh runs these tests on such code).
"""

from __future__ import annotations

import hashlib
import io
import os
import secrets
import signal
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

from qemu_instances import host as host_module
from qemu_instances.digests import Algorithm, Digest, hash_file
from qemu_instances.errors import HypervisorError
from qemu_instances.host import UPLOAD_CHUNK, UPLOADING, VERIFIED, Host, _hard_link, _send
from qemu_instances.seals import SealStore
from testsupport.sshd import Sshd, serving_sshd
from testsupport.testdriver import NS, TEST_URI, plan_record


def test_domain_wrapper_states_and_metadata() -> None:
    with Host(TEST_URI) as host:
        dom = host.lookup("test")  # the test driver's own running domain
        assert dom is not None and dom.state()[0] == "running" and dom.is_active()
        dom.set_metadata(plan_record().to_xml(), "qinst", NS)
        assert f'xmlns:qinst="{NS}"' in dom.xml() or NS in dom.xml()
        dom.destroy()
        assert dom.state()[0] == "shutoff"
        dom.undefine()
        dom.undefine()  # gone already is not an error
        assert host.lookup("test") is None


def test_a_lost_connection_is_a_hypervisor_error_with_a_hint() -> None:
    # What libvirtd restarting under a waiting `up` looks like from here: the connection is gone.
    host = Host(TEST_URI)
    host.conn.close()
    with pytest.raises(HypervisorError) as err:
        host.lookup("test")
    assert err.value.exit_code == 4
    assert err.value.hint and "connection to libvirt was lost" in err.value.hint
    with pytest.raises(HypervisorError):
        host.domains()


@pytest.mark.libvirt
def test_a_connection_that_drops_is_exit_4_with_a_hint(tmp_path: Path) -> None:
    """libvirtd going away under a waiting `up`, without restarting the shared daemon: the connection goes through
    an sshd of our own (qemu+ssh://), and the test kills its ssh client process (a child of this process)."""
    with serving_sshd(tmp_path) as sshd, Host(sshd.uri) as host:
        host.lookup("qinst-no-such-domain")  # the connection works
        children = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()
        clients = [int(pid) for pid in children if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] == b"ssh"]
        assert clients, "libvirt's ssh client process was not found"
        for pid in clients:
            os.kill(pid, signal.SIGKILL)
        for call in (lambda: host.lookup("qinst-no-such-domain"), host.domains):
            with pytest.raises(HypervisorError) as err:
                call()
            assert err.value.exit_code == 4
            assert err.value.hint and "connection to libvirt was lost" in err.value.hint


# -- base volumes on a remote libvirt host -----------------------------------------------------------------------------


LOCAL = "qemu:///system"
DEADLINE = 120  # seconds: a test still running then fails (a loop that never ends, a wait never answered; far above
# what any of them takes at a load of 12 on 2 cores)


class _TimedOut(BaseException):
    """Raised by SIGALRM at a test's deadline (a BaseException: no `except Exception` of the code swallows it)."""


@pytest.fixture
def deadline_and_short_polls(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every base-volume test: SIGALRM at DEADLINE, and short polls of another client's upload."""

    def expire(_signum: int, _frame: Any) -> None:
        raise _TimedOut(f"the test ran over its {DEADLINE} s deadline")

    monkeypatch.setattr(host_module, "UPLOAD_POLL", 0.05)
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(DEADLINE)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


class _Streamed(Host):
    """The real libvirtd through its local socket, used as a remote host is: uploads go through libvirt streams."""

    @property
    def is_local(self) -> bool:
        return False


def _transient_pool(host: Host, directory: Path) -> Any:
    directory.mkdir()
    root = ET.Element("pool", type="dir")
    ET.SubElement(root, "name").text = f"qinst-upload-{secrets.token_hex(3)}"
    ET.SubElement(ET.SubElement(root, "target"), "path").text = str(directory)
    return host.conn.storagePoolCreateXML(ET.tostring(root, encoding="unicode"), 0)


def _drop(pool: Any) -> None:
    for vol in pool.listAllVolumes():
        vol.delete(0)
    pool.destroy()


@pytest.fixture
def remote(tmp_path: Path) -> Iterator[tuple[Host, Any, Path]]:
    """(a Host used as remote, its pool object, the pool's directory): a fresh transient directory pool."""
    with _Streamed(LOCAL) as host:
        assert not host.is_local
        pool = _transient_pool(host, tmp_path / "pool")
        try:
            yield host, pool, tmp_path / "pool"
        finally:
            _drop(pool)


@pytest.fixture
def over_ssh(sshd: Sshd, tmp_path: Path) -> Iterator[tuple[Host, Any, Path]]:
    """As `remote`, through SSH: a remote host as users reach it."""
    with Host(sshd.uri) as host:
        assert not host.is_local
        pool = _transient_pool(host, tmp_path / "pool")
        try:
            yield host, pool, tmp_path / "pool"
        finally:
            _drop(pool)


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, Digest]:
    path = make_qcow2(tmp_path / "base.qcow2", 2, seed=31).file
    return path, hash_file(path, Algorithm.SHA512)


def _sha512(path: Path) -> str:
    return hashlib.sha512(path.read_bytes()).hexdigest()


@pytest.mark.libvirt
@pytest.mark.promise
@pytest.mark.usefixtures("deadline_and_short_polls")
@pytest.mark.parametrize("through", ["stream", "ssh"])
def test_upload_verified_marked_and_not_repeated(
    through: str, request: pytest.FixtureRequest, image: tuple[Path, Digest]
) -> None:
    host, pool, directory = request.getfixturevalue("remote" if through == "stream" else "over_ssh")
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


@pytest.mark.libvirt
@pytest.mark.promise
@pytest.mark.usefixtures("deadline_and_short_polls")
@pytest.mark.parametrize("change", ["truncated", "appended"])
def test_a_marked_volume_of_another_size_is_replaced(
    change: str, remote: tuple[Host, Any, Path], image: tuple[Path, Digest]
) -> None:
    """A verified volume (its marker kept) cut short or with bytes appended: only a volume of exactly the image's
    size is trusted."""
    host, pool, directory = remote
    source, digest = image
    host.base_volume(pool, digest.filename, source, digest)
    with (directory / digest.filename).open("r+b") as f:
        if change == "truncated":
            f.truncate(source.stat().st_size // 2)
        else:
            f.seek(0, 2)
            f.write(b"appended by someone else" * 100)
    pool.refresh(0)
    host.base_volume(pool, digest.filename, source, digest)
    assert _sha512(directory / digest.filename) == digest.hex


@pytest.mark.libvirt
@pytest.mark.promise
@pytest.mark.usefixtures("deadline_and_short_polls")
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


@pytest.mark.libvirt
@pytest.mark.promise
@pytest.mark.usefixtures("deadline_and_short_polls")
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


@pytest.mark.libvirt
@pytest.mark.promise
@pytest.mark.usefixtures("deadline_and_short_polls")
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


# -- another client's upload of the same image: awaited while it is alive, never hashed, trusted or deleted -------


def _claimed(host: Host, pool: Any, image: tuple[Path, Digest], content: bytes | None = None) -> tuple[str, str, str]:
    """Another client's upload in progress: its claim and its volume, of full size, its marker not yet written:
    (name, marker, claim). `content`: the bytes written so far (default: all of them)."""
    source, digest = image
    data = source.read_bytes()
    if content is not None:
        data = content.ljust(len(data), b"\0")
    name = digest.filename
    host.upload_volume(pool, name + UPLOADING, io.BytesIO(b"another client"), len(b"another client"))
    host.upload_volume(pool, name, io.BytesIO(data), len(data))
    return name, name + VERIFIED, name + UPLOADING


def _another_client(pool: Any, *, marks: tuple[str, Digest] | None = None, deletes: tuple[str, ...] = ()) -> Any:
    """What another client ends its upload with, through its own connection: a marker written, volumes deleted."""

    def act() -> None:
        with _Streamed(LOCAL) as other:
            its_pool = other.conn.storagePoolLookupByName(pool.name())
            if marks is not None:
                other._mark(its_pool, *marks)
            for name in deletes:
                other.delete_volume(its_pool, name)

    return act


def _later(seconds: float, *actions: Any) -> threading.Timer:
    timer = threading.Timer(seconds, lambda: [action() for action in actions])
    timer.start()
    return timer


@pytest.mark.libvirt
@pytest.mark.promise
@pytest.mark.usefixtures("deadline_and_short_polls")
def test_a_claimed_upload_is_used_once_its_client_marks_it(
    remote: tuple[Host, Any, Path], image: tuple[Path, Digest]
) -> None:
    host, pool, directory = remote
    name, marker, claim = _claimed(host, pool, image)
    before = (directory / name).stat()
    done = _later(0.5, _another_client(pool, marks=(marker, image[1]), deletes=(claim,)))
    try:
        vol = host.base_volume(pool, name, image[0], image[1])
    finally:
        done.join()
    after = (directory / name).stat()
    assert vol.name() == name and (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert (directory / marker).read_text() == str(image[1]), "returned before the other client's marker"


@pytest.mark.libvirt
@pytest.mark.promise
@pytest.mark.usefixtures("deadline_and_short_polls")
def test_a_claimed_upload_that_failed_is_done_again(remote: tuple[Host, Any, Path], image: tuple[Path, Digest]) -> None:
    """The other client's upload fails (its volume and claim are removed): this one uploads the image itself."""
    host, pool, directory = remote
    name, marker, claim = _claimed(host, pool, image, content=b"half")
    failed = _later(0.5, _another_client(pool, deletes=(name, claim)))
    try:
        host.base_volume(pool, name, image[0], image[1])
    finally:
        failed.join()
    assert _sha512(directory / name) == image[1].hex
    assert (directory / marker).read_text() == str(image[1]) and not (directory / claim).exists()


@pytest.mark.libvirt
@pytest.mark.promise
@pytest.mark.usefixtures("deadline_and_short_polls")
def test_a_stalled_claimed_upload_is_taken_over(remote: tuple[Host, Any, Path], image: tuple[Path, Digest]) -> None:
    """A client died mid-upload: its claim and partial volume stay. Once nothing changed in them for `stale`
    seconds, they are replaced by a verified upload (not before)."""
    host, pool, directory = remote
    name, marker, claim = _claimed(host, pool, image, content=image[0].read_bytes()[:65536])
    started = time.monotonic()
    host.base_volume(pool, name, image[0], image[1], stale=0.5)
    assert time.monotonic() - started >= 0.5, "a claimed upload was taken over before it stalled"
    assert _sha512(directory / name) == image[1].hex
    assert (directory / marker).read_text() == str(image[1]) and not (directory / claim).exists()


@pytest.mark.libvirt
@pytest.mark.promise
@pytest.mark.usefixtures("deadline_and_short_polls")
def test_a_claim_whose_client_died_before_making_its_volume_is_taken_over(
    remote: tuple[Host, Any, Path], image: tuple[Path, Digest]
) -> None:
    """A client claimed the upload and died before creating the volume: the claim alone stays. With no volume to
    watch, nothing changes for `stale` seconds: the claim is removed and the image uploaded and verified."""
    host, pool, directory = remote
    name, claim = image[1].filename, image[1].filename + UPLOADING
    host.upload_volume(pool, claim, io.BytesIO(b"another client"), len(b"another client"))
    started = time.monotonic()
    host.base_volume(pool, name, image[0], image[1], stale=0.5)
    assert time.monotonic() - started >= 0.5, "a claimed upload was taken over before it stalled"
    assert _sha512(directory / name) == image[1].hex
    assert (directory / (name + VERIFIED)).read_text() == str(image[1]) and not (directory / claim).exists()


class _Paused:
    """A progress callback that stops an upload after its first chunk, until resumed."""

    def __init__(self) -> None:
        self.reached, self.go = threading.Event(), threading.Event()

    def __call__(self, done: int, total: int | None) -> None:
        if not self.reached.is_set():
            self.reached.set()
            assert self.go.wait(DEADLINE), "never resumed"


def _in_thread(call: Any) -> tuple[threading.Thread, list[Any]]:
    result: list[Any] = []

    def run() -> None:
        try:
            result.append(call())
        except BaseException as exc:  # the assertion below reports it
            result.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def _settled(path: Path) -> os.stat_result:
    """path's status once it stopped changing for a quarter of a second."""
    deadline = time.monotonic() + 30
    last = path.stat()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = path.stat()
        if now.st_mtime_ns == last.st_mtime_ns:
            return now
        last = now
    raise AssertionError(f"{path} kept changing")


@pytest.mark.libvirt
@pytest.mark.promise
@pytest.mark.usefixtures("deadline_and_short_polls")
@pytest.mark.parametrize("stalled", [False, True], ids=["alive", "stalled"])
def test_an_upload_paused_midstream_is_not_deleted_by_another_client(
    remote: tuple[Host, Any, Path],
    image: tuple[Path, Digest],
    stalled: bool,
) -> None:
    """Client A's upload stops after its first chunk. Client B (another connection) wants the same base volume:
    B waits and does not touch A's volume; A finishes and both use A's verified volume. When A stays paused longer
    than B's `stale`, B takes the upload over; A, resumed, uses B's verified volume and marks nothing of its own."""
    b, pool_b, directory = remote
    source, digest = image
    name = digest.filename
    assert source.stat().st_size > 2 * UPLOAD_CHUNK  # the pause is mid-stream
    paused = _Paused()
    with _Streamed(LOCAL) as a:
        pool_a = a.conn.storagePoolLookupByName(pool_b.name())
        thread_a, result_a = _in_thread(lambda: a.base_volume(pool_a, name, source, digest, progress=paused))
        try:
            assert paused.reached.wait(30), "A's upload never started"
            partial = _settled(directory / name)  # A's first chunk may still be on its way to the disk
            assert (directory / (name + UPLOADING)).exists() and not (directory / (name + VERIFIED)).exists()
            stale = 0.5 if stalled else 600.0
            thread_b, result_b = _in_thread(lambda: b.base_volume(pool_b, name, source, digest, stale=stale))
            if stalled:
                thread_b.join(30)
                assert not thread_b.is_alive() and not isinstance(result_b[0], BaseException), result_b
                assert (directory / name).stat().st_ino != partial.st_ino  # B's own upload replaced A's
            else:
                time.sleep(1.0)  # B looks 20 times meanwhile; nothing to wait for but time: B must do nothing
                assert thread_b.is_alive(), f"B did not wait for A's upload: {result_b}"
                now = (directory / name).stat()
                assert (now.st_ino, now.st_mtime_ns) == (partial.st_ino, partial.st_mtime_ns), "B touched A's volume"
        finally:
            paused.go.set()
        thread_a.join(30)
        thread_b.join(30)
    assert not thread_a.is_alive() and not thread_b.is_alive()
    vol_a, vol_b = result_a[0], result_b[0]
    assert not isinstance(vol_a, BaseException), vol_a
    assert not isinstance(vol_b, BaseException), vol_b
    assert vol_a.path() == vol_b.path() == str(directory / name)
    final = directory / name
    assert _sha512(final) == digest.hex
    assert (final.stat().st_ino == partial.st_ino) is not stalled
    assert (directory / (name + VERIFIED)).read_text() == str(digest)
    assert not (directory / (name + UPLOADING)).exists()


@pytest.mark.libvirt
@pytest.mark.promise
@pytest.mark.usefixtures("deadline_and_short_polls")
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


@pytest.mark.libvirt
@pytest.mark.promise
@pytest.mark.usefixtures("deadline_and_short_polls")
def test_a_send_that_takes_part_of_a_chunk_is_continued_not_repeated() -> None:
    data = secrets.token_bytes(3 * 256 * 1024 + 777)
    stream = _ShortSends(100_003)
    hasher = hashlib.sha512()
    _send(stream, io.BytesIO(data), len(data), hasher, None)  # type: ignore[arg-type]
    assert bytes(stream.received) == data
    assert hasher.hexdigest() == hashlib.sha512(data).hexdigest()


class _CountedReads(io.BytesIO):
    """A source that records how much each read asked for."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.asked: list[int | None] = []

    def read(self, size: int | None = -1, /) -> bytes:
        self.asked.append(size)
        return super().read(size)


@pytest.mark.libvirt
@pytest.mark.promise
@pytest.mark.usefixtures("deadline_and_short_polls")
def test_an_upload_holds_one_chunk_at_a_time_whatever_the_image_size() -> None:
    # Images are GiBs: the upload streams them in bounded chunks, never the whole file into memory.
    data = secrets.token_bytes(5 * UPLOAD_CHUNK + 1)
    source = _CountedReads(data)
    stream = _ShortSends(len(data))
    _send(stream, source, len(data), None, None)  # type: ignore[arg-type]
    assert bytes(stream.received) == data
    assert source.asked and all(n is not None and 0 < n <= UPLOAD_CHUNK for n in source.asked), source.asked


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


@pytest.mark.libvirt
@pytest.mark.promise
@pytest.mark.usefixtures("deadline_and_short_polls")
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


@pytest.mark.libvirt
@pytest.mark.promise
@pytest.mark.usefixtures("deadline_and_short_polls")
def test_linking_an_already_linked_file_succeeds_and_another_filesystem_is_said(tmp_path: Path) -> None:
    source = tmp_path / "image"
    source.write_bytes(b"image")
    assert _hard_link(source, tmp_path / "link") is True
    assert (tmp_path / "link").stat().st_ino == source.stat().st_ino
    assert _hard_link(source, tmp_path / "link") is True  # another launch linked it a moment ago
    with tempfile.NamedTemporaryFile(dir="/dev/shm") as elsewhere:  # tmpfs: another filesystem than tmp_path
        assert _hard_link(Path(elsewhere.name), tmp_path / "cross") is False  # cannot link: upload instead
    assert not (tmp_path / "cross").exists()


@pytest.mark.libvirt
@pytest.mark.promise
@pytest.mark.usefixtures("deadline_and_short_polls")
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


@pytest.mark.libvirt
@pytest.mark.promise
@pytest.mark.usefixtures("deadline_and_short_polls")
def test_an_upload_racing_another_clients_waits_for_its_marker(
    remote: tuple[Host, Any, Path], image: tuple[Path, Digest], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another client claims the upload just after this one looked: this one's claim fails, and the other's
    volume is used once its marker appears: not deleted, not uploaded again, not trusted before."""
    host, pool, directory = remote
    name, marker, claim = _claimed(host, pool, image)
    before = (directory / name).stat()
    looked: list[str] = []
    real_volume = host.volume

    def looked_up_before_the_other_client_claimed_it(p: Any, n: str) -> Any:
        if n in (name, claim) and n not in looked:
            looked.append(n)
            return None
        return real_volume(p, n)

    monkeypatch.setattr(host, "volume", looked_up_before_the_other_client_claimed_it)
    done = _later(0.5, _another_client(pool, marks=(marker, image[1]), deletes=(claim,)))
    try:
        vol = host.base_volume(pool, name, image[0], image[1])
    finally:
        done.join()
    assert set(looked) == {name, claim} and vol.name() == name
    after = (directory / name).stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert (directory / marker).read_text() == str(image[1])


@pytest.mark.libvirt
@pytest.mark.promise
@pytest.mark.usefixtures("deadline_and_short_polls")
def test_two_clients_marking_the_same_volume_at_once_both_succeed(
    remote: tuple[Host, Any, Path], image: tuple[Path, Digest]
) -> None:
    """Two clients hash the same unmarked volume and mark it: the second finds the marker made and carries on."""
    host, pool, directory = remote
    digest = image[1]
    marker = digest.filename + VERIFIED
    host._mark(pool, marker, digest)
    host._mark(pool, marker, digest)  # the other client's marker is as good as this one's
    assert (directory / marker).read_text() == str(digest)
    with pytest.raises(HypervisorError, match="cannot create volume"):
        host._mark(pool, "../" + marker, digest)  # a marker that cannot be made is an error, not a silent pass


@pytest.mark.libvirt
@pytest.mark.promise
@pytest.mark.usefixtures("deadline_and_short_polls")
def test_a_slow_upload_that_keeps_progressing_is_not_taken_over(remote: tuple[Host, Any, Path], tmp_path: Path) -> None:
    """Client A sends a chunk every 0.25 s, for longer in all than B's `stale` (5 s: twenty gaps, so that a loaded
    machine's pauses, seconds long at a load of 12 on 2 cores, are not taken for a stall): as long as its volume keeps
    changing, B waits for it; both end with A's volume."""
    b, pool_b, directory = remote
    source = make_qcow2(tmp_path / "slow.qcow2", 8, seed=37).file
    digest = hash_file(source, Algorithm.SHA512)
    name = digest.filename
    chunks = source.stat().st_size // UPLOAD_CHUNK
    assert chunks * 0.25 > 1.5 * 5.0  # the upload lasts well over B's stale
    with _Streamed(LOCAL) as a:
        pool_a = a.conn.storagePoolLookupByName(pool_b.name())
        started = threading.Event()

        def slowly(done: int, total: int | None) -> None:
            started.set()
            time.sleep(0.25)

        thread_a, result_a = _in_thread(lambda: a.base_volume(pool_a, name, source, digest, progress=slowly))
        assert started.wait(30), "A's upload never started"
        inode = (directory / name).stat().st_ino
        vol_b = b.base_volume(pool_b, name, source, digest, stale=5.0)
        thread_a.join(60)
    assert not thread_a.is_alive() and not isinstance(result_a[0], BaseException), result_a
    assert vol_b.path() == result_a[0].path() and (directory / name).stat().st_ino == inode, "B took the upload over"
    assert _sha512(directory / name) == digest.hex
    assert (directory / (name + VERIFIED)).read_text() == str(digest)


@pytest.mark.libvirt
@pytest.mark.promise
@pytest.mark.usefixtures("deadline_and_short_polls")
def test_a_volume_deleted_under_a_reader_is_an_error_naming_it(remote: tuple[Host, Any, Path]) -> None:
    """Another client deletes a volume this one just looked up: reading its size is a one-line error naming it."""
    host, pool, _ = remote
    vol = host.upload_volume(pool, "gone", io.BytesIO(b"bytes"), 5)
    pool.storageVolLookupByName("gone").delete(0)
    with pytest.raises(HypervisorError, match=r"^cannot read volume gone: "):
        host._physical(vol, "gone")


class _FailsAfterOneChunk(io.BytesIO):
    """A source whose disk fails after the first chunk."""

    def read(self, size: int | None = -1, /) -> bytes:
        if self.tell() > 0:
            raise OSError("the cached image became unreadable")
        return super().read(size)


@pytest.mark.libvirt
@pytest.mark.promise
@pytest.mark.usefixtures("deadline_and_short_polls")
def test_an_upload_that_fails_midstream_leaves_no_volume_and_says_why(local: tuple[Host, Any, Path]) -> None:
    host, pool, directory = local
    data = secrets.token_bytes(3 * UPLOAD_CHUNK)
    with pytest.raises(OSError, match="the cached image became unreadable"):
        host.upload_volume(pool, "half.raw", _FailsAfterOneChunk(data), len(data))
    assert "half.raw" not in host.volume_names(pool)
    assert not (directory / "half.raw").exists()


@pytest.mark.libvirt
@pytest.mark.promise
@pytest.mark.usefixtures("deadline_and_short_polls")
def test_an_upload_of_more_bytes_than_announced_is_an_error_naming_the_volume(remote: tuple[Host, Any, Path]) -> None:
    """The image grew after its size was read: libvirtd refuses the bytes beyond the volume's end, and the stream,
    failed already, refuses the clean-up's abort too. That second failure must not hide the first: the error is
    the one-line HypervisorError naming the volume, and no volume is left."""
    host, pool, directory = remote
    data = secrets.token_bytes(UPLOAD_CHUNK + 1)
    with pytest.raises(HypervisorError, match=r"^cannot upload volume grown\.raw: \S"):
        host.upload_volume(pool, "grown.raw", io.BytesIO(data), UPLOAD_CHUNK)
    assert "grown.raw" not in host.volume_names(pool)
    assert not (directory / "grown.raw").exists()


@pytest.mark.libvirt
@pytest.mark.promise
@pytest.mark.usefixtures("deadline_and_short_polls")
def test_a_failed_upload_whose_volume_another_client_deleted_raises_its_own_error(
    remote: tuple[Host, Any, Path],
) -> None:
    """While this client uploads, another one deletes the volume (a prune), then this client's source fails: the
    clean-up's delete finds no volume, which must not replace the upload's own error."""
    host, pool, directory = remote
    other_client = _another_client(pool, deletes=("taken.raw",))

    class _DeletedThenFails(io.BytesIO):
        def read(self, size: int | None = -1, /) -> bytes:
            if self.tell() > 0:
                other_client()
                raise OSError("the cached image became unreadable")
            return super().read(size)

    data = secrets.token_bytes(3 * UPLOAD_CHUNK)
    with pytest.raises(OSError, match="the cached image became unreadable"):
        host.upload_volume(pool, "taken.raw", _DeletedThenFails(data), len(data))
    assert "taken.raw" not in host.volume_names(pool)
    assert not (directory / "taken.raw").exists()


# -- a base volume is the verified bytes or nothing (issue 21) ---------------------------------------------------------


def _same_size_other_bytes(path: Path, size: int) -> None:
    path.write_bytes(bytes(size))  # zeros: the right size, other bytes


@pytest.mark.libvirt
@pytest.mark.promise
@pytest.mark.usefixtures("deadline_and_short_polls")
def test_a_planted_local_file_of_the_right_size_is_replaced_by_the_cached_file(
    local: tuple[Host, Any, Path], image: tuple[Path, Digest]
) -> None:
    """The attack: a file named like the pin, of the right size, planted in the pool before any launch. On a local
    daemon a volume is used only when it is the cached, verified file itself (same inode)."""
    host, pool, directory = local
    source, digest = image
    planted = directory / digest.filename
    _same_size_other_bytes(planted, source.stat().st_size)
    pool.refresh(0)
    vol = host.base_volume(pool, digest.filename, source, digest)
    assert (directory / digest.filename).stat().st_ino == source.stat().st_ino
    assert _sha512(Path(vol.path())) == digest.hex


@pytest.mark.libvirt
@pytest.mark.promise
@pytest.mark.usefixtures("deadline_and_short_polls")
def test_a_local_link_replaced_by_other_bytes_is_replaced_again(
    local: tuple[Host, Any, Path], image: tuple[Path, Digest]
) -> None:
    host, pool, directory = local
    source, digest = image
    host.base_volume(pool, digest.filename, source, digest)
    (directory / digest.filename).unlink()
    _same_size_other_bytes(directory / digest.filename, source.stat().st_size)
    host.base_volume(pool, digest.filename, source, digest)
    assert (directory / digest.filename).stat().st_ino == source.stat().st_ino


@pytest.mark.libvirt
@pytest.mark.promise
@pytest.mark.usefixtures("deadline_and_short_polls")
def test_a_forged_marker_beside_other_bytes_is_not_trusted(
    remote: tuple[Host, Any, Path], image: tuple[Path, Digest], tmp_path: Path
) -> None:
    """On a remote daemon anyone with pool access can create `<pin>.verified`: the volume is hashed anyway."""
    host, pool, directory = remote
    source, digest = image
    _same_size_other_bytes(directory / digest.filename, source.stat().st_size)
    (directory / (digest.filename + VERIFIED)).write_text(str(digest))
    pool.refresh(0)
    seals = SealStore(tmp_path / "cache", host.uri)
    host.base_volume(pool, digest.filename, source, digest, seals=seals)
    assert _sha512(directory / digest.filename) == digest.hex


@pytest.mark.libvirt
@pytest.mark.promise
@pytest.mark.usefixtures("deadline_and_short_polls")
def test_a_sealed_volume_is_used_without_reading_it_again(
    remote: tuple[Host, Any, Path], image: tuple[Path, Digest], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host, pool, _ = remote
    source, digest = image
    seals = SealStore(tmp_path / "cache", host.uri)
    host.base_volume(pool, digest.filename, source, digest, seals=seals)

    def no_reading(*_: object) -> Digest:
        raise AssertionError("a sealed, unchanged volume was read back")

    monkeypatch.setattr(Host, "volume_digest", no_reading)
    host.base_volume(pool, digest.filename, source, digest, seals=seals)


@pytest.mark.libvirt
@pytest.mark.promise
@pytest.mark.usefixtures("deadline_and_short_polls")
@pytest.mark.parametrize("change", ["same-bytes-rewritten", "other-bytes"])
def test_a_sealed_volume_changed_afterwards_is_hashed_again(
    change: str,
    remote: tuple[Host, Any, Path],
    image: tuple[Path, Digest],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Any write changes the volume's ctime, which nobody can set back: the seal no longer matches, the bytes are
    hashed again, and kept only when they are still the image's."""
    host, pool, directory = remote
    source, digest = image
    seals = SealStore(tmp_path / "cache", host.uri)
    host.base_volume(pool, digest.filename, source, digest, seals=seals)
    volume = directory / digest.filename
    time.sleep(0.01)
    if change == "other-bytes":
        _same_size_other_bytes(volume, source.stat().st_size)
    else:
        volume.write_bytes(source.read_bytes())
    hashed: list[str] = []
    real = Host.volume_digest
    monkeypatch.setattr(
        Host, "volume_digest", lambda self, vol, like: hashed.append(vol.name()) or real(self, vol, like)
    )
    host.base_volume(pool, digest.filename, source, digest, seals=seals)
    assert _sha512(volume) == digest.hex
    assert hashed == [digest.filename]  # read back once: kept when the same bytes, replaced otherwise
    host.base_volume(pool, digest.filename, source, digest, seals=seals)
    assert hashed == [digest.filename]  # sealed again: not read a second time


@pytest.mark.libvirt
@pytest.mark.promise
@pytest.mark.usefixtures("deadline_and_short_polls")
def test_up_never_boots_a_planted_base_volume(tmp_path: Path) -> None:
    """The attack through the real entry point: a file named sha256-<digest of the image> of the right size, other
    bytes, planted in the `qinst` pool before `qinst up`: the domain's backing file is the verified image."""
    from testsupport.qinst import qinst_argv, qinst_env

    image = make_qcow2(tmp_path / "tiny.qcow2", 1, seed=int.from_bytes(os.urandom(4), "big")).file
    digest = hash_file(image, Algorithm.SHA256)
    with Host(LOCAL) as host:
        pool = host.pool()
        planted = host.pool_path(pool) / digest.filename
        planted.write_bytes(bytes(image.stat().st_size))
        pool.refresh(0)
    name = f"planted-{secrets.token_hex(3)}"
    env = qinst_env(QINST_CONNECT=LOCAL, QINST_CACHE_DIR=str(tmp_path / "cache"), HOME=str(tmp_path))
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "id")], check=True)
    up = [*qinst_argv(), "up", str(image), "--name", name, "--no-wait", "--accel", "tcg", "--network", "user:restrict",
          "--ssh-key", str(tmp_path / "id.pub"), "--memory", "128"]  # fmt: skip
    try:
        proc = subprocess.run(up, capture_output=True, text=True, env=env, timeout=120, check=False)
        assert proc.returncode == 0, proc.stderr
        cached = tmp_path / "cache" / "images" / digest.filename
        assert planted.stat().st_ino == cached.stat().st_ino  # replaced by the cached, verified file itself
        assert _sha512(planted) == hashlib.sha512(image.read_bytes()).hexdigest()
    finally:
        subprocess.run([*qinst_argv(), "rm", "--force", name], env=env, capture_output=True, check=False)
        planted.unlink(missing_ok=True)
        with Host(LOCAL) as host:
            host.pool().refresh(0)
