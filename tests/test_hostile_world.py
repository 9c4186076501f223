"""What a hostile guest, file or co-tenant could still do (issue 22), each replayed as described: a guest flooding
smoke's session, a domain smoke did not create, another domain's bad record, names that reach a terminal or scp,
globs that reach another instance's files. Fast: a fake `ssh` on PATH, libvirt's test driver, the real `qinst`.
"""

from __future__ import annotations

import json
import resource
import subprocess
import threading
import time
from pathlib import Path

import libvirt
import pytest

from qemu_instances import instances, launch, smoke
from qemu_instances.domain import METADATA_KEY, METADATA_NS, Metadata
from qemu_instances.host import Host
from qemu_instances.instances import Instance, remove_logs
from qemu_instances.mounts import Mount
from qemu_instances.settings import Settings
from qemu_instances.smoke import Job, SmokeOptions, _Runner
from qemu_instances.transfer import plan, scp_argv
from testsupport.qinst import qinst_argv, qinst_env

TEST_URI = "test:///default"


def _meta(**changes: object) -> Metadata:
    base = {
        "image": "qinst-test", "digest": "sha512:" + "0" * 128, "user": "debian", "network": "user",
        "ssh_host": "127.0.0.1", "ssh_port": 2222, "created": "2026-11-01T10:00:00+00:00",
        "host_keys": "ssh-ed25519 " + "A" * 68,
    }  # fmt: skip
    return Metadata(**{**base, **changes})  # type: ignore[arg-type]


def _domain_xml(name: str, meta: Metadata | None) -> str:
    record = meta.to_xml().replace("<instance>", f'<instance xmlns="{METADATA_NS}">', 1) if meta else ""
    return (
        f'<domain type="test"><name>{name}</name><memory>65536</memory><os><type>hvm</type></os>'
        f"<metadata>{record}</metadata></domain>"
    )


def _node(tmp_path: Path, domains: dict[str, Metadata | None]) -> str:
    path = tmp_path / "node.xml"
    path.write_text("<node>" + "".join(_domain_xml(n, m) for n, m in domains.items()) + "</node>")
    return f"test://{path}"


def _qinst(uri: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = qinst_env(QINST_CONNECT=uri, QINST_CACHE_DIR=str(tmp_path / "cache"), XDG_CONFIG_HOME=str(tmp_path / "c"))
    return subprocess.run([*qinst_argv(), *args], capture_output=True, text=True, env=env, timeout=60, check=False)


# -- one bad record breaks nothing else -------------------------------------------------------------------------------


def test_a_naive_created_time_makes_that_record_invalid_and_ls_lists_the_rest(tmp_path: Path) -> None:
    uri = _node(tmp_path, {"good": _meta(), "naive": _meta(created="2026-11-01T10:00:00"), "forward": _meta()})
    proc = _qinst(uri, tmp_path, "ls", "--json")
    assert proc.returncode == 0, proc.stderr
    states = {row["name"]: row["state"] for row in json.loads(proc.stdout)}
    assert states == {"good": "running", "naive": "invalid", "forward": "running"}
    table = _qinst(uri, tmp_path, "ls")
    assert table.returncode == 0 and "naive" in table.stdout and "invalid" in table.stdout


def test_every_way_a_record_can_break_is_invalid_never_a_crash() -> None:
    bad = [
        "<instance><created>2026-11-01T10:00:00</created></instance>",
        "<instance><ssh-port>99999999999999999999999999</ssh-port></instance>",
        "<instance><forwards><forward>1:2:3:4</forward></forwards></instance>",
        "<instance><mounts><mount>virtiofs:ro://etc:/etc</mount></mounts></instance>",
        "<instance" + "><a>" * 2000 + "</a>" * 2000 + "</instance>",
        "not xml at all",
        '<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaaaaaaaa">]><instance>&a;</instance>',
    ]
    for text in bad:
        inst = instances.record_of("web1", "running", text)
        assert inst is not None and inst.invalid, text[:60]


def test_up_auto_is_not_stopped_by_another_domains_invalid_record() -> None:
    """Another domain paused with a record that does not validate (a bad forward) says nothing about KVM."""
    with Host(TEST_URI) as host:
        dom = host.conn.defineXML(_domain_xml("stranger-rec", None))
        try:
            dom.create()
            record = _meta(accel="kvm", forwards=("127.0.0.1:8080:80",)).to_xml()
            record = record.replace("127.0.0.1:8080:80", "not:a:forward:at:all")  # as another program wrote it
            dom.setMetadata(
                libvirt.VIR_DOMAIN_METADATA_ELEMENT, record, METADATA_KEY, METADATA_NS, libvirt.VIR_DOMAIN_AFFECT_LIVE
            )
            dom.suspend()
            assert launch._paused_kvm_instance(host) is None
        finally:
            dom.destroy()
            dom.undefine()


# -- names: terminals, scp, globs, paths ------------------------------------------------------------------------------


def test_ls_prints_no_terminal_escapes_from_a_domain_name(tmp_path: Path) -> None:
    hostile = "evil\u202e\u0085name"  # a bidi override and a C1 control
    uri = _node(tmp_path, {"good": _meta(), hostile: _meta()})
    proc = _qinst(uri, tmp_path, "ls")
    assert proc.returncode == 0, proc.stderr
    assert "\u202e" not in proc.stdout and "\u0085" not in proc.stdout and "\x1b" not in proc.stdout
    assert "evilname" in proc.stdout


def test_a_local_cp_operand_with_a_colon_is_never_a_host_for_scp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "-oProxyCommand=x").write_text("a local file with an unlucky name")
    inst = Instance("web1", "running", _meta(private_key=""))
    copy = plan(["web1:/etc/hostname"], "Backup:copy.txt")
    argv = scp_argv(inst, Settings(cache_dir=tmp_path), copy)
    assert argv[-2:] == ["debian@127.0.0.1:/etc/hostname", "./Backup:copy.txt"]
    copy = plan(["-oProxyCommand=x"], "web1:/tmp/")
    assert scp_argv(inst, Settings(cache_dir=tmp_path), copy)[-2] == "./-oProxyCommand=x"


