"""The libvirt boundary and the launcher's boot loop on libvirt's test driver (test:///default, in memory), and
hostile <metadata> through the real `qinst` on a test-driver host file: fast, no guest, no real libvirtd."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import RunQinst

from qemu_instances import launch
from qemu_instances.domain import Accel, Firmware, InstanceSpec, Metadata, Network, NetworkKind, domain_xml
from qemu_instances.errors import HypervisorError
from qemu_instances.host import Host
from qemu_instances.launch import Launcher, Plan, UpRequest, _Run
from qemu_instances.settings import Settings
from qemu_instances.wait import GuestPaused, Readiness
from testsupport.sshd import serving_sshd

TEST_URI = "test:///default"
NS = "http://qinst.invalid/xmlns/instance/1"


def _meta(**fields: object) -> Metadata:
    values: dict[str, object] = {
        "image": "debian-12",
        "digest": "sha256:" + "ab" * 32,
        "user": "cloud",
        "network": "user",
        "ssh_host": "127.0.0.1",
        "ssh_port": 2222,
        "host_keys": "ssh-ed25519 " + "A" * 68,
    }
    return Metadata(**{**values, **fields})  # type: ignore[arg-type]


def _test_xml(spec: InstanceSpec) -> str:
    """A domain the test driver accepts for TCG; a KVM one it refuses (as a host with broken KVM would)."""
    root = ET.fromstring(domain_xml(spec))
    test = ET.Element("domain", type="test")
    ET.SubElement(test, "name").text = spec.name
    ET.SubElement(test, "memory").text = "65536"
    ET.SubElement(ET.SubElement(test, "os"), "type").text = "no-kvm-here" if spec.accel is Accel.KVM else "hvm"
    test.append(root.find("metadata"))  # type: ignore[arg-type]
    return ET.tostring(test, encoding="unicode")


def _plan(name: str, accels: tuple[Accel, ...], *, wait: bool) -> tuple[Plan, InstanceSpec]:
    spec = InstanceSpec(
        name=name,
        cpus=1,
        memory_mib=64,
        disk_path="/nonexistent/disk.qcow2",
        seed_path="/nonexistent/seed.iso",
        console_log=f"/nonexistent/{name}-console.log",
        network=Network(NetworkKind.USER),
        accel=accels[0],
        firmware=Firmware.BIOS,
        ssh_port=2222,
        metadata=_meta(),
    )
    req = UpRequest(image="x", name=name, wait=wait)
    plan = Plan(req, name, None, None, None, b"", spec.network, 2222, accels, Path(spec.console_log), spec)  # type: ignore[arg-type]
    return plan, spec


def _run(host: Host, undo: contextlib.ExitStack) -> _Run:
    return _Run(host, undo, time.monotonic(), None, Readiness(), threading.Event(), 5.0)


def test_boot_falls_back_from_kvm_to_tcg_when_kvm_does_not_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch, "domain_xml", _test_xml)
    plan, spec = _plan("fallback", (Accel.KVM, Accel.TCG), wait=False)
    with Host(TEST_URI) as host, contextlib.ExitStack() as undo:
        result = Launcher(Settings(connect=TEST_URI))._boot(_run(host, undo), plan, spec)
        assert result.instance.metadata.accel == "tcg"
        dom = host.lookup("fallback")
        assert dom is not None and dom.state()[0] == "running"
        undo.close()  # what a later failure does: everything the boot made goes
        assert host.lookup("fallback") is None


def test_boot_relaunches_a_guest_that_pauses_under_kvm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch, "domain_xml", lambda spec: _test_xml(spec if spec.accel is Accel.TCG else _tcg(spec)))
    attempts: list[str] = []

    def wait(self: Launcher, run: _Run, dom: object, spec: InstanceSpec) -> list[tuple[str, str]]:
        attempts.append(str(spec.accel))
        if spec.accel is Accel.KVM:
            assert run.host.lookup(spec.name) is not None
            raise GuestPaused("the guest paused by itself (unknown)")
        return [("ssh-ed25519", "A" * 68)]

    monkeypatch.setattr(Launcher, "_wait", wait)
    plan, spec = _plan("paused", (Accel.KVM, Accel.TCG), wait=True)
    with Host(TEST_URI) as host, contextlib.ExitStack() as undo:
        result = Launcher(Settings(connect=TEST_URI))._boot(_run(host, undo), plan, spec)
        assert attempts == ["kvm", "tcg"]
        assert result.ready and result.instance.metadata.accel == "tcg"
        assert result.instance.metadata.host_keys == "ssh-ed25519 " + "A" * 68
        assert [d.name for d in host.domains() if d.name == "paused"] == ["paused"]
        undo.pop_all()


def _tcg(spec: InstanceSpec) -> InstanceSpec:
    import dataclasses

    return dataclasses.replace(spec, accel=Accel.TCG)


def test_boot_with_nothing_left_to_try_raises_and_leaves_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch, "domain_xml", _test_xml)
    plan, spec = _plan("nokvm", (Accel.KVM,), wait=False)
    with Host(TEST_URI) as host, contextlib.ExitStack() as undo:
        with pytest.raises(HypervisorError) as err:
            Launcher(Settings(connect=TEST_URI))._boot(_run(host, undo), plan, spec)
        assert err.value.exit_code == 4
        assert host.lookup("nokvm") is None


def test_domain_wrapper_states_and_metadata() -> None:
    with Host(TEST_URI) as host:
        dom = host.lookup("test")  # the test driver's own running domain
        assert dom is not None and dom.state()[0] == "running" and dom.is_active()
        dom.set_metadata(_meta().to_xml(), "qinst", NS)
        assert f'xmlns:qinst="{NS}"' in dom.xml() or NS in dom.xml()
        dom.destroy()
        assert dom.state()[0] == "shutoff"
        dom.undefine()
        dom.undefine()  # gone already is not an error
        assert host.lookup("test") is None


def test_a_lost_connection_is_a_hypervisor_error_with_a_hint() -> None:
    # What libvirtd restarting under a waiting `up` looks like from here: the connection is gone.
    host = Host(TEST_URI)
    host.conn.close()
    with pytest.raises(HypervisorError) as err:
        host.lookup("test")
    assert err.value.exit_code == 4
    assert err.value.hint and "connection to libvirt was lost" in err.value.hint
    with pytest.raises(HypervisorError):
        host.domains()


# -- hostile metadata through the real entry point --------------------------------------------------------------


def _node(tmp_path: Path, name: str, fields: str, state: str = "running") -> str:
    """A test-driver host file holding one domain with the given qinst <metadata> children; its URI."""
    path = tmp_path / "node.xml"
    path.write_text(
        f"""<node>
  <domain type="test" xmlns:test="http://libvirt.org/schemas/domain/test/1.0">
    <name>{name}</name><memory>65536</memory><os><type>hvm</type></os>
    <metadata><q:instance xmlns:q="{NS}">{fields}</q:instance></metadata>
    <test:runstate>{1 if state == "running" else 5}</test:runstate>
  </domain>
