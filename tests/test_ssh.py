"""ssh.py against a real OpenSSH server on 127.0.0.1: the host-key scan and check (a key other than the one the guest
printed is refused; servers that trickle, stall or send bytes that are not UTF-8 are given up on), strict host keys,
%-escaped paths, `--` before the destination, the hop of a qemu+ssh:// URI, many commands over one connection, and
nothing from the user's ssh configuration."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from subprocess import CompletedProcess

import pytest
from conftest import PRINTED_KEY

from qemu_instances import ssh
from qemu_instances.domain import METADATA_NS, Metadata
from qemu_instances.ssh import (
    SshHop,
    SshTarget,
    check_host_keys,
    check_host_keys_via,
    known_hosts_line,
    scan_host_keys,
    scan_types,
)
from testsupport.hostkeys import HostKeySshd
from testsupport.qinst import qinst_argv, qinst_env
from testsupport.sshd import Sshd


def _target(sshd: Sshd, tmp_path: Path, *, user: str = "root", keys: list[tuple[str, str]] | None = None) -> SshTarget:
    known = ssh.write_known_hosts(tmp_path / "known_hosts", "127.0.0.1", sshd.port, keys or [sshd.host_key])
    return SshTarget("127.0.0.1", sshd.port, user, known, key_file=str(sshd.client_key))


def test_known_hosts_lines() -> None:
    keys = [("ecdsa-sha2-nistp256", "AAAA" * 10), ("ssh-ed25519", "BBBB" * 10)]
    assert known_hosts_line("127.0.0.1", 2222, keys).splitlines()[1] == f"[127.0.0.1]:2222 ssh-ed25519 {'BBBB' * 10}"
    assert known_hosts_line("10.0.0.5", 22, keys).startswith("10.0.0.5 ecdsa-sha2-nistp256 ")


def test_argv_ends_options_before_the_destination(tmp_path: Path) -> None:
    target = SshTarget("127.0.0.1", 2222, "cloud", tmp_path / "k")
    argv = ssh.ssh_argv(target, ["uname", "-a"])
    assert argv[-4:] == ["--", "cloud@127.0.0.1", "uname", "-a"]
    assert argv.count("--") == 1


def test_run_checks_the_host_key(sshd: Sshd, tmp_path: Path) -> None:
    ok = ssh.run(_target(sshd, tmp_path), ["echo", "hello"], timeout=30)
    assert ok.ok and ok.stdout == "hello\n", ok.stderr
    wrong = ssh.run(_target(sshd, tmp_path, keys=[("ssh-ed25519", "A" * 68)]), ["true"], timeout=30)
    assert wrong.returncode == 255 and "Host key verification failed" in wrong.stderr


def test_percent_in_paths_is_literal(sshd: Sshd, tmp_path: Path) -> None:
    # ssh expands %d, %h... in UserKnownHostsFile and IdentityFile: qinst's paths must reach it verbatim.
    odd = tmp_path / "cache%d" / "known%h"
    odd.mkdir(parents=True)
    key = odd / "id%u"
    shutil.copy(sshd.client_key, key)
    key.chmod(0o600)
    known = ssh.write_known_hosts(odd / "hosts%p", "127.0.0.1", sshd.port, [sshd.host_key])
    result = ssh.run(SshTarget("127.0.0.1", sshd.port, "root", known, key_file=str(key)), ["echo", "ok"], timeout=30)
    assert result.ok and result.stdout == "ok\n", result.stderr


def test_a_user_that_looks_like_an_option_is_not_one(sshd: Sshd, tmp_path: Path) -> None:
    # The attack of issue 11: a user name read back from metadata carrying an ssh option.
    witness = tmp_path / "pwned"
    target = _target(sshd, tmp_path, user=f"-oProxyCommand=touch {witness}")
    result = ssh.run(target, ["true"], timeout=30)
    assert result.returncode != 0
    assert not witness.exists()


def test_hop_quotes_and_escapes(tmp_path: Path) -> None:
    hop = SshHop("lab%h.example", user="ad min", keyfile="/k/id%d")
    command = hop.proxy_command()
    assert "'ad min'" in command and "/k/id%%d" in command and "lab%%h.example" in command
    assert command.count("%h:%p") == 1 and "-- " in command


def test_connection_runs_many_commands_over_one_session(sshd: Sshd, tmp_path: Path) -> None:
    with ssh.Connection(_target(sshd, tmp_path)) as conn:
        assert conn.control_path.exists(), "the control master did not come up"
        directory = conn.control_path.parent
        assert directory.stat().st_mode & 0o077 == 0  # a private directory: nobody else can use the socket
        first = conn.run(["sh", "-c", "echo $PPID"], timeout=30)
        second = conn.run(["sh", "-c", "echo $PPID"], timeout=30)
        assert first.ok and second.ok, first.stderr + second.stderr
        sessions = [conn.run(["echo", str(i)], timeout=30) for i in range(5)]
        assert [s.stdout.strip() for s in sessions] == [str(i) for i in range(5)]
    assert not directory.exists()


def test_connection_master_is_reused(sshd: Sshd, tmp_path: Path) -> None:
    # Each command over the master is a new session of the SAME sshd connection process: one login in the log.
    log = sshd.directory / "sshd.log"
    before = log.read_text().count("Accepted publickey")
    with ssh.Connection(_target(sshd, tmp_path)) as conn:
        for _ in range(4):
            assert conn.run(["true"], timeout=30).ok
    assert log.read_text().count("Accepted publickey") - before == 1


def test_through_a_hop(sshd: Sshd, tmp_path: Path) -> None:
    # The sshd is both the jump host (as a qemu+ssh URI names it) and the "guest" behind it: ProxyCommand ssh -W.
    hop = SshHop.from_uri(sshd.uri)
    assert hop is not None and hop.command == str(sshd.wrapper)
    target = _target(sshd, tmp_path)
    via = ssh.run(
        SshTarget(target.host, target.port, "root", target.known_hosts, target.key_file, hop), ["echo", "via"]
    )
    assert via.ok and via.stdout == "via\n", via.stderr
    check = ssh.key_checker(hop)
    assert check("127.0.0.1", sshd.port, [sshd.host_key]) is True
    assert check("127.0.0.1", sshd.port, [("ssh-ed25519", "A" * 68)]) is False
    assert ssh.key_checker(None)("127.0.0.1", sshd.port, [sshd.host_key]) is True  # directly, with ssh-keyscan
    assert ssh.key_checker(None) is ssh.check_host_keys  # no hop: the guest is asked directly, not through ssh


def test_the_hop_comes_whole_from_the_uri_and_only_from_ssh_uris() -> None:
    uri = "qemu+ssh://admin@lab1.example:2200/system?keyfile=/k/id&command=/opt/bin/myssh"
    assert SshHop.from_uri(uri) == SshHop("lab1.example", "admin", 2200, "/k/id", "/opt/bin/myssh")
    assert SshHop.from_uri("qemu+ssh://lab1.example/system") == SshHop("lab1.example", command="ssh")
    assert SshHop.from_uri("qemu+ssh://lab1.example/system?command=") == SshHop("lab1.example", command="ssh")
    for local in ("qemu:///system", "qemu+tcp://lab1.example/system", "qemu+ssh:///system", "test:///default"):
        assert SshHop.from_uri(local) is None, local


def test_the_proxy_command_logs_in_to_the_hop_as_the_uri_says() -> None:
    command = SshHop("lab1.example", user="admin", port=2200, keyfile="/k/id", command="myssh").proxy_command()
    assert shlex.split(command) == [
        "myssh", "-p", "2200", "-l", "admin", "-i", "/k/id", "-o", "BatchMode=yes", "-W", "%h:%p", "--", "lab1.example"
    ]  # fmt: skip


def test_the_key_check_goes_through_the_hop_when_there_is_one(sshd: Sshd, tmp_path: Path) -> None:
    used = tmp_path / "hop-used"
    wrapper = tmp_path / "hop-ssh"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {used}\nexec {sshd.wrapper} "$@"\n')
    wrapper.chmod(0o755)
    hop = SshHop("127.0.0.1", user="root", port=sshd.port, command=str(wrapper))
    assert ssh.key_checker(hop)("127.0.0.1", sshd.port, [sshd.host_key]) is True
    assert f"-W 127.0.0.1:{sshd.port}" in used.read_text()  # the hop opened the channel to the guest
    assert ssh.key_checker(hop)("127.0.0.1", sshd.port, [("ssh-ed25519", "A" * 68)]) is False


def test_only_scripted_ssh_runs_in_batch_mode(tmp_path: Path) -> None:
    """`qinst ssh` may ask for the passphrase of the user's key; the checks qinst runs itself never wait on a prompt."""
    target = SshTarget("127.0.0.1", 2222, "debian", tmp_path / "known_hosts")
    assert "BatchMode=yes" not in ssh.ssh_argv(target, ["uptime"])
    assert "BatchMode=yes" in ssh.ssh_argv(target, ["uptime"], batch=True)


