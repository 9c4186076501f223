"""The remembered KVM verdict of a host: where /dev/kvm answers but KVM guests cannot run (QEMU exits at start, or
the guest pauses at once), `up --accel auto` would pay a failed KVM start on every launch. The first failure is
written down and later launches start under TCG at once.

A cache, not state (libvirt stays the only record of instances): one small JSON file per host in the cache
directory, named after the libvirt URI, QEMU's version and the kernel's, so that a changed QEMU or kernel
forgets it by itself. Written atomically; read as untrusted input (a file that does not match its key to the
letter is ignored). `qinst doctor` shows it; `qinst doctor --reset-kvm` (or deleting the directory) forgets it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import dataclass
from pathlib import Path

from qemu_instances.errors import QinstError
from qemu_instances.files import parse_json, read_bounded, write_atomically
from qemu_instances.logs import log

DIRECTORY = "kvm-verdicts"  # under the cache directory
MAX_BYTES = 4096  # a verdict file is a few hundred bytes; anything larger is not one
REASON_CHARS = 300


@dataclass(frozen=True)
class HostKey:
    """What a verdict is valid for: the host (its libvirt URI), QEMU's version, the kernel's ("" when remote)."""

    uri: str
    qemu: str
    kernel: str

    @property
    def filename(self) -> str:
        import hashlib  # here: `up --accel tcg` never needs OpenSSL's start

        text = json.dumps([self.uri, self.qemu, self.kernel])
        return hashlib.sha256(text.encode()).hexdigest()[:32] + ".json"


@dataclass(frozen=True)
class Verdict:
    reason: str
    recorded: str
    path: Path


def host_key(uri: str, qemu_version: int, is_local: bool) -> HostKey:
    """The key of a host: a remote host's kernel is not known through libvirt (its QEMU version still resets it)."""
    return HostKey(uri, str(qemu_version), os.uname().release if is_local else "")


def directory(cache_dir: Path) -> Path:
    return cache_dir / DIRECTORY


def recall(cache_dir: Path, key: HostKey) -> Verdict | None:
    """The remembered KVM failure of this host, QEMU and kernel; None when there is none (or it is unreadable)."""
    path = directory(cache_dir) / key.filename
    try:
        data = parse_json(read_bounded(path, "KVM verdict", MAX_BYTES, follow=False), "KVM verdict")
    except (OSError, QinstError):
        return None
    if not isinstance(data, dict) or data.get("kvm") != "failed":
        return None
    if [data.get("uri"), data.get("qemu"), data.get("kernel")] != [key.uri, key.qemu, key.kernel]:
        return None  # another host's, or an edited file
    reason, recorded = data.get("reason"), data.get("recorded")
    if not isinstance(reason, str) or not isinstance(recorded, str):
        return None
    clean = "".join(c if c.isprintable() else " " for c in reason)[:REASON_CHARS]
    return Verdict(clean, "".join(c for c in recorded if c.isprintable())[:40], path)


def remember(cache_dir: Path, key: HostKey, reason: str) -> None:
    """Write down that KVM failed on this host; a cache that cannot be written only costs the next launch time."""
    data = {
        "kvm": "failed",
        "uri": key.uri,
        "qemu": key.qemu,
        "kernel": key.kernel,
        "reason": reason[:REASON_CHARS],
        "recorded": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
    }
    folder = directory(cache_dir)
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomically(folder / key.filename, json.dumps(data, indent=1).encode(), mode=0o600)
    except OSError as exc:
        log.debug("could not record the KVM verdict in %s: %s", folder, exc)


def forget(cache_dir: Path) -> list[Path]:
    """Remove every remembered verdict; returns the files removed."""
    folder = directory(cache_dir)
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return []
    for path in entries:
        if path.suffix == ".json" and not path.is_symlink() and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
