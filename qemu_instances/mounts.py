"""Host folder mounts: `up --mount HOSTDIR[:GUESTDIR][:rw]`, shared by virtiofs or, failing that, 9p.

The folder is the libvirt host's: a local folder for a local daemon, the remote machine's for qemu+ssh://.
virtiofs is used when the host's libvirt offers it and (on a local host) virtiofsd is installed; libvirt then
needs the guest's memory shared (memfd). Otherwise virtio-9p with accessmode "mapped": files the guest creates
belong to QEMU's user on the host and their guest owner and mode live in extended attributes, so a guest can
never create a host file owned by root or with a set-uid bit.

Read-only (the default) is enforced on the host, never left to the guest's `ro` mount option, which root in the
guest can undo (`mount -o remount,rw`). With 9p, QEMU refuses the writes (`<readonly/>`). libvirt 9.0 refuses
`<readonly/>` on virtiofs and the virtiofsd it runs (QEMU 7.2's C one) has no read-only option (Debian 12 packages
no Rust virtiofsd), and falling back to 9p does not help: Debian's cloud kernel
(linux-image-cloud-amd64, the genericcloud images') is built without 9p (CONFIG_NET_9P unset). So a read-only
virtiofs folder gets qinst's own virtiofsd, `virtiofsd-readonly` beside this module, named by libvirt's
`<binary path=...>`: in a private mount namespace it binds the folder read-only (nosuid, nodev) and execs the real
virtiofsd on that bind, so the host kernel refuses every write (EROFS) and the mount dies with virtiofsd. libvirt
runs it as root, so qinst uses it only when nobody but root and the user running qinst (who can define domains,
so already chooses what libvirt runs as root) can change it or a folder above it. On a remote host qinst cannot
place it: read-only virtiofs folders are refused there, before anything is made. The remote host's own 9p would
be enforced, but Debian's cloud kernel could not mount it, so qinst does not switch to it silently.

Read-write virtiofs folders are shared in passthrough (libvirt 9.0 maps no ids for virtiofs): virtiofsd runs as
root and acts with the guest's uid and gid, so root in the guest can create files owned by root (or any uid) on
the host, set-uid programs included (QEMU 7.2's virtiofsd refuses device nodes). Share read-write only what the
guest's root may own; keep such a folder on a nosuid,nodev mount if host users might run what is in it.

The guest mounts each folder from /etc/fstab (with nofail), written by the seed, so it is mounted when `up`
returns and again after every reboot.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from qemu_instances.errors import UsageError

if TYPE_CHECKING:
    from qemu_instances.host import Host

VIRTIOFSD_PATHS = ("/usr/lib/qemu/virtiofsd", "/usr/libexec/virtiofsd", "/usr/lib/virtiofsd")  # and the helper's
READONLY_HELPER = Path(__file__).with_name("virtiofsd-readonly")  # libvirt's virtiofsd for a read-only folder
_SAFE_PATH = re.compile(r"/[^\s:,\\'\"]*")  # fstab fields and QEMU options: no blanks, colons, commas, quotes


class Driver(StrEnum):
    VIRTIOFS = "virtiofs"
    NINEP = "9p"

    @property
    def fstype(self) -> str:
        return str(self)

    def mount_options(self, readonly: bool) -> str:
        mode = "ro" if readonly else "rw"
        if self is Driver.NINEP:
            return f"trans=virtio,version=9p2000.L,msize=262144,{mode},nofail"
        return f"{mode},nofail"


@dataclass(frozen=True)
class Mount:
    """One shared folder: host_dir on the libvirt host at guest_dir in the guest."""

    host_dir: str
    guest_dir: str
    readonly: bool = True
    driver: Driver = Driver.VIRTIOFS

    @classmethod
    def parse(cls, text: str, driver: Driver = Driver.VIRTIOFS) -> Mount:
        """`HOSTDIR[:GUESTDIR][:rw|:ro]` (paths absolute, without blanks, colons or commas)."""
        parts = text.split(":")
        readonly = True
        if len(parts) > 1 and parts[-1] in ("rw", "ro"):
            readonly = parts.pop() == "ro"
        if len(parts) > 2 or not parts[0]:
            raise UsageError(f"invalid --mount {text!r}", hint="use HOSTDIR[:GUESTDIR][:rw] with absolute paths")
        host_dir = _checked_path(parts[0], text)
        guest_dir = _checked_path(parts[1], text) if len(parts) == 2 else host_dir
        if guest_dir in _SYSTEM_DIRS:
            raise UsageError(f"refusing to mount over the guest's {guest_dir}")
        return cls(host_dir, guest_dir, readonly, driver)

    def record(self) -> str:
        """How the instance's metadata records it: DRIVER:ro|rw:HOSTDIR:GUESTDIR."""
        return f"{self.driver}:{'ro' if self.readonly else 'rw'}:{self.host_dir}:{self.guest_dir}"

    @classmethod
    def from_record(cls, text: str) -> Mount:
        """A recorded mount, validated (the metadata is read back from libvirt: untrusted)."""
        parts = text.split(":")
        try:
            if len(parts) != 4 or parts[1] not in ("ro", "rw"):
                raise ValueError
            mount = cls(
                _checked_path(parts[2], text), _checked_path(parts[3], text), parts[1] == "ro", Driver(parts[0])
            )
        except (ValueError, UsageError):
            raise UsageError(f"the instance's metadata records an invalid mount {text[:120]!r}") from None
        return mount

    def to_json(self) -> dict[str, object]:
        return {"host": self.host_dir, "guest": self.guest_dir, "readonly": self.readonly, "driver": str(self.driver)}


