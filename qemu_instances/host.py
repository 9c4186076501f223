"""The libvirt side: connection, what the host can do, domains, the storage pool and its volumes.

This is the only module that imports libvirt: everything above it speaks qinst's types (Host, Domain) and
QinstError. libvirt.libvirtError is translated into HypervisorError here, at this one boundary, by its error code.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias
from urllib.parse import urlsplit

import libvirt

from qemu_instances.digests import Digest
from qemu_instances.errors import HypervisorError
from qemu_instances.faults import _test_pause
from qemu_instances.logs import log
from qemu_instances.seals import Seal
from qemu_instances.text import tail_lines, utf8_decoder

if TYPE_CHECKING:
    from qemu_instances.download import Progress
    from qemu_instances.seals import SealStore

# libvirt's handles, named for readers (libvirt-python ships no type information: to mypy they are Any). Only this
# module touches their methods; above it they are opaque tokens handed back to Host.
Pool: TypeAlias = libvirt.virStoragePool
Volume: TypeAlias = libvirt.virStorageVol
POOL_NAME = "qinst"
UPLOAD_CHUNK = 256 << 10  # bytes handed to a libvirt stream at a time (its largest message payload)
VERIFIED = ".verified"  # suffix of the marker volume of a completed, verified upload
UPLOADING = ".uploading"  # suffix of the claim volume of an upload in progress (a random token)
STALE_UPLOAD = 120.0  # seconds without progress after which another client's upload is taken over
UPLOAD_POLL = 1.0  # seconds between two looks at another client's upload

# libvirt prints every error to stderr by default; we report them ourselves, once.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


# libvirt's domain states, as qinst names them.
STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: "nostate",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "running",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutting-down",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended",
}
# Error codes that mean the connection itself is gone (libvirtd restarted or stopped, the SSH tunnel dropped).
_CONNECTION_LOST = frozenset({libvirt.VIR_ERR_INVALID_CONN, libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_RPC})
_LOST_HINT = "the connection to libvirt was lost (was libvirtd restarted?); check it with 'qinst doctor'"


def _connection_lost(exc: libvirt.libvirtError) -> bool:
    """The connection itself failed: its error code says so, or the error comes from the RPC transport (EOF,
    broken pipe, connection reset, a closed client socket)."""
    return exc.get_error_code() in _CONNECTION_LOST or exc.get_error_domain() == libvirt.VIR_FROM_RPC


@contextmanager
def libvirt_errors(action: str, hint: str | None = None) -> Iterator[None]:
    """Translate libvirtError raised inside into HypervisorError("<action>: <libvirt's message>")."""
    try:
        yield
    except libvirt.libvirtError as exc:
        if hint is None and _connection_lost(exc):
            hint = _LOST_HINT
        raise HypervisorError(f"{action}: {tidy(exc.get_error_message() or str(exc))}", hint=hint) from exc


@contextmanager
def _ignoring(action: str, *codes: int) -> Iterator[None]:
    """Swallow libvirtError with one of `codes` (the object is gone already); translate the others."""
    try:
        yield
    except libvirt.libvirtError as exc:
        if exc.get_error_code() in codes:
            return
        with libvirt_errors(action):
            raise


def tidy(message: str) -> str:
    """libvirt's message on one line, without QEMU's timestamps."""
    lines = (re.sub(r"\d{4}-\d\d-\d\dT[\d:.]+Z ", "", line).strip() for line in message.splitlines())
    return "; ".join(line for line in lines if line)


def _hard_link(source: Path, target: Path) -> bool:
    """Link the cached file into the pool (no second copy); False when they are on different filesystems."""
    try:
        os.link(source, target)
    except FileExistsError:
        return True  # another launch linked the same verified file a moment ago
    except OSError:
        return False
    return True


def _send(
    stream: libvirt.virStream, data: io.BufferedIOBase | io.BytesIO, size: int, hasher: Any, progress: Progress | None
) -> None:
    """Send data's bytes on a blocking libvirt stream, hashing them on a second thread while they travel.

    hashlib and libvirt both release the GIL for big buffers, so hashing costs no wall time; sends that take
    only part of a chunk are continued (virStream.sendAll would drop the rest).
    """
    import concurrent.futures  # here: it imports logging, which `ls` does without

    sent = 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="hash") as pool:
        pending: concurrent.futures.Future[None] | None = None
        while chunk := data.read(UPLOAD_CHUNK):
            if hasher is not None:
                if pending is not None:
                    pending.result()  # keep the hash's order, and at most one chunk behind
                pending = pool.submit(hasher.update, chunk)
            view = memoryview(chunk)
            while view:
                n = stream.send(view.tobytes() if len(view) < len(chunk) else chunk)
                if n < 0:
                    raise HypervisorError("the libvirt stream refused data")
                view = view[n:]
            sent += len(chunk)
            if progress is not None:
                progress(sent, size)
        if pending is not None:
            pending.result()


@dataclass(frozen=True)
class KvmStatus:
    usable: bool
    reason: str


def probe_kvm() -> KvmStatus:
    """Is /dev/kvm there and does it answer KVM_GET_API_VERSION and KVM_CREATE_VM? (Local host only.)"""
    kvm_get_api_version, kvm_create_vm = 0xAE00, 0xAE01
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return KvmStatus(False, f"/dev/kvm: {exc.strerror}")
    try:
        if fcntl.ioctl(fd, kvm_get_api_version) != 12:
            return KvmStatus(False, "/dev/kvm answers an unexpected API version")
        vm = fcntl.ioctl(fd, kvm_create_vm, 0)
        os.close(vm)
    except OSError as exc:
        return KvmStatus(False, f"KVM ioctls fail: {exc.strerror}")
    finally:
        os.close(fd)
    return KvmStatus(True, "/dev/kvm answers")


def uri_is_local(uri: str) -> bool:
    """True when the daemon runs on this machine (no host in the URI)."""
    return not urlsplit(uri).hostname


def uri_is_test_driver(uri: str) -> bool:
    """libvirt's test driver (test:///...): it runs nothing, and its capabilities describe no real host."""
    return urlsplit(uri).scheme == "test"


