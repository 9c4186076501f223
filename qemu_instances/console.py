"""The guest's serial console, in one place: where it is recorded (virtlogd's file on a local daemon, a pool volume
on a remote one), reading it while a guest boots (readiness), and reading what was recorded (`logs`, smoke).

Readiness reads at most CONSOLE_LIMIT bytes of a boot: a normal boot prints a few hundred KiB, and a guest that
floods its console before it is ready times out instead of filling memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from qemu_instances.errors import QinstError
from qemu_instances.host import Domain, Host
from qemu_instances.text import tail_lines, utf8_decoder

if TYPE_CHECKING:
    import codecs

CONSOLE_LIMIT = 8 << 20  # bytes of a boot's console that readiness reads (README, "Reliability: limits")
LOG_LIMIT = 64 << 20  # bytes of a recorded console that `logs` and smoke read: its end


class Console(Protocol):
    """The serial console's text so far; read() returns all of it, including what arrived since the last call."""

    text: str

    def read(self) -> str: ...

    def tail(self, n: int = 20) -> str: ...

    def close(self) -> None: ...


def console_log_name(name: str) -> str:
    return f"{name}-console.log"


def console_log_path(host: Host, pool: Any, name: str) -> Path:
    """Where virtlogd records the serial console: libvirt's log directory on a local daemon; on a remote one,
    the pool's directory (`pool` is needed only there), so that `qinst logs` can download it as a volume."""
    if not host.is_local:
        return host.pool_path(pool) / console_log_name(name)
    if host.is_system:
        return Path("/var/log/libvirt/qemu") / console_log_name(name)
    return Path.home() / ".cache/libvirt/qemu/log" / console_log_name(name)


@dataclass
class ConsoleLog:
    """The serial console as recorded to a file by virtlogd (local daemons), read incrementally."""

    path: Path
    text: str = ""
    _offset: int = 0
    # Bytes that are not UTF-8 become U+FFFD; a character split between two reads is kept whole.
    _decoder: codecs.IncrementalDecoder = field(default_factory=lambda: utf8_decoder())

    def read(self) -> str:
        room = CONSOLE_LIMIT - self._offset
        if room <= 0:
            return self.text
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                chunk = f.read(room)
        except FileNotFoundError:
            return self.text
        self._offset += len(chunk)
        self.text += self._decoder.decode(chunk)
        return self.text

    def tail(self, n: int = 20) -> str:
        return tail_lines(self.text, n)

    def close(self) -> None:
        pass


def open_console(host: Host, dom: Domain, path: Path) -> Console:
    """The console of a booting guest: its file (local daemons) or a libvirt console stream (remote ones)."""
    return ConsoleLog(path) if host.is_local else dom.open_console(CONSOLE_LIMIT)


def recorded(host: Host, name: str) -> str:
    """The console of instance `name` as recorded by virtlogd (its last LOG_LIMIT bytes): a local file, or a volume
    of the pool on a remote host. Its place derives from the name and the host, never from the (untrusted)
    metadata."""
    if not host.is_local:
        pool = host.pool(create=False)
        volume = console_log_path(host, pool, name).name
        return host.download_volume(pool, volume, limit=LOG_LIMIT).decode("utf-8", "replace")
    path = console_log_path(host, None, name)
    try:
        with path.open("rb") as f:  # virtlogd rotates it at 2 MiB
            f.seek(max(0, os.fstat(f.fileno()).st_size - LOG_LIMIT))
            return f.read(LOG_LIMIT).decode("utf-8", "replace")
    except FileNotFoundError:
        return ""
    except OSError as exc:
        raise QinstError(f"cannot read {path}: {exc.strerror}") from exc
