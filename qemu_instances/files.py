"""Files the user names and files qinst writes: read once, written whole (a reader never sees half a file)."""

from __future__ import annotations

import os
from pathlib import Path

from qemu_instances.errors import UsageError
from qemu_instances.validate import read_regular_file

MAX_OPTION_FILE = 16 << 20  # bytes: cloud-init's own limit on user data is far below; a seed is read whole


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
    """The bytes of a file named by a command-line option (None when the option was not given): a regular file of
    at most 16 MiB. A FIFO, a device or a folder is refused without reading it (a FIFO would block, /dev/zero never
    ends); so is a name holding a control character (a newline in a name is a mistake or an attack)."""
    if path is None:
        return None
    if any(ord(c) < 32 or ord(c) == 127 for c in str(path)):
        raise UsageError(f"{option}: the file name {str(path)!r} holds a control character")
    try:
        return read_regular_file(path, option, MAX_OPTION_FILE)
    except FileNotFoundError:
        raise UsageError(f"{option}: {path} does not exist") from None
