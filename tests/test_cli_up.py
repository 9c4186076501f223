"""`qinst up` through the real entry point, and the life of what it made (ssh, ls, stop, start, logs, rm): real
libvirtd, QEMU (TCG), real cloud-init. Also what `up` refuses before anything is made, `kill -9` of `up` at each
phase, a taken SSH port, cloud-init errors, and a remote (qemu+ssh://) host.

One boot per scenario (the two cloud-init-errors tests share one). Everything a test creates is removed, and the
tests check that with virsh.
"""

from __future__ import annotations

import json
import select
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import RunQinst, one_clear_error
from guest import domains, force_remove, unique_name, volumes

from qemu_instances import cli, launch
from testsupport.qinst import qinst_argv, qinst_env
from testsupport.sshd import Sshd
from testsupport.testdriver import run_qinst

BOOT = 900.0  # seconds a test allows one boot, far above the ~45 s a TCG boot takes here


def _nothing_left(name: str) -> None:
    assert name not in domains()
    assert not {v for v in volumes() if v.startswith(name)}
    assert not Path(f"/var/log/libvirt/qemu/{name}-console.log").exists()


@pytest.mark.vm
@pytest.mark.libvirt
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


@pytest.mark.vm
@pytest.mark.libvirt
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


@pytest.mark.vm
@pytest.mark.libvirt
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


@pytest.mark.vm
@pytest.mark.libvirt
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


# -- refused before anything is made -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option", [["--cpus", "0"], ["--memory", "-1"], ["--memory", "0"], ["--disk", "0"], ["--ssh-port", "0"],
               ["--ssh-port", "70000"]]
)  # fmt: skip
def test_up_sizes_out_of_range(qinst: RunQinst, offline_env: dict[str, str], option: list[str]) -> None:
    one_clear_error(qinst("up", "debian-12", *option, env=offline_env), 2, option[0])


def test_up_refuses_a_private_key_others_can_read_before_anything_is_made(tmp_path: Path) -> None:
    key = tmp_path / "id"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    key.chmod(0o644)
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M"], check=True)
    proc = run_qinst("test:///nonexistent-qinst-must-not-connect", tmp_path, "up", str(image), "--ssh-key", str(key))
    assert proc.returncode == 2, proc.stderr
    assert f"the private key {key} is readable by others (mode 0644)" in proc.stderr
    assert f"hint: chmod 600 {key}" in proc.stderr


# -- a taken SSH port --------------------------------------------------------------------------------------------------


@contextmanager
def held_port() -> Iterator[int]:
    """A port another program is listening on, for as long as the block runs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


@pytest.mark.promise
@pytest.mark.vm
@pytest.mark.libvirt
def test_up_with_a_taken_ssh_port_is_a_usage_error(qinst: RunQinst, vm_env: dict[str, str], ssh_key: Path) -> None:
    name = unique_name("port")
    try:
        with held_port() as port:
            up = qinst(
                "up", "qinst-test", "--name", name, "--network", "user:restrict", "--ssh-port", str(port),
                "--ssh-key", str(ssh_key), "--no-wait", env=vm_env, timeout=300,
            )  # fmt: skip
        assert up.returncode == 2, up.stderr
        assert f"port {port} on 127.0.0.1 is already in use" in up.stderr
        assert "Traceback" not in up.stderr
        assert name not in domains()
        assert not {v for v in volumes() if v.startswith(name)}
    finally:
        force_remove(name)


@pytest.mark.promise
@pytest.mark.vm
@pytest.mark.libvirt
def test_up_retries_when_the_picked_port_is_taken_before_qemu_binds_it(
    vm_env: dict[str, str], ssh_key: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """In-process `qinst up`: the port picker's first answer is a port this test holds."""
    for key, value in qinst_env(**vm_env).items():
        monkeypatch.setenv(key, value)
    name = unique_name("retry")
    real = launch.free_port
    picked: list[int] = []
    try:
        with held_port() as taken:
            answers = iter([taken])

            def pick() -> int:
                picked.append(next(answers, 0) or real())
                return picked[-1]

            monkeypatch.setattr(launch, "free_port", pick)
            with pytest.raises(SystemExit) as exit_:
                cli.main(
                    ["up", "qinst-test", "--name", name, "--network", "user:restrict", "--ssh-key", str(ssh_key),
                     "--no-wait", "--json"]
                )  # fmt: skip
            out = capsys.readouterr()
            assert exit_.value.code in (0, None), out.err
            assert "does not start under KVM" not in out.err  # a taken port is not a KVM failure
        result = json.loads(out.out)
        assert picked[0] == taken and len(picked) == 2
        assert result["ssh"]["port"] == picked[1] != taken
        assert name in domains()
    finally:
        force_remove(name)


