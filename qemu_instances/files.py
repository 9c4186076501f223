"""Files the user names and files qinst writes: read once, written whole (a reader never sees half a file)."""

from __future__ import annotations

import os
from pathlib import Path

from qemu_instances.errors import UsageError


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file next to `path`, then rename it over `path`; on failure nothing is left."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_option_file(path: Path | None, option: str) -> bytes | None:
    """The bytes of a file named by a command-line option (None when the option was not given)."""
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {option} {path}: {exc.strerror}") from exc
