"""Host folder mounts: parsing, the metadata record, the driver choice, the domain XML and the guest's fstab; the
read-only helper (virtiofsd-readonly) on its own; and a real guest whose root cannot write a read-only folder."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import libvirt
import pytest
import yaml
from conftest import RunQinst
from guest import domains, unique_name, volumes

from qemu_instances import mounts as mounts_module
from qemu_instances import seed as seeds
from qemu_instances.domain import domain_xml, metadata_from_domain_xml
from qemu_instances.errors import QinstError, UsageError
from qemu_instances.mounts import (
    READONLY_HELPER,
    VIRTIOFSD_PATHS,
    Driver,
    Mount,
    choose_driver,
    cloud_config,
    parse_mounts,
    readonly_helper,
)
from testsupport.qinst import qinst_argv, qinst_env
from testsupport.sshd import Sshd
from testsupport.testdriver import instance_spec
from testsupport.virsh import LOG_DIR, remove_domain


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/srv/data", Mount("/srv/data", "/srv/data", True)),
        ("/srv/data:/mnt/data", Mount("/srv/data", "/mnt/data", True)),
        ("/srv/data:rw", Mount("/srv/data", "/srv/data", False)),
        ("/srv/data/:/mnt/d:rw", Mount("/srv/data", "/mnt/d", False)),
        ("/srv/data:/mnt/d:ro", Mount("/srv/data", "/mnt/d", True)),
    ],
)
def test_parse(text: str, expected: Mount) -> None:
    assert Mount.parse(text) == expected
    assert Mount.from_record(expected.record()) == expected


@pytest.mark.parametrize(
    "text", ["", "rel/dir", "/a:/b:/c", "/a b", "/a,b", "/a/../etc", "/srv:/etc", "/srv:rel", "/srv:/x:rx", "/srv:/"]
)
def test_parse_refuses(text: str) -> None:
    with pytest.raises(UsageError):
        Mount.parse(text)


@pytest.mark.parametrize("record", ["virtiofs:ro:/a", "nfs:ro:/a:/b", "virtiofs:wr:/a:/b", "9p:rw:/a:/b c"])
def test_bad_records_are_refused(record: str) -> None:
    with pytest.raises(QinstError, match="invalid mount"):
        Mount.from_record(record)


def test_local_host_dir_must_exist(tmp_path: Path) -> None:
    assert parse_mounts([f"{tmp_path}:/mnt/x"], Driver.NINEP, local=True)[0].driver is Driver.NINEP
    with pytest.raises(UsageError, match="is not a folder on this host"):
        parse_mounts([f"{tmp_path}/missing"], Driver.VIRTIOFS, local=True)
    assert parse_mounts([f"{tmp_path}/missing:rw"], Driver.VIRTIOFS, local=False)  # the remote host's folder
    with pytest.raises(UsageError, match="share a guest folder"):
        parse_mounts([f"{tmp_path}:/mnt/x", f"{tmp_path}:/mnt/x:rw"], Driver.VIRTIOFS, local=True)


def _caps(*drivers: str) -> str:
    values = "".join(f"<value>{d}</value>" for d in drivers)
    return f"<domainCapabilities><devices><filesystem supported='yes'><enum name='driverType'>{values}</enum>" + (
        "</filesystem></devices></domainCapabilities>"
    )


def test_driver_choice() -> None:
    assert choose_driver(_caps("path", "handle"), local=True)[0] is Driver.NINEP
    driver, why = choose_driver(_caps("path", "virtiofs"), local=False)
    assert driver is Driver.VIRTIOFS and "read-only folders are refused there" in why
    driver, why = choose_driver(_caps("path", "virtiofs"), local=True)
    assert (driver is Driver.VIRTIOFS) == Path("/usr/lib/qemu/virtiofsd").exists()
    assert str(driver) in why
    if driver is Driver.VIRTIOFS:
        assert f"read-only ones through {READONLY_HELPER}" in why


def test_read_only_virtiofs_is_refused_on_a_remote_host() -> None:
    """qinst's read-only virtiofsd is on this machine only: on a remote host the guest's `ro` would be all there
    is, and root in the guest can remount. Read-write folders and 9p (QEMU enforces read-only) are accepted."""
    with pytest.raises(UsageError, match="read-only, which the remote host's virtiofs cannot enforce") as err:
        parse_mounts(["/srv/data:/mnt/data", "/srv/other:rw"], Driver.VIRTIOFS, local=False)
    assert err.value.exit_code == 2 and "add :rw" in (err.value.hint or "")
    assert parse_mounts(["/srv/data:rw"], Driver.VIRTIOFS, local=False)[0].readonly is False
    assert parse_mounts(["/srv/data"], Driver.NINEP, local=False)[0].readonly is True


def test_the_shipped_helper_is_used_for_local_read_only_virtiofs(tmp_path: Path) -> None:
    assert READONLY_HELPER.parent == Path(mounts_module.__file__).parent
    assert readonly_helper() == str(READONLY_HELPER.resolve())
    assert os.access(READONLY_HELPER, os.X_OK)
    assert parse_mounts([str(tmp_path)], Driver.VIRTIOFS, local=True)[0].readonly is True
    # The helper looks for virtiofsd where qinst does.
    paths = re.search(r"^readonly VIRTIOFSD_PATHS=\(([^)]*)\)", READONLY_HELPER.read_text(), re.M)
    assert paths is not None and tuple(paths[1].split()) == VIRTIOFSD_PATHS


def _helper_copy(folder: Path, mode: int = 0o755) -> Path:
    folder.mkdir(mode=0o755, parents=True, exist_ok=True)
    copy = folder / "virtiofsd-readonly"
    shutil.copyfile(READONLY_HELPER, copy)
    copy.chmod(mode)
    return copy


def test_a_helper_others_can_change_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """libvirt runs the helper as root: one that anybody but root and this user could change or replace (the file,
    or a folder above it) would hand them root at the instance's next start. Refused, before anything is made."""
    tmp_path.chmod(0o755)
    good = _helper_copy(tmp_path / "good")
    assert readonly_helper(good) == str(good)
    (tmp_path / "link").symlink_to(good)
    assert readonly_helper(tmp_path / "link") == str(good)  # a link is followed: the file it names is checked

    cases = {
        "group-writable": _helper_copy(tmp_path / "g", 0o775),
        "world-writable": _helper_copy(tmp_path / "o", 0o757),
    }
    shared = tmp_path / "shared"
    _helper_copy(shared / "sub")
    shared.chmod(0o777)  # a folder above it that anyone can rename things in (not sticky)
    cases["a folder above"] = shared / "sub/virtiofsd-readonly"
    (tmp_path / "elsewhere").symlink_to(cases["world-writable"])
    cases["a link to one"] = tmp_path / "elsewhere"
    if os.getuid() == 0:
        stranger = _helper_copy(tmp_path / "u")
        os.chown(stranger, 4242, 4242)
        cases["owned by another user"] = stranger
    for why, path in cases.items():
        with pytest.raises(UsageError, match="others can change") as err:
            readonly_helper(path)
        assert err.value.exit_code == 2, why

    with pytest.raises(UsageError, match="not an executable file"):
        readonly_helper(_helper_copy(tmp_path / "x", 0o644))
    with pytest.raises(UsageError, match="which is missing"):
        readonly_helper(tmp_path / "missing")

    monkeypatch.setattr(mounts_module, "READONLY_HELPER", cases["world-writable"])
    with pytest.raises(UsageError, match="others can change"):
        parse_mounts([str(tmp_path)], Driver.VIRTIOFS, local=True)
    assert parse_mounts([f"{tmp_path}:rw"], Driver.VIRTIOFS, local=True)  # read-write needs no helper
    assert parse_mounts([str(tmp_path)], Driver.NINEP, local=True)  # nor 9p
    driver, why = choose_driver(_caps("virtiofs"), local=True)
    assert driver is Driver.NINEP or "read-only ones refused: " in why  # `qinst doctor` says so


