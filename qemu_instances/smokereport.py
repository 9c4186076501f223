"""What a smoke run found: per-suite results, their JSON (with a schema version), the comparison with a baseline
(last night's JSON) and the Markdown summary for people."""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from qemu_instances.errors import UsageError

SCHEMA = "qinst-smoke/1"
CONSOLE_LINES = 50
REGRESSION_MIN_SECONDS = 5.0
# Phases compared with the baseline: the host-side ones a slower image or guest makes slower (not the download,
# which depends on the cache and the network), and systemd's own figures from inside the guest.
COMPARED = (
    "define", "boot", "cloud-init", "ssh", "checks", "guest-kernel", "guest-userspace", "guest-total",
    # the guest's phases read from its console (bootprofile.py): a regression names the phase that got slower
    "boot-firmware", "boot-kernel", "boot-systemd", "boot-cloud-init-local", "boot-cloud-init-network",
    "boot-cloud-init-config", "boot-cloud-init-final",
)  # fmt: skip


_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-_]")
_NOT_XML = re.compile(r"[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def clean_text(text: str) -> str:
    """The one sanitiser of report text (JUnit, Markdown): terminal escapes, control characters and lone
    surrogates (from arguments that were not UTF-8) removed, so the report always parses."""
    return _NOT_XML.sub("", _ANSI.sub("", text).replace("\r\n", "\n"))


class Status(StrEnum):
    PASSED = "passed"
    FAILED = "failed"
    SKIPPED = "skipped"


@dataclass
class CheckResult:
    name: str
    status: Status
    seconds: float = 0.0
    message: str = ""  # what was expected and what was seen
    output: str = ""  # the command, its exit code and output (tail), for the testcase's system-out


@dataclass
class ImageReport:
    image: str
    firmware: str = "bios"
    arch: str = "x86_64"
    instance: str = ""
    checks: list[CheckResult] = field(default_factory=list)
    properties: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    started: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat())
    console: str = ""  # the whole serial console, as recorded
    kept: bool = False
    attempts: int = 1
    first_failure: str = ""  # with --retries: the first failed attempt's message
    artifact_errors: dict[str, str] = field(default_factory=dict)  # --artifacts files not (fully) collected: why
    job: int | None = None  # its place in the whole image x arch x firmware matrix (smoke.jobs' order; shards)

    @property
    def suite(self) -> str:
        """IMAGE[firmware] for an x86_64 guest (the names nightly baselines have always used), IMAGE[arch,firmware]
        for another architecture's."""
        if self.arch == "x86_64":
            return f"{self.image}[{self.firmware}]"
        return f"{self.image}[{self.arch},{self.firmware}]"

    @property
    def passed(self) -> bool:
        return any(c.status is Status.PASSED for c in self.checks) and not self.failed

    @property
    def failed(self) -> list[CheckResult]:
        return [c for c in self.checks if c.status is Status.FAILED]

    @property
    def flaky(self) -> bool:
        return self.passed and self.attempts > 1

    @property
    def seconds(self) -> float:
        return round(sum(v for k, v in self.timings.items() if not k.startswith("guest-")), 2)

    @property
    def ready_seconds(self) -> float:
        """From define to a guest that answers SSH: the boot time people compare."""
        return round(sum(self.timings.get(k, 0.0) for k in ("define", "boot", "cloud-init", "ssh")), 2)

    def add(self, name: str, ok: bool, seconds: float, message: str = "", output: str = "") -> None:
        status = Status.PASSED if ok else Status.FAILED
        self.checks.append(CheckResult(name, status, round(seconds, 3), message, output))

    def skip(self, name: str, why: str) -> None:
        self.checks.append(CheckResult(name, Status.SKIPPED, 0.0, why))

    def skip_rest(self, names: Sequence[str], why: str) -> None:
        done = {c.name for c in self.checks}
        self.checks += [CheckResult(n, Status.SKIPPED, 0.0, why) for n in names if n not in done]

    def console_tail(self, n: int = CONSOLE_LINES) -> str:
        lines = [line.rstrip("\r") for line in self.console.splitlines() if line.strip()]
        return "\n".join(lines[-n:])

    def to_json(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "firmware": self.firmware,
            "arch": self.arch,
            "suite": self.suite,
            "instance": self.instance,
            "passed": self.passed,
            "flaky": self.flaky,
            "attempts": self.attempts,
            "first_failure": self.first_failure,
            "started": self.started,
            "checks": [
                {"name": c.name, "status": str(c.status), "seconds": c.seconds, "message": c.message}
                | ({"output": c.output} if c.output else {})
                for c in self.checks
            ],
            "properties": self.properties,
            "timings": self.timings,
            "ready_seconds": self.ready_seconds,
            "kept": self.kept,
            "artifact_errors": self.artifact_errors,
            # What the JUnit report shows of a failure, so that `qinst smoke merge` rebuilds the same report.
            **({"console_tail": self.console_tail()} if self.failed else {}),
            **({"job": self.job} if self.job is not None else {}),
        }


