"""The SSH forward's port on user networks: picked free, and picked again when another process takes it first.

A port found free is only free until QEMU binds it; between the two, another program (or a parallel `up`) may take
it. QEMU then refuses to start ("Could not set up host forwarding rule"); starting again with a new port is sound,
since nothing of the failed start remains.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TypeVar

from qemu_instances.domain import InstanceSpec
from qemu_instances.errors import HypervisorError, UsageError
from qemu_instances.logs import log

T = TypeVar("T")
HOSTFWD_TAKEN = "Could not set up host forwarding rule"
TRIES = 5


def with_ssh_port(spec: InstanceSpec, port: int) -> InstanceSpec:
    return replace(spec, ssh_port=port, metadata=replace(spec.metadata, ssh_port=port))


def start_with_port(
    start: Callable[[InstanceSpec], T], spec: InstanceSpec, pick: Callable[[], int] | None, tries: int = TRIES
) -> T:
    """start(spec); when QEMU cannot bind spec's forward port, again with pick()'s port, up to `tries` starts.

    `pick` is None when the user chose the port (--ssh-port): then a taken port is a usage error naming it.
    """
    for attempt in range(1, tries + 1):
        try:
            return start(spec)
        except HypervisorError as exc:
            if HOSTFWD_TAKEN not in exc.message:
                raise
            if pick is None:
                raise UsageError(
                    f"port {spec.ssh_port} on 127.0.0.1 is already in use: cannot forward it to the guest's SSH",
                    hint="choose another --ssh-port, or leave it out and qinst picks a free one",
                ) from exc
            if attempt == tries:
                raise HypervisorError(
                    f"{exc.message} (after {tries} ports, each taken before QEMU could bind it)"
                ) from exc
            port = pick()
            log.info("port %d was taken before QEMU could bind it; starting with port %d", spec.ssh_port, port)
            spec = with_ssh_port(spec, port)
    raise AssertionError("unreachable")