</node>"""
    )
    return f"test://{path}"


def _fields(**override: str) -> str:
    values = {
        "image": "debian-12",
        "digest": "sha256:" + "ab" * 32,
        "user": "cloud",
        "network": "user",
        "ssh-host": "127.0.0.1",
        "ssh-port": "2222",
        "host-keys": "ssh-ed25519 " + "A" * 68,
        **override,
    }
    return "".join(f"<q:{k}>{v}</q:{k}>" for k, v in values.items())


def test_a_valid_record_is_listed(qinst: RunQinst, tmp_path: Path) -> None:
    uri = _node(tmp_path, "good", _fields())
    listed = qinst("--connect", uri, "ls", "--json")
    assert listed.returncode == 0, listed.stderr
    assert '"state": "running"' in listed.stdout and '"invalid"' not in listed.stdout


def test_user_with_an_ssh_option_is_refused(qinst: RunQinst, tmp_path: Path) -> None:
    witness = tmp_path / "pwned"
    uri = _node(tmp_path, "evil", _fields(user=f"-oProxyCommand=touch {witness}"))
    listed = qinst("--connect", uri, "ls")
    assert listed.returncode == 0 and "evil  invalid" in listed.stdout, listed.stdout + listed.stderr
    debug = qinst("--debug", "--connect", uri, "ls")
    assert "invalid user name" in debug.stderr
    entered = qinst("--connect", uri, "ssh", "evil", "--", "true")
    assert entered.returncode == 2 and "invalid qinst metadata" in entered.stderr
    assert "rm --force evil" in entered.stderr
    assert not witness.exists()


def test_a_bad_port_does_not_break_ls_for_the_others(qinst: RunQinst, tmp_path: Path) -> None:
    uri = _node(tmp_path, "badport", _fields(**{"ssh-port": "abc"}))
    listed = qinst("--connect", uri, "ls", "--json")
    assert listed.returncode == 0, listed.stderr
    assert '"state": "invalid"' in listed.stdout
    pruned = qinst("--connect", uri, "--cache-dir", str(tmp_path / "cache"), "prune")
    assert pruned.returncode == 2 and "rm --force badport" in pruned.stderr


def test_console_log_elsewhere_is_neither_printed_nor_deleted(qinst: RunQinst, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("do not print me\n")
    uri = _node(tmp_path, "peek", _fields(**{"console-log": str(secret)}), state="shutoff")
    logs = qinst("--connect", uri, "logs", "peek")
    assert logs.returncode == 2 and "do not print me" not in logs.stdout
    removed = qinst("--connect", uri, "rm", "peek")
    assert removed.returncode == 2  # invalid: only rm --force acts on it
    forced = qinst("--connect", uri, "rm", "--force", "peek")
    assert forced.returncode == 0, forced.stderr
    assert secret.read_text() == "do not print me\n"


def test_volumes_of_another_instance_are_refused(qinst: RunQinst, tmp_path: Path) -> None:
    vols = "<q:volumes><q:volume>victim.qcow2</q:volume></q:volumes>"
    uri = _node(tmp_path, "thief", _fields() + vols, state="shutoff")
    listed = qinst("--connect", uri, "--debug", "ls")
    assert "thief  invalid" in listed.stdout and "victim.qcow2" in listed.stderr


@pytest.mark.libvirt
def test_a_connection_that_drops_is_exit_4_with_a_hint(tmp_path: Path) -> None:
    """libvirtd going away under a waiting `up`, without restarting the shared daemon: the connection goes through
    an sshd of our own (qemu+ssh://), and the test kills its ssh client process (a child of this process)."""
    with serving_sshd(tmp_path) as sshd, Host(sshd.uri) as host:
        host.lookup("qinst-no-such-domain")  # the connection works
        children = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()
        clients = [int(pid) for pid in children if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] == b"ssh"]
        assert clients, "libvirt's ssh client process was not found"
        for pid in clients:
            os.kill(pid, signal.SIGKILL)
        for call in (lambda: host.lookup("qinst-no-such-domain"), host.domains):
            with pytest.raises(HypervisorError) as err:
                call()
            assert err.value.exit_code == 4
            assert err.value.hint and "connection to libvirt was lost" in err.value.hint


def test_ctrl_c_while_the_domain_starts_removes_its_logs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Under load, starting a domain takes seconds: an interrupt lands there more often than anywhere else.
    monkeypatch.setenv("HOME", str(tmp_path))
    console = tmp_path / ".cache/libvirt/qemu/log/slowstart-console.log"  # where a session daemon's virtlogd writes
    console.parent.mkdir(parents=True)

    def interrupted_start(self: Host, xml: str, name: str) -> None:
        console.write_text("[    0.000000] Linux version 6.1\n")  # virtlogd had begun recording
        raise KeyboardInterrupt

    monkeypatch.setattr(Host, "define_and_start", interrupted_start)
    plan, spec = _plan("slowstart", (Accel.TCG,), wait=False)
    with pytest.raises(KeyboardInterrupt), Host(TEST_URI) as host, contextlib.ExitStack() as undo:
        Launcher(Settings(connect=TEST_URI))._boot(_run(host, undo), plan, spec)
    assert not console.exists()
