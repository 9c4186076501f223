"""Readiness: watch the serial console and the domain, then check SSH against the host keys the guest printed.

It sees the guest through a Probe of plain callables: no libvirt, no SSH command lines here."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from qemu_instances.console import Console, ConsoleLog
from qemu_instances.errors import GuestFailed, GuestTimeout, Interrupted
from qemu_instances.ssh import KEY_LINE, HostKey, KeyCheck, check_host_keys

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
POLL = 0.5  # seconds: readiness is noticed within a second of happening
__all__ = [
    "CloudInitErrors",
    "Console",
    "ConsoleLog",
    "GuestPaused",
    "Phase",
    "Probe",
    "Readiness",
    "host_keys",
    "wait_for_ssh",
    "wait_ready",
]


class Phase(StrEnum):
    RUNNING = "running"
    KERNEL = "kernel"
    CLOUD_INIT = "cloud-init"
    SSH = "ssh"


class GuestPaused(GuestFailed):
    """The domain paused by itself (under KVM here: an emulation failure)."""


class CloudInitErrors(GuestFailed):
    """cloud-init finished with errors, but SSH offers a host key the guest printed: the guest is reachable."""

    def __init__(self, failures: list[str], keys: list[HostKey], hint: str | None = None) -> None:
        self.failures = failures
        self.modules = sorted({m for line in failures for m in FAILED_MODULE.findall(line)})
        named = f" in module(s) {', '.join(self.modules)}" if self.modules else ""
        super().__init__(f"cloud-init finished with errors{named}:\n" + "\n".join(failures[-10:]), hint=hint)
        self.keys = keys


def host_keys(console_text: str) -> list[HostKey]:
    """(type, base64) of every host key the guest printed between cloud-init's markers."""
    block = HOST_KEYS.search(console_text)
    return KEY_LINE.findall(block.group(1)) if block else []


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


def wait_ready(probe: Probe, *, timeout: float, readiness: Readiness) -> list[HostKey]:
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
    keys: set[HostKey],
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
