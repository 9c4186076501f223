"""Timing child processes (wall clock, CPU and the child's own peak RSS) and summarising the figures."""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Ran:
    seconds: float
    max_rss_kib: int  # peak resident set of the child itself, from wait4()
    returncode: int
    stdout: str
    stderr: str
    cpu_seconds: float = 0.0  # user + system time of the child


Timed = Ran  # the name bench/pull.py knows it by


def timed(argv: Sequence[str | os.PathLike[str]], env: dict[str, str] | None = None) -> Ran:
    """Run argv, wall-clock it and take its own CPU time and peak RSS (not other children's); raise on failure."""
    return check(run_timed(argv, env), " ".join(map(os.fspath, argv)))


def run_timed(
    argv: Sequence[str | os.PathLike[str]], env: dict[str, str] | None = None, cwd: Path | None = None
) -> Ran:
    """Run argv with both pipes drained by threads (chatty tools); a failure is returned, not raised."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [os.fspath(a) for a in argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=cwd,
    )
    chunks: dict[str, bytes] = {}

    def drain(key: str, pipe: Any) -> None:
        chunks[key] = pipe.read()

    readers = [
        threading.Thread(target=drain, args=("out", proc.stdout), daemon=True),
        threading.Thread(target=drain, args=("err", proc.stderr), daemon=True),
    ]
    for reader in readers:
        reader.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:
        _stop(proc)
        raise
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    for reader in readers:
        reader.join(5)  # a grandchild that keeps the pipe open must not hang the benchmark
    out, err = chunks.get("out", b""), chunks.get("err", b"")
    cpu = usage.ru_utime + usage.ru_stime
    text = out.decode(errors="replace"), err.decode(errors="replace")
    return Ran(seconds, usage.ru_maxrss, proc.returncode, *text, cpu)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a child on Ctrl-C or SIGTERM, letting it clean up: qinst removes what it created on SIGINT."""
    for sig, grace in ((None, 5.0), (signal.SIGINT, 30.0), (signal.SIGKILL, 10.0)):
        if sig is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
        try:
            proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


def check(ran: Ran, what: str) -> Ran:
    if ran.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {ran.returncode}): {ran.stderr.strip()[-2000:]}")
    return ran


def quiet(
    argv: Sequence[str | os.PathLike[str]], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a helper command (cleanup, setup) without timing it; never raises."""
    return subprocess.run(
        [os.fspath(a) for a in argv], capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, check=False
    )


@dataclass(frozen=True)
class Summary:
    median: float
    minimum: float
    maximum: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        return cls(statistics.median(values), min(values), max(values))


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """median/min/max of values (and the values), for the JSON results; an empty dict when there are none."""
    if not values:
        return {}
    s = Summary.of(values)
    return {"median": s.median, "min": s.minimum, "max": s.maximum, "n": len(values), "values": list(values)}
