"""smoke.py: the retry loop of one image and the image x firmware matrix; a guest flooding the check session, and a
domain smoke did not create (libvirt's test driver, a fake `ssh`). The real boots are in test_cli_smoke.py."""

from __future__ import annotations

import json
import os
import resource
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from qemu_instances import smoke
from qemu_instances.host import Host
from qemu_instances.instances import Instance
from qemu_instances.settings import Settings
from qemu_instances.smoke import Job, SmokeOptions, _Runner
from qemu_instances.smokereport import ImageReport, Status
from qemu_instances.wait import Phase, Readiness
from testsupport.reports import report_with_timings, validate_junit
from testsupport.testdriver import TEST_URI, record_domain_xml, sample_record

lxml_etree = pytest.importorskip("lxml.etree")


def test_retries_report_a_flaky_pass_with_the_first_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The retry loop of one image (its boots stubbed: the real ones are in test_cli_smoke.py)."""
    import threading

    from qemu_instances.domain import Firmware
    from qemu_instances.settings import Settings
    from qemu_instances.smoke import Job, SmokeOptions, _Runner

    failing = report_with_timings("img", "uefi", {"boot": 3.0}, failed="cloud-init")
    passing = report_with_timings("img", "uefi", {"boot": 2.0})
    attempts = iter([failing, passing])
    keeps: list[bool] = []

    def attempt(self: _Runner, keep: bool) -> ImageReport:
        keeps.append(keep)
        return next(attempts)

    monkeypatch.setattr(_Runner, "_attempt", attempt)
    settings = Settings(connect="test:///default", cache_dir=tmp_path, config_dir=tmp_path)
    opts = SmokeOptions(retries=3, keep_failed=True)
    report = _Runner(settings, Job("img", Firmware.UEFI, "img-uefi"), opts, threading.Event()).run()
    assert report is passing and report.passed and report.flaky and report.attempts == 2
    assert report.first_failure == "cloud-init: expected exit 0, got 3"
    assert keeps == [False, False]  # only the last possible attempt keeps a failed guest
    from qemu_instances.junit import junit_xml

    props = {p.get("name"): p.get("value") for p in lxml_etree.fromstring(junit_xml([report])).iter("property")}
    assert props["flaky"] == "true" and props["attempts"] == "2" and props["first-failure"].startswith("cloud-init")


def test_the_matrix_is_every_image_under_every_firmware() -> None:
    from qemu_instances.domain import Firmware
    from qemu_instances.smoke import jobs

    todo = jobs(["debian-12", "debian-12", "ubuntu-24.04"], [Firmware.BIOS, Firmware.UEFI])
    assert [(j.image, str(j.firmware), j.label) for j in todo] == [
        ("debian-12", "bios", "debian-12-bios"),
        ("debian-12", "uefi", "debian-12-uefi"),
        ("debian-12", "bios", "debian-12-bios-2"),
        ("debian-12", "uefi", "debian-12-uefi-2"),
        ("ubuntu-24.04", "bios", "ubuntu-24-04-bios"),
        ("ubuntu-24.04", "uefi", "ubuntu-24-04-uefi"),
    ]


# -- a flooding guest, a domain smoke did not make ---------------------------------------------------------------------


@pytest.fixture
def fake_ssh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An `ssh` first on PATH that prints without end, as a hostile guest would through a real one."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "ssh"
    script.write_text("#!/bin/sh\nexec yes 'the guest talks and talks and talks'\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    return script


def test_a_guest_flooding_the_check_session_is_cut_at_the_cap(
    fake_ssh: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(smoke, "SESSION_OUTPUT", 16 << 20)
    runner = _Runner(Settings(connect=TEST_URI, cache_dir=tmp_path), Job("x", smoke.Firmware.BIOS, "x"),
                     SmokeOptions(), threading.Event())  # fmt: skip
    inst = Instance("web1", "running", sample_record())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    code, stdout, stderr = runner._session(inst, smoke.Batch({"check:a": ("true", 10.0)}))
    assert time.monotonic() - started < 60
    assert len(stdout) == 16 << 20 and code == 255
    assert "the guest sent more than 16 MiB over the SSH session; it was stopped" in stderr
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown < 96 << 10, f"memory grew by {grown} KiB"


def test_a_failed_smoke_attempt_never_removes_a_domain_it_did_not_create(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A domain with the very name smoke draws (a kept guest, another run's) survives this run's failed pull."""
    monkeypatch.setattr(smoke.secrets, "token_hex", lambda n: "deadbeef")
    name = "smoke-nosuch-deadbeef"
    with Host(TEST_URI) as host:
        dom = host.conn.defineXML(record_domain_xml(name, sample_record()))
        try:
            runner = _Runner(Settings(connect=TEST_URI, cache_dir=tmp_path), Job("nosuch", smoke.Firmware.BIOS, "x"),
                             SmokeOptions(), threading.Event())  # fmt: skip
            report = runner.run()
            assert not report.passed and report.instance == name
            assert host.lookup(name) is not None, "smoke removed a domain it did not create"
        finally:
            dom.undefine()


