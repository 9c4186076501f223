"""JUnit XML for smoke runs: a testsuite per image x firmware, a testcase per check.

Every attribute and text node goes through `clean_text`, so names and output that are not XML (control
characters, lone surrogates from undecodable arguments, terminal escapes) never make a report that fails to parse.
"""

from __future__ import annotations

import re
import socket
import xml.etree.ElementTree as ET
from collections.abc import Sequence

from qemu_instances.smokereport import ImageReport, Status, clean_text


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "image"


def _fmt(seconds: float) -> str:
    return f"{seconds:.3f}"


def _el(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, {k: clean_text(v) for k, v in attrs.items()})
    if text is not None:
        el.text = clean_text(text)
    return el


def junit_xml(reports: Sequence[ImageReport]) -> bytes:
    """The report: failures carry their message, and the command's output (or the console's last lines)."""
    root = ET.Element("testsuites", name="qinst smoke")
    total = failures = 0
    hostname = socket.gethostname()
    for report in reports:
        failed = report.failed
        skipped = [c for c in report.checks if c.status is Status.SKIPPED]
        suite = _el(
            root,
            "testsuite",
            name=report.suite,
            tests=str(len(report.checks)),
            failures=str(len(failed)),
            errors="0",
            skipped=str(len(skipped)),
            time=_fmt(report.seconds),
            timestamp=report.started,
            hostname=hostname,
        )
        props = _el(suite, "properties")
        extra = {"instance": report.instance, "firmware": report.firmware, "arch": report.arch}
        if report.attempts > 1:
            extra["attempts"] = str(report.attempts)
            if report.flaky:
                extra["flaky"] = "true"
            extra["first-failure"] = report.first_failure
        # The boot's phases (where the time went: firmware, kernel, systemd, each cloud-init stage), in seconds.
        phases = {name: f"{value:.2f}" for name, value in report.timings.items() if name.startswith("boot-")}
        for name, value in {**extra, **report.properties, **phases}.items():
            _el(props, "property", name=name, value=value)
        arch = "" if report.arch == "x86_64" else f"{report.arch}."
        classname = f"smoke.{_slug(report.image)}.{arch}{report.firmware}"
        for check in report.checks:
            case = _el(suite, "testcase", classname=classname, name=check.name, time=_fmt(check.seconds))
            if check.status is Status.FAILED:
                _el(case, "failure", check.message, message=check.message, type="SmokeCheckFailed")
                _el(case, "system-out", check.output or report.console_tail())
            elif check.status is Status.SKIPPED:
                _el(case, "skipped", message=check.message)
            elif check.output:
                _el(case, "system-out", check.output)
        total += len(report.checks)
        failures += len(failed)
    root.set("tests", str(total))
    root.set("failures", str(failures))
    root.set("errors", "0")
    root.set("time", _fmt(sum(r.seconds for r in reports)))
    ET.indent(root)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode").encode() + b"\n"
