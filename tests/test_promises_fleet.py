"""Placement (`--host auto`): the configured host with the most free memory that fits the instance is chosen.

Hosts are real libvirt connections: libvirt's test driver opened on node XML files that state each node's memory,
and the real daemon. (A test driver opened from a file reports no free memory of its own, having no NUMA cells, so
for those hosts the node's memory from their XML stands in for free memory.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qemu_instances import fleet
from qemu_instances.errors import HypervisorError
from qemu_instances.host import Host
from qemu_instances.settings import Settings

MiB = 1 << 20


def _node(tmp_path: Path, name: str, memory_mib: int) -> str:
    path = tmp_path / f"{name}.xml"
    path.write_text(
        "<node><cpu><nodes>1</nodes><sockets>1</sockets><cores>2</cores><threads>1</threads><mhz>2000</mhz></cpu>"
        f"<memory>{memory_mib * 1024}</memory></node>"
    )
    return f"test://{path}"


@pytest.fixture
def node_memory_as_free(monkeypatch: pytest.MonkeyPatch) -> None:
    real = Host.free_memory

    def free(host: Host) -> int:
        if host.uri.startswith("test:///") and host.uri != "test:///default":
            return int(host.conn.getInfo()[1]) * MiB  # the node XML's memory
        return real(host)

    monkeypatch.setattr(Host, "free_memory", free)


def test_the_host_with_the_most_free_memory_is_chosen(tmp_path: Path, node_memory_as_free: None) -> None:
    hosts = {
        "small": _node(tmp_path, "small", 2048),
        "big": _node(tmp_path, "big", 6144),
        "medium": _node(tmp_path, "medium", 4096),
        "tiny": _node(tmp_path, "tiny", 512),
    }
    settings = Settings(connect="test:///default", hosts=hosts)
    assert fleet.place(settings, 1024) == "big"
    # Without "big", the most free among those that fit.
    assert (
        fleet.place(Settings(connect="test:///default", hosts={k: v for k, v in hosts.items() if k != "big"}), 1024)
        == "medium"
    )


def test_a_host_that_cannot_fit_the_instance_is_not_chosen(tmp_path: Path, node_memory_as_free: None) -> None:
    hosts = {"small": _node(tmp_path, "small", 1024), "medium": _node(tmp_path, "medium", 2048)}
    # 1600 MiB + the 256 MiB margin fits only "medium"; 1900 MiB fits neither.
    assert fleet.place(Settings(hosts=hosts), 1600) == "medium"
    with pytest.raises(
        HypervisorError, match=r"no host can fit 1900 MiB \(medium: 2048 MiB free; small: 1024 MiB free\)"
    ):
        fleet.place(Settings(hosts=hosts), 1900)


@pytest.mark.libvirt
def test_the_real_daemon_is_chosen_over_a_host_without_room() -> None:
    """qemu:///system (GiB free here) against the test driver's default node (a few MiB free): nothing patched."""
    settings = Settings(hosts={"real": "qemu:///system", "mock": "test:///default"})
    with Host("qemu:///system") as real:
        free = real.conn.getFreeMemory()
    assert free > 512 * MiB, "the real daemon reports too little free memory for this test"
    assert fleet.place(settings, 256) == "real"
    with pytest.raises(HypervisorError, match=r"no host can fit"):
        fleet.place(settings, (free >> 20) * 2)
