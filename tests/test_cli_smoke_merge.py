"""`qinst smoke --shard K/N` and `qinst smoke merge` (issue 27): the split is deterministic and covers every job once,
and the merge of the shards' results.json gives the JUnit report one run would have written. Fast: smoke runs of
images that cannot be pulled finish at once on libvirt's test driver, and results are also made in-process.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from qemu_instances.arch import Arch
from qemu_instances.domain import Firmware
from qemu_instances.errors import UsageError
from qemu_instances.junit import junit_xml
from qemu_instances.shards import Shard
from qemu_instances.smoke import jobs
from qemu_instances.smokereport import SCHEMA, CheckResult, ImageReport, Status, load_baseline, results_json
from testsupport.qinst import qinst_argv, qinst_env

lxml_etree = pytest.importorskip("lxml.etree")  # a test dependency (pyproject [test])
XSD = Path(__file__).resolve().parents[1] / ".venv/share/junit/junit-10.xsd"


def validate(xml: bytes) -> None:
    assert XSD.is_file(), f"{XSD} is missing: 'bash scripts/setup.sh --test' fetches it"
    schema = lxml_etree.XMLSchema(lxml_etree.parse(str(XSD)))
    assert schema.validate(lxml_etree.fromstring(xml)), schema.error_log


def run_qinst(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = qinst_env(QINST_CONNECT="test:///default", QINST_CACHE_DIR=str(tmp_path / "cache"))
    return subprocess.run(
        [*qinst_argv(), *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120, check=False
    )


# -- the split --------------------------------------------------------------------------------------------------------


def test_every_job_is_in_exactly_one_shard_whatever_n() -> None:
    matrix = jobs(["debian-12", "ubuntu-24.04", "debian-13"], [None, Firmware.UEFI], [Arch.X86_64, Arch.AARCH64])
    assert len(matrix) == 9  # aarch64 has UEFI only: 3 x (2 + 1)
    for n in range(1, 12):
        shares = [Shard(k, n).take(matrix) for k in range(1, n + 1)]
        taken = sorted(i for share in shares for i, _ in share)
        assert taken == list(range(len(matrix))), n  # every job, once
        for k, share in enumerate(shares, start=1):
            assert all(i % n == k - 1 and matrix[i] == job for i, job in share)  # job i -> shard (i mod N) + 1
            assert share == Shard(k, n).take(list(matrix))  # the same on every CI job


@pytest.mark.parametrize("text", ["0/3", "4/3", "1/0", "a/b", "3", "1/3/5", "-1/3", ""])
def test_a_shard_that_is_not_k_of_n_is_refused(text: str, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="expected K/N"):
        Shard.parse(text)
    proc = run_qinst(tmp_path, "smoke", "./x.qcow2", "--shard", text, "--artifacts", "out")
    assert proc.returncode == 2 and "--shard" in proc.stderr and not (tmp_path / "out").exists()


def test_shards_run_their_share_and_merge_into_the_whole_report(tmp_path: Path) -> None:
    """Three CI jobs, each `qinst smoke --shard K/3` of the same command line (images that cannot be pulled: each
    job reports at once), then one merge: the matrix's order, JUnit valid, exit 6 (everything failed)."""
    images = ["./a.qcow2", "./b.qcow2"]
    for k in (1, 2, 3):
        proc = run_qinst(tmp_path, "smoke", *images, "--firmware", "bios,uefi", "--shard", f"{k}/3", "--artifacts",
                         f"s{k}")  # fmt: skip
        assert proc.returncode == 6, proc.stderr
    results = {k: json.loads((tmp_path / f"s{k}/results.json").read_text()) for k in (1, 2, 3)}
    assert results[2]["shard"] == {"index": 2, "count": 3} and results[2]["schema"] == SCHEMA
    assert [(r["suite"], r["job"]) for r in results[1]["results"]] == [("./a.qcow2[bios]", 0), ("./b.qcow2[uefi]", 3)]
    assert [r["job"] for r in results[2]["results"]] == [1] and [r["job"] for r in results[3]["results"]] == [2]

    files = [f"s{k}/results.json" for k in (3, 1, 2)]  # any order
    merged = run_qinst(tmp_path, "smoke", "merge", *files, "--junit", "r.xml", "--summary", "s.md", "--json")
    assert merged.returncode == 6, merged.stderr
    assert "4 of 4 image(s) failed" in merged.stderr
    data = json.loads(merged.stdout)
    suites = ["./a.qcow2[bios]", "./a.qcow2[uefi]", "./b.qcow2[bios]", "./b.qcow2[uefi]"]
    assert [r["suite"] for r in data["results"]] == suites and "shard" not in data and data["passed"] is False
    xml = (tmp_path / "r.xml").read_bytes()
    validate(xml)
    root = lxml_etree.fromstring(xml)
    assert [s.get("name") for s in root.findall("testsuite")] == suites
    assert root.get("failures") == "4"
    assert "0 of 4 passed" in (tmp_path / "s.md").read_text()
    # The merged results are tomorrow's baseline like any run's.
    (tmp_path / "merged.json").write_text(merged.stdout)
    assert set(load_baseline(tmp_path / "merged.json").timings) == set(suites)


