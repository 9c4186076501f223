"""`qinst ssh-config` (issue 27): Host blocks rendered from ssh.py's one option list, values quoted for ssh_config,
refusals, the hop through a remote libvirt host. Fast: libvirt's test driver holds the instances' records, and the
connections are made by the real `ssh` to a real sshd on 127.0.0.1 (testsupport/sshd.py), standing in for a guest.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from qemu_instances import ssh, sshconfig
from qemu_instances.domain import METADATA_NS, Metadata
from qemu_instances.errors import UsageError
from qemu_instances.instances import Instance
from qemu_instances.settings import Settings
from qemu_instances.ssh import SshHop, SshTarget
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
    """A test:// URI whose domains carry these records; the state is libvirt's: running, or "shutoff"."""
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


def blocks(text: str) -> dict[str, dict[str, str]]:
    """Host -> {keyword: value} of an ssh_config text (one value per keyword, as qinst writes it)."""
    found: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("Host "):
            current = found.setdefault(line.split(None, 1)[1], {})
        elif line.strip() and not line.startswith("#"):
            keyword, value = line.split(None, 1)
            current[keyword] = value
    return found


def ssh_g(config: Path, host: str) -> dict[str, str]:
    """What the real ssh makes of the config for `host` (ssh -G), keyword -> value."""
    proc = subprocess.run(["ssh", "-G", "-F", str(config), host], capture_output=True, text=True, check=True)
    return dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)


# -- rendering ----------------------------------------------------------------------------------------------------


def test_every_running_valid_instance_with_a_verified_key_gets_a_block(tmp_path: Path) -> None:
    uri = node(
        tmp_path,
        {
            "web1": (meta(), "running"),
            "web2": (meta(ssh_port=2223, user="ubuntu"), "running"),
            "stopped": (meta(), "shutoff"),
            "booting": (meta(host_keys=""), "running"),  # no key verified yet: nothing could be checked
            "broken": (meta(created="2026-11-01T10:00:00"), "running"),  # an invalid record
            "stranger": (None, "running"),  # not qinst's domain
        },
    )
    proc = run_qinst(uri, tmp_path / "cache", "ssh-config")
    assert proc.returncode == 0, proc.stderr
    found = blocks(proc.stdout)
    assert sorted(found) == ["web1", "web2"]
    known = tmp_path / "cache/known_hosts/web1"
    assert found["web1"] == {
        "HostName": "127.0.0.1",
        "User": "debian",
        "UserKnownHostsFile": str(known),
        "StrictHostKeyChecking": "yes",
        "GlobalKnownHostsFile": "/dev/null",
        "UpdateHostKeys": "no",
        "CheckHostIP": "no",
        "ForwardAgent": "no",
        "ForwardX11": "no",
        "PermitLocalCommand": "no",
        "LogLevel": "ERROR",
        "Port": "2222",
        "ProxyCommand": "none",
        "KnownHostsCommand": "none",
    }
    assert known.read_text() == f"[127.0.0.1]:2222 {KEY}\n"  # the verified keys, and only them
    assert found["web2"]["User"] == "ubuntu" and found["web2"]["Port"] == "2223"

    config = tmp_path / "config"
    config.write_text(proc.stdout)
    seen = ssh_g(config, "web1")
    assert seen["hostname"] == "127.0.0.1" and seen["port"] == "2222" and seen["stricthostkeychecking"] == "true"
    assert seen["userknownhostsfile"] == str(known) and seen["forwardagent"] == "no"


def test_named_instances_must_be_usable(tmp_path: Path) -> None:
    uri = node(tmp_path, {"web1": (meta(), "running"), "stopped": (meta(), "shutoff"), "b": (meta(host_keys=""), "")})
    cache = tmp_path / "cache"
    one = run_qinst(uri, cache, "ssh-config", "web1")
    assert one.returncode == 0 and list(blocks(one.stdout)) == ["web1"], one.stderr
    stopped = run_qinst(uri, cache, "ssh-config", "web1", "stopped")
    assert stopped.returncode == 2 and "'stopped' is shutoff" in stopped.stderr and stopped.stdout == ""
    nokey = run_qinst(uri, cache, "ssh-config", "b")
    assert nokey.returncode == 2 and "no verified host key for b" in nokey.stderr
    missing = run_qinst(uri, cache, "ssh-config", "nosuch")
    assert missing.returncode == 2 and "no qinst instance named 'nosuch'" in missing.stderr


