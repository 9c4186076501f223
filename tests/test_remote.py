"""Remote libvirt hosts: an OpenSSH server on 127.0.0.1 makes qemu+ssh://root@127.0.0.1/system a real remote
connection (libvirt's own remote protocol over SSH, virt-ssh-helper on the far side). All traffic stays on loopback.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import RunQinst
from guest import domains, force_remove, unique_name, volumes

from qemu_instances.ssh import SshHop
from testsupport.net import free_port
from testsupport.sshd import Sshd, serving_sshd

pytestmark = [pytest.mark.vm, pytest.mark.libvirt]
POOL_DIR = Path("/var/lib/libvirt/images/qinst")


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    """Debian's sshd on 127.0.0.1 only, key-only root login; a client ssh command that checks its host key."""
    with serving_sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server


def test_hop_from_uri() -> None:
    hop = SshHop.from_uri("qemu+ssh://admin@lab1.example:2222/system?keyfile=/k/id&command=/usr/bin/ssh")
    assert hop == SshHop("lab1.example", "admin", 2222, "/k/id", "/usr/bin/ssh")
    assert hop.proxy_command() == ("/usr/bin/ssh -p 2222 -l admin -i /k/id -o BatchMode=yes -W %h:%p -- lab1.example")
    assert SshHop.from_uri("qemu:///system") is None
    assert SshHop.from_uri("qemu+tcp://host/system") is None


def _base_volume_state() -> dict[str, float]:
    return {p.name: p.stat().st_mtime for p in POOL_DIR.glob("sha512-*")}


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


def test_hosts_table_placement_and_all_hosts(
    qinst: RunQinst, vm_env: dict[str, str], sshd: Sshd, ssh_key: Path
) -> None:
    config = Path(vm_env["XDG_CONFIG_HOME"]) / "qinst" / "config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    dead = f"qemu+ssh://root@127.0.0.1:{free_port()}/system?command={sshd.wrapper}"
    config.write_text(
        f'[hosts.local]\nuri = "qemu:///system"\n\n[hosts.loop]\nuri = "{sshd.uri}"\n\n[hosts.gone]\nuri = "{dead}"\n'
    )
    name = unique_name("auto")
    try:
        # Placement asks every host for its free memory; "gone" cannot answer, the other two can.
        up = qinst(
            "--host", "auto", "up", "qinst-test", "--name", name, "--network", "user:restrict", "--memory", "256",
            "--ssh-key", str(ssh_key), "--no-wait", "--json", env=vm_env, timeout=300,
        )  # fmt: skip
        assert up.returncode == 0, up.stderr
        placed = json.loads(up.stdout)["host"]
        assert placed in ("local", "loop")

        listing = qinst("ls", "--all-hosts", "--json", env=vm_env, timeout=120)
        assert listing.returncode == 0, listing.stderr
        rows = json.loads(listing.stdout)
        seen = {(r["host"], r.get("name")) for r in rows}
        assert ("local", name) in seen and ("loop", name) in seen  # one daemon, reached two ways
        gone = [r for r in rows if r["host"] == "gone"]
        assert len(gone) == 1 and gone[0]["error"]
        assert "host gone is unreachable" in listing.stderr

        text = qinst("ls", "--all-hosts", env=vm_env, timeout=120)
        assert text.stdout.splitlines()[0].split()[:2] == ["HOST", "NAME"]

        rm = qinst("--host", placed, "rm", "--force", name, env=vm_env, timeout=120)
        assert rm.returncode == 0, rm.stderr
        assert name not in domains()

        unknown = qinst("--host", "nowhere", "ls", env=vm_env)
        assert unknown.returncode == 2 and "unknown host 'nowhere'" in unknown.stderr
    finally:
        force_remove(name)
        config.unlink(missing_ok=True)
        os.sync()
