"""Boot-smoke runs: the JUnit report against Jenkins' published schema, and a real parallel run of a good and a
broken image through the `qinst` entry point."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import qinst_argv, qinst_env
from guest import domains, force_remove, volumes

from qemu_instances.junit import junit_xml
from qemu_instances.smokereport import SCHEMA, CheckResult, ImageReport, Status

lxml_etree = pytest.importorskip("lxml.etree")  # a test dependency (pyproject [test])
XSD = Path(__file__).resolve().parents[1] / ".venv/share/junit/junit-10.xsd"


def _validate(xml: bytes) -> None:
    assert XSD.is_file(), f"{XSD} is missing: 'bash scripts/setup.sh --test' fetches it"
    schema = lxml_etree.XMLSchema(lxml_etree.parse(str(XSD)))
    doc = lxml_etree.fromstring(xml)
    assert schema.validate(doc), schema.error_log


def _report(image: str, statuses: dict[str, Status]) -> ImageReport:
    console = "line 1\n<&> 'quoted'\n\x1b[0;32m  OK  \x1b[0m] Started\x07\r\nKernel panic\x00\n"
    report = ImageReport(image, firmware="bios", instance=f"smoke-{image}-ab12", console=console)
    report.checks = [
        CheckResult(n, s, 1.25, "expected x, saw y" if s is Status.FAILED else "") for n, s in statuses.items()
    ]
    report.properties = {"digest": "sha512:00", "system-state": "running"}
    report.timings = {"download": 1.0, "boot": 2.5}
    return report


def test_junit_report_is_valid_and_says_what_failed() -> None:
    good = _report("debian-12", {"booted": Status.PASSED, "ssh": Status.PASSED})
    bad = _report("ubuntu-22.04", {"booted": Status.PASSED, "cloud-init": Status.FAILED, "ssh": Status.SKIPPED})
    good.checks.append(CheckResult("user", Status.PASSED, 0.5, "", "$ true\nexit 0 after 0.01 s\x1b[0m\x00"))
    xml = junit_xml([good, bad])
    _validate(xml)
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


def test_report_passes_only_with_a_pass_and_no_failure() -> None:
    assert _report("a", {"x": Status.PASSED, "y": Status.SKIPPED}).passed
    assert not _report("a", {"x": Status.PASSED, "y": Status.FAILED}).passed
    assert not _report("a", {"x": Status.SKIPPED}).passed


# ---- real boots ----------------------------------------------------------------------------------------------------
# Three smoke runs start together and share the machine (four TCG guests at the peak):
#  - "nightly": the test image under BIOS, with user-data that makes cloud-init log a real WARNING (a schema
#    error: disable_root is not a boolean) and leaves a failed unit (a oneshot service that runs /bin/false,
#    started by runcmd), user checks from a file and from --check, and a doctored baseline;
#  - "allowed": the same user-data with that warning and that unit allowed, --latest, and the two-firmware matrix
#    (the test image has an EFI system partition with systemd-boot beside extlinux): two boots, two testsuites;
#  - "broken": the broken image (cloud-init disabled), which must fail within its (short) timeout.
# User-data rather than image variants: the warning and the failed unit are cloud-init's and systemd's own, made by
# the same image that passes otherwise, and a new variant would add a minute to every image build.

USER_DATA = """#cloud-config
disable_root: 7
write_files:
  - path: /etc/systemd/system/qinst-smoke-fail.service
    content: |
      [Unit]
      Description=fails on purpose (qinst smoke test)
      [Service]
      Type=oneshot
      ExecStart=/bin/false
runcmd:
  - [systemctl, start, --no-block, qinst-smoke-fail.service]
"""
CHECKS = """
[[check]]
name = "os-release"
run = ["cat", "/etc/os-release"]
stdout = ["^ID=debian$", "^VERSION_ID=\\"12\\"$"]
not_stdout = ["ubuntu"]

[[check]]
name = "must-fail"
run = "echo seen-on-stdout; echo seen-on-stderr >&2; exit 3"

[[check]]
name = "root-only"
run = ["cat", "/etc/shadow"]
sudo = true
stdout = ["^root:"]