def test_domain_xml_virtiofs_and_9p() -> None:
    spec = instance_spec()
    mounts = (
        Mount("/srv/a", "/mnt/a", True).record(),
        Mount("/srv/b", "/mnt/b", False, Driver.NINEP).record(),
        Mount("/srv/c", "/mnt/c", False).record(),
    )
    spec = replace(spec, metadata=replace(spec.metadata, mounts=mounts))
    root = ET.fromstring(domain_xml(spec))
    fs = root.findall("devices/filesystem")
    assert [f.get("accessmode") for f in fs] == ["passthrough", "mapped", "passthrough"]
    assert [f.find("driver").get("type") for f in (fs[0], fs[2])] == ["virtiofs"] * 2  # type: ignore[union-attr]
    assert [f.find("target").get("dir") for f in fs] == ["qinst0", "qinst1", "qinst2"]  # type: ignore[union-attr]
    assert [f.find("source").get("dir") for f in fs] == ["/srv/a", "/srv/b", "/srv/c"]  # type: ignore[union-attr]
    assert [f.find("readonly") for f in fs] == [None, None, None]  # libvirt 9.0 refuses it on virtiofs
    # Read-only virtiofs: libvirt runs qinst's virtiofsd, which binds the folder read-only on the host.
    assert fs[0].find("binary").get("path") == str(READONLY_HELPER.resolve())  # type: ignore[union-attr]
    assert fs[1].find("binary") is None and fs[2].find("binary") is None  # libvirt's own virtiofsd for read-write
    assert root.find("memoryBacking/source").get("type") == "memfd"  # type: ignore[union-attr]
    assert root.find("memoryBacking/access").get("mode") == "shared"  # type: ignore[union-attr]
    assert metadata_from_domain_xml(domain_xml(spec)) == spec.metadata

    only_9p = replace(spec, metadata=replace(spec.metadata, mounts=(Mount("/srv", "/m", True, Driver.NINEP).record(),)))
    root = ET.fromstring(domain_xml(only_9p))
    assert root.find("memoryBacking") is None
    assert root.find("devices/filesystem/readonly") is not None  # 9p: QEMU refuses the writes


