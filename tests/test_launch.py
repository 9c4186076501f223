"""End-to-end launches through the real `qinst` entry point: real libvirtd, QEMU (TCG), real cloud-init.

One boot per scenario. Everything a test creates is removed, and the tests check that with virsh.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import RunQinst, qinst_argv, qinst_env
from guest import domains, force_remove, unique_name, volumes

pytestmark = [pytest.mark.vm, pytest.mark.libvirt]
BOOT = 900.0  # seconds a test allows one boot, far above the ~45 s a TCG boot takes here


def _nothing_left(name: str) -> None:
    assert name not in domains()
    assert not {v for v in volumes() if v.startswith(name)}
    assert not Path(f"/var/log/libvirt/qemu/{name}-console.log").exists()


def test_up_ssh_ls_stop_start_rm(qinst: RunQinst, vm_env: dict[str, str], ssh_key: Path, tmp_path: Path) -> None:
    name = unique_name("e2e")
    user_data = tmp_path / "user-data.yaml"
    user_data.write_text("#cloud-config\nruncmd:\n  - [sh, -c, 'echo \"ran: it''s #1: ok\" > /var/tmp/qinst-marker']\n")
    try:
        up = qinst(
            "up", "qinst-test", "--name", name, "--network", "user:restrict", "--ssh-key", str(ssh_key),
            "--user-data", str(user_data), "--disk", "4", "--timeout", str(BOOT), "--json",
            env=vm_env, timeout=BOOT + 60,
        )  # fmt: skip
        assert up.returncode == 0, up.stderr
        data = json.loads(up.stdout)
        assert data["name"] == name and data["ready"] is True and data["state"] == "running"
        assert data["ssh"]["host"] == "127.0.0.1" and data["ssh"]["user"] == "debian"
        assert isinstance(data["ssh"]["port"], int) and data["ssh"]["port"] > 1024
        timings = data["timings"]
        assert {"download", "define", "boot", "cloud-init", "ssh", "total"} <= set(timings)
        phases = sum(timings[k] for k in ("download", "define", "boot", "cloud-init", "ssh"))
        assert 0 < phases <= timings["total"] + 0.1 and timings["cloud-init"] > 0

        def ssh(*cmd: str) -> str:
            proc = qinst("ssh", name, "--", *cmd, env=vm_env, timeout=120)
            assert proc.returncode == 0, proc.stderr
            return proc.stdout

        assert ssh("cat", "/var/tmp/qinst-marker") == "ran: it's #1: ok\n"
        assert ssh("hostname").strip() == name
        assert "status: done" in ssh("cloud-init", "status", "--long")
        root_bytes = int(ssh("df", "-B1", "--output=size", "/").split()[-1])
        assert root_bytes > 3.5 * (1 << 30), "the root filesystem was not grown to --disk"
        known_hosts = Path(vm_env["QINST_CACHE_DIR"]) / "known_hosts" / name
        assert f"[127.0.0.1]:{data['ssh']['port']} ssh-ed25519 " in known_hosts.read_text()

        again = qinst("up", "qinst-test", "--name", name, "--network", "user", env=vm_env, timeout=120)
        assert again.returncode == 2 and "already exists" in again.stderr

        listed = json.loads(qinst("ls", "--json", env=vm_env).stdout)
        mine = next(i for i in listed if i["name"] == name)
        assert mine["state"] == "running" and mine["image"] == "qinst-test"
        assert mine["ssh"] == data["ssh"] and mine["digest"].startswith("sha512:")

        assert qinst("rm", name, env=vm_env).returncode == 2  # running: refused without --force
        stop = qinst("stop", name, env=vm_env, timeout=180)
        assert stop.returncode == 0, stop.stderr
        listed = json.loads(qinst("ls", "--json", env=vm_env).stdout)
        assert next(i for i in listed if i["name"] == name)["state"] == "shutoff"
        start = qinst("start", name, "--timeout", str(BOOT), env=vm_env, timeout=BOOT + 60)
        assert start.returncode == 0, start.stderr
        assert ssh("cat", "/var/tmp/qinst-marker").startswith("ran:")

        logs = qinst("logs", name, env=vm_env)
        assert logs.returncode == 0 and "Cloud-init v." in logs.stdout

        rm = qinst("rm", "--force", name, env=vm_env, timeout=120)
        assert rm.returncode == 0, rm.stderr
        _nothing_left(name)
        assert qinst("ssh", name, env=vm_env).returncode == 2
    finally:
        force_remove(name)


def test_failed_up_leaves_nothing(qinst: RunQinst, vm_env: dict[str, str], ssh_key: Path) -> None:
    name = unique_name("fail")
    before_volumes = volumes()
    try:
        huge = qinst(
            "up", "qinst-test", "--name", name, "--memory", str(64 << 20), "--network", "user:restrict",
            "--ssh-key", str(ssh_key), env=vm_env, timeout=300,
        )  # fmt: skip
        assert huge.returncode == 4, huge.stderr
        assert "Traceback" not in huge.stderr and huge.stderr.startswith("qinst: ")
        _nothing_left(name)

        bad_name = qinst("up", "qinst-test", "--name", "Bad_Name", env=vm_env)
        assert bad_name.returncode == 2 and "invalid instance name" in bad_name.stderr
        missing = qinst("up", "no-such-image", "--name", name, env=vm_env)
        assert missing.returncode == 3 and "unknown image" in missing.stderr
        bad_data = qinst("up", "qinst-test", "--name", name, "--user-data", "/nonexistent.yaml", env=vm_env)
        assert bad_data.returncode == 2
        _nothing_left(name)
        assert volumes() - before_volumes <= {v for v in volumes() if v.startswith("sha512-")}
    finally:
        force_remove(name)


def test_timeout_keeps_the_guest_for_inspection(qinst: RunQinst, vm_env: dict[str, str], ssh_key: Path) -> None:
    """The broken image (cloud-init disabled) boots but never becomes ready: exit 5, kept, then removable."""
    name = unique_name("slow")
    try:
        up = qinst(
            "up", "qinst-test-broken", "--name", name, "--network", "user:restrict", "--ssh-key", str(ssh_key),
            "--timeout", "25", env=vm_env, timeout=300,
        )  # fmt: skip
        assert up.returncode == 5, up.stderr
        assert "not ready within 25 s" in up.stderr and f"qinst rm {name}" in up.stderr
        assert name in domains()
        rm = qinst("rm", "--force", name, env=vm_env)
        assert rm.returncode == 0, rm.stderr
        _nothing_left(name)
    finally:
        force_remove(name)


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_during_up_removes_everything(vm_env: dict[str, str], ssh_key: Path, sig: int, code: int) -> None:
    """Ctrl-C, and SIGTERM (how CI cancels a job) alike: what `up` made is removed."""
    name = unique_name("intr")
    argv = [*qinst_argv(), "up", "qinst-test", "--name", name, "--network", "user:restrict", "--ssh-key", str(ssh_key)]
    proc = subprocess.Popen(argv, env=qinst_env(**vm_env), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while name not in domains():
            assert proc.poll() is None and time.monotonic() < deadline, "the domain never appeared"
            time.sleep(0.2)
        console = Path("/var/log/libvirt/qemu") / f"{name}-console.log"
        while "Linux version" not in (console.read_text(errors="replace") if console.exists() else ""):
            assert proc.poll() is None and time.monotonic() < deadline, "the guest's kernel never started"
            time.sleep(0.2)
        proc.send_signal(sig)  # well inside the boot: the kernel is running, cloud-init is not done
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == code, err
        assert "Traceback" not in err
        _nothing_left(name)
    finally:
        proc.kill()
        force_remove(name)


def test_doctor_reports_this_host(qinst: RunQinst, vm_env: dict[str, str]) -> None:
    text = qinst("doctor", env=vm_env, timeout=120)
    assert text.returncode == 0, text.stdout + text.stderr
    assert text.stdout.splitlines()[0].startswith("ok   libvirt")
    checks = {c["name"]: c for c in json.loads(qinst("doctor", "--json", env=vm_env, timeout=120).stdout)}
    assert checks["tcg"]["ok"] is True
    assert checks["kvm"]["detail"]
    caps = subprocess.run(["virsh", "-c", "qemu:///system", "capabilities"], capture_output=True, text=True).stdout
    if not Path("/dev/kvm").exists() or "type='kvm'" not in caps:
        assert checks["kvm"]["ok"] is False  # no KVM to offer: doctor must not claim it
    elif checks["kvm"]["ok"] is False:
        assert "falls back to TCG" in checks["kvm"]["hint"]  # offered but failing (these machines): said so
    assert {"libvirt", "pool", "networks", "qemu-img", "ssh"} <= set(checks)
