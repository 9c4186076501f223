"""`--latest` never goes back: the newest signed checksum file qinst accepted, per latest channel.

A detached signature proves who signed a checksum file, not that it is current. Canonical's old
`release-YYYYMMDD/SHA256SUMS` files are validly signed and list the same file names as today's, so a mirror (or
anything on the path) could serve an old signed file and the old image it lists. apt answers this with the
`Valid-Until` field of a signed Release file; Ubuntu's and Debian's cloud-image checksum files carry no such field.
qinst keeps, per checksum-file URL (the catalog's upstream URL, whatever mirror served it), the creation time of the
newest signature it accepted, and refuses a file signed earlier (exit 3). A file signed at the same second is the
same file. The record is a small JSON file in the cache directory (`<cache>/accepted-checksums/`), written
durably; deleting it forgets the floor (the next `--latest` accepts any good signature again).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from qemu_instances.errors import ImageError, QinstError
from qemu_instances.files import MAX_RECORD, locked, parse_json, read_bounded, write_atomically

DIRECTORY = "accepted-checksums"


@dataclass(frozen=True)
class Accepted:
    url: str
    signed: int  # the signature's creation time, seconds since the epoch
    fingerprint: str


def _path(cache_dir: Path, url: str) -> Path:
    return cache_dir / DIRECTORY / (hashlib.sha256(url.encode()).hexdigest()[:32] + ".json")


def _when(seconds: int) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def newest(cache_dir: Path, url: str) -> Accepted | None:
    """The newest accepted signature of `url`'s checksum file; None when there is none (or it is unreadable: a
    record qinst cannot read protects nothing, and is replaced by the next accepted one)."""
    try:
        data = parse_json(read_bounded(_path(cache_dir, url), "accepted checksums", MAX_RECORD, follow=False), "x")
    except (OSError, QinstError):
        return None
    if not isinstance(data, dict) or data.get("url") != url:
        return None
    signed, fingerprint = data.get("signed"), data.get("fingerprint")
    if not isinstance(signed, int) or isinstance(signed, bool) or not 0 <= signed < 1 << 40:
        return None
    return Accepted(url, signed, fingerprint if isinstance(fingerprint, str) else "")


def accept(cache_dir: Path, url: str, signed: int, fingerprint: str) -> None:
    """Check that a good signature made at `signed` is not older than the newest accepted for `url`, and record it
    when it is newer. ImageError (exit 3) for an older one: a rollback, or a mirror serving a stale file."""
    folder = cache_dir / DIRECTORY
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    with locked(folder / ".lock", error=ImageError):
        floor = newest(cache_dir, url)
        if floor is not None and signed < floor.signed:
            raise ImageError(
                f"refusing a stale checksum file {url}: signed {_when(signed)}, older than the one already accepted "
                f"(signed {_when(floor.signed)})",
                hint="a mirror or proxy is serving an old file; pull without --mirror, or from an up-to-date mirror "
                f"(to forget what was accepted: delete {_path(cache_dir, url)})",
            )
        if floor is None or signed > floor.signed:
            record = {"url": url, "signed": signed, "fingerprint": fingerprint, "recorded": _when(int(_now()))}
            write_atomically(_path(cache_dir, url), json.dumps(record, indent=1).encode(), mode=0o600, durable=True)


def _now() -> float:
    import time

    return time.time()
