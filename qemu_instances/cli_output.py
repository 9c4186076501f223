"""What the command line prints: JSON on stdout, tables on stdout, lines for people on stderr (every one through the
terminal filter: names and records come from libvirt, guests and files), and download progress bars."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from qemu_instances.text import printable, printable_lines

if TYPE_CHECKING:
    from qemu_instances.download import Progress


def print_json(data: Any) -> None:
    import json

    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def say(text: str) -> None:
    """A line for people on stderr; names in it come from libvirt and files: no terminal escapes pass."""
    sys.stderr.write(printable_lines(text) + "\n")


def table(rows: list[list[str]], header: list[str]) -> None:
    rows = [[printable(str(c)) for c in row] for row in rows]  # names and records come from libvirt and files
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        sys.stdout.write("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")


def size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def age(created: str) -> str:
    import datetime as dt

    try:
        seconds = (dt.datetime.now(dt.UTC) - dt.datetime.fromisoformat(created)).total_seconds()
    except (ValueError, TypeError, OverflowError):
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


class ProgressBar:
    """A rich progress bar on stderr when it is a terminal; silent otherwise."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> Progress | None:
        if not sys.stderr.isatty():
            return None
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

        self._progress = Progress(
            "[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            console=Console(stderr=True), transient=True,
        )  # fmt: skip
        self._progress.start()
        self._task = self._progress.add_task(self.label, total=None)

        def update(done: int, total: int | None) -> None:
            self._progress.update(self._task, completed=done, total=total)

        return update

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
