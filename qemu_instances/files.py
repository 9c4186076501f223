"""Files qinst reads and writes: one bounded reader, one atomic writer, one lock opener, one parser guard.

Everything read from a file a user names (user-data, catalogs, `--checks`, `--baseline`, SSH keys, config.toml), a
record qinst wrote earlier (the cache's records, KVM verdicts, volume seals, accepted checksum files) or a file a
guest or server produced goes through `read_bounded`: regular files only (a FIFO, a device or a folder is refused by
its path without blocking or reading it), at most a documented number of bytes, and for qinst's own records never
through a symbolic link (O_NOFOLLOW). Parsing such bytes goes through `parse_json` / `parse_toml`: any parser failure
(a syntax error, RecursionError from deep nesting, a number too large, undecodable text) becomes the caller's
QinstError naming the file. Every file qinst writes goes through `write_atomically` (a new temporary file in the same
folder opened O_EXCL|O_NOFOLLOW, fsync'd when it must survive a crash, renamed over the target) and every lock file
through `locked` (never through a symlink).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qemu_instances.errors import QinstError, UsageError

# Caps on what is read (README, "Reliability: limits"): a file above its cap is refused, never read whole.
MAX_OPTION_FILE = 16 << 20  # --user-data, --network-config: cloud-init's own limits are far below
MAX_CATALOG = 4 << 20  # a catalog file (--catalog)
MAX_CHECKS = 1 << 20  # --checks FILE
MAX_BASELINE = 64 << 20  # --baseline FILE (a previous run's results.json)
MAX_CONFIG = 1 << 20  # config.toml
MAX_RECORD = 64 << 10  # qinst's own small records in the cache (image records, verdicts, seals)


def _control(text: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


def read_bounded(
    path: Path, what: str, limit: int, *, error: type[QinstError] = UsageError, follow: bool = True
) -> bytes:
    """The bytes of the regular file `path`, at most `limit` of them; `error` (naming `what` and the path) for
    anything else: a FIFO, device, socket or folder (never opened for reading: a FIFO would block), a file larger
    than `limit`, a symbolic link when `follow` is False. FileNotFoundError passes through."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise error(f"{what}: {path} is a symbolic link; refusing to follow it") from None
        raise error(f"{what}: cannot read {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{what}: {path} is not a regular file ({_kind(st.st_mode)})")
        if st.st_size > limit:
            raise error(f"{what}: {path} is larger than {limit} bytes")
        os.set_blocking(fd, True)
        chunks, size = [], 0
        while size <= limit and (chunk := os.read(fd, min(1 << 20, limit + 1 - size))):
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise error(f"{what}: cannot read {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if size > limit:  # it grew while we read it
        raise error(f"{what}: {path} is larger than {limit} bytes")
    return b"".join(chunks)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a file"


def read_option_file(path: Path | None, option: str, limit: int = MAX_OPTION_FILE) -> bytes | None:
    """The bytes of a file named by a command-line option (None when the option was not given). Its name must not
    hold a control character (a newline in a name is a mistake or an attack); see read_bounded for the rest."""
    if path is None:
        return None
    if _control(str(path)):
        raise UsageError(f"{option}: the file name {str(path)!r} holds a control character")
    try:
        return read_bounded(path, option, limit)
    except FileNotFoundError:
        raise UsageError(f"{option}: {path} does not exist") from None


def decode_text(data: bytes, what: str, error: type[QinstError] = UsageError) -> str:
    """UTF-8 text, or `error` naming the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{what}: not UTF-8 text (byte {exc.start})") from None


def parse_json(data: bytes | str, what: str, error: type[QinstError] = UsageError) -> Any:
    """JSON from an untrusted source; `error` naming `what` for anything that is not JSON qinst can hold (syntax,
    nesting too deep for the parser, numbers Python refuses, NaN/Infinity, text that is not UTF-8)."""
    import json

    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        return json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError, OverflowError, MemoryError) as exc:  # UnicodeDecodeError is a ValueError
        raise error(f"{what}: not JSON ({_short(exc)})") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def parse_toml(text: str, what: str, error: type[QinstError] = UsageError) -> dict[str, Any]:
    """TOML from a file the user gave; `error` naming `what` for a syntax error or nesting too deep for the parser
    (tomllib recurses on nested arrays and inline tables: RecursionError)."""
    import tomllib

    try:
        return tomllib.loads(text)
    except (ValueError, RecursionError, OverflowError, MemoryError) as exc:  # TOMLDecodeError is a ValueError
        raise error(f"{what}: invalid TOML: {_short(exc)}") from None


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."


def write_atomically(path: Path, data: bytes, *, mode: int = 0o644, durable: bool = False) -> None:
    """Write `data` to a new temporary file in `path`'s folder (O_CREAT|O_EXCL|O_NOFOLLOW: never a file or link
    planted under its name), then rename it over `path`: a reader sees the old file or the new one, never half of
    one. With `durable`, the data and the rename are on disk before this returns (fsync of the file and the folder).
    On failure nothing is left behind."""
    tmp = path.with_name(f".{path.name}.{os.urandom(6).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        sync_folder(path.parent)


def replace_durably(src: Path, dest: Path) -> None:
    """Rename src (a complete file qinst wrote) to dest with both the data and the rename on disk: the cache trusts
    a file by its name forever."""
    fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(src, dest)
    sync_folder(dest.parent)


def sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_lock_file(path: Path, *, error: type[QinstError] = QinstError) -> int:
    """A file descriptor on the lock file `path` (created 0600 when missing), never through a symbolic link: a link
    planted there would make qinst create or truncate a file elsewhere (as root, anywhere)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise error(
                f"refusing the lock file {path}: it is a symbolic link", hint="remove it (qinst never makes links)"
            ) from None
        raise error(f"cannot open the lock file {path}: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise error(f"refusing the lock file {path}: not a regular file", hint="remove it")
    return fd


@contextmanager
def locked(path: Path, *, error: type[QinstError] = QinstError) -> Iterator[int]:
    """Hold an exclusive flock on the lock file `path` (see open_lock_file) for the body; yields its descriptor."""
    fd = open_lock_file(path, error=error)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)  # releases the lock
