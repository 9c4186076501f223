"""Detached OpenPGP signatures over checksum files, checked with Debian's gpgv against a pinned keyring.

No keyserver, no trust database, no user keyring: gpgv runs in an empty temporary home with only the given keyring,
and its --status-fd output (VALIDSIG with the primary key's fingerprint) decides, not only its exit code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from qemu_instances.errors import ImageError
from qemu_instances.proc import run

# The shipped keyrings, next to this module (the catalog checks their names on every `images` and `up`:
# importlib.resources and hashlib would cost those ~0.004 s).
KEYRINGS = Path(__file__).with_name("keyrings")
KEYRING_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_FPR = re.compile(r"[0-9A-F]{40}")


def shipped_keyrings() -> list[str]:
    """Names of the keyrings qinst ships (catalog `signing_keys = "<name>"`)."""
    return sorted(p.name.removesuffix(".gpg") for p in KEYRINGS.iterdir() if p.name.endswith(".gpg"))


def keyring_path(spec: str) -> Path:
    """The keyring file of a catalog's `signing_keys`: a shipped keyring's name, or a path (with a '/')."""
    if "/" not in spec and KEYRING_NAME.fullmatch(spec):
        path = KEYRINGS / f"{spec}.gpg"
        if not path.is_file():
            raise ImageError(f"no keyring named {spec!r} ships with qinst (known: {', '.join(shipped_keyrings())})")
        return path
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ImageError(f"keyring {spec} is not a file")
    return path


def _packets(data: bytes) -> list[tuple[int, bytes]]:
    """(tag, body) of each OpenPGP packet (RFC 4880 section 4.2); a keyring with indeterminate lengths is refused."""
    packets, i = [], 0
    while i < len(data):
        head = data[i]
        if not head & 0x80:
            raise ValueError(f"not an OpenPGP packet at byte {i}")
        if head & 0x40:  # new format
            tag, first = head & 0x3F, data[i + 1]
            if first < 192:
                length, i = first, i + 2
            elif first < 224:
                length, i = ((first - 192) << 8) + data[i + 2] + 192, i + 3
            elif first == 255:
                length, i = int.from_bytes(data[i + 2 : i + 6], "big"), i + 6
            else:
                raise ValueError("partial body lengths in a keyring")
        else:
            tag, kind = (head >> 2) & 0x0F, head & 0x03
            if kind == 3:
                raise ValueError("indeterminate packet length in a keyring")
            size = 1 << kind
            length, i = int.from_bytes(data[i + 1 : i + 1 + size], "big"), i + 1 + size
        if i + length > len(data):
            raise ValueError("truncated packet")
        packets.append((tag, data[i : i + length]))
        i += length
    return packets


def keyring_fingerprints(path: Path) -> set[str]:
    """The v4 fingerprints of the primary keys in a binary keyring (what `gpg --show-keys` lists as fpr)."""
    try:
        packets = _packets(path.read_bytes())
    except (OSError, ValueError, IndexError) as exc:
        raise ImageError(f"cannot read keyring {path}: {exc} (a binary keyring is needed: gpg --export)") from exc
    import hashlib

    found = set()
    for tag, body in packets:
        if tag == 6 and body[:1] == b"\x04":  # a v4 public (primary) key
            found.add(hashlib.sha1(b"\x99" + len(body).to_bytes(2, "big") + body).hexdigest().upper())
    return found


@dataclass(frozen=True)
class Signature:
    """A good signature: the signing primary key's fingerprint and when the signature was made (seconds since the
    epoch, as the signer's clock said: what `--latest` compares to refuse an older signed file)."""

    fingerprint: str
    created: int


def verify_detached(data: bytes, signature: bytes, keyring: Path, *, what: str) -> Signature:
    """Check signature over data with gpgv and only keyring; return the good signature (signer and time).

    Raises ImageError with "signature" in its message when the signature is missing, bad, or by another key.
    """
    primaries = keyring_fingerprints(keyring)
    if not primaries:
        raise ImageError(f"keyring {keyring} holds no OpenPGP v4 public key")
    import tempfile

    with tempfile.TemporaryDirectory(prefix="qinst-gpgv-") as tmp:
        home = Path(tmp)
        (home / "data").write_bytes(data)
        (home / "data.sig").write_bytes(signature)
        argv = [
            "gpgv",
            "--homedir",
            str(home),  # empty: no trustedkeys.kbx, no user configuration
            "--status-fd",
            "1",
            "--keyring",
            str(keyring.resolve()),
            str(home / "data.sig"),
            str(home / "data"),
        ]
        proc = run(argv, error=ImageError, hint="install gpgv", timeout=60, check=False, limit=1 << 20)
    status = proc.stdout.splitlines()
    valid = _valid_primaries(status)
    bad = [line.split()[1] for line in status if line.split()[1:2] and line.split()[1] in _BAD]
    if proc.returncode != 0 or bad or not valid:
        reason = _reason(status, bad)
        raise ImageError(
            f"signature check failed for {what}: {reason}",
            hint=f"nothing was downloaded; the checksum file must be signed by a key in {keyring}",
        )
    signer = next((sig for sig in valid if sig.fingerprint in primaries), None)
    if signer is None:
        raise ImageError(
            f"signature check failed for {what}: signed by {valid[0].fingerprint}, which is not in {keyring}"
        )
    return signer


_BAD = {"BADSIG", "ERRSIG", "EXPSIG", "EXPKEYSIG", "REVKEYSIG", "NO_PUBKEY", "FAILURE"}


def _valid_primaries(status: list[str]) -> list[Signature]:
    """The primary key and creation time of each VALIDSIG line: `[GNUPG:] VALIDSIG <fpr> <date> <ts> <exp> <ver>
    <rsv> <pk-algo> <hash-algo> <class> <primary-fpr>` (<ts>: seconds since the epoch, or ISO 8601 basic form)."""
    found = []
    for line in status:
        fields = line.split()
        if fields[:2] == ["[GNUPG:]", "VALIDSIG"] and len(fields) >= 12 and _FPR.fullmatch(fields[11]):
            created = _timestamp(fields[4])
            if created is not None:
                found.append(Signature(fields[11], created))
    return found


def _timestamp(text: str) -> int | None:
    if text.isdigit() and len(text) <= 12:
        return int(text)
    import datetime as dt

    try:
        return int(dt.datetime.strptime(text, "%Y%m%dT%H%M%S").replace(tzinfo=dt.UTC).timestamp())
    except ValueError:
        return None


def _reason(status: list[str], bad: list[str]) -> str:
    if "NO_PUBKEY" in bad or "ERRSIG" in bad:
        return "made by a key that is not in the keyring"
    if "BADSIG" in bad:
        return "BAD signature (the file was changed after signing)"
    if "EXPKEYSIG" in bad or "EXPSIG" in bad:
        return "the signature or its key has expired"
    if "REVKEYSIG" in bad:
        return "the signing key is revoked"
    if not any("NEWSIG" in line for line in status):
        return "no valid OpenPGP signature found"
    return "no valid signature"
