"""Benchmark: launching the test image with `qinst up` against virt-install, kcli and libvirt's own floor.

Time to a running domain (image already cached): `qinst up --no-wait` against `virt-install --import --cloud-init
--noautoconsole` (on a qcow2 overlay made with qemu-img, timed on its own), `kcli create vm`, and the floor: libvirt's
define + start of qinst's own domain XML through the API, in-process. Then time to cloud-init finished (its final
line on the serial console), to SSH answering on 127.0.0.1 and, for qinst, to `qinst up` returning ready. Also
`qinst --help`, and each tool's peak RSS. Runs alternate between the tools and each starts on an idle machine.
testcloud and virt-lightning are installed from PyPI into a throwaway virtualenv and reported with the reason they
cannot run here.

    .venv/bin/python bench/launch.py [--runs N] [--boot-runs M] [--json FILE] [--image-dir DIR] [--no-peers]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Protocol

import _root  # noqa: F401  (testsupport/ on sys.path)
import libvirt
from idle import merge_idle, undisturbed
from output import fmt_summary, log, table, write_json
from session import Qinst, qinst_session, test_image, token
from timing import Ran, check, quiet, run_timed, summarize

from qemu_instances import seed as seeds
from testsupport.net import free_port, ssh_banner
from testsupport.virsh import URI, pools, remove_domain, remove_pool

# Measure qinst as installed: Python writes its bytecode on the first run (warm-up), not on every run.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
IMAGE = "qinst-test"
MEMORY_MIB = 1024
CPUS = 2
DISK_GIB = 10
AARCH64_UEFI = "uefi,firmware.feature0.name=secure-boot,firmware.feature0.enabled=no"  # the firmware qinst picks
BOOT_TIMEOUT = 600.0
# cloud-init's final line on the console; kcli replaces it with its own final_message.
CLOUD_INIT_DONE = re.compile(r"Cloud-init v\. \S+ finished at ([^\n]*)\n|kcli boot finished, up")
DATASOURCE = re.compile(r"Datasource (\w+)")
KERNEL = re.compile(r"Linux version \d|Booting Linux|Kernel command line:")  # as qinst's readiness marks it
GOALS = {"qinst_minus_floor_s": 0.15, "ready_minus_cloud_init_s": 2.0, "help_s": 0.3}
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"

libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors are handled where they happen, not printed


def _event_loop() -> None:
    while True:
        libvirt.virEventRunDefaultImpl()


# A console stream only moves data while libvirt's event loop runs (registered before any connection opens).
libvirt.virEventRegisterDefaultImpl()
threading.Thread(target=_event_loop, daemon=True, name="libvirt-events").start()


# ---- watching a boot from the outside, the same way for every tool ----


def serial_log(xml: str) -> Path | None:
    """The file the domain's serial console is recorded to (a file serial, or a pty with <log file=...>)."""
    root = ET.fromstring(xml)
    for serial in root.iterfind("./devices/serial"):
        if serial.get("type") == "file":
            source = serial.find("source")
            if source is not None and source.get("path"):
                return Path(source.get("path", ""))
        logged = serial.find("log")
        if logged is not None and logged.get("file"):
            return Path(logged.get("file", ""))
    return None


