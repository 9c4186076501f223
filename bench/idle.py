"""Measuring on a quiet machine: wait until no foreign QEMU uses the CPU, and measure again when one did."""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from output import log

MINE = re.compile(r"guest=(?:smoke-)?bench-")

BUSY_CPU = 0.05  # a foreign QEMU using more than 5 % of a core disturbs a measurement


def _qemu_processes() -> list[tuple[int, str, int]]:
    """(pid, command line, CPU ticks so far) of every qemu-system process."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            if not cmdline or b"qemu-system" not in Path(cmdline[0].decode(errors="replace")).name.encode():
                continue
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks = int(stat[11]) + int(stat[12])  # utime + stime
        found.append((int(entry), b" ".join(cmdline).decode(errors="replace"), ticks))
    return found


def foreign_qemu(sample: float = 1.0) -> list[dict[str, Any]]:
    """QEMU processes that are not the benchmark's, with the share of a core each used over `sample` seconds."""
    first = {pid: (cmd, ticks) for pid, cmd, ticks in _qemu_processes() if not MINE.search(cmd)}
    if not first:
        return []
    time.sleep(sample)
    hz = os.sysconf("SC_CLK_TCK")
    now = {pid: ticks for pid, _, ticks in _qemu_processes()}
    out = []
    for pid, (cmd, ticks) in first.items():
        if pid in now:
            name = re.search(r"guest=([^, ]+)", cmd)
            out.append(
                {
                    "pid": pid,
                    "name": name[1] if name else cmd.split()[0],
                    "cpu": round((now[pid] - ticks) / hz / sample, 3),
                }
            )
    return out


def wait_idle(max_wait: float | None = None) -> dict[str, Any]:
    """Wait until no QEMU but the benchmark's uses the CPU (someone else's tests); say what was seen.

    A foreign QEMU that sits idle (a paused or halted guest left over) does not count: it would block forever and
    takes no CPU from the measurement. After max_wait the measurement goes ahead and is marked contended.
    """
    if max_wait is None:  # QINST_BENCH_MAX_WAIT=0 measures at once on a shared machine (alternate the samples)
        max_wait = float(os.environ.get("QINST_BENCH_MAX_WAIT", "1800"))
    start = time.monotonic()
    told = False
    while True:
        others = foreign_qemu()
        busy = [o for o in others if o["cpu"] > BUSY_CPU]
        if not busy:
            return {"waited_s": round(time.monotonic() - start, 1), "contended": False, "idle_foreign_qemu": others}
        if time.monotonic() - start > max_wait:
            log(f"still busy after {max_wait:.0f} s, measuring anyway: {busy}")
            return {"waited_s": round(time.monotonic() - start, 1), "contended": True, "busy_foreign_qemu": busy}
        if not told:
            log(f"waiting for other QEMU processes to finish: {', '.join(o['name'] for o in busy)}")
            told = True
        time.sleep(5)


class Disturbance(threading.Thread):
    """Watches, while a measurement runs, for foreign QEMU processes that use the CPU."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.busy: set[str] = set()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.busy.update(o["name"] for o in foreign_qemu(1.0) if o["cpu"] > BUSY_CPU)
            self._stop_event.wait(1.0)

    def __enter__(self) -> Disturbance:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop_event.set()
        self.join(5)


T = TypeVar("T")


def undisturbed(measure: Callable[[], T], records: list[dict[str, Any]], tries: int = 3) -> T:
    """measure() on an idle machine: wait for it, and measure again when someone's QEMU got busy meanwhile.

    The wait (and, after `tries`, a measurement kept although disturbed) goes into records for merge_idle().
    """
    if os.environ.get("QINST_BENCH_MAX_WAIT") == "0":
        tries = 1  # a shared machine: measure once, the rounds alternate the tools
    for attempt in range(1, tries + 1):
        record = wait_idle()
        with Disturbance() as disturbance:
            result = measure()
        record["disturbed_by"] = sorted(disturbance.busy)
        records.append(record)
        if not disturbance.busy:
            return result
        if attempt < tries:
            log(f"disturbed by {', '.join(sorted(disturbance.busy))}: measuring again")
    record["contended"] = True
    log("kept a disturbed measurement (marked contended)")
    return result


def merge_idle(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One summary of the wait_idle() records of a benchmark."""
    return {
        "measurements": len(records),
        "waited_s": round(sum(r["waited_s"] for r in records), 1),
        "repeated": sum(1 for r in records if r.get("disturbed_by") and not r["contended"]),
        "contended": sum(1 for r in records if r["contended"]),
    }
