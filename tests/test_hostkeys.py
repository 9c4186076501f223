"""Host keys, the main security claim: a real sshd on 127.0.0.1 offering a key OTHER than the one the guest printed
is refused by the readiness check of `up`, by `start`'s check, by the check through a jump, and by `qinst ssh`.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from qemu_instances import ssh as ssh_module
from qemu_instances.access import ssh_argv
from qemu_instances.domain import METADATA_NS, Metadata
from qemu_instances.errors import GuestFailed, QinstError, UsageError
from qemu_instances.host import Host
from qemu_instances.instances import Instance, start
from qemu_instances.settings import Settings
from qemu_instances.ssh import check_host_keys, check_host_keys_via, scan_host_keys, scan_types
from qemu_instances.wait import Probe, Readiness, host_keys, wait_for_ssh, wait_ready

BOOT = "[    0.000000] Linux version 6.1.0-56-cloud-amd64 (debian-kernel@lists.debian.org)\r\n"
DONE = (
    "[   42.8] cloud-init[514]: Cloud-init v. 22.4.2 finished at Sat, 28 Nov 2026 13:25:36 +0000. "
    "Datasource DataSourceNoCloud [seed=/dev/vdb][dsmode=net].  Up 42.74 seconds\r\n"
)
Key = tuple[str, str]


@dataclass(frozen=True)
class Sshd:
    port: int
    key: Key  # the host key it offers
    other: Key  # a valid host key it does NOT offer
    client_key: Path


def _keygen(path: Path) -> Key:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    kind, body = path.with_name(path.name + ".pub").read_text().split()[:2]
    return kind, body


def _start_sshd(d: Path) -> tuple[subprocess.Popen[bytes], int]:
    """sshd on a port the kernel just handed out; if another process takes it first, sshd exits and we retry."""
    sshd_bin = shutil.which("sshd") or "/usr/sbin/sshd"
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    for _ in range(5):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        (d / "sshd_config").write_text(
            f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {d}/host.key\nPidFile {d}/sshd.pid\n"
            f"AuthorizedKeysFile {d}/authorized_keys\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        )
        log = d / f"sshd-{port}.log"
        proc = subprocess.Popen([sshd_bin, "-D", "-f", str(d / "sshd_config"), "-E", str(log)])
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and proc.poll() is None:
            if scan_host_keys("127.0.0.1", port):
                return proc, port
            time.sleep(0.1)
        proc.terminate()
        proc.wait(timeout=10)
        if "Address already in use" not in log.read_text(errors="replace"):
            pytest.fail(f"sshd did not start: {log.read_text(errors='replace')}")
    pytest.fail("no free port for sshd after 5 tries")


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    d = tmp_path_factory.mktemp("hostkeys")
    key = _keygen(d / "host.key")
    other = _keygen(d / "other.key")
    _keygen(d / "client.key")
    (d / "authorized_keys").write_text("")  # nobody may log in: these tests stop at the host key
    proc, port = _start_sshd(d)
    try:
        yield Sshd(port, key, other, d / "client.key")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _keys_block(*keys: Key) -> str:
    lines = "".join(f"{kind} {body} root@vm\r\n" for kind, body in keys)
    return f"-----BEGIN SSH HOST KEY KEYS-----\r\n{lines}-----END SSH HOST KEY KEYS-----\r\n"


def _probe(console: str, port: int) -> Probe:
    class Console:
        text = console

        def read(self) -> str:
            return self.text

        def tail(self, n: int = 20) -> str:
            return self.text

        def close(self) -> None:
            pass

    return Probe(state=lambda: ("running", "booted"), console=Console(), ssh_host=lambda: "127.0.0.1", ssh_port=port)


def _closed_port() -> Iterator[int]:
    """A port that refuses connections for as long as it is held: bound, never listening."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


@pytest.fixture
def closed_port() -> Iterator[int]:
    yield from _closed_port()


# -- the scan and the check, against a real sshd -------------------------------------------------------------------


def test_scan_returns_the_key_the_server_offers(sshd: Sshd) -> None:
    assert scan_host_keys("127.0.0.1", sshd.port) == [sshd.key]


def test_a_host_name_starting_with_a_dash_is_never_read_as_an_option(sshd: Sshd, tmp_path: Path) -> None:
    # "-f FILE" would make ssh-keyscan scan the hosts listed in FILE (here the sshd's address) instead of the host
    # named: a host name that starts with "-" is a name that does not resolve, and gives no keys.
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1\n")
    assert scan_host_keys("127.0.0.1", sshd.port) == [sshd.key]  # the file's host does answer
    assert scan_host_keys(f"-f{hosts}", sshd.port) == []


