"""Smoke checks as data: what to run in the guest and how to judge it; user checks from TOML or the command line.

All checks of one guest run in one SSH session: `batch_script` writes a POSIX sh script that runs each command
with its timeout and prints one delimited, base64-encoded result line per check; `parse_batch` reads those lines
back as untrusted input (a guest can print anything).
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import re
import secrets
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu_instances.errors import UsageError
from qemu_instances.files import MAX_CHECKS, decode_text, parse_json, parse_toml, read_option_file

DEFAULT_TIMEOUT = 60.0
OUTPUT_TAIL = 2000  # characters of a check's output kept in its JUnit testcase
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


@dataclass(frozen=True)
class Output:
    """What one command printed in the guest (decoded with replacement: it is untrusted text)."""

    exit: int
    stdout: str
    stderr: str
    seconds: float = 0.0

    @property
    def text(self) -> str:
        return (self.stdout.strip() or self.stderr.strip())[:200]


@dataclass(frozen=True)
class Verdict:
    ok: bool
    message: str = ""  # why it failed (or a note when it passed, or why it could not judge)
    properties: Mapping[str, str] = field(default_factory=dict)
    undetermined: bool = False  # the guest's answer says nothing either way: reported as skipped, with why


@dataclass(frozen=True)
class Context:
    """What a judge compares the guest's answers against."""

    instance: str
    instance_id: str
    disk_gib: int
    allow_warnings: tuple[re.Pattern[str], ...] = ()
    allow_failed_units: tuple[str, ...] = ()


Judge = Callable[[Output, Context], Verdict]


@dataclass(frozen=True)
class Check:
    """One command run in the guest, and how its answer is judged."""

    name: str
    run: tuple[str, ...] | str  # an argv, or a shell string
    judge: Judge | None = None  # None: a user check, judged by the fields below
    exit: int = 0
    stdout: tuple[re.Pattern[str], ...] = ()
    stderr: tuple[re.Pattern[str], ...] = ()
    not_stdout: tuple[re.Pattern[str], ...] = ()
    timeout: float = DEFAULT_TIMEOUT
    sudo: bool = False
    images: tuple[str, ...] = ()  # globs over the image names; empty: every image
    user: bool = False

    @property
    def command(self) -> str:
        """The command as the guest's shell runs it."""
        text = self.run if isinstance(self.run, str) else shlex.join(self.run)
        if self.sudo:
            text = "sudo -n sh -c " + shlex.quote(text)
        return text

    def applies_to(self, image: str) -> bool:
        return not self.images or any(fnmatch.fnmatchcase(image, glob) for glob in self.images)

    def evaluate(self, out: Output, ctx: Context) -> Verdict:
        return self.judge(out, ctx) if self.judge else _judge_user(self, out)


# ---- built-in checks -------------------------------------------------------------------------------------------

MARKER = "/var/lib/qinst/smoke-marker"
RESULT_SEP = "@@qinst-result-json@@"
FAILED_SEP = "@@qinst-failed-units@@"


def cloud_init_status(status_json: str, result_json: str) -> tuple[bool, str]:
    """cloud-init's own verdict (`cloud-init status`'s rules) from /run/cloud-init/status.json and result.json.

    Done: both files exist, no stage is running or started-but-unfinished, and no stage or result lists an error.
    Read as files rather than by running `cloud-init status`: that starts cloud-init's Python, seconds under TCG.
    Both are untrusted text from the guest. Returns (done without errors, what was seen when not).
    """
    try:
        v1 = parse_json(status_json, "status.json")["v1"]
        if not isinstance(v1, dict):
            raise TypeError
    except (UsageError, KeyError, TypeError):
        return False, "/run/cloud-init/status.json is missing or unreadable"
    errors: list[str] = []
    running: list[str] = []
    latest = 0.0
    for key, value in sorted(v1.items()):
        if key == "stage" and value:
            running.append(f"running in stage {str(value)[:40]}")
        elif isinstance(value, dict):
            stage_errors = value.get("errors") or []
            errors += [f"{key}: {str(e)[:200]}" for e in stage_errors] if isinstance(stage_errors, list) else [key]
            start, finished = value.get("start"), value.get("finished")
            if start and not finished:
                running.append(f"stage {key[:40]} started, not finished")
            for t in (start, finished):
                if isinstance(t, int | float) and not isinstance(t, bool) and abs(t) < 1e18:
                    latest = max(latest, float(t))
    try:
        result_errors = parse_json(result_json, "result.json")["v1"]["errors"]
        errors += [f"result: {str(e)[:200]}" for e in result_errors] if isinstance(result_errors, list) else ["result"]
    except (UsageError, KeyError, TypeError):
        running.append("/run/cloud-init/result.json is missing or unreadable (cloud-init not finished)")
    if errors:
        return False, f"errors: {'; '.join(errors[:5])}"
    if running:
        return False, "; ".join(running[:3])
    if latest <= 0:
        return False, "cloud-init has not run (no stage recorded in status.json)"
    return True, ""


