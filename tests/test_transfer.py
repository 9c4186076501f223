"""`qinst cp`: operands, their checks, and scp's argv with `qinst ssh`'s options."""

from __future__ import annotations

from pathlib import Path

import pytest

from qemu_instances.domain import Metadata
from qemu_instances.errors import UsageError
from qemu_instances.instances import Instance
from qemu_instances.settings import Settings
from qemu_instances.transfer import Operand, plan, scp_argv
from testsupport.testdriver import sample_record

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAuBUfUBCujFmHWWVVWaubWIPHRW795crgJj2nycx7Y0"


def test_operands() -> None:
    assert Operand.parse("web1:/etc/hostname") == Operand("/etc/hostname", "web1")
    assert Operand.parse("web1:") == Operand("", "web1")
    assert Operand.parse("./web1:x") == Operand("./web1:x")
    assert Operand.parse("/tmp/a:b") == Operand("/tmp/a:b")
    assert Operand.parse("Web1:x") == Operand("Web1:x")  # not an instance name: a local file
    assert Operand.parse("file.txt") == Operand("file.txt")


def test_plan_directions(tmp_path: Path) -> None:
    local = tmp_path / "f"
    local.write_text("x")
    up = plan([str(local)], "vm1:/tmp/")
    assert up.instance == "vm1" and up.upload
    down = plan(["vm1:/etc/hostname", "vm1:/etc/os-release"], str(tmp_path))
    assert down.instance == "vm1" and not down.upload and len(down.sources) == 2


@pytest.mark.parametrize(
    ("sources", "dest", "message"),
    [
        (["vm1:/a"], "vm2:/b", "not between vm1 and vm2"),
        (["vm1:/a"], "vm1:/b", "both in the instance"),
        (["{tmp}/f"], "{tmp}/g", "neither side names an instance"),
        (["{tmp}/missing"], "vm1:/b", "no such local file or folder"),
        (["vm1:/a", "{tmp}/f"], "{tmp}/g", "all local or all in the instance"),
        (["vm1:"], "{tmp}/g", "an empty path"),
    ],
)
def test_plan_refuses(tmp_path: Path, sources: list[str], dest: str, message: str) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(UsageError, match=message):
        plan([s.format(tmp=tmp_path) for s in sources], dest.format(tmp=tmp_path))


def test_scp_argv(tmp_path: Path) -> None:
    meta = Metadata("img", "sha512:00", "debian", "user", ssh_host="127.0.0.1", ssh_port=2200, host_keys=KEY)
    settings = Settings(connect="qemu+ssh://root@lab1:2222/system", cache_dir=tmp_path, config_dir=tmp_path)
    (tmp_path / "f").write_text("x")
    inst = Instance("vm1", "running", meta)
    argv = scp_argv(inst, settings, plan([str(tmp_path / "f")], "vm1:/tmp/x y"), recursive=True)
    assert argv[0] == "scp" and "-r" in argv
    assert "Port=2200" in argv and "-p" not in argv and "-P" not in argv  # the port is an -o option
    assert "StrictHostKeyChecking=yes" in argv
    assert "ProxyCommand=ssh -p 2222 -l root -o BatchMode=yes -W %h:%p -- lab1" in argv
    assert argv[-3:] == ["--", str(tmp_path / "f"), "debian@127.0.0.1:/tmp/x y"]
    with pytest.raises(UsageError, match="is shutoff"):
        scp_argv(Instance("vm1", "shutoff", meta), settings, plan(["vm1:/a"], str(tmp_path)))


# -- local operands ----------------------------------------------------------------------------------------------------


def test_a_local_cp_operand_with_a_colon_is_never_a_host_for_scp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "-oProxyCommand=x").write_text("a local file with an unlucky name")
    inst = Instance("web1", "running", sample_record(private_key=""))
    copy = plan(["web1:/etc/hostname"], "Backup:copy.txt")
    argv = scp_argv(inst, Settings(cache_dir=tmp_path), copy)
    assert argv[-2:] == ["debian@127.0.0.1:/etc/hostname", "./Backup:copy.txt"]
    copy = plan(["-oProxyCommand=x"], "web1:/tmp/")
    assert scp_argv(inst, Settings(cache_dir=tmp_path), copy)[-2] == "./-oProxyCommand=x"
