"""SSH host keys for the tests: an sshd on 127.0.0.1 that offers one host key (and a valid key it does not offer)
and lets nobody log in; key pairs made by ssh-keygen; three made-up keys."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from qemu_instances.ssh import scan_host_keys

Key = tuple[str, str]


@dataclass(frozen=True)
class HostKeySshd:
    """An sshd on 127.0.0.1 (conftest's `hostkey_sshd`)."""

    port: int
    key: Key  # the host key it offers
    other: Key  # a valid host key it does NOT offer
    client_key: Path


def keygen(path: Path) -> Key:
    """A new ed25519 key pair at `path` (and `path`.pub); its public key."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    kind, body = path.with_name(path.name + ".pub").read_text().split()[:2]
    return kind, body


def start_sshd(d: Path) -> tuple[subprocess.Popen[bytes], int]:
    """sshd on a port the kernel just handed out; if another process takes it first, sshd exits and we retry."""
    sshd_bin = shutil.which("sshd") or "/usr/sbin/sshd"
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    for _ in range(5):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        (d / "sshd_config").write_text(
            f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {d}/host.key\nPidFile {d}/sshd.pid\n"
            f"AuthorizedKeysFile {d}/authorized_keys\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        )
        log = d / f"sshd-{port}.log"
        proc = subprocess.Popen([sshd_bin, "-D", "-f", str(d / "sshd_config"), "-E", str(log)])
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and proc.poll() is None:
            if scan_host_keys("127.0.0.1", port):
                return proc, port
            time.sleep(0.1)
        proc.terminate()
        proc.wait(timeout=10)
        if "Address already in use" not in log.read_text(errors="replace"):
            pytest.fail(f"sshd did not start: {log.read_text(errors='replace')}")
    pytest.fail("no free port for sshd after 5 tries")


# Made-up keys, as a console prints them.
KEY_A = ("ssh-ed25519", "AAAAC3NzaC1lZDI1NTE5AAAAIAaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa")
KEY_B = ("ssh-ed25519", "AAAAC3NzaC1lZDI1NTE5AAAAIBbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb")
KEY_C = ("ecdsa-sha2-nistp256", "AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBCcccccccccccccc")
