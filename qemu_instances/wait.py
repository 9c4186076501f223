"""Readiness: watch the serial console and the domain, then check SSH against the host keys the guest printed."""

from __future__ import annotations

import codecs
import contextlib
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

import libvirt

from qemu_instances.errors import GuestFailed, GuestTimeout, HypervisorError, Interrupted, QinstError
from qemu_instances.proc import run

KERNEL = re.compile(r"Linux version \d|Booting Linux|Kernel command line:")
PANIC = re.compile(r"Kernel panic - not syncing.*")
CLOUD_INIT_DONE = re.compile(r"Cloud-init v\. \S+ finished at [^\r\n]*")
# A module that failed makes `cloud-init status` say error; cloud-init logs it on the console as a WARNING.
CLOUD_INIT_FAILED = re.compile(
    r"[^\r\n]*\[(?:WARNING|ERROR|CRITICAL)\]: (?:Failed running |Failed to run module |Running module \S+ .*failed)"
    r"[^\r\n]*"
)
# The module a failure belongs to, in cloud-init's console lines ("Running module scripts_user (...) failed").
FAILED_MODULE = re.compile(r"(?:Running module|Failed to run module) ([A-Za-z0-9_-]+)")
HOST_KEYS = re.compile(r"-----BEGIN SSH HOST KEY KEYS-----(.*?)-----END SSH HOST KEY KEYS-----", re.S)
KEY_LINE = re.compile(r"((?:ssh|ecdsa|sk)-[\w@.-]+) ([A-Za-z0-9+/=]{32,})")
POLL = 0.5  # seconds: readiness is noticed within a second of happening


class Phase(StrEnum):
    RUNNING = "running"
    KERNEL = "kernel"
    CLOUD_INIT = "cloud-init"
    SSH = "ssh"


class GuestPaused(GuestFailed):
    """The domain paused by itself (under KVM here: an emulation failure)."""


class CloudInitErrors(GuestFailed):
    """cloud-init finished with errors, but SSH offers a host key the guest printed: the guest is reachable."""

    def __init__(self, failures: list[str], keys: list[tuple[str, str]]) -> None:
        self.modules = sorted({m for line in failures for m in FAILED_MODULE.findall(line)})
        named = f" in module(s) {', '.join(self.modules)}" if self.modules else ""
        super().__init__(f"cloud-init finished with errors{named}:\n" + "\n".join(failures[-10:]))
        self.keys = keys


class Console(Protocol):
    """The serial console's text so far; read() returns all of it, including what arrived since the last call."""

    text: str

    def read(self) -> str: ...

    def tail(self, n: int = 20) -> str: ...

    def close(self) -> None: ...


def _tail(text: str, n: int) -> str:
    lines = [line.rstrip("\r") for line in text.splitlines() if line.strip()]
    return "\n".join(lines[-n:])


@dataclass
class ConsoleLog:
    """The serial console as recorded to a file by virtlogd (local daemons), read incrementally."""

    path: Path
    text: str = ""
    _offset: int = 0
    # Bytes that are not UTF-8 become U+FFFD; a character split between two reads is kept whole.
    _decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace")
    )

    def read(self) -> str:
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return self.text
        self._offset += len(chunk)
        self.text += self._decoder.decode(chunk)
        return self.text

    def tail(self, n: int = 20) -> str:
        return _tail(self.text, n)

    def close(self) -> None:
        pass


class ConsoleStream:
    """The serial console read through libvirt (remote daemons): a non-blocking console stream."""

    def __init__(self, conn: Any, dom: Any) -> None:
        self.text = ""
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._stream = conn.newStream(libvirt.VIR_STREAM_NONBLOCK)
        try:
            dom.openConsole(None, self._stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"cannot open the serial console: {exc.get_error_message()}") from exc
        self._open = True

    def read(self) -> str:
        while self._open:
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
            self.text += self._decoder.decode(data)
        return self.text

    def tail(self, n: int = 20) -> str:
        return _tail(self.text, n)

    def close(self) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            self._stream.abort()
        self._open = False