# -- several images and attempts through the runner, and every report -------------------------------------------------
#
# The guest side is scripted: a stand-in for Launcher.up defines a test-driver domain for each attempt (so that the
# runner's removal, or --keep-failed, acts on a real libvirt domain) and gives the attempt a port; a fake `ssh` first on
# PATH runs the real batch script in a real `sh` with GUEST set to that attempt's mode:
#   pass: every check passes; half: check `one` passes, `two` fails; fail: both fail;
#   cut: the session is cut after the first user check's result (ssh exit 255);
#   boom: the launch itself raises an unexpected exception; late: the guest never becomes ready.

USER_CHECKS = ['one=test "$GUEST" != fail', 'two=test "$GUEST" = pass']
FAKE_SSH = """#!/bin/sh
for a in "$@"; do case $a in Port=*) port=${a#Port=} ;; esac; last=$a; done
mode=$(cat "GUESTS/$port")
if [ "$mode" = cut ]; then
  GUEST=pass sh -c "$last" | head -n 3
  echo "Connection to 127.0.0.1 closed by remote host." >&2
  exit 255
fi
GUEST=$mode exec sh -c "$last"
"""


class Guests:
    """The scripted guests of one run: each image's mode per attempt, and every attempt's instance name."""

    def __init__(self, host: Host, folder: Path, modes: dict[str, list[str]]) -> None:
        self.host = host
        self.folder = folder
        self.modes = {image: list(m) for image, m in modes.items()}
        self.launched: dict[str, list[str]] = {}
        self.lock = threading.Lock()
        self.port = 20000

    def up(self, request: Any, *, readiness: Readiness, **_: Any) -> Any:
        from qemu_instances.errors import GuestTimeout

        with self.lock:
            mode = self.modes[request.image].pop(0)
            self.launched.setdefault(request.image, []).append(request.name)
            self.port += 1
            port = self.port
        if mode == "boom":
            raise RuntimeError("a bug in the launcher")
        (self.folder / str(port)).write_text(mode)
        meta = sample_record(ssh_port=port, instance_id=f"iid-{port}")
        self.host.conn.defineXML(record_domain_xml(request.name, meta))
        readiness.mark(Phase.RUNNING)
        readiness.mark(Phase.KERNEL)
        if mode == "late":
            raise GuestTimeout("the guest was not ready within 1 s (reached: running, kernel)")
        readiness.mark(Phase.CLOUD_INIT)
        readiness.mark(Phase.SSH)
        return SimpleNamespace(instance=Instance(request.name, "running", meta), profile={})


def smoke_domains(host: Host) -> set[str]:
    return {n for n in host.conn.listDefinedDomains() if n.startswith("smoke-")}