_SYSTEM_DIRS = frozenset(
    ("/", "/bin", "/boot", "/dev", "/etc", "/lib", "/lib64", "/proc", "/run", "/sbin", "/sys", "/usr", "/var")
)


def _checked_path(path: str, text: str) -> str:
    """An absolute path in its one normal form: `//etc`, `/etc/`, `/./etc` are all `/etc` (before any check of it:
    POSIX keeps a leading `//`, which would slip past a list of system folders)."""
    if not _SAFE_PATH.fullmatch(path) or ".." in PurePosixPath(path).parts or len(path) > 1024:
        raise UsageError(
            f"invalid path {path!r} in --mount {text!r}",
            hint="paths are absolute, without '..', blanks, colons, commas, quotes or backslashes",
        )
    return "/" + "/".join(part for part in path.split("/") if part not in ("", "."))


def parse_mounts(texts: Iterable[str], driver: Driver, *, local: bool) -> tuple[Mount, ...]:
    """Parse --mount values; on a local host each HOSTDIR must be an existing folder. A read-only virtiofs folder
    needs qinst's virtiofsd-readonly: refused on a remote host, and unless the helper is safe to run as root."""
    mounts = tuple(Mount.parse(t, driver) for t in texts)
    guest_dirs = [m.guest_dir for m in mounts]
    if len(set(guest_dirs)) != len(guest_dirs):
        raise UsageError("two --mount options share a guest folder")
    for m in mounts:
        if local and not Path(m.host_dir).is_dir():
            raise UsageError(f"--mount: {m.host_dir} is not a folder on this host")
        if m.readonly and m.driver is Driver.VIRTIOFS:
            if not local:
                raise UsageError(
                    f"--mount {m.host_dir} is read-only, which the remote host's virtiofs cannot enforce",
                    hint="libvirt 9.0 has no read-only virtiofs and qinst's read-only virtiofsd is on this machine "
                    "only: add :rw if the guest may change the folder (its root could), or run qinst on that host",
                )
            readonly_helper()
    return mounts


