"""kvmverdict.py: the remembered KVM verdict (per host, QEMU and kernel; its file is untrusted input) and how
`up --accel auto` and `doctor` use it, on libvirt's test driver; and one real run on this host's KVM (VM)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import libvirt
import pytest
from conftest import RunQinst

from qemu_instances import doctor, kvmverdict, launch
from qemu_instances.domain import METADATA_KEY, METADATA_NS, Accel
from qemu_instances.host import Host
from testsupport.qinst import qinst_env
from testsupport.testdriver import TEST_URI, boot_plan, boot_run, driver_xml


def test_a_kvm_verdict_is_remembered_per_host_qemu_and_kernel(tmp_path: Path) -> None:
    key = kvmverdict.HostKey("qemu:///system", "7002022", "6.1.0-test")
    assert kvmverdict.recall(tmp_path, key) is None
    kvmverdict.remember(tmp_path, key, "failed to set MSR 0x10a")
    verdict = kvmverdict.recall(tmp_path, key)
    assert verdict is not None and verdict.reason == "failed to set MSR 0x10a"
    assert verdict.path.parent == tmp_path / kvmverdict.DIRECTORY
    assert [p.name for p in verdict.path.parent.iterdir()] == [verdict.path.name]  # no temporary left
    # Another QEMU, another kernel or another host knows nothing of it.
    assert kvmverdict.recall(tmp_path, kvmverdict.HostKey("qemu:///system", "8002000", "6.1.0-test")) is None
    assert kvmverdict.recall(tmp_path, kvmverdict.HostKey("qemu:///system", "7002022", "6.2.0")) is None
    assert kvmverdict.recall(tmp_path, kvmverdict.HostKey("qemu:///session", "7002022", "6.1.0-test")) is None
    assert kvmverdict.forget(tmp_path) == [verdict.path]
    assert kvmverdict.recall(tmp_path, key) is None


@pytest.mark.promise
def test_a_verdict_is_forgotten_on_any_change_of_the_qemu_version(tmp_path: Path) -> None:
    """libvirt's version number of QEMU (major x 1e6 + minor x 1e3 + micro): a new micro release may be the fix, so
    the verdict recorded under 8.2.1 is not recalled under 8.2.2, 8.3.1 or 9.2.1, and recalled under 8.2.1 again."""
    uri = "qemu:///system"
    kvmverdict.remember(tmp_path, kvmverdict.host_key(uri, 8_002_001, is_local=True), "failed to set MSR 0x10a")
    assert kvmverdict.recall(tmp_path, kvmverdict.host_key(uri, 8_002_001, is_local=True)) is not None
    for other in (8_002_002, 8_003_001, 9_002_001, 8_002_000):
        assert kvmverdict.recall(tmp_path, kvmverdict.host_key(uri, other, is_local=True)) is None, other
    # A remote host's key has no kernel; its QEMU version still decides.
    kvmverdict.remember(tmp_path, kvmverdict.host_key("qemu+ssh://h/system", 7_002_000, is_local=False), "paused")
    assert kvmverdict.recall(tmp_path, kvmverdict.host_key("qemu+ssh://h/system", 7_002_001, is_local=False)) is None


@pytest.mark.parametrize(
    "content",
    [
        b"not json",
        b"[1]",
        b"{}",
        json.dumps(
            {"kvm": "failed", "uri": "qemu:///other", "qemu": "1", "kernel": "k", "reason": "r", "recorded": "t"}
        ),
        json.dumps({"kvm": "failed", "uri": "u", "qemu": "1", "kernel": "k", "reason": 5, "recorded": "t"}),
        json.dumps({"kvm": "ok", "uri": "u", "qemu": "1", "kernel": "k", "reason": "r", "recorded": "t"}),
        json.dumps({"kvm": "failed", "uri": "u", "qemu": "1", "kernel": "k", "reason": "r" * 9000, "recorded": "t"}),
    ],
)
def test_a_verdict_file_is_untrusted_input(tmp_path: Path, content: str | bytes) -> None:
    key = kvmverdict.HostKey("u", "1", "k")
    folder = tmp_path / kvmverdict.DIRECTORY
    folder.mkdir()
    (folder / key.filename).write_bytes(content if isinstance(content, bytes) else content.encode())
    assert kvmverdict.recall(tmp_path, key) is None


def test_a_remembered_verdict_controls_reason_characters(tmp_path: Path) -> None:
    key = kvmverdict.HostKey("u", "1", "k")
    kvmverdict.remember(tmp_path, key, "bad\x1b[31m\nreason")
    verdict = kvmverdict.recall(tmp_path, key)
    assert verdict is not None and verdict.reason.isprintable() and "\x1b" not in verdict.reason


def test_up_auto_starts_under_tcg_with_one_notice_once_kvm_failed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="qinst")
    with Host(TEST_URI) as host:
        key = launch._kvm_key(host)
        assert key.uri == TEST_URI and key.kernel == os.uname().release
        kvmverdict.remember(tmp_path, key, "failed to set MSR 0x10a")
        t0 = time.monotonic()
        assert launch._accelerators(host, Accel.AUTO, tmp_path) == (Accel.TCG,)
        assert time.monotonic() - t0 < 1.0
        notices = [r.getMessage() for r in caplog.records if "KVM failed on this host before" in r.getMessage()]
        assert len(notices) == 1 and "MSR 0x10a" in notices[0] and "--reset-kvm" in notices[0]
        assert launch._accelerators(host, Accel.KVM, tmp_path) == (Accel.KVM,)  # a forced choice is kept


def test_boot_remembers_that_kvm_did_not_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from qemu_instances.launch import Launcher
    from qemu_instances.settings import Settings

    monkeypatch.setattr(launch, "domain_xml", driver_xml)  # the test driver refuses the KVM domain
    plan, spec = boot_plan(f"speed-kvm-{os.getpid()}", (Accel.KVM, Accel.TCG), wait=False)
    launcher = Launcher(Settings(connect=TEST_URI, cache_dir=tmp_path))
    with Host(TEST_URI) as host, contextlib.ExitStack() as undo:
        result = launcher._boot(boot_run(host, undo), plan, spec)
        assert result.instance.metadata.accel == "tcg"
        verdict = kvmverdict.recall(tmp_path, launch._kvm_key(host))
        assert verdict is not None and verdict.reason
        assert launch._accelerators(host, Accel.AUTO, tmp_path) == (Accel.TCG,)


def test_up_learns_from_an_instance_that_paused_under_kvm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`up --no-wait` returns before a KVM guest pauses (here ~15 s into its boot): the next `up` learns from it."""
    from qemu_instances.host import Domain, KvmStatus

    monkeypatch.setattr(Host, "kvm_available", lambda self, arch="x86_64": KvmStatus(True, "/dev/kvm answers"))
    name = f"speed-paused-{os.getpid()}"
    meta = "<instance><image>x</image><digest></digest><user>cloud</user><network>user</network>"
    meta += "<accel>kvm</accel></instance>"
    with Host(TEST_URI) as host:
        dom = host.conn.createXML(
            f"<domain type='test'><name>{name}</name><memory>65536</memory><os><type>hvm</type></os></domain>", 0
        )
        try:
            dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, meta, METADATA_KEY, METADATA_NS, 0)
            dom.suspend()  # paused by a user: no verdict
            assert launch._accelerators(host, Accel.AUTO, tmp_path) == (Accel.KVM, Accel.TCG)
            assert kvmverdict.recall(tmp_path, launch._kvm_key(host)) is None
            paused = host.paused_domains()
            assert [(d.name, by_user) for d, by_user in paused if d.name == name] == [(name, True)]
            # As libvirt reports a guest that KVM paused (reason "unknown" or an I/O error, not "user"):
            monkeypatch.setattr(Host, "paused_domains", lambda self: [(Domain(self, dom), False)])
            assert launch._accelerators(host, Accel.AUTO, tmp_path) == (Accel.TCG,)
            verdict = kvmverdict.recall(tmp_path, launch._kvm_key(host))
            assert verdict is not None and name in verdict.reason
        finally:
            dom.destroy()