def _cloud_init(out: Output, ctx: Context) -> Verdict:
    status, _, result = out.stdout.partition(RESULT_SEP)
    done, seen = cloud_init_status(status, result)
    return Verdict(done, f"expected cloud-init done with no errors; saw: {seen}")


def _equals(what: str, expected: Callable[[Context], str]) -> Judge:
    def judge(out: Output, ctx: Context) -> Verdict:
        want = expected(ctx)
        seen = out.stdout.strip()
        return Verdict(seen == want, f"expected {what} {want!r}, saw {seen or out.stderr.strip()!r}")

    return judge


def _root_fs(out: Output, ctx: Context) -> Verdict:
    try:
        root_bytes = int(out.stdout.split()[-1])
    except (ValueError, IndexError):
        root_bytes = 0
    want = ctx.disk_gib * (1 << 30)
    return Verdict(
        root_bytes >= 0.9 * want,
        f"expected / grown to about {ctx.disk_gib} GiB, saw {root_bytes / (1 << 30):.2f} GiB",
    )


_LOG_PROBLEM = re.compile(r"Traceback|WARNING")


def _cloud_init_log(out: Output, ctx: Context) -> Verdict:
    if out.exit != 0:
        return Verdict(False, f"cannot read /var/log/cloud-init.log: {out.text}")
    bad = [
        line.strip()
        for line in out.stdout.splitlines()
        if _LOG_PROBLEM.search(line) and not any(p.search(line) for p in ctx.allow_warnings)
    ]
    if not bad:
        return Verdict(True)
    quoted = "\n".join(bad[:10]) + (f"\n... and {len(bad) - 10} more" if len(bad) > 10 else "")
    return Verdict(False, f"{len(bad)} Traceback/WARNING line(s) in /var/log/cloud-init.log:\n{quoted}")


def _system_state(out: Output, ctx: Context) -> Verdict:
    state_text, _, failed_text = out.stdout.partition(FAILED_SEP)
    state = (state_text.strip().splitlines() or ["unknown"])[-1].strip()
    units = [line.split()[0] for line in failed_text.splitlines() if line.split()]
    props = {"system-state": state[:100]}
    if state == "running":
        return Verdict(True, properties=props)
    if state == "degraded" and units:
        unexpected = [u for u in units if not any(fnmatch.fnmatchcase(u, g) for g in ctx.allow_failed_units)]
        if not unexpected:
            return Verdict(True, f"degraded, all failed units allowed: {', '.join(units)}", props)
        return Verdict(False, f"system is degraded; failed units: {', '.join(unexpected)}", props)
    if state in _STATES:
        return Verdict(False, f"expected 'systemctl is-system-running' to say running, saw {state!r}", props)
    # "unknown", an error or nothing: systemd could not be asked (no manager to talk to). That says nothing of the
    # image: reported as such, not as a failure.
    seen = (out.stdout.strip() or out.stderr.strip() or "no answer").splitlines()[-1][:160]
    return Verdict(False, f"could not determine the system state (systemctl: {seen!r})", props, undetermined=True)


# systemctl is-system-running's answers that describe a system (anything else is systemctl failing to ask).
_STATES = frozenset(("initializing", "starting", "running", "degraded", "maintenance", "stopping", "offline"))


_STARTUP = re.compile(r"Startup finished in (?P<body>.*?)(?:$|\n)")
_PART = re.compile(r"(?P<time>(?:\d+(?:\.\d+)?(?:min|ms|us|s|h)\s*)+)\((?P<what>[a-z]+)\)")
_TOTAL = re.compile(r"=\s*(?P<time>(?:\d+(?:\.\d+)?(?:min|ms|us|s|h)\s*)+)")
_UNIT = {"h": 3600.0, "min": 60.0, "s": 1.0, "ms": 0.001, "us": 0.000001}