def test_libvirt_accepts_the_filesystems() -> None:
    spec = instance_spec()
    mounts = (Mount("/srv/a", "/mnt/a", True).record(), Mount("/srv/b", "/mnt/b", True, Driver.NINEP).record())
    conn = libvirt.open("test:///default")
    try:
        dom = conn.defineXML(domain_xml(replace(spec, metadata=replace(spec.metadata, mounts=mounts))))
        try:
            assert len(ET.fromstring(dom.XMLDesc(0)).findall("devices/filesystem")) == 2
        finally:
            dom.undefine()
    finally:
        conn.close()


def test_seed_mounts_them_from_fstab() -> None:
    mounts = (Mount("/srv/a", "/mnt/a", True), Mount("/srv/b", "/mnt/b", False, Driver.NINEP))
    spec = seeds.SeedSpec(
        hostname="vm1", instance_id="i-1", user="debian", ssh_keys=(), extra_config=cloud_config(mounts)
    )
    config = yaml.safe_load(seeds.render_user_data(spec))
    fstab = config["write_files"][0]
    assert fstab["path"] == "/etc/fstab" and fstab["append"] is True
    assert "qinst0 /mnt/a virtiofs ro,nofail 0 0\n" in fstab["content"]
    assert "qinst1 /mnt/b 9p trans=virtio,version=9p2000.L,msize=262144,rw,nofail 0 0\n" in fstab["content"]
    assert config["runcmd"][-4:] == [["mkdir", "-p", "/mnt/a"], ["mount", "/mnt/a"], ["mkdir", "-p", "/mnt/b"],
                                     ["mount", "/mnt/b"]]  # fmt: skip
    assert cloud_config(()) == {}


# -- the helper itself: what libvirt runs as root for a read-only virtiofs folder ----------------------------------

_VIRTIOFSD = next((p for p in VIRTIOFSD_PATHS if Path(p).exists()), None)
needs_virtiofsd = pytest.mark.skipif(_VIRTIOFSD is None, reason="no virtiofsd on this machine")
PRIVATE = "/run/qinst-virtiofsd"


def _mount_line(mountinfo: str, point: str) -> list[str] | None:
    return next((f for f in (line.split() for line in mountinfo.splitlines()) if f[4] == point), None)


