"""SSH public keys for instances: validated authorized_keys lines, default key discovery, key pairs.

Private keys are never read, copied, printed or logged: only their paths are remembered, for `ssh -i`.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from qemu_instances.errors import QinstError, UsageError
from qemu_instances.files import locked, read_bounded
from qemu_instances.proc import run

KEY_TYPES = frozenset(
    {
        "ssh-ed25519",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "ssh-rsa",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    }
)
# The user's own keys, in the order OpenSSH's client tries them.
DEFAULT_KEY_NAMES = ("id_ed25519.pub", "id_ecdsa.pub", "id_rsa.pub")
OWN_KEY_NAME = "id_ed25519"

_MAX_KEY_FILE = 64 * 1024  # far above any public key; keeps a wrong path from being read whole
_PRIVATE_MARKERS = ("PRIVATE KEY-----", "PuTTY-User-Key-File")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class SshKey:
    """One public key as an authorized_keys line, and the private key next to it when known."""

    public: str
    private_path: Path | None = None


def parse_public_key(text: str, source: str) -> str:
    """Validate one OpenSSH public key and return it as a single authorized_keys line.

    `source` names where the text came from (a file, "ssh-agent") for error messages.
    """
    if any(marker in text for marker in _PRIVATE_MARKERS):
        raise UsageError(
            f"{source} is a private key; only public keys go into an instance's seed",
            hint=f"pass the public key instead: {source}.pub (or make it: ssh-keygen -y -f {source})",
        )
    if "BEGIN SSH2 PUBLIC KEY" in text:
        raise UsageError(
            f"{source} is an RFC 4716 (SSH2) public key, not an OpenSSH one",
            hint=f"convert it: ssh-keygen -i -f {source}",
        )
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if len(lines) != 1:
        what = "is empty" if not lines else f"holds {len(lines)} lines"
        raise UsageError(f"{source} {what}; expected exactly one OpenSSH public key")
    line = lines[0].strip()
    if _CONTROL.search(line):
        raise UsageError(f"{source}: the public key contains control characters")
    key_type, _, rest = line.partition(" ")
    body, _, comment = rest.strip().partition(" ")
    if key_type not in KEY_TYPES:
        raise UsageError(
            f"{source}: unsupported or unknown SSH key type {key_type[:40]!r}",
            hint="supported: " + ", ".join(sorted(KEY_TYPES)),
        )
    _check_key_body(key_type, body, source)
    return " ".join(part for part in (key_type, body, comment.strip()) if part)


def _check_key_body(key_type: str, body: str, source: str) -> None:
    """Check that body is base64 of an SSH key blob whose first field is the key type."""
    try:
        blob = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise UsageError(f"{source}: the {key_type} key's body is not valid base64") from exc
    fields = _blob_fields(blob)
    if fields is None or len(fields) < 2:
        raise UsageError(f"{source}: the {key_type} key's body is truncated or malformed")
    if fields[0] != key_type.encode():
        raise UsageError(f"{source}: the key's body does not match its type {key_type}")


def _blob_fields(blob: bytes) -> list[bytes] | None:
    """Split a key blob into its length-prefixed fields (RFC 4253 strings and mpints); None if they do not fit."""
    fields = []
    offset = 0
    while offset < len(blob):
        if offset + 4 > len(blob):
            return None
        (length,) = struct.unpack_from(">I", blob, offset)
        offset += 4
        if offset + length > len(blob):
            return None
        fields.append(blob[offset : offset + length])
        offset += length
    return fields


def load_key_file(path: Path) -> SshKey:
    """Load a public key from `path`; given a private key path whose `.pub` exists, use that `.pub`. A private key
    that ssh would refuse to use (readable by others) is refused here, with the fix."""
    path = path.expanduser().absolute()  # recorded in the instance's metadata: an absolute path, whatever the cwd
    if path.suffix == ".pub":
        private = path.with_suffix("")
        return SshKey(_read_public(path), check_private_key(private) if private.is_file() else None)
    sibling = path.with_name(path.name + ".pub")
    if sibling.is_file():
        # Never open the private key itself: its .pub says everything the seed needs.
        return SshKey(_read_public(sibling), check_private_key(path))
    return SshKey(_read_public(path), None)


def check_private_key(path: Path) -> Path:
    """`path` if ssh would use it as an identity: a file its owner alone may read. ssh ignores a private key that
    others can read ("UNPROTECTED PRIVATE KEY FILE"), and the login then fails with only "Permission denied"."""
    try:
        mode = path.stat().st_mode & 0o777
    except OSError as exc:
        raise UsageError(f"cannot read the private key {path}: {exc.strerror}") from None
    if mode & 0o077:
        raise UsageError(
            f"the private key {path} is readable by others (mode {mode:04o}): ssh refuses to use such a key",
            hint=f"chmod 600 {path}",
        )
    return path


def _read_public(path: Path) -> str:
    source = os.fspath(path)
    try:
        data = read_bounded(path, "SSH key file", _MAX_KEY_FILE)
    except FileNotFoundError as exc:
        raise UsageError(f"SSH key file {source} does not exist") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{source} is not a text file, so not an OpenSSH public key") from exc
    return parse_public_key(text, source)


def default_keys(config_dir: Path) -> list[SshKey]:
    """The keys to install when none were given: ~/.ssh's, else the agent's, else qinst's own pair."""
    ssh_dir = Path.home() / ".ssh"
    found = [load_key_file(ssh_dir / name) for name in DEFAULT_KEY_NAMES if (ssh_dir / name).is_file()]
    if found:
        return found
    agent = agent_keys()
    if agent:
        return agent
    return [own_keypair(config_dir)]