[[check]]
name = "other-images-only"
run = "false"
images = ["ubuntu-*"]
"""
WARNING_ALLOW = r"schema\.py\[WARNING\]: Invalid cloud-config provided"
# Which firmware the guest itself sees: the kernel has /sys/firmware/efi only when UEFI started it.
FIRMWARE_CHECK = "guest-firmware=if test -d /sys/firmware/efi; then echo guest-sees-uefi; else echo guest-sees-bios; fi"


@dataclass
class Run:
    proc: subprocess.Popen[str]
    dir: Path
    stdout: str = ""
    stderr: str = ""

    def wait(self, timeout: float) -> None:
        self.stdout, self.stderr = self.proc.communicate(timeout=timeout)


def _start(tmp: Path, *args: str, env: dict[str, str]) -> Run:
    tmp.mkdir(parents=True, exist_ok=True)
    argv = [*qinst_argv(), "smoke", *args, "--junit", str(tmp / "r.xml"), "--summary", str(tmp / "summary.md")]
    argv += ["--artifacts", str(tmp / "artifacts"), "--json"]
    proc = subprocess.Popen(argv, env=qinst_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return Run(proc, tmp)


@pytest.fixture(scope="module")
def runs(vm_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Run]]:
    tmp = tmp_path_factory.mktemp("smoke")
    before = domains()  # other test runs may share this libvirtd: only what appears from now on is ours
    (tmp / "user-data.yaml").write_text(USER_DATA)
    (tmp / "checks.toml").write_text(CHECKS)
    # Last night, everything was much faster: tonight's cloud-init phase must be flagged (at least 5 s slower).
    baseline = {
        "schema": SCHEMA,
        "results": [
            {"suite": "qinst-test[bios]", "timings": {"define": 0.1, "boot": 0.5, "cloud-init": 1.0, "ssh": 0.1}}
        ],
    }
    (tmp / "baseline.json").write_text(json.dumps(baseline))
    common = ["--user-data", str(tmp / "user-data.yaml"), "--accel", "tcg", "--timeout", "900"]
    nightly = _start(
        tmp / "nightly", "qinst-test", "--firmware", "bios", *common,
        "--checks", str(tmp / "checks.toml"), "--check", "kernel-is-cloud=uname -r | grep -q cloud-amd64",
        "--baseline", str(tmp / "baseline.json"),
        env=vm_env,
    )  # fmt: skip
    # --latest reads an unsigned SHA512SUMS only from its upstream host, never through a mirror: this run's catalog
    # names the loopback server as the upstream itself.
    upstream = tmp / "upstream.toml"
    catalog = Path(vm_env["QINST_CATALOG"]).read_text()
    upstream.write_text(catalog.replace("https://cloud.debian.org", vm_env["QINST_MIRROR"].rstrip("/")))
    allowed = _start(
        tmp / "allowed", "qinst-test", *common, "--latest", "--firmware", "bios,uefi", "--check", FIRMWARE_CHECK,
        "--allow-warning", WARNING_ALLOW, "--allow-failed-unit", "qinst-smoke-*.service", "--skip", "boot-time",
        env={**vm_env, "QINST_CATALOG": str(upstream), "QINST_MIRROR": ""},
    )  # fmt: skip
    # --retries 1: a launch that fails for the host's sake (libvirt's "pool has asynchronous jobs running" while
    # other runs upload) is tried again; the boot itself must still fail, at cloud-init.
    broken = _start(
        tmp / "broken", "qinst-test-broken", "--accel", "tcg", "--timeout", "120", "--retries", "1", env=vm_env
    )
    try:
        for run in (broken, nightly, allowed):
            run.wait(timeout=1200)
        yield {"nightly": nightly, "allowed": allowed, "broken": broken}
    finally:
        for run in (nightly, allowed, broken):
            run.proc.kill()
        for name in {d for d in domains() - before if d.startswith("smoke-qinst-test")}:
            force_remove(name)


def _instances(run: Run) -> set[str]:
    return {r["instance"] for r in json.loads(run.stdout)["results"]}


def _suites(run: Run) -> dict[str, Any]:
    xml = (run.dir / "r.xml").read_bytes()
    _validate(xml)
    return {s.get("name"): s for s in lxml_etree.fromstring(xml).findall("testsuite")}


def _case(suite: Any, name: str) -> Any:
    case = suite.find(f"testcase[@name='{name}']")
    assert case is not None, name
    return case


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


@pytest.mark.vm
@pytest.mark.libvirt
def test_nightly_matrix_has_a_testsuite_per_firmware_and_exit_6(runs: dict[str, Run]) -> None:
    run = runs["nightly"]
    assert run.proc.returncode == 6, run.stderr
    suites = _suites(run)
    assert set(suites) == {"qinst-test[bios]"}
    data = json.loads(run.stdout)
    assert data["schema"] == SCHEMA
    for result in data["results"]:
        checks = {c["name"]: c["status"] for c in result["checks"]}
        for name in ("pull", "launch", "booted", "cloud-init", "ssh", "hostname", "instance-id", "user-data"):
            assert checks[name] == "passed", (result["suite"], name, result["checks"])
        assert checks["root-fs"] == "passed" and checks["boot-time"] == "passed"
        assert {"define", "boot", "cloud-init", "ssh", "checks", "guest-total"} <= set(result["timings"])
        props = {p.get("name"): p.get("value") for p in suites[result["suite"]].iter("property")}
        assert props["firmware"] == result["firmware"]
        assert float(props["boot-time-kernel"]) > 0 and float(props["boot-time-userspace"]) > 0
        assert float(props["boot-time-total"]) >= float(props["boot-time-kernel"])
        # Facts: the kernel the guest runs (asked in the session), cloud-init's version (from its console line).
        assert props["kernel"].endswith("-cloud-amd64"), props
        assert re.fullmatch(r"2\d\.\d+(\.\d+)?", props["cloud-init-version"]), props


@pytest.mark.vm
@pytest.mark.libvirt
def test_user_checks_pass_and_fail_with_their_output(runs: dict[str, Run]) -> None:
    suite = _suites(runs["nightly"])["qinst-test[bios]"]
    for name in ("os-release", "root-only", "kernel-is-cloud"):
        case = _case(suite, name)
        assert case.find("failure") is None, name
        assert "exit 0" in case.find("system-out").text
    assert suite.find("testcase[@name='other-images-only']") is None  # images = ["ubuntu-*"]
    failed = _case(suite, "must-fail")
    assert failed.find("failure").get("message") == "expected exit 0, got 3"
    out = failed.find("system-out").text
    assert "$ echo seen-on-stdout" in out and "exit 3 after" in out
    assert "seen-on-stdout" in out.split("--- stdout (tail) ---")[1] and "seen-on-stderr" in out
    assert "FAIL qinst-test[bios]: " in runs["nightly"].stderr


@pytest.mark.vm
@pytest.mark.libvirt
def test_health_checks_catch_a_real_warning_and_a_failed_unit(runs: dict[str, Run]) -> None:
    suite = _suites(runs["nightly"])["qinst-test[bios]"]
    log_failure = _case(suite, "cloud-init-log").find("failure").get("message")
    assert "Traceback/WARNING line(s) in /var/log/cloud-init.log" in log_failure
    assert "[WARNING]: Invalid cloud-config provided" in log_failure  # the offending line, quoted
    state = _case(suite, "system-state").find("failure").get("message")
    assert state == "system is degraded; failed units: qinst-smoke-fail.service"
    props = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert props["system-state"] == "degraded"


@pytest.mark.vm
@pytest.mark.libvirt
def test_allow_lists_pass_and_the_broken_image_fails(runs: dict[str, Run], vm_env: dict[str, str]) -> None:
    run = runs["allowed"]
    assert run.proc.returncode == 0, run.stderr
    good = _suites(run)["qinst-test[bios]"]
    assert good.get("failures") == "0", run.stderr
    assert _case(good, "cloud-init-log").find("failure") is None
    assert _case(good, "system-state").find("failure") is None
    assert _case(good, "boot-time").find("skipped").get("message") == "skipped by --skip"
    assert any(line.startswith("PASS qinst-test[bios] ") for line in run.stderr.splitlines())
    # --latest: the build the upstream's SHA512SUMS names (here the pinned one), verified against it
    props = {p.get("name"): p.get("value") for p in good.iter("property")}
    catalog = tomllib.loads(Path(vm_env["QINST_CATALOG"]).read_text())
    assert props["digest"] == catalog["images"]["qinst-test"]["digest"]
    run = runs["broken"]
    assert run.proc.returncode == 6, run.stderr
    broken = _suites(run)["qinst-test-broken[bios]"]
    cloud_init = _case(broken, "cloud-init").find("failure")
    assert "Cloud-init v. ... finished" in cloud_init.get("message")
    assert "not ready within 120 s" in cloud_init.get("message")
    # The console's tail: its last lines carry kernel timestamps (which lines depends on how far the boot got).
    assert re.search(r"^\[ *\d+\.\d+\] ", _case(broken, "cloud-init").find("system-out").text or "", re.M)
    assert _case(broken, "hostname").find("skipped") is not None
    assert any(line.startswith("FAIL qinst-test-broken[bios]: cloud-init:") for line in run.stderr.splitlines())


@pytest.mark.vm
@pytest.mark.libvirt
def test_firmware_matrix_boots_the_image_under_bios_and_uefi(runs: dict[str, Run]) -> None:
    run = runs["allowed"]
    assert run.proc.returncode == 0, run.stderr
    suites = _suites(run)
    assert set(suites) == {"qinst-test[bios]", "qinst-test[uefi]"}
    results = {r["suite"]: r for r in json.loads(run.stdout)["results"]}
    assert set(results) == set(suites)
    for firmware in ("bios", "uefi"):
        suite = suites[f"qinst-test[{firmware}]"]
        assert suite.get("failures") == "0" and suite.get("errors") == "0", run.stderr
        props = {p.get("name"): p.get("value") for p in suite.iter("property")}
        assert props["firmware"] == firmware == results[f"qinst-test[{firmware}]"]["firmware"]
        assert results[f"qinst-test[{firmware}]"]["passed"] is True
        assert any(line.startswith(f"PASS qinst-test[{firmware}] ") for line in run.stderr.splitlines())
        seen = _case(suite, "guest-firmware").find("system-out").text.split("--- stdout (tail) ---")[1]
        assert f"guest-sees-{firmware}" in seen, seen
    consoles = {f: (run.dir / "artifacts" / f"qinst-test-{f}" / "console.log").read_text() for f in ("bios", "uefi")}
    assert "BdsDxe" in consoles["uefi"] and "Linux version" in consoles["uefi"]  # OVMF ran systemd-boot, then Linux
    assert "BdsDxe" not in consoles["bios"] and "Linux version" in consoles["bios"]


@pytest.mark.vm
@pytest.mark.libvirt
def test_baseline_regression_summary_and_artifacts(runs: dict[str, Run]) -> None:
    run = runs["nightly"]
    suites = _suites(run)
    regression = _case(suites["qinst-test[bios]"], "boot-regression").find("failure").get("message")
    assert re.search(r"cloud-init: [\d.]+ s, baseline 1\.0 s \([\d.]+x; threshold 1\.25x\)", regression)
    summary = (run.dir / "summary.md").read_text()
    assert "| image | result | boot time | failed checks |" in summary
    row = next(line for line in summary.splitlines() if line.startswith("| qinst-test[bios] |"))
    assert "**FAILED**" in row and "(baseline 1.7 s, +" in row
    assert "must-fail: expected exit 0, got 3" in row and "system-state: system is degraded" in row
    artifacts = run.dir / "artifacts"
    results = json.loads((artifacts / "results.json").read_text())
    assert results["schema"] == SCHEMA and len(results["results"]) == 1
    for label in ("qinst-test-bios",):
        folder = artifacts / label
        assert "qinst-smoke-fail.service" in (folder / "journal.log").read_text()
        assert "cloud-init" in (folder / "systemd-analyze-blame.txt").read_text()
        assert "Cloud-init v." in (folder / "cloud-init-output.log").read_text()
        assert "Invalid cloud-config" in (folder / "cloud-init.log").read_text()
        assert "Linux version" in (folder / "console.log").read_text()
        assert {"download", "define", "boot", "checks"} <= set(json.loads((folder / "timings.json").read_text()))
    # All checks of one guest run over one SSH session (tests/test_smoke_checks.py proves the batch); its time is
    # measured by bench/smoke.py on a quiet host. Here only a bound that a loaded CI machine cannot break.
    for result in results["results"]:
        assert result["timings"]["checks"] < 240, result["timings"]
    ours = _instances(run) | _instances(runs["allowed"])
    assert len(ours) == 3 and not ours & domains()
    assert not {v for v in volumes() if v.split(".")[0].removesuffix("-seed") in ours}


@pytest.mark.vm
@pytest.mark.libvirt
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interruption_removes_the_guests_and_reports_what_finished(
    vm_env: dict[str, str], tmp_path: Path, sig: signal.Signals, code: int
) -> None:
    """Ctrl-C, or SIGTERM (how CI cancels a job): the boots stop, their instances go, the report holds what
    finished (here: an image that is not in the catalog)."""
    junit = tmp_path / "r.xml"
    argv = [*qinst_argv(), "smoke", "no-such-image", "qinst-test", "--parallel", "2", "--junit", str(junit)]
    before = domains()  # other test runs may share this libvirtd: only what appears from now on is ours
    proc = subprocess.Popen(argv, env=qinst_env(**vm_env), stderr=subprocess.PIPE, text=True)
    ours: set[str] = set()
    try:
        deadline = time.monotonic() + 300
        while not ours:
            ours = {d for d in domains() - before if d.startswith("smoke-qinst-test-")}
            assert proc.poll() is None and time.monotonic() < deadline, "the smoke boot never started"
            time.sleep(0.2)
        logs = Path("/var/log/libvirt/qemu")
        while not all("Linux version" in _text(logs / f"{d}-console.log") for d in ours):
            assert proc.poll() is None and time.monotonic() < deadline, "the smoke guest's kernel never started"
            time.sleep(0.2)
        proc.send_signal(sig)  # the guest is booting
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == code, err
        assert not ours & domains()
        assert not {v for v in volumes() if v.split(".")[0].removesuffix("-seed") in ours}
        xml = junit.read_bytes()
        _validate(xml)
        suites = lxml_etree.fromstring(xml).findall("testsuite")
        assert [s.get("name") for s in suites] == ["no-such-image[bios]"]
    finally:
        proc.kill()
        for name in ours & domains():
            force_remove(name)