def parse_duration(text: str) -> float:
    """systemd's '1min 2.345s' -> 62.345."""
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(min|ms|us|s|h)", text):
        total += float(number) * _UNIT[unit]
    return round(total, 3)


def boot_times(text: str) -> dict[str, float]:
    """systemd-analyze's 'Startup finished in A (kernel) + B (userspace) = C' as {kernel, userspace, total}."""
    m = _STARTUP.search(text)
    if not m:
        return {}
    times = {p["what"]: parse_duration(p["time"]) for p in _PART.finditer(m["body"])}
    total = _TOTAL.search(m["body"])
    if total:
        times["total"] = parse_duration(total["time"])
    return {k: v for k, v in times.items() if k in ("firmware", "loader", "kernel", "initrd", "userspace", "total")}


def _boot_time(out: Output, ctx: Context) -> Verdict:
    times = boot_times(out.stdout)
    if "total" not in times:
        return Verdict(False, f"expected 'Startup finished in ...' from systemd-analyze, saw {out.text!r}")
    return Verdict(True, properties={f"boot-time-{k}": f"{v:.3f}" for k, v in times.items()})


BUILTIN: tuple[Check, ...] = (
    Check(
        "cloud-init",
        f"cat /run/cloud-init/status.json; echo {RESULT_SEP}; cat /run/cloud-init/result.json",
        _cloud_init,
    ),
    Check("hostname", ("hostname",), _equals("hostname", lambda c: c.instance)),
    Check(
        "instance-id",
        ("cat", "/var/lib/cloud/data/instance-id"),
        _equals("instance-id", lambda c: c.instance_id),
    ),
    Check("user-data", ("cat", MARKER), _equals(f"{MARKER} (written by runcmd) to hold", lambda c: c.instance_id)),
    Check("root-fs", ("df", "-B1", "--output=size", "/"), _root_fs),
    Check("cloud-init-log", ("cat", "/var/log/cloud-init.log"), _cloud_init_log, sudo=True),
    Check(
        "system-state",
        # As root: systemd answers root over its private socket; an unprivileged systemctl needs D-Bus, and says
        # "unknown" on a guest without it.
        f"timeout 90 systemctl is-system-running --wait; echo {FAILED_SEP}; systemctl --failed --plain --no-legend",
        _system_state,
        timeout=100,
        sudo=True,
    ),
    Check("boot-time", ("systemd-analyze",), _boot_time),
)
HEALTH = ("cloud-init-log", "system-state", "boot-time")
# Not testcases: facts recorded as properties, and files kept under --artifacts. cloud-init's version is read from
# its own console line (cloud_init_version): asking the guest starts Python, ~0.3 s of CPU under TCG.
PROPERTIES = {"kernel": "uname -r"}
_CLOUD_INIT_VERSION = re.compile(r"Cloud-init v\. ([0-9A-Za-z][0-9A-Za-z.+~:_-]{0,63}) finished at")


def cloud_init_version(console: str) -> str | None:
    """The version in cloud-init's last 'Cloud-init v. VERSION finished at' console line (untrusted text)."""
    found = _CLOUD_INIT_VERSION.findall(console)
    return found[-1] if found else None


ARTIFACTS = {
    "cloud-init.log": "sudo -n cat /var/log/cloud-init.log",
    "cloud-init-output.log": "sudo -n cat /var/log/cloud-init-output.log",
    "journal.log": "sudo -n journalctl -b --no-pager",
    "systemd-analyze-blame.txt": "systemd-analyze blame",
}


def _judge_user(check: Check, out: Output) -> Verdict:
    problems = []
    if out.exit != check.exit:
        timed_out = out.exit in (124, 137) and check.exit not in (124, 137)
        problems.append(
            f"timed out after {check.timeout:g} s" if timed_out else f"expected exit {check.exit}, got {out.exit}"
        )
    problems += [f"stdout does not match /{p.pattern}/" for p in check.stdout if not p.search(out.stdout)]
    problems += [f"stderr does not match /{p.pattern}/" for p in check.stderr if not p.search(out.stderr)]
    problems += [f"stdout matches /{p.pattern}/" for p in check.not_stdout if p.search(out.stdout)]
    return Verdict(not problems, "; ".join(problems))