def host_keys(console_text: str) -> list[tuple[str, str]]:
    """(type, base64) of every host key the guest printed between cloud-init's markers."""
    block = HOST_KEYS.search(console_text)
    return KEY_LINE.findall(block.group(1)) if block else []


def known_hosts_line(host: str, port: int, keys: list[tuple[str, str]]) -> str:
    pattern = host if port == 22 else f"[{host}]:{port}"
    return "".join(f"{pattern} {kind} {body}\n" for kind, body in keys)


KeyCheck = Callable[[str, int, list[tuple[str, str]]], bool | None]
"""(host, port, expected keys) -> True: SSH offers one of them; False: it offers others; None: no answer yet."""


def check_host_keys(host: str, port: int, keys: list[tuple[str, str]]) -> bool | None:
    """Ask the SSH server at host:port (directly, with ssh-keyscan) whether it offers one of `keys`."""
    offered = scan_host_keys(host, port)
    if not offered:
        return None
    return bool(set(offered) & set(keys))


def check_host_keys_via(ssh_options: list[str]) -> KeyCheck:
    """The same check through a jump (remote hosts): ssh with a known_hosts of `keys` and no identity.

    Host-key verification happens before authentication, so "Permission denied" proves the key matched.
    """

    def check(host: str, port: int, keys: list[tuple[str, str]]) -> bool | None:
        with tempfile.NamedTemporaryFile("w", prefix="qinst-known-", suffix=".hosts") as known:
            known.write(known_hosts_line(host, port, keys))
            known.flush()
            argv = [
                "ssh", *ssh_options,
                "-o", f"UserKnownHostsFile={known.name}", "-o", "GlobalKnownHostsFile=/dev/null",
                "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5",
                "-o", "PreferredAuthentications=publickey", "-o", "IdentitiesOnly=yes", "-o", "IdentityFile=/dev/null",
                "-p", str(port), f"qinst-probe@{host}", "true",
            ]  # fmt: skip
            try:
                proc = run(argv, timeout=20, check=False)
            except QinstError:  # timed out
                return None
        if "Permission denied" in proc.stderr:
            return True
        if "Host key verification failed" in proc.stderr or "IDENTIFICATION HAS CHANGED" in proc.stderr:
            return False
        return None

    return check


def scan_host_keys(host: str, port: int) -> list[tuple[str, str]]:
    """The host keys the SSH server at host:port offers right now (empty when it does not answer)."""
    try:
        out = run(["ssh-keyscan", "-T", "10", "-p", str(port), host], timeout=30).stdout
    except QinstError:
        return []
    return KEY_LINE.findall(out)


@dataclass
class Readiness:
    """Timings (seconds since the start) of each phase reached."""

    started: float = field(default_factory=time.monotonic)
    phases: dict[str, float] = field(default_factory=dict)

    def restart(self) -> None:
        self.started = time.monotonic()
        self.phases.clear()

    def mark(self, phase: Phase) -> None:
        self.phases.setdefault(str(phase), round(time.monotonic() - self.started, 2))

    def durations(self) -> dict[str, float]:
        """Seconds spent in each phase: boot (start to kernel), cloud-init, ssh."""
        out, previous = {}, 0.0
        for phase, label in ((Phase.KERNEL, "boot"), (Phase.CLOUD_INIT, "cloud-init"), (Phase.SSH, "ssh")):
            if str(phase) in self.phases:
                out[label] = round(self.phases[str(phase)] - previous, 2)
                previous = self.phases[str(phase)]
        return out


@dataclass(frozen=True)
class Probe:
    """How to look at the guest: its state, its console, its SSH address."""

    state: Callable[[], tuple[str, str]]  # (state, reason) e.g. ("running", "booted"), ("paused", "unknown")
    console: Console
    ssh_host: Callable[[], str | None]  # None while the address is not known yet
    ssh_port: int
    cancelled: Callable[[], bool] = lambda: False  # a smoke run being stopped
    scan: KeyCheck = lambda host, port, keys: check_host_keys(host, port, keys)