# -- kill -9 of `qinst up` at each phase -------------------------------------------------------------------------------


def _kill_up_at(phase: str, name: str, env: dict[str, str], ssh_key: Path) -> None:
    argv = [
        *qinst_argv(), "up", "qinst-test", "--name", name, "--network", "user:restrict", "--ssh-key", str(ssh_key),
        "--disk", "3", "--memory", "512", "--timeout", str(BOOT),
    ]  # fmt: skip
    proc = subprocess.Popen(
        argv, env=qinst_env(**env, QINST_TEST_PAUSE_AT=phase), stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    seen = []
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stderr], [], [], 5)
            line = proc.stderr.readline() if ready else ""
            seen.append(line)
            if line.strip() == f"qinst: test pause at {phase}":
                break
            if proc.poll() is not None:
                pytest.fail(f"up ended (exit {proc.returncode}) before phase {phase}:\n{''.join(seen)}")
        else:
            pytest.fail(f"up did not reach phase {phase}:\n{''.join(seen)}")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _listed(qinst: RunQinst, env: dict[str, str], name: str) -> dict[str, object]:
    proc = qinst("ls", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    mine = [row for row in json.loads(proc.stdout) if row["name"] == name]
    assert len(mine) == 1, proc.stdout
    return dict(mine[0])


@pytest.mark.vm
@pytest.mark.libvirt
@pytest.mark.parametrize(
    ("phase", "state", "rm"),
    [
        ("overlay", "orphan", ["rm"]),
        ("seed", "orphan", ["rm"]),
        ("define", "shutoff", ["rm"]),
        ("wait", "running", ["rm", "--force"]),
    ],
)
def test_kill_up_at_each_phase_then_ls_and_rm(
    qinst: RunQinst, vm_env: dict[str, str], ssh_key: Path, phase: str, state: str, rm: list[str]
) -> None:
    name = unique_name(f"kill-{phase}")
    console = Path(f"/var/log/libvirt/qemu/{name}-console.log")
    try:
        _kill_up_at(phase, name, vm_env, ssh_key)
        mine = {v for v in volumes() if v.startswith(name)}
        expected = {f"{name}.qcow2"} if phase == "overlay" else {f"{name}.qcow2", f"{name}-seed.iso"}
        assert mine == expected
        assert (name in domains()) == (phase in ("define", "wait"))
        if phase == "wait":
            assert console.exists()

        row = _listed(qinst, vm_env, name)
        assert row["state"] == state
        if state == "orphan":
            assert set(row["volumes"]) == expected  # type: ignore[arg-type]

        removed = qinst(*rm, name, env=vm_env, timeout=120)
        assert removed.returncode == 0, removed.stderr
        for vol in expected:
            assert f"volume {vol}" in removed.stderr
        assert name not in domains()
        assert not {v for v in volumes() if v.startswith(name)}
        assert not console.exists() and not console.with_name(f"{name}.log").exists()
        assert name not in {row["name"] for row in json.loads(qinst("ls", "--json", env=vm_env).stdout)}
    finally:
        force_remove(name)


# -- cloud-init errors -------------------------------------------------------------------------------------------------


LOADED_BOOT = 2400.0  # the shared test machine can be very loaded: far above the ~1 min a TCG boot takes alone
FAILING_USER_DATA = "#cloud-config\nruncmd:\n  - [sh, -c, 'echo qinst-runcmd-fails; exit 3']\n"


def _run(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*qinst_argv(), *args], capture_output=True, text=True, env=qinst_env(**env), stdin=subprocess.DEVNULL,
        timeout=timeout, check=False,
    )  # fmt: skip


def _up(
    name: str, env: dict[str, str], ssh_key: Path, user_data: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    return _run(
        "up", "qinst-test", "--name", name, "--network", "user:restrict", "--ssh-key", str(ssh_key),
        "--user-data", str(user_data), "--disk", "3", "--accel", "tcg", "--timeout", str(LOADED_BOOT), *extra,
        env=env, timeout=LOADED_BOOT + 120,
    )  # fmt: skip


@pytest.fixture(scope="module")
def failed_up(
    vm_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, subprocess.CompletedProcess[str]]]:
    """One boot with a runcmd that exits 3."""
    work = tmp_path_factory.mktemp("cloud-init-errors")
    key = work / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    user_data = work / "user-data"
    user_data.write_text(FAILING_USER_DATA)
    name = unique_name("ci-err")
    try:
        yield name, _up(name, vm_env, key.with_suffix(".pub"), user_data)
    finally:
        force_remove(name)


