"""smoke.py: the retry loop of one image and the image x firmware matrix; a guest flooding the check session, and a
domain smoke did not create (libvirt's test driver, a fake `ssh`). The real boots are in test_cli_smoke.py."""

from __future__ import annotations

import resource
import threading
import time
from pathlib import Path

import pytest

from qemu_instances import smoke
from qemu_instances.host import Host
from qemu_instances.instances import Instance
from qemu_instances.settings import Settings
from qemu_instances.smoke import Job, SmokeOptions, _Runner
from qemu_instances.smokereport import ImageReport
from testsupport.reports import report_with_timings
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
