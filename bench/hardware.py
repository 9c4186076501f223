"""Benchmark: which guest hardware boots the test image fastest, and qinst's domain against virt-install's.

Each variant is a libvirt domain XML: qinst's own (`domain.domain_xml`, as the working tree builds it) with one
change applied (machine type, CPU model, disk cache/io, USB, balloon, RNG, timers, firmware, ...), or
virt-install's default XML for the same image (`virt-install --import --print-xml`, as bench/launch.py calls it:
i440fx, the seed as an IDE CD-ROM). Every boot gets a fresh qcow2 overlay of the test image, a NoCloud seed made
by `qinst seed`, the same user-mode network (restrict=on, SSH forwarded from 127.0.0.1 only) and is timed from
the define+start call to cloud-init's final line ("Cloud-init v. ... finished at") in its serial console log.
Variants alternate within each round (ABC... ABC..., each round rotated) so the machine's load falls on all alike;
the ratios are medians of side-by-side runs.

    .venv/bin/python bench/hardware.py [--rounds N] [--variants a,b,...] [--json FILE] [--image-dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _root  # noqa: F401  (testsupport/ on sys.path)
import libvirt
from output import log, table
from session import interrupt_on_sigterm, work_dir

from qemu_instances import domain
from testsupport.net import free_port
from testsupport.qinst import qinst_command
from testsupport.virsh import URI, pools, remove_domain, remove_pool

CPUS = 2
MEMORY_MIB = 1024
BOOT_TIMEOUT = 300.0
DONE = re.compile(rb"Cloud-init v\. \S+ finished at[^\n]*Datasource (\w+)")
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
PREFIX = "bench-hw-"

libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


# ---- the variants: each one change to an ElementTree of a domain ----

Change = Callable[[ET.Element], None]


def _devices(root: ET.Element) -> ET.Element:
    found = root.find("devices")
    assert found is not None
    return found


def machine(kind: str) -> Change:
    def change(root: ET.Element) -> None:
        os_type = root.find("os/type")
        assert os_type is not None
        os_type.set("machine", kind)
        if kind.startswith("pc"):  # the user-mode NIC goes on the PCI root bus of i440fx
            for arg in root.iter(f"{{{QEMU_NS}}}arg"):
                arg.set("value", arg.get("value", "").replace("bus=pcie.0", "bus=pci.0"))

    return change


def cpu_model(model: str) -> Change:
    def change(root: ET.Element) -> None:
        cpu = root.find("cpu")
        assert cpu is not None
        cpu.attrib.clear()
        for child in list(cpu):
            cpu.remove(child)
        if model in ("maximum", "host-model"):
            cpu.set("mode", model)
            return
        cpu.set("mode", "custom")
        cpu.set("match", "exact")
        cpu.set("check", "none")
        ET.SubElement(cpu, "model", fallback="forbid").text = model

    return change


def disk_driver(**attrs: str) -> Change:
    def change(root: ET.Element) -> None:
        for disk in _devices(root).iterfind("disk"):
            driver = disk.find("driver")
            assert driver is not None
            for key, value in attrs.items():
                driver.set(key, value)

    return change


def disks_on_scsi(root: ET.Element) -> None:
    devices = _devices(root)
    ET.SubElement(devices, "controller", type="scsi", index="0", model="virtio-scsi")
    for disk, dev in zip(devices.iterfind("disk"), ("sda", "sdb"), strict=False):
        target = disk.find("target")
        assert target is not None
        target.set("dev", dev)
        target.set("bus", "scsi")


def seed_on_scsi_cdrom(root: ET.Element) -> None:
    devices = _devices(root)
    ET.SubElement(devices, "controller", type="scsi", index="0", model="virtio-scsi")
    seed = devices.findall("disk")[1]
    seed.set("device", "cdrom")
    target = seed.find("target")
    assert target is not None
    target.set("dev", "sda")
    target.set("bus", "scsi")


def add_device(tag: str, **attrs: str) -> Change:
    def change(root: ET.Element) -> None:
        devices = _devices(root)
        for old in devices.findall(tag):
            if tag != "controller" or old.get("type") == attrs.get("type"):
                devices.remove(old)
        ET.SubElement(devices, tag, attrs)

    return change


def remove_device(tag: str) -> Change:
    def change(root: ET.Element) -> None:
        devices = _devices(root)
        for old in devices.findall(tag):
            devices.remove(old)

    return change


def timers(**present: str) -> Change:
    """<clock> timers: name -> 'no' (absent), or a tickpolicy."""

    def change(root: ET.Element) -> None:
        clock = root.find("clock")
        assert clock is not None
        for name, value in present.items():
            for old in clock.findall(f"timer[@name='{name}']"):
                clock.remove(old)
            if value == "no":
                ET.SubElement(clock, "timer", name=name, present="no")
            else:
                ET.SubElement(clock, "timer", name=name, tickpolicy=value)

    return change


def vcpus(n: int) -> Change:
    def change(root: ET.Element) -> None:
        vcpu = root.find("vcpu")
        assert vcpu is not None
        vcpu.text = str(n)

    return change


def on_root_bus(root: ET.Element) -> None:
    """Every PCI device of qinst's domain on q35's root bus (integrated endpoints): libvirt adds no root ports."""
    devices = _devices(root)
    slot = 2
    pci = [*devices.iterfind("disk"), *devices.iterfind("rng"), *devices.iterfind("memballoon")]
    if devices.find("channel") is not None and devices.find("controller[@type='virtio-serial']") is None:
        pci.append(ET.SubElement(devices, "controller", type="virtio-serial", index="0"))
    for dev in pci:
        if dev.get("model") == "none" or dev.find("address") is not None:
            continue
        ET.SubElement(dev, "address", type="pci", domain="0x0000", bus="0x00", slot=f"0x{slot:02x}", function="0x0")
        slot += 1


def cpu_features(**policies: str) -> Change:
    def change(root: ET.Element) -> None:
        cpu = root.find("cpu")
        assert cpu is not None
        for name, policy in policies.items():
            ET.SubElement(cpu, "feature", policy=policy, name=name)

    return change


def before(root: ET.Element) -> None:
    """qinst's guest hardware before bench/hardware.py chose it: libvirt's placement, USB, balloon, HPET."""
    devices = _devices(root)
    for dev in devices:
        for address in dev.findall("address"):
            dev.remove(address)
    for dev in devices.findall("controller"):
        if dev.get("type") in ("usb", "virtio-serial"):
            devices.remove(dev)
    for dev in devices.findall("memballoon"):
        devices.remove(dev)
    ET.SubElement(devices, "memballoon", model="virtio")
    clock = root.find("clock")
    assert clock is not None
    for timer in clock.findall("timer"):
        clock.remove(timer)


def uefi(root: ET.Element) -> None:
    os_el = root.find("os")
    assert os_el is not None
    os_el.set("firmware", "efi")
    fw = ET.Element("firmware")
    ET.SubElement(fw, "feature", enabled="no", name="secure-boot")
    ET.SubElement(fw, "feature", enabled="no", name="enrolled-keys")
    os_el.insert(0, fw)


def both(*changes: Change) -> Change:
    def change(root: ET.Element) -> None:
        for c in changes:
            c(root)

    return change


# name -> (what it is, the change to qinst's domain); "virt-install" is built by virt-install itself.
VARIANTS: dict[str, tuple[str, Change | None]] = {
    "qinst": ("qinst's domain as domain.py builds it", None),
    "qinst-before": ("qinst's domain before this benchmark's choices (commit a997b32)", before),
    "pc": ("machine i440fx (pc) instead of q35", machine("pc")),
    "qemu64": ("CPU model qemu64 instead of maximum", cpu_model("qemu64")),
    "haswell": ("CPU model Haswell-noTSX (named) instead of maximum", cpu_model("Haswell-noTSX")),
    "no-la57": ("CPU maximum without la57 (4-level paging)", cpu_features(la57="disable")),
    "no-svm": ("CPU maximum without svm (the guest's udev loads no kvm/kvm_amd modules)", cpu_features(svm="disable")),
    "q35-flat": ("q35, the virtio devices on the root bus (no pcie-root-ports)", on_root_bus),
    "usb-none": ("no USB controller", add_device("controller", type="usb", model="none")),
    "balloon-none": ("no memballoon", add_device("memballoon", model="none")),
    "rng-none": ("no virtio-rng", remove_device("rng")),
    "channel-none": ("no guest agent channel", remove_device("channel")),
    "cache-unsafe": ("disk cache=unsafe", disk_driver(cache="unsafe")),
    "cache-none": ("disk cache=none io=native", disk_driver(cache="none", io="native")),
    "io-threads": ("disk cache=writeback io=threads", disk_driver(cache="writeback", io="threads")),
    "io-uring": ("disk io=io_uring", disk_driver(io="io_uring")),
    "scsi": ("both disks on virtio-scsi", disks_on_scsi),
    "seed-scsi-cdrom": ("seed as a virtio-scsi CD-ROM", seed_on_scsi_cdrom),
    "hpet-off": ("hpet off", timers(hpet="no")),
    "timers-vi": (
        "virt-install's timers: rtc catchup, pit delay, hpet off",
        timers(rtc="catchup", pit="delay", hpet="no"),
    ),
    "vcpu1": ("1 vCPU instead of 2", vcpus(1)),
    "uefi": ("UEFI (OVMF, secure boot off) instead of SeaBIOS", uefi),
    "lean": (
        "no USB, no balloon",
        both(add_device("controller", type="usb", model="none"), add_device("memballoon", model="none")),
    ),
    "candidate": (
        "no USB, no balloon, virt-install's timers, devices on the root bus",
        both(
            add_device("controller", type="usb", model="none"),
            add_device("memballoon", model="none"),
            timers(rtc="catchup", pit="delay", hpet="no"),
            on_root_bus,
        ),
    ),
    "virt-install": ("virt-install --import --print-xml (i440fx, seed on IDE CD-ROM)", None),
}


# ---- building one boot's domain ----


class Boots:
    def __init__(self, work: Path, base: Path) -> None:
        self.work, self.base = work, base
        self.key = work / "id_ed25519.pub"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bench-hw", "-f", str(work / "id_ed25519")],
            check=True,
        )
        self.serial = 0
        self.run_id = secrets.token_hex(2)
        self.qinst = qinst_command()

    def prepare(self, variant: str) -> tuple[str, str, Path]:
        """(name, domain XML, console log) for one boot of variant, its overlay and seed made."""
        self.serial += 1
        name = f"{PREFIX}{self.run_id}-{self.serial}-{variant}"[:63]
        d = self.work / name
        d.mkdir()
        d.chmod(0o755)
        disk, seed, console = d / "disk.qcow2", d / "seed.iso", d / "console.log"
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(self.base), str(disk), "10G"],
            check=True,
        )
        subprocess.run(
            [self.qinst, "seed", "--out", seed, "--hostname", "bench-hw", "--user", "debian", "--ssh-key", self.key],
            check=True,
            capture_output=True,
        )
        port = free_port()
        if variant == "virt-install":
            xml = self.virt_install_xml(name, disk, seed, console, port)
        else:
            xml = self.qinst_xml(name, disk, seed, console, port, VARIANTS[variant][1])
        return name, xml, console

    def qinst_xml(self, name: str, disk: Path, seed: Path, console: Path, port: int, change: Change | None) -> str:
        spec = domain.InstanceSpec(
            name=name,
            cpus=CPUS,
            memory_mib=MEMORY_MIB,
            disk_path=str(disk),
            seed_path=str(seed),
            console_log=str(console),
            network=domain.Network.parse("user:restrict"),
            accel=domain.Accel.TCG,
            firmware=domain.Firmware.BIOS,
            ssh_port=port,
            metadata=domain.Metadata(image="qinst-test", digest="", user="debian", network="user:restrict"),
        )
        xml = domain.domain_xml(spec)
        if change is None:
            return xml
        ET.register_namespace("qemu", QEMU_NS)
        root = ET.fromstring(xml)
        change(root)
        return ET.tostring(root, encoding="unicode")

    def virt_install_xml(self, name: str, disk: Path, seed: Path, console: Path, port: int) -> str:
        """virt-install's XML as bench/launch.py runs it, the seed as the CD-ROM its --cloud-init would attach."""
        net = f"user,id=benchnet0,hostfwd=tcp:127.0.0.1:{port}-:22,restrict=on"
        before = set(pools())
        proc = subprocess.run(
            [
                "virt-install",
                "--connect",
                URI,
                "--name",
                name,
                "--memory",
                str(MEMORY_MIB),
                "--vcpus",
                str(CPUS),
                "--import",
                "--disk",
                f"path={disk},bus=virtio",
                "--disk",
                f"path={seed},device=cdrom",
                "--osinfo",
                "detect=on,require=off",
                "--virt-type",
                "qemu",
                "--cpu",
                "mode=maximum",
                "--network",
                "none",
                f"--qemu-commandline=-netdev {net} -device virtio-net-pci,netdev=benchnet0,bus=pci.0,addr=0x1e",
                "--serial",
                f"file,path={console}",
                "--graphics",
                "none",
                "--noautoconsole",
                "--print-xml",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        for pool, path in pools().items():  # virt-install defines a pool for the disk's directory
            if pool not in before and path.startswith(str(self.work)):
                remove_pool(pool)
        return proc.stdout


# Where the time goes, seen on the console: firmware + boot loader, kernel, systemd to cloud-init, its stages.
MILESTONES = {
    "kernel": b"Linux version",
    "init": b"Run /init",  # the initramfs
    "ci_local": b"running 'init-local'",
    "ci_init": b"running 'init'",
    "ci_config": b"running 'modules:config'",
    "ci_final": b"running 'modules:final'",
}


def boot(
    conn: libvirt.virConnect, items: list[tuple[str, str, Path]]
) -> dict[str, tuple[float, str, dict[str, float]]]:
    """Define and start each (variant, XML, console log) in turn, then watch all their consoles at once: for each,
    seconds from its own define+start to cloud-init's final line, the datasource it names, the milestones seen."""
    started: dict[str, tuple[float, Path]] = {}
    for variant, xml, console in items:
        t0 = time.perf_counter()
        conn.defineXML(xml).create()
        started[variant] = (t0, console)
    deadline = time.monotonic() + BOOT_TIMEOUT * len(items)
    seen: dict[str, dict[str, float]] = {v: {} for v in started}
    done: dict[str, tuple[float, str, dict[str, float]]] = {}
    while time.monotonic() < deadline and len(done) < len(started):
        for variant, (t0, console) in started.items():
            if variant in done:
                continue
            data = b""
            with contextlib.suppress(OSError):
                data = console.read_bytes()
            now = time.perf_counter() - t0
            for key, marker in MILESTONES.items():
                if key not in seen[variant] and marker in data:
                    seen[variant][key] = round(now, 2)
            if found := DONE.search(data):
                done[variant] = (now, found[1].decode(), seen[variant])
        time.sleep(0.1)
    if missing := sorted(started.keys() - done.keys()):
        raise RuntimeError(f"no cloud-init final line in time: {', '.join(missing)}")
    return done


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all variants (default 3)")
    parser.add_argument(
        "--variants", default="qinst,virt-install", help=f"comma-separated, from: {', '.join(VARIANTS)}"
    )
    parser.add_argument(
        "--together",
        action="store_true",
        help="boot a round's variants at the same time (each sees the same foreign load; for a busy host)",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--image-dir", type=Path, help="test image result dir (default: /tmp/test_image_path's)")
    args = parser.parse_args()
    chosen = args.variants.split(",")
    if unknown := [v for v in chosen if v not in VARIANTS]:
        sys.exit(f"unknown variants: {', '.join(unknown)}")
    image_dir = args.image_dir or Path(Path("/tmp/test_image_path").read_text().strip())
    base = next(image_dir.glob("mirror/**/debian-12-qinst-test-amd64.qcow2"))
    work = work_dir("hardware")
    conn = libvirt.open(URI)
    samples: dict[str, list[float]] = {v: [] for v in chosen}
    rounds: list[dict[str, Any]] = []
    xmls: dict[str, str] = {}
    orders: list[list[str]] = []
    try:
        with interrupt_on_sigterm():
            run(args, chosen, base, work, conn, samples, rounds, xmls, orders)
    except KeyboardInterrupt:
        log("interrupted: the results of the rounds done so far follow")
    results = summarize(chosen, samples, rounds)
    results["together"] = args.together
    results["start_orders"] = orders  # with --together, later starters were seen to finish sooner: rotate it
    results["xml"] = xmls
    results["host"] = {"machine": platform.node(), "cpus": os.cpu_count(), "qemu": _qemu_version()}
    print(markdown(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def run(
    args: argparse.Namespace,
    chosen: list[str],
    base: Path,
    work: Path,
    conn: libvirt.virConnect,
    samples: dict[str, list[float]],
    rounds: list[dict[str, Any]],
    xmls: dict[str, str],
    orders: list[list[str]],
) -> None:
    try:
        # A copy libvirt's QEMU user can read (the image cache under /root is not), as the pool's base would be.
        shutil.copy(base, work / "base.qcow2")
        (work / "base.qcow2").chmod(0o644)
        boots = Boots(work, work / "base.qcow2")
        for r in range(args.rounds):
            order = chosen[r % len(chosen) :] + chosen[: r % len(chosen)]  # each variant goes first in turn
            groups = [order] if args.together else [[v] for v in order]
            got: dict[str, Any] = {}
            for group in groups:
                prepared = {v: boots.prepare(v) for v in group}
                for v, (_, xml, _) in prepared.items():
                    xmls.setdefault(v, xml)
                load = loadavg()
                try:
                    results = boot(conn, [(v, xml, console) for v, (_, xml, console) in prepared.items()])
                finally:
                    for name, _, _ in prepared.values():
                        remove_domain(name)
                        shutil.rmtree(work / name, ignore_errors=True)
                for variant, (seconds, source, seen) in results.items():
                    if source != "DataSourceNoCloud":
                        raise RuntimeError(f"{variant}: cloud-init found no seed ({source})")
                    samples[variant].append(seconds)
                    got[variant] = {"seconds": round(seconds, 2), "load_before": load, "milestones": seen}
                    marks = " ".join(f"{k}={v:.0f}" for k, v in seen.items())
                    log(f"round {r + 1}/{args.rounds} {variant}: {seconds:.1f} s (load {load:.2f}; {marks})")
            rounds.append(got)
            orders.append(order)
    finally:
        conn.close()
        for name in [n for n in _domains() if n.startswith(PREFIX)]:
            remove_domain(name)
        shutil.rmtree(work, ignore_errors=True)


def _domains() -> list[str]:
    out = subprocess.run(["virsh", "--connect", URI, "list", "--all", "--name"], capture_output=True, text=True)
    return out.stdout.split()


def _qemu_version() -> str:
    out = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout
    return out.splitlines()[0] if out else "?"


def summarize(chosen: list[str], samples: dict[str, list[float]], rounds: list[dict[str, Any]]) -> dict[str, Any]:
    ref = "qinst" if "qinst" in chosen else chosen[0]
    variants: dict[str, Any] = {}
    for v in chosen:
        values = samples[v]
        # Per-round ratio to the reference booted in the same round: load shared alike.
        ratios = [got[v]["seconds"] / got[ref]["seconds"] for got in rounds if v in got and ref in got]
        variants[v] = {
            "what": VARIANTS[v][0],
            "median_s": round(statistics.median(values), 2) if values else None,
            "min_s": round(min(values), 2) if values else None,
            "max_s": round(max(values), 2) if values else None,
            "n": len(values),
            "values": [round(x, 2) for x in values],
            f"ratio_to_{ref}": round(statistics.median(ratios), 3) if ratios else None,
        }
        if "virt-install" in chosen:
            to_vi = [
                got[v]["seconds"] / got["virt-install"]["seconds"]
                for got in rounds
                if {v, "virt-install"} <= got.keys()
            ]
            variants[v]["ratio_to_virt_install"] = round(statistics.median(to_vi), 3) if to_vi else None
    out: dict[str, Any] = {"benchmark": "hardware", "reference": ref, "variants": variants, "rounds": rounds}
    pair = {"qinst", "virt-install"}
    per_round = [g["qinst"]["seconds"] / g["virt-install"]["seconds"] for g in rounds if len(g.keys() & pair) == 2]
    if per_round:
        out["qinst_over_virt_install"] = {
            "median_of_round_ratios": round(statistics.median(per_round), 3),
            "ratio_of_medians": round(variants["qinst"]["median_s"] / variants["virt-install"]["median_s"], 3),
            "per_round": [round(x, 3) for x in per_round],
        }
    return out


def markdown(r: dict[str, Any]) -> str:
    ref = r["reference"]
    rows = []
    for v, d in r["variants"].items():
        if not d["n"] or d[f"ratio_to_{ref}"] is None:
            continue
        rows.append(
            [
                v,
                d["what"],
                f"{d['median_s']:.1f} s",
                f"{d['min_s']:.1f}-{d['max_s']:.1f}",
                str(d["n"]),
                f"{d[f'ratio_to_{ref}']:.3f}",
                f"{d['ratio_to_virt_install']:.3f}" if d.get("ratio_to_virt_install") else "-",
            ]
        )
    out = [
        "**Domain start to cloud-init's final line** (alternating rounds, TCG):",
        "",
        table(
            ["variant", "what", "median", "range", "n", f"ratio to {ref} (median of rounds)", "ratio to virt-install"],
            rows,
        ),
    ]
    if vi := r.get("qinst_over_virt_install"):
        out += [
            "",
            f"qinst / virt-install: {vi['median_of_round_ratios']:.3f} (median of per-round ratios), "
            f"{vi['ratio_of_medians']:.3f} (ratio of medians).",
        ]
    return "\n".join(out)


if __name__ == "__main__":
    main()
