"""A smoke matrix split over CI jobs (`qinst smoke --shard K/N`) and their results joined (`qinst smoke merge`).

The split is by position in smoke.jobs' order (image x arch x firmware): job i goes to shard (i mod N) + 1, so every
CI job computes the same split from the same command line, with no coordination, and every job is in exactly one
shard. The merge reads each shard's results.json (schema qinst-smoke/1) back into reports: one JUnit file, one
summary, and one results.json that tomorrow's `--baseline` reads like any run's.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from qemu_instances.errors import UsageError
from qemu_instances.smokereport import SCHEMA, CheckResult, ImageReport, Status, results_json

T = TypeVar("T")
_SHARD = re.compile(r"([0-9]{1,4})/([0-9]{1,4})")


@dataclass(frozen=True)
class Shard:
    index: int  # K, from 1
    count: int  # N

    @classmethod
    def parse(cls, text: str, option: str = "--shard") -> Shard:
        """K/N with 1 <= K <= N (UsageError otherwise)."""
        match = _SHARD.fullmatch(text.strip())
        if not match or not 1 <= int(match[1]) <= int(match[2]):
            raise UsageError(f"{option} {text!r}: expected K/N with 1 <= K <= N (for example 2/4)")
        return cls(int(match[1]), int(match[2]))

    def take(self, items: Sequence[T]) -> list[tuple[int, T]]:
        """This shard's share of `items`, each with its position in the whole list."""
        return [(i, item) for i, item in enumerate(items) if i % self.count == self.index - 1]

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


# ---- merge -----------------------------------------------------------------------------------------------------------


@dataclass
class Merged:
    reports: list[ImageReport]
    shards: dict[int, Path] = field(default_factory=dict)  # K -> the file that held shard K/N
    count: int | None = None  # N, when the files were shards

    @property
    def missing(self) -> list[str]:
        """The shards K/N that no file held (a CI job that ended before writing its results)."""
        if self.count is None:
            return []
        return [f"{k}/{self.count}" for k in range(1, self.count + 1) if k not in self.shards]

    @property
    def passed(self) -> bool:
        return not self.missing and all(r.passed for r in self.reports)

    def to_json(self) -> dict[str, Any]:
        """One results.json for the whole matrix (no shard: it is the whole run)."""
        data = results_json(self.reports)
        data["passed"] = self.passed
        return data


def _need(value: Any, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        name = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise UsageError(f"{where}: expected {name}")
    return value


def _text(data: dict[str, Any], key: str, where: str, default: str = "") -> str:
    return str(_need(data.get(key, default), str, f"{where}.{key}"))


def _number(value: Any, where: str) -> float:
    number = _need(value, (int, float), where)
    if not 0 <= number < 1e9:
        raise UsageError(f"{where}: expected a duration in seconds")
    return float(number)


def report_from_json(data: Any, where: str) -> ImageReport:
    """One result of a results.json (untrusted: it came from another job's artifacts) as the report it was made from.
    Keys a newer qinst adds are ignored; those an older one did not write (outputs, the console tail) are empty."""
    data = _need(data, dict, where)
    report = ImageReport(
        _text(data, "image", where),
        firmware=_text(data, "firmware", where, "bios"),
        arch=_text(data, "arch", where, "x86_64"),
        instance=_text(data, "instance", where),
        console=_text(data, "console_tail", where),
        kept=bool(data.get("kept", False)),
        attempts=int(_number(data.get("attempts", 1), f"{where}.attempts")),
        first_failure=_text(data, "first_failure", where),
    )
    if data.get("started"):
        report.started = _text(data, "started", where)
    for i, check in enumerate(_need(data.get("checks", []), list, f"{where}.checks")):
        at = f"{where}.checks[{i}]"
        check = _need(check, dict, at)
        try:
            status = Status(_text(check, "status", at))
        except ValueError:
            raise UsageError(f"{at}.status: expected one of {', '.join(s.value for s in Status)}") from None
        seconds = _number(check.get("seconds", 0.0), f"{at}.seconds")
        message, output = _text(check, "message", at), _text(check, "output", at)
        report.checks.append(CheckResult(_text(check, "name", at), status, seconds, message, output))
    for key in ("properties", "artifact_errors"):
        table = _need(data.get(key, {}), dict, f"{where}.{key}")
        getattr(report, key).update({str(k): str(v) for k, v in table.items()})
    timings = _need(data.get("timings", {}), dict, f"{where}.timings")
    report.timings = {str(k): _number(v, f"{where}.timings.{k}") for k, v in timings.items()}
    if isinstance(data.get("job"), int) and not isinstance(data.get("job"), bool):
        report.job = data["job"]
    if data.get("suite") not in (None, report.suite):
        raise UsageError(f"{where}.suite: {str(data.get('suite'))[:80]!r} is not {report.suite!r}")
    return report


def merge(files: Sequence[Path]) -> Merged:
    """The results of every file, in the matrix's order (each result's job number; files without one keep the order
    given). A suite twice, a shard twice, or shards of different splits are refused (UsageError): one of the files
    is not what it is taken for."""
    from qemu_instances.files import MAX_BASELINE, parse_json, read_option_file

    merged = Merged([])
    seen: dict[str, Path] = {}
    for path in files:
        data = parse_json(read_option_file(path, "merge", MAX_BASELINE) or b"", str(path))
        if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("results"), list):
            raise UsageError(f"{path}: not qinst smoke results (expected schema {SCHEMA!r})")
        if (shard := data.get("shard")) is not None:
            _add_shard(merged, path, shard)
        for i, result in enumerate(data["results"]):
            report = report_from_json(result, f"{path}: results[{i}]")
            if report.suite in seen:
                raise UsageError(f"{report.suite} is in both {seen[report.suite]} and {path}")
            seen[report.suite] = path
            merged.reports.append(report)
    order = {id(r): n for n, r in enumerate(merged.reports)}
    merged.reports.sort(key=lambda r: (r.job is None, r.job if r.job is not None else order[id(r)]))
    return merged


def _add_shard(merged: Merged, path: Path, shard: Any) -> None:
    where = f"{path}: shard"
    shard = _need(shard, dict, where)
    index, count = _need(shard.get("index"), int, f"{where}.index"), _need(shard.get("count"), int, f"{where}.count")
    if not 1 <= index <= count:
        raise UsageError(f"{where}: {index}/{count} is not a shard")
    if merged.count is not None and count != merged.count:
        raise UsageError(f"{path} is shard {index}/{count}, the other files are shards of {merged.count}")
    if index in merged.shards:
        raise UsageError(f"shard {index}/{count} is both {merged.shards[index]} and {path}")
    merged.count = count
    merged.shards[index] = path