def test_removing_an_instances_logs_touches_no_other_instances(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    mine = ["web-fs-console.log", "web-fs.log", "web-fs-fs0-virtiofsd.log", "web-fs-fs12-virtiofsd.log"]
    theirs = ["web-fsdata-console.log", "web-fsdata-fs0-virtiofsd.log", "web-fs1-virtiofsd.log.old", "web-fsx.log"]
    for name in mine + theirs:
        (logs / name).write_text("x")
    monkeypatch.setattr(instances, "console_log_path", lambda host, pool, name: logs / f"{name}-console.log")

    class Local:
        is_local = True

    remove_logs(Local(), "web-fs")  # type: ignore[arg-type]
    assert sorted(p.name for p in logs.iterdir()) == sorted(theirs)


@pytest.mark.parametrize("guest", ["//etc", "/etc/", "/./etc", "///usr", "/var/./", "/lib64"])
def test_guest_paths_are_normalised_before_the_system_folders_are_refused(guest: str) -> None:
    from qemu_instances.errors import UsageError

    with pytest.raises(UsageError, match="refusing to mount over the guest's /"):
        Mount.parse(f"/tmp:{guest}")


def test_every_duration_option_refuses_what_is_not_a_duration(tmp_path: Path) -> None:
    for value in ("nan", "-5", "inf", "0"):
        proc = _qinst(TEST_URI, tmp_path, "snapshot", "restore", "web1", "a", "--timeout", value)
        assert proc.returncode == 2, (value, proc.stderr)
        assert "--timeout must be a number of seconds above 0" in proc.stderr


def test_up_refuses_a_private_key_others_can_read_before_anything_is_made(tmp_path: Path) -> None:
    key = tmp_path / "id"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    key.chmod(0o644)
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M"], check=True)
    proc = _qinst("test:///nonexistent-qinst-must-not-connect", tmp_path, "up", str(image), "--ssh-key", str(key))
    assert proc.returncode == 2, proc.stderr
    assert f"the private key {key} is readable by others (mode 0644)" in proc.stderr
    assert f"hint: chmod 600 {key}" in proc.stderr


# -- smoke: a flooding guest, a domain it did not make ----------------------------------------------------------------


@pytest.fixture
def fake_ssh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An `ssh` first on PATH that prints without end, as a hostile guest would through a real one."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "ssh"
    script.write_text("#!/bin/sh\nexec yes 'the guest talks and talks and talks'\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    return script


def test_a_guest_flooding_the_check_session_is_cut_at_the_cap(
    fake_ssh: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(smoke, "SESSION_OUTPUT", 16 << 20)
    runner = _Runner(Settings(connect=TEST_URI, cache_dir=tmp_path), Job("x", smoke.Firmware.BIOS, "x"),
                     SmokeOptions(), threading.Event())  # fmt: skip
    inst = Instance("web1", "running", _meta())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    code, stdout, stderr = runner._session(inst, smoke.Batch({"check:a": ("true", 10.0)}))
    assert time.monotonic() - started < 60
    assert len(stdout) == 16 << 20 and code == 255
    assert "the guest sent more than 16 MiB over the SSH session; it was stopped" in stderr
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown < 96 << 10, f"memory grew by {grown} KiB"


def test_a_failed_smoke_attempt_never_removes_a_domain_it_did_not_create(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A domain with the very name smoke draws (a kept guest, another run's) survives this run's failed pull."""
    monkeypatch.setattr(smoke.secrets, "token_hex", lambda n: "deadbeef")
    name = "smoke-nosuch-deadbeef"
    with Host(TEST_URI) as host:
        dom = host.conn.defineXML(_domain_xml(name, _meta()))
        try:
            runner = _Runner(Settings(connect=TEST_URI, cache_dir=tmp_path), Job("nosuch", smoke.Firmware.BIOS, "x"),
                             SmokeOptions(), threading.Event())  # fmt: skip
            report = runner.run()
            assert not report.passed and report.instance == name
            assert host.lookup(name) is not None, "smoke removed a domain it did not create"
        finally:
            dom.undefine()


def test_generated_names_never_reuse_a_taken_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Host(TEST_URI) as host:
        taken = host.conn.defineXML(_domain_xml("img-aaaa", None))
        try:
            assert launch._taken(host, "img-aaaa") and not launch._taken(host, "img-bbbb")
        finally:
            taken.undefine()
