"""What the benchmarks print and write: progress lines, Markdown tables, JSON."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(seconds: float | None, digits: int = 2) -> str:
    return "-" if seconds is None else f"{seconds:.{digits}f} s"


def fmt_summary(s: dict[str, Any], digits: int = 2, unit: str = "s") -> tuple[str, str, str]:
    """(median, min, max) cells of a summarize() result."""
    if not s:
        return ("-", "-", "-")
    return tuple(f"{s[k]:.{digits}f} {unit}" for k in ("median", "min", "max"))  # type: ignore[return-value]


def write_json(path: Path | None, data: dict[str, Any]) -> None:
    if path is not None:
        path.write_text(json.dumps(data, indent=2) + "\n")