@pytest.mark.vm
@pytest.mark.libvirt
def test_up_exits_5_naming_the_module_and_the_guest_stays_reachable(
    failed_up: tuple[str, subprocess.CompletedProcess[str]], vm_env: dict[str, str]
) -> None:
    name, up = failed_up
    assert up.returncode == 5, up.stderr
    assert "cloud-init finished with errors in module(s) scripts" in up.stderr, up.stderr
    assert f"'qinst ssh {name}' works" in up.stderr, up.stderr
    ssh = _run("ssh", name, "--", "cat", "/run/cloud-init/result.json", env=vm_env)
    assert ssh.returncode == 0, ssh.stderr
    assert json.loads(ssh.stdout)["v1"]["errors"]
    listed = [r for r in json.loads(_run("ls", "--json", env=vm_env).stdout) if r["name"] == name]
    assert listed[0]["state"] == "running" and listed[0]["ssh"]["host"] == "127.0.0.1"
    rm = _run("rm", "--force", name, env=vm_env)
    assert rm.returncode == 0, rm.stderr
    assert name not in domains() and not {v for v in volumes() if v.startswith(name)}


@pytest.mark.vm
@pytest.mark.libvirt
def test_up_ignore_cloud_init_errors_succeeds_with_a_warning(
    vm_env: dict[str, str], ssh_key: Path, tmp_path: Path
) -> None:
    user_data = tmp_path / "user-data"
    user_data.write_text(FAILING_USER_DATA)
    name = unique_name("ci-ign")
    try:
        up = _up(name, vm_env, ssh_key, user_data, "--ignore-cloud-init-errors")
        assert up.returncode == 0, up.stderr
        assert "qinst: warning: cloud-init finished with errors in module(s) scripts" in up.stderr, up.stderr
        assert "--ignore-cloud-init-errors" in up.stderr and f"{name} is ready" in up.stderr, up.stderr
        ssh = _run("ssh", name, "--", "true", env=vm_env)
        assert ssh.returncode == 0, ssh.stderr
    finally:
        force_remove(name)


# -- a remote host (qemu+ssh:// through an sshd on 127.0.0.1) ----------------------------------------------------------


POOL_DIR = Path("/var/lib/libvirt/images/qinst")


def _base_volume_state() -> dict[str, float]:
    return {p.name: p.stat().st_mtime for p in POOL_DIR.glob("sha512-*")}


@pytest.mark.vm
@pytest.mark.libvirt
def test_remote_up_ssh_ls_logs_rm_and_reuse(qinst: RunQinst, vm_env: dict[str, str], sshd: Sshd, ssh_key: Path) -> None:
    env = {**vm_env, "QINST_CONNECT": sshd.uri}
    first, second = unique_name("rem"), unique_name("rem2")
    try:
        up = qinst(
            "up", "qinst-test", "--name", first, "--network", "user:restrict", "--ssh-key", str(ssh_key),
            "--timeout", "900", "--json", env=env, timeout=1000,
        )  # fmt: skip
        assert up.returncode == 0, up.stderr
        assert json.loads(up.stdout)["ready"] is True
        hostname = qinst("ssh", first, "--", "hostname", env=env, timeout=120)  # through the host: ssh -W
        assert hostname.returncode == 0 and hostname.stdout.strip() == first, hostname.stderr
        listed = json.loads(qinst("ls", "--json", env=env).stdout)
        assert [i["name"] for i in listed if i["name"] == first] == [first]
        logs = qinst("logs", first, env=env, timeout=120)
        assert logs.returncode == 0 and "Cloud-init v." in logs.stdout  # downloaded as a pool volume

        uploaded = _base_volume_state()
        assert any(name.endswith(".verified") for name in uploaded)
        again = qinst(
            "up", "qinst-test", "--name", second, "--network", "user:restrict", "--ssh-key", str(ssh_key),
            "--no-wait", "--json", env=env, timeout=300,
        )  # fmt: skip
        assert again.returncode == 0, again.stderr
        assert _base_volume_state() == uploaded, "the second up uploaded the base image again"

        for name in (first, second):
            rm = qinst("rm", "--force", name, env=env, timeout=120)
            assert rm.returncode == 0, rm.stderr
            assert name not in domains()
            assert not {v for v in volumes() if v.startswith(name)}
    finally:
        force_remove(first)
        force_remove(second)
        for marker in POOL_DIR.glob("*.verified"):
            subprocess.run(["virsh", "-q", "vol-delete", "--pool", "qinst", marker.name], check=False)


