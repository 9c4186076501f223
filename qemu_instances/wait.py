"""Readiness: watch the serial console and the domain, then check SSH against the host keys the guest printed."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from qemu_instances.errors import GuestFailed, GuestTimeout, Interrupted, QinstError
from qemu_instances.proc import run

KERNEL = re.compile(r"Linux version \d|Booting Linux|Kernel command line:")
PANIC = re.compile(r"Kernel panic - not syncing.*")
CLOUD_INIT_DONE = re.compile(r"Cloud-init v\. \S+ finished at [^\r\n]*")
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


@dataclass
class ConsoleLog:
    """The serial console as recorded to a file, read incrementally."""

    path: Path
    text: str = ""
    _offset: int = 0

    def read(self) -> str:
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return self.text
        self._offset += len(chunk)
        self.text += chunk.decode("utf-8", "replace")
        return self.text

    def tail(self, n: int = 20) -> str:
        lines = [line.rstrip("\r") for line in self.text.splitlines() if line.strip()]
        return "\n".join(lines[-n:])


def host_keys(console_text: str) -> list[tuple[str, str]]:
    """(type, base64) of every host key the guest printed between cloud-init's markers."""
    block = HOST_KEYS.search(console_text)
    return KEY_LINE.findall(block.group(1)) if block else []


def known_hosts_line(host: str, port: int, keys: list[tuple[str, str]]) -> str:
    pattern = host if port == 22 else f"[{host}]:{port}"
    return "".join(f"{pattern} {kind} {body}\n" for kind, body in keys)


def scan_host_keys(host: str, port: int) -> list[tuple[str, str]]:
    """The host keys the SSH server at host:port offers right now (empty when it does not answer)."""
    try:
        out = run(["ssh-keyscan", "-T", "2", "-p", str(port), host], timeout=10).stdout
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
    console: ConsoleLog
    ssh_host: Callable[[], str | None]  # None while the address is not known yet
    ssh_port: int
    cancelled: Callable[[], bool] = lambda: False  # a smoke run being stopped


def wait_ready(
    probe: Probe, *, timeout: float, readiness: Readiness, paused_grace: float = 0.0
) -> list[tuple[str, str]]:
    """Wait until cloud-init finished and SSH offers a host key the guest printed; return those keys.

    Fails fast (GuestFailed, with console lines) on a panic, a stopped or paused domain, or a key mismatch;
    GuestTimeout after `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    next_scan = 0.0
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
            keys = host_keys(text)
            if not keys:
                raise GuestFailed(
                    "cloud-init finished but the guest printed no SSH host keys on its console, "
                    "so its host key cannot be checked",
                    hint="enable cloud-init's keys_to_console module in the image",
                )
            host = probe.ssh_host()
            if host and time.monotonic() >= next_scan:
                next_scan = time.monotonic() + 1.0
                offered = scan_host_keys(host, probe.ssh_port)
                if offered and not set(offered) & set(keys):
                    raise GuestFailed(
                        f"the SSH server at {host}:{probe.ssh_port} offers host keys the guest did not print "
                        "on its console: refusing it"
                    )
                if offered:
                    readiness.mark(Phase.SSH)
                    return keys
        if time.monotonic() > deadline:
            reached = ", ".join(readiness.phases) or "nothing"
            raise GuestTimeout(
                f"the guest was not ready within {timeout:.0f} s (reached: {reached})\n{probe.console.tail()}"
            )
        time.sleep(POLL)


def wait_for_ssh(
    host: str, port: int, keys: set[tuple[str, str]], state: Callable[[], tuple[str, str]], timeout: float
) -> None:
    """Wait until the SSH server at host:port offers one of `keys` (a restarted instance)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current, reason = state()
        if current not in ("running", "paused"):
            raise GuestFailed(f"the guest stopped ({current}: {reason})")
        offered = set(scan_host_keys(host, port))
        if offered & keys:
            return
        if offered:
            raise GuestFailed(f"the SSH server at {host}:{port} offers host keys that were not recorded: refusing it")
        time.sleep(1.0)
    raise GuestTimeout(f"SSH at {host}:{port} did not answer within {timeout:.0f} s")
