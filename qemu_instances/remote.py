"""Remote libvirt hosts (qemu+ssh://): reaching a guest's forwarded port through the host, over SSH.

A `user`-network guest's forward listens on the remote host's loopback, so qinst's ssh, ssh-keyscan-like probe
and smoke checks go through the host (ProxyCommand ssh -W), with the same identity and ssh command that libvirt's
URI names; the host's own key is checked by the user's ssh configuration, the guest's by qinst.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit


@dataclass(frozen=True)
class SshHop:
    """The SSH hop to a remote libvirt host, from its qemu+ssh URI."""

    host: str
    user: str | None = None
    port: int | None = None
    keyfile: str | None = None
    command: str = "ssh"

    @classmethod
    def from_uri(cls, uri: str) -> SshHop | None:
        """The hop for a qemu+ssh:// URI; None for local URIs (and other transports, reached directly)."""
        parts = urlsplit(uri)
        if not parts.hostname or not parts.scheme.endswith("+ssh"):
            return None
        query = parse_qs(parts.query)
        return cls(
            host=parts.hostname,
            user=parts.username,
            port=parts.port,
            keyfile=query.get("keyfile", [None])[0],
            command=query.get("command", ["ssh"])[0] or "ssh",
        )

    def proxy_command(self) -> str:
        """An ssh ProxyCommand that opens a channel from the host to the guest's address (%h:%p)."""
        argv = [self.command]
        if self.port:
            argv += ["-p", str(self.port)]
        if self.user:
            argv += ["-l", self.user]
        if self.keyfile:
            argv += ["-i", self.keyfile]
        argv += ["-o", "BatchMode=yes", "-W", "%h:%p", self.host]
        return shlex.join(argv)

    def ssh_options(self) -> list[str]:
        return ["-o", f"ProxyCommand={self.proxy_command()}"]