def describe(check: Check, out: Output) -> str:
    """A testcase's system-out: the command, its exit code and the tail of its output."""
    parts = [f"$ {check.command}", f"exit {out.exit} after {out.seconds:.2f} s"]
    if out.stdout:
        parts += ["--- stdout (tail) ---", out.stdout[-OUTPUT_TAIL:]]
    if out.stderr:
        parts += ["--- stderr (tail) ---", out.stderr[-OUTPUT_TAIL:]]
    return "\n".join(parts)


# ---- user checks: --checks FILE and --check NAME=COMMAND -----------------------------------------------------------

_KEYS = {"name", "run", "exit", "stdout", "stderr", "not_stdout", "timeout", "sudo", "images"}


def load_checks(path: Path) -> list[Check]:
    """The [[check]] tables of a TOML file; UsageError (exit 2) naming the file and the key on any fault."""
    data = parse_toml(decode_text(read_option_file(path, "--checks", MAX_CHECKS) or b"", f"--checks {path}"), str(path))
    unknown = set(data) - {"check"}
    if unknown:
        raise UsageError(f"{path}: unknown key {sorted(unknown)[0]!r} (expected [[check]] tables)")
    tables = data.get("check", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise UsageError(f"{path}: 'check' must be an array of tables ([[check]])")
    return [_check_from_table(t, f"{path}: check[{i}]") for i, t in enumerate(tables)]


def _check_from_table(table: Mapping[str, Any], where: str) -> Check:
    unknown = set(table) - _KEYS
    if unknown:
        raise UsageError(f"{where}: unknown key {sorted(unknown)[0]!r}", hint=f"known keys: {', '.join(sorted(_KEYS))}")
    name = table.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise UsageError(f"{where}.name: expected a name of letters, digits, '.', '_', '-' (got {name!r})")
    where = f"{where} ({name})"
    run = table.get("run")
    if isinstance(run, list) and run and all(isinstance(a, str) for a in run):
        command: tuple[str, ...] | str = tuple(run)
    elif isinstance(run, str) and run.strip():
        command = run
    else:
        raise UsageError(f"{where}.run: expected a non-empty argv list or shell string")
    exit_code = table.get("exit", 0)
    if not isinstance(exit_code, int) or isinstance(exit_code, bool) or not 0 <= exit_code <= 255:
        raise UsageError(f"{where}.exit: expected an integer from 0 to 255")
    timeout = table.get("timeout", DEFAULT_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 3600:
        raise UsageError(f"{where}.timeout: expected seconds, more than 0 and at most 3600")
    sudo = table.get("sudo", False)
    if not isinstance(sudo, bool):
        raise UsageError(f"{where}.sudo: expected true or false")
    images = _strings(table.get("images", []), f"{where}.images")
    return Check(
        name,
        command,
        exit=exit_code,
        stdout=_regexes(table.get("stdout", []), f"{where}.stdout"),
        stderr=_regexes(table.get("stderr", []), f"{where}.stderr"),
        not_stdout=_regexes(table.get("not_stdout", []), f"{where}.not_stdout"),
        timeout=float(timeout),
        sudo=sudo,
        images=tuple(images),
        user=True,
    )


def _strings(value: Any, where: str) -> list[str]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise UsageError(f"{where}: expected a string or a list of strings")
    return values


def _regexes(value: Any, where: str) -> tuple[re.Pattern[str], ...]:
    return tuple(compile_regex(v, where) for v in _strings(value, where))


def compile_regex(text: str, where: str) -> re.Pattern[str]:
    try:
        return re.compile(text, re.M)
    except re.error as exc:
        raise UsageError(f"{where}: invalid regular expression {text!r}: {exc}") from exc


def parse_check_option(text: str) -> Check:
    """--check 'NAME=COMMAND': a shell command that must exit 0."""
    name, sep, command = text.partition("=")
    if not sep or not _NAME.fullmatch(name) or not command.strip():
        raise UsageError(f"--check {text!r}: expected NAME=COMMAND (NAME of letters, digits, '.', '_', '-')")
    return Check(name, command, user=True)


def plan(user: Sequence[Check], skip: Sequence[str]) -> list[Check]:
    """Built-in then user checks, without the skipped ones; UsageError on duplicate or unknown names."""
    names = [c.name for c in BUILTIN]
    for check in user:
        if check.name in names or check.name in ("pull", "launch", "booted", "ssh", "boot-regression"):
            raise UsageError(f"check name {check.name!r} is used twice (or by a built-in check)")
        names.append(check.name)
    unknown = [s for s in skip if s not in names]
    if unknown:
        raise UsageError(f"--skip {unknown[0]!r}: no such check", hint=f"checks: {', '.join(names)}")
    return [c for c in (*BUILTIN, *user) if c.name not in skip]


# ---- one SSH session for all of them -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    """The commands of one session, by key, and the nonce that marks the script's own result lines.

    The commands named in `parallel` (read-only built-in checks and properties) run at the same time, first; the
    others (user checks, artifacts) then run one by one in their order, each printed as soon as it ends.
    """

    commands: Mapping[str, tuple[str, float]]  # key -> (shell command, timeout)
    parallel: frozenset[str] = frozenset()
    nonce: str = field(default_factory=lambda: secrets.token_hex(8))

    def script(self) -> str:
        """A POSIX sh script: each command in its own shell, stdin closed, under `timeout`; one result line each.

        Result line: NONCE KEY_INDEX EXIT MILLISECONDS BASE64(stdout) BASE64(stderr). Every process started in a
        guest costs ~50 ms under TCG: the clock is /proc/uptime read by the shell, empty output is not encoded, and the
        encodings go straight into the result file.
        """
        lines = [
            "#!/bin/sh",
            "d=$(mktemp -d) || exit 97",
            "trap 'rm -rf \"$d\"' EXIT",
            "now() { T=0; read -r u _ </proc/uptime 2>/dev/null || return 0; i=${u%.*} f=${u#*.}",
            "  case $i.$f in *[!0-9.]*|.*|*.|*.*.*) return 0 ;; esac",
            "  case $f in [0-9][0-9]) T=$(( i * 1000 + 1${f}0 - 1000 )) ;; esac; }",
            # GNU base64 (-w0: one line, one process); any other base64 and tr otherwise.
            'b64() { [ -s "$1" ] || return 0; base64 -w0 <"$1" 2>/dev/null || base64 <"$1" | tr -d \'\\n\'; }',
            "job() {",
            "  now; s=$T",
            '  timeout -k 5 "$2" sh -c "$3" </dev/null >"$d/o$1" 2>"$d/e$1"',
            "  rc=$?; now",
            # Written straight into the result file: a $(...) around each encoding would fork a subshell.
            f'  {{ printf "%s %s %s %s " {self.nonce} "$1" "$rc" "$(( T - s ))"; b64 "$d/o$1"; printf " "',
            '    b64 "$d/e$1"; echo; } >"$d/r$1"',
            "}",
        ]
        together = [i for i, key in enumerate(self.commands) if key in self.parallel]
        for i, (key, (command, timeout)) in enumerate(self.commands.items()):
            if key in self.parallel:
                lines.append(f"job {i} {max(1, round(timeout))} {shlex.quote(command)} &")
        if together:
            lines += ["wait", "cat " + " ".join(f'"$d/r{i}"' for i in together) + " 2>/dev/null"]
        for i, (key, (command, timeout)) in enumerate(self.commands.items()):
            if key not in self.parallel:
                lines += [f"job {i} {max(1, round(timeout))} {shlex.quote(command)}", f'cat "$d/r{i}" 2>/dev/null']
        return "\n".join(lines) + "\n"

    def remote_command(self) -> str:
        """The one command line given to ssh: the script, base64-encoded, decoded and run by the guest's sh."""
        encoded = base64.b64encode(self.script().encode()).decode()
        return f"echo {encoded} | base64 -d | sh"

    @property
    def timeout(self) -> float:
        return sum(t + 6 for _, t in self.commands.values()) + 30

    def parse(self, stdout: bytes) -> dict[str, Output]:
        """The results the script printed, by key; lines that are not exactly its own are ignored."""
        keys = list(self.commands)
        results: dict[str, Output] = {}
        for raw in stdout.split(b"\n"):
            fields = raw.rstrip(b"\r").split(b" ")
            if len(fields) != 6 or fields[0] != self.nonce.encode():
                continue
            try:
                index, code, millis = int(fields[1]), int(fields[2]), int(fields[3])
                out = base64.b64decode(fields[4], validate=True)
                err = base64.b64decode(fields[5], validate=True)
            except (ValueError, binascii.Error):
                continue
            if not 0 <= index < len(keys) or keys[index] in results or not 0 <= code <= 255:
                continue
            seconds = millis / 1000 if 0 <= millis < 10**8 else 0.0
            results[keys[index]] = Output(
                code, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), round(seconds, 3)
            )
        return results
