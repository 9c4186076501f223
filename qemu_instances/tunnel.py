"""`qinst forward`: TCP forwards to an instance over its checked SSH connection (ssh -N -L), for any network and
through a remote libvirt host, until the command is interrupted."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Sequence

from qemu_instances.access import ssh_argv
from qemu_instances.errors import QinstError
from qemu_instances.forwarding import Forward, port_in_use
from qemu_instances.instances import Instance
from qemu_instances.proc import spawn
from qemu_instances.settings import Settings


def tunnel_argv(inst: Instance, settings: Settings, forwards: Sequence[Forward]) -> list[str]:
    """ssh -N -L ... to the instance, with the same checked connection (and jump) as `qinst ssh`."""
    argv = ssh_argv(inst, settings, forwards=[fwd.ssh_local for fwd in forwards])
    options = [
        "-N",
        "-o", "ExitOnForwardFailure=yes",
        "-o", "BatchMode=yes",
        "-o", "ConnectTimeout=20",
        "-o", "ServerAliveInterval=15",
    ]  # fmt: skip
    return [argv[0], *options, *argv[1:]]


def run_tunnel(argv: Sequence[str], forwards: Sequence[Forward], on_ready: Callable[[], None]) -> None:
    """Run the tunnel until it is interrupted (Ctrl-C, SIGTERM, SIGHUP: KeyboardInterrupt through the CLI's one
    signal path), then stop ssh cleanly (proc.spawn does).

    on_ready is called once every forwarded port listens; QinstError if ssh ends by itself.
    """
    # Its own session: the terminal's Ctrl-C reaches only qinst, which then ends ssh itself.
    with spawn(argv, stdout=subprocess.DEVNULL, new_session=True, hint="install openssh-client") as proc:
        ready = False
        while proc.poll() is None:
            if not ready and all(port_in_use(f) for f in forwards):
                ready = True
                on_ready()
            time.sleep(0.1 if not ready else 0.5)
        stderr = proc.stderr.read(64 << 10).decode(errors="replace").strip() if proc.stderr else ""
        why = stderr.splitlines()[-1] if stderr else f"ssh exited with status {proc.returncode}"
        raise QinstError(f"the tunnel ended: {why}", hint="is the instance still running? see 'qinst ls'")
