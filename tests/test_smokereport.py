"""smokereport.py: a report passes only with a pass and no failure; baselines, the Markdown summary, the results
JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qemu_instances.errors import UsageError
from qemu_instances.smokereport import (
    SCHEMA,
    CheckResult,
    Status,
    load_baseline,
    regressions,
    results_json,
    summary_markdown,
)
from testsupport.reports import report_with_checks, report_with_timings


def test_report_passes_only_with_a_pass_and_no_failure() -> None:
    assert report_with_checks("a", {"x": Status.PASSED, "y": Status.SKIPPED}).passed
    assert not report_with_checks("a", {"x": Status.PASSED, "y": Status.FAILED}).passed
    assert not report_with_checks("a", {"x": Status.SKIPPED}).passed


# -- baselines, the summary, the results JSON --------------------------------------------------------------------------


def test_baseline_flags_phases_much_slower_and_the_summary_says_so(tmp_path: Path) -> None:
    last_night = [
        report_with_timings("debian-12", "bios", {"define": 0.5, "boot": 10.0, "cloud-init": 30.0, "ssh": 1.0})
    ]
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(results_json(last_night)))
    baseline = load_baseline(path)
    tonight = report_with_timings("debian-12", "bios", {"define": 0.6, "boot": 14.0, "cloud-init": 45.0, "ssh": 1.0})
    found = regressions(tonight, baseline, 1.25)
    # boot: 1.4x but only 4 s slower; cloud-init: 1.5x and 15 s slower
    assert found == ["cloud-init: 45.0 s, baseline 30.0 s (1.50x; threshold 1.25x)"]
    assert regressions(tonight, baseline, 2.0) == []
    assert regressions(report_with_timings("other", "bios", {}), baseline, 1.25) is None
    tonight.checks.append(CheckResult("must|fail", Status.FAILED, 0.0, "expected exit 0, got 3\nsecond line"))
    md = summary_markdown([tonight, report_with_timings("ubuntu", "uefi", {"boot": 5.0})], baseline)
    row = "| debian-12[bios] | **FAILED** | 60.6 s (baseline 41.5 s, +46%) | must\\|fail: expected exit 0, got 3 |"
    assert row in md
    assert "| ubuntu[uefi] | passed | 5.0 s | - |" in md
    assert "1 of 2 passed." in md
    for text, message in (("[]", "not qinst smoke results"), ("{", "not JSON"), ('{"schema": "x"}', "schema")):
        path.write_text(text)
        with pytest.raises(UsageError, match=message):
            load_baseline(path)


def test_results_json_carries_the_schema_and_retries() -> None:
    report = report_with_timings("debian-12", "uefi", {"boot": 1.0})
    report.attempts, report.first_failure = 2, "cloud-init: expected 'status: done'"
    data = results_json([report])
    assert data["schema"] == SCHEMA and data["passed"]
    (result,) = data["results"]
    assert result["suite"] == "debian-12[uefi]" and result["flaky"] and result["attempts"] == 2
    assert result["first_failure"].startswith("cloud-init:")


@pytest.mark.promise
def test_the_download_is_never_compared_with_the_baseline(tmp_path: Path) -> None:
    """A download 100 s slower (a cold cache, a slow mirror) is no boot regression; a boot as much slower is."""
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(results_json([report_with_timings("d", "bios", {"download": 1.0, "boot": 10.0})])))
    baseline = load_baseline(path)
    assert regressions(report_with_timings("d", "bios", {"download": 101.0, "boot": 10.0}), baseline, 1.25) == []
    assert regressions(report_with_timings("d", "bios", {"download": 1.0, "boot": 110.0}), baseline, 1.25) == [
        "boot: 110.0 s, baseline 10.0 s (11.00x; threshold 1.25x)"
    ]


@pytest.mark.promise
def test_an_image_failing_every_attempt_is_failed_not_flaky() -> None:
    report = report_with_timings("d", "bios", {"boot": 1.0}, failed="cloud-init")
    report.attempts, report.first_failure = 2, "cloud-init: expected exit 0, got 3"
    assert not report.passed and not report.flaky
    (result,) = results_json([report])["results"]
    assert result["flaky"] is False and result["passed"] is False and result["attempts"] == 2
    assert "| d[bios] | **FAILED** |" in summary_markdown([report])