def test_a_key_file_is_written_with_identities_only(tmp_path: Path) -> None:
    key = tmp_path / "my keys" / "id_ed25519"
    key.parent.mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    lines = ssh.config_lines("web1", SshTarget("127.0.0.1", 2222, "debian", tmp_path / "kh", key_file=str(key)))
    assert f'    IdentityFile "{key}"' in lines and "    IdentitiesOnly yes" in lines


def test_values_with_spaces_and_percent_are_quoted_and_escaped(tmp_path: Path) -> None:
    known = tmp_path / "cache dir" / "50% off" / "known"
    lines = ssh.config_lines("web1", SshTarget("127.0.0.1", 2222, "debian", known))
    assert f'    UserKnownHostsFile "{str(known).replace("%", "%%")}"' in lines
    config = tmp_path / "config"
    config.write_text("\n".join(lines) + "\n")
    assert ssh_g(config, "web1")["userknownhostsfile"] == str(known)  # one file, the % a literal one


@pytest.mark.promise
@pytest.mark.parametrize("folder", ["cache dir", "trailing ", " leading", "a#b", "#hash", "a=b", "a,b", "x;y", "(p)"])
def test_every_path_ssh_config_can_hold_reads_back_as_the_same_one_file(tmp_path: Path, folder: str) -> None:
    """Whatever the characters a path is allowed to hold (a space at either end, '#', '='), the real ssh reads it
    back from the written config as that one path, never cut at a space or read as a comment."""
    known = tmp_path / folder / "known"
    config = tmp_path / "config"
    config.write_text("\n".join(ssh.config_lines("web1", SshTarget("127.0.0.1", 2222, "debian", known))) + "\n")
    assert ssh_g(config, "web1")["userknownhostsfile"] == str(known)


@pytest.mark.parametrize(
    "path", ['/tmp/a"b/known', "/tmp/a'b/known", "/tmp/a\\b/known", "/tmp/a\nHost *\n/known", "/tmp/${HOME}/k"]
)
def test_values_ssh_config_cannot_hold_are_refused(tmp_path: Path, path: str) -> None:
    with pytest.raises(UsageError, match="cannot be written for ssh"):
        ssh.config_lines("web1", SshTarget("127.0.0.1", 2222, "debian", Path(path)))


@pytest.mark.parametrize("alias", ["web*", "a b", "!web", "a,b", "web%h", ""])
def test_host_names_that_are_patterns_are_refused(tmp_path: Path, alias: str) -> None:
    with pytest.raises(UsageError, match="Host name"):
        ssh.config_lines(alias, SshTarget("127.0.0.1", 2222, "debian", tmp_path / "known"))


def test_a_user_with_a_quote_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="User"):
        ssh.config_lines("web1", SshTarget("127.0.0.1", 2222, 'root"x', tmp_path / "known"))


def test_a_remote_host_gets_the_same_proxy_command_as_qinst_ssh(tmp_path: Path) -> None:
    hop = SshHop.from_uri("qemu+ssh://admin@lab1.example:2200/system?keyfile=/keys/lab%201")
    assert hop is not None
    target = SshTarget("127.0.0.1", 2222, "debian", tmp_path / "known", hop=hop)
    lines = ssh.config_lines("web1", target)
    assert f"    ProxyCommand {hop.proxy_command()}" in lines
    assert "    ProxyCommand none" not in lines
    options = ssh.ssh_options(target)
    assert options[options.index(f"ProxyCommand={hop.proxy_command()}") - 1] == "-o"  # the one source
    config = tmp_path / "config"
    config.write_text("\n".join(lines) + "\n")
    assert (
        ssh_g(config, "web1")["proxycommand"]
        == "ssh -p 2200 -l admin -i '/keys/lab 1' -o BatchMode=yes -W %h:%p -- lab1.example"
    )


