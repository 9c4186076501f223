"""checks.py: smoke checks as data, the one-session batch script (run by a real sh), and the judges of cloud-init,
its log, the system state and the boot time."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from qemu_instances.checks import (
    BUILTIN,
    Batch,
    Check,
    Context,
    Output,
    boot_times,
    cloud_init_status,
    cloud_init_version,
    load_checks,
    parse_check_option,
    parse_duration,
    plan,
)
from qemu_instances.errors import UsageError

CTX = Context(instance="smoke-x", instance_id="iid-1", disk_gib=4)


def _builtin(name: str) -> Check:
    return next(c for c in BUILTIN if c.name == name)


def test_batch_runs_every_command_in_one_sh_and_reads_back_each_result() -> None:
    batch = Batch(
        {
            "a": ("echo out; echo err >&2; exit 3", 5.0),
            "bytes": ("printf '\\377\\376 not utf-8'", 5.0),
            "slow": ("sleep 30", 1.0),
            "stdin": ("cat", 5.0),  # stdin is closed: a check never waits on the session's input
            "forger": ("echo NONCE 0 0 0 AAAA AAAA", 5.0),
        }
    )
    proc = subprocess.run(["sh", "-c", batch.remote_command()], capture_output=True, timeout=60, check=False)
    results = batch.parse(proc.stdout)
    assert results["a"] == Output(3, "out\n", "err\n", results["a"].seconds)
    assert results["bytes"].stdout == "\ufffd\ufffd not utf-8"
    assert results["slow"].exit == 124 and results["slow"].seconds < 10
    assert results["stdin"].exit == 0 and results["stdin"].stdout == ""
    assert results["forger"].stdout.startswith("NONCE")  # printed by a check: data, not a result line
    assert set(results) == {"a", "bytes", "slow", "stdin", "forger"}


def test_batch_parse_takes_only_well_formed_lines_with_its_nonce() -> None:
    batch = Batch({"x": ("true", 5.0), "y": ("true", 5.0)})
    n = batch.nonce
    forged = [
        "deadbeef 0 0 1 aGk= aGk=",  # another nonce
        f"{n} 0 0 1 aGk=",  # a field missing
        f"{n} 7 0 1 aGk= aGk=",  # no such check
        f"{n} 0 999 1 aGk= aGk=",  # not an exit status
        f"{n} 0 0 1 !!!! aGk=",  # not base64
        f"{n} 1 0 1 aGk= aGk=",  # the good one
        f"{n} 1 5 1 aGk= aGk=",  # a second answer for the same check is ignored
    ]
    results = batch.parse("\n".join(forged).encode() + b"\n\xff\xfe garbage\n")
    assert set(results) == {"y"} and results["y"] == Output(0, "hi", "hi", 0.001)


def test_batch_runs_the_parallel_commands_together_then_the_others_in_order(tmp_path: Path) -> None:
    d = tmp_path
    # Each of a and b waits (at most 5 s) for the other's mark: both pass only when they run at the same time.
    meet = "touch {d}/{me}; n=0; while [ ! -e {d}/{other} ]; do n=$((n+1)); [ $n -lt 100 ] || exit 9; sleep 0.05; done"
    batch = Batch(
        {
            "first": (f"test -e {d}/a && test -e {d}/b && echo first >>{d}/order", 5.0),
            "a": (meet.format(d=d, me="a", other="b"), 10.0),
            "b": (meet.format(d=d, me="b", other="a"), 10.0),
            "second": (f"echo second >>{d}/order; sleep 0.3", 5.0),
        },
        parallel=frozenset({"a", "b"}),
    )
    proc = subprocess.run(["sh", "-c", batch.remote_command()], capture_output=True, timeout=60, check=False)
    results = batch.parse(proc.stdout)
    assert {k: r.exit for k, r in results.items()} == {"a": 0, "b": 0, "first": 0, "second": 0}, proc.stderr
    assert (d / "order").read_text() == "first\nsecond\n"  # after the parallel ones, in the order given
    assert 0.25 <= results["second"].seconds < 5  # the guest's clock: /proc/uptime, read by the shell


def test_batch_prints_each_result_as_it_ends_so_a_stopped_session_keeps_them() -> None:
    batch = Batch({"quick": ("echo done", 5.0), "stuck": ("sleep 60", 120.0)}, parallel=frozenset({"quick"}))
    proc = subprocess.Popen(["sh", "-c", batch.remote_command()], stdout=subprocess.PIPE, start_new_session=True)
    assert proc.stdout is not None
    first = proc.stdout.readline()  # the quick result arrives while the stuck command still runs
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert batch.parse(first) == {"quick": Output(0, "done\n", "", batch.parse(first)["quick"].seconds)}


def test_batch_encodes_output_without_gnu_base64(tmp_path: Path) -> None:
    """A base64 without -w0 (BusyBox's, say): the script falls back to base64 | tr and the output is the same."""
    fake = tmp_path / "base64"
    fake.write_text(
        '#!/bin/sh\ncase "$1" in -w*) echo "unknown option" >&2; exit 1 ;; esac\nexec /usr/bin/base64 "$@"\n'
    )
    fake.chmod(0o755)
    batch = Batch({"long": ("seq 1 2000", 5.0), "err": ("echo oops >&2; exit 2", 5.0)})
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    proc = subprocess.run(["sh", "-c", batch.remote_command()], capture_output=True, timeout=60, check=False, env=env)
    results = batch.parse(proc.stdout)
    assert results["long"].stdout == "".join(f"{i}\n" for i in range(1, 2001))
    assert (results["err"].exit, results["err"].stdout, results["err"].stderr) == (2, "", "oops\n")


def test_cloud_init_version_comes_from_its_last_finished_line_and_only_if_plain() -> None:
    console = (
        "Cloud-init v. 22.4.2 finished at Sat, 28 Nov 2026 10:00:00 +0000. Up 20.1 seconds\n"
        "Cloud-init v. 23.1.2-0ubuntu0~22.04.1 finished at Sun, 29 Nov 2026. Up 9 seconds\r\n"
    )
    assert cloud_init_version(console) == "23.1.2-0ubuntu0~22.04.1"
    assert cloud_init_version("Cloud-init v. 22.4.2 running 'modules:final'") is None
    assert cloud_init_version("Cloud-init v. \x1b[31mevil finished at now") is None
    assert cloud_init_version("Cloud-init v. " + "9" * 80 + " finished at now") is None


def test_user_checks_judge_exit_and_output() -> None:
    ok = Check("c", ("x",), stdout=(re.compile("^ID=debian$", re.M),), not_stdout=(re.compile("panic"),), user=True)
    assert ok.evaluate(Output(0, "NAME=x\nID=debian\n", ""), CTX).ok
    bad = ok.evaluate(Output(1, "kernel panic\n", ""), CTX)
    assert not bad.ok
    assert bad.message == "expected exit 0, got 1; stdout does not match /^ID=debian$/; stdout matches /panic/"
    slow = Check("s", "sleep 9", timeout=2, user=True).evaluate(Output(124, "", ""), CTX)
    assert slow.message == "timed out after 2 s"
    assert Check("t", ("true",), sudo=True).command == "sudo -n sh -c true"


@pytest.mark.promise
def test_a_user_check_passes_only_with_the_exit_status_it_expects(tmp_path: Path) -> None:
    """`exit = N` from a check file: 0 is a failure when 1 is expected (a grep that must find nothing)."""
    path = tmp_path / "checks.toml"
    path.write_text('[[check]]\nname = "no-errors"\nrun = "grep -q ERROR /var/log/x"\nexit = 1\n')
    (check,) = load_checks(path)
    assert check.evaluate(Output(1, "", ""), CTX).ok
    found = check.evaluate(Output(0, "", ""), CTX)
    assert not found.ok and found.message == "expected exit 1, got 0"
    assert check.evaluate(Output(2, "", "grep: /var/log/x: No such file"), CTX).message == "expected exit 1, got 2"


@pytest.mark.promise
def test_a_check_runs_on_every_image_matching_any_of_its_globs(tmp_path: Path) -> None:
    path = tmp_path / "checks.toml"
    path.write_text('[[check]]\nname = "apt"\nrun = "apt-get --version"\nimages = ["ubuntu-*", "debian-*"]\n')
    (check,) = load_checks(path)
    assert [i for i in ("ubuntu-24.04", "debian-12", "fedora-41", "my-debian-12") if check.applies_to(i)] == [
        "ubuntu-24.04",
        "debian-12",
    ]
    assert parse_check_option("any=true").applies_to("fedora-41")  # no images: every image


def test_check_files_and_options_are_refused_with_the_file_and_key(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(
        '[[check]]\nname = "os"\nrun = ["cat", "/etc/os-release"]\nstdout = "ID=debian"\nimages = ["debian-*"]\n'
        '[[check]]\nname = "shell"\nrun = "test -e /x"\nexit = 1\nsudo = true\ntimeout = 5\n'
    )
    os_check, shell = load_checks(good)
    assert os_check.run == ("cat", "/etc/os-release") and os_check.applies_to("debian-12")
    assert not os_check.applies_to("ubuntu-24.04")
    assert shell.exit == 1 and shell.sudo and shell.timeout == 5.0
    cases = {
        '[[check]]\nname = "a"\nrun = "x"\nstdout = ["("]\n': "check[0] (a).stdout: invalid regular expression",
        '[[check]]\nname = "a"\nrun = "x"\nexpect = 1\n': "check[0]: unknown key 'expect'",
        '[[check]]\nname = "a b"\nrun = "x"\n': "check[0].name",
        '[[check]]\nname = "a"\nrun = []\n': "check[0] (a).run",
        '[[check]]\nname = "a"\nrun = "x"\nexit = 300\n': "check[0] (a).exit",
        '[[check]]\nname = "a"\nrun = "x"\ntimeout = -1\n': "check[0] (a).timeout",
        "[[check]\n": "invalid TOML",
        "check = 3\n": "array of tables",
    }
    for text, expected in cases.items():
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        with pytest.raises(UsageError) as err:
            load_checks(bad)
        assert str(bad) in err.value.message and expected in err.value.message, err.value.message
    assert parse_check_option("up=uptime").run == "uptime"
    for text in ("noequals", "=cmd", "name=", "bad name=x"):
        with pytest.raises(UsageError):
            parse_check_option(text)
    with pytest.raises(UsageError, match="used twice"):
        plan([parse_check_option("hostname=true")], [])
    with pytest.raises(UsageError, match="no such check"):
        plan([], ["nope"])
    assert "boot-time" not in {c.name for c in plan([], ["boot-time"])}


def _status(**stages: dict[str, object] | None) -> str:
    """A status.json as cloud-init 22.4 writes it: every stage finished without errors, unless overridden."""
    v1: dict[str, object] = {"datasource": "DataSourceNoCloud [seed=/dev/sr0][dsmode=net]", "stage": None}
    for i, name in enumerate(("init-local", "init", "modules-config", "modules-final")):
        v1[name] = {"errors": [], "start": 1795000000.0 + 10 * i, "finished": 1795000005.0 + 10 * i}
    for name, value in stages.items():
        v1[name.replace("_", "-")] = value
    return json.dumps({"v1": v1})


RESULT_OK = json.dumps({"v1": {"datasource": "DataSourceNoCloud", "errors": []}})


def test_cloud_init_is_judged_from_its_own_status_files() -> None:
    check = _builtin("cloud-init")
    assert "status.json" in check.command and "cloud-init status" not in check.command  # no Python start in the guest
    sep = "@@qinst-result-json@@"
    assert check.evaluate(Output(0, f"{_status()}\n{sep}\n{RESULT_OK}", ""), CTX).ok
    # The same rules as `cloud-init status`: any stage error, a running or unfinished stage, no result.json yet.
    failing = {
        "errors: modules-final: ('scripts_user'": _status(
            modules_final={"errors": ["('scripts_user', RuntimeError())"], "start": 1.0, "finished": 2.0}
        ),
        "running in stage modules-final": json.dumps({"v1": {**json.loads(_status())["v1"], "stage": "modules-final"}}),
        "stage modules-final started, not finished": _status(
            modules_final={"errors": [], "start": 1.0, "finished": None}
        ),
        "status.json is missing": "cat: /run/cloud-init/status.json: No such file or directory",
        "has not run": _status(init_local=None, init=None, modules_config=None, modules_final=None),
    }
    for expected, status in failing.items():
        verdict = check.evaluate(Output(0, f"{status}\n{sep}\n{RESULT_OK}", ""), CTX)
        assert not verdict.ok and expected in verdict.message, (expected, verdict.message)
    assert cloud_init_status(_status(), "") == (
        False,
        "/run/cloud-init/result.json is missing or unreadable (cloud-init not finished)",
    )
    done, seen = cloud_init_status(_status(), json.dumps({"v1": {"errors": ["no datasource"]}}))
    assert not done and seen == "errors: result: no datasource"


def test_cloud_init_log_fails_on_warnings_and_tracebacks_unless_allowed() -> None:
    check = _builtin("cloud-init-log")
    log = (
        "2026-11-28 21:47:01,000 - util.py[DEBUG]: fine\n"
        "2026-11-28 21:47:02,000 - schema.py[WARNING]: Invalid cloud-config provided\n"
        "Traceback (most recent call last):\n"
    )
    verdict = check.evaluate(Output(0, log, ""), CTX)
    assert not verdict.ok
    assert "2 Traceback/WARNING line(s)" in verdict.message and "schema.py[WARNING]" in verdict.message
    allowed = Context("x", "i", 4, allow_warnings=(re.compile("Invalid cloud-config"), re.compile("^Traceback")))
    assert check.evaluate(Output(0, log, ""), allowed).ok
    assert not check.evaluate(Output(1, "", "cat: permission denied"), CTX).ok


def test_system_state_lists_failed_units_and_honours_the_allow_list() -> None:
    check = _builtin("system-state")
    assert check.evaluate(Output(0, "running\n@@qinst-failed-units@@\n", ""), CTX).ok
    degraded = Output(1, "degraded\n@@qinst-failed-units@@\nfoo.service loaded failed failed Foo\n", "")
    verdict = check.evaluate(degraded, CTX)
    assert not verdict.ok and verdict.message == "system is degraded; failed units: foo.service"
    assert verdict.properties == {"system-state": "degraded"}
    assert check.evaluate(degraded, Context("x", "i", 4, allow_failed_units=("foo.*",))).ok
    assert not check.evaluate(Output(1, "starting\n@@qinst-failed-units@@\n", ""), CTX).ok


def test_boot_time_reads_systemd_analyze() -> None:
    text = "Startup finished in 2.145s (kernel) + 1min 3.5s (userspace) = 1min 5.645s\ngraphical.target reached\n"
    assert boot_times(text) == {"kernel": 2.145, "userspace": 63.5, "total": 65.645}
    assert parse_duration("1min 2.5s") == 62.5 and parse_duration("850ms") == 0.85
    verdict = _builtin("boot-time").evaluate(Output(0, text, ""), CTX)
    assert verdict.ok and verdict.properties["boot-time-total"] == "65.645"
    assert not _builtin("boot-time").evaluate(Output(1, "", "Bootup is not yet finished"), CTX).ok
