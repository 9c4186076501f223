"""Debian's sshd on 127.0.0.1 only (key-only root login), with a client key and a host-key-checking ssh wrapper."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from testsupport.net import free_port


@dataclass(frozen=True)
class Sshd:
    port: int
    directory: Path
    wrapper: Path  # an `ssh` that checks sshd's host key and logs in with the client key
    host_key: tuple[str, str]  # (type, base64) of sshd's host key
    client_key: Path  # the private key root may log in with

    @property
    def uri(self) -> str:
        """A qemu+ssh URI through this sshd to the local libvirtd."""
        return f"qemu+ssh://root@127.0.0.1:{self.port}/system?command={self.wrapper}"


@contextmanager
def serving_sshd(d: Path) -> Iterator[Sshd]:
    """Start sshd with its keys and config in directory `d`; stop it on exit."""
    sshd_bin = shutil.which("sshd") or "/usr/sbin/sshd"
    assert Path(sshd_bin).exists(), "openssh-server is missing (scripts/setup.sh --test installs it)"
    for key in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
    (d / "authorized_keys").write_text((d / "client.pub").read_text())
    port = free_port()
    (d / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {d}/host\nPidFile {d}/sshd.pid\n"
        f"AuthorizedKeysFile {d}/authorized_keys\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        "AllowTcpForwarding yes\nSubsystem sftp internal-sftp\n"  # scp speaks SFTP by default
    )
    kind, body = (d / "host.pub").read_text().split()[:2]
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {kind} {body}\n")
    (d / "ssh_config").write_text(
        f"Host *\n  IdentityFile {d}/client\n  IdentitiesOnly yes\n  UserKnownHostsFile {d}/known_hosts\n"
        "  StrictHostKeyChecking yes\n  GlobalKnownHostsFile /dev/null\n"
    )
    wrapper = d / "ssh"
    wrapper.write_text(f'#!/bin/sh\nexec ssh -F {d}/ssh_config "$@"\n')
    wrapper.chmod(0o755)
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    proc = subprocess.Popen([sshd_bin, "-D", "-f", str(d / "sshd_config"), "-E", str(d / "sshd.log")])
    try:
        deadline = time.monotonic() + 10
        probe = [str(wrapper), "-o", "BatchMode=yes", "-p", str(port), "root@127.0.0.1", "true"]
        while subprocess.run(probe, check=False, capture_output=True).returncode:
            assert time.monotonic() < deadline, (d / "sshd.log").read_text()
            time.sleep(0.2)
        yield Sshd(port, d, wrapper, (kind, body), d / "client")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
