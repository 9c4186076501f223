"""Boot-smoke runs: boot each image, check that it configured itself, report in JUnit XML.

Each image runs in its own thread with its own libvirt connection, so one image's failure or hang never
disturbs the others; every instance a run creates is removed (failed ones kept only with keep_failed).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import os
import re
import secrets
import socket
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from qemu_instances import instances
from qemu_instances.access import SshResult, console_text, ssh_run
from qemu_instances.domain import Accel
from qemu_instances.errors import GuestFailed, GuestTimeout, Interrupted, QinstError
from qemu_instances.fleet import for_host
from qemu_instances.host import Host
from qemu_instances.images import ImageStore
from qemu_instances.instances import Instance
from qemu_instances.launch import Launcher, UpRequest
from qemu_instances.seed import load_template
from qemu_instances.settings import Settings
from qemu_instances.sshkeys import generate_keypair
from qemu_instances.wait import Readiness

log = logging.getLogger("qinst")
SMOKE_DISK_GIB = 4
SMOKE_MEMORY_MIB = 1024
MARKER = "/var/lib/qinst/smoke-marker"
CONSOLE_LINES = 50


class Status(StrEnum):
    PASSED = "passed"
    FAILED = "failed"
    SKIPPED = "skipped"


@dataclass
class CheckResult:
    name: str
    status: Status
    seconds: float = 0.0
    message: str = ""  # what was expected and what was seen


@dataclass
class ImageReport:
    image: str
    instance: str = ""
    checks: list[CheckResult] = field(default_factory=list)
    properties: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    started: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat())
    console: str = ""  # the whole serial console, as recorded
    kept: bool = False

    @property
    def passed(self) -> bool:
        return any(c.status is Status.PASSED for c in self.checks) and not any(
            c.status is Status.FAILED for c in self.checks
        )

    @property
    def seconds(self) -> float:
        return round(sum(self.timings.values()), 2)

    def add(self, name: str, ok: bool, seconds: float, message: str = "") -> None:
        self.checks.append(CheckResult(name, Status.PASSED if ok else Status.FAILED, round(seconds, 3), message))

    def skip_rest(self, names: Sequence[str], why: str) -> None:
        done = {c.name for c in self.checks}
        self.checks += [CheckResult(n, Status.SKIPPED, 0.0, why) for n in names if n not in done]

    def console_tail(self, n: int = CONSOLE_LINES) -> str:
        lines = [line.rstrip("\r") for line in self.console.splitlines() if line.strip()]
        return "\n".join(lines[-n:])

    def to_json(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "instance": self.instance,
            "passed": self.passed,
            "checks": [{**c.__dict__, "status": str(c.status)} for c in self.checks],
            "properties": self.properties,
            "timings": self.timings,
            "kept": self.kept,
        }


CHECKS = ("pull", "launch", "booted", "cloud-init", "ssh", "hostname", "instance-id", "user-data", "root-fs")


@dataclass(frozen=True)
class SmokeOptions:
    timeout: float = 600.0
    parallel: int | None = None
    artifacts: Path | None = None
    keep_failed: bool = False
    accel: Accel = Accel.AUTO
    network: str = "user"
    hosts: tuple[str, ...] = ()  # spread the images over these configured hosts (round robin)
    cpus: int | None = None  # vCPUs per guest; default: the host's cores shared among the parallel boots


def default_parallel(count: int, memory_mib: int = SMOKE_MEMORY_MIB) -> int:
    """As many boots at once as cores and free memory allow (at least one)."""
    try:
        with open("/proc/meminfo") as f:
            meminfo = dict(line.split(":", 1) for line in f)
        free_mib = int(meminfo["MemAvailable"].split()[0]) // 1024
    except (OSError, KeyError, ValueError):
        free_mib = memory_mib
    by_memory = max(1, free_mib // (memory_mib + 512))
    return max(1, min(count, os.cpu_count() or 1, by_memory))


def _slug(image: str) -> str:
    text = re.sub(r"[^a-z0-9-]+", "-", image.lower().rsplit("/", 1)[-1]).strip("-")
    return text[:40] or "image"


class _Runner:
    """One image's smoke run."""

    def __init__(self, settings: Settings, image: str, opts: SmokeOptions, cancel: threading.Event, label: str) -> None:
        self.settings = settings
        self.label = label  # the image's folder under --artifacts
        self.opts = opts
        self.cancel = cancel
        self.report = ImageReport(image, instance=f"smoke-{_slug(image)}-{secrets.token_hex(2)}")
        if settings.host:
            self.report.properties["host"] = settings.host
        self.store = ImageStore(settings)

    def run(self) -> ImageReport:
        report = self.report
        with tempfile.TemporaryDirectory(prefix="qinst-smoke-") as keydir:
            try:
                inst = self._launch(Path(keydir))
                if inst is not None:
                    t = time.monotonic()
                    self._checks(inst)
                    self._artifacts(inst)
                    report.timings["checks"] = round(time.monotonic() - t, 2)
            finally:
                t = time.monotonic()
                self._finish()
                report.timings["cleanup"] = round(time.monotonic() - t, 2)
                if self.opts.artifacts is not None:
                    timings = self.opts.artifacts / self.label / "timings.json"
                    timings.write_text(json.dumps(report.timings, indent=2) + "\n")
        return report

    def _launch(self, keydir: Path) -> Instance | None:
        report = self.report
        t = time.monotonic()
        try:
            ref = self.store.resolve(report.image)
            image = self.store.pull(ref)
        except QinstError as exc:
            report.add("pull", False, time.monotonic() - t, exc.message)
            report.skip_rest(CHECKS, "the image could not be pulled")
            return None
        report.add("pull", True, time.monotonic() - t)
        report.properties["digest"] = str(image.digest)
        report.timings["download"] = round(time.monotonic() - t, 2)
        generate_keypair(keydir / "id_ed25519")  # a fresh key pair for this run only
        request = UpRequest(
            image=report.image,
            name=report.instance,
            memory_mib=SMOKE_MEMORY_MIB,
            cpus=self.opts.cpus or 1,
            disk_gib=SMOKE_DISK_GIB,
            ssh_keys=(keydir / "id_ed25519.pub",),
            network=self.opts.network,
            accel=self.opts.accel,
            timeout=self.opts.timeout,
            extra_config=load_template("smoke"),
        )
        readiness = Readiness()
        launch_timings: dict[str, float] = {}
        t = time.monotonic()
        try:
            result = Launcher(self.settings, self.store).up(
                request, readiness=readiness, cancel=self.cancel, timings=launch_timings
            )
        except (GuestTimeout, GuestFailed) as exc:
            self._boot_checks(readiness, str(exc.message).splitlines()[0])
            report.skip_rest(CHECKS, "the guest never became ready")
            return None
        except Interrupted:
            raise
        except QinstError as exc:
            report.add("launch", False, time.monotonic() - t, exc.message)
            report.skip_rest(CHECKS, "the instance could not be launched")
            return None
        finally:
            if "define" in launch_timings:
                report.timings["define"] = launch_timings["define"]
            report.timings.update(readiness.durations())
        report.add("launch", True, report.timings.get("define", 0.0))
        self._boot_checks(readiness, "")
        report.properties["accel"] = result.instance.metadata.accel
        report.properties["instance-id"] = result.instance.metadata.instance_id
        return result.instance

    def _boot_checks(self, readiness: Readiness, failure: str) -> None:
        """launch / booted, and on a failed launch the phase that never came (cloud-init or ssh)."""
        report, phases, spent = self.report, readiness.phases, readiness.durations()
        if "launch" not in {c.name for c in report.checks}:
            report.add("launch", "running" in phases, 0.0, "" if "running" in phases else failure)
        report.add(
            "booted",
            "kernel" in phases,
            spent.get("boot", 0.0),
            "" if "kernel" in phases else f"expected the kernel's boot messages on the console; {failure}",
        )
        if not failure or "kernel" not in phases:
            return
        if "cloud-init" not in phases:
            report.add(
                "cloud-init",
                False,
                spent.get("cloud-init", 0.0),
                f"expected 'Cloud-init v. ... finished' on the console; {failure}",
            )
        else:
            report.add("ssh", False, 0.0, f"expected SSH to offer the host key printed on the console; {failure}")

    def _ssh(self, inst: Instance, *command: str) -> SshResult:
        return ssh_run(inst, self.settings, command, timeout=min(120.0, self.opts.timeout))

    def _checks(self, inst: Instance) -> None:
        report = self.report
        status = self._ssh(inst, "cloud-init", "status", "--long")
        result = self._ssh(inst, "cat", "/run/cloud-init/result.json")
        errors: list[str] = []
        with contextlib.suppress(ValueError, KeyError, TypeError):
            errors = list(json.loads(result.stdout)["v1"]["errors"])
        done = status.ok and re.search(r"^status: done", status.stdout, re.M) is not None and not errors
        detail = status.stdout.strip().replace("\n", "; ") or status.stderr.strip()
        report.add(
            "cloud-init",
            done,
            report.timings.get("cloud-init", 0.0) + status.seconds,
            f"expected 'status: done' and no errors; saw: {detail}; errors: {errors}",
        )
        # Every command here runs with StrictHostKeyChecking against the keys the guest printed on its console.
        login = self._ssh(inst, "true")
        report.add(
            "ssh",
            login.ok,
            report.timings.get("ssh", 0.0) + login.seconds,
            f"expected a key login with the console's host key; saw: {login.stderr.strip()}",
        )
        hostname = self._ssh(inst, "hostname")
        report.add(
            "hostname",
            hostname.stdout.strip() == inst.name,
            hostname.seconds,
            f"expected {inst.name!r}, saw {hostname.stdout.strip() or hostname.stderr.strip()!r}",
        )
        expected_id = inst.metadata.instance_id
        seen_id = self._ssh(inst, "cat", "/var/lib/cloud/data/instance-id")
        report.add(
            "instance-id",
            seen_id.stdout.strip() == expected_id,
            seen_id.seconds,
            f"expected {expected_id!r}, saw {seen_id.stdout.strip() or seen_id.stderr.strip()!r}",
        )
        marker = self._ssh(inst, "cat", MARKER)
        report.add(
            "user-data",
            marker.stdout.strip() == expected_id,
            marker.seconds,
            f"expected {MARKER} (written by runcmd) to hold {expected_id!r}, "
            f"saw {marker.stdout.strip() or marker.stderr.strip()!r}",
        )
        size = self._ssh(inst, "df", "-B1", "--output=size", "/")
        try:
            root_bytes = int(size.stdout.split()[-1])
        except (ValueError, IndexError):
            root_bytes = 0
        want = SMOKE_DISK_GIB * (1 << 30)
        report.add(
            "root-fs",
            root_bytes >= 0.9 * want,
            size.seconds,
            f"expected / grown to about {SMOKE_DISK_GIB} GiB, saw {root_bytes / (1 << 30):.2f} GiB",
        )
        for check in report.checks:
            if check.status is Status.PASSED:
                check.message = ""
        for prop, command in (
            ("system-state", ("systemctl", "is-system-running")),
            ("kernel", ("uname", "-r")),
            ("cloud-init-version", ("cloud-init", "--version")),
        ):
            out = self._ssh(inst, *command)
            report.properties[prop] = (out.stdout.strip() or out.stderr.strip())[:200]

    def _artifacts(self, inst: Instance) -> None:
        if self.opts.artifacts is None:
            return
        directory = self.opts.artifacts / self.label
        directory.mkdir(parents=True, exist_ok=True)
        for log_file in ("/var/log/cloud-init.log", "/var/log/cloud-init-output.log"):
            out = self._ssh(inst, "sudo", "cat", log_file)
            if out.ok:
                (directory / Path(log_file).name).write_text(out.stdout)

    def _finish(self) -> None:
        """Record the console and timings, then remove the instance (kept only if it failed and keep_failed)."""
        report = self.report
        with contextlib.suppress(QinstError), Host(self.settings.connect) as host:
            try:
                _, inst = instances.get_instance(host, report.instance)
            except QinstError:
                inst = None
            if inst is not None:
                report.console = console_text(host, inst)
                if report.passed or not self.opts.keep_failed:
                    instances.remove(host, report.instance, force=True)
                else:
                    report.kept = True
        if self.opts.artifacts is not None:
            directory = self.opts.artifacts / self.label
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "console.log").write_text(report.console)


