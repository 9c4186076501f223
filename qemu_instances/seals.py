"""What this client verified of a base volume in a libvirt pool: a seal, kept in its own cache directory.

A base volume is used only when it is the verified image. On a local daemon the pool file is normally the cached,
verified file itself (a hard link: same device and inode). Otherwise the volume's bytes are hashed through a libvirt
stream once, and this client writes down the volume's identity as libvirt reports it (its key, size and change
times, nanoseconds): the next launch trusts the volume while that identity is unchanged. A marker volume in the pool
proves nothing (anyone who can write to the pool can create one); a seal lives on this machine, in the user's
private cache directory. Any write to the volume (new bytes, a truncation, a copy put in its place) changes its ctime,
which no libvirt call (and no `touch`) can set back, so a changed volume is hashed again or replaced.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from qemu_instances.errors import QinstError
from qemu_instances.files import MAX_RECORD, parse_json, read_bounded, write_atomically
from qemu_instances.logs import log

DIRECTORY = "volume-seals"


@dataclass(frozen=True)
class Seal:
    """A volume as libvirt described it when its bytes hashed to `digest`."""

    digest: str
    key: str  # libvirt's volume key (its path, for directory pools)
    size: int  # bytes on the host
    mtime: str  # libvirt's <timestamps>, compared as text (libvirt's clock, never ours)
    ctime: str


class SealStore:
    """The seals of one libvirt host (its URI), one small JSON file per volume key, in the cache directory."""

    def __init__(self, cache_dir: Path, uri: str) -> None:
        self.dir = cache_dir / DIRECTORY
        self.uri = uri

    def _path(self, key: str) -> Path:
        import hashlib  # here: `ls` imports this module (through host.py) and never hashes

        return self.dir / (hashlib.sha256(f"{self.uri}\n{key}".encode()).hexdigest()[:32] + ".json")

    def get(self, key: str) -> Seal | None:
        """The seal of the volume `key`; None when there is none, or it is not one this client wrote."""
        try:
            data = parse_json(read_bounded(self._path(key), "volume seal", MAX_RECORD, follow=False), "volume seal")
            seal = Seal(**{k: data[k] for k in Seal.__dataclass_fields__}) if isinstance(data, dict) else None
        except (OSError, QinstError, KeyError, TypeError):
            return None
        if seal is None or seal.key != key or data.get("uri") != self.uri:
            return None
        types = (str, str, int, str, str)
        if not all(isinstance(v, t) for v, t in zip(asdict(seal).values(), types, strict=True)):
            return None
        return seal

    def put(self, seal: Seal) -> None:
        """Write down a verified volume's identity; a seal that cannot be written only costs a later hash."""
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            import json

            data = {"uri": self.uri, **asdict(seal)}
            write_atomically(self._path(seal.key), json.dumps(data, indent=1).encode(), mode=0o600)
        except OSError as exc:
            log.debug("could not record the seal of %s: %s", seal.key, exc)