def wait_ready(probe: Probe, *, timeout: float, readiness: Readiness) -> list[tuple[str, str]]:
    """Wait until cloud-init finished and SSH offers a host key the guest printed; return those keys.

    Fails fast (GuestFailed, with console lines) on a panic, a stopped or paused domain, or a key mismatch;
    GuestTimeout after `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    next_scan, scans = 0.0, 0
    failures: list[str] = []
    while True:
        if probe.cancelled():
            raise Interrupted("stopped while waiting for the guest")
        text = probe.console.read()
        state, reason = probe.state()
        if state == "running":
            readiness.mark(Phase.RUNNING)
        elif state == "paused":
            raise GuestPaused(f"the guest paused by itself ({reason})\n{probe.console.tail()}")
        elif state in ("shutoff", "crashed"):
            raise GuestFailed(f"the guest stopped during boot ({state}: {reason})\n{probe.console.tail()}")
        if panic := PANIC.search(text):
            raise GuestFailed(f"the guest's kernel panicked: {panic.group(0).strip()}\n{probe.console.tail()}")
        if KERNEL.search(text):
            readiness.mark(Phase.KERNEL)
        done = CLOUD_INIT_DONE.search(text)
        if done:
            readiness.mark(Phase.CLOUD_INIT)
            if "DataSourceNone" in done.group(0):
                raise GuestFailed(f"cloud-init found no NoCloud seed: {done.group(0).strip()}")
            # With errors, SSH is still checked (within the same timeout): the guest stays reachable for inspection.
            failures = [m.group(0).strip() for m in CLOUD_INIT_FAILED.finditer(text)]
            keys = host_keys(text)
            if not keys:
                raise GuestFailed(
                    "cloud-init finished but the guest printed no SSH host keys on its console, "
                    "so its host key cannot be checked",
                    hint="enable cloud-init's keys_to_console module in the image",
                )
            host = probe.ssh_host()
            if host and time.monotonic() >= next_scan:
                # Back off: each unanswered scan can leave a pre-auth sshd child in a slow guest, and too many
                # make sshd drop every new connection ("Exceeded MaxStartups").
                scans += 1
                next_scan = time.monotonic() + min(10.0, float(scans))
                verdict = probe.scan(host, probe.ssh_port, keys)
                if verdict is False:
                    raise GuestFailed(
                        f"the SSH server at {host}:{probe.ssh_port} offers host keys the guest did not print "
                        "on its console: refusing it"
                    )
                if verdict:
                    readiness.mark(Phase.SSH)
                    if failures:
                        raise CloudInitErrors(failures, keys)
                    return keys
        if time.monotonic() > deadline:
            if failures:
                raise GuestFailed("cloud-init reported errors, and SSH did not answer:\n" + "\n".join(failures[-10:]))
            reached = ", ".join(readiness.phases) or "nothing"
            raise GuestTimeout(
                f"the guest was not ready within {timeout:.0f} s (reached: {reached})\n{probe.console.tail()}"
            )
        time.sleep(POLL)


def wait_for_ssh(
    host: str,
    port: int,
    keys: set[tuple[str, str]],
    state: Callable[[], tuple[str, str]],
    timeout: float,
    check: KeyCheck = check_host_keys,
) -> None:
    """Wait until the SSH server at host:port offers one of `keys` (a restarted instance)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current, reason = state()
        if current not in ("running", "paused"):
            raise GuestFailed(f"the guest stopped ({current}: {reason})")
        verdict = check(host, port, sorted(keys))
        if verdict:
            return
        if verdict is False:
            raise GuestFailed(f"the SSH server at {host}:{port} offers host keys that were not recorded: refusing it")
        time.sleep(1.0)
    raise GuestTimeout(f"SSH at {host}:{port} did not answer within {timeout:.0f} s")
