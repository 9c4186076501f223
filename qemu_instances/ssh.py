"""Guest SSH: the strict option list, known_hosts, host-key scans and probes, running commands, the jump host.

It speaks plain values (address, port, user, the recorded host keys, the key file, the hop), never Instance.
Host keys are always checked strictly against the keys the guest printed on its console.

Public API:
- SshHop.from_uri(uri)                  the hop through a remote libvirt host (qemu+ssh://), or None
- known_hosts_line(host, port, keys)    known_hosts text for the guest's keys
- write_known_hosts(path, host, port, keys)   write it atomically
- SshTarget(host, port, user, known_hosts, key_file, hop)   where and how to log in
- ssh_options(target) -> list[str]      the `-o` options (built here only), for ssh, scp and ssh -L alike
- config_lines(alias, target) -> list[str]   the same options as an ssh_config `Host` block (qinst ssh-config)
- ssh_argv(target, command) -> list[str]   a full `ssh` command line, `--` before the destination
- run(target, command, timeout) -> SshResult   one command, batch mode; never raises for its exit status
- Connection(target)                    many commands over ONE connection (OpenSSH ControlMaster): .run(command)
- scan_host_keys(host, port), key_checker(hop) -> KeyCheck   is the guest offering one of its printed keys?
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from urllib.parse import parse_qs, urlsplit

from qemu_instances.errors import QinstError, UsageError
from qemu_instances.files import write_atomically
from qemu_instances.proc import spawn, try_run

KEY_LINE = re.compile(r"((?:ssh|ecdsa|sk)-[\w@.-]+) ([A-Za-z0-9+/=]{32,})")
HostKey = tuple[str, str]  # (type, base64 body)
KeyCheck = Callable[[str, int, list[HostKey]], bool | None]
"""(host, port, expected keys) -> True: SSH offers one of them; False: it offers others; None: no answer yet."""


def escape_percent(value: str) -> str:
    """ssh expands %-tokens in paths and commands given as options: a literal % is written %%."""
    return value.replace("%", "%%")


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_PLAIN = re.compile(r"[A-Za-z0-9_.,:/@%+=-]+")


def config_value(value: str, what: str) -> str:
    """A value as ssh reads it in a config line or an `-o` option: double-quoted unless plain (ssh splits words at
    spaces: a path with one would be two known_hosts files). Quotes, backslashes and control characters are refused
    (ssh_config has no escape that every OpenSSH reads alike; a newline would start a line of its own), and so is
    `${` (ssh would expand an environment variable there)."""
    if _CONTROL.search(value) or any(c in value for c in "\"'\\") or "${" in value or not value:
        raise UsageError(
            f"{what} {value[:200]!r} cannot be written for ssh: no quotes, backslashes, control characters or ${{",
            hint="choose a path without them (the cache dir: --cache-dir or QINST_CACHE_DIR)",
        )
    return value if _PLAIN.fullmatch(value) else f'"{value}"'


@dataclass(frozen=True)
class SshHop:
    """The SSH hop to a remote libvirt host, from its qemu+ssh URI.

    A `user`-network guest's forward listens on the remote host's loopback, so qinst's ssh, key probe and smoke
    checks go through the host (ProxyCommand ssh -W), with the identity and ssh command the URI names; the host's
    own key is checked by the user's ssh configuration, the guest's by qinst.
    """

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
        argv += ["-o", "BatchMode=yes", "-W", "%h:%p", "--", self.host]
        return " ".join(a if a == "%h:%p" else escape_percent(shlex.quote(a)) for a in argv)

    def ssh_options(self) -> list[str]:
        return ["-o", f"ProxyCommand={self.proxy_command()}"]


def known_hosts_line(host: str, port: int, keys: Sequence[HostKey]) -> str:
    pattern = host if port == 22 else f"[{host}]:{port}"
    return "".join(f"{pattern} {kind} {body}\n" for kind, body in keys)


def write_known_hosts(path: Path, host: str, port: int, keys: Sequence[HostKey]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomically(path, known_hosts_line(host, port, keys).encode())
    return path


@dataclass(frozen=True)
class SshTarget:
    """Where and how to log in to a guest: its address, the user, the known_hosts file of its recorded keys."""

    host: str
    port: int
    user: str
    known_hosts: Path
    key_file: str = ""  # a private key for -i, when qinst knows it
    hop: SshHop | None = None


@dataclass(frozen=True)
class SshResult:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def require_ssh() -> None:
    if shutil.which("ssh") is None:
        raise QinstError("ssh not found", hint="install openssh-client")


def ssh_options(target: SshTarget, *, batch: bool = False, forwards: bool = False) -> list[str]:
    """The options every ssh (and scp, and ssh -L) to the guest takes: strict host keys, its port, key and hop.

    No configuration file is read (`-F /dev/null`): nothing in ~/.ssh/config or /etc/ssh/ssh_config (`Host *` with
    StrictHostKeyChecking no, UserKnownHostsFile /dev/null, KnownHostsCommand, HostKeyAlias, ProxyCommand,
    LocalCommand) applies to a connection to a guest. The user's agent is never forwarded to a guest, nor X11, and
    no port is forwarded unless `forwards` (qinst forward's own -L). ssh still uses the user's agent and default
    keys to log in; the jump through a remote libvirt host (ProxyCommand) is a separate ssh that reads the user's
    configuration for that host.
    """
    opts = [
        "-F", "/dev/null",
        "-o", f"UserKnownHostsFile={config_value(escape_percent(str(target.known_hosts)), 'known_hosts path')}",
        "-o", "StrictHostKeyChecking=yes",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "UpdateHostKeys=no",
        "-o", "CheckHostIP=no",
        "-o", "ForwardAgent=no",
        "-o", "ForwardX11=no",
        "-o", "PermitLocalCommand=no",
        "-o", "LogLevel=ERROR",
        "-o", f"Port={target.port}",
    ]  # fmt: skip
    if not forwards:
        opts += ["-o", "ClearAllForwardings=yes"]
    if batch:
        opts += ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]
    if target.hop is not None:
        # The guest's address (a forward on the host's loopback, or a NAT address) is reached through the host.
        opts += target.hop.ssh_options()
    if target.key_file and Path(target.key_file).exists():
        from qemu_instances.sshkeys import check_private_key  # a key ssh would ignore is said, not left to fail

        check_private_key(Path(target.key_file))
        key = config_value(escape_percent(target.key_file), "private key path")
        opts += ["-o", f"IdentityFile={key}", "-o", "IdentitiesOnly=yes"]
    return opts


def option_pairs(options: Sequence[str]) -> list[tuple[str, str]]:
    """The (keyword, value) of each `-o Keyword=value` in an ssh option list, in order (-F and the like left out)."""
    pairs = []
    words = iter(options)
    for flag in words:
        if flag in ("-o", "-F", "-p", "-l", "-i", "-J"):  # the options ssh_options may give take a value
            value = next(words, "")
            if flag == "-o":
                keyword, _, rest = value.partition("=")
                pairs.append((keyword, rest))
    return pairs


def config_lines(alias: str, target: SshTarget) -> list[str]:
    """The ssh_config `Host` block for a guest: ssh_options' own options (the one list), as config lines.

    A config block cannot say `-F /dev/null`: options of the user's files that qinst's do not set still apply, so
    the block also turns off what could take the connection elsewhere or accept other keys: a `Host *` ProxyJump
    or ProxyCommand (for a local guest), a KnownHostsCommand. ssh keeps the first value it reads for each option:
    the block must come before the user's `Host *` (docs/integrations.md: the Include line at the top). Port
    forwards given on the user's own command line are kept (an editor's remote mode needs them).
    """
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", alias):  # no pattern (*, ?, !, a list) and no %-token
        raise UsageError(f"{alias[:80]!r} cannot be an ssh_config Host name")
    pairs = [("HostName", target.host), ("User", target.user), *option_pairs(ssh_options(target, forwards=True))]
    if target.hop is None:
        pairs.append(("ProxyCommand", "none"))  # no ProxyJump/ProxyCommand of a `Host *` either
    pairs.append(("KnownHostsCommand", "none"))
    lines = [f"Host {alias}"]
    for keyword, value in pairs:
        if keyword == "ProxyCommand":  # the rest of the line is a shell command (SshHop quotes its words)
            if _CONTROL.search(value):
                raise UsageError(f"the ProxyCommand for {alias} has a control character")
            lines.append(f"    {keyword} {value}")
        elif keyword in ("HostName", "User"):
            lines.append(f"    {keyword} {config_value(value, keyword)}")
        else:
            lines.append(f"    {keyword} {value}")  # written by ssh_options, already a config value
    return lines


def destination(target: SshTarget) -> str:
    return f"{target.user}@{target.host}"


def ssh_argv(
    target: SshTarget, command: Sequence[str] = (), *, batch: bool = False, forwards: Sequence[str] = ()
) -> list[str]:
    """The system ssh's argv: nothing after `--` is read as an option, neither the destination nor the command.
    `forwards` are -L specifications (qinst forward)."""
    options = ssh_options(target, batch=batch, forwards=bool(forwards))
    local = [arg for spec in forwards for arg in ("-L", spec)]
    return ["ssh", *options, *local, "--", destination(target), *command]


def _timed(argv: list[str], timeout: float) -> SshResult:
    started = time.monotonic()
    proc = try_run(argv, timeout=timeout, hint="install openssh-client")
    if proc is None:
        return SshResult(255, "", f"ssh did not finish within {timeout:.0f} s", time.monotonic() - started)
    return SshResult(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started)


def run(target: SshTarget, command: Sequence[str], timeout: float = 60.0) -> SshResult:
    """Run a command in the guest over SSH (batch mode, host key checked); never raises for its exit status."""
    return _timed(ssh_argv(target, command, batch=True), timeout)


@dataclass
class Connection:
    """Many commands over one SSH connection: an OpenSSH control master, its socket in a private temp dir.

    with Connection(target) as conn: conn.run(["uname", "-r"]); conn.run(["id"])
    When the master cannot be set up, each run() connects on its own (ssh falls back by itself).
    """

    target: SshTarget
    timeout: float = 30.0  # seconds the master may take to log in
    _dir: Path | None = field(default=None, init=False)
    _stack: ExitStack = field(default_factory=ExitStack, init=False)

    @property
    def control_path(self) -> Path:
        assert self._dir is not None, "use Connection as a context manager"
        return self._dir / "control"

    def _control_options(self, mode: str) -> list[str]:
        return ["-o", f"ControlMaster={mode}", "-o", f"ControlPath={escape_percent(str(self.control_path))}"]

    def __enter__(self) -> Connection:
        require_ssh()
        import tempfile  # here: `ls` imports this module for its key checks

        self._dir = Path(tempfile.mkdtemp(prefix="qinst-ssh-"))  # mode 0700: only we reach the socket
        self._stack.callback(shutil.rmtree, self._dir, ignore_errors=True)
        argv = ["ssh", *ssh_options(self.target, batch=True), *self._control_options("yes"), "-N", "--"]
        master = self._stack.enter_context(
            spawn([*argv, destination(self.target)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        )
        deadline = time.monotonic() + self.timeout
        while not self.control_path.exists() and master.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return self

    def run(self, command: Sequence[str], timeout: float = 60.0) -> SshResult:
        argv = ["ssh", *ssh_options(self.target, batch=True), *self._control_options("no"), "--"]
        return _timed([*argv, destination(self.target), *command], timeout)

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._stack.close()  # the master is stopped (proc.spawn), then its folder removed


SCAN_TIMEOUT = 30.0  # seconds for ssh-keyscan in all: its -T restarts with every byte read (a trickling server)


# ssh-keyscan's -t names for the key types a guest prints.
_SCAN_TYPES = {
    "ssh-ed25519": "ed25519",
    "ecdsa-sha2-nistp256": "ecdsa",
    "ecdsa-sha2-nistp384": "ecdsa",
    "ecdsa-sha2-nistp521": "ecdsa",
    "ssh-rsa": "rsa",
    "sk-ssh-ed25519@openssh.com": "ed25519-sk",
    "sk-ecdsa-sha2-nistp256@openssh.com": "ecdsa-sk",
}


def scan_types(keys: Sequence[HostKey]) -> list[str]:
    """The key types worth asking for: ed25519 alone when the guest printed one, else the types it printed.

    Each type is a connection and a key exchange with the guest; an emulated guest signs RSA slowly, and by default
    ssh-keyscan asks for five types at once: ~12 s against a TCG guest where one ed25519 exchange takes ~1-3 s.
    """
    types = list(dict.fromkeys(_SCAN_TYPES[t] for t, _ in keys if t in _SCAN_TYPES))
    return ["ed25519"] if "ed25519" in types else types


def scan_host_keys(host: str, port: int, types: Sequence[str] = ()) -> list[HostKey]:
    """The host keys of `types` (default: ssh-keyscan's) the SSH server at host:port offers (empty: no answer)."""
    # -T 10: a guest under heavy emulation may take seconds to answer; an early give-up only makes the next try later.
    argv = ["ssh-keyscan", "-T", "10", *(["-t", ",".join(types)] if types else []), "-p", str(port), "--", host]
    proc = try_run(argv, timeout=SCAN_TIMEOUT, hint="install openssh-client")
    return KEY_LINE.findall(proc.stdout) if proc is not None else []


def check_host_keys(host: str, port: int, keys: list[HostKey]) -> bool | None:
    """Ask the SSH server at host:port (directly, with ssh-keyscan) whether it offers one of `keys`.

    Only the printed keys' types are asked for; when the server offers none of those, it is asked for every type,
    so that a server with other keys only is refused (False) rather than taken for one not answering yet (None).
    """
    types = scan_types(keys)
    offered = scan_host_keys(host, port, types) if types else []
    if not offered:
        offered = scan_host_keys(host, port)
    if not offered:
        return None
    return bool(set(offered) & set(keys))


PROBE_TIMEOUT = 20.0  # seconds for a host-key probe through ssh: ConnectTimeout does not cover a stalled key exchange


def check_host_keys_via(hop: SshHop | None) -> KeyCheck:
    """The same check through the hop: ssh with a known_hosts of `keys` and no identity.

    Host-key verification happens before authentication, so "Permission denied" proves the key matched.
    """

    def check(host: str, port: int, keys: list[HostKey]) -> bool | None:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="qinst-known-") as tmp:
            known = write_known_hosts(Path(tmp) / "hosts", host, port, keys)
            argv = ssh_argv(SshTarget(host, port, "qinst-probe", known, hop=hop), ["true"], batch=True)
            argv[1:1] = [
                "-o", "ConnectTimeout=5", "-o", "PreferredAuthentications=publickey",
                "-o", "IdentitiesOnly=yes", "-o", "IdentityFile=/dev/null",
            ]  # fmt: skip
            result = _timed(argv, PROBE_TIMEOUT)
        if "Permission denied" in result.stderr:
            return True
        if "Host key verification failed" in result.stderr or "IDENTIFICATION HAS CHANGED" in result.stderr:
            return False
        return None

    return check


def key_checker(hop: SshHop | None) -> KeyCheck:
    """How to ask a guest's SSH server for its host key: directly, or through the remote libvirt host."""
    return check_host_keys if hop is None else check_host_keys_via(hop)
