"""Boot-smoke runs: the JUnit report against Jenkins' published schema, and a real parallel run of a good and a
broken image through the `qinst` entry point."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import RunQinst, qinst_argv, qinst_env
from guest import domains, force_remove, volumes

from qemu_instances.smoke import CheckResult, ImageReport, Status, junit_xml

lxml_etree = pytest.importorskip("lxml.etree")  # a test dependency (pyproject [test])
XSD = Path(__file__).resolve().parents[1] / ".venv/share/junit/junit-10.xsd"


def _validate(xml: bytes) -> None:
    assert XSD.is_file(), f"{XSD} is missing: 'bash scripts/setup.sh --test' fetches it"
    schema = lxml_etree.XMLSchema(lxml_etree.parse(str(XSD)))
    doc = lxml_etree.fromstring(xml)
    assert schema.validate(doc), schema.error_log


def _report(image: str, statuses: dict[str, Status]) -> ImageReport:
    console = "line 1\n<&> 'quoted'\n\x1b[0;32m  OK  \x1b[0m] Started\x07\r\nKernel panic\x00\n"
    report = ImageReport(image, instance=f"smoke-{image}-ab12", console=console)
    report.checks = [
        CheckResult(n, s, 1.25, "expected x, saw y" if s is Status.FAILED else "") for n, s in statuses.items()
    ]
    report.properties = {"digest": "sha512:00", "system-state": "running"}
    report.timings = {"download": 1.0, "boot": 2.5}
    return report


def test_junit_report_is_valid_and_says_what_failed() -> None:
    good = _report("debian-12", {"booted": Status.PASSED, "ssh": Status.PASSED})
    bad = _report("ubuntu-22.04", {"booted": Status.PASSED, "cloud-init": Status.FAILED, "ssh": Status.SKIPPED})
    xml = junit_xml([good, bad])
    _validate(xml)
    root = lxml_etree.fromstring(xml)
    suites = root.findall("testsuite")
    assert [s.get("name") for s in suites] == ["debian-12", "ubuntu-22.04"]
    assert root.get("tests") == "5" and root.get("failures") == "1"
    assert suites[1].get("failures") == "1" and suites[1].get("skipped") == "1"
    failed = suites[1].find("testcase[@name='cloud-init']")
    assert failed.find("failure").get("message") == "expected x, saw y"
    out = failed.find("system-out").text
    assert "<&> 'quoted'" in out and "  OK  ] Started\nKernel panic" in out
    assert failed.get("time") == "1.250"
    assert suites[0].find("testcase[@name='booted']").find("failure") is None
    props = {p.get("name"): p.get("value") for p in suites[0].iter("property")}
    assert props["digest"] == "sha512:00" and props["instance"] == "smoke-debian-12-ab12"


def test_report_passes_only_with_a_pass_and_no_failure() -> None:
    assert _report("a", {"x": Status.PASSED, "y": Status.SKIPPED}).passed
    assert not _report("a", {"x": Status.PASSED, "y": Status.FAILED}).passed
    assert not _report("a", {"x": Status.SKIPPED}).passed


@pytest.mark.vm
@pytest.mark.libvirt
def test_smoke_good_and_broken_in_parallel(qinst: RunQinst, vm_env: dict[str, str], tmp_path: Path) -> None:
    junit = tmp_path / "report.xml"
    artifacts = tmp_path / "artifacts"
    run = qinst(
        "smoke", "qinst-test", "qinst-test-broken", "--parallel", "2", "--timeout", "360",
        "--junit", str(junit), "--artifacts", str(artifacts), "--json",
        env=vm_env, timeout=900,
    )  # fmt: skip
    assert run.returncode == 6, run.stderr
    reports = {r["image"]: r for r in json.loads(run.stdout)}
    good, broken = reports["qinst-test"], reports["qinst-test-broken"]

    assert good["passed"], good
    checks = {c["name"]: c for c in good["checks"]}
    expected = {"pull", "launch", "booted", "cloud-init", "ssh", "hostname", "instance-id", "user-data", "root-fs"}
    assert set(checks) == expected
    assert all(c["status"] == "passed" for c in checks.values())
    assert good["properties"]["system-state"] and good["properties"]["kernel"].endswith("cloud-amd64")

    assert not broken["passed"]
    bchecks = {c["name"]: c for c in broken["checks"]}
    assert bchecks["booted"]["status"] == "passed"
    assert bchecks["cloud-init"]["status"] == "failed"
    assert "Cloud-init v. ... finished" in bchecks["cloud-init"]["message"]
    assert "not ready within 360 s" in bchecks["cloud-init"]["message"]
    assert bchecks["hostname"]["status"] == "skipped"

    lines = run.stderr.splitlines()
    assert any(line.startswith("PASS qinst-test ") for line in lines)
    assert any(line.startswith("FAIL qinst-test-broken: cloud-init:") for line in lines)

    xml = junit.read_bytes()
    _validate(xml)
    root = lxml_etree.fromstring(xml)
    failing = root.find("testsuite[@name='qinst-test-broken']/testcase[@name='cloud-init']")
    assert failing.find("failure") is not None and "Linux" in (failing.find("system-out").text or "")

    for image in ("qinst-test", "qinst-test-broken"):
        assert "Linux version" in (artifacts / image / "console.log").read_text()
        timings = json.loads((artifacts / image / "timings.json").read_text())
        assert {"download", "define", "boot"} <= set(timings)
    assert "Cloud-init v." in (artifacts / "qinst-test" / "cloud-init-output.log").read_text()
    assert (artifacts / "qinst-test" / "cloud-init.log").stat().st_size > 0

    assert not {d for d in domains() if d.startswith("smoke-qinst-test")}
    assert not {v for v in volumes() if v.startswith("smoke-qinst-test")}


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


@pytest.mark.vm
@pytest.mark.libvirt
def test_ctrl_c_stops_the_run_and_removes_its_instances(vm_env: dict[str, str]) -> None:
    argv = [*qinst_argv(), "smoke", "qinst-test", "qinst-test", "--parallel", "2", "--timeout", "600"]
    proc = subprocess.Popen(argv, env=qinst_env(**vm_env), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while len({d for d in domains() if d.startswith("smoke-qinst-test")}) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, "the smoke boots never started"
            time.sleep(0.2)
        names = {d for d in domains() if d.startswith("smoke-qinst-test")}
        logs = Path("/var/log/libvirt/qemu")
        while not all("Linux version" in _text(logs / f"{d}-console.log") for d in names):
            assert proc.poll() is None and time.monotonic() < deadline, "the smoke guests' kernels never started"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)  # both guests are booting
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 130, err
        assert not names & domains()  # other runs on this machine may have smoke domains of their own
        assert not {v for v in volumes() for d in names if v.startswith(d)}
    finally:
        proc.kill()
        for name in {d for d in domains() if d.startswith("smoke-qinst-test")}:
            force_remove(name)
