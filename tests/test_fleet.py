"""fleet.py: placement (`--host auto`) chooses the configured host with the most free memory that fits the instance;
and the hosts table through the real `qinst` (VM): placement, `ls --all-hosts`, an unreachable host.

Hosts are real libvirt connections: libvirt's test driver opened on node XML files that state each node's memory,
and the real daemon. (A test driver opened from a file reports no free memory of its own, having no NUMA cells, so
for those hosts the node's memory from their XML stands in for free memory.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import RunQinst
from guest import domains, force_remove, unique_name

from qemu_instances import fleet
from qemu_instances.errors import HypervisorError
from qemu_instances.host import Host
from qemu_instances.settings import Settings
from testsupport.net import free_port
from testsupport.sshd import Sshd

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


@pytest.mark.promise
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


@pytest.mark.promise
def test_a_host_that_cannot_fit_the_instance_is_not_chosen(tmp_path: Path, node_memory_as_free: None) -> None:
    hosts = {"small": _node(tmp_path, "small", 1024), "medium": _node(tmp_path, "medium", 2048)}
    # 1600 MiB + the 256 MiB margin fits only "medium"; 1900 MiB fits neither.
    assert fleet.place(Settings(hosts=hosts), 1600) == "medium"
    with pytest.raises(
        HypervisorError, match=r"no host can fit 1900 MiB \(medium: 2048 MiB free; small: 1024 MiB free\)"
    ):
        fleet.place(Settings(hosts=hosts), 1900)


@pytest.mark.promise
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


# -- the hosts table through the real `qinst` (VM) ---------------------------------------------------------------------


@pytest.mark.vm
@pytest.mark.libvirt
def test_hosts_table_placement_and_all_hosts(
    qinst: RunQinst, vm_env: dict[str, str], sshd: Sshd, ssh_key: Path
) -> None:
    config = Path(vm_env["XDG_CONFIG_HOME"]) / "qinst" / "config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    dead = f"qemu+ssh://root@127.0.0.1:{free_port()}/system?command={sshd.wrapper}"
    config.write_text(
        f'[hosts.local]\nuri = "qemu:///system"\n\n[hosts.loop]\nuri = "{sshd.uri}"\n\n[hosts.gone]\nuri = "{dead}"\n'
    )
    name = unique_name("auto")
    try:
        # Placement asks every host for its free memory; "gone" cannot answer, the other two can.
        up = qinst(
            "--host", "auto", "up", "qinst-test", "--name", name, "--network", "user:restrict", "--memory", "256",
            "--ssh-key", str(ssh_key), "--no-wait", "--json", env=vm_env, timeout=300,
        )  # fmt: skip
        assert up.returncode == 0, up.stderr
        placed = json.loads(up.stdout)["host"]
        assert placed in ("local", "loop")

        listing = qinst("ls", "--all-hosts", "--json", env=vm_env, timeout=120)
        assert listing.returncode == 0, listing.stderr
        rows = json.loads(listing.stdout)
        seen = {(r["host"], r.get("name")) for r in rows}
        assert ("local", name) in seen and ("loop", name) in seen  # one daemon, reached two ways
        gone = [r for r in rows if r["host"] == "gone"]
        assert len(gone) == 1 and gone[0]["error"]
        assert "host gone is unreachable" in listing.stderr

        text = qinst("ls", "--all-hosts", env=vm_env, timeout=120)
        assert text.stdout.splitlines()[0].split()[:2] == ["HOST", "NAME"]

        rm = qinst("--host", placed, "rm", "--force", name, env=vm_env, timeout=120)
        assert rm.returncode == 0, rm.stderr
        assert name not in domains()

        unknown = qinst("--host", "nowhere", "ls", env=vm_env)
        assert unknown.returncode == 2 and "unknown host 'nowhere'" in unknown.stderr
    finally:
        force_remove(name)
        config.unlink(missing_ok=True)
        os.sync()