def agent_keys() -> list[SshKey]:
    """Public keys held by a running ssh-agent (none when there is no agent or it is empty)."""
    if not os.environ.get("SSH_AUTH_SOCK"):
        return []
    try:
        listing = run(["ssh-add", "-L"], timeout=10).stdout
    except QinstError:
        # No agent listening, an agent without identities (exit 1), or no ssh-add: no agent keys.
        return []
    keys = []
    for line in listing.splitlines():
        try:
            keys.append(SshKey(parse_public_key(line, "ssh-agent")))
        except UsageError:
            continue  # certificates and key types an authorized_keys line here cannot hold
    return keys


def own_keypair(config_dir: Path) -> SshKey:
    """qinst's own ed25519 key pair in `config_dir`, created on first use and reused thereafter."""
    _make_private_dir(config_dir)
    path = config_dir / OWN_KEY_NAME
    # Two launches at once must not both create the pair: the second waits and reuses the first's.
    with locked(config_dir / f"{OWN_KEY_NAME}.lock", error=UsageError):
        if path.is_file() and path.with_name(path.name + ".pub").is_file():
            return load_key_file(path)
        return generate_keypair(path)


def generate_keypair(path: Path) -> SshKey:
    """Create a new passphrase-less ed25519 key pair at `path` (private, mode 0600) and `path`.pub."""
    _make_private_dir(path.parent)
    if path.exists() or path.with_name(path.name + ".pub").exists():
        raise QinstError(f"{path} already exists; refusing to overwrite a key", hint="remove it or choose another path")
    run(
        [
            "ssh-keygen",
            "-q",
            "-t", "ed25519",
            "-N", "",
            "-C", "qinst",
            "-f", path,
        ],
        hint="ssh-keygen is in the openssh-client package",
    )  # fmt: skip
    path.chmod(0o600)
    return load_key_file(path)


def _make_private_dir(path: Path) -> None:
    if not path.is_dir():
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.chmod(0o700)  # mkdir's mode is filtered by the umask


def resolve_keys(files: Sequence[Path], config_dir: Path) -> list[SshKey]:
    """The keys for an instance: those of `files` (--ssh-key), or the defaults when none were given."""
    keys = [load_key_file(path) for path in files] if files else default_keys(config_dir)
    unique: dict[str, SshKey] = {}
    for key in keys:
        # The same key twice (id_ed25519 and id_ed25519.pub) is one authorized key.
        unique.setdefault(_key_identity(key.public), key)
    return list(unique.values())


def _key_identity(line: str) -> str:
    key_type, body = line.split()[:2]
    return f"{key_type} {body}"