def run_smoke(
    settings: Settings,
    images: Sequence[str],
    opts: SmokeOptions,
    on_done: Callable[[ImageReport], None] | None = None,
) -> list[ImageReport]:
    """Smoke-test every image (opts.parallel at once); Ctrl-C stops all boots and removes their instances."""
    placed = [for_host(settings, opts.hosts[i % len(opts.hosts)]) for i in range(len(images))] if opts.hosts else []
    for target in {s.connect for s in placed} or {settings.connect}:
        with Host(target):
            pass  # every host must be usable at all (HypervisorError, exit 4, otherwise)
    cancel = threading.Event()
    parallel = opts.parallel or default_parallel(len(images)) * max(1, len(opts.hosts))
    if opts.cpus is None:
        # Guests emulated side by side are CPU-bound: more vCPUs than cores only slows every boot down.
        per_host = -(-min(parallel, len(images)) // max(1, len(opts.hosts)))
        opts = dataclasses.replace(opts, cpus=max(1, min(2, (os.cpu_count() or 1) // per_host)))
    reports: dict[int, ImageReport] = {}
    with _executor(parallel) as pool:
        labels = _labels(images)
        futures = {
            pool.submit(_Runner(placed[i] if placed else settings, image, opts, cancel, labels[i]).run): i
            for i, image in enumerate(images)
        }
        try:
            for future in concurrent.futures.as_completed(futures):
                report = future.result()
                reports[futures[future]] = report
                if on_done:
                    on_done(report)
        except BaseException:
            cancel.set()
            for f in futures:
                f.cancel()
            concurrent.futures.wait(futures)  # each runner removes its instance on the way out
            raise
    return [reports[i] for i in range(len(images))]


def _labels(images: Sequence[str]) -> list[str]:
    """A folder name per image (its slug; -2, -3... when an image is given more than once)."""
    seen: dict[str, int] = {}
    labels = []
    for image in images:
        slug = _slug(image)
        seen[slug] = seen.get(slug, 0) + 1
        labels.append(slug if seen[slug] == 1 else f"{slug}-{seen[slug]}")
    return labels


@contextlib.contextmanager
def _executor(workers: int) -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="smoke")
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-_]")
_NOT_XML = re.compile(r"[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def xml_text(text: str) -> str:
    """Console text made fit for XML 1.0: terminal escape sequences and control characters removed."""
    return _NOT_XML.sub("", _ANSI.sub("", text).replace("\r\n", "\n").replace("\x1b[K", ""))


def _fmt(seconds: float) -> str:
    return f"{seconds:.3f}"


def junit_xml(reports: Sequence[ImageReport]) -> bytes:
    """JUnit XML: a testsuite per image, a testcase per check, the last console lines with each failure."""
    root = ET.Element("testsuites", name="qinst smoke")
    total = failures = 0
    for report in reports:
        failed = [c for c in report.checks if c.status is Status.FAILED]
        skipped = [c for c in report.checks if c.status is Status.SKIPPED]
        suite = ET.SubElement(
            root,
            "testsuite",
            name=report.image,
            tests=str(len(report.checks)),
            failures=str(len(failed)),
            errors="0",
            skipped=str(len(skipped)),
            time=_fmt(report.seconds),
            timestamp=report.started,
            hostname=socket.gethostname(),
        )
        props = ET.SubElement(suite, "properties")
        for name, value in {"instance": report.instance, **report.properties}.items():
            ET.SubElement(props, "property", name=name, value=xml_text(value))
        for check in report.checks:
            case = ET.SubElement(
                suite, "testcase", classname=f"smoke.{_slug(report.image)}", name=check.name, time=_fmt(check.seconds)
            )
            if check.status is Status.FAILED:
                message = xml_text(check.message)
                failure = ET.SubElement(case, "failure", message=message, type="SmokeCheckFailed")
                failure.text = message
                ET.SubElement(case, "system-out").text = xml_text(report.console_tail())
            elif check.status is Status.SKIPPED:
                ET.SubElement(case, "skipped", message=xml_text(check.message))
        total += len(report.checks)
        failures += len(failed)
    root.set("tests", str(total))
    root.set("failures", str(failures))
    root.set("errors", "0")
    root.set("time", _fmt(sum(r.seconds for r in reports)))
    ET.indent(root)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode").encode() + b"\n"