@pytest.mark.vm
@pytest.mark.libvirt
def test_up_an_arm64_guest_on_this_x86_host(qinst: RunQinst, vm_env: dict[str, str], ssh_key: Path) -> None:
    """`up IMAGE --arch aarch64` on an x86_64 host: emulated (TCG, said once, no KVM start tried), UEFI on the virt
    machine; ready means cloud-init finished and the host key read from the PL011 console answers; `ssh` runs an
    aarch64 userland; `logs` shows that console; `rm` leaves nothing."""
    name = unique_name("arm")
    try:
        up = qinst("up", "qinst-test", "--arch", "arm64", "--name", name, "--network", "user", "--ssh-key",
                   str(ssh_key), "--json", env=vm_env, timeout=3 * BOOT + 60)  # fmt: skip
        assert up.returncode == 0, up.stderr
        data = json.loads(up.stdout)
        assert data["ready"] is True and data["state"] == "running"
        assert up.stderr.count("an aarch64 guest on this x86_64 host runs under TCG") == 1, up.stderr  # said once
        assert "does not start under kvm" not in up.stderr  # and never a failed KVM start first
        uname = qinst("ssh", name, "--", "uname", "-m", env=vm_env, timeout=120)
        assert uname.returncode == 0 and uname.stdout == "aarch64\n", uname.stderr
        logs = qinst("logs", name, env=vm_env)
        assert logs.returncode == 0 and "Cloud-init v." in logs.stdout and "ttyAMA0" in logs.stdout
        listed = json.loads(qinst("ls", "--json", env=vm_env).stdout)
        assert next(i for i in listed if i["name"] == name)["state"] == "running"
        rm = qinst("rm", "--force", name, env=vm_env, timeout=120)
        assert rm.returncode == 0, rm.stderr
        _nothing_left(name)
    finally:
        force_remove(name)


# -- up --confidential sev (docs/confidential.md): what this host (no SEV) and bad options get through the real CLI --


def _sev_session(tmp_path: Path) -> Path:
    for suffix, data in (("tik.bin", bytes(range(16))), ("godh.b64", b"QUFBQQ==\n"), ("session.b64", b"QUFBQQ==\n")):
        (tmp_path / f"owner_{suffix}").write_bytes(data)
    return tmp_path / "owner"


@pytest.mark.libvirt
def test_up_confidential_on_a_host_without_sev_exits_4_and_makes_nothing(
    qinst: RunQinst, offline_env: dict[str, str], tmp_path: Path
) -> None:
    caps = subprocess.run(["virsh", "-c", "qemu:///system", "domcapabilities"], capture_output=True, text=True)
    if "<sev supported='yes'" in caps.stdout:
        pytest.skip("this host runs SEV guests")
    before_domains, before_volumes = domains(), volumes()
    env = {**offline_env, "QINST_CONNECT": "qemu:///system"}
    proc = qinst("up", "debian-12", "--name", "sev-none", "--confidential", "sev", "--sev-session",
                 str(_sev_session(tmp_path)), env=env)  # fmt: skip
    assert proc.returncode == 4, proc.stderr
    one_clear_error(proc, 4)
    assert proc.stderr.startswith("qinst: error: this host cannot run AMD SEV guests")
    assert not (tmp_path / "cache").exists() or not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert domains() == before_domains and volumes() == before_volumes


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--confidential", "tdx"], "--confidential 'tdx': only sev"),
        (["--firmware", "./OVMF.fd"], "--firmware './OVMF.fd': bios or uefi"),
        (["--confidential", "sev", "--firmware", "bios", "--sev-session", "S"], "not --firmware bios"),
        (["--confidential", "sev", "--sev-policy", "0x5", "--sev-session", "S"], "SEV-ES (bit 2) is not supported"),
        (["--confidential", "sev", "--sev-policy", "0x1_0000_0000", "--sev-session", "S"], "not a 32-bit policy"),
        (["--confidential", "sev"], "needs --sev-session PREFIX"),
        (["--confidential", "sev", "--accel", "tcg", "--sev-session", "S"], "KVM only"),
        (["--confidential", "sev", "--sev-session", "missing"], "missing_tik.bin does not exist"),
        (["--confidential", "sev", "--arch", "aarch64", "--sev-session", "S"], "x86_64 guests, not aarch64"),
    ],
)
def test_up_confidential_usage_errors(
    qinst: RunQinst, offline_env: dict[str, str], tmp_path: Path, args: list[str], needle: str
) -> None:
    """Bad confidential options are usage errors (exit 2), said in one line before libvirt is reached."""
    session = str(_sev_session(tmp_path))
    proc = qinst("up", "debian-12", *[session if a == "S" else a for a in args], env=offline_env)
    assert proc.returncode == 2, proc.stderr
    one_clear_error(proc, 2, needle)
    assert proc.stderr.startswith("qinst: error: ")
