"""Smoke reports for the tests: made-up ImageReports, and JUnit XML validated against Jenkins' published schema."""

from __future__ import annotations

from pathlib import Path

import pytest

from qemu_instances.smokereport import CheckResult, ImageReport, Status

XSD = Path(__file__).resolve().parents[1] / ".venv/share/junit/junit-10.xsd"


def validate_junit(xml: bytes) -> None:
    """Validate JUnit XML against Jenkins' published schema (junit-10.xsd)."""
    lxml_etree = pytest.importorskip("lxml.etree")  # a test dependency (pyproject [test])
    assert XSD.is_file(), f"{XSD} is missing: 'bash scripts/setup.sh --test' fetches it"
    schema = lxml_etree.XMLSchema(lxml_etree.parse(str(XSD)))
    doc = lxml_etree.fromstring(xml)
    assert schema.validate(doc), schema.error_log


def report_with_checks(image: str, statuses: dict[str, Status]) -> ImageReport:
    """A BIOS report of `image` whose checks ended as `statuses`, with a console full of what XML cannot hold."""
    console = "line 1\n<&> 'quoted'\n\x1b[0;32m  OK  \x1b[0m] Started\x07\r\nKernel panic\x00\n"
    report = ImageReport(image, firmware="bios", instance=f"smoke-{image}-ab12", console=console)
    report.checks = [
        CheckResult(n, s, 1.25, "expected x, saw y" if s is Status.FAILED else "") for n, s in statuses.items()
    ]
    report.properties = {"digest": "sha512:00", "system-state": "running"}
    report.timings = {"download": 1.0, "boot": 2.5}
    return report


def report_with_timings(image: str, firmware: str, timings: dict[str, float], failed: str = "") -> ImageReport:
    """A report of `image` under `firmware` with these phase timings; `failed` names a check that failed."""
    report = ImageReport(image, firmware=firmware, instance="smoke-x")
    report.checks = [CheckResult("booted", Status.PASSED)]
    if failed:
        report.checks.append(CheckResult(failed, Status.FAILED, 1.0, "expected exit 0, got 3\nmore"))
    report.timings = timings
    return report
