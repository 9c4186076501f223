"""`qinst smoke` through the real entry point: its options checked before anything boots, reports that parse whatever
the image names, and real boots: a parallel run of a good and a broken image, a BIOS+UEFI matrix, interruptions,
and a run on a remote (qemu+ssh://) host."""

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
from conftest import RunQinst, one_clear_error
from guest import domains, force_remove, volumes

from qemu_instances.smokereport import SCHEMA
from testsupport.qinst import qinst_argv, qinst_env
from testsupport.reports import validate_junit
from testsupport.sshd import Sshd

lxml_etree = pytest.importorskip("lxml.etree")


def test_smoke_parallel_zero(qinst: RunQinst, offline_env: dict[str, str]) -> None:
    one_clear_error(qinst("smoke", "debian-12", "--parallel", "0", env=offline_env), 2, "--parallel")


def test_smoke_junit_in_a_missing_folder_is_refused_before_booting(
    qinst: RunQinst, offline_env: dict[str, str]
) -> None:
    one_clear_error(qinst("smoke", "debian-12", "--junit", "/nonexistent/r.xml", env=offline_env), 2, "--junit")


@pytest.mark.parametrize("where", ["/proc/qinst-artifacts", "FILE/sub"])
def test_smoke_unwritable_artifacts_is_refused_before_booting(
    qinst: RunQinst, offline_env: dict[str, str], tmp_path: Path, where: str
) -> None:
    (tmp_path / "FILE").write_text("a file, not a folder")
    path = where if where.startswith("/") else str(tmp_path / where)
    one_clear_error(qinst("smoke", "debian-12", "--artifacts", path, env=offline_env), 2, "--artifacts")


@pytest.mark.libvirt
def test_smoke_refuses_bad_options_at_once(qinst: RunQinst, tmp_path: Path) -> None:
    env = {"QINST_CONNECT": "test:///default", "QINST_CACHE_DIR": str(tmp_path / "cache"), "HOME": str(tmp_path)}
    bad_toml = tmp_path / "checks.toml"
    bad_toml.write_text('[[check]]\nname = "x"\nrun = "true"\nnot_stdout = ["[unclosed"]\n')
    unwritable = tmp_path / "ro"
    unwritable.mkdir(mode=0o500)
    cases = [
        (["--junit", "/nonexistent/r.xml"], "--junit: folder /nonexistent does not exist"),
        (["--summary", str(tmp_path)], "is a folder, not a file"),
        (["--artifacts", "/proc/qinst-smoke"], "--artifacts: cannot make folder /proc/qinst-smoke"),
        (["--checks", str(bad_toml)], f"{bad_toml}: check[0] (x).not_stdout: invalid regular expression"),
        (["--skip", "nope"], "--skip 'nope': no such check"),
        (["--check", "nonsense"], "expected NAME=COMMAND"),
        (["--firmware", "bios,coreboot"], "'coreboot' is not one of"),
        (["--baseline", str(bad_toml)], "not JSON"),
        (["--allow-warning", "("], "--allow-warning: invalid regular expression"),
        (["--regression-threshold", "nan"], "--regression-threshold"),
    ]
    if subprocess.run(["id", "-u"], capture_output=True, text=True).stdout.strip() != "0":
        cases.append((["--junit", str(unwritable / "r.xml")], "cannot write in"))  # root writes anywhere
    for args, message in cases:
        run = qinst("smoke", "qinst-test", *args, env=env, timeout=30)
        assert run.returncode == 2, (args, run.stderr)
        assert message in run.stderr, (args, run.stderr)
        assert "Traceback" not in run.stderr
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.qcow2"))


