"""Several libvirt hosts (the config file's [hosts] table): list them all, place an instance, spread smoke runs."""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from qemu_instances.config import host_uri
from qemu_instances.errors import HypervisorError, QinstError, UsageError
from qemu_instances.host import Host
from qemu_instances.instances import Instance, list_instances
from qemu_instances.settings import Settings

T = TypeVar("T")
HOST_TIMEOUT = 20.0  # seconds a host may take to answer (an SSH connection included)


@dataclass(frozen=True)
class HostAnswer(Generic[T]):
    host: str
    value: T | None = None
    error: str | None = None


def on_each_host(
    settings: Settings, names: Sequence[str], work: Callable[[Host], T], timeout: float = HOST_TIMEOUT
) -> list[HostAnswer[T]]:
    """Run work(host) on every named host at once; a host that fails or does not answer in time gets an error.

    The threads are daemons: a host that hangs (an SSH connection that never completes) cannot hold qinst up.
    """
    answers: queue.Queue[HostAnswer[T]] = queue.Queue()

    def one(name: str) -> None:
        try:
            with Host(settings.hosts[name]) as host:
                answers.put(HostAnswer(name, value=work(host)))
        except QinstError as exc:
            answers.put(HostAnswer(name, error=exc.message))
        except Exception as exc:  # a host's failure must not hide the others' answers
            answers.put(HostAnswer(name, error=f"{type(exc).__name__}: {exc}"))

    for name in names:
        threading.Thread(target=one, args=(name,), daemon=True, name=f"host-{name}").start()
    got: dict[str, HostAnswer[T]] = {}
    deadline = time.monotonic() + timeout
    while len(got) < len(names):
        try:
            answer = answers.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        got[answer.host] = answer
    for name in names:
        got.setdefault(name, HostAnswer(name, error=f"no answer within {timeout:.0f} s"))
    return [got[name] for name in names]


def all_hosts(settings: Settings) -> list[str]:
    if not settings.hosts:
        raise UsageError("no hosts are configured", hint='add [hosts.NAME] uri = "qemu+ssh://..." to config.toml')
    return sorted(settings.hosts)


def list_all(settings: Settings, timeout: float = HOST_TIMEOUT) -> list[HostAnswer[list[Instance]]]:
    """Every configured host's instances, asked in parallel."""
    return on_each_host(settings, all_hosts(settings), list_instances, timeout)


def place(settings: Settings, memory_mib: int, timeout: float = HOST_TIMEOUT) -> str:
    """The configured host with the most free memory that fits an instance of memory_mib (plus a margin)."""
    need = (memory_mib + 256) << 20
    answers = on_each_host(settings, all_hosts(settings), Host.free_memory, timeout)
    fits = [a for a in answers if a.value is not None and a.value >= need]
    if not fits:
        seen = "; ".join(
            f"{a.host}: {a.error}" if a.error else f"{a.host}: {(a.value or 0) >> 20} MiB free" for a in answers
        )
        raise HypervisorError(f"no host can fit {memory_mib} MiB ({seen})")
    return max(fits, key=lambda a: a.value or 0).host


def for_host(settings: Settings, name: str) -> Settings:
    """The settings with --host NAME applied."""
    return dataclasses.replace(settings, connect=host_uri(settings.hosts, name, settings.config_dir), host=name)
