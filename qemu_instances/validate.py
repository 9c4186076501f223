"""Checks of command-line values that must hold before anything is made: durations, output files and folders.

Each returns the value it checked or raises UsageError (exit 2) naming the option.
"""

from __future__ import annotations

import math
from pathlib import Path

from qemu_instances.errors import UsageError


def seconds(value: float, option: str) -> float:
    """`value` if it is a finite number of seconds above zero (not nan, inf, 0 or negative)."""
    if not math.isfinite(value) or value <= 0:
        raise UsageError(f"{option} must be a number of seconds above 0, not {value}")
    return value


def output_file(path: Path, option: str) -> Path:
    """`path` if a file can be written there: it has a name, is not a folder, and its folder exists and is writable."""
    if path.name in ("", ".", ".."):
        raise UsageError(f"{option} needs a file name, not {str(path)!r}")
    if path.is_dir():
        raise UsageError(f"{option}: {path} is a folder, not a file")
    parent = path.parent
    if not parent.is_dir():
        raise UsageError(f"{option}: folder {parent} does not exist")
    _check_writable(parent, option)
    return path


def output_dir(path: Path, option: str) -> Path:
    """`path` once it exists as a writable folder (made if missing)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{option}: cannot make folder {path}: {exc.strerror}") from None
    _check_writable(path, option)
    return path


def _check_writable(folder: Path, option: str) -> None:
    # Really write: permission bits say nothing to root, nor about read-only mounts or /proc.
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".qinst-probe-"):
            pass
    except OSError as exc:
        raise UsageError(f"{option}: cannot write in {folder}: {exc.strerror}") from None
