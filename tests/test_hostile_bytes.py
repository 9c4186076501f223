"""Bytes that are not UTF-8 from a guest: an SSH banner, a console log, a tool's output. Never a UnicodeDecodeError.

The SSH server is a real TCP server on 127.0.0.1 that answers like a broken or hostile sshd.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from qemu_instances.errors import GuestTimeout
from qemu_instances.proc import run
from qemu_instances.ssh import check_host_keys, scan_host_keys
from qemu_instances.wait import ConsoleLog, Probe, Readiness, wait_ready

BANNER = b"\xff\xfe not UTF-8\r\nSSH-2.0-Open\xff\xfeSSH_9.2\r\n"
KEY = "AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
CONSOLE = (
    b"Linux version 6.1 \xff\xfe\n"
    b"-----BEGIN SSH HOST KEY KEYS-----\nssh-ed25519 " + KEY.encode() + b" root@g\n-----END SSH HOST KEY KEYS-----\n"
    b"Cloud-init v. 24.1 finished at Sat, 28 Nov 2026 \xc3\xa9\xff. Datasource DataSourceNoCloud [seed=/dev/sr0]\n"
)


@pytest.fixture
def bad_sshd() -> Iterator[int]:
    """A TCP server on 127.0.0.1 that sends a banner with \\xff\\xfe to every client, then hangs up."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.sendall(BANNER)
                conn.settimeout(2)
                with contextlib.suppress(OSError):
                    conn.recv(4096)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        server.close()


def test_run_decodes_undecodable_output_with_replacement() -> None:
    proc = run([sys.executable, "-c", "import sys; sys.stdout.buffer.write(b'a\\xff\\xfeb'); sys.exit(0)"])
    assert proc.stdout == "a\ufffd\ufffdb"


def test_key_scan_of_a_server_with_an_undecodable_banner(bad_sshd: int) -> None:
    assert scan_host_keys("127.0.0.1", bad_sshd) == []
    assert check_host_keys("127.0.0.1", bad_sshd, [("ssh-ed25519", KEY)]) is None


def test_readiness_with_undecodable_console_and_banner_times_out_cleanly(bad_sshd: int, tmp_path: Path) -> None:
    """What `up` does: the console says ready, the SSH server's banner is not UTF-8 -> GuestTimeout (exit 5)."""
    log = tmp_path / "console.log"
    log.write_bytes(CONSOLE)
    probe = Probe(
        state=lambda: ("running", "booted"),
        console=ConsoleLog(log),
        ssh_host=lambda: "127.0.0.1",
        ssh_port=bad_sshd,
    )
    readiness = Readiness()
    with pytest.raises(GuestTimeout) as caught:
        wait_ready(probe, timeout=1.5, readiness=readiness)
    assert caught.value.exit_code == 5
    assert {"kernel", "cloud-init"} <= set(readiness.phases)
    assert "\ufffd" in probe.console.text


def test_console_log_keeps_a_character_split_between_reads(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"caf\xc3")
    console = ConsoleLog(log)
    console.read()
    with log.open("ab") as f:
        f.write(b"\xa9 \xff done\n")
    assert console.read() == "café \ufffd done\n"