@needs_virtiofsd
@pytest.mark.skipif(os.getuid() != 0, reason="libvirt runs the helper as root; only root can mount")
def test_helper_runs_virtiofsd_on_a_read_only_bind_in_its_own_namespace(tmp_path: Path) -> None:
    """Given libvirt's arguments it becomes (exec, the same pid) the real virtiofsd, whose source is a private
    read-only, nosuid, nodev bind of the folder; nothing is mounted in the host's namespace."""
    share, sock = tmp_path / "share", tmp_path / "fs.sock"
    share.mkdir()
    (share / "hello.txt").write_text("hello\n")
    argv = [str(READONLY_HELPER), f"--socket-path={sock}", "-o", f"source={share},cache=auto", "--thread-pool-size=4"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():  # virtiofsd makes its socket, then waits for QEMU
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode().split("\0")[:-1]
        assert cmdline == [_VIRTIOFSD, *argv[1:3], f"source={PRIVATE},cache=auto", "--thread-pool-size=4"]
        bind = _mount_line(Path(f"/proc/{proc.pid}/mountinfo").read_text(), PRIVATE)
        assert bind is not None and bind[3] == str(share)  # the folder itself, bound at the private folder
        assert {"ro", "nosuid", "nodev"} <= set(bind[5].split(","))
        assert _mount_line(Path("/proc/self/mountinfo").read_text(), PRIVATE) is None
        assert stat.S_IMODE(os.stat(PRIVATE).st_mode) == 0o700 and os.stat(PRIVATE).st_uid == 0
    finally:
        proc.kill()
        _, err = proc.communicate()
    assert f"virtiofsd-readonly: {share} read-only at {PRIVATE}" in err.decode()  # in libvirt's virtiofsd log


@needs_virtiofsd
@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["-o", "source=/srv/a,,b,cache=auto"], "a source folder with a comma in its name is not supported"),
        (["-o", "cache=auto"], "no absolute -o source=DIR among the arguments"),
        (["-o", "source=srv"], "no absolute -o source=DIR among the arguments"),
        (["-o", "source=/nonexistent-qinst"], "/nonexistent-qinst is not a folder"),
        (["-osource=/srv"], "unexpected argument '-osource=/srv' (only libvirt's '-o source=DIR,...' is understood)"),
        (["-o", "source=/srv", "-o", "source=/tmp"], "more than one source= option"),
    ],
)
def test_helper_refuses_what_it_does_not_understand(args: list[str], error: str) -> None:
    proc = subprocess.run(
        [str(READONLY_HELPER), "--fd=3", *args], capture_output=True, text=True, check=False, timeout=30
    )
    assert (proc.returncode, proc.stderr) == (1, f"virtiofsd-readonly: {error}\n")


# -- a real guest: what its root can and cannot do to the host's folders ------------------------------------------

BOOT = 1800.0  # far above a TCG boot; the shared CI machine can be very slow
MARKED_READ_ONLY = "Read-only file system"


@dataclass(frozen=True)
class Shared:
    name: str
    ro: Path  # at /mnt/ro, read-only (the default)
    rw: Path  # at /mnt/rw, :rw
    env: dict[str, str]


def _run(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*qinst_argv(), *args], capture_output=True, text=True, env=qinst_env(**env), timeout=timeout, check=False
    )


def _in_guest(shared: Shared, command: str) -> subprocess.CompletedProcess[str]:
    return _run(["ssh", shared.name, "--", command], shared.env)