# -- nothing from the user's ssh configuration reaches a guest connection (issue 21) -----------------------------------

HOSTILE_CONFIG = """# written by qinst's tests (test_ssh.py): hands the agent and X11 to every host, no host-key checks
Host *
  ForwardAgent yes
  ForwardX11 yes
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  GlobalKnownHostsFile /dev/null
  LocalForward 127.0.0.1:1 127.0.0.1:22
  PermitLocalCommand yes
  LocalCommand touch {marker}
"""


@pytest.fixture
def hostile_user_config(tmp_path: Path) -> Iterator[Path]:
    """A hostile ~/.ssh/config for the user running the tests (ssh reads the passwd entry's home, not $HOME); the
    user's own file, if any, is put back afterwards."""
    import pwd

    ssh_dir = Path(pwd.getpwuid(os.getuid()).pw_dir) / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    config = ssh_dir / "config"
    saved = config.read_bytes() if config.exists() else None
    marker = tmp_path / "local-command-ran"
    config.write_text(HOSTILE_CONFIG.format(marker=marker))
    try:
        yield marker
    finally:
        if saved is None:
            config.unlink()
        else:
            config.write_bytes(saved)


def _node_with_instance(tmp_path: Path, sshd: Sshd, host_key: tuple[str, str]) -> str:
    """A libvirt test-driver host file holding one running qinst instance whose address is the sshd."""
    meta = Metadata(
        image="qinst-test", digest="sha512:" + "0" * 128, user="cloud", network="user", ssh_host="127.0.0.1",
        ssh_port=sshd.port, created="2026-01-01T00:00:00+00:00", host_keys=f"{host_key[0]} {host_key[1]}",
        private_key=str(sshd.client_key),
    )  # fmt: skip
    node = tmp_path / "node.xml"
    node.write_text(
        '<node><domain type="test"><name>web1</name><memory>65536</memory><os><type>hvm</type></os>'
        f'<metadata><instance xmlns="{METADATA_NS}">'
        + meta.to_xml().removeprefix("<instance>")
        + "</metadata></domain></node>"
    )
    return f"test://{node}"


