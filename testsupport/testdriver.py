"""libvirt's test driver (test:///default) in the tests: valid qinst records to change one field of, test-driver
domains that carry one, a spec to build domain XML from, the launcher's boot loop on the driver, QEMU's error for a
taken forward port, and the real `qinst` run against a test-driver host file."""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from qemu_instances.domain import METADATA_NS, Accel, Firmware, InstanceSpec, Metadata, Network, NetworkKind, domain_xml
from qemu_instances.host import Host
from qemu_instances.instances import console_log_name, disk_volume, seed_volume
from qemu_instances.launch import Plan, UpRequest, _Run
from qemu_instances.ports import HOSTFWD_TAKEN
from qemu_instances.wait import Readiness
from testsupport.qinst import qinst_argv, qinst_env


def instance_spec(**changes: object) -> InstanceSpec:
    """A valid spec of `vm1`, a TCG guest on a user network; `changes` replace its fields."""
    meta = Metadata(
        image="debian-12",
        digest="sha512:" + "ab" * 64,
        user="debian",
        network="user",
        ssh_host="127.0.0.1",
        ssh_port=2222,
        created="2026-11-28T12:00:00+00:00",
        instance_id="i-0123456789abcdef",
        volumes=("vm1.qcow2", "vm1-seed.iso"),
    )
    values: dict[str, object] = {
        "name": "vm1",
        "cpus": 2,
        "memory_mib": 512,
        "disk_path": "/pool/vm1.qcow2",
        "seed_path": "/pool/vm1-seed.iso",
        "console_log": "/var/log/libvirt/qemu/vm1-console.log",
        "network": Network(NetworkKind.USER),
        "accel": Accel.TCG,
        "firmware": Firmware.BIOS,
        "ssh_port": 2222,
        "metadata": meta,
    }
    values.update(changes)
    return InstanceSpec(**values)  # type: ignore[arg-type]


TEST_URI = "test:///default"
NS = "http://qinst.invalid/xmlns/instance/1"  # qinst's metadata namespace, spelled out


def plan_record(**fields: object) -> Metadata:
    """A valid record (debian-12, user `cloud`), as the launcher's plans carry; `fields` replace its values."""
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


def driver_xml(spec: InstanceSpec) -> str:
    """A domain the test driver accepts for TCG; a KVM one it refuses (as a host with broken KVM would)."""
    root = ET.fromstring(domain_xml(spec))
    test = ET.Element("domain", type="test")
    ET.SubElement(test, "name").text = spec.name
    ET.SubElement(test, "memory").text = "65536"
    ET.SubElement(ET.SubElement(test, "os"), "type").text = "no-kvm-here" if spec.accel is Accel.KVM else "hvm"
    test.append(root.find("metadata"))  # type: ignore[arg-type]
    return ET.tostring(test, encoding="unicode")


def boot_plan(name: str, accels: tuple[Accel, ...], *, wait: bool) -> tuple[Plan, InstanceSpec]:
    """A plan for Launcher._boot to try `accels` in turn (no image, no disk: the test driver boots nothing)."""
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
        metadata=plan_record(),
    )
    req = UpRequest(image="x", name=name, wait=wait)
    plan = Plan(req, name, None, None, None, b"", spec.network, 2222, accels, Path(spec.console_log), spec)  # type: ignore[arg-type]
    return plan, spec


def boot_run(host: Host, undo: contextlib.ExitStack) -> _Run:
    """The state of one `up` on `host` for Launcher._boot; `undo` removes what it made."""
    return _Run(host, undo, time.monotonic(), None, Readiness(), threading.Event(), 5.0)


def sample_record(**changes: object) -> Metadata:
    """A valid record (qinst-test, user `debian`, a creation time); `changes` replace its fields."""
    base = {
        "image": "qinst-test", "digest": "sha512:" + "0" * 128, "user": "debian", "network": "user",
        "ssh_host": "127.0.0.1", "ssh_port": 2222, "created": "2026-11-01T10:00:00+00:00",
        "host_keys": "ssh-ed25519 " + "A" * 68,
    }  # fmt: skip
    return Metadata(**{**base, **changes})  # type: ignore[arg-type]


def record_domain_xml(name: str, meta: Metadata | None) -> str:
    """A test-driver domain `name` whose <metadata> holds `meta` (None: no qinst record)."""
    record = meta.to_xml().replace("<instance>", f'<instance xmlns="{METADATA_NS}">', 1) if meta else ""
    return (
        f'<domain type="test"><name>{name}</name><memory>65536</memory><os><type>hvm</type></os>'
        f"<metadata>{record}</metadata></domain>"
    )


def run_qinst(uri: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The real `qinst` against libvirt at `uri`, its cache and config under `tmp_path`."""
    env = qinst_env(QINST_CONNECT=uri, QINST_CACHE_DIR=str(tmp_path / "cache"), XDG_CONFIG_HOME=str(tmp_path / "c"))
    return subprocess.run([*qinst_argv(), *args], capture_output=True, text=True, env=env, timeout=60, check=False)


# A record of `vm1` that passes every check of instances.validate_metadata, and the host key it holds.
RECORD_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
GOOD_RECORD = Metadata(
    image="debian-12", digest="sha512:" + "0" * 128, user="debian", network="user",
    ssh_host="127.0.0.1", ssh_port=2222, instance_id="iid-1", private_key="/home/u/.ssh/id",
    host_keys=f"{RECORD_KEY}\n", console_log=f"/var/log/{console_log_name('vm1')}", accel="tcg",
    volumes=(disk_volume("vm1"), seed_volume("vm1"), console_log_name("vm1")),
)  # fmt: skip


# QEMU's error when another process took the SSH forward's port before QEMU bound it (%d: the port).
PORT_TAKEN = (
    f"cannot start vm: internal error: qemu unexpectedly closed the monitor: {HOSTFWD_TAKEN} 'tcp:127.0.0.1:%d-:22'"
)
