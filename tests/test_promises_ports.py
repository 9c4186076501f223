"""No port races: the SSH forward's port is picked again when another process takes it before QEMU binds it.

The race is forced deterministically: the test holds the port (listening on 127.0.0.1) that the picker returns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import RunQinst, qinst_env
from guest import domains, force_remove, unique_name, volumes

from qemu_instances import cli, launch
from qemu_instances.domain import Accel, Firmware, InstanceSpec, Metadata, Network
from qemu_instances.errors import HypervisorError, UsageError
from qemu_instances.ports import HOSTFWD_TAKEN, start_with_port

TAKEN = f"cannot start vm: internal error: qemu unexpectedly closed the monitor: {HOSTFWD_TAKEN} 'tcp:127.0.0.1:%d-:22'"


@contextmanager
def held_port() -> Iterator[int]:
    """A port another program is listening on, for as long as the block runs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def _spec(port: int) -> InstanceSpec:
    meta = Metadata(image="i", digest="d", user="u", network="user", ssh_host="127.0.0.1", ssh_port=port)
    return InstanceSpec(
        name="vm", cpus=1, memory_mib=64, disk_path="/d", seed_path="/s", console_log="/c",
        network=Network.parse("user"), accel=Accel.TCG, firmware=Firmware.BIOS, ssh_port=port, metadata=meta,
    )  # fmt: skip


def _fails_while_taken(taken: set[int], started: list[int]) -> object:
    def start(spec: InstanceSpec) -> InstanceSpec:
        started.append(spec.ssh_port)
        if spec.ssh_port in taken:
            raise HypervisorError(TAKEN % spec.ssh_port)
        return spec

    return start


def test_a_taken_picked_port_is_replaced_in_the_spec_and_its_metadata() -> None:
    started: list[int] = []
    ports = iter([2301, 2302])
    spec = start_with_port(_fails_while_taken({2300, 2301}, started), _spec(2300), lambda: next(ports))  # type: ignore[arg-type]
    assert started == [2300, 2301, 2302]
    assert spec.ssh_port == spec.metadata.ssh_port == 2302


def test_retries_are_bounded() -> None:
    started: list[int] = []
    with pytest.raises(HypervisorError, match="after 3 ports"):
        start_with_port(
            _fails_while_taken(set(range(3000, 3010)), started), _spec(3000), iter(range(3001, 3010)).__next__, tries=3
        )  # type: ignore[arg-type]
    assert started == [3000, 3001, 3002]


def test_a_chosen_port_that_is_taken_is_a_usage_error_naming_it() -> None:
    with pytest.raises(UsageError, match=r"port 2222 on 127.0.0.1 is already in use") as err:
        start_with_port(_fails_while_taken({2222}, []), _spec(2222), None)  # type: ignore[arg-type]
    assert err.value.exit_code == 2


def test_other_start_failures_are_not_retried() -> None:
    started: list[int] = []

    def start(spec: InstanceSpec) -> InstanceSpec:
        started.append(spec.ssh_port)
        raise HypervisorError("cannot start vm: unsupported configuration")

    with pytest.raises(HypervisorError, match="unsupported configuration"):
        start_with_port(start, _spec(2400), lambda: 2401)
    assert started == [2400]


def test_the_launcher_picks_again_when_its_picked_port_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    """Launcher._boot on libvirt's test driver: the first start fails as QEMU does on a taken forward port; the
    launcher's own picker gives the next port, and the instance records it. With --ssh-port given, no retry."""
    from test_host import TEST_URI, _plan, _run, _test_xml

    from qemu_instances.host import Host
    from qemu_instances.launch import Launcher
    from qemu_instances.settings import Settings

    monkeypatch.setattr(launch, "domain_xml", _test_xml)
    monkeypatch.setattr(launch, "_pick_port", lambda host: 2223)
    started: list[int] = []
    real_start = Host.define_and_start

    def define_and_start(self: Host, xml: str, name: str) -> object:
        port = 2222 if not started else 2223
        started.append(port)
        if port == 2222:
            raise HypervisorError(TAKEN % port)
        return real_start(self, xml, name)

    monkeypatch.setattr(Host, "define_and_start", define_and_start)
    plan, spec = _plan("port-race", (Accel.TCG,), wait=False)
    with Host(TEST_URI) as host, contextlib.ExitStack() as undo:
        result = Launcher(Settings(connect=TEST_URI))._boot(_run(host, undo), plan, spec)
        assert started == [2222, 2223]
        assert result.instance.metadata.ssh_port == 2223
        undo.close()
    chosen, spec = _plan("port-chosen", (Accel.TCG,), wait=False)
    chosen = dataclasses.replace(chosen, req=dataclasses.replace(chosen.req, ssh_port=2222))
    started.clear()
    with Host(TEST_URI) as host, contextlib.ExitStack() as undo:
        with pytest.raises(UsageError, match=r"port 2222 on 127\.0\.0\.1 is already in use"):
            Launcher(Settings(connect=TEST_URI))._boot(_run(host, undo), chosen, spec)
        assert started == [2222]


# -- the real daemon and QEMU --------------------------------------------------------------------------------------


@pytest.mark.vm
@pytest.mark.libvirt
def test_up_with_a_taken_ssh_port_is_a_usage_error(qinst: RunQinst, vm_env: dict[str, str], ssh_key: Path) -> None:
    name = unique_name("port")
    try:
        with held_port() as port:
            up = qinst(
                "up", "qinst-test", "--name", name, "--network", "user:restrict", "--ssh-port", str(port),
                "--ssh-key", str(ssh_key), "--no-wait", env=vm_env, timeout=300,
            )  # fmt: skip
        assert up.returncode == 2, up.stderr
        assert f"port {port} on 127.0.0.1 is already in use" in up.stderr
        assert "Traceback" not in up.stderr
        assert name not in domains()
        assert not {v for v in volumes() if v.startswith(name)}
    finally:
        force_remove(name)


@pytest.mark.vm
@pytest.mark.libvirt
def test_up_retries_when_the_picked_port_is_taken_before_qemu_binds_it(
    vm_env: dict[str, str], ssh_key: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """In-process `qinst up`: the port picker's first answer is a port this test holds."""
    for key, value in qinst_env(**vm_env).items():
        monkeypatch.setenv(key, value)
    name = unique_name("retry")
    real = launch.free_port
    picked: list[int] = []
    try:
        with held_port() as taken:
            answers = iter([taken])

            def pick() -> int:
                picked.append(next(answers, 0) or real())
                return picked[-1]

            monkeypatch.setattr(launch, "free_port", pick)
            with pytest.raises(SystemExit) as exit_:
                cli.main(
                    ["up", "qinst-test", "--name", name, "--network", "user:restrict", "--ssh-key", str(ssh_key),
                     "--no-wait", "--json"]
                )  # fmt: skip
            out = capsys.readouterr()
            assert exit_.value.code in (0, None), out.err
            assert "does not start under KVM" not in out.err  # a taken port is not a KVM failure
        result = json.loads(out.out)
        assert picked[0] == taken and len(picked) == 2
        assert result["ssh"]["port"] == picked[1] != taken
        assert name in domains()
    finally:
        force_remove(name)