def _tree(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every entry below folder: mode, owner and content (a file's), to tell that nothing changed."""
    return {
        str(p.relative_to(folder)): (p.lstat().st_mode, p.lstat().st_uid, p.read_bytes() if p.is_file() else b"")
        for p in sorted(folder.rglob("*"))
    }


@pytest.fixture(scope="module")
def shared(vm_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    """One TCG guest with a read-only and a read-write folder of this host, for every guest test below."""
    d = tmp_path_factory.mktemp("mounts")
    key = d / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    ro, rw = d / "ro", d / "rw"
    (ro / "sub").mkdir(parents=True)
    (ro / "hello.txt").write_text("hello from the host\n")
    (ro / "sub/deep.txt").write_text("deep\n")
    rw.mkdir()
    rw.chmod(0o777)  # the guest's user writes there through virtiofs (its uid is not ours)
    name = unique_name("mnt")
    try:
        up = _run(
            ["up", "qinst-test", "--name", name, "--network", "user:restrict", "--memory", "512", "--accel", "tcg",
             "--ssh-key", str(key.with_suffix(".pub")), "--timeout", str(BOOT), "--json",
             "--mount", f"{ro}:/mnt/ro", "--mount", f"{rw}:/mnt/rw:rw"],
            vm_env, timeout=BOOT + 120,
        )  # fmt: skip
        assert up.returncode == 0, up.stderr
        assert json.loads(up.stdout)["ready"] is True
        yield Shared(name, ro, rw, vm_env)
    finally:
        remove_domain(name, tuple(LOG_DIR.glob(f"{name}-fs*-virtiofsd.log")))


@pytest.mark.vm
@pytest.mark.libvirt
def test_guest_root_cannot_write_a_read_only_folder_even_after_remounting_it(shared: Shared) -> None:
    """The security promise: root in the guest undoes the `ro` mount option, and the host still refuses."""
    before = _tree(shared.ro)
    assert _in_guest(shared, "cat /mnt/ro/hello.txt").stdout == "hello from the host\n"
    remount = _in_guest(shared, "sudo mount -o remount,rw /mnt/ro && findmnt -no OPTIONS /mnt/ro")
    assert remount.returncode == 0 and remount.stdout.startswith("rw,"), remount.stderr  # the guest thinks rw
    for command in (
        "sudo touch /mnt/ro/new.txt",
        "sudo sh -c 'echo changed > /mnt/ro/hello.txt'",
        "sudo sh -c 'echo more >> /mnt/ro/sub/deep.txt'",
        "sudo rm /mnt/ro/hello.txt",
        "sudo mv /mnt/ro/hello.txt /mnt/ro/moved.txt",
        "sudo mkdir /mnt/ro/dir",
        "sudo chmod 4755 /mnt/ro/hello.txt",
        "sudo chown 4242 /mnt/ro/hello.txt",
        "sudo ln -s /etc/shadow /mnt/ro/link",
    ):
        denied = _in_guest(shared, command)
        assert denied.returncode != 0 and MARKED_READ_ONLY in denied.stderr, (command, denied.stderr)
    assert _tree(shared.ro) == before
    assert _in_guest(shared, "cat /mnt/ro/sub/deep.txt").stdout == "deep\n"  # still readable


@pytest.mark.vm
@pytest.mark.libvirt
def test_read_write_folder_writes_and_guest_root_owns_what_it_makes(shared: Shared) -> None:
    """:rw still writes; and the README's ownership model: virtiofs passes the guest's ids through, so a file
    made by root in the guest is root's on the host, set-uid bit included."""
    uid = int(_in_guest(shared, "id -u").stdout)
    assert _in_guest(shared, "echo from-the-guest > /mnt/rw/user.txt").returncode == 0
    assert (shared.rw / "user.txt").read_text() == "from-the-guest\n"
    assert (shared.rw / "user.txt").stat().st_uid == uid
    made = _in_guest(shared, "sudo touch /mnt/rw/root-made && sudo chmod 4644 /mnt/rw/root-made")
    assert made.returncode == 0, made.stderr
    try:
        st = (shared.rw / "root-made").stat()
        assert st.st_uid == 0 and st.st_mode & stat.S_ISUID
    finally:
        (shared.rw / "root-made").unlink()
    assert "qinst1 /mnt/rw virtiofs rw,nofail 0 0" in _in_guest(shared, "cat /etc/fstab").stdout


@pytest.mark.vm
@pytest.mark.libvirt
def test_the_cloud_kernel_has_no_9p(shared: Shared) -> None:
    """Why qinst does not fall back to 9p (QEMU-enforced read-only) for read-only folders: Debian's cloud kernel,
    the genericcloud images' and the test image's, cannot mount it."""
    assert _in_guest(shared, "uname -r").stdout.strip().endswith("-cloud-amd64")
    probe = _in_guest(shared, "sudo modprobe 9p")
    assert probe.returncode != 0 and "Module 9p not found" in probe.stderr
    assert "# CONFIG_NET_9P is not set" in _in_guest(shared, "cat /boot/config-$(uname -r)").stdout


@pytest.mark.libvirt
def test_read_only_folder_on_a_remote_host_is_refused_before_anything_is_made(
    qinst: RunQinst, vm_env: dict[str, str], sshd: Sshd, ssh_key: Path, tmp_path: Path
) -> None:
    name = unique_name("mntrem")
    try:
        up = qinst(
            "up", "qinst-test", "--name", name, "--network", "user:restrict", "--ssh-key", str(ssh_key),
            "--mount", f"{tmp_path}:/mnt/ro", env={**vm_env, "QINST_CONNECT": sshd.uri}, timeout=300,
        )  # fmt: skip
        assert up.returncode == 2, up.stderr
        assert f"--mount {tmp_path} is read-only, which the remote host's virtiofs cannot enforce" in up.stderr
        assert "hint: libvirt 9.0 has no read-only virtiofs" in up.stderr and "add :rw" in up.stderr
        assert name not in domains() and not {v for v in volumes() if v.startswith(name)}
    finally:
        remove_domain(name)


# -- guest paths -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("guest", ["//etc", "/etc/", "/./etc", "///usr", "/var/./", "/lib64"])
def test_guest_paths_are_normalised_before_the_system_folders_are_refused(guest: str) -> None:
    from qemu_instances.errors import UsageError

    with pytest.raises(UsageError, match="refusing to mount over the guest's /"):
        Mount.parse(f"/tmp:{guest}")