def readonly_helper(path: Path | None = None) -> str:
    """The virtiofsd-readonly that libvirt is to run, as root, for a read-only virtiofs folder.

    Refused unless it is an executable file that nobody but root and this user can change, nor replace (the
    folders above it likewise; a root-owned sticky folder such as /tmp is fine): anyone else could otherwise make
    root run their code at the instance's next start.
    """
    path = path or READONLY_HELPER
    real = path.resolve()
    try:
        mode = real.stat().st_mode
    except OSError as exc:
        raise UsageError(
            f"read-only --mount needs qinst's {path.name}, which is missing ({exc.strerror}: {real})",
            hint="reinstall qinst, or add :rw to share the folder read-write",
        ) from exc
    if not stat.S_ISREG(mode) or not mode & stat.S_IXUSR:
        raise UsageError(
            f"read-only --mount needs qinst's {path.name}, which is not an executable file: {real}",
            hint=f"chmod 0755 {real}",
        )
    for node in (real, *real.parents):
        st = node.stat()
        sticky_root = st.st_uid == 0 and node != real and st.st_mode & stat.S_ISVTX
        if st.st_uid not in (0, os.getuid()) or (st.st_mode & 0o022 and not sticky_root):
            raise UsageError(
                f"read-only --mount needs qinst's {path.name}, which libvirt runs as root, but others can change "
                f"{node} (owner uid {st.st_uid}, mode {stat.filemode(st.st_mode)})",
                hint="install qinst where only root or you can write (chmod go-w), or add :rw to share it read-write",
            )
    return str(real)


def tag(index: int) -> str:
    """The device's mount tag in the guest (virtiofs and 9p tags are short names)."""
    return f"qinst{index}"


def choose_driver(domain_caps_xml: str, *, local: bool) -> tuple[Driver, str]:
    """virtiofs when libvirt offers it (and virtiofsd is installed, on a local host), else 9p; and why."""
    caps = ET.fromstring(domain_caps_xml)
    offered = {v.text for v in caps.iterfind("devices/filesystem/enum[@name='driverType']/value")}
    if "virtiofs" not in offered:
        return Driver.NINEP, "libvirt offers no virtiofs here: 9p (virtio-9p)"
    if not local:
        return Driver.VIRTIOFS, "virtiofs (the remote host's libvirt offers it; read-only folders are refused there)"
    binary = next((p for p in VIRTIOFSD_PATHS if Path(p).exists()), None) or shutil.which("virtiofsd")
    if binary is None:
        return Driver.NINEP, "no virtiofsd on this host: 9p (virtio-9p); install virtiofsd for virtiofs"
    try:
        readonly = f"read-only ones through {readonly_helper()}"
    except UsageError as exc:
        readonly = f"read-only ones refused: {exc.message}"
    return Driver.VIRTIOFS, f"virtiofs ({binary}; {readonly})"


def cloud_config(mounts: Sequence[Mount]) -> dict[str, Any]:
    """cloud-config that lists the mounts in /etc/fstab (nofail) and mounts them before cloud-init finishes.

    Not cloud-init's `mounts` module: cloud-init 22.4 takes a bare mount tag for a missing block device and
    drops the entry.
    """
    if not mounts:
        return {}
    lines = "".join(
        f"{tag(i)} {m.guest_dir} {m.driver.fstype} {m.driver.mount_options(m.readonly)} 0 0\n"
        for i, m in enumerate(mounts)
    )
    runcmd: list[list[str]] = []
    for m in mounts:
        runcmd += [["mkdir", "-p", m.guest_dir], ["mount", m.guest_dir]]
    return {
        "write_files": [{"path": "/etc/fstab", "append": True, "content": "# qinst mounts\n" + lines}],
        "runcmd": runcmd,
    }


def resolve(host: Host, texts: Sequence[str], arch: str = "x86_64", machine: str = "q35") -> tuple[Mount, ...]:
    """`up --mount` values for this host, with the driver it offers `arch` guests (nothing to ask when there are
    none)."""
    if not texts:
        return ()
    from qemu_instances.host import domain_capabilities  # here: the domain XML imports this module, not libvirt

    driver, _ = choose_driver(domain_capabilities(host, arch, machine), local=host.is_local)
    return parse_mounts(texts, driver, local=host.is_local)