class Watch(threading.Thread):
    """Seconds since t0 until the domain runs, cloud-init's final line reaches the serial console, SSH answers.

    The console is read from its log file, or (stream=True, for a pty console without a log, as kcli makes) through
    libvirt's console stream. SSH is probed on 127.0.0.1 only.
    """

    def __init__(self, name: str, t0: float, ssh_port: int | None = None, stream: bool = False) -> None:
        super().__init__(daemon=True)
        self.name, self.t0, self.ssh_port, self.stream = name, t0, ssh_port, stream
        self.running: float | None = None
        self.cloud_init: float | None = None
        self.ssh: float | None = None
        self.kernel: float | None = None  # the kernel's first console line seen (the firmware's end)
        self.datasource = ""  # from cloud-init's final line: DataSourceNone means it found no seed
        self.console: list[str] = []  # everything read from the console, for bootprofile.console_phases
        self.error = ""
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(10)

    def done(self) -> bool:
        return None not in (self.running, self.cloud_init) and (self.ssh_port is None or self.ssh is not None)

    def run(self) -> None:
        try:
            self._watch()
        except Exception as exc:  # reported with the results, never silently
            self.error = f"{type(exc).__name__}: {exc}"

    def _watch(self) -> None:
        conn = libvirt.open(URI)
        dom: Any = None
        console: Path | None = None
        stream: Any = None
        offset = 0
        text = ""
        next_ssh = 0.0
        deadline = time.monotonic() + BOOT_TIMEOUT
        try:
            while not self._stop_event.is_set() and time.monotonic() < deadline and not self.done():
                now = time.perf_counter() - self.t0
                if dom is None:
                    with contextlib.suppress(libvirt.libvirtError):
                        dom = conn.lookupByName(self.name)
                if dom is not None and self.running is None:
                    try:
                        if dom.isActive():
                            self.running = now
                    except libvirt.libvirtError:
                        pass
                new = b""
                if self.running is not None and self.stream:
                    if stream is None:
                        stream = conn.newStream(libvirt.VIR_STREAM_NONBLOCK)
                        try:
                            dom.openConsole(None, stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
                        except libvirt.libvirtError:  # "PTY device is not yet assigned": QEMU is still starting
                            stream = None
                    while stream is not None and isinstance(chunk := stream.recv(65536), bytes) and chunk:
                        new += chunk
                elif self.running is not None:
                    console = console or serial_log(dom.XMLDesc(0))
                    if console is not None and console.exists():
                        with console.open("rb") as f:
                            f.seek(offset)
                            new = f.read()
                        offset += len(new)
                if new:
                    fresh = new.decode("utf-8", "replace")
                    self.console.append(fresh)
                    text = text[-400:] + fresh
                    if self.kernel is None and KERNEL.search(text):
                        self.kernel = now
                    if self.cloud_init is None and (done := CLOUD_INIT_DONE.search(text)):
                        self.cloud_init = now
                        found = DATASOURCE.search(done[1] or "")
                        self.datasource = found[1] if found else ""
                # SSH only once cloud-init finished: each probe makes the guest's sshd fork and re-exec, seconds of
                # emulated CPU, so probing a booting TCG guest every 0.5 s slowed the very boot being measured.
                if self.ssh_port and self.ssh is None and self.cloud_init is not None and now >= next_ssh:
                    next_ssh = now + 0.5
                    if ssh_banner(self.ssh_port, 0.5):
                        self.ssh = time.perf_counter() - self.t0
                time.sleep(0.1)
        finally:
            if stream is not None:
                with contextlib.suppress(libvirt.libvirtError):
                    stream.abort()
            conn.close()


# ---- the tools: each is a Peer ----


class Peer(Protocol):
    """A launcher measured side by side with qinst: a new peer is a class, not a branch in measure()."""

    label: str
    streams_console: bool  # its console is read through libvirt (no file, no SSH port forward to watch)

    def to_running(self, name: str) -> dict[str, float]:
        """Make a fresh domain `name` and time it to running: {"running": s, ...more figures}."""
        ...

    def prepare_boot(self, name: str) -> None:
        """What must exist before a boot is timed (not part of it)."""
        ...

    def boot(self, name: str, ssh_port: int) -> dict[str, Any]:
        """Boot `name` fully (SSH forwarded from ssh_port); the tool's own figures (the watch times the rest)."""
        ...

    def remove(self, name: str) -> None: ...


def learn_kvm_verdict(auto: QinstTool, name: str) -> None:
    """Let qinst remember, as a user's second `up` does, that KVM fails here (warm-up, not measured).

    A first `up --no-wait` may return before its KVM guest pauses (on these machines ~15 s into the boot); removed
    at once, it teaches qinst nothing, and every "remembered" run would pay a KVM start again. So wait for that
    guest to pause (or to keep running: KVM works, nothing to learn) and start a second one, which sees the paused
    instance and records the verdict."""
    auto.running(name)
    deadline = time.monotonic() + 90
    state = ""
    while time.monotonic() < deadline:
        state = quiet(["virsh", "--connect", URI, "domstate", name]).stdout.strip()
        if state == "paused" or any((auto.q.cache / "kvm-verdicts").glob("*")):
            break  # paused, or KVM failed at start and qinst already remembered it
        time.sleep(1)
    if state == "paused":
        auto.running(name + "-2")
        auto.remove(name + "-2")
    auto.remove(name)
    learned = any((auto.q.cache / "kvm-verdicts").glob("*"))
    log(f"warm-up: qinst's first guest under --accel auto was {state or 'unknown'}; KVM verdict remembered: {learned}")


def figures(ran: Ran) -> dict[str, float]:
    """A command's time to a running domain and its peak RSS."""
    return {"running": ran.seconds, "rss_mib": ran.max_rss_kib / 1024}


class QinstTool:
    """qinst as the benchmark forces it (`--accel tcg`), or as a user runs it (`accel=None`: the default, auto).

    Under auto, a host where KVM is present but fails pays a failed KVM start until qinst remembers the failure
    (kvmverdict.py); `fresh` forgets it before each run, as on a new machine (the first `up` of a user)."""

    streams_console = False

    def __init__(
        self, q: Qinst, accel: str | None = "tcg", fresh: bool = False, image: str = IMAGE, more: tuple[str, ...] = ()
    ) -> None:
        self.q = q
        self.accel = accel
        self.fresh = fresh
        self.image = image
        self.more = more  # further options of every `up` (bench/boot.py: --arch, --host-key-types)
        self.label = "qinst up --no-wait" + (
            f" --accel {accel}" if accel else " (defaults: --accel auto" + (", first run)" if fresh else ")")
        )

    def args(self, name: str, *more: str) -> list[str]:
        return [
            "up",
            self.image,
            "--name",
            name,
            "--cpus",
            str(CPUS),
            "--memory",
            str(MEMORY_MIB),
            "--disk",
            str(DISK_GIB),
            *(["--accel", self.accel] if self.accel else []),
            "--network",
            "user:restrict",
            "--ssh-key",
            str(self.q.key),
            "--json",
            *self.more,
            *more,
        ]

    def running(self, name: str) -> Ran:
        if self.fresh:
            shutil.rmtree(self.q.cache / "kvm-verdicts", ignore_errors=True)  # not timed: before the command
        return check(self.q.run(*self.args(name, "--no-wait")), "qinst up --no-wait")

    def to_running(self, name: str) -> dict[str, float]:
        return figures(self.running(name))

    def prepare_boot(self, name: str) -> None:
        pass  # it makes its own disk

    def boot(self, name: str, ssh_port: int) -> dict[str, Any]:
        timeout = str(int(BOOT_TIMEOUT))
        ran = check(self.q.run(*self.args(name, "--ssh-port", str(ssh_port), "--timeout", timeout)), "qinst up")
        return {
            "ready": ran.seconds,
            "boot_rss_mib": ran.max_rss_kib / 1024,
            "phases": _json(ran.stdout).get("timings", {}),
        }

    def remove(self, name: str) -> None:
        quiet(self.q.argv("rm", "--force", name), self.q.env)
        remove_domain(name)


class VirtInstall:
    """virt-install on an overlay of the cached image, same user-data as qinst's, same guest hardware."""

    label = "virt-install --import --cloud-init --noautoconsole"
    streams_console = False

    def __init__(
        self, q: Qinst, work: Path, base: Path, cpu: str | None = "mode=maximum", arch: str = "x86_64"
    ) -> None:
        """cpu None: virt-install's own default (qemu64 under TCG on x86_64); arch aarch64: machine virt, UEFI."""
        self.q, self.work, self.base, self.cpu, self.arch = q, work, base, cpu, arch

    def files(self, name: str) -> dict[str, Path]:
        d = self.work / name
        return {
            "dir": d,
            "disk": d / "disk.qcow2",
            "user-data": d / "user-data",
            "meta-data": d / "meta-data",
            "console": d / "console.log",
        }

    def prepare(self, name: str) -> Ran:
        """The seed inputs (untimed), then the overlay with qemu-img (timed: a virt-install user must make it)."""
        f = self.files(name)
        f["dir"].mkdir()
        f["dir"].chmod(0o755)
        spec = seeds.SeedSpec(
            hostname=name,
            instance_id=seeds.new_instance_id(),
            user="debian",
            ssh_keys=(self.q.key.read_text().strip(),),
        )
        for key, data in seeds.seed_files(spec).items():
            f[key].write_bytes(data)
        argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", self.base, f["disk"], f"{DISK_GIB}G"]
        return check(run_timed(argv), "qemu-img create")

    def argv(self, name: str, ssh_port: int) -> list[str]:
        f = self.files(name)
        net = f"user,id=benchnet0,hostfwd=tcp:127.0.0.1:{ssh_port}-:22,restrict=on"
        bus = "pcie.0" if self.arch == "aarch64" else "pci.0"  # virt's PCIe root bus, i440fx's PCI bus
        return [
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
            f"path={f['disk']},bus=virtio",
            "--cloud-init",
            f"user-data={f['user-data']},meta-data={f['meta-data']}",
            # virt-install's generic defaults (i440fx): on q35 its seed CD-ROM would sit on SATA, and Debian's cloud
            # kernel (genericcloud's, the test image's) has no AHCI driver, so cloud-init would find no seed.
            "--osinfo",
            "detect=on,require=off",
            "--virt-type",
            "qemu",
            *(["--cpu", self.cpu] if self.cpu else []),
            # arm64 cloud images boot only under UEFI, on the virt machine (as `qinst up --arch aarch64` makes it),
            # with qinst's firmware: secure boot off. virt-install's own choice, AAVMF_CODE.ms.fd with Microsoft's keys
            # enrolled, refuses a bootloader no shim signed (the test image's grub: "Access Denied").
            *(["--arch", "aarch64", "--machine", "virt", "--boot", AARCH64_UEFI] if self.arch == "aarch64" else []),
            # The same user-mode network with SSH forwarded from 127.0.0.1 as qinst's (passt is off in Debian 12).
            "--network",
            "none",
            # One argument with "=": a value that starts with "-" would be taken for an option.
            f"--qemu-commandline=-netdev {net} -device virtio-net-pci,netdev=benchnet0,bus={bus},addr=0x1e",
            "--serial",
            f"file,path={f['console']}",
            "--graphics",
            "none",
            "--noautoconsole",
        ]

    def running(self, name: str, ssh_port: int) -> Ran:
        return check(run_timed(self.argv(name, ssh_port)), "virt-install")

    def to_running(self, name: str) -> dict[str, float]:
        prep = self.prepare(name)
        ran = self.running(name, free_port())
        return {
            "running": ran.seconds,
            "prep": prep.seconds,
            "running_with_prep": ran.seconds + prep.seconds,
            "rss_mib": ran.max_rss_kib / 1024,
        }

    def prepare_boot(self, name: str) -> None:
        self.prepare(name)

    def boot(self, name: str, ssh_port: int) -> dict[str, Any]:
        self.running(name, ssh_port)
        return {}

    def remove(self, name: str) -> None:
        f = self.files(name)
        remove_domain(name)
        shutil.rmtree(f["dir"], ignore_errors=True)
        if pools().get(name) == str(f["dir"]):  # virt-install made a pool of the disk's directory
            remove_pool(name)


class Floor:
    """libvirt's define + start of qinst's domain XML (renamed, own overlay and seed), through the API."""

    label = "libvirt define + start (API, floor)"
    streams_console = False

    def __init__(self, template: str, work: Path, base: Path, q: Qinst) -> None:
        self.template, self.work, self.base, self.q = template, work, base, q
        ET.register_namespace("qemu", QEMU_NS)

    def xml(self, name: str) -> str:
        d = self.work / name
        root = ET.fromstring(self.template)
        root.find("name").text = name  # type: ignore[union-attr]
        for tag in ("uuid", "metadata", "title"):
            for el in root.findall(tag):
                root.remove(el)
        for disk in root.iterfind("./devices/disk"):
            source = disk.find("source")
            assert source is not None
            source.set("file", str(d / ("seed.iso" if source.get("file", "").endswith(".iso") else "disk.qcow2")))
        for logged in root.iterfind("./devices/*/log"):
            logged.set("file", str(d / "console.log"))
        for arg in root.iter(f"{{{QEMU_NS}}}arg"):
            arg.set(
                "value",
                re.sub(r"hostfwd=tcp:127\.0\.0\.1:\d+-", f"hostfwd=tcp:127.0.0.1:{free_port()}-", arg.get("value", "")),
            )
        return ET.tostring(root, encoding="unicode")

    def prepare(self, name: str) -> str:
        d = self.work / name
        d.mkdir()
        d.chmod(0o755)
        argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", self.base, d / "disk.qcow2", "10G"]
        check(run_timed(argv), "qemu-img create")
        key = self.q.key.read_text().strip()
        spec = seeds.SeedSpec(hostname=name, instance_id=seeds.new_instance_id(), user="debian", ssh_keys=(key,))
        (d / "seed.iso").write_bytes(seeds.build_seed_iso(spec))
        return self.xml(name)

    def running(self, xml: str) -> float:
        start = time.perf_counter()
        conn = libvirt.open(URI)
        try:
            conn.defineXML(xml).create()
            return time.perf_counter() - start
        finally:
            conn.close()

    def to_running(self, name: str) -> dict[str, float]:
        return {"running": self.running(self.prepare(name))}

    def prepare_boot(self, name: str) -> None:
        raise NotImplementedError("the floor is measured to a running domain only")

    def boot(self, name: str, ssh_port: int) -> dict[str, Any]:
        raise NotImplementedError("the floor is measured to a running domain only")

    def remove(self, name: str) -> None:
        remove_domain(name)
        shutil.rmtree(self.work / name, ignore_errors=True)


class Kcli:
    """kcli (from PyPI) with its own pool holding the image, TCG (virttype=qemu), no network (its NICs use NAT)."""

    label = "kcli create vm"
    streams_console = True  # no network: its console is watched through libvirt

    def __init__(self, exe: Path, work: Path, base: Path) -> None:
        self.exe = exe
        self.home = work / "kcli-home"
        self.pool_dir = work / "kcli-pool"
        self.pool = f"bench-kcli-{token()}"
        self.env = {**os.environ, "HOME": str(self.home)}

    def setup(self, base: Path) -> None:
        (self.home / ".kcli").mkdir(parents=True)
        (self.home / ".ssh").mkdir()
        self.pool_dir.mkdir()
        self.pool_dir.chmod(0o755)
        try:
            os.link(base, self.pool_dir / "qinst-test.qcow2")  # no copy: same file system
        except OSError:
            shutil.copy(base, self.pool_dir / "qinst-test.qcow2")
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.home / ".ssh/id_ed25519")], check=True
        )
        config = f"default:\n  client: local\nlocal:\n  type: kvm\n  host: 127.0.0.1\n  pool: {self.pool}\n"
        (self.home / ".kcli/config.yml").write_text(config)
        check(
            run_timed(["virsh", "--connect", URI, "pool-create-as", self.pool, "dir", "--target", self.pool_dir]),
            "pool",
        )

    def argv(self, name: str) -> list[str]:
        return [
            str(self.exe),
            "create",
            "vm",
            "-i",
            "qinst-test.qcow2",
            "-P",
            "virttype=qemu",
            "-P",
            "nets=[]",
            "-P",
            f"memory={MEMORY_MIB}",
            "-P",
            f"numcpus={CPUS}",
            name,
        ]

    def running(self, name: str) -> Ran:
        ran = check(run_timed(self.argv(name), self.env, cwd=self.home), "kcli create vm")
        if f"{name} created" not in ran.stdout + ran.stderr:
            raise RuntimeError(f"kcli did not create {name}: {ran.stdout}{ran.stderr}")
        return ran

    def to_running(self, name: str) -> dict[str, float]:
        return figures(self.running(name))

    def prepare_boot(self, name: str) -> None:
        pass  # it makes its own disk

    def boot(self, name: str, ssh_port: int) -> dict[str, Any]:
        self.running(name)
        return {}

    def remove(self, name: str) -> None:
        quiet([str(self.exe), "delete", "vm", "-y", name], self.env)
        remove_domain(name)
        for leftover in self.pool_dir.glob(f"{name}*"):
            leftover.unlink(missing_ok=True)

    def teardown(self) -> None:
        quiet(["virsh", "--connect", URI, "pool-destroy", self.pool])