def test_the_scan_asks_for_ed25519_alone_when_the_guest_printed_one() -> None:
    # Each type asked is a key exchange with an emulated guest (RSA signs slowly): ~12 s for ssh-keyscan's five
    # default types against a TCG guest, ~1-3 s for ed25519 alone.
    printed = [("ecdsa-sha2-nistp256", "A" * 40), ("ssh-ed25519", "B" * 40), ("ssh-rsa", "C" * 40)]
    assert scan_types(printed) == ["ed25519"]
    assert scan_types([("ssh-rsa", "C" * 40), ("ecdsa-sha2-nistp384", "A" * 40)]) == ["rsa", "ecdsa"]
    assert scan_types([("ssh-dss", "D" * 40)]) == []  # not asked for by type: every type is


def test_the_scan_asks_for_the_types_given(sshd: Sshd) -> None:
    assert scan_host_keys("127.0.0.1", sshd.port, ["ed25519"]) == [sshd.key]
    assert scan_host_keys("127.0.0.1", sshd.port, ["ecdsa", "ed25519"]) == [sshd.key]  # the server has ed25519 only


def test_a_server_offering_only_other_key_types_is_refused_not_awaited(sshd: Sshd, tmp_path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-N", "", "-f", str(tmp_path / "k")], check=True)
    kind, body = (tmp_path / "k.pub").read_text().split()[:2]
    assert scan_host_keys("127.0.0.1", sshd.port, ["ecdsa"]) == []  # the server has no ECDSA key...
    assert check_host_keys("127.0.0.1", sshd.port, [(kind, body)]) is False  # ...and its ed25519 one is not ours


def test_check_accepts_the_offered_key_and_refuses_another(sshd: Sshd, closed_port: int) -> None:
    assert check_host_keys("127.0.0.1", sshd.port, [sshd.key]) is True
    assert check_host_keys("127.0.0.1", sshd.port, [sshd.other, sshd.key]) is True
    assert check_host_keys("127.0.0.1", sshd.port, [sshd.other]) is False
    assert check_host_keys("127.0.0.1", closed_port, [sshd.key]) is None  # no answer yet: keep waiting


def test_check_through_ssh_refuses_another_key(sshd: Sshd, closed_port: int) -> None:
    """The check used through a remote libvirt host (here without a jump): ssh itself compares the key."""
    check = check_host_keys_via(None)
    assert check("127.0.0.1", sshd.port, [sshd.key]) is True
    assert check("127.0.0.1", sshd.port, [sshd.other]) is False
    assert check("127.0.0.1", closed_port, [sshd.key]) is None


def test_scan_gives_up_on_a_server_that_trickles_its_banner(monkeypatch: pytest.MonkeyPatch) -> None:
    """ssh-keyscan's -T starts again with each byte read: a server sending one byte at a time would hold it for
    as long as it likes; the scan's own timeout ends it: no keys (not yet an answer), not a hang."""
    monkeypatch.setattr(ssh_module, "SCAN_TIMEOUT", 2.0)
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
    sshd: Sshd, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that says its version and then nothing (a guest's sshd frozen mid key exchange): ssh's
    ConnectTimeout does not end that, the probe's own timeout does: no answer yet (None), not a hang."""
    monkeypatch.setattr(ssh_module, "PROBE_TIMEOUT", 2.0)
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
        assert check_host_keys_via(None)("127.0.0.1", server.getsockname()[1], [sshd.key]) is None
        assert time.monotonic() - started < 10, "the probe waited on the stalled server"
        thread.join(15)


def test_up_readiness_refuses_a_server_with_a_key_the_console_did_not_print(sshd: Sshd) -> None:
    console = BOOT + _keys_block(sshd.other) + DONE
    with pytest.raises(GuestFailed, match=f"127.0.0.1:{sshd.port} offers host keys the guest did not print"):
        wait_ready(_probe(console, sshd.port), timeout=20, readiness=Readiness())


def test_up_readiness_accepts_the_server_with_the_printed_key(sshd: Sshd) -> None:
    readiness = Readiness()
    keys = wait_ready(_probe(BOOT + _keys_block(sshd.key) + DONE, sshd.port), timeout=20, readiness=readiness)
    assert keys == [sshd.key] and "ssh" in readiness.phases


def test_wait_for_ssh_refuses_a_different_key(sshd: Sshd) -> None:
    with pytest.raises(GuestFailed, match="offers host keys that were not recorded"):
        wait_for_ssh("127.0.0.1", sshd.port, {sshd.other}, lambda: ("running", "booted"), timeout=20)
    wait_for_ssh("127.0.0.1", sshd.port, {sshd.key}, lambda: ("running", "booted"), timeout=20)


def _qinst_domain(conn: object, name: str, meta: Metadata) -> object:
    root = ET.Element("domain", type="test")
    ET.SubElement(root, "name").text = name
    ET.SubElement(root, "memory", unit="MiB").text = "64"
    ET.SubElement(ET.SubElement(root, "os"), "type").text = "hvm"
    node = ET.fromstring(meta.to_xml())
    for el in node.iter():
        el.tag = f"{{{METADATA_NS}}}{el.tag}"
    ET.SubElement(root, "metadata").append(node)
    return conn.defineXML(ET.tostring(root, encoding="unicode"))  # type: ignore[attr-defined]


@pytest.mark.parametrize("recorded", ["other", "key"])
def test_start_refuses_a_server_with_a_key_other_than_the_recorded_one(sshd: Sshd, recorded: str) -> None:
    """`start` on a domain (libvirt's test driver) whose recorded address is the sshd."""
    key = getattr(sshd, recorded)
    meta = Metadata(
        image="qinst-test", digest="sha512:" + "0" * 128, user="debian", network="user",
        ssh_host="127.0.0.1", ssh_port=sshd.port, host_keys=f"{key[0]} {key[1]}",
    )  # fmt: skip
    with Host("test:///default") as host:
        dom = _qinst_domain(host.conn, f"hostkeys-{recorded}", meta)
        try:
            if recorded == "other":
                with pytest.raises(GuestFailed, match="offers host keys that were not recorded"):
                    start(host, f"hostkeys-{recorded}", timeout=20)
            else:
                assert start(host, f"hostkeys-{recorded}", timeout=20).state == "running"
        finally:
            if dom.isActive():  # type: ignore[attr-defined]
                dom.destroy()  # type: ignore[attr-defined]
            dom.undefine()  # type: ignore[attr-defined]


# -- `qinst ssh`'s command line ---------------------------------------------------------------------------------------


def _instance(sshd: Sshd, key: Key) -> Instance:
    meta = Metadata(
        image="qinst-test", digest="sha512:" + "0" * 128, user="root", network="user",
        ssh_host="127.0.0.1", ssh_port=sshd.port, host_keys=f"{key[0]} {key[1]}",
        private_key=str(sshd.client_key),
    )  # fmt: skip
    return Instance("hk", "running", meta)


def test_ssh_argv_checks_host_keys_strictly(sshd: Sshd, tmp_path: Path) -> None:
    argv = ssh_argv(_instance(sshd, sshd.key), Settings(connect="qemu:///system", cache_dir=tmp_path))
    options = [argv[i + 1] for i, arg in enumerate(argv) if arg == "-o"]
    assert "StrictHostKeyChecking=yes" in options
    assert not [
        o for o in options if o.lower().startswith("stricthostkeychecking=") and o != "StrictHostKeyChecking=yes"
    ]
    assert "GlobalKnownHostsFile=/dev/null" in options
    known = Path(next(o.split("=", 1)[1] for o in options if o.startswith("UserKnownHostsFile=")))
    assert known.read_text() == f"[127.0.0.1]:{sshd.port} {sshd.key[0]} {sshd.key[1]}\n"


def test_qinst_ssh_refuses_a_server_with_another_key(sshd: Sshd, tmp_path: Path) -> None:
    """The real ssh with qinst's argv: a changed host key stops it before authentication."""
    for key, expected in ((sshd.other, "Host key verification failed"), (sshd.key, "Permission denied")):
        argv = ssh_argv(_instance(sshd, key), Settings(connect="qemu:///system", cache_dir=tmp_path), ["true"])
        argv[1:1] = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-F", "/dev/null"]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        assert proc.returncode == 255 and expected in proc.stderr, proc.stderr


# -- reading the keys from the console ------------------------------------------------------------------------------

A = ("ssh-ed25519", "AAAAC3NzaC1lZDI1NTE5AAAAIAaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa")
B = ("ssh-ed25519", "AAAAC3NzaC1lZDI1NTE5AAAAIBbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb")
C = ("ecdsa-sha2-nistp256", "AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBCcccccccccccccc")


def test_keys_are_read_only_between_the_markers() -> None:
    before = f"[   30.0] sshd: user-data printed {C[0]} {C[1]} here\r\n"
    after = f"[   50.0] {B[0]} {B[1]} root@vm\r\n"
    assert host_keys(BOOT + before + _keys_block(A) + after + DONE) == [A]


def test_the_marker_regex_is_not_greedy() -> None:
    """Two marker blocks with a key line between them: the text between the blocks is not a host key."""
    between = f"[   45.0] some-service: {C[0]} {C[1]}\r\n"
    keys = host_keys(_keys_block(A) + between + _keys_block(B))
    assert C not in keys
    assert keys == [A]


def test_no_markers_no_keys() -> None:
    assert host_keys(f"{A[0]} {A[1]} root@vm\r\n" + DONE) == []
    assert host_keys("-----BEGIN SSH HOST KEY KEYS-----\r\n" + f"{A[0]} {A[1]}\r\n") == []  # never closed


# -- known_hosts and the rest of the ssh command line ---------------------------------------------------------------


def _inst(state: str = "running", **meta: object) -> Instance:
    fields: dict[str, object] = {
        "image": "qinst-test", "digest": "sha512:" + "0" * 128, "user": "debian", "network": "user",
        "ssh_host": "127.0.0.1", "ssh_port": 2222, "host_keys": f"{A[0]} {A[1]}",
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