def test_doctor_shows_the_verdict_and_reset_kvm_forgets_it(tmp_path: Path) -> None:
    with Host(TEST_URI) as host:
        kvmverdict.remember(tmp_path, launch._kvm_key(host), "failed to set MSR 0x10a")
    memo = next(c for c in doctor.run_checks(TEST_URI, tmp_path) if c.name == "kvm-memo")
    assert not memo.ok and not memo.required and "MSR 0x10a" in memo.detail and "--reset-kvm" in memo.hint
    env = qinst_env(XDG_CONFIG_HOME=str(tmp_path / "config"))
    args = [sys.executable, "-m", "qemu_instances", "--connect", TEST_URI, "--cache-dir", str(tmp_path), "doctor"]
    proc = subprocess.run([*args, "--reset-kvm"], capture_output=True, text=True, env=env, check=False)
    assert "forgot 1 remembered KVM verdict(s)" in proc.stderr, proc.stderr
    assert "nothing remembered" in proc.stdout
    assert proc.returncode == subprocess.run(args, capture_output=True, env=env, check=False).returncode


@pytest.mark.vm
@pytest.mark.libvirt
def test_a_real_kvm_failure_is_remembered_and_the_next_up_starts_under_tcg_at_once(
    qinst: RunQinst, vm_env: dict[str, str], ssh_key: Path
) -> None:
    """On these machines a KVM guest starts, then pauses ~15 s into its boot (emulation failure): the first
    `up --no-wait` returns before that; the next `up` learns from the paused instance, and the one after it reads
    the remembered verdict."""
    from guest import force_remove, unique_name

    cache = Path(vm_env["QINST_CACHE_DIR"])
    uri = vm_env["QINST_CONNECT"]
    kvmverdict.forget(cache)
    names = [unique_name("kvmmemo") for _ in range(3)]
    argv = ["--network", "user:restrict", "--ssh-key", str(ssh_key), "--no-wait", "--json"]  # --accel auto: default

    def state(name: str) -> str:
        return subprocess.run(["virsh", "-c", uri, "domstate", name], capture_output=True, text=True).stdout.strip()

    try:
        first = qinst("up", "qinst-test", "--name", names[0], *argv, env=vm_env, timeout=300)
        assert first.returncode == 0, first.stderr
        if json.loads(first.stdout)["accel"] != "kvm":
            pytest.skip(f"KVM is not tried on this host: {first.stderr.strip()}")
        deadline = time.monotonic() + 90
        while state(names[0]) != "paused" and time.monotonic() < deadline:
            time.sleep(2)
        if state(names[0]) != "paused":
            pytest.skip("a KVM guest runs on this host: nothing to remember")
        second = qinst("up", "qinst-test", "--name", names[1], *argv, env=vm_env, timeout=300)
        assert second.returncode == 0, second.stderr
        assert json.loads(second.stdout)["accel"] == "tcg"
        assert f"instance {names[0]} paused under KVM" in second.stderr and "qinst rm --force" in second.stderr
        with Host(uri) as host:
            verdict = kvmverdict.recall(cache, launch._kvm_key(host))
        assert verdict is not None and names[0] in verdict.reason
        force_remove(names[0])
        third = qinst("up", "qinst-test", "--name", names[2], *argv, env=vm_env, timeout=300)
        assert third.returncode == 0, third.stderr
        assert json.loads(third.stdout)["accel"] == "tcg"
        assert third.stderr.count("KVM failed on this host before") == 1, third.stderr
        assert "does not start under" not in third.stderr and "relaunching" not in third.stderr
        doctor_out = qinst("doctor", env=vm_env, timeout=120).stdout
        assert "kvm-memo" in doctor_out and "--reset-kvm" in doctor_out
    finally:
        for name in names:
            force_remove(name)
        kvmverdict.forget(cache)
