"""`qinst cp`, `qinst forward`, `qinst snapshot` and host folder mounts on real guests, through the real entry point:
two TCG boots shared by the module (booted side by side), so the VM tests of these commands stay in this one file.

Guest "a" has an `up --forward` and no mounts (a running guest with mounts cannot be snapshotted with memory), so
it serves cp, the forwards, the memory snapshot and the remote (qemu+ssh://) checks; guest "b" has two folders
mounted, read-only and read-write. All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import RunQinst
from guest import domains, force_remove, unique_name, virsh, volumes

from testsupport.qinst import qinst_argv, qinst_env

pytestmark = [pytest.mark.vm, pytest.mark.libvirt]


BOOT = 1800.0  # far above a TCG boot; the shared CI machine can be very slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Guests:
    a: str
    b: str
    a_forward: int  # host port of a's `up --forward` to guest port 8000
    ro: Path  # shared read-only with b at /mnt/ro
    rw: Path  # shared read-write with b at /mnt/rw
    env: dict[str, str]


def _run(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*qinst_argv(), *args], capture_output=True, text=True, env=qinst_env(**env), timeout=timeout, check=False
    )


def _ssh(guests: Guests, name: str, command: str, env: dict[str, str] | None = None) -> str:
    proc = _run(["ssh", name, "--", command], env or guests.env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _remove(name: str) -> None:
    virsh("snapshot-delete", name, "--current", "--metadata")
    for line in virsh("snapshot-list", name, "--name").stdout.split():
        virsh("snapshot-delete", name, line, "--metadata")
    force_remove(name)


@pytest.fixture(scope="module")
def guests(vm_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guests]:
    d = tmp_path_factory.mktemp("ops")
    key = d / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    ro, rw = d / "ro", d / "rw"
    ro.mkdir()
    rw.mkdir()
    rw.chmod(0o777)  # the guest's user writes there through virtiofs (its uid is not ours)
    (ro / "hello.txt").write_text("hello from the host\n")
    a, b, port = unique_name("opsa"), unique_name("opsb"), _free_port()
    common = ["up", "qinst-test", "--network", "user:restrict", "--ssh-key", str(key.with_suffix(".pub")),
              "--memory", "512", "--accel", "tcg", "--timeout", str(BOOT), "--json"]  # fmt: skip
    argvs = {
        a: [*common, "--name", a, "--forward", f"{port}:8000"],
        b: [*common, "--name", b, "--mount", f"{ro}:/mnt/ro", "--mount", f"{rw}:/mnt/rw:rw"],
    }
    procs = {
        n: subprocess.Popen(
            [*qinst_argv(), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=qinst_env(**vm_env)
        )
        for n, argv in argvs.items()
    }
    try:
        for n, proc in procs.items():
            out, err = proc.communicate(timeout=BOOT + 120)
            assert proc.returncode == 0, f"{n}: {err}"
            assert json.loads(out)["ready"] is True
        yield Guests(a, b, port, ro, rw, vm_env)
    finally:
        for n, proc in procs.items():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
            _remove(n)


def test_cp_file_and_folder_in_and_out(guests: Guests, tmp_path: Path) -> None:
    (tmp_path / "one.txt").write_text("one\n")
    (tmp_path / "tree/sub").mkdir(parents=True)
    (tmp_path / "tree/sub/deep.txt").write_text("deep\n")
    env = guests.env
    assert _run(["cp", str(tmp_path / "one.txt"), f"{guests.a}:/tmp/"], env).returncode == 0
    up = _run(["cp", "-r", str(tmp_path / "tree"), f"{guests.a}:/tmp/"], env)
    assert up.returncode == 0, up.stderr
    assert _ssh(guests, guests.a, "cat /tmp/one.txt /tmp/tree/sub/deep.txt") == "one\ndeep\n"

    back = tmp_path / "back"
    back.mkdir()
    down = _run(["cp", f"{guests.a}:/tmp/one.txt", f"{guests.a}:/etc/hostname", str(back)], env)
    assert down.returncode == 0, down.stderr
    assert (back / "one.txt").read_text() == "one\n" and (back / "hostname").read_text().strip() == guests.a
    assert _run(["cp", "-r", f"{guests.a}:/tmp/tree", str(back)], env).returncode == 0
    assert (back / "tree/sub/deep.txt").read_text() == "deep\n"

    missing = _run(["cp", f"{guests.a}:/nonexistent", str(back)], env)
    assert missing.returncode == 1 and "cp failed: /nonexistent: No such file or directory" in missing.stderr
    folder = _run(["cp", str(tmp_path / "tree"), f"{guests.a}:/tmp/"], env)
    assert folder.returncode == 1 and "hint: copy a folder with -r" in folder.stderr
    two = _run(["cp", f"{guests.a}:/tmp/one.txt", f"{guests.b}:/tmp/"], env)
    assert two.returncode == 2 and "not between" in two.stderr
    unknown = _run(["cp", str(tmp_path / "one.txt"), "qinst-nosuch-vm:/tmp/"], env)
    assert unknown.returncode == 2 and "no qinst instance named 'qinst-nosuch-vm'" in unknown.stderr


def _get(port: int, path: str = "/hello.txt") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=60) as response:
        return str(response.read().decode())


def _serve_in_guest(guests: Guests) -> None:
    """A web server in guest a on port 8000 (python3 is there: cloud-init needs it), serving /tmp/www."""
    _ssh(guests, guests.a, "mkdir -p /tmp/www && echo from-the-guest > /tmp/www/hello.txt")
    # setsid -f forks the server off and returns at once; a shell's `... &` would keep the SSH channel open (the
    # background subshell holds its stdout) and ssh would never return.
    _ssh(guests, guests.a, "setsid -f python3 -m http.server 8000 --directory /tmp/www >/dev/null 2>&1 </dev/null")
    probe = "python3 -c \"import urllib.request as u; print(u.urlopen('http://127.0.0.1:8000/').status)\" || true"
    deadline = time.monotonic() + 120
    while "200" not in _ssh(guests, guests.a, probe):
        assert time.monotonic() < deadline
        time.sleep(2)


def test_up_forward_reaches_a_server_in_the_guest(guests: Guests) -> None:
    _serve_in_guest(guests)
    assert _get(guests.a_forward) == "from-the-guest\n"
    listed = {i["name"]: i for i in json.loads(_run(["ls", "--json"], guests.env).stdout)}
    assert listed[guests.a]["forwards"] == [{"address": "127.0.0.1", "host_port": guests.a_forward, "guest_port": 8000}]
    assert listed[guests.b]["forwards"] == []
    table = _run(["ls"], guests.env).stdout
    assert f"127.0.0.1:{guests.a_forward}->8000" in table


def test_forward_tunnel_until_interrupted(guests: Guests) -> None:
    port = _free_port()
    busy = _run(["forward", guests.a, f"{guests.a_forward}:8000"], guests.env)
    assert busy.returncode == 2 and f"port 127.0.0.1:{guests.a_forward} is already in use" in busy.stderr
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        proc = subprocess.Popen(
            [*qinst_argv(), "forward", guests.a, f"{port}:8000"],
            stderr=subprocess.PIPE,
            text=True,
            env=qinst_env(**guests.env),
        )
        try:
            assert proc.stderr is not None
            lines: list[str] = []
            while "press Ctrl-C to stop" not in "".join(lines):
                line = proc.stderr.readline()
                assert line, f"forward ended: {''.join(lines)}"
                lines.append(line)
            assert f"forwarding 127.0.0.1:{port} -> {guests.a}:8000" in "".join(lines)
            assert _get(port) == "from-the-guest\n"
            proc.send_signal(sig)
            assert proc.wait(timeout=30) == code
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        with socket.socket() as s:
            # ssh is gone: nothing listens there any more. SO_REUSEADDR lets the bind ignore the TIME_WAIT of the
            # connection _get made (left when ssh closed first), never a socket still listening.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            s.listen()


def test_forward_on_another_network_is_refused_before_anything_is_made(guests: Guests) -> None:
    name = unique_name("opsnet")
    up = _run(["up", "qinst-test", "--name", name, "--network", "none", "--forward", "8080:80"], guests.env)
    assert up.returncode == 2 and "qinst forward" in up.stderr
    assert name not in domains() and not {v for v in volumes() if v.startswith(name)}


def test_mounts_read_only_and_read_write(guests: Guests) -> None:
    b = guests.b
    assert _ssh(guests, b, "cat /mnt/ro/hello.txt") == "hello from the host\n"
    denied = _run(["ssh", b, "--", "sudo touch /mnt/ro/nope"], guests.env, timeout=300)
    assert denied.returncode != 0 and "Read-only file system" in denied.stderr
    assert not (guests.ro / "nope").exists()
    _ssh(guests, b, "echo from-the-guest > /mnt/rw/written.txt")
    assert (guests.rw / "written.txt").read_text() == "from-the-guest\n"
    assert "qinst1 /mnt/rw virtiofs rw,nofail 0 0" in _ssh(guests, b, "cat /etc/fstab")  # mounted again at boot
    listed = {i["name"]: i for i in json.loads(_run(["ls", "--json"], guests.env).stdout)}
    assert [(m["guest"], m["readonly"]) for m in listed[b]["mounts"]] == [("/mnt/ro", True), ("/mnt/rw", False)]

    refused = _run(["snapshot", "create", b, "s1"], guests.env)
    assert refused.returncode == 2 and "cannot save the memory" in refused.stderr


def test_snapshot_restore_undoes_a_later_change(guests: Guests) -> None:
    a, env = guests.a, guests.env
    made = _run(["snapshot", "create", a, "before"], env, timeout=600)
    assert made.returncode == 0 and "memory and disk" in made.stderr, made.stderr
    assert _run(["snapshot", "create", a, "before"], env).returncode == 2  # the name is taken
    _ssh(guests, a, "echo changed > /var/tmp/after-snapshot && sync")
    listed = json.loads(_run(["snapshot", "list", a, "--json"], env).stdout)
    assert [(s["name"], s["memory"], s["state"]) for s in listed] == [("before", True, "running")]
    assert {i["name"]: i for i in json.loads(_run(["ls", "--json"], env).stdout)}[a]["snapshots"] == 1

    restored = _run(["snapshot", "restore", a, "before"], env, timeout=900)
    assert restored.returncode == 0 and "(running)" in restored.stderr, restored.stderr
    # qinst ssh checks the host key strictly: the restored guest still has the one recorded at up.
    assert _ssh(guests, a, "test -e /var/tmp/after-snapshot && echo present || echo gone").strip() == "gone"

    missing = _run(["snapshot", "restore", a, "nosuch"], env)
    assert missing.returncode == 4 and "no snapshot named 'nosuch'" in missing.stderr
    assert _run(["snapshot", "delete", a, "before"], env).returncode == 0
    assert json.loads(_run(["snapshot", "list", a, "--json"], env).stdout) == []
    again = _run(["snapshot", "create", a, "kept"], env, timeout=600)  # left for rm
    assert again.returncode == 0, again.stderr


def test_remote_cp_and_forward(guests: Guests, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """The same daemon reached as qemu+ssh:// through an sshd on 127.0.0.1: scp and ssh jump through it."""
    _serve_in_guest(guests)
    uri = request.getfixturevalue("sshd").uri
    env = {**guests.env, "QINST_CONNECT": uri}
    (tmp_path / "remote.txt").write_text("through the host\n")
    up = _run(["cp", str(tmp_path / "remote.txt"), f"{guests.a}:/tmp/"], env, timeout=300)
    assert up.returncode == 0, up.stderr
    assert _run(["cp", f"{guests.a}:/tmp/remote.txt", str(tmp_path / "back.txt")], env, timeout=300).returncode == 0
    assert (tmp_path / "back.txt").read_text() == "through the host\n"

    port = _free_port()
    proc = subprocess.Popen(
        [*qinst_argv(), "forward", guests.a, f"{port}:8000"], stderr=subprocess.PIPE, text=True, env=qinst_env(**env)
    )
    try:
        assert proc.stderr is not None
        while "press Ctrl-C" not in (line := proc.stderr.readline()):
            assert line, "the remote forward ended"
        assert _get(port) == "from-the-guest\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 143
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_rm_removes_snapshots_volumes_and_domains(guests: Guests, qinst: RunQinst) -> None:
    for name, snapshots in ((guests.a, 1), (guests.b, 0)):
        rm = qinst("rm", "--force", name, env=guests.env, timeout=300)
        assert rm.returncode == 0, rm.stderr
        assert ("1 snapshot(s)" in rm.stderr) == bool(snapshots)
        assert name not in domains()
        assert not {v for v in volumes() if v.startswith(name)}
        assert virsh("snapshot-list", name).returncode != 0  # no domain, so no snapshot either
        assert not list(Path("/var/log/libvirt/qemu").glob(f"{name}*"))  # console, libvirt's and virtiofsd's logs