class Host:
    """A libvirt connection and qinst's storage pool on it."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        with libvirt_errors(
            f"cannot connect to libvirt at {uri}",
            hint="is libvirtd running? (start it with: virtlogd -d && libvirtd -d, or systemctl start libvirtd)",
        ):
            self.conn = libvirt.open(uri)

    def close(self) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            self.conn.close()

    def __enter__(self) -> Host:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def is_local(self) -> bool:
        return uri_is_local(self.uri)

    @property
    def is_test_driver(self) -> bool:
        return uri_is_test_driver(self.uri)

    @property
    def is_system(self) -> bool:
        return urlsplit(self.uri).path.rstrip("/") == "/system"

    # -- domains ------------------------------------------------------------------------------------------------

    def lookup(self, name: str) -> Domain | None:
        """The domain named `name`; None when there is none."""
        try:
            return Domain(self, self.conn.lookupByName(name))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            with libvirt_errors(f"cannot look up domain {name}"):
                raise

    def domains(self) -> list[Domain]:
        with libvirt_errors("cannot list domains"):
            return [Domain(self, handle) for handle in self.conn.listAllDomains(0)]

    def paused_domains(self) -> list[tuple[Domain, bool]]:
        """The paused domains, each with whether it was paused by a user (one call)."""
        with libvirt_errors("cannot list domains"):
            stats = self.conn.getAllDomainStats(
                libvirt.VIR_DOMAIN_STATS_STATE, libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_PAUSED
            )
        return [
            (Domain(self, handle), isinstance(v, dict) and v.get("state.reason") == libvirt.VIR_DOMAIN_PAUSED_USER)
            for handle, v in stats
        ]

    def domain_records(self, namespace: str) -> list[tuple[Domain, str, str | None]]:
        """Every domain with its state and its metadata element in `namespace` (None without one): one call lists
        the domains with their states, then one call per domain reads its metadata (`ls` costs nothing more)."""
        with libvirt_errors("cannot list domains"):
            stats = self.conn.getAllDomainStats(libvirt.VIR_DOMAIN_STATS_STATE, 0)
        found = []
        for handle, values in stats:
            dom = Domain(self, handle)
            try:
                meta = dom.metadata(namespace)
            except HypervisorError:
                continue  # removed while we looked
            state = values.get("state.state") if isinstance(values, dict) else None
            found.append((dom, STATES.get(state, "unknown"), meta))
        return found

    def define_and_start(self, xml: str, name: str, *, paused: bool = False) -> Domain:
        """Define the domain and start it (with its vCPUs paused: a confidential guest waits for its owner's check);
        a domain that does not start is undefined again (and the error raised)."""
        with libvirt_errors(f"libvirt refused the domain {name}"):
            dom = Domain(self, self.conn.defineXML(xml))
        _test_pause("define")
        try:
            dom.start(paused=paused)
        except BaseException:
            dom.undefine()
            raise
        return dom

    def start_transient(self, xml: str, action: str) -> Domain:
        """Create and start a transient domain that libvirt destroys when this connection closes."""
        with libvirt_errors(action):
            return Domain(self, self.conn.createXML(xml, libvirt.VIR_DOMAIN_START_AUTODESTROY))

    # -- the host -----------------------------------------------------------------------------------------------

    def versions(self) -> tuple[int, int]:
        """(libvirt's version, the hypervisor's version) as libvirt encodes them (major * 1e6 + minor * 1e3 + micro)."""
        with libvirt_errors("cannot query libvirt"):
            return int(self.conn.getLibVersion()), int(self.conn.getVersion())

    def hypervisor_version(self) -> int:
        """QEMU's version as libvirt encodes it (one call: `up` keys the remembered KVM verdict with it)."""
        with libvirt_errors("cannot query libvirt"):
            return int(self.conn.getVersion())

    def free_memory(self) -> int:
        with libvirt_errors("cannot read the host's free memory"):
            return int(self.conn.getFreeMemory())

    def networks(self) -> list[tuple[str, bool]]:
        """(name, active) of every libvirt network."""
        with libvirt_errors("cannot list networks"):
            return [(net.name(), bool(net.isActive())) for net in self.conn.listAllNetworks(0)]

    # -- capabilities -------------------------------------------------------------------------------------------

    def _capabilities(self) -> ET.Element:
        with libvirt_errors("cannot read the host's capabilities"):
            return ET.fromstring(self.conn.getCapabilities())

    def host_arch(self) -> str:
        """The host's CPU architecture as libvirt reports it (x86_64, aarch64...): a remote host's own."""
        return self._capabilities().findtext("host/cpu/arch") or ""

    def domain_types(self, arch: str = "x86_64") -> set[str]:
        """Domain types QEMU offers for `arch` guests here ("qemu" for TCG, "kvm"); empty when its emulator is
        missing."""
        types = set()
        for guest in self._capabilities().iterfind("guest"):
            found = guest.find("arch")
            if found is not None and found.get("name") == arch:
                types |= {d.get("type", "") for d in found.iterfind("domain")}
        return types

    def kvm_available(self, arch: str = "x86_64") -> KvmStatus:
        if "kvm" not in self.domain_types(arch):
            return KvmStatus(False, f"libvirt offers no kvm domain type for {arch}")
        return probe_kvm() if self.is_local else KvmStatus(True, "libvirt offers kvm")

    def network_names(self) -> list[str]:
        with libvirt_errors("cannot list libvirt networks"):
            return sorted(self.conn.listNetworks() + self.conn.listDefinedNetworks())

    def ensure_network_active(self, name: str) -> None:
        with libvirt_errors(f"cannot start libvirt network {name!r}"):
            net = self.conn.networkLookupByName(name)
            if not net.isActive():
                net.create()

    # -- storage ------------------------------------------------------------------------------------------------

    def default_pool_path(self) -> Path:
        if self.is_system:
            return Path("/var/lib/libvirt/images") / POOL_NAME
        data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local/share")
        return Path(data) / "libvirt/images" / POOL_NAME

    def pool(self, create: bool = True) -> Pool:
        """The `qinst` directory pool, defined, built and started when missing."""
        with libvirt_errors(f"cannot set up the libvirt storage pool {POOL_NAME!r}"):
            try:
                pool = self.conn.storagePoolLookupByName(POOL_NAME)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_POOL or not create:
                    raise
                root = ET.Element("pool", type="dir")
                ET.SubElement(root, "name").text = POOL_NAME
                target = ET.SubElement(root, "target")
                ET.SubElement(target, "path").text = str(self.default_pool_path())
                pool = self.conn.storagePoolDefineXML(ET.tostring(root, encoding="unicode"), 0)
                pool.build(0)
                pool.setAutostart(1)
            if not pool.isActive():
                pool.create(0)
            return pool

    def pool_names(self) -> list[str]:
        with libvirt_errors("cannot list storage pools"):
            return sorted(self.conn.listStoragePools() + self.conn.listDefinedStoragePools())

    def volume_names(self, pool: Pool) -> list[str]:
        with libvirt_errors("cannot list volumes"):
            pool.refresh(0)
            return sorted(pool.listVolumes())

    def pool_path(self, pool: Pool) -> Path:
        with libvirt_errors("cannot read the storage pool"):
            root = ET.fromstring(pool.XMLDesc(0))
        return Path(root.findtext("target/path") or "")

    def volume(self, pool: Pool, name: str) -> Volume | None:
        try:
            return pool.storageVolLookupByName(name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_VOL:
                return None
            raise HypervisorError(f"cannot look up volume {name}: {exc.get_error_message()}") from exc

    def volume_path(self, vol: Volume) -> str:
        with libvirt_errors("cannot read a volume's path"):
            return str(vol.path())

    def volume_size(self, vol: Volume) -> int:
        """The bytes the volume takes on the host."""
        with libvirt_errors("cannot read a volume's size"):
            return int(vol.info()[2])

    def volume_age(self, vol: Volume) -> float | None:
        """Seconds since the volume last changed, when libvirt says (None otherwise)."""
        try:
            mtime = ET.fromstring(vol.XMLDesc(0)).findtext("target/timestamps/mtime")
            return time.time() - float(mtime) if mtime else None
        except (libvirt.libvirtError, ET.ParseError, ValueError):
            return None

    def upload_alive(self, pool: Pool, name: str, stale: float = STALE_UPLOAD) -> bool:
        """Whether a claimed upload of base volume `name` may still be going on, for a one-look caller (prune)
        that cannot watch it the way `_await_upload` does: its claim exists and the claim or the volume changed
        less than `stale` seconds ago by libvirt's clock (alive too when libvirt gives no time). Older, the
        uploading client died: `_await_upload` would take it over."""
        claim = self.volume(pool, name + UPLOADING)
        if claim is None:
            return False
        vol = self.volume(pool, name)
        ages = [self.volume_age(v) for v in (claim, vol) if v is not None]
        return any(age is None or age < stale for age in ages)

    def pool_free(self, pool: Pool) -> int:
        with libvirt_errors("cannot read the storage pool"):
            return int(pool.info()[3])

    def delete_volume(self, pool: Pool, name: str) -> bool:
        """Delete volume `name`; False when there is none (also when another client deleted it meanwhile)."""
        vol = self.volume(pool, name)
        if vol is None:
            return False
        try:
            vol.delete(0)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_VOL:
                return False
            raise HypervisorError(f"cannot delete volume {name}: {tidy(exc.get_error_message() or str(exc))}") from exc
        return True

    def base_volume(
        self,
        pool: Pool,
        name: str,
        source: Path,
        digest: Digest,
        progress: Progress | None = None,
        stale: float = STALE_UPLOAD,
        seals: SealStore | None = None,
    ) -> Volume:
        """The cached image (`source`, verified against `digest`) as the pool volume `name`: the verified bytes, or
        nothing.

        A volume already there is used only when it is the verified image: on a local daemon, the cached file itself
        (a hard link: same device and inode); else a volume whose identity still matches this client's seal of it
        (seals.py); else its bytes are hashed through a libvirt stream and it is sealed when they match. Anything
        else is replaced. A missing volume becomes a hard link to the cached file on a local daemon (no second copy);
        otherwise it is uploaded once through a libvirt stream, hashed while it is sent, and sealed.

        Concurrent clients: an upload first creates a claim volume `name.uploading` (libvirt creates a volume only
        when the name is free, so one client wins) holding a random token; while another client's claim exists its
        upload is awaited, not hashed or deleted, unless nothing changed in it for `stale` seconds (that client
        died): then the claim and its partial volume are replaced. The marker volume `name.verified` a completed
        upload writes tells older qinst clients it completed; it is never trusted (anyone with pool access can make
        one).
        """
        size = source.stat().st_size
        claim = name + UPLOADING
        while True:
            vol = self.volume(pool, name)
            if vol is not None and (self._same_file(vol, source) or self._sealed(vol, digest, seals)):
                return vol
            if self.volume(pool, claim) is not None:
                self._await_upload(pool, name, claim, stale)
                continue  # the other upload ended (marked, failed or stale): look again
            if vol is not None:
                if self._physical(vol, name) == size and self.volume_digest(vol, digest) == digest:
                    self._seal(vol, digest, seals)
                    if not self.is_local:
                        self._mark(pool, name + VERIFIED, digest)
                    return vol
                log.warning("volume %s is not the verified image (other bytes or size); replacing it", name)
                self.delete_volume(pool, name)
            target = self.pool_path(pool) / name
            if self.is_local and target.parent.is_dir() and _hard_link(source, target):
                with libvirt_errors("cannot refresh the storage pool"):
                    pool.refresh(0)
                    vol = pool.storageVolLookupByName(name)
                if self._same_file(vol, source):
                    return vol
                continue  # a file appeared there meanwhile: it is checked (and replaced) like any other
            uploaded = self._upload_claimed(pool, name, source, digest, progress, seals)
            if uploaded is not None:
                return uploaded

    def _same_file(self, vol: Volume, source: Path) -> bool:
        """On a local daemon: whether the volume's file is `source` itself (same device and inode)."""
        if not self.is_local:
            return False
        try:
            theirs, ours = os.stat(self.volume_path(vol)), source.stat()
        except OSError:
            return False
        return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)

    def _identity(self, vol: Volume, digest: Digest) -> Seal | None:
        """The volume as libvirt describes it now (its key, size and change times), as a seal of `digest`."""
        try:
            root = ET.fromstring(vol.XMLDesc(0))
        except (libvirt.libvirtError, ET.ParseError):
            return None
        key, physical = root.findtext("key"), root.findtext("physical")
        mtime, ctime = root.findtext("target/timestamps/mtime"), root.findtext("target/timestamps/ctime")
        if not (key and physical and physical.isdigit() and mtime and ctime):
            return None
        return Seal(str(digest), key, int(physical), mtime, ctime)

    def _sealed(self, vol: Volume, digest: Digest, seals: SealStore | None) -> bool:
        """Whether this client hashed this very volume to `digest` before, and it has not changed since."""
        if seals is None:
            return False
        now = self._identity(vol, digest)
        return now is not None and seals.get(now.key) == now

    def _seal(self, vol: Volume, digest: Digest, seals: SealStore | None) -> None:
        if seals is not None and (identity := self._identity(vol, digest)) is not None:
            seals.put(identity)

    def _physical(self, vol: Volume, name: str) -> int:
        with libvirt_errors(f"cannot read volume {name}"):
            return int(vol.infoFlags(libvirt.VIR_STORAGE_VOL_GET_PHYSICAL)[2])

    def _mark(self, pool: Pool, marker: str, digest: Digest) -> None:
        """Write the marker of a verified volume; another client writing it at the same moment is as good."""
        text = str(digest).encode()
        try:
            self.upload_volume(pool, marker, io.BytesIO(text), len(text))
        except HypervisorError:
            if self.volume(pool, marker) is None:
                raise

    def _upload_claimed(
        self, pool: Pool, name: str, source: Path, digest: Digest, progress: Progress | None, seals: SealStore | None
    ) -> Volume | None:
        """Claim the upload of `name`, upload, verify, seal and mark it; None when another client claimed it first or
        took it over (then its volume is awaited)."""
        claim, marker = name + UPLOADING, name + VERIFIED
        token = os.urandom(16).hex().encode()  # what secrets.token_hex(16) gives, without its imports
        try:
            self.upload_volume(pool, claim, io.BytesIO(token), len(token))
        except HypervisorError:
            if self.volume(pool, claim) is None:
                raise
            return None  # another client claimed it a moment ago
        try:
            self.delete_volume(pool, marker)  # a marker without its volume is stale
            hasher = digest.hasher()
            with source.open("rb") as f:
                vol = self.upload_volume(pool, name, f, source.stat().st_size, hasher=hasher, progress=progress)
            if self._claim_token(pool, claim) != token:
                log.warning("the upload of %s stalled and was taken over by another client", name)
                return None  # our volume was deleted; theirs is awaited
            if hasher.hexdigest() != digest.hex:
                self.delete_volume(pool, name)
                raise HypervisorError(f"the bytes sent for {name} do not match its digest {digest}")
            self._seal(vol, digest, seals)
            self._mark(pool, marker, digest)
            return vol
        finally:
            if self._claim_token(pool, claim) == token:
                self.delete_volume(pool, claim)

    def _claim_token(self, pool: Pool, claim: str) -> bytes | None:
        """The token in an upload's claim volume (untrusted: only compared), None when there is no claim."""
        if self.volume(pool, claim) is None:
            return None
        try:
            return self.download_volume(pool, claim, limit=64)
        except HypervisorError:
            return None  # deleted meanwhile

    def _await_upload(self, pool: Pool, name: str, claim: str, stale: float) -> None:
        """Wait while another client's claimed upload of `name` goes on: until its claim is gone, or nothing
        changed (the claim's token, the volume's modification time) for `stale` seconds of this client's clock;
        then its claim and partial volume are deleted (the client died: its upload is taken over)."""
        seen: tuple[bytes | None, str | None] | None = None
        since = time.monotonic()
        while (token := self._claim_token(pool, claim)) is not None:
            vol = self.volume(pool, name)
            state = (token, self._modified(vol) if vol is not None else None)
            if state != seen:
                seen, since = state, time.monotonic()
            elif time.monotonic() - since >= stale:
                log.warning(
                    "the upload of %s by another client made no progress for %.0f s; taking it over", name, stale
                )
                self.delete_volume(pool, claim)
                self.delete_volume(pool, name)
                return
            time.sleep(UPLOAD_POLL)

    def _modified(self, vol: Volume) -> str | None:
        """The volume's last modification time as libvirt reports it (its own clock: only compared)."""
        try:
            return ET.fromstring(vol.XMLDesc(0)).findtext("target/timestamps/mtime")
        except (libvirt.libvirtError, ET.ParseError):
            return None

    def upload_volume(
        self,
        pool: Pool,
        name: str,
        data: io.BufferedIOBase | io.BytesIO,
        size: int,
        *,
        hasher: Any = None,
        progress: Progress | None = None,
    ) -> Volume:
        """Create volume `name` of `size` bytes and stream `data` into it; on failure nothing is left."""
        root = ET.Element("volume")
        ET.SubElement(root, "name").text = name
        ET.SubElement(root, "capacity", unit="bytes").text = str(size)
        target = ET.SubElement(root, "target")
        ET.SubElement(target, "format", type="raw")
        with libvirt_errors(f"cannot create volume {name}"):
            vol = pool.createXML(ET.tostring(root, encoding="unicode"), 0)
        stream = self.conn.newStream(0)
        try:
            with libvirt_errors(f"cannot upload volume {name}"):
                vol.upload(stream, 0, size, 0)
                _send(stream, data, size, hasher, progress)
                stream.finish()
        except BaseException:
            with contextlib.suppress(libvirt.libvirtError):
                stream.abort()
            with contextlib.suppress(libvirt.libvirtError):
                vol.delete(0)
            raise
        return vol

    def volume_digest(self, vol: Volume, like: Digest) -> Digest:
        """The digest of a volume's bytes, read through a libvirt stream (one pass, constant memory)."""
        hasher = like.hasher()
        with libvirt_errors("cannot read a volume back"):
            stream = self.conn.newStream(0)
            vol.download(stream, 0, 0, 0)
            stream.recvAll(lambda _s, data, h: h.update(data), hasher)
            stream.finish()
        return Digest(like.algorithm, hasher.hexdigest())

    def download_volume(self, pool: Pool, name: str, limit: int = 64 << 20) -> bytes:
        """A (small) volume's bytes, read through a libvirt stream; its last `limit` bytes when larger."""
        self.volume_names(pool)  # refresh: files that libvirt did not create (console logs) become volumes
        vol = self.volume(pool, name)
        if vol is None:
            return b""
        chunks: list[bytes] = []
        with libvirt_errors(f"cannot download volume {name}"):
            _, _, physical = vol.infoFlags(libvirt.VIR_STORAGE_VOL_GET_PHYSICAL)
            offset = max(0, physical - limit)
            stream = self.conn.newStream(0)
            vol.download(stream, offset, physical - offset, 0)
            stream.recvAll(lambda _s, data, acc: acc.append(data), chunks)
            stream.finish()
        return b"".join(chunks)

    def overlay_volume(self, pool: Pool, name: str, backing: Volume, capacity: int, fmt: str, virtual: int) -> Volume:
        """A qcow2 (compat 1.1) overlay on the backing volume (of format fmt), at least `capacity` bytes large."""
        root = ET.Element("volume")
        ET.SubElement(root, "name").text = name
        ET.SubElement(root, "capacity", unit="bytes").text = str(max(capacity, virtual))
        target = ET.SubElement(root, "target")
        ET.SubElement(target, "format", type="qcow2")
        ET.SubElement(target, "compat").text = "1.1"
        store = ET.SubElement(root, "backingStore")
        ET.SubElement(store, "path").text = backing.path()
        ET.SubElement(store, "format", type=fmt)
        with libvirt_errors(f"cannot create the disk volume {name}"):
            return pool.createXML(ET.tostring(root, encoding="unicode"), 0)


class Domain:
    """One libvirt domain and what qinst does with it; libvirtError never leaves these methods."""

    def __init__(self, host: Host, handle: libvirt.virDomain) -> None:
        self.host = host
        self._dom = handle

    @property
    def name(self) -> str:
        with libvirt_errors("cannot read a domain's name"):
            return str(self._dom.name())

    def xml(self) -> str:
        with libvirt_errors("cannot read a domain's XML"):
            return str(self._dom.XMLDesc(0))

    def state(self) -> tuple[str, str]:
        """(state, reason) as qinst names states: running, paused, shutoff, crashed..."""
        with libvirt_errors("cannot read the domain's state"):
            state, reason = self._dom.state()
        return STATES.get(state, "unknown"), str(reason)

    def is_active(self) -> bool:
        with libvirt_errors("cannot read the domain's state"):
            return bool(self._dom.isActive())

    def start(self, *, paused: bool = False) -> None:
        with libvirt_errors(f"cannot start {self.name}"):
            self._dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED if paused else 0)

    def resume(self) -> None:
        with libvirt_errors(f"cannot resume {self.name}"):
            self._dom.resume()

    def launch_security_info(self) -> dict[str, object]:
        """What the host's secure processor reports of a confidential guest (SEV: its launch measurement)."""
        with libvirt_errors(f"cannot read the launch measurement of {self.name}"):
            return dict(self._dom.launchSecurityInfo(0))

    def shutdown(self) -> None:
        with libvirt_errors(f"cannot shut down {self.name}"):
            self._dom.shutdown()

    def destroy(self) -> None:
        with libvirt_errors(f"cannot power off {self.name}"):
            self._dom.destroy()

    def undefine(self) -> None:
        """Power off (when running) and undefine, with its NVRAM and managed save; gone already is not an error."""
        with _ignoring("cannot power off the domain", libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID):
            if self._dom.isActive():
                self._dom.destroy()
        managed = libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
        try:
            self._dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | managed)
            return
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_INVALID_ARG:
                with _ignoring("cannot undefine the domain", libvirt.VIR_ERR_NO_DOMAIN):
                    raise
                return
        with _ignoring("cannot undefine the domain", libvirt.VIR_ERR_NO_DOMAIN):
            self._dom.undefineFlags(managed)  # drivers without NVRAM (the test driver) refuse that flag

    def set_metadata(self, xml: str, key: str, namespace: str) -> None:
        """Record `xml` as the domain's metadata element in `namespace`, in its config (and live, when running)."""
        flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG
        with contextlib.suppress(libvirt.libvirtError):
            if self._dom.isActive():
                flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
        with libvirt_errors("cannot record the instance's metadata"):
            self._dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, xml, key, namespace, flags)

    def metadata(self, namespace: str) -> str | None:
        """The domain's metadata element in `namespace` (its live one when running), None when it has none."""
        try:
            return str(self._dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, namespace, 0))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
                return None
            with libvirt_errors("cannot read the domain's metadata"):
                raise
        raise AssertionError("unreachable")

    def lease_address(self) -> str | None:
        """The IPv4 address libvirt's DHCP server leased to the domain; None while there is none."""
        try:
            ifaces = self._dom.interfaceAddresses(libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE, 0)
        except libvirt.libvirtError:
            return None
        for iface in (ifaces or {}).values():
            for addr in iface.get("addrs") or []:
                if addr.get("type") == libvirt.VIR_IP_ADDR_TYPE_IPV4:
                    return str(addr["addr"])
        return None

    def open_console(self, limit: int) -> ConsoleStream:
        """The serial console as a stream (at most `limit` bytes are read from it)."""
        return ConsoleStream(self.host.conn, self._dom, limit)