@pytest.mark.libvirt
def test_report_parses_whatever_the_image_names(tmp_path: Path) -> None:
    """`smoke $'bad\\x01name'` and `$'bad\\xffname'`: the run goes on, the JUnit report and summary are written
    and parse (libvirt's test driver: these names never reach a boot)."""
    from conftest import qinst_argv, qinst_env

    junit, summary = tmp_path / "r.xml", tmp_path / "s.md"
    env = qinst_env(QINST_CONNECT="test:///default", QINST_CACHE_DIR=str(tmp_path / "cache"), HOME=str(tmp_path))
    argv: list[str | bytes] = [*qinst_argv(), "smoke", b"bad\x01name", b"bad\xffname", "debian-12\x1b[31m"]
    argv += ["--junit", str(junit), "--summary", str(summary), "--json"]
    proc = subprocess.run(argv, capture_output=True, env=env, timeout=60, check=False)
    assert proc.returncode == 6, proc.stderr
    assert b"Traceback" not in proc.stderr
    xml = junit.read_bytes()
    validate_junit(xml)
    root = lxml_etree.fromstring(xml)
    names = [s.get("name") for s in root.findall("testsuite")]
    assert names == ["badname[bios]", "badname[bios]", "debian-12[bios]"]
    assert all(s.find("testcase[@name='pull']/failure") is not None for s in root.findall("testsuite"))
    data = json.loads(proc.stdout)
    assert data["schema"] == SCHEMA and len(data["results"]) == 3
    md = summary.read_text()
    assert md.count("**FAILED**") == 3 and "\x1b" not in md and "\x01" not in md


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
    # The architecture matrix: one entry, both builds (the x86_64 guest native-speed TCG, the aarch64 one emulated
    # on the virt machine under UEFI, waited for EMULATED times longer by default).
    arches = _start(tmp / "arches", "qinst-test", "--arch", "x86_64,aarch64", "--accel", "tcg", env=vm_env)
    try:
        for run in (broken, nightly, allowed, arches):
            run.wait(timeout=3600 if run is arches else 1200)
        yield {"nightly": nightly, "allowed": allowed, "broken": broken, "arches": arches}
    finally:
        for run in (nightly, allowed, broken, arches):
            run.proc.kill()
        for name in {d for d in domains() - before if d.startswith("smoke-qinst-test")}:
            force_remove(name)


def _instances(run: Run) -> set[str]:
    return {r["instance"] for r in json.loads(run.stdout)["results"]}


def _suites(run: Run) -> dict[str, Any]:
    xml = (run.dir / "r.xml").read_bytes()
    validate_junit(xml)
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
def test_arch_matrix_boots_the_x86_64_and_the_aarch64_build(runs: dict[str, Run]) -> None:
    """`smoke IMAGE --arch x86_64,aarch64`: two passing suites, the arm64 one under UEFI on the PL011 console, each
    guest running its own architecture."""
    run = runs["arches"]
    assert run.proc.returncode == 0, run.stderr
    suites = _suites(run)
    assert set(suites) == {"qinst-test[bios]", "qinst-test[aarch64,uefi]"}
    for name, suite in suites.items():
        assert suite.get("failures") == "0" and suite.get("errors") == "0", (name, run.stderr)
    results = {r["suite"]: r for r in json.loads(run.stdout)["results"]}
    assert results["qinst-test[aarch64,uefi]"]["arch"] == "aarch64" and results["qinst-test[bios]"]["arch"] == "x86_64"
    assert all(r["passed"] for r in results.values())
    arm = (run.dir / "artifacts" / "qinst-test-aarch64-uefi" / "console.log").read_text(errors="replace")
    # Debian's kernels name their architecture: cloud-arm64 booted on the PL011, cloud-amd64 on the 16550.
    assert "Linux version" in arm and "-cloud-arm64 " in arm and "Cloud-init v." in arm and "finished at" in arm
    x86 = (run.dir / "artifacts" / "qinst-test-bios" / "console.log").read_text(errors="replace")
    assert "-cloud-amd64 " in x86 and "-cloud-arm64" not in x86


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
    # All checks of one guest run over one SSH session (tests/test_checks.py proves the batch); its time is
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
        validate_junit(xml)
        suites = lxml_etree.fromstring(xml).findall("testsuite")
        assert [s.get("name") for s in suites] == ["no-such-image[bios]"]
    finally:
        proc.kill()
        for name in ours & domains():
            force_remove(name)


# -- a remote host (qemu+ssh:// through an sshd on 127.0.0.1) ----------------------------------------------------------


@pytest.mark.vm
@pytest.mark.libvirt
def test_remote_smoke(qinst: RunQinst, vm_env: dict[str, str], sshd: Sshd, tmp_path: Path) -> None:
    env = {**vm_env, "QINST_CONNECT": sshd.uri}
    run = qinst("smoke", "qinst-test", "--timeout", "900", "--json", env=env, timeout=1200)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)["results"][0]
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    assert report["passed"] and set(statuses.values()) <= {"passed", "skipped"}, statuses
    assert list(statuses.values()).count("passed") >= 5, statuses  # the built-in checks ran and passed
    # Its own instance is gone (other smoke runs on this libvirtd, a developer's beside CI's, are not ours to judge).
    assert report["instance"].startswith("smoke-qinst-test-") and report["instance"] not in domains()