# ---- peers from PyPI ----

PEER_CHECKS = {
    # What rules each out here, checked against the installed source so that a newer release is looked at again.
    "testcloud": (
        "testcloud/instance.py",
        'os.path.exists("/dev/kvm")',
        "it starts every guest with domain type 'kvm' whenever /dev/kvm exists (instance.py; no option for TCG), "
        "and KVM on this host is present but broken (guests stop PAUSED with an emulation failure)",
    ),
    "virt-lightning": (
        "virt_lightning/virt_lightning.py",
        "sorted(available)[0]",
        "it picks domain type 'kvm' whenever libvirt offers it (no option for TCG; KVM on this host is broken), and "
        "it waits for each guest over libvirt's NAT network at a private 192.168.x address, which the benchmark "
        "network rule forbids (loopback only)",
    ),
}


def install_peers(root: Path) -> dict[str, dict[str, Any]]:
    """pip install each peer into its own virtualenv under root; say for each whether and why it can run."""
    peers: dict[str, dict[str, Any]] = {}
    for name in ("testcloud", "virt-lightning", "kcli"):
        venv = root / name
        if not (venv / "bin/pip").exists():
            quiet([sys.executable, "-m", "venv", venv])
        log(f"pip install {name} (throwaway virtualenv)")
        try:
            proc = subprocess.run(
                [venv / "bin/pip", "install", "--disable-pip-version-check", "-q", name],
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            installed, why = proc.returncode == 0, (proc.stderr.strip().splitlines() or ["?"])[-1]
        except subprocess.TimeoutExpired:
            installed, why = False, "timed out after 600 s"
        if not installed:
            peers[name] = {"runs": False, "status": f"cannot run offline here: pip install {name} failed: {why}"}
            continue
        show = quiet([venv / "bin/pip", "show", name]).stdout
        version = next((line.split(":", 1)[1].strip() for line in show.splitlines() if line.startswith("Version:")), "")
        peers[name] = {"runs": True, "version": version, "status": "ran", "venv": str(venv)}
        if name in PEER_CHECKS:
            rel, marker, reason = PEER_CHECKS[name]
            source = next(venv.glob(f"lib/python*/site-packages/{rel}"), None)
            if source is not None and marker in source.read_text(errors="replace"):
                peers[name].update(runs=False, status=f"cannot run offline here: {reason}")
            else:
                peers[name].update(
                    runs=False, status=f"not benchmarked: {name} {version} changed since this benchmark looked at it"
                )
    return peers


# ---- the benchmark ----


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="rounds to a running domain (default 5)")
    parser.add_argument("--boot-runs", type=int, default=3, help="rounds of full boots (default 3; 0 skips)")
    parser.add_argument("--help-runs", type=int, default=10, help="runs of qinst --help (default 10)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--image-dir", type=Path, help="test image result dir (default: tests/images/build.sh)")
    parser.add_argument("--no-peers", action="store_true", help="skip installing testcloud, virt-lightning, kcli")
    parser.add_argument("--peers-dir", type=Path, help="keep the peers' virtualenvs here (default: a temporary dir)")
    args = parser.parse_args()
    for tool in ("virt-install", "qemu-img", "virsh", "ssh-keygen"):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found (apt-get install virtinst qemu-utils libvirt-clients openssh-client)")
    image_dir = test_image(args.image_dir)

    results: dict[str, Any] = {"benchmark": "launch", "runs": args.runs, "boot_runs": args.boot_runs}
    peer_root = args.peers_dir or Path(tempfile.mkdtemp(prefix="qinst-bench-peers-"))
    try:
        peers = {} if args.no_peers else install_peers(peer_root)
        with qinst_session("launch", IMAGE, image_dir) as (q, work):
            results.update(measure(q, work, peers, args))
        results["peers"] = {k: {kk: vv for kk, vv in v.items() if kk != "venv"} for k, v in peers.items()}
    finally:
        if not args.peers_dir:
            shutil.rmtree(peer_root, ignore_errors=True)
    print(markdown(results))
    write_json(args.json, results)