class ConsoleStream:
    """The serial console read through libvirt (remote daemons): a non-blocking console stream."""

    def __init__(self, conn: libvirt.virConnect, dom: libvirt.virDomain, limit: int) -> None:
        self.text = ""
        self._limit = limit
        self._received = 0  # bytes; reading stops at the limit
        self._decoder = utf8_decoder()  # not UTF-8 becomes U+FFFD; a character split between reads stays whole
        with libvirt_errors("cannot open the serial console"):
            self._stream = conn.newStream(libvirt.VIR_STREAM_NONBLOCK)
            dom.openConsole(None, self._stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
        self._open = True

    def read(self) -> str:
        while self._open and self._received < self._limit:
            try:
                data = self._stream.recv(65536)
            except libvirt.libvirtError:
                self._open = False
                break
            if isinstance(data, int):  # -2: nothing more right now
                break
            if not data:  # the console closed (the domain stopped)
                self._open = False
                break
            self._received += len(data)
            self.text += self._decoder.decode(data)
        return self.text

    def tail(self, n: int = 20) -> str:
        return tail_lines(self.text, n)

    def close(self) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            self._stream.abort()
        self._open = False


# -- snapshots and guest capabilities (qinst snapshot, up --mount) ----------------------------------------------


@dataclass(frozen=True)
class SnapshotInfo:
    """A domain snapshot as libvirt describes it (read back: untrusted, parsed defensively)."""

    name: str
    state: str  # the guest's state when it was taken: running, shutoff, ...
    created: int  # seconds since the epoch
    memory: bool  # whether it holds the guest's memory (restore resumes it running)
    description: str


def domain_capabilities(host: Host, arch: str = "x86_64", machine: str = "q35") -> str:
    """libvirt's domain capabilities XML for `arch` guests on `machine` (what devices and firmware QEMU offers)."""
    with libvirt_errors(f"cannot read the host's domain capabilities for {arch}"):
        return str(host.conn.getDomainCapabilities(None, arch, machine, None, 0))


def create_snapshot(dom: Domain, name: str, description: str) -> None:
    """An internal snapshot: disks and, for a running guest, its memory (libvirt decides from the state)."""
    root = ET.Element("domainsnapshot")
    ET.SubElement(root, "name").text = name
    ET.SubElement(root, "description").text = description
    with libvirt_errors(f"cannot create snapshot {name!r}"):
        dom._dom.snapshotCreateXML(ET.tostring(root, encoding="unicode"), 0)


def _snapshot(dom: Domain, name: str) -> Any:
    try:
        return dom._dom.snapshotLookupByName(name, 0)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT:
            raise HypervisorError(f"no snapshot named {name!r}", hint="'qinst snapshot list NAME' lists them") from exc
        raise HypervisorError(f"cannot look up snapshot {name!r}: {tidy(exc.get_error_message())}") from exc


def list_snapshots(dom: Domain) -> list[SnapshotInfo]:
    """The domain's snapshots, oldest first."""
    found = []
    with libvirt_errors("cannot list snapshots"):
        snaps = [snap.getXMLDesc(0) for snap in dom._dom.listAllSnapshots(0)]
    for xml in snaps:
        root = ET.fromstring(xml)
        memory = root.find("memory")
        created = root.findtext("creationTime") or "0"
        found.append(
            SnapshotInfo(
                name=root.findtext("name") or "",
                state=root.findtext("state") or "",
                created=int(created) if created.isdigit() else 0,
                memory=memory is not None and memory.get("snapshot") == "internal",
                description=root.findtext("description") or "",
            )
        )
    return sorted(found, key=lambda s: (s.created, s.name))


def snapshot_count(dom: Domain) -> int:
    with libvirt_errors("cannot count snapshots"):
        return int(dom._dom.snapshotNum(0))


def revert_snapshot(dom: Domain, name: str) -> None:
    """Return the guest to the snapshot: running again if it holds memory, as it was otherwise."""
    snap = _snapshot(dom, name)
    with libvirt_errors(f"cannot restore snapshot {name!r}"):
        dom._dom.revertToSnapshot(snap, 0)


def delete_snapshot(dom: Domain, name: str) -> None:
    snap = _snapshot(dom, name)
    with libvirt_errors(f"cannot delete snapshot {name!r}"):
        snap.delete(0)


def forget_snapshots(dom: Domain) -> int:
    """Drop every snapshot's libvirt record before the domain and its volumes (which hold them) are removed."""
    with libvirt_errors("cannot remove the instance's snapshots"):
        snaps = dom._dom.listAllSnapshots(0)
        for snap in snaps:
            snap.delete(libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)
    return len(snaps)