@pytest.fixture
def guests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[dict[str, list[str]]], Guests]]:
    from qemu_instances.images import ImageStore

    folder = tmp_path / "guests"
    folder.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text(FAKE_SSH.replace("GUESTS", str(folder)))
    (bin_dir / "ssh").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setattr(ImageStore, "resolve", lambda self, image, arch: image)
    monkeypatch.setattr(ImageStore, "pull", lambda self, ref, latest: SimpleNamespace(digest="sha256:" + "0" * 64))
    # test:///default keeps its domains while a connection to it is open: this one, for the whole test.
    host = Host(TEST_URI).__enter__()
    before = smoke_domains(host)

    def make(modes: dict[str, list[str]]) -> Guests:
        run = Guests(host, folder, modes)
        monkeypatch.setattr(smoke, "Launcher", lambda settings, store: SimpleNamespace(up=run.up))
        return run

    yield make
    for name in smoke_domains(host) - before:
        host.conn.lookupByName(name).undefine()
    host.__exit__(None, None, None)


def smoke_run(tmp_path: Path, images: list[str], **options: Any) -> tuple[list[ImageReport], Path]:
    """run_smoke over the images with the user checks, the built-in ones skipped; every report written to out/."""
    from qemu_instances.checks import BUILTIN

    out = tmp_path / "out"
    opts = smoke.build_options(check=USER_CHECKS, skip=[c.name for c in BUILTIN], parallel=2, **options)
    settings = Settings(connect=TEST_URI, cache_dir=tmp_path / "cache", config_dir=tmp_path)
    reports = smoke.run_smoke(settings, images, opts)
    out.mkdir(exist_ok=True)
    smoke.write_reports(reports, junit=out / "report.xml", summary=out / "summary.md", artifacts=out, baseline=None)
    return reports, out


def by_name(report: ImageReport) -> dict[str, Any]:
    return {c.name: c for c in report.checks}


@pytest.mark.promise
def test_several_images_and_attempts_reach_every_report(tmp_path: Path, guests: Any) -> None:
    """--retries 2 --keep-failed over an image failing every attempt, one failing twice (two ways) then passing, and
    one passing at once: each report says which failed, which was flaky and why it first failed; only the last attempt
    of the failed image is kept."""
    run = guests({"bad": ["fail", "fail", "fail"], "flaky": ["fail", "half", "pass"], "good": ["pass"]})
    reports, out = smoke_run(tmp_path, ["bad", "flaky", "good"], retries=2, keep_failed=True)
    bad, flaky, good = reports
    assert [r.suite for r in reports] == ["bad[bios]", "flaky[bios]", "good[bios]"]
    assert [(r.passed, r.flaky, r.attempts) for r in reports] == [(False, False, 3), (True, True, 3), (True, False, 1)]
    assert [len(run.launched[i]) for i in ("bad", "flaky", "good")] == [3, 3, 1]
    assert flaky.first_failure.startswith("one: ")  # the first attempt's first failed check, not the second's
    assert bad.first_failure.startswith("one: ")
    assert [c.name for c in bad.failed] == ["one", "two"] and not flaky.failed and not good.failed
    # What is left: the failed image's last attempt, kept; every other attempt's instance removed.
    assert smoke_domains(run.host) == {run.launched["bad"][-1]} and bad.kept and not flaky.kept and not good.kept

    data = json.loads((out / "results.json").read_text())
    assert data["passed"] is False
    assert [(r["suite"], r["passed"], r["flaky"], r["attempts"]) for r in data["results"]] == [
        ("bad[bios]", False, False, 3), ("flaky[bios]", True, True, 3), ("good[bios]", True, False, 1),
    ]  # fmt: skip
    assert data["results"][1]["first_failure"].startswith("one: ")

    xml = (out / "report.xml").read_bytes()
    validate_junit(xml)
    root = lxml_etree.fromstring(xml)
    suites = root.findall("testsuite")
    assert root.get("failures") == "2" and [s.get("failures") for s in suites] == ["2", "0", "0"]
    assert root.get("tests") == str(sum(int(s.get("tests")) for s in suites))
    props = [{p.get("name"): p.get("value") for p in s.iter("property")} for s in suites]
    assert "flaky" not in props[0] and props[0]["attempts"] == "3"
    assert props[1]["flaky"] == "true" and props[1]["first-failure"].startswith("one: ")
    assert "flaky" not in props[2] and "attempts" not in props[2]

    summary = (out / "summary.md").read_text()
    assert "2 of 3 passed." in summary
    bad_row = next(line for line in summary.splitlines() if line.startswith("| bad[bios] |"))
    assert "**FAILED**" in bad_row and "one: " in bad_row and "two: " in bad_row
    assert "| flaky[bios] | passed (flaky: 3 attempts) |" in summary


