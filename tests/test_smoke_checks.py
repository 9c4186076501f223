"""Smoke checks as data, the one-session batch script (run by a real sh), the judges, baselines, the summary, and
the smoke command's checks of its options before anything boots (through the real `qinst` entry point)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import RunQinst

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
from qemu_instances.smokereport import (
    SCHEMA,
    CheckResult,
    ImageReport,
    Status,
    load_baseline,
    regressions,
    results_json,
    summary_markdown,
)

lxml_etree = pytest.importorskip("lxml.etree")
XSD = Path(__file__).resolve().parents[1] / ".venv/share/junit/junit-10.xsd"
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


def _report(image: str, firmware: str, timings: dict[str, float], failed: str = "") -> ImageReport:
    report = ImageReport(image, firmware=firmware, instance="smoke-x")
    report.checks = [CheckResult("booted", Status.PASSED)]
    if failed:
        report.checks.append(CheckResult(failed, Status.FAILED, 1.0, "expected exit 0, got 3\nmore"))
    report.timings = timings
    return report


def test_baseline_flags_phases_much_slower_and_the_summary_says_so(tmp_path: Path) -> None:
    last_night = [_report("debian-12", "bios", {"define": 0.5, "boot": 10.0, "cloud-init": 30.0, "ssh": 1.0})]
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(results_json(last_night)))
    baseline = load_baseline(path)
    tonight = _report("debian-12", "bios", {"define": 0.6, "boot": 14.0, "cloud-init": 45.0, "ssh": 1.0})
    found = regressions(tonight, baseline, 1.25)
    # boot: 1.4x but only 4 s slower; cloud-init: 1.5x and 15 s slower
    assert found == ["cloud-init: 45.0 s, baseline 30.0 s (1.50x; threshold 1.25x)"]
    assert regressions(tonight, baseline, 2.0) == []
    assert regressions(_report("other", "bios", {}), baseline, 1.25) is None
    tonight.checks.append(CheckResult("must|fail", Status.FAILED, 0.0, "expected exit 0, got 3\nsecond line"))
    md = summary_markdown([tonight, _report("ubuntu", "uefi", {"boot": 5.0})], baseline)
    row = "| debian-12[bios] | **FAILED** | 60.6 s (baseline 41.5 s, +46%) | must\\|fail: expected exit 0, got 3 |"
    assert row in md
    assert "| ubuntu[uefi] | passed | 5.0 s | - |" in md
    assert "1 of 2 passed." in md
    for text, message in (("[]", "not qinst smoke results"), ("{", "not JSON"), ('{"schema": "x"}', "schema")):
        path.write_text(text)
        with pytest.raises(UsageError, match=message):
            load_baseline(path)


def test_results_json_carries_the_schema_and_retries() -> None:
    report = _report("debian-12", "uefi", {"boot": 1.0})
    report.attempts, report.first_failure = 2, "cloud-init: expected 'status: done'"
    data = results_json([report])
    assert data["schema"] == SCHEMA and data["passed"]
    (result,) = data["results"]
    assert result["suite"] == "debian-12[uefi]" and result["flaky"] and result["attempts"] == 2
    assert result["first_failure"].startswith("cloud-init:")


# ---- the command: options checked before anything boots; reports that always parse ---------------------------------


def _validate(xml: bytes) -> None:
    assert XSD.is_file(), f"{XSD} is missing: 'bash scripts/setup.sh --test' fetches it"
    schema = lxml_etree.XMLSchema(lxml_etree.parse(str(XSD)))
    assert schema.validate(lxml_etree.fromstring(xml)), schema.error_log


@pytest.mark.libvirt
def test_smoke_refuses_bad_options_at_once(qinst: RunQinst, tmp_path: Path) -> None:
    env = {"QINST_CONNECT": "test:///default", "QINST_CACHE_DIR": str(tmp_path / "cache"), "HOME": str(tmp_path)}
    bad_toml = tmp_path / "checks.toml"
    bad_toml.write_text('[[check]]\nname = "x"\nrun = "true"\nnot_stdout = ["[unclosed"]\n')
    unwritable = tmp_path / "ro"
    unwritable.mkdir(mode=0o500)
    cases = [
        (["--junit", "/nonexistent/r.xml"], "--junit: folder /nonexistent does not exist"),
        (["--summary", str(tmp_path)], "is a folder, not a file"),
        (["--artifacts", "/proc/qinst-smoke"], "--artifacts: cannot make folder /proc/qinst-smoke"),
        (["--checks", str(bad_toml)], f"{bad_toml}: check[0] (x).not_stdout: invalid regular expression"),
        (["--skip", "nope"], "--skip 'nope': no such check"),
        (["--check", "nonsense"], "expected NAME=COMMAND"),
        (["--firmware", "bios,coreboot"], "'coreboot' is not one of"),
        (["--baseline", str(bad_toml)], "not JSON"),
        (["--allow-warning", "("], "--allow-warning: invalid regular expression"),
        (["--regression-threshold", "nan"], "--regression-threshold"),
    ]
    if subprocess.run(["id", "-u"], capture_output=True, text=True).stdout.strip() != "0":
        cases.append((["--junit", str(unwritable / "r.xml")], "cannot write in"))  # root writes anywhere
    for args, message in cases:
        run = qinst("smoke", "qinst-test", *args, env=env, timeout=30)
        assert run.returncode == 2, (args, run.stderr)
        assert message in run.stderr, (args, run.stderr)
        assert "Traceback" not in run.stderr
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.qcow2"))


@pytest.mark.libvirt
def test_report_parses_whatever_the_image_names(tmp_path: Path) -> None:
    """`smoke $'bad\\x01name'` and `$'bad\\xffname'`: the run goes on, the JUnit report and summary are written
    and parse (libvirt's test driver: these names never reach a boot)."""
    from conftest import qinst_argv, qinst_env

    junit, summary = tmp_path / "r.xml", tmp_path / "s.md"
    env = qinst_env(QINST_CONNECT="test:///default", QINST_CACHE_DIR=str(tmp_path / "cache"), HOME=str(tmp_path))
    argv: list[str | bytes] = [*qinst_argv(), "smoke", b"bad\x01name", b"bad\xffname", "debian-12\x1b[31m"]
    argv += ["--junit", str(junit), "--summary", str(summary), "--json"]
    proc = subprocess.run(argv, capture_output=True, env=env, timeout=60, check=False)
    assert proc.returncode == 6, proc.stderr
    assert b"Traceback" not in proc.stderr
    xml = junit.read_bytes()
    _validate(xml)
    root = lxml_etree.fromstring(xml)
    names = [s.get("name") for s in root.findall("testsuite")]
    assert names == ["badname[bios]", "badname[bios]", "debian-12[bios]"]
    assert all(s.find("testcase[@name='pull']/failure") is not None for s in root.findall("testsuite"))
    data = json.loads(proc.stdout)
    assert data["schema"] == SCHEMA and len(data["results"]) == 3
    md = summary.read_text()
    assert md.count("**FAILED**") == 3 and "\x1b" not in md and "\x01" not in md


def test_retries_report_a_flaky_pass_with_the_first_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The retry loop of one image (its boots stubbed: the real ones are in test_smoke.py)."""
    import threading

    from qemu_instances.domain import Firmware
    from qemu_instances.settings import Settings
    from qemu_instances.smoke import Job, SmokeOptions, _Runner

    failing = _report("img", "uefi", {"boot": 3.0}, failed="cloud-init")
    passing = _report("img", "uefi", {"boot": 2.0})
    attempts = iter([failing, passing])
    keeps: list[bool] = []

    def attempt(self: _Runner, keep: bool) -> ImageReport:
        keeps.append(keep)
        return next(attempts)

    monkeypatch.setattr(_Runner, "_attempt", attempt)
    settings = Settings(connect="test:///default", cache_dir=tmp_path, config_dir=tmp_path)
    opts = SmokeOptions(retries=3, keep_failed=True)
    report = _Runner(settings, Job("img", Firmware.UEFI, "img-uefi"), opts, threading.Event()).run()
    assert report is passing and report.passed and report.flaky and report.attempts == 2
    assert report.first_failure == "cloud-init: expected exit 0, got 3"
    assert keeps == [False, False]  # only the last possible attempt keeps a failed guest
    from qemu_instances.junit import junit_xml

    props = {p.get("name"): p.get("value") for p in lxml_etree.fromstring(junit_xml([report])).iter("property")}
    assert props["flaky"] == "true" and props["attempts"] == "2" and props["first-failure"].startswith("cloud-init")


def test_the_matrix_is_every_image_under_every_firmware() -> None:
    from qemu_instances.domain import Firmware
    from qemu_instances.smoke import jobs

    todo = jobs(["debian-12", "debian-12", "ubuntu-24.04"], [Firmware.BIOS, Firmware.UEFI])
    assert [(j.image, str(j.firmware), j.label) for j in todo] == [
        ("debian-12", "bios", "debian-12-bios"),
        ("debian-12", "uefi", "debian-12-uefi"),
        ("debian-12", "bios", "debian-12-bios-2"),
        ("debian-12", "uefi", "debian-12-uefi-2"),
        ("ubuntu-24.04", "bios", "ubuntu-24-04-bios"),
        ("ubuntu-24.04", "uefi", "ubuntu-24-04-uefi"),
    ]
