"""launch.py: the launcher's boot loop on libvirt's test driver (test:///default, in memory): the KVM->TCG fallback,
a guest that pauses under KVM, the undo of what a boot made, a port taken before QEMU binds it; and the names and
KVM records `up` reads from other domains."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import libvirt
import pytest

from qemu_instances import launch
from qemu_instances.domain import METADATA_KEY, METADATA_NS, Accel, InstanceSpec
from qemu_instances.errors import HypervisorError, UsageError
from qemu_instances.host import Host
from qemu_instances.launch import Launcher, _Run
from qemu_instances.settings import Settings
from qemu_instances.wait import GuestPaused
from testsupport.testdriver import (
    PORT_TAKEN,
    TEST_URI,
    boot_plan,
    boot_run,
    driver_xml,
    record_domain_xml,
    sample_record,
)


def test_boot_falls_back_from_kvm_to_tcg_when_kvm_does_not_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch, "domain_xml", driver_xml)
    plan, spec = boot_plan("fallback", (Accel.KVM, Accel.TCG), wait=False)
    with Host(TEST_URI) as host, contextlib.ExitStack() as undo:
        result = Launcher(Settings(connect=TEST_URI))._boot(boot_run(host, undo), plan, spec)
        assert result.instance.metadata.accel == "tcg"
        dom = host.lookup("fallback")
        assert dom is not None and dom.state()[0] == "running"
        undo.close()  # what a later failure does: everything the boot made goes
        assert host.lookup("fallback") is None


def test_boot_relaunches_a_guest_that_pauses_under_kvm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch, "domain_xml", lambda spec: driver_xml(spec if spec.accel is Accel.TCG else _tcg(spec)))
    attempts: list[str] = []

    def wait(self: Launcher, run: _Run, dom: object, spec: InstanceSpec) -> list[tuple[str, str]]:
        attempts.append(str(spec.accel))
        if spec.accel is Accel.KVM:
            assert run.host.lookup(spec.name) is not None
            raise GuestPaused("the guest paused by itself (unknown)")
        return [("ssh-ed25519", "A" * 68)]

    monkeypatch.setattr(Launcher, "_wait", wait)
    plan, spec = boot_plan("paused", (Accel.KVM, Accel.TCG), wait=True)
    with Host(TEST_URI) as host, contextlib.ExitStack() as undo:
        result = Launcher(Settings(connect=TEST_URI))._boot(boot_run(host, undo), plan, spec)
        assert attempts == ["kvm", "tcg"]
        assert result.ready and result.instance.metadata.accel == "tcg"
        assert result.instance.metadata.host_keys == "ssh-ed25519 " + "A" * 68
        assert [d.name for d in host.domains() if d.name == "paused"] == ["paused"]
        undo.pop_all()


def _tcg(spec: InstanceSpec) -> InstanceSpec:
    import dataclasses

    return dataclasses.replace(spec, accel=Accel.TCG)


def test_boot_with_nothing_left_to_try_raises_and_leaves_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch, "domain_xml", driver_xml)
    plan, spec = boot_plan("nokvm", (Accel.KVM,), wait=False)
    with Host(TEST_URI) as host, contextlib.ExitStack() as undo:
        with pytest.raises(HypervisorError) as err:
            Launcher(Settings(connect=TEST_URI))._boot(boot_run(host, undo), plan, spec)
        assert err.value.exit_code == 4
        assert host.lookup("nokvm") is None


def test_ctrl_c_while_the_domain_starts_removes_its_logs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Under load, starting a domain takes seconds: an interrupt lands there more often than anywhere else.
    monkeypatch.setenv("HOME", str(tmp_path))
    console = tmp_path / ".cache/libvirt/qemu/log/slowstart-console.log"  # where a session daemon's virtlogd writes
    console.parent.mkdir(parents=True)

    def interrupted_start(self: Host, xml: str, name: str) -> None:
        console.write_text("[    0.000000] Linux version 6.1\n")  # virtlogd had begun recording
        raise KeyboardInterrupt

    monkeypatch.setattr(Host, "define_and_start", interrupted_start)
    plan, spec = boot_plan("slowstart", (Accel.TCG,), wait=False)
    with pytest.raises(KeyboardInterrupt), Host(TEST_URI) as host, contextlib.ExitStack() as undo:
        Launcher(Settings(connect=TEST_URI))._boot(boot_run(host, undo), plan, spec)
    assert not console.exists()


# -- a port taken before QEMU binds it ---------------------------------------------------------------------------------


@pytest.mark.promise
def test_the_launcher_picks_again_when_its_picked_port_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    """Launcher._boot on libvirt's test driver: the first start fails as QEMU does on a taken forward port; the
    launcher's own picker gives the next port, and the instance records it. With --ssh-port given, no retry."""
    from qemu_instances.host import Host
    from qemu_instances.launch import Launcher
    from qemu_instances.settings import Settings

    monkeypatch.setattr(launch, "domain_xml", driver_xml)
    monkeypatch.setattr(launch, "_pick_port", lambda host: 2223)
    started: list[int] = []
    real_start = Host.define_and_start

    def define_and_start(self: Host, xml: str, name: str) -> object:
        port = 2222 if not started else 2223
        started.append(port)
        if port == 2222:
            raise HypervisorError(PORT_TAKEN % port)
        return real_start(self, xml, name)

    monkeypatch.setattr(Host, "define_and_start", define_and_start)
    plan, spec = boot_plan("port-race", (Accel.TCG,), wait=False)
    with Host(TEST_URI) as host, contextlib.ExitStack() as undo:
        result = Launcher(Settings(connect=TEST_URI))._boot(boot_run(host, undo), plan, spec)
        assert started == [2222, 2223]
        assert result.instance.metadata.ssh_port == 2223
        undo.close()
    chosen, spec = boot_plan("port-chosen", (Accel.TCG,), wait=False)
    chosen = dataclasses.replace(chosen, req=dataclasses.replace(chosen.req, ssh_port=2222))
    started.clear()
    with Host(TEST_URI) as host, contextlib.ExitStack() as undo:
        with pytest.raises(UsageError, match=r"port 2222 on 127\.0\.0\.1 is already in use"):
            Launcher(Settings(connect=TEST_URI))._boot(boot_run(host, undo), chosen, spec)
        assert started == [2222]


# -- what `up` reads from other domains --------------------------------------------------------------------------------


def test_up_auto_is_not_stopped_by_another_domains_invalid_record() -> None:
    """Another domain paused with a record that does not validate (a bad forward) says nothing about KVM."""
    with Host(TEST_URI) as host:
        dom = host.conn.defineXML(record_domain_xml("stranger-rec", None))
        try:
            dom.create()
            record = sample_record(accel="kvm", forwards=("127.0.0.1:8080:80",)).to_xml()
            record = record.replace("127.0.0.1:8080:80", "not:a:forward:at:all")  # as another program wrote it
            dom.setMetadata(
                libvirt.VIR_DOMAIN_METADATA_ELEMENT, record, METADATA_KEY, METADATA_NS, libvirt.VIR_DOMAIN_AFFECT_LIVE
            )
            dom.suspend()
            assert launch._paused_kvm_instance(host) is None
        finally:
            dom.destroy()
            dom.undefine()


def test_generated_names_never_reuse_a_taken_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Host(TEST_URI) as host:
        taken = host.conn.defineXML(record_domain_xml("img-aaaa", None))
        try:
            assert launch._taken(host, "img-aaaa") and not launch._taken(host, "img-bbbb")
        finally:
            taken.undefine()
