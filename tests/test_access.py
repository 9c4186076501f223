"""access.py: an instance's `qinst ssh` command line. Host keys are the main security claim: with a real sshd on
127.0.0.1, a key other than the recorded one stops ssh before authentication; known_hosts, the key file, the hop of
a remote host, and what `qinst ssh` refuses."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from qemu_instances.access import ssh_argv
from qemu_instances.domain import Metadata
from qemu_instances.errors import QinstError, UsageError
from qemu_instances.instances import Instance
from qemu_instances.settings import Settings
from testsupport.hostkeys import KEY_A, HostKeySshd, Key


def _instance(hostkey_sshd: HostKeySshd, key: Key) -> Instance:
    meta = Metadata(
        image="qinst-test", digest="sha512:" + "0" * 128, user="root", network="user",
        ssh_host="127.0.0.1", ssh_port=hostkey_sshd.port, host_keys=f"{key[0]} {key[1]}",
        private_key=str(hostkey_sshd.client_key),
    )  # fmt: skip
    return Instance("hk", "running", meta)


def test_ssh_argv_checks_host_keys_strictly(hostkey_sshd: HostKeySshd, tmp_path: Path) -> None:
    argv = ssh_argv(_instance(hostkey_sshd, hostkey_sshd.key), Settings(connect="qemu:///system", cache_dir=tmp_path))
    options = [argv[i + 1] for i, arg in enumerate(argv) if arg == "-o"]
    assert "StrictHostKeyChecking=yes" in options
    assert not [
        o for o in options if o.lower().startswith("stricthostkeychecking=") and o != "StrictHostKeyChecking=yes"
    ]
    assert "GlobalKnownHostsFile=/dev/null" in options
    known = Path(next(o.split("=", 1)[1] for o in options if o.startswith("UserKnownHostsFile=")))
    assert known.read_text() == f"[127.0.0.1]:{hostkey_sshd.port} {hostkey_sshd.key[0]} {hostkey_sshd.key[1]}\n"


def test_qinst_ssh_refuses_a_server_with_another_key(hostkey_sshd: HostKeySshd, tmp_path: Path) -> None:
    """The real ssh with qinst's argv: a changed host key stops it before authentication."""
    for key, expected in (
        (hostkey_sshd.other, "Host key verification failed"),
        (hostkey_sshd.key, "Permission denied"),
    ):
        argv = ssh_argv(_instance(hostkey_sshd, key), Settings(connect="qemu:///system", cache_dir=tmp_path), ["true"])
        argv[1:1] = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-F", "/dev/null"]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        assert proc.returncode == 255 and expected in proc.stderr, proc.stderr


def _inst(state: str = "running", **meta: object) -> Instance:
    fields: dict[str, object] = {
        "image": "qinst-test", "digest": "sha512:" + "0" * 128, "user": "debian", "network": "user",
        "ssh_host": "127.0.0.1", "ssh_port": 2222, "host_keys": f"{KEY_A[0]} {KEY_A[1]}",
    }  # fmt: skip
    return Instance("hk", state, Metadata(**{**fields, **meta}))  # type: ignore[arg-type]


def test_known_hosts_file_is_private_and_made_with_its_parents(tmp_path: Path) -> None:
    settings = Settings(connect="qemu:///system", cache_dir=tmp_path / "a" / "cache")
    argv = ssh_argv(_inst(), settings, ["ls", "-l"])
    directory = tmp_path / "a" / "cache" / "known_hosts"
    assert f"UserKnownHostsFile={directory / 'hk'}" in argv
    assert (directory.stat().st_mode & 0o777) == 0o700
    assert "Port=2222" in argv
    assert argv[-4:] == ["--", "debian@127.0.0.1", "ls", "-l"]  # nothing after -- is read as an option


def test_the_key_is_passed_only_when_it_exists(tmp_path: Path) -> None:
    settings = Settings(connect="qemu:///system", cache_dir=tmp_path)
    assert not any(a.startswith("IdentityFile=") for a in ssh_argv(_inst(private_key=str(tmp_path / "gone")), settings))
    key = tmp_path / "id"
    key.write_text("")
    key.chmod(0o644)
    with pytest.raises(UsageError, match=r"readable by others \(mode 0644\)"):  # ssh would ignore it: said at once
        ssh_argv(_inst(private_key=str(key)), settings)
    key.chmod(0o600)
    argv = ssh_argv(_inst(private_key=str(key)), settings)
    i = argv.index(f"IdentityFile={key}")
    assert argv[i - 1 : i + 3] == ["-o", f"IdentityFile={key}", "-o", "IdentitiesOnly=yes"]


def test_a_remote_host_is_reached_through_its_ssh_hop(tmp_path: Path) -> None:
    settings = Settings(connect="qemu+ssh://admin@lab1.example:2200/system", cache_dir=tmp_path)
    argv = ssh_argv(_inst(), settings)
    assert argv[0] == "ssh" and "StrictHostKeyChecking=yes" in argv
    proxy = [a for a in argv if a.startswith("ProxyCommand=")]
    assert len(proxy) == 1 and "-W %h:%p" in proxy[0] and "lab1.example" in proxy[0]


def test_ssh_refuses_without_a_key_an_address_or_a_running_guest(tmp_path: Path) -> None:
    settings = Settings(connect="qemu:///system", cache_dir=tmp_path)
    with pytest.raises(UsageError, match=r"^qinst has no verified host key for hk$") as err:
        ssh_argv(_inst(host_keys=""), settings)
    assert err.value.hint and "qinst up" in err.value.hint
    with pytest.raises(UsageError, match=r"^hk has no known address \(network user\)$"):
        ssh_argv(_inst(ssh_host=""), settings)
    with pytest.raises(UsageError, match=r"^instance 'hk' is shutoff$") as err:
        ssh_argv(_inst(state="shutoff"), settings)
    assert err.value.hint == "start it: qinst start hk"


def test_ssh_missing_is_said(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(QinstError, match=r"^ssh not found$") as err:
        ssh_argv(_inst(), Settings(connect="qemu:///system", cache_dir=tmp_path))
    assert err.value.hint == "install openssh-client"
