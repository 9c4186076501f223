"""`qinst inventory` (issue 27): Ansible's dynamic-inventory protocol over qinst's instances. Fast: the records are
on libvirt's test driver, and the real ansible-core pings a real sshd on 127.0.0.1 standing in for a guest.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from qemu_instances import inventory, ssh
from qemu_instances.domain import METADATA_NS, Metadata
from qemu_instances.instances import Instance
from qemu_instances.settings import Settings
from qemu_instances.sshconfig import target
from testsupport.ansible import ansible, ansible_env, inventory_script
from testsupport.qinst import qinst_argv, qinst_env
from testsupport.sshd import Sshd, serving_sshd

KEY = "ssh-ed25519 " + "A" * 68


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    with serving_sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server


def meta(**changes: object) -> Metadata:
    base = {
        "image": "qinst-test", "digest": "sha512:" + "0" * 128, "user": "debian", "network": "user",
        "ssh_host": "127.0.0.1", "ssh_port": 2222, "created": "2026-11-01T10:00:00+00:00", "host_keys": KEY,
    }  # fmt: skip
    return Metadata(**{**base, **changes})  # type: ignore[arg-type]


def node(tmp_path: Path, domains: dict[str, tuple[Metadata | None, str]]) -> str:
    parts = []
    for name, (record, state) in domains.items():
        xml = record.to_xml().replace("<instance>", f'<instance xmlns="{METADATA_NS}">', 1) if record else ""
        runstate = "<test:runstate>5</test:runstate>" if state == "shutoff" else ""
        parts.append(
            "<domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>"
            f"<name>{name}</name><memory>65536</memory><os><type>hvm</type></os>{runstate}"
            f"<metadata>{xml}</metadata></domain>"
        )
    path = tmp_path / "node.xml"
    path.write_text("<node>" + "".join(parts) + "</node>")
    return f"test://{path}"


def run_qinst(uri: str, cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = qinst_env(QINST_CONNECT=uri, QINST_CACHE_DIR=str(cache), XDG_CONFIG_HOME=str(cache.parent / "config"))
    return subprocess.run([*qinst_argv(), *args], capture_output=True, text=True, env=env, timeout=60, check=False)


@pytest.fixture
def world(tmp_path: Path) -> str:
    return node(
        tmp_path,
        {
            "web1": (meta(), "running"),
            "web2": (meta(image="ubuntu-24.04", ssh_port=2223, user="ubuntu"), "running"),
            "old": (meta(image="debian-12"), "shutoff"),
            "booting": (meta(host_keys=""), "running"),
            "dark": (meta(network="none", ssh_host=""), "running"),
            "broken": (meta(created="2026-11-01T10:00:00"), "running"),
            "stranger": (None, "running"),
        },
    )


def test_list_groups_by_image_host_and_state_under_qinst(world: str, tmp_path: Path) -> None:
    proc = run_qinst(world, tmp_path / "cache", "inventory", "--list")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    names = ["booting", "old", "web1", "web2"]
    assert data["qinst"] == {
        "hosts": names,
        "children": sorted(
            ["image_qinst_test", "image_ubuntu_24_04", "image_debian_12", "host_local", "state_running",
             "state_shutoff"]
        ),
    }  # fmt: skip
    assert data["image_qinst_test"] == {"hosts": ["booting", "web1"]}
    assert data["image_ubuntu_24_04"] == {"hosts": ["web2"]} and data["image_debian_12"] == {"hosts": ["old"]}
    assert data["host_local"] == {"hosts": names}
    assert data["state_running"] == {"hosts": ["booting", "web1", "web2"]} and data["state_shutoff"]["hosts"] == ["old"]
    assert sorted(data["_meta"]["hostvars"]) == names
    # Left out, and said why: an invalid record, and an instance without an address (Ansible would reach its
    # name with the user's own ssh setup).
    assert "broken is not in the inventory" in proc.stderr and "invalid qinst metadata" in proc.stderr
    assert "dark is not in the inventory" in proc.stderr and "no known address" in proc.stderr
    assert all(json.loads(run_qinst(world, tmp_path / "cache", "inventory").stdout)[k] == v for k, v in data.items())


def test_hostvars_keep_host_key_checking_on_with_qinst_known_hosts(world: str, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    web2 = json.loads(run_qinst(world, cache, "inventory", "--host", "web2").stdout)
    assert {k: web2[k] for k in ("ansible_host", "ansible_port", "ansible_user")} == {
        "ansible_host": "127.0.0.1",
        "ansible_port": 2223,
        "ansible_user": "ubuntu",
    }
    assert web2["ansible_ssh_host_key_checking"] is True  # beats ansible.cfg and ANSIBLE_HOST_KEY_CHECKING
    assert web2["qinst_image"] == "ubuntu-24.04" and web2["qinst_state"] == "running"
    args = shlex.split(web2["ansible_ssh_common_args"])
    known = cache / "known_hosts/web2"
    expected = ssh.ssh_options(ssh.SshTarget("127.0.0.1", 2223, "ubuntu", known))
    assert args == expected  # ssh.py's one list, word for word
    assert args[:2] == ["-F", "/dev/null"] and "StrictHostKeyChecking=yes" in args
    assert known.read_text() == f"[127.0.0.1]:2223 {KEY}\n"
    # No key verified yet: an empty known_hosts, so that every key is refused rather than learnt.
    booting = json.loads(run_qinst(world, cache, "inventory", "--host", "booting").stdout)
    assert "UserKnownHostsFile=/dev/null" in shlex.split(booting["ansible_ssh_common_args"])
    assert json.loads(run_qinst(world, cache, "inventory", "--host", "nosuch").stdout) == {}  # as the protocol has it
    both = run_qinst(world, cache, "inventory", "--list", "--host", "web1")
    assert both.returncode == 2 and "not both" in both.stderr


@pytest.mark.parametrize(
    ("value", "group"),
    [
        ("debian-12", "image_debian_12"),
        ("ubuntu-24.04", "image_ubuntu_24_04"),
        ("aleph:b6ff5c3a", "image_aleph_b6ff5c3a"),
        ("/srv/my image.qcow2", "image__srv_my_image_qcow2"),
        ("évier", "image__vier"),
    ],
)
def test_group_names_are_ansible_safe(value: str, group: str) -> None:
    assert inventory.group_name("image", value) == group


def test_the_libvirt_host_group_is_the_configured_host_or_the_uri_host(tmp_path: Path) -> None:
    assert inventory.host_label(Settings(connect="qemu:///system")) == "local"
    assert inventory.host_label(Settings(connect="qemu+ssh://root@lab1.example/system")) == "lab1.example"
    assert inventory.host_label(Settings(connect="qemu+ssh://root@lab1.example/system", host="lab1")) == "lab1"


def test_a_remote_host_puts_its_proxy_command_in_the_ssh_args_shell_quoted(tmp_path: Path) -> None:
    settings = Settings(connect="qemu+ssh://admin@lab1.example/system?keyfile=/keys/my%20key", cache_dir=tmp_path)
    found = inventory.build([Instance("web1", "running", meta())], settings)
    args = shlex.split(found.hostvars["web1"]["ansible_ssh_common_args"])
    hop = ssh.SshHop.from_uri(settings.connect)
    assert hop is not None and args[args.index("-o", args.index(f"ProxyCommand={hop.proxy_command()}") - 1)] == "-o"
    assert "'/keys/my key'" in hop.proxy_command()
    assert found.groups["host_lab1_example"] == ["web1"]


# -- the real ansible-core against a real sshd ------------------------------------------------------------------------


def sshd_instance(sshd: Sshd, **changes: object) -> Instance:
    """An instance whose 'guest' is the sshd (user root: made here, since a record read back could not name it)."""
    kind, body = sshd.host_key
    record = meta(user="root", ssh_port=sshd.port, host_keys=f"{kind} {body}", private_key=str(sshd.client_key))
    return Instance("web1", "running", replace(record, **changes))  # type: ignore[arg-type]


def static_inventory(path: Path, found: inventory.Inventory) -> Path:
    """An inventory script that prints what `qinst inventory --list` would (the CLI's path is the VM test's)."""
    data = path.with_suffix(".json")
    data.write_text(json.dumps(found.to_json()))
    return inventory_script(path, [sys.executable, "-c", f"print(open({str(data)!r}).read())"])


@pytest.mark.parametrize("checking", ["", "False"])
def test_ansible_pings_with_the_verified_key_and_is_refused_another(sshd: Sshd, tmp_path: Path, checking: str) -> None:
    """ANSIBLE_HOST_KEY_CHECKING=False (a common CI setting) does not turn the check off for qinst's instances."""
    settings = Settings(connect="test:///default", cache_dir=tmp_path / "cache")
    env = ansible_env(tmp_path / "a", **({"ANSIBLE_HOST_KEY_CHECKING": checking} if checking else {}))
    good = static_inventory(tmp_path / "good", inventory.build([sshd_instance(sshd)], settings))
    ping = ansible(good, "qinst", "ping", tmp_path / "a", env)
    assert ping.returncode == 0 and ping.hosts["web1"]["ping"] == "pong", ping.stdout + ping.stderr

    # Another ansible run (its own ControlPath folder: the first run's persisting master would skip the handshake).
    other = static_inventory(tmp_path / "other", inventory.build([sshd_instance(sshd, host_keys=KEY)], settings))
    env = ansible_env(tmp_path / "b", **({"ANSIBLE_HOST_KEY_CHECKING": checking} if checking else {}))
    refused = ansible(other, "qinst", "ping", tmp_path / "b", env)
    assert refused.returncode == 4 and refused.hosts["web1"].get("unreachable") is True, refused.stdout
    assert "Host key verification failed" in refused.hosts["web1"]["msg"]


def test_target_of_a_stopped_instance_still_checks_its_recorded_keys(tmp_path: Path) -> None:
    settings = Settings(connect="test:///default", cache_dir=tmp_path)
    tgt = target(Instance("old", "shutoff", meta()), settings)
    assert tgt.known_hosts == tmp_path / "known_hosts/old" and tgt.known_hosts.read_text().endswith(f"{KEY}\n")