def measure(q: Qinst, work: Path, peers: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    base = q.shared_base()
    run_id = secrets.token_hex(2)
    qinst = QinstTool(q)
    vi = VirtInstall(q, work, base)
    kcli: Kcli | None = None
    if peers.get("kcli", {}).get("runs"):
        kcli = Kcli(Path(peers["kcli"]["venv"]) / "bin/kcli", work, base)
        kcli.setup(base)
        version = re.search(r"version: (\S+) commit: (\S+)", quiet([str(kcli.exe), "version"], kcli.env).stdout)
        if version:
            peers["kcli"]["version"] = f"{version[1]} (commit {version[2]})"
        peers["kcli"]["status"] = "ran: see the tables above"
    idle: list[dict[str, Any]] = []
    samples: dict[str, dict[str, list[float]]] = {}
    datasources: dict[str, list[str]] = {}

    def add(tool: str, key: str, value: float | None) -> None:
        if value is not None:
            samples.setdefault(tool, {}).setdefault(key, []).append(value)

    try:
        # Warm-up (not measured): one of each, and qinst's domain XML for the floor.
        log("warm-up: qinst, virt-install")
        name = f"bench-warm-{run_id}"
        qinst.running(name)
        template = quiet(["virsh", "--connect", URI, "dumpxml", "--inactive", name]).stdout
        qinst.remove(name)
        auto = QinstTool(q, accel=None)  # a user's first `up`: where KVM fails, qinst remembers it here
        learn_kvm_verdict(auto, name)
        floor = Floor(template, work, base, q)
        vi.prepare(name)
        vi.running(name, free_port())
        vi.remove(name)

        serial = iter(range(1_000_000))

        def fresh(kind: str) -> str:
            return f"bench-{kind}-{run_id}-{next(serial)}"

        peers_by_key: dict[str, Peer] = {
            "qinst": qinst,
            "qinst-auto": QinstTool(q, accel=None),
            "qinst-auto-first": QinstTool(q, accel=None, fresh=True),
            "virt-install": vi,
            "floor": floor,
        }
        if kcli is not None:
            peers_by_key["kcli"] = kcli

        def to_running(tool: str) -> dict[str, float]:
            """One measurement of tool's time to a running domain (a fresh domain, removed again)."""
            name = fresh(tool.replace("-", ""))
            try:
                return peers_by_key[tool].to_running(name)
            finally:
                peers_by_key[tool].remove(name)

        def boot(tool: str) -> dict[str, Any]:
            """One full boot, watched from outside: running, cloud-init finished, SSH answering, tool ready."""
            peer, name, port = peers_by_key[tool], fresh(f"boot{tool.replace('-', '')}"), free_port()
            peer.prepare_boot(name)
            streams = peer.streams_console
            watch = Watch(name, time.perf_counter(), ssh_port=None if streams else port, stream=streams)
            watch.start()
            try:
                got = peer.boot(name, port)
                deadline = time.monotonic() + BOOT_TIMEOUT
                while not watch.done() and watch.is_alive() and time.monotonic() < deadline:
                    time.sleep(0.2)
            finally:
                watch.stop()
                peer.remove(name)
            if watch.error or not watch.done():
                raise RuntimeError(f"{tool}: the boot of {name} was not seen through: {watch.error or 'timeout'}")
            got.update(boot_running=watch.running, cloud_init=watch.cloud_init, ssh=watch.ssh)
            datasources.setdefault(tool, []).append(watch.datasource or "?")
            if "ready" in got and watch.cloud_init is not None:
                got["ready_minus_cloud_init"] = got["ready"] - watch.cloud_init
            return got

        for i in range(args.runs):
            log(f"round {i + 1}/{args.runs}: time to a running domain")
            order = ["qinst", "qinst-auto", "virt-install", "qinst-auto-first", "floor"] + (["kcli"] if kcli else [])
            for tool in order[i % len(order) :] + order[: i % len(order)]:  # each tool goes first in turn
                for key, value in undisturbed(lambda tool=tool: to_running(tool), idle).items():
                    add(tool, key, value)

        phases: dict[str, list[float]] = {}
        for i in range(args.boot_runs):
            log(f"boot {i + 1}/{args.boot_runs}: time to cloud-init finished and SSH")
            # kcli boots once: its seed is never seen on this image (see the README), so more boots add nothing.
            order = ["qinst", "virt-install"] + (["kcli"] if kcli and i == 0 else [])
            for tool in order[i % len(order) :] + order[: i % len(order)]:
                got = undisturbed(lambda tool=tool: boot(tool), idle)
                for phase, seconds in got.pop("phases", {}).items():
                    phases.setdefault(phase, []).append(seconds)
                for key, value in got.items():
                    add(tool, key, value)

        log("qinst --help")
        helps = [check(run_timed([q.exe, "--help"], q.env), "qinst --help") for _ in range(args.help_runs)]
    finally:
        if kcli is not None:
            kcli.teardown()

    tools = {
        tool: {key: summarize(values) for key, values in by_key.items()} for tool, by_key in sorted(samples.items())
    }
    for tool, data in tools.items():
        data["label"] = peers_by_key[tool].label
    for tool, found in datasources.items():
        tools[tool]["datasources"] = found  # cloud-init's, from its final line: DataSourceNone = no seed seen
    if "qinst" in tools:
        tools["qinst"]["phases"] = {phase: summarize(v) for phase, v in phases.items()}
    med = {t: d["running"]["median"] for t, d in tools.items() if d.get("running")}
    ratios: dict[str, float] = {}
    if "qinst" in med and "virt-install" in med:
        ratios["qinst / virt-install (running)"] = med["qinst"] / med["virt-install"]
        ratios["qinst / (qemu-img + virt-install)"] = (
            med["qinst"] / tools["virt-install"]["running_with_prep"]["median"]
        )
    if "qinst" in med and "floor" in med:
        ratios["qinst / floor"] = med["qinst"] / med["floor"]
        ratios["qinst - floor (s)"] = med["qinst"] - med["floor"]
    for auto in ("qinst-auto", "qinst-auto-first"):
        if auto in med and "virt-install" in med and "floor" in med:
            ratios[f"{auto} / virt-install (running)"] = med[auto] / med["virt-install"]
            ratios[f"{auto} - floor (s)"] = med[auto] - med["floor"]
    if "qinst" in med and "kcli" in med:
        ratios["qinst / kcli (running)"] = med["qinst"] / med["kcli"]
    ci = {t: d["cloud_init"]["median"] for t, d in tools.items() if d.get("cloud_init")}
    if "qinst" in ci and "virt-install" in ci:
        ratios["qinst / virt-install (cloud-init finished)"] = ci["qinst"] / ci["virt-install"]
    return {
        "tools": tools,
        "help": summarize([h.seconds for h in helps]),
        "help_rss_mib": summarize([h.max_rss_kib / 1024 for h in helps]),
        "ratios": ratios,
        "goals": GOALS,
        "argv": {
            "qinst": ["qinst", *QinstTool(q).args("NAME", "--no-wait")],
            "virt-install": vi.argv("NAME", 2222),
            "kcli": kcli.argv("NAME")[1:] if kcli else None,
        },
        "idle": merge_idle(idle),
    }


def _json(text: str) -> dict[str, Any]:
    import json

    try:
        data = json.loads(text)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def markdown(r: dict[str, Any]) -> str:
    """The launch results as Markdown tables."""
    tools = r.get("tools", {})
    out = [f"**Time to a running domain** (image cached; {r['runs']} alternating rounds):", ""]
    rows = []
    for tool in ("floor", "qinst", "qinst-auto", "qinst-auto-first", "virt-install", "kcli"):
        d = tools.get(tool)
        if not d or not d.get("running"):
            continue
        rss = f"{d['rss_mib']['median']:.0f} MiB" if d.get("rss_mib") else "-"
        rows.append([d["label"], *fmt_summary(d["running"]), rss])
        if tool == "virt-install" and d.get("running_with_prep"):
            rows.append(["qemu-img create + virt-install", *fmt_summary(d["running_with_prep"]), rss])
    out.append(table(["", "median", "min", "max", "peak RSS (tool)"], rows))
    boots = [t for t in ("qinst", "virt-install", "kcli") if tools.get(t, {}).get("cloud_init")]
    if boots:
        out += ["", "**Boot to ready** (seconds from the command's start, median (min-max); alternating):", ""]
        rows = []
        for tool in boots:
            d = tools[tool]
            cells = []
            for key in ("boot_running", "cloud_init", "ssh", "ready"):
                s = d.get(key)
                if s and s["n"] > 1:
                    cells.append(f"{s['median']:.1f} s ({s['min']:.1f}-{s['max']:.1f})")
                else:
                    cells.append(f"{s['median']:.1f} s" if s else "-")
            name = "qinst up (wait)" if tool == "qinst" else d["label"]
            seeds_seen = ", ".join(sorted(set(d.get("datasources", []))))
            rows.append([name, f"{d['cloud_init']['n']}", *cells, seeds_seen])
        header = ["", "boots", "running", "cloud-init finished", "SSH answers", "tool returns ready", "datasource"]
        out.append(table(header, rows))
        unseeded = [t for t in boots if "DataSourceNone" in tools[t].get("datasources", [])]
        if unseeded:
            out += [
                "",
                f"DataSourceNone ({', '.join(unseeded)}): cloud-init found no seed, so the guest came up without its "
                "user, keys or host name: it attaches the seed as a SATA CD-ROM, and Debian's cloud kernel (as in "
                "genericcloud images, and this test image) has no AHCI driver.",
            ]
        q = tools.get("qinst", {})
        if q.get("ready_minus_cloud_init"):
            s = q["ready_minus_cloud_init"]
            out += ["", f"qinst returns {s['median']:.2f} s (median) after cloud-init's final console line."]
        if q.get("phases"):
            phases = ", ".join(f"{k} {v['median']:.2f} s" for k, v in q["phases"].items() if v)
            out.append(f"qinst's own phase timings (`qinst up --json`, medians): {phases}.")
    help_ = r.get("help")
    if help_:
        out += ["", f"`qinst --help`: {help_['median']:.3f} s median ({help_['min']:.3f}-{help_['max']:.3f})."]
    if r.get("ratios"):
        out += ["", "Ratios (medians): " + "; ".join(f"{k} = {v:.2f}" for k, v in r["ratios"].items()) + "."]
    for name, peer in r.get("peers", {}).items():
        version = f" {peer['version']}" if peer.get("version") else ""
        out.append(f"- {name}{version}: {peer['status']}")
    return "\n".join(out)


if __name__ == "__main__":
    main()