def _qinst_ssh(uri: str, tmp_path: Path, *command: str, env: dict[str, str] | None = None) -> CompletedProcess[str]:
    return subprocess.run(
        [*qinst_argv(), "--connect", uri, "--cache-dir", str(tmp_path / "cache"), "ssh", "web1", "--", *command],
        capture_output=True, text=True, timeout=60, check=False, stdin=subprocess.DEVNULL,
        env=qinst_env(**(env or {})),
    )  # fmt: skip


def test_a_hostile_user_config_cannot_turn_host_key_checking_off(
    sshd: Sshd, tmp_path: Path, hostile_user_config: Path
) -> None:
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    wrong = tuple(other.with_suffix(".pub").read_text().split()[:2])
    proc = _qinst_ssh(_node_with_instance(tmp_path, sshd, (wrong[0], wrong[1])), tmp_path, "true")
    assert proc.returncode == 255, proc.stderr
    assert "Host key verification failed" in proc.stderr
    assert not hostile_user_config.exists(), "the user's LocalCommand ran"


def test_the_users_agent_is_never_forwarded_to_a_guest(
    sshd: Sshd, tmp_path: Path, hostile_user_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A logged-in session (the argv qinst ssh, cp and smoke share) sees no agent and no display, whatever the
    user's configuration says."""
    agent = subprocess.run(
        ["ssh-agent", "-s", "-a", str(tmp_path / "agent")], capture_output=True, text=True, check=True
    )
    pid = next(
        line.split("=", 1)[1].split(";")[0] for line in agent.stdout.split() if line.startswith("SSH_AGENT_PID=")
    )
    monkeypatch.setenv("SSH_AUTH_SOCK", str(tmp_path / "agent"))
    monkeypatch.setenv("DISPLAY", ":0")
    try:
        result = ssh.run(_target(sshd, tmp_path), ["echo", "agent=${SSH_AUTH_SOCK:-none}", "display=${DISPLAY:-none}"])
    finally:
        subprocess.run(["kill", pid], check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["agent=none", "display=none"]
    assert not hostile_user_config.exists(), "the user's LocalCommand ran"


def test_guest_connections_read_no_configuration_file_and_forward_nothing(tmp_path: Path) -> None:
    argv = ssh.ssh_argv(SshTarget("127.0.0.1", 2222, "cloud", tmp_path / "k"), ["true"])
    assert argv[1:3] == ["-F", "/dev/null"]
    options = {argv[i + 1].split("=")[0]: argv[i + 1].split("=", 1)[1] for i, a in enumerate(argv) if a == "-o"}
    assert options["ForwardAgent"] == "no" and options["ForwardX11"] == "no"
    assert options["ClearAllForwardings"] == "yes" and options["PermitLocalCommand"] == "no"
    assert options["StrictHostKeyChecking"] == "yes"
    tunnel = ssh.ssh_argv(
        SshTarget("127.0.0.1", 2222, "cloud", tmp_path / "k"), forwards=["127.0.0.1:8080:localhost:80"]
    )
    assert "ClearAllForwardings=yes" not in tunnel and tunnel[tunnel.index("-L") + 1] == "127.0.0.1:8080:localhost:80"


# -- the host-key scan and check, against a real sshd ------------------------------------------------------------------


def _closed_port() -> Iterator[int]:
    """A port that refuses connections for as long as it is held: bound, never listening."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


@pytest.fixture
def closed_port() -> Iterator[int]:
    yield from _closed_port()


def test_scan_returns_the_key_the_server_offers(hostkey_sshd: HostKeySshd) -> None:
    assert scan_host_keys("127.0.0.1", hostkey_sshd.port) == [hostkey_sshd.key]


def test_a_host_name_starting_with_a_dash_is_never_read_as_an_option(hostkey_sshd: HostKeySshd, tmp_path: Path) -> None:
    # "-f FILE" would make ssh-keyscan scan the hosts listed in FILE (here the sshd's address) instead of the host
    # named: a host name that starts with "-" is a name that does not resolve, and gives no keys.
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1\n")
    assert scan_host_keys("127.0.0.1", hostkey_sshd.port) == [hostkey_sshd.key]  # the file's host does answer
    assert scan_host_keys(f"-f{hosts}", hostkey_sshd.port) == []


def test_the_scan_asks_for_ed25519_alone_when_the_guest_printed_one() -> None:
    # Each type asked is a key exchange with an emulated guest (RSA signs slowly): ~12 s for ssh-keyscan's five
    # default types against a TCG guest, ~1-3 s for ed25519 alone.
    printed = [("ecdsa-sha2-nistp256", "A" * 40), ("ssh-ed25519", "B" * 40), ("ssh-rsa", "C" * 40)]
    assert scan_types(printed) == ["ed25519"]
    assert scan_types([("ssh-rsa", "C" * 40), ("ecdsa-sha2-nistp384", "A" * 40)]) == ["rsa", "ecdsa"]
    assert scan_types([("ssh-dss", "D" * 40)]) == []  # not asked for by type: every type is


def test_the_scan_asks_for_the_types_given(hostkey_sshd: HostKeySshd) -> None:
    assert scan_host_keys("127.0.0.1", hostkey_sshd.port, ["ed25519"]) == [hostkey_sshd.key]
    assert scan_host_keys("127.0.0.1", hostkey_sshd.port, ["ecdsa", "ed25519"]) == [
        hostkey_sshd.key
    ]  # the server has ed25519 only


def test_a_server_offering_only_other_key_types_is_refused_not_awaited(
    hostkey_sshd: HostKeySshd, tmp_path: Path
) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-N", "", "-f", str(tmp_path / "k")], check=True)
    kind, body = (tmp_path / "k.pub").read_text().split()[:2]
    assert scan_host_keys("127.0.0.1", hostkey_sshd.port, ["ecdsa"]) == []  # the server has no ECDSA key...
    assert (
        check_host_keys("127.0.0.1", hostkey_sshd.port, [(kind, body)]) is False
    )  # ...and its ed25519 one is not ours


def test_check_accepts_the_offered_key_and_refuses_another(hostkey_sshd: HostKeySshd, closed_port: int) -> None:
    assert check_host_keys("127.0.0.1", hostkey_sshd.port, [hostkey_sshd.key]) is True
    assert check_host_keys("127.0.0.1", hostkey_sshd.port, [hostkey_sshd.other, hostkey_sshd.key]) is True
    assert check_host_keys("127.0.0.1", hostkey_sshd.port, [hostkey_sshd.other]) is False
    assert check_host_keys("127.0.0.1", closed_port, [hostkey_sshd.key]) is None  # no answer yet: keep waiting


def test_check_through_ssh_refuses_another_key(hostkey_sshd: HostKeySshd, closed_port: int) -> None:
    """The check used through a remote libvirt host (here without a jump): ssh itself compares the key."""
    check = check_host_keys_via(None)
    assert check("127.0.0.1", hostkey_sshd.port, [hostkey_sshd.key]) is True
    assert check("127.0.0.1", hostkey_sshd.port, [hostkey_sshd.other]) is False
    assert check("127.0.0.1", closed_port, [hostkey_sshd.key]) is None


def test_scan_gives_up_on_a_server_that_trickles_its_banner(monkeypatch: pytest.MonkeyPatch) -> None:
    """ssh-keyscan's -T starts again with each byte read: a server sending one byte at a time would hold it for
    as long as it likes; the scan's own timeout ends it: no keys (not yet an answer), not a hang."""
    monkeypatch.setattr(ssh, "SCAN_TIMEOUT", 2.0)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(15)

        def trickle() -> None:
            with contextlib.suppress(OSError):
                conn, _ = server.accept()
                with conn:
                    for byte in b"SSH-2.0-OpenSSH_9.2 trickled"[:24]:  # 12 s in all
                        conn.sendall(bytes([byte]))
                        time.sleep(0.5)

        thread = threading.Thread(target=trickle, daemon=True)
        thread.start()
        started = time.monotonic()
        assert scan_host_keys("127.0.0.1", server.getsockname()[1]) == []
        assert time.monotonic() - started < 8, "the scan waited on the trickling server"
        thread.join(15)


def test_check_through_ssh_gives_up_on_a_server_that_stalls_after_its_banner(
    hostkey_sshd: HostKeySshd, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that says its version and then nothing (a guest's sshd frozen mid key exchange): ssh's
    ConnectTimeout does not end that, the probe's own timeout does: no answer yet (None), not a hang."""
    monkeypatch.setattr(ssh, "PROBE_TIMEOUT", 2.0)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(15)

        def stall() -> None:
            with contextlib.suppress(OSError):
                conn, _ = server.accept()
                with conn:
                    conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
                    conn.settimeout(12)
                    while conn.recv(4096):  # the client's key exchange, never answered, until it gives up
                        pass

        thread = threading.Thread(target=stall, daemon=True)
        thread.start()
        started = time.monotonic()
        assert check_host_keys_via(None)("127.0.0.1", server.getsockname()[1], [hostkey_sshd.key]) is None
        assert time.monotonic() - started < 10, "the probe waited on the stalled server"
        thread.join(15)


# -- a server whose banner is not UTF-8 --------------------------------------------------------------------------------


def test_key_scan_of_a_server_with_an_undecodable_banner(bad_sshd: int) -> None:
    assert scan_host_keys("127.0.0.1", bad_sshd) == []
    assert check_host_keys("127.0.0.1", bad_sshd, [("ssh-ed25519", PRINTED_KEY)]) is None


# -- the hop of a qemu+ssh:// URI --------------------------------------------------------------------------------------


def test_hop_from_uri() -> None:
    hop = SshHop.from_uri("qemu+ssh://admin@lab1.example:2222/system?keyfile=/k/id&command=/usr/bin/ssh")
    assert hop == SshHop("lab1.example", "admin", 2222, "/k/id", "/usr/bin/ssh")
    assert hop.proxy_command() == ("/usr/bin/ssh -p 2222 -l admin -i /k/id -o BatchMode=yes -W %h:%p -- lab1.example")
    assert SshHop.from_uri("qemu:///system") is None
    assert SshHop.from_uri("qemu+tcp://host/system") is None