def results_json(reports: Sequence[ImageReport], shard: tuple[int, int] | None = None) -> dict[str, Any]:
    """The run's JSON; a shard's (smoke --shard K/N) says which one it is, so that a merge sees a missing one."""
    return {
        "schema": SCHEMA,
        "passed": all(r.passed for r in reports),
        **({"shard": {"index": shard[0], "count": shard[1]}} if shard else {}),
        "results": [r.to_json() for r in reports],
    }


# ---- baselines -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Baseline:
    """Last night's timings by suite name (IMAGE[firmware])."""

    path: Path
    timings: Mapping[str, Mapping[str, float]]

    def ready_seconds(self, suite: str) -> float | None:
        t = self.timings.get(suite)
        if not t:
            return None
        return round(sum(t.get(k, 0.0) for k in ("define", "boot", "cloud-init", "ssh")), 2)


def load_baseline(path: Path) -> Baseline:
    """A previous run's JSON (--json or results.json); UsageError (exit 2) if it is not one."""
    from qemu_instances.files import MAX_BASELINE, parse_json, read_option_file

    data = parse_json(read_option_file(path, "--baseline", MAX_BASELINE) or b"", f"--baseline {path}")
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("results"), list):
        raise UsageError(f"--baseline {path}: not qinst smoke results (expected schema {SCHEMA!r})")
    timings: dict[str, dict[str, float]] = {}
    for i, result in enumerate(data["results"]):
        suite = result.get("suite") if isinstance(result, dict) else None
        raw = result.get("timings") if isinstance(result, dict) else None
        if not isinstance(suite, str) or not isinstance(raw, dict):
            raise UsageError(f"--baseline {path}: results[{i}] has no suite name or timings")
        timings[suite] = {k: s for k, v in raw.items() if isinstance(k, str) and (s := _seconds(v)) is not None}
    return Baseline(path, timings)


def _seconds(value: object) -> float | None:
    """A duration read back from a results file (untrusted): a finite number >= 0, else None. A 400-digit integer
    is not a float (OverflowError), and neither is a bool."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        seconds = float(value)
    except OverflowError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def regressions(report: ImageReport, baseline: Baseline, threshold: float) -> list[str] | None:
    """The phases slower than threshold x the baseline and at least 5 s slower; None without a baseline entry."""
    before = baseline.timings.get(report.suite)
    if before is None:
        return None
    found = []
    for phase in COMPARED:
        old, new = before.get(phase), report.timings.get(phase)
        if old is None or new is None:
            continue
        if new > old * threshold and new - old >= REGRESSION_MIN_SECONDS:
            ratio = new / old if old else math.inf
            found.append(f"{phase}: {new:.1f} s, baseline {old:.1f} s ({ratio:.2f}x; threshold {threshold:g}x)")
    return found


# ---- Markdown summary ----------------------------------------------------------------------------------------------


def _cell(text: str) -> str:
    """Text fit for one Markdown table cell: one line, pipes escaped, no HTML, no control characters."""
    line = clean_text(text).replace("\n", " ").strip()
    return line.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")[:300]


def summary_markdown(reports: Sequence[ImageReport], baseline: Baseline | None = None) -> str:
    passed = sum(r.passed for r in reports)
    lines = [
        "## qinst smoke",
        "",
        f"{passed} of {len(reports)} passed.",
        "",
        "| image | result | boot time | failed checks |",
        "|---|---|---|---|",
    ]
    for r in reports:
        result = "passed" + (f" (flaky: {r.attempts} attempts)" if r.flaky else "") if r.passed else "**FAILED**"
        boot = f"{r.ready_seconds:.1f} s" if r.ready_seconds else "-"
        before = baseline.ready_seconds(r.suite) if baseline else None
        if before:
            change = (r.ready_seconds - before) / before * 100
            boot += f" (baseline {before:.1f} s, {change:+.0f}%)"
        failed = "; ".join(f"{c.name}: {(c.message.strip().splitlines() or [''])[0]}" for c in r.failed)
        lines.append(f"| {_cell(r.suite)} | {result} | {boot} | {_cell(failed) or '-'} |")
    missing = [(r.suite, name, why) for r in reports for name, why in r.artifact_errors.items()]
    if missing:
        lines += ["", "Artifacts not fully collected:", ""]
        lines += [f"- {_cell(suite)}: {_cell(name)}: {_cell(why)}" for suite, name, why in missing]
    return "\n".join(lines) + "\n"
