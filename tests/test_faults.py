"""kill -9 of `qinst up` at each phase: `ls` shows what is left, and `rm NAME` (or `prune`) removes all of it.

QINST_TEST_PAUSE_AT=PHASE (qemu_instances/faults.py) makes `up` print a marker and block at PHASE; the test waits
for the marker and sends SIGKILL, so nothing of `up`'s own clean-up runs. Real libvirtd (qemu:///system).
"""

from __future__ import annotations

import json
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import RunQinst, qinst_argv, qinst_env
from guest import domains, force_remove, unique_name, volumes

BOOT = 900.0
NODE_XML = """<node>
  <domain type="test"><name>alive</name><memory>65536</memory><os><type>hvm</type></os></domain>
  <pool type="dir">
    <name>qinst</name>
    <target><path>/qinst-test-pool</path></target>
    <volume type="file"><name>gone-1.qcow2</name><capacity>1024</capacity></volume>
    <volume type="file"><name>gone-1-seed.iso</name><capacity>512</capacity></volume>
    <volume type="file"><name>alive.qcow2</name><capacity>1024</capacity></volume>
    <volume type="file"><name>alive-seed.iso</name><capacity>512</capacity></volume>
    <volume type="file"><name>notes.txt</name><capacity>1</capacity></volume>
  </pool>
</node>
"""


def _kill_up_at(phase: str, name: str, env: dict[str, str], ssh_key: Path) -> None:
    argv = [
        *qinst_argv(), "up", "qinst-test", "--name", name, "--network", "user:restrict", "--ssh-key", str(ssh_key),
        "--disk", "3", "--memory", "512", "--timeout", str(BOOT),
    ]  # fmt: skip
    proc = subprocess.Popen(
        argv, env=qinst_env(**env, QINST_TEST_PAUSE_AT=phase), stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    seen = []
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stderr], [], [], 5)
            line = proc.stderr.readline() if ready else ""
            seen.append(line)
            if line.strip() == f"qinst: test pause at {phase}":
                break
            if proc.poll() is not None:
                pytest.fail(f"up ended (exit {proc.returncode}) before phase {phase}:\n{''.join(seen)}")
        else:
            pytest.fail(f"up did not reach phase {phase}:\n{''.join(seen)}")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _listed(qinst: RunQinst, env: dict[str, str], name: str) -> dict[str, object]:
    proc = qinst("ls", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    mine = [row for row in json.loads(proc.stdout) if row["name"] == name]
    assert len(mine) == 1, proc.stdout
    return dict(mine[0])


@pytest.mark.vm
@pytest.mark.libvirt
@pytest.mark.parametrize(
    ("phase", "state", "rm"),
    [
        ("overlay", "orphan", ["rm"]),
        ("seed", "orphan", ["rm"]),
        ("define", "shutoff", ["rm"]),
        ("wait", "running", ["rm", "--force"]),
    ],
)
def test_kill_up_at_each_phase_then_ls_and_rm(
    qinst: RunQinst, vm_env: dict[str, str], ssh_key: Path, phase: str, state: str, rm: list[str]
) -> None:
    name = unique_name(f"kill-{phase}")
    console = Path(f"/var/log/libvirt/qemu/{name}-console.log")
    try:
        _kill_up_at(phase, name, vm_env, ssh_key)
        mine = {v for v in volumes() if v.startswith(name)}
        expected = {f"{name}.qcow2"} if phase == "overlay" else {f"{name}.qcow2", f"{name}-seed.iso"}
        assert mine == expected
        assert (name in domains()) == (phase in ("define", "wait"))
        if phase == "wait":
            assert console.exists()

        row = _listed(qinst, vm_env, name)
        assert row["state"] == state
        if state == "orphan":
            assert set(row["volumes"]) == expected  # type: ignore[arg-type]

        removed = qinst(*rm, name, env=vm_env, timeout=120)
        assert removed.returncode == 0, removed.stderr
        for vol in expected:
            assert f"volume {vol}" in removed.stderr
        assert name not in domains()
        assert not {v for v in volumes() if v.startswith(name)}
        assert not console.exists() and not console.with_name(f"{name}.log").exists()
        assert name not in {row["name"] for row in json.loads(qinst("ls", "--json", env=vm_env).stdout)}
    finally:
        force_remove(name)


@pytest.mark.libvirt
def test_ls_rm_and_prune_of_orphan_volumes(qinst: RunQinst, tmp_path: Path) -> None:
    """libvirt's test driver: a pool holding an orphan's volumes, a live domain's, and a stranger's file."""
    pytest.importorskip("libvirt")
    node = tmp_path / "node.xml"
    node.write_text(NODE_XML)
    args = ["--connect", f"test://{node}", "--cache-dir", str(tmp_path / "cache")]

    listed = qinst(*args, "ls", "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == [
        {"name": "gone-1", "state": "orphan", "volumes": ["gone-1-seed.iso", "gone-1.qcow2"]}
    ]
    table = qinst(*args, "ls").stdout.splitlines()
    assert table[1].split() == ["gone-1", "orphan", "-", "-", "-", "-"]

    rm = qinst(*args, "rm", "gone-1")
    assert rm.returncode == 0, rm.stderr
    assert "volume gone-1.qcow2" in rm.stderr and "volume gone-1-seed.iso" in rm.stderr
    assert qinst(*args, "rm", "alive").returncode == 2  # a domain that is not qinst's: its volumes are not orphans

    pruned = qinst(*args, "prune", "--json")  # each command is a fresh test-driver state: the orphan is back
    assert pruned.returncode == 0, pruned.stderr
    assert json.loads(pruned.stdout) == [
        {"path": "volume qinst/gone-1-seed.iso", "size": 512},
        {"path": "volume qinst/gone-1.qcow2", "size": 1024},
    ]
