"""`qinst inventory` and `qinst ssh-config` against a real guest (issue 27): one TCG boot of the test image, shared by
the module (boots are CI's expensive part: the two commands' real-guest scenarios share it, their fast tests are
tests/test_inventory.py and tests/test_sshconfig.py). ssh and scp with `qinst ssh-config`'s output as their -F
file, and ansible-core (ad-hoc and a playbook) through the documented `qinst inventory` wrapper, reach the guest
with host-key checking on; after the guest's host keys change, both are refused. Traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from guest import force_remove, unique_name

from testsupport.ansible import ansible, ansible_env, inventory_script
from testsupport.qinst import qinst_argv, qinst_env

pytestmark = [pytest.mark.vm, pytest.mark.libvirt]
BOOT = 1800.0  # far above a TCG boot; the shared CI machine can be very slow


@dataclass(frozen=True)
class Booted:
    name: str
    env: dict[str, str]  # qinst's environment (vm_env)
    seconds: float  # how long `qinst up` took


def run_qinst(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*qinst_argv(), *args], capture_output=True, text=True, env=qinst_env(**env), timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def booted(vm_env: dict[str, str]) -> Iterator[Booted]:
    name = unique_name("integ")
    started = time.monotonic()
    try:
        up = run_qinst(vm_env, "up", "qinst-test", "--name", name, "--network", "user:restrict", "--memory", "512",
                       "--accel", "tcg", "--timeout", str(BOOT), "--json", timeout=BOOT + 120)  # fmt: skip
        assert up.returncode == 0, up.stderr
        assert json.loads(up.stdout)["ready"] is True
        yield Booted(name, vm_env, time.monotonic() - started)
    finally:
        force_remove(name)


def ssh_through_config(booted: Booted, work: Path, *command: str) -> subprocess.CompletedProcess[str]:
    """`qinst ssh-config NAME > FILE && ssh -F FILE NAME COMMAND` in bash, as the docs show it."""
    qinst = shlex.join([*qinst_argv(), "ssh-config", booted.name])
    config = shlex.quote(str(work / "ssh config"))  # a space in the path, as in the docs' `~/.ssh/qinst.conf` case
    line = f"{qinst} > {config} && ssh -F {config} {shlex.quote(booted.name)} {shlex.join(command)}"
    return subprocess.run(
        ["bash", "-c", line], capture_output=True, text=True, env=qinst_env(**booted.env), timeout=300, check=False
    )


def inventory(booted: Booted, work: Path) -> tuple[Path, dict[str, str]]:
    """The documented wrapper script (`exec qinst inventory "$@"`) and ansible's environment with qinst's."""
    work.mkdir(parents=True, exist_ok=True)
    script = inventory_script(work / "qinst-inventory", [*qinst_argv(), "inventory"])
    qinst_vars = {k: v for k, v in booted.env.items() if k.startswith(("QINST_", "XDG_"))}
    return script, ansible_env(work, **qinst_vars)


def test_ssh_and_scp_with_qinst_ssh_config(booted: Booted, tmp_path: Path) -> None:
    proc = ssh_through_config(booted, tmp_path, "cat", "/etc/hostname")
    assert proc.returncode == 0 and proc.stdout.strip() == booted.name, proc.stderr
    config = str(tmp_path / "ssh config")
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree/a.txt").write_text("through scp\n")
    scp = ["scp", "-F", config, "-r", str(tmp_path / "tree"), f"{booted.name}:/tmp/"]
    assert subprocess.run(scp, capture_output=True, text=True, timeout=300).returncode == 0
    back = ["scp", "-F", config, f"{booted.name}:/tmp/tree/a.txt", str(tmp_path / "back.txt")]
    copied = subprocess.run(back, capture_output=True, text=True, timeout=300)
    assert copied.returncode == 0 and (tmp_path / "back.txt").read_text() == "through scp\n", copied.stderr


def test_process_substitution_cannot_feed_ssh_f(booted: Booted) -> None:
    """ssh closes every inherited descriptor above stderr before it reads -F: `<(...)` (a /dev/fd path) is gone by
    then. The docs say so and give the file (or zsh's `=(...)`, a temporary file) instead."""
    qinst = shlex.join([*qinst_argv(), "ssh-config", booted.name])
    line = f"ssh -F <({qinst}) {shlex.quote(booted.name)} true"
    proc = subprocess.run(["bash", "-c", line], capture_output=True, text=True, env=qinst_env(**booted.env), timeout=60)
    assert proc.returncode == 255 and "Can't open user config file /dev/fd/" in proc.stderr


def test_ansible_ad_hoc_and_playbook_through_the_inventory(booted: Booted, tmp_path: Path) -> None:
    script, env = inventory(booted, tmp_path / "a")
    listed = subprocess.run([str(script), "--list"], capture_output=True, text=True, env=env, check=True, timeout=60)
    assert booted.name in json.loads(listed.stdout)["state_running"]["hosts"]

    ping = ansible(script, booted.name, "ping", tmp_path / "a", env)
    assert ping.returncode == 0 and ping.hosts[booted.name]["ping"] == "pong", ping.stdout + ping.stderr

    playbook = tmp_path / "a/site.yml"
    playbook.write_text(
        "- hosts: image_qinst_test:&state_running\n  gather_facts: false\n  tasks:\n"
        "    - ansible.builtin.command: cat /etc/hostname\n      register: out\n"
        "    - ansible.builtin.copy: {content: '{{ out.stdout }}', dest: /tmp/from-ansible}\n"
    )
    argv = [str(Path(qinst_argv()[0]).with_name("ansible-playbook")), "-i", str(script), "--limit", booted.name]
    env = {**env, "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.default"}  # the play recap
    play = subprocess.run([*argv, str(playbook)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert play.returncode == 0 and "ok=2" in play.stdout, play.stdout + play.stderr
    assert ssh_through_config(booted, tmp_path, "cat", "/tmp/from-ansible").stdout == booted.name


def test_a_guest_whose_host_key_changed_is_refused(booted: Booted, tmp_path: Path) -> None:
    """The guest makes new host keys (as a replaced or impersonated guest would offer): ssh -F and Ansible refuse
    it, Ansible even with ANSIBLE_HOST_KEY_CHECKING=False. The module's last test: it spoils the guest."""
    change = "sudo sh -c 'rm -f /etc/ssh/ssh_host_*; ssh-keygen -A; systemctl restart ssh'"
    changed = run_qinst(booted.env, "ssh", booted.name, "--", change)
    assert changed.returncode == 0, changed.stderr

    refused = ssh_through_config(booted, tmp_path, "true")
    assert refused.returncode == 255 and "Host key verification failed" in refused.stderr
    for work, extra in (("b", {}), ("c", {"ANSIBLE_HOST_KEY_CHECKING": "False"})):
        script, env = inventory(booted, tmp_path / work)  # a fresh ControlPath folder: no master to reuse
        ping = ansible(script, booted.name, "ping", tmp_path / work, {**env, **extra})
        result = ping.hosts.get(booted.name, {})
        assert ping.returncode == 4 and result.get("unreachable") is True, ping.stdout + ping.stderr
        assert "Host key verification failed" in result["msg"]
