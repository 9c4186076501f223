"""junit.py: the JUnit report, validated against Jenkins' published schema."""

from __future__ import annotations

import pytest

from qemu_instances.junit import junit_xml
from qemu_instances.smokereport import CheckResult, Status
from testsupport.reports import report_with_checks, validate_junit

lxml_etree = pytest.importorskip("lxml.etree")  # a test dependency (pyproject [test])


def test_junit_report_is_valid_and_says_what_failed() -> None:
    good = report_with_checks("debian-12", {"booted": Status.PASSED, "ssh": Status.PASSED})
    bad = report_with_checks(
        "ubuntu-22.04", {"booted": Status.PASSED, "cloud-init": Status.FAILED, "ssh": Status.SKIPPED}
    )
    good.checks.append(CheckResult("user", Status.PASSED, 0.5, "", "$ true\nexit 0 after 0.01 s\x1b[0m\x00"))
    xml = junit_xml([good, bad])
    validate_junit(xml)
    root = lxml_etree.fromstring(xml)
    suites = root.findall("testsuite")
    assert [s.get("name") for s in suites] == ["debian-12[bios]", "ubuntu-22.04[bios]"]
    assert root.get("tests") == "6" and root.get("failures") == "1"
    assert suites[0].find("testcase[@name='user']/system-out").text == "$ true\nexit 0 after 0.01 s"
    assert suites[1].get("failures") == "1" and suites[1].get("skipped") == "1"
    failed = suites[1].find("testcase[@name='cloud-init']")
    assert failed.find("failure").get("message") == "expected x, saw y"
    out = failed.find("system-out").text
    assert "<&> 'quoted'" in out and "  OK  ] Started\nKernel panic" in out
    assert failed.get("time") == "1.250"
    assert suites[0].find("testcase[@name='booted']").find("failure") is None
    props = {p.get("name"): p.get("value") for p in suites[0].iter("property")}
    assert props["digest"] == "sha512:00" and props["instance"] == "smoke-debian-12-ab12"
