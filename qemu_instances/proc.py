"""The one way qinst runs external commands (qemu-img, ssh, scp, ssh-keyscan, ssh-keygen, gpgv).

`spawn()` owns a child's whole life: its argv (a list, no shell), environment (LANG=C.UTF-8, so that its messages
can be read), stdin (closed unless given), and its end: terminate, a grace period, then kill. `collect()` reads its
output with a cap on each stream: a child that prints more than the cap (a guest flooding an SSH session) is
stopped, and what was read is kept. `run()` is spawn + collect for a command whose output qinst wants whole.
"""

from __future__ import annotations

import os
import selectors
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from qemu_instances.errors import QinstError

Arg = str | os.PathLike[str]
OUTPUT_LIMIT = 16 << 20  # bytes kept of each of a command's stdout and stderr (README, "Reliability: limits")
GRACE = 5.0  # seconds a terminated child has before it is killed


def environment(**extra: str) -> dict[str, str]:
    """The environment of every child: ours, with messages in a language and encoding qinst can read."""
    return {**os.environ, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", **extra}


def resolve(argv: Sequence[Arg], error: type[QinstError] = QinstError, hint: str | None = None) -> list[str]:
    """argv as strings; `error` when its program is not installed."""
    args = [os.fspath(a) for a in argv]
    if shutil.which(args[0]) is None and not Path(args[0]).is_absolute():
        raise error(f"{args[0]} not found", hint=hint or f"is the package that provides {args[0]} installed?")
    return args


@contextmanager
def spawn(
    argv: Sequence[Arg],
    *,
    stdin: int | None = subprocess.DEVNULL,
    stdout: int | None = subprocess.PIPE,
    stderr: int | None = subprocess.PIPE,
    new_session: bool = False,
    error: type[QinstError] = QinstError,
    hint: str | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """Start argv; when the body ends (normally, by an error, Ctrl-C or SIGTERM) a child still running is
    terminated, given GRACE seconds, then killed, and its pipes are closed. `new_session` puts it in a session of
    its own, so that a terminal's Ctrl-C reaches only qinst, which then ends the child itself."""
    args = resolve(argv, error, hint)
    proc = subprocess.Popen(
        args, stdin=stdin, stdout=stdout, stderr=stderr, env=environment(), start_new_session=new_session
    )
    try:
        yield proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes], grace: float = GRACE) -> None:
    """End proc if it still runs (terminate, then kill after `grace` seconds) and close its pipes."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


@dataclass(frozen=True)
class Output:
    """What a child printed (at most `limit` bytes of each stream) and how it ended."""

    returncode: int | None  # None: still running when collect() gave up (timed out, cancelled or overflowed)
    stdout: bytes
    stderr: bytes
    timed_out: bool = False
    overflow: bool = False  # a stream passed its limit: the child was stopped
    cancelled: bool = False


def collect(
    proc: subprocess.Popen[bytes],
    *,
    timeout: float | None,
    limit: int = OUTPUT_LIMIT,
    stderr_limit: int | None = None,
    input: bytes | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> Output:
    """Read proc's stdout and stderr until it exits, at most `limit` bytes of stdout (`stderr_limit` of stderr,
    default the same); stop early (and kill it) when a stream goes past its limit, `timeout` seconds pass, or
    `cancelled()` says so."""
    caps = {"stdout": limit, "stderr": limit if stderr_limit is None else stderr_limit}
    buffers: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
    deadline = None if timeout is None else time.monotonic() + timeout
    if input is not None and proc.stdin is not None:
        with suppress(BrokenPipeError):
            proc.stdin.write(input)
        with suppress(BrokenPipeError):
            proc.stdin.close()
    timed_out = overflow = stopped = False
    with selectors.DefaultSelector() as selector:
        for name in ("stdout", "stderr"):
            pipe = getattr(proc, name)
            if pipe is not None:
                os.set_blocking(pipe.fileno(), False)
                selector.register(pipe, selectors.EVENT_READ, name)
        while selector.get_map():
            if cancelled is not None and cancelled():
                stopped = True
                break
            wait = 0.2 if deadline is None else min(0.2, deadline - time.monotonic())
            if wait <= 0:
                timed_out = True
                break
            for key, _ in selector.select(wait):
                try:
                    chunk = os.read(key.fd, 1 << 16)
                except BlockingIOError:
                    continue
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                buf = buffers[key.data]
                room = caps[key.data] - len(buf)
                buf += chunk[: max(room, 0)]
                if len(chunk) > room:
                    overflow = True
            if overflow:
                break
    if timed_out or overflow or stopped:
        proc.kill()
        proc.wait()
        code = None
    else:
        remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        try:
            code = proc.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code, timed_out = None, True
    return Output(code, bytes(buffers["stdout"]), bytes(buffers["stderr"]), timed_out, overflow, stopped)


def _decoded(argv: list[str], out: Output) -> subprocess.CompletedProcess[str]:
    # Output is decoded with replacement: a guest or a tool printing bytes that are not UTF-8 is not a crash.
    return subprocess.CompletedProcess(
        argv,
        out.returncode if out.returncode is not None else -9,
        out.stdout.decode("utf-8", "replace"),
        out.stderr.decode("utf-8", "replace"),
    )


def _run(args: list[str], timeout: float | None, input: bytes | None, limit: int) -> Output:
    with spawn(args, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL) as proc:
        return collect(proc, timeout=timeout, input=input, limit=limit)


def run(
    argv: Sequence[Arg],
    *,
    error: type[QinstError] = QinstError,
    hint: str | None = None,
    timeout: float | None = None,
    input: bytes | None = None,
    check: bool = True,
    limit: int = OUTPUT_LIMIT,
) -> subprocess.CompletedProcess[str]:
    """Run argv, capture its output as text, and raise `error` with the command and its stderr on failure.

    With check=False a non-zero exit status is returned, not raised (a missing command, a timeout or output past
    `limit` still raise).
    """
    args = resolve(argv, error, hint)
    out = _run(args, timeout, input, limit)
    if out.timed_out:
        raise error(f"{' '.join(args)} did not finish within {timeout} s", hint=hint)
    if out.overflow:
        raise error(f"{' '.join(args)} printed more than {limit} bytes; stopped", hint=hint)
    proc = _decoded(args, out)
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        last = detail[-1] if detail else f"exit status {proc.returncode}"
        raise error(f"{' '.join(args)} failed: {last}", hint=hint)
    return proc


def try_run(
    argv: Sequence[Arg], *, timeout: float, hint: str | None = None, limit: int = OUTPUT_LIMIT
) -> subprocess.CompletedProcess[str] | None:
    """Run argv for its exit status and output; None when it did not finish within `timeout` seconds or printed
    more than `limit` bytes (an answer qinst will not read).

    A missing command still raises QinstError: that is a broken set-up, not an answer.
    """
    args = resolve(argv, QinstError, hint)
    out = _run(args, timeout, None, limit)
    if out.timed_out or out.overflow:
        return None
    return _decoded(args, out)


def replace_process(argv: Sequence[Arg]) -> None:
    """Become argv (exec): `qinst ssh` and `qinst console` hand the terminal to ssh or virsh."""
    args = resolve(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp(args[0], args)
