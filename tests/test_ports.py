"""ports.py: no port races: the SSH forward's port is picked again when another process takes it before QEMU binds
it. (The launcher's use of it: test_launch.py; the real daemon and QEMU: test_cli_up.py.)"""

from __future__ import annotations

import pytest

from qemu_instances.domain import Accel, Firmware, InstanceSpec, Metadata, Network
from qemu_instances.errors import HypervisorError, UsageError
from qemu_instances.ports import start_with_port
from testsupport.testdriver import PORT_TAKEN

pytestmark = pytest.mark.promise


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
            raise HypervisorError(PORT_TAKEN % spec.ssh_port)
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
