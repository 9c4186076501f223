"""Port forwards: `up --forward` as QEMU hostfwd rules (user-mode networks); `qinst forward`'s SSH tunnel is tunnel.py.

A forward is `[ADDR:]HOSTPORT:GUESTPORT` over TCP; ADDR is an IPv4 address and defaults to 127.0.0.1, so a port
is reachable from other machines only when the user names another address explicitly.
"""

from __future__ import annotations

import errno
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from qemu_instances.errors import UsageError

DEFAULT_ADDR = "127.0.0.1"
_FORWARD_RE = re.compile(r"(?:(?P<addr>[0-9.]+):)?(?P<host>[0-9]{1,5}):(?P<guest>[0-9]{1,5})")


@dataclass(frozen=True)
class Forward:
    """One TCP forward: addr:host_port on the host reaches guest_port in the guest."""

    addr: str
    host_port: int
    guest_port: int

    @classmethod
    def parse(cls, text: str) -> Forward:
        """`[ADDR:]HOSTPORT:GUESTPORT`; UsageError for anything else."""
        match = _FORWARD_RE.fullmatch(text.strip())
        hint = "use [ADDR:]HOSTPORT:GUESTPORT, e.g. 8080:80 or 0.0.0.0:8080:80 (TCP, IPv4)"
        if match is None:
            raise UsageError(f"invalid forward {text!r}", hint=hint)
        addr = match["addr"] or DEFAULT_ADDR
        try:
            ipaddress.IPv4Address(addr)
        except ValueError:
            raise UsageError(f"invalid address {addr!r} in forward {text!r}", hint=hint) from None
        host_port, guest_port = int(match["host"]), int(match["guest"])
        if not (1 <= host_port <= 65535 and 1 <= guest_port <= 65535):
            raise UsageError(f"invalid port in forward {text!r}: ports are 1-65535")
        return cls(addr, host_port, guest_port)

    def __str__(self) -> str:
        return f"{self.addr}:{self.host_port}:{self.guest_port}"

    @property
    def hostfwd(self) -> str:
        """QEMU's user-mode rule (beside the SSH one)."""
        return f"hostfwd=tcp:{self.addr}:{self.host_port}-:{self.guest_port}"

    @property
    def ssh_local(self) -> str:
        """ssh's -L argument: the guest port is reached from the guest's own loopback."""
        return f"{self.addr}:{self.host_port}:localhost:{self.guest_port}"

    def to_json(self) -> dict[str, object]:
        return {"address": self.addr, "host_port": self.host_port, "guest_port": self.guest_port}


def parse_forwards(texts: Iterable[str], *, taken: Iterable[int] = ()) -> tuple[Forward, ...]:
    """Parse forwards and refuse two on the same host port (or on a port in `taken`, such as SSH's)."""
    forwards = tuple(Forward.parse(t) for t in texts)
    seen: set[int] = set(taken)
    for fwd in forwards:
        if fwd.host_port in seen:
            raise UsageError(f"host port {fwd.host_port} is forwarded twice")
        seen.add(fwd.host_port)
    return forwards


def port_in_use(fwd: Forward) -> bool:
    """Is fwd's host address and port taken on this machine right now (a bind test)?"""
    import socket  # here: `ls` reads forwards, never binds

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((fwd.addr, fwd.host_port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise UsageError(f"cannot listen on {fwd.addr}:{fwd.host_port}: {exc.strerror}") from exc
    return False


def check_free(forwards: Iterable[Forward]) -> None:
    """UsageError naming the first forward whose host port is already in use here."""
    for fwd in forwards:
        if port_in_use(fwd):
            raise UsageError(
                f"port {fwd.addr}:{fwd.host_port} is already in use", hint="choose another host port for the forward"
            )
