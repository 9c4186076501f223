"""virsh against the real libvirtd: list and remove only the domains and volumes a test or benchmark made."""

from __future__ import annotations

import contextlib
import re
import secrets
import subprocess
from pathlib import Path

URI = "qemu:///system"
LOG_DIR = Path("/var/log/libvirt/qemu")


def virsh(*args: str) -> subprocess.CompletedProcess[str]:
    """Run virsh quietly; never raises (cleanup and listing helpers look at its output)."""
    return subprocess.run(
        ["virsh", "-q", "-c", URI, *args], capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False
    )


def domains(prefix: str = "") -> set[str]:
    """Names of the domains (any state) whose name starts with prefix."""
    names = {line.strip() for line in virsh("list", "--all", "--name").stdout.splitlines() if line.strip()}
    return {n for n in names if n.startswith(prefix)}


def volumes(pool: str = "qinst", prefix: str = "") -> set[str]:
    out = virsh("vol-list", pool).stdout
    names = {line.split()[0] for line in out.splitlines() if line.strip()}
    return {n for n in names if n.startswith(prefix)}


def unique_name(prefix: str = "t") -> str:
    return f"qinst-{prefix}-{secrets.token_hex(3)}"


def remove_domain(name: str, files: tuple[Path, ...] = ()) -> None:
    """Power off and undefine a domain, delete its qinst volumes, the files given and libvirt's logs of it."""
    virsh("destroy", name)
    virsh("undefine", "--nvram", name)
    for vol in (f"{name}.qcow2", f"{name}-seed.iso"):
        virsh("vol-delete", "--pool", "qinst", vol)
    for path in [*files, *LOG_DIR.glob(f"{name}.log*"), LOG_DIR / f"{name}-console.log"]:
        with contextlib.suppress(OSError):
            path.unlink()


def destroy(name: str) -> None:
    """Power a domain off (keep it defined); quietly nothing when it is not running."""
    virsh("destroy", name)


def pools() -> dict[str, str]:
    """Every storage pool (active or not) and its target path."""
    found = {}
    for name in virsh("pool-list", "--all", "--name").stdout.split():
        path = re.search(r"<path>([^<]*)</path>", virsh("pool-dumpxml", name).stdout)
        found[name] = path[1] if path else ""
    return found


def remove_pool(name: str) -> None:
    virsh("pool-destroy", name)
    virsh("pool-undefine", name)


def volume_in_use(volume: str) -> bool:
    """Whether any domain's (inactive) XML names the volume."""
    return any(volume in virsh("dumpxml", "--inactive", name).stdout for name in domains())


def remove_leftovers(prefix: str) -> list[str]:
    """Remove every domain and qinst-pool volume whose name starts with prefix (only the caller's own)."""
    left = sorted(domains(prefix))
    for name in left:
        remove_domain(name)
    for vol in sorted(volumes(prefix=prefix)):
        virsh("vol-delete", vol, "--pool", "qinst")
        left.append(f"volume {vol}")
    return left


def define_instance(name: str, firmware: str = "bios", *, start_paused: bool = False) -> Path:
    """A qinst instance on the real libvirtd that never boots: its overlay (an empty qcow2) and seed volumes in
    qinst's pool, its domain with a valid record (TCG, a user network on a free port), libvirt's and the console's
    logs; started with its vCPUs paused when asked (QEMU runs, makes a UEFI guest's NVRAM, runs no guest code).
    Returns the overlay's path. Remove it with remove_domain(name)."""
    import dataclasses
    import socket

    from qemu_instances.domain import Firmware, domain_xml
    from qemu_instances.host import Host
    from testsupport.testdriver import instance_spec

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with Host(URI) as host:
        pool = host.pool()
        made = {}
        for vol, fmt in ((f"{name}.qcow2", "qcow2"), (f"{name}-seed.iso", "raw")):
            fmt_xml = f"<target><format type='{fmt}'/></target>"
            xml = f"<volume><name>{vol}</name><capacity unit='MiB'>16</capacity>{fmt_xml}</volume>"
            made[fmt] = pool.createXML(xml, 0).path()
        spec = instance_spec(name=name, firmware=Firmware(firmware), disk_path=made["qcow2"], seed_path=made["raw"],
                             console_log=str(LOG_DIR / f"{name}-console.log"), ssh_port=port)  # fmt: skip
        meta = dataclasses.replace(spec.metadata, ssh_port=port, volumes=(f"{name}.qcow2", f"{name}-seed.iso"))
        dom = host.conn.defineXML(domain_xml(dataclasses.replace(spec, metadata=meta)))
        if start_paused:
            import libvirt

            dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
    for log in (LOG_DIR / f"{name}-console.log", LOG_DIR / f"{name}.log"):
        if not log.exists():
            log.write_text("as virtlogd and libvirt write them\n")
    return Path(made["qcow2"])


def nvram_files(name: str) -> list[Path]:
    """A domain's UEFI variable stores, where libvirt makes them."""
    return sorted(Path("/var/lib/libvirt/qemu/nvram").glob(f"{name}_VARS*"))
