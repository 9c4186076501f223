"""`qinst ls` through the real entry point, on a libvirt test-driver host file: one bad record breaks nothing else,
and no terminal escape in a domain name reaches the terminal."""

from __future__ import annotations

import json
from pathlib import Path

from qemu_instances.domain import Metadata
from testsupport.testdriver import record_domain_xml, run_qinst, sample_record


def _node(tmp_path: Path, domains: dict[str, Metadata | None]) -> str:
    path = tmp_path / "node.xml"
    path.write_text("<node>" + "".join(record_domain_xml(n, m) for n, m in domains.items()) + "</node>")
    return f"test://{path}"


def test_a_naive_created_time_makes_that_record_invalid_and_ls_lists_the_rest(tmp_path: Path) -> None:
    uri = _node(
        tmp_path,
        {"good": sample_record(), "naive": sample_record(created="2026-11-01T10:00:00"), "forward": sample_record()},
    )
    proc = run_qinst(uri, tmp_path, "ls", "--json")
    assert proc.returncode == 0, proc.stderr
    states = {row["name"]: row["state"] for row in json.loads(proc.stdout)}
    assert states == {"good": "running", "naive": "invalid", "forward": "running"}
    table = run_qinst(uri, tmp_path, "ls")
    assert table.returncode == 0 and "naive" in table.stdout and "invalid" in table.stdout


def test_ls_prints_no_terminal_escapes_from_a_domain_name(tmp_path: Path) -> None:
    hostile = "evil\u202e\u0085name"  # a bidi override and a C1 control
    uri = _node(tmp_path, {"good": sample_record(), hostile: sample_record()})
    proc = run_qinst(uri, tmp_path, "ls")
    assert proc.returncode == 0, proc.stderr
    assert "\u202e" not in proc.stdout and "\u0085" not in proc.stdout and "\x1b" not in proc.stdout
    assert "evilname" in proc.stdout
