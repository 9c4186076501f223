"""Boot-smoke runs: boot each image (under each firmware), run the checks in it, report.

Each image x firmware runs in its own thread with its own libvirt connection, so one image's failure or hang never
disturbs the others; every instance a run creates is removed (failed ones kept only with keep_failed). The checks
(checks.py) of one guest run over one SSH session. Reports: junit.py (JUnit XML), smokereport.py (JSON, baseline
comparison, Markdown summary).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qemu_instances import instances, ssh
from qemu_instances.access import ssh_target
from qemu_instances.arch import Arch
from qemu_instances.bootprofile import MODULE_LOG_COMMAND, console_phases, module_times
from qemu_instances.checks import (
    ARTIFACTS,
    PROPERTIES,
    Batch,
    Check,
    Context,
    Output,
    cloud_init_version,
    describe,
    plan,
)
from qemu_instances.console import recorded as recorded_console
from qemu_instances.domain import Accel, Firmware
from qemu_instances.errors import GuestFailed, GuestTimeout, Interrupted, QinstError, UsageError
from qemu_instances.files import write_atomically
from qemu_instances.fleet import for_host
from qemu_instances.host import Host
from qemu_instances.images import ImageStore
from qemu_instances.instances import Instance
from qemu_instances.junit import junit_xml
from qemu_instances.launch import Launcher, UpRequest, firmware_for, wait_seconds
from qemu_instances.logs import log
from qemu_instances.proc import collect, spawn
from qemu_instances.seed import DEFAULT_HOST_KEY_TYPES, load_template
from qemu_instances.settings import Settings
from qemu_instances.shards import Shard
from qemu_instances.smokereport import (
    Baseline,
    CheckResult,
    ImageReport,
    Status,
    regressions,
    results_json,
    summary_markdown,
)
from qemu_instances.sshkeys import generate_keypair
from qemu_instances.wait import Readiness

__all__ = ["CheckResult", "ImageReport", "SmokeOptions", "Status", "run_smoke", "write_reports"]

SESSION_OUTPUT = 64 << 20  # bytes of stdout kept from a guest's check session (README, "Reliability: limits")
SESSION_STDERR = 1 << 20
SMOKE_WAIT = 600.0  # seconds a native guest may take to become ready (launch.EMULATED x that for an emulated one)
SMOKE_DISK_GIB = 4
SMOKE_MEMORY_MIB = 1024
HOST_CHECKS = ("pull", "launch", "booted", "cloud-init", "ssh")


@dataclass(frozen=True)
class SmokeOptions:
    timeout: float | None = None  # seconds per image; default SMOKE_WAIT native, launch.EMULATED x that emulated
    parallel: int | None = None
    artifacts: Path | None = None
    keep_failed: bool = False
    accel: Accel = Accel.AUTO
    network: str = "user"
    hosts: tuple[str, ...] = ()  # spread the images over these configured hosts (round robin)
    cpus: int | None = None  # vCPUs per guest; default: the host's cores shared among the parallel boots
    memory_mib: int = SMOKE_MEMORY_MIB
    firmwares: tuple[Firmware | None, ...] = (None,)  # None: each architecture's own firmware
    arches: tuple[Arch, ...] = ()  # default: the host's
    host_key_types: tuple[str, ...] = DEFAULT_HOST_KEY_TYPES
    user_data: Path | None = None  # merged over smoke's own cloud-config
    latest: bool = False
    checks: tuple[Check, ...] = field(default_factory=lambda: tuple(plan([], [])))
    allow_warnings: tuple[re.Pattern[str], ...] = ()
    allow_failed_units: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()  # --skip: reported as skipped testcases
    retries: int = 0
    baseline: Baseline | None = None
    regression_threshold: float = 1.25
    shard: Shard | None = None  # --shard K/N: this CI job's share of the matrix


def build_options(
    *,
    timeout: float | None = None,
    parallel: int | None = None,
    artifacts: Path | None = None,
    keep_failed: bool = False,
    accel: Accel = Accel.AUTO,
    network: str = "user",
    hosts: str | None = None,
    checks_file: Path | None = None,
    check: Sequence[str] = (),
    skip: Sequence[str] = (),
    allow_warning: Sequence[str] = (),
    allow_failed_unit: Sequence[str] = (),
    firmwares: Sequence[Firmware | None] = (None,),
    arches: Sequence[Arch] = (),
    host_key_types: Sequence[str] = DEFAULT_HOST_KEY_TYPES,
    user_data: Path | None = None,
    cpus: int | None = None,
    memory: int = SMOKE_MEMORY_MIB,
    latest: bool = False,
    retries: int = 0,
    baseline: Path | None = None,
    regression_threshold: float = 1.25,
    shard: str | None = None,
) -> SmokeOptions:
    """`qinst smoke`'s options, every one checked before anything boots (UsageError, exit 2, naming the option):
    check files, regexes, the baseline, the user-data; the --artifacts folder is made last, so that a refused
    option leaves no empty folder behind."""
    import math

    from qemu_instances import checks as check_files
    from qemu_instances.domain import Network
    from qemu_instances.files import read_option_file
    from qemu_instances.smokereport import load_baseline
    from qemu_instances.validate import output_dir, seconds

    if retries < 0 or (cpus is not None and cpus < 1) or memory < 256:
        raise UsageError("--retries must be >= 0, --cpus >= 1 and --memory >= 256 (MiB)")
    if parallel is not None and parallel < 1:
        raise UsageError("--parallel must be >= 1")
    if not math.isfinite(regression_threshold) or regression_threshold < 1.0:
        raise UsageError("--regression-threshold must be a number >= 1")
    if timeout is not None:
        seconds(timeout, "--timeout")
    for arch in arches or (Arch.host(),):  # a firmware an architecture cannot use: refused, never dropped
        for firmware in firmwares:
            firmware_for(arch, firmware)
    Network.parse(network)
    read_option_file(user_data, "--user-data")  # as up checks it, once rather than at each image's launch
    user_checks = check_files.load_checks(checks_file) if checks_file else []
    user_checks += [check_files.parse_check_option(c) for c in check]
    planned = tuple(check_files.plan(user_checks, skip))
    allow_warnings = tuple(check_files.compile_regex(r, "--allow-warning") for r in allow_warning)
    last_night = load_baseline(baseline) if baseline else None
    if artifacts is not None:
        output_dir(artifacts, "--artifacts")
    return SmokeOptions(
        timeout=timeout,
        parallel=parallel,
        artifacts=artifacts,
        keep_failed=keep_failed,
        accel=accel,
        network=network,
        hosts=tuple(h.strip() for h in hosts.split(",") if h.strip()) if hosts else (),
        cpus=cpus,
        memory_mib=memory,
        firmwares=tuple(dict.fromkeys(firmwares)),
        arches=tuple(dict.fromkeys(arches)) or (Arch.host(),),
        host_key_types=tuple(host_key_types),
        user_data=user_data,
        latest=latest,
        checks=planned,
        skipped=tuple(dict.fromkeys(skip)),
        allow_warnings=allow_warnings,
        allow_failed_units=tuple(allow_failed_unit),
        retries=retries,
        baseline=last_night,
        regression_threshold=regression_threshold,
        shard=Shard.parse(shard) if shard is not None else None,
    )


@dataclass(frozen=True)
class Job:
    image: str
    firmware: Firmware
    label: str  # its folder under --artifacts
    arch: Arch = Arch.X86_64


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


def _first_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0]


def _last_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[-1]


class _Runner:
    """One image x firmware: boot, check, clean up; again up to opts.retries times while it fails."""

    def __init__(self, settings: Settings, job: Job, opts: SmokeOptions, cancel: threading.Event) -> None:
        self.settings = settings
        self.job = job
        self.opts = opts
        self.cancel = cancel
        self.store = ImageStore(settings)
        self.checks = [c for c in opts.checks if c.applies_to(job.image)]
        self.created = False  # whether the current attempt made its instance

    def run(self) -> ImageReport:
        first: ImageReport | None = None
        attempt = 1
        while True:
            report = self._attempt(keep=self.opts.keep_failed and attempt > self.opts.retries)
            if report.passed or attempt > self.opts.retries or self.cancel.is_set():
                break
            first = first or report
            log.info("%s failed (attempt %d of %d); trying again", report.suite, attempt, self.opts.retries + 1)
            attempt += 1
        report.attempts = attempt
        if first is not None:
            bad = first.failed[0] if first.failed else None
            report.first_failure = f"{bad.name}: {_first_line(bad.message)}" if bad else "no check passed"
        self._compare(report)
        if self.opts.artifacts is not None:
            directory = self.opts.artifacts / self.job.label
            directory.mkdir(parents=True, exist_ok=True)
            write_atomically(directory / "timings.json", (json.dumps(report.timings, indent=2) + "\n").encode())
        return report

    def _attempt(self, keep: bool) -> ImageReport:
        report = ImageReport(
            self.job.image,
            firmware=str(self.job.firmware),
            arch=str(self.job.arch),
            instance=f"smoke-{_slug(self.job.image)}-{secrets.token_hex(4)}",
        )
        self.created = False  # whether this attempt made the instance: only then is it removed
        if self.settings.host:
            report.properties["host"] = self.settings.host
        with tempfile.TemporaryDirectory(prefix="qinst-smoke-") as keydir:
            try:
                inst = self._launch(report, Path(keydir))
                if inst is not None:
                    t = time.monotonic()
                    self._checks(report, inst)
                    # The artifacts (journal, blame) are collected in the same session, timed inside the guest.
                    spent = time.monotonic() - t - report.timings.get("artifacts", 0.0)
                    report.timings["checks"] = round(max(spent, 0.0), 2)
            except Exception as exc:
                if isinstance(exc, Interrupted) or self.cancel.is_set():
                    raise
                # One image's unexpected fault is its own failure, never the end of the other images' runs.
                message = exc.message if isinstance(exc, QinstError) else f"{type(exc).__name__}: {exc}"
                report.add("smoke", False, 0.0, f"the smoke run itself failed: {message}")
            finally:
                t = time.monotonic()
                self._finish(report, keep)
                report.timings["cleanup"] = round(time.monotonic() - t, 2)
        return report

    def _launch(self, report: ImageReport, keydir: Path) -> Instance | None:
        names = list(dict.fromkeys([*HOST_CHECKS, *(c.name for c in self.checks)]))
        t = time.monotonic()
        try:
            ref = self.store.resolve(report.image, arch=self.job.arch)
            image = self.store.pull(ref, latest=self.opts.latest)
        except QinstError as exc:
            report.add("pull", False, time.monotonic() - t, exc.message)
            report.skip_rest(names, "the image could not be pulled")
            return None
        report.add("pull", True, time.monotonic() - t)
        report.properties["digest"] = str(image.digest)
        report.timings["download"] = round(time.monotonic() - t, 2)
        generate_keypair(keydir / "id_ed25519")  # a fresh key pair for this run only
        request = UpRequest(
            image=report.image,
            name=report.instance,
            memory_mib=self.opts.memory_mib,
            cpus=self.opts.cpus or 1,
            disk_gib=SMOKE_DISK_GIB,
            ssh_keys=(keydir / "id_ed25519.pub",),
            user_data=self.opts.user_data,
            network=self.opts.network,
            accel=self.opts.accel,
            firmware=self.job.firmware,
            arch=self.job.arch,
            host_key_types=self.opts.host_key_types,
            # Written to a throwaway overlay that is deleted after the run: flushes are not waited for (cache=unsafe
            # loses data only on a host crash, when the run is lost anyway). Never for `up`.
            disk_cache="unsafe",
            timeout=wait_seconds(self.opts.timeout, native=self.job.arch is Arch.host(), default=SMOKE_WAIT),
            latest=self.opts.latest,
            extra_config=load_template("smoke"),
        )
        readiness = Readiness()
        launch_timings: dict[str, float] = {}
        t = time.monotonic()
        try:
            result = Launcher(self.settings, self.store).up(
                request, readiness=readiness, cancel=self.cancel, timings=launch_timings
            )
            self.created = True
        except (GuestTimeout, GuestFailed) as exc:
            self.created = True  # the guest booted and is kept by `up`: this run removes it (or keeps it)
            self._boot_checks(report, readiness, _first_line(str(exc.message)))
            report.skip_rest(names, "the guest never became ready")
            return None
        except Interrupted:
            raise
        except QinstError as exc:
            report.add("launch", False, time.monotonic() - t, exc.message)
            report.skip_rest(names, "the instance could not be launched")
            return None
        finally:
            if "define" in launch_timings:
                report.timings["define"] = launch_timings["define"]
            report.timings.update(readiness.durations())
        report.add("launch", True, report.timings.get("define", 0.0))
        report.timings.update({f"boot-{phase}": s for phase, s in result.profile.items() if phase != "guest-ready"})
        self._boot_checks(report, readiness, "")
        report.properties["accel"] = str(result.instance.metadata.accel or "")
        report.properties["instance-id"] = result.instance.metadata.instance_id
        return result.instance

    def _boot_checks(self, report: ImageReport, readiness: Readiness, failure: str) -> None:
        """launch / booted, and on a failed launch the phase that never came (cloud-init or ssh)."""
        phases, spent = readiness.phases, readiness.durations()
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

    def _checks(self, report: ImageReport, inst: Instance) -> None:
        """Every check, the properties and the artifacts over one SSH session, then judge each answer."""
        commands: dict[str, tuple[str, float]] = {f"check:{c.name}": (c.command, c.timeout) for c in self.checks}
        commands |= {f"prop:{name}": (command, 30.0) for name, command in PROPERTIES.items()}
        commands["modules"] = (MODULE_LOG_COMMAND, 30.0)  # cloud-init's module timings (its slowest are reported)
        if self.opts.artifacts is not None:
            commands |= {f"file:{name}": (command, 60.0) for name, command in ARTIFACTS.items()}
        # The built-in checks and the properties only read the guest: they run side by side (the guest has up to 2
        # vCPUs and each check mostly waits on a process start); user checks and artifacts then run in order.
        together = {f"check:{c.name}" for c in self.checks if not c.user} | {f"prop:{name}" for name in PROPERTIES}
        together.add("modules")
        batch = Batch(commands, parallel=frozenset(together))
        t = time.monotonic()
        code, stdout, stderr = self._session(inst, batch)
        results = batch.parse(stdout)
        session = time.monotonic() - t
        if not results:
            why = _first_line(stderr) or f"ssh exited with status {code} and no results"
            report.add("ssh", False, session, f"expected a key login with the console's host key; saw: {why}")
            report.skip_rest([c.name for c in self.checks], "no SSH session")
            return
        report.add("ssh", True, report.timings.get("ssh", 0.0))
        ctx = Context(
            instance=inst.name,
            instance_id=inst.metadata.instance_id,
            disk_gib=SMOKE_DISK_GIB,
            allow_warnings=self.opts.allow_warnings,
            allow_failed_units=self.opts.allow_failed_units,
        )
        missing = f"no result: the session ended before this check (ssh exit {code}: {_last_line(stderr)})"
        for check in self.checks:
            out = results.get(f"check:{check.name}")
            if out is None:
                report.add(check.name, False, 0.0, missing)
                continue
            verdict = check.evaluate(out, ctx)
            if verdict.undetermined:
                report.skip(check.name, verdict.message)
                report.properties.update(verdict.properties)
                continue
            seconds = out.seconds + (report.timings.get("cloud-init", 0.0) if check.name == "cloud-init" else 0.0)
            shown = describe(check, out) if check.user or not verdict.ok else ""
            report.add(check.name, verdict.ok, seconds, "" if verdict.ok else verdict.message, shown)
            report.properties.update(verdict.properties)
        for name in PROPERTIES:
            out = results.get(f"prop:{name}")
            if out is not None:
                report.properties[name] = out.text
        if (modules := results.get("modules")) is not None and (slowest := module_times(modules.stdout)):
            report.properties["slowest-modules"] = ", ".join(f"{m} {s:.1f}s" for m, s in slowest)
        for part in ("kernel", "userspace", "total"):
            value = report.properties.get(f"boot-time-{part}")
            if value is not None:
                report.timings[f"guest-{part}"] = float(value)
        for name in self.opts.skipped:
            report.skip(name, "skipped by --skip")
        self._artifacts(report, results)

    def _session(self, inst: Instance, batch: Batch) -> tuple[int, bytes, str]:
        """Run the batch in one ssh; stopped early when the run is cancelled, when it runs past the batch's timeout,
        or when the guest sends more than SESSION_OUTPUT bytes (what was read is kept). (exit status, stdout,
        stderr)."""
        try:
            ssh.require_ssh()
            argv = ssh.ssh_argv(ssh_target(inst, self.settings), [batch.remote_command()], batch=True)
            with spawn(argv) as proc:
                out = collect(
                    proc,
                    timeout=batch.timeout,
                    limit=SESSION_OUTPUT,
                    stderr_limit=SESSION_STDERR,
                    cancelled=self.cancel.is_set,
                )
        except QinstError as exc:
            return 255, b"", exc.message
        if out.cancelled:
            raise Interrupted("interrupted")
        stderr = out.stderr.decode("utf-8", "replace")
        if out.overflow:
            stderr += f"\nthe guest sent more than {SESSION_OUTPUT >> 20} MiB over the SSH session; it was stopped"
        elif out.timed_out:
            stderr += f"\nthe SSH session was stopped after {batch.timeout:.0f} s"
        return out.returncode if out.returncode is not None else 255, out.stdout, stderr

    def _artifacts(self, report: ImageReport, results: dict[str, Output]) -> None:
        if self.opts.artifacts is None:
            return
        report.timings["artifacts"] = round(
            sum(results[f"file:{n}"].seconds for n in ARTIFACTS if f"file:{n}" in results), 2
        )
        directory = self.opts.artifacts / self.job.label
        directory.mkdir(parents=True, exist_ok=True)
        for name, command in ARTIFACTS.items():
            out = results.get(f"file:{name}")
            if out is not None and out.exit == 0:
                write_atomically(directory / name, out.stdout.encode("utf-8", "replace"))
                continue
            # Never lost without a word: what was collected is kept, and why the rest is missing is said (in the
            # file, results.json and the summary).
            if out is None:
                why = "not collected: the SSH session ended before it"
            else:
                ran = "timed out" if out.exit in (124, 137) else f"exited {out.exit}"
                why = f"`{command}` {ran} after {out.seconds:.1f} s: {_last_line(out.stderr) or 'no error output'}"
            report.artifact_errors[name] = why
            body = (out.stdout if out is not None else "") + f"\n[qinst: {why}]\n"
            write_atomically(directory / name, body.encode("utf-8", "replace"))

    def _compare(self, report: ImageReport) -> None:
        baseline = self.opts.baseline
        if baseline is None:
            return
        if not any(c.name == "ssh" and c.status is Status.PASSED for c in report.checks):
            report.skip("boot-regression", "the guest never became ready: nothing to compare")
            return
        found = regressions(report, baseline, self.opts.regression_threshold)
        if found is None:
            report.skip("boot-regression", f"{report.suite} is not in the baseline {baseline.path.name}")
        else:
            report.add("boot-regression", not found, 0.0, "slower than the baseline: " + "; ".join(found))

    def _finish(self, report: ImageReport, keep: bool) -> None:
        """Record the console, then remove the instance (kept only if it failed and keep). Only an instance this
        attempt made: a failed launch undid its own work, and a domain of the same name (another run's, a kept one)
        is never touched."""
        if self.created:
            self._remove(report, keep)
        if self.opts.artifacts is not None:
            directory = self.opts.artifacts / self.job.label
            directory.mkdir(parents=True, exist_ok=True)
            write_atomically(directory / "console.log", report.console.encode("utf-8", "replace"))

    def _remove(self, report: ImageReport, keep: bool) -> None:
        with contextlib.suppress(QinstError), Host(self.settings.connect) as host:
            try:
                _, inst = instances.get_instance(host, report.instance)
            except QinstError:
                inst = None
            if inst is not None:
                report.console = recorded_console(host, inst.name)
                if not any(k.startswith("boot-") for k in report.timings):  # a guest that never became ready
                    phases = console_phases(report.console)
                    report.timings.update({f"boot-{p}": s for p, s in phases.items() if p != "guest-ready"})
                if version := cloud_init_version(report.console):
                    report.properties["cloud-init-version"] = version
                if report.passed or not keep:
                    instances.remove(host, report.instance, force=True)
                else:
                    report.kept = True


def jobs(
    images: Sequence[str], firmwares: Sequence[Firmware | None], arches: Sequence[Arch] = (Arch.X86_64,)
) -> list[Job]:
    """Every image x arch x firmware, each with a folder name (its slug, arch when not x86_64, and firmware; -2,
    -3... for repeats). A firmware None is each architecture's own (BIOS for x86_64, UEFI for aarch64)."""
    seen: dict[str, int] = {}
    out = []
    for image in images:
        for arch in arches:
            for firmware in dict.fromkeys(firmware_for(arch, f) for f in firmwares):
                label = f"{_slug(image)}-{'' if arch is Arch.X86_64 else f'{arch}-'}{firmware}"
                seen[label] = seen.get(label, 0) + 1
                out.append(Job(image, firmware, label if seen[label] == 1 else f"{label}-{seen[label]}", arch))
    return out


def run_smoke(
    settings: Settings,
    images: Sequence[str],
    opts: SmokeOptions,
    on_done: Callable[[ImageReport], None] | None = None,
) -> list[ImageReport]:
    """Smoke-test every image x firmware (opts.parallel at once). An interruption stops every boot, removes the
    instances, reports what finished through on_done, and is raised again. With opts.shard, only that shard's
    share of the matrix runs (each report knows its place in the whole matrix)."""
    matrix = jobs(images, opts.firmwares, opts.arches)
    numbered = opts.shard.take(matrix) if opts.shard else list(enumerate(matrix))
    todo = [job for _, job in numbered]
    if not todo:
        return []  # a shard beyond the matrix's size (more CI jobs than images x arches x firmwares)
    placed = [for_host(settings, opts.hosts[i % len(opts.hosts)]) for i in range(len(todo))] if opts.hosts else []
    for target in {s.connect for s in placed} or {settings.connect}:
        with Host(target):
            pass  # every host must be usable at all (HypervisorError, exit 4, otherwise)
    cancel = threading.Event()
    parallel = opts.parallel or default_parallel(len(todo), opts.memory_mib) * max(1, len(opts.hosts))
    if opts.cpus is None:
        # Guests emulated side by side are CPU-bound: more vCPUs than cores only slows every boot down.
        per_host = -(-min(parallel, len(todo)) // max(1, len(opts.hosts)))
        opts = dataclasses.replace(opts, cpus=max(1, min(2, (os.cpu_count() or 1) // per_host)))
    reports: dict[int, ImageReport] = {}
    with _executor(parallel) as pool:
        futures = {
            pool.submit(_Runner(placed[i] if placed else settings, job, opts, cancel).run): i
            for i, job in enumerate(todo)
        }
        try:
            for future in concurrent.futures.as_completed(futures):
                report = future.result()
                report.job = numbered[futures[future]][0]
                reports[futures[future]] = report
                if on_done:
                    on_done(report)
        except BaseException:
            cancel.set()
            for f in futures:
                f.cancel()
            concurrent.futures.wait(futures)  # each runner removes its instance on the way out
            for f, i in futures.items():
                if i not in reports and f.done() and not f.cancelled() and f.exception() is None:
                    reports[i] = f.result()
                    reports[i].job = numbered[i][0]
                    if on_done:
                        on_done(reports[i])
            raise
    return [reports[i] for i in range(len(todo))]


@contextlib.contextmanager
def _executor(workers: int) -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="smoke")
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ---- the files a run writes ------------------------------------------------------------------------------------------


def write_reports(
    reports: Sequence[ImageReport],
    *,
    junit: Path | None,
    summary: Path | None,
    artifacts: Path | None,
    baseline: Baseline | None,
    shard: Shard | None = None,
) -> None:
    """The JUnit report, the Markdown summary and results.json, for whatever finished."""
    if junit is not None:
        write_atomically(junit, junit_xml(reports))
    if summary is not None:
        write_atomically(summary, summary_markdown(reports, baseline).encode("utf-8", "replace"))
    if artifacts is not None:
        data = results_json(reports, (shard.index, shard.count) if shard else None)
        write_atomically(artifacts / "results.json", (json.dumps(data, indent=2) + "\n").encode())
