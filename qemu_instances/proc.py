"""The one way qinst runs external commands (qemu-img, ssh-keygen, ssh)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from qemu_instances.errors import QinstError

Arg = str | os.PathLike[str]


def _env() -> dict[str, str]:
    # Tools' messages end up in our errors: keep them in a language and encoding we can read.
    return {**os.environ, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


def run(
    argv: Sequence[Arg],
    *,
    error: type[QinstError] = QinstError,
    hint: str | None = None,
    timeout: float | None = None,
    input: bytes | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run argv, capture its output as text, and raise `error` with the command and its stderr on failure.

    With check=False a non-zero exit status is returned, not raised (a missing command or a timeout still raise).
    """
    args = [os.fspath(a) for a in argv]
    if shutil.which(args[0]) is None and not Path(args[0]).is_absolute():
        raise error(f"{args[0]} not found", hint=hint or f"is the package that provides {args[0]} installed?")
    try:
        proc = subprocess.run(
            args,
            input=input.decode() if input is not None else None,
            stdin=subprocess.DEVNULL if input is None else None,
            capture_output=True,
            # A guest's SSH banner or a tool's message may hold any bytes: never fail on decoding them.
            encoding="utf-8",
            errors="replace",
            env=_env(),
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise error(f"{' '.join(args)} did not finish within {timeout} s", hint=hint) from exc
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        last = detail[-1] if detail else f"exit status {proc.returncode}"
        raise error(f"{' '.join(args)} failed: {last}", hint=hint)
    return proc