def report(image: str, firmware: str, failed: bool, job: int) -> ImageReport:
    r = ImageReport(image, firmware=firmware, instance=f"smoke-{image}-{job}", job=job)
    r.console = "\n".join(f"console line {i} <&>" for i in range(80)) + "\nKernel panic\n"
    r.checks = [
        CheckResult("booted", Status.PASSED, 1.25),
        CheckResult("user-check", Status.PASSED, 0.5, "", "$ true\nexit 0 after 0.01 s"),
        CheckResult(
            "cloud-init", Status.FAILED if failed else Status.PASSED, 2.0, "expected x, saw y" if failed else ""
        ),
        CheckResult("ssh", Status.FAILED if failed else Status.SKIPPED, 0.0, "saw a refusal", "$ ssh\nexit 255"),
    ]
    r.properties = {"digest": "sha512:00", "accel": "tcg"}
    r.timings = {"download": 1.0, "boot": 2.5, "boot-kernel": 1.5, "ssh": 0.75}
    r.attempts, r.first_failure = (2, "cloud-init: expected x") if job == 1 else (1, "")
    return r


def test_the_merged_junit_is_the_report_one_run_would_have_written(tmp_path: Path) -> None:
    reports = [report("debian-12", "bios", False, 0), report("debian-12", "uefi", True, 1)]
    reports += [report("ubuntu-24.04", "bios", True, 2)]
    for k in (1, 2):
        share = [r for r in reports if r.job is not None and r.job % 2 == k - 1]
        (tmp_path / f"{k}.json").write_text(json.dumps(results_json(share, (k, 2))))
    proc = run_qinst(tmp_path, "smoke", "merge", "2.json", "1.json", "--junit", "r.xml", "--json")
    assert proc.returncode == 6
    assert (tmp_path / "r.xml").read_bytes() == junit_xml(reports)  # outputs, console tails, properties, order
    validate((tmp_path / "r.xml").read_bytes())
    assert json.loads(proc.stdout)["results"] == results_json(reports)["results"]


def test_a_missing_shard_fails_the_merge_but_the_report_is_written(tmp_path: Path) -> None:
    passed = report("debian-12", "bios", False, 0)
    passed.checks = [c for c in passed.checks if c.status is Status.PASSED]
    (tmp_path / "1.json").write_text(json.dumps(results_json([passed], (1, 3))))
    proc = run_qinst(tmp_path, "smoke", "merge", "1.json", "--junit", "r.xml", "--json")
    assert proc.returncode == 6 and "no results for shard(s) 2/3, 3/3" in proc.stderr
    validate((tmp_path / "r.xml").read_bytes())
    assert json.loads(proc.stdout)["passed"] is False  # every result it has passed, but the matrix is not whole