def test_a_hop_with_a_newline_is_refused(tmp_path: Path) -> None:
    hop = SshHop("lab1", keyfile="/k\nHost *\n  ProxyCommand evil")
    with pytest.raises(UsageError, match="control character"):
        ssh.config_lines("web1", SshTarget("127.0.0.1", 2222, "debian", tmp_path / "known", hop=hop))


def test_qinst_block_wins_over_a_host_star_that_comes_after(tmp_path: Path) -> None:
    """The Include recipe: qinst's block first, then the user's `Host *` with everything that would weaken it."""
    lines = ssh.config_lines("web1", SshTarget("127.0.0.1", 2222, "debian", tmp_path / "known"))
    config = tmp_path / "config"
    config.write_text(
        "\n".join(lines) + "\nHost *\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n"
        "  ProxyJump evil.example\n  KnownHostsCommand /bin/echo\n  ForwardAgent yes\n  Port 22\n"
    )
    seen = ssh_g(config, "web1")
    assert seen["stricthostkeychecking"] == "true" and seen["userknownhostsfile"] == str(tmp_path / "known")
    assert "proxyjump" not in seen and "knownhostscommand" not in seen
    assert seen["forwardagent"] == "no" and seen["port"] == "2222"


# -- real connections to a real sshd --------------------------------------------------------------------------------


def sshd_instance(sshd: Sshd, **changes: object) -> Instance:
    """An instance whose 'guest' is the sshd. Its user is root, which a record read back from libvirt may not name:
    the instance is made here rather than read, and rendered by the function `qinst ssh-config` calls."""
    kind, body = sshd.host_key
    record = meta(user="root", ssh_port=sshd.port, host_keys=f"{kind} {body}", private_key=str(sshd.client_key))
    return Instance("web1", "running", replace(record, **changes))  # type: ignore[arg-type]


def test_ssh_f_connects_with_the_verified_key_and_refuses_another(sshd: Sshd, tmp_path: Path) -> None:
    settings = Settings(connect="test:///default", cache_dir=tmp_path / "cache dir")  # a space in every path
    config = tmp_path / "config"
    config.write_text(sshconfig.render([sshd_instance(sshd)], settings, named=True))
    ok = subprocess.run(["ssh", "-F", str(config), "web1", "echo", "in"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and ok.stdout == "in\n", ok.stderr
    copied = tmp_path / "copied"  # the 'guest' is this machine: scp's destination is a local path too
    scp = subprocess.run(["scp", "-F", str(config), str(config), f"web1:{copied}"], timeout=60, check=False)
    assert scp.returncode == 0 and copied.read_text() == config.read_text()

    # The record says another key than the one the server offers (a guest replaced, a man in the middle).
    config.write_text(sshconfig.render([sshd_instance(sshd, host_keys=KEY)], settings, named=True))
    refused = subprocess.run(["ssh", "-F", str(config), "web1", "true"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 255 and "Host key verification failed" in refused.stderr


def test_the_hop_through_a_remote_libvirt_host_really_connects(sshd: Sshd, tmp_path: Path) -> None:
    """The guest's address is reached through the host (ssh -W): here the sshd is both the hop and the 'guest'."""
    kind, body = sshd.host_key
    known = ssh.write_known_hosts(tmp_path / "known", "127.0.0.1", sshd.port, [(kind, body)])
    hop = SshHop.from_uri(sshd.uri)
    target = SshTarget("127.0.0.1", sshd.port, "root", known, key_file=str(sshd.client_key), hop=hop)
    config = tmp_path / "config"
    config.write_text("\n".join(ssh.config_lines("web1", target)) + "\n")
    proc = subprocess.run(["ssh", "-F", str(config), "web1", "echo", "hop"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == "hop\n", proc.stderr
    assert "ProxyCommand" in config.read_text() and str(sshd.wrapper) in config.read_text()