@pytest.mark.promise
def test_a_run_where_every_image_passes_says_so_and_leaves_nothing(tmp_path: Path, guests: Any) -> None:
    run = guests({"a": ["pass"], "b": ["fail", "pass"]})
    reports, out = smoke_run(tmp_path, ["a", "b"], retries=1, keep_failed=True)
    assert [r.passed for r in reports] == [True, True]
    assert json.loads((out / "results.json").read_text())["passed"] is True
    assert (
        len(run.launched["b"]) == 2 and smoke_domains(run.host) == set()
    )  # passed guests removed, --keep-failed or not


@pytest.mark.promise
def test_a_check_the_cut_session_never_answered_fails_the_image(tmp_path: Path, guests: Any) -> None:
    """The SSH session ends after check `one`'s result: `two` never ran, so it cannot pass and is not skipped."""
    run = guests({"cut": ["cut"]})
    (report,), out = smoke_run(tmp_path, ["cut"])
    checks = by_name(report)
    assert checks["one"].status is Status.PASSED
    assert checks["two"].status is Status.FAILED
    assert checks["two"].message == (
        "no result: the session ended before this check (ssh exit 255: Connection to 127.0.0.1 closed by remote host.)"
    )
    assert not report.passed and json.loads((out / "results.json").read_text())["passed"] is False
    assert run.launched["cut"] and smoke_domains(run.host) == set()


@pytest.mark.promise
def test_one_images_unexpected_fault_never_stops_the_others(tmp_path: Path, guests: Any) -> None:
    run = guests({"boom": ["boom"], "late": ["late"], "good": ["pass"]})
    boom, late, good = smoke_run(tmp_path, ["boom", "late", "good"])[0]
    assert by_name(boom)["smoke"].message == "the smoke run itself failed: RuntimeError: a bug in the launcher"
    assert not boom.passed and not late.passed and good.passed
    assert run.launched["late"] and smoke_domains(run.host) == set()  # the guest never ready is removed too


@pytest.mark.promise
def test_an_artifact_whose_command_fails_or_times_out_is_named_never_dropped(
    tmp_path: Path, guests: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--artifacts over two images: a command that fails (its output so far kept, the command, exit status and stderr
    said in the file, results.json and the summary), one that times out, one that works."""
    monkeypatch.setattr(
        smoke,
        "ARTIFACTS",
        {
            "journal.log": 'echo "journal of $GUEST"',
            "systemd-analyze-blame.txt": "echo 1.2s slow.service; echo 'Failed to connect to bus' >&2; exit 1",
            "cloud-init.log": "exec timeout 0.1 sleep 30",
        },
    )
    guests({"a": ["pass"], "b": ["half"]})
    reports, out = smoke_run(tmp_path, ["a", "b"], artifacts=tmp_path / "out")
    data = json.loads((out / "results.json").read_text())
    summary = (out / "summary.md").read_text()
    for report, result in zip(reports, data["results"], strict=True):
        folder = out / f"{report.image}-bios"
        assert (folder / "journal.log").read_text() == f"journal of {'pass' if report.image == 'a' else 'half'}\n"
        blame = (folder / "systemd-analyze-blame.txt").read_text()
        assert blame.startswith("1.2s slow.service\n")
        assert "exited 1 after" in blame and "Failed to connect to bus" in blame and "systemd-analyze" not in blame
        assert "`echo 1.2s slow.service;" in blame  # the command that failed
        assert "timed out" in (folder / "cloud-init.log").read_text()
        errors = result["artifact_errors"]
        assert set(errors) == {"systemd-analyze-blame.txt", "cloud-init.log"}
        assert (
            "exited 1" in errors["systemd-analyze-blame.txt"]
            and "Failed to connect to bus" in errors["systemd-analyze-blame.txt"]
        )
        assert "timed out" in errors["cloud-init.log"]
        assert f"- {report.suite}: systemd-analyze-blame.txt: " in summary
        assert f"- {report.suite}: cloud-init.log: " in summary