def test_results_of_an_older_qinst_merge_and_pass(tmp_path: Path) -> None:
    """results.json written before the merge existed: no outputs, no console tail, no job number, no shard."""
    old = {
        "schema": SCHEMA,
        "passed": True,
        "results": [
            {"image": "debian-12", "firmware": "bios", "arch": "x86_64", "suite": "debian-12[bios]",
             "instance": "smoke-x", "passed": True, "started": "2026-11-01T10:00:00+00:00",
             "checks": [{"name": "booted", "status": "passed", "seconds": 1.0, "message": ""}],
             "properties": {"digest": "sha512:00"}, "timings": {"boot": 2.0}},
        ],
    }  # fmt: skip
    (tmp_path / "old.json").write_text(json.dumps(old))
    other = report("ubuntu-24.04", "bios", False, 0)
    other.checks = [c for c in other.checks if c.status is Status.PASSED]
    (tmp_path / "new.json").write_text(json.dumps(results_json([other])))
    proc = run_qinst(tmp_path, "smoke", "merge", "old.json", "new.json", "--junit", "r.xml")
    assert proc.returncode == 0, proc.stderr
    validate((tmp_path / "r.xml").read_bytes())


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"a.json": "[]"}, "not qinst smoke results"),
        ({"a.json": "{"}, "not JSON"),
        ({"a.json": '{"schema": "qinst-smoke/2", "results": []}'}, "expected schema"),
        ({"a.json": '{"schema": "qinst-smoke/1", "results": [{"image": 3}]}'}, "results[0].image: expected str"),
        (
            {"a.json": '{"schema": "qinst-smoke/1", "results": [{"image": "x", "checks": [{"status": "won"}]}]}'},
            "status: expected one of",
        ),
        (
            {"a.json": '{"schema": "qinst-smoke/1", "results": [{"image": "x", "timings": {"boot": 1e400}}]}'},
            "duration",
        ),
        (
            {"a.json": '{"schema": "qinst-smoke/1", "results": [{"image": "x", "timings": {"boot": -1}}]}'},
            "a duration",
        ),
        ({"a.json": '{"schema": "qinst-smoke/1", "results": [{"image": "x", "suite": "y[bios]"}]}'}, "is not"),
    ],
)
def test_files_that_are_not_results_are_refused(tmp_path: Path, files: dict[str, str], message: str) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    proc = run_qinst(tmp_path, "smoke", "merge", *files, "--junit", "r.xml")
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "r.xml").exists()


def test_the_same_suite_or_shard_twice_and_shards_of_two_splits_are_refused(tmp_path: Path) -> None:
    one = report("debian-12", "bios", False, 0)
    (tmp_path / "a.json").write_text(json.dumps(results_json([one], (1, 2))))
    (tmp_path / "b.json").write_text(json.dumps(results_json([report("debian-13", "bios", False, 1)], (1, 2))))
    (tmp_path / "c.json").write_text(json.dumps(results_json([report("debian-13", "bios", False, 1)], (2, 3))))
    (tmp_path / "d.json").write_text(json.dumps(results_json([one])))
    twice = run_qinst(tmp_path, "smoke", "merge", "d.json", "d.json")
    assert twice.returncode == 2 and "debian-12[bios] is in both" in twice.stderr
    (tmp_path / "e.json").write_text((tmp_path / "d.json").read_text())  # the same result in another file
    copied = run_qinst(tmp_path, "smoke", "merge", "d.json", "e.json")
    assert copied.returncode == 2 and "debian-12[bios] is in both d.json and e.json" in copied.stderr
    shard = run_qinst(tmp_path, "smoke", "merge", "a.json", "b.json")
    assert shard.returncode == 2 and "shard 1/2 is both" in shard.stderr
    split = run_qinst(tmp_path, "smoke", "merge", "a.json", "c.json")
    assert split.returncode == 2 and "shards of 2" in split.stderr
    none = run_qinst(tmp_path, "smoke", "merge")
    assert none.returncode == 2


def test_a_shard_beyond_the_matrix_runs_nothing_and_passes(tmp_path: Path) -> None:
    proc = run_qinst(tmp_path, "smoke", "./a.qcow2", "--shard", "2/5", "--artifacts", "out", "--junit", "r.xml")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "out/results.json").read_text())["results"] == []
    validate((tmp_path / "r.xml").read_bytes())


def test_merge_has_its_own_help_and_smoke_mentions_it(tmp_path: Path) -> None:
    merge = run_qinst(tmp_path, "smoke", "merge", "--help")
    assert merge.returncode == 0 and "Usage: qinst smoke merge [OPTIONS]" in merge.stdout
    assert "`smoke merge` joins --shard runs" in run_qinst(tmp_path, "smoke", "--help").stdout
    # The global options before the command are skipped to find it, as for every command.
    assert run_qinst(tmp_path, "--connect", "test:///default", "smoke", "merge", "--help").returncode == 0
