"""A guest whose cloud-init finished with errors stays reachable: `up` exits 5 naming the failed module, records
the verified host keys, and `qinst ssh NAME` works; with --ignore-cloud-init-errors `up` succeeds with a warning."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import qinst_argv, qinst_env
from guest import domains, force_remove, unique_name, volumes

from qemu_instances.errors import GuestFailed
from qemu_instances.wait import CloudInitErrors, Probe, Readiness, wait_ready

BOOT = 2400.0  # the shared test machine can be very loaded: far above the ~1 min a TCG boot takes alone
FAILING_USER_DATA = "#cloud-config\nruncmd:\n  - [sh, -c, 'echo qinst-runcmd-fails; exit 3']\n"
KEY = ("ssh-ed25519", "AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl")
CONSOLE = (
    "[    0.0] Linux version 6.1.0\r\n-----BEGIN SSH HOST KEY KEYS-----\r\n"
    f"{KEY[0]} {KEY[1]} root@vm\r\n-----END SSH HOST KEY KEYS-----\r\n"
    "[   40.1] cloud-init[520]: 2026-11-28 13:19:03,123 - util.py[WARNING]: Failed running "
    "/var/lib/cloud/instance/scripts/runcmd [3]\r\n"
    "[   40.2] cloud-init[520]: 2026-11-28 13:19:03,124 - util.py[WARNING]: Running module scripts-user "
    "(<module 'cloudinit.config.cc_scripts_user'>) failed\r\n"
    "[   42.8] cloud-init[514]: Cloud-init v. 22.4.2 finished at Sat, 28 Nov 2026 13:25:36 +0000. "
    "Datasource DataSourceNoCloud [seed=/dev/vdb][dsmode=net].  Up 42.74 seconds\r\n"
)


class _Console:
    text = CONSOLE

    def read(self) -> str:
        return self.text

    def tail(self, n: int = 20) -> str:
        return self.text

    def close(self) -> None:
        pass


def _probe(verdict: bool | None) -> Probe:
    return Probe(
        state=lambda: ("running", "booted"),
        console=_Console(),
        ssh_host=lambda: "127.0.0.1",
        ssh_port=2222,
        scan=lambda host, port, keys: verdict,
    )


def test_errors_with_ssh_verified_carry_the_keys_and_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("qemu_instances.wait.POLL", 0.01)
    with pytest.raises(CloudInitErrors) as caught:
        wait_ready(_probe(True), timeout=5, readiness=Readiness())
    assert caught.value.exit_code == 5
    assert caught.value.keys == [KEY] and caught.value.modules == ["scripts-user"]
    assert "Failed running /var/lib/cloud/instance/scripts/runcmd [3]" in caught.value.message


def test_errors_without_ssh_fail_at_the_timeout_as_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("qemu_instances.wait.POLL", 0.01)
    with pytest.raises(GuestFailed, match="SSH did not answer") as caught:
        wait_ready(_probe(None), timeout=0.3, readiness=Readiness())
    assert not isinstance(caught.value, CloudInitErrors) and "scripts-user" in caught.value.message


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
        "--user-data", str(user_data), "--disk", "3", "--accel", "tcg", "--timeout", str(BOOT), *extra,
        env=env, timeout=BOOT + 120,
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
