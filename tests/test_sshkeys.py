"""Tests for qemu_instances.sshkeys: public key validation, key files, default discovery, qinst's own pair."""

from __future__ import annotations

import base64
import contextlib
import os
import pty
import select
import shutil
import signal
import stat
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qemu_instances import sshkeys
from qemu_instances.errors import QinstError, UsageError
from qemu_instances.sshkeys import SshKey, generate_keypair

needs_openssh = pytest.mark.skipif(
    shutil.which("ssh-keygen") is None or shutil.which("ssh-agent") is None,
    reason="openssh-client is not installed (CI installs it)",
)

PRIVATE_KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n"


def blob(key_type: str, payload: bytes = bytes(range(32))) -> str:
    raw = b"".join(struct.pack(">I", len(f)) + f for f in (key_type.encode(), payload))
    return base64.b64encode(raw).decode()


def make_key(key_type: str = "ssh-ed25519", comment: str = "alice@laptop") -> str:
    return f"{key_type} {blob(key_type)} {comment}".rstrip()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty home directory with no ssh-agent."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    assert Path.home() == home
    return home


def keygen(path: Path, key_type: str = "ed25519", *extra: str) -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", key_type, *extra, "-N", "", "-C", "test", "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
    )
    return path.with_name(path.name + ".pub").read_text().strip()


# --- parse_public_key ------------------------------------------------------------------------------------


@pytest.mark.parametrize("key_type", sorted(sshkeys.KEY_TYPES))
def test_every_supported_type_is_accepted(key_type: str) -> None:
    line = make_key(key_type)
    assert sshkeys.parse_public_key(line, "k.pub") == line


def test_the_line_is_normalised_and_the_comment_kept() -> None:
    text = f'\n  ssh-ed25519   {blob("ssh-ed25519")}   o\'neil: "laptop" #1  \n\n'
    assert sshkeys.parse_public_key(text, "k.pub") == f'ssh-ed25519 {blob("ssh-ed25519")} o\'neil: "laptop" #1'


def test_a_key_without_comment_is_accepted() -> None:
    line = f"ssh-ed25519 {blob('ssh-ed25519')}"
    assert sshkeys.parse_public_key(line, "k.pub") == line


@needs_openssh
@pytest.mark.parametrize(("key_type", "extra"), [("ed25519", ()), ("ecdsa", ("-b", "384")), ("rsa", ("-b", "2048"))])
def test_keys_made_by_ssh_keygen_are_accepted(tmp_path: Path, key_type: str, extra: tuple[str, ...]) -> None:
    public = keygen(tmp_path / "key", key_type, *extra)
    assert sshkeys.parse_public_key(public, "key.pub") == public


def test_private_key_material_is_refused_naming_the_file_and_the_pub() -> None:
    with pytest.raises(UsageError) as caught:
        sshkeys.parse_public_key(PRIVATE_KEY, "/home/a/.ssh/id_ed25519")
    assert caught.value.exit_code == 2
    assert "/home/a/.ssh/id_ed25519 is a private key" in str(caught.value)
    assert caught.value.hint is not None and "/home/a/.ssh/id_ed25519.pub" in caught.value.hint
    assert "b3BlbnNzaC1rZXktdjEA" not in str(caught.value) + caught.value.hint, "never echo key material"


@pytest.mark.parametrize(
    "private",
    [
        "-----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY-----",
        "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----",
        "PuTTY-User-Key-File-3: ssh-ed25519\nEncryption: none\n",
    ],
)
def test_other_private_key_formats_are_refused(private: str) -> None:
    with pytest.raises(UsageError, match="private key"):
        sshkeys.parse_public_key(private, "key")


def test_an_empty_key_file_is_named_and_said_to_be_empty() -> None:
    with pytest.raises(UsageError, match=r"^keys\.pub is empty; expected exactly one OpenSSH public key$"):
        sshkeys.parse_public_key(" \n\n", "keys.pub")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ssh-ed25519 not*base64! c", "not valid base64"),
        ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB== c", "truncated"),
        (f"ssh-ed25519 {blob('ssh-ed25519')[:-8]}", "truncated"),
        (f"ssh-ed25519 {base64.b64encode(b'ssh-ed25519' * 3).decode()}", "truncated or malformed"),
        (f"ssh-rsa {blob('ssh-ed25519')} c", "does not match its type"),
        ("ssh-ed25519 AAAA c", "truncated"),
        (f"ssh-dss {blob('ssh-dss')} c", "unsupported"),
        (f"ssh-ed25519-cert-v01@openssh.com {blob('ssh-ed25519-cert-v01@openssh.com')}", "unsupported"),
        ("", "is empty"),
        (f"{make_key()}\n{make_key(comment='two')}", "2 lines"),
        (f"{make_key()}\rssh-rsa x", "2 lines"),
        (f"{make_key()}\x00", "control characters"),
        (f"{make_key()} \x1b[31m", "control characters"),
        ("---- BEGIN SSH2 PUBLIC KEY ----\nAAAA\n---- END SSH2 PUBLIC KEY ----", "RFC 4716"),
        (f'command="rm -rf /" {make_key()}', "unsupported"),
    ],
)
def test_malformed_keys_are_refused(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        sshkeys.parse_public_key(text, "k.pub")


# --- load_key_file ---------------------------------------------------------------------------------------


def test_a_private_key_path_uses_its_pub_without_reading_the_private_key(tmp_path: Path) -> None:
    private = tmp_path / "id_work"
    private.write_text("not a key at all: reading it would fail validation")
    private.chmod(0o600)  # ssh uses a private key only when its owner alone reads it
    (tmp_path / "id_work.pub").write_text(make_key() + "\n")
    assert sshkeys.load_key_file(private) == SshKey(make_key(), private)


def test_a_pub_path_remembers_its_private_key_when_present(tmp_path: Path) -> None:
    (tmp_path / "k.pub").write_text(make_key())
    assert sshkeys.load_key_file(tmp_path / "k.pub") == SshKey(make_key(), None)
    (tmp_path / "k").write_text(PRIVATE_KEY)
    (tmp_path / "k").chmod(0o600)  # ssh uses a private key only when its owner alone reads it
    assert sshkeys.load_key_file(tmp_path / "k.pub") == SshKey(make_key(), tmp_path / "k")


def test_a_public_key_without_pub_suffix_is_accepted(tmp_path: Path) -> None:
    (tmp_path / "deploy-key").write_text(make_key())
    assert sshkeys.load_key_file(tmp_path / "deploy-key") == SshKey(make_key(), None)


def test_a_lone_private_key_is_refused_suggesting_the_pub(tmp_path: Path) -> None:
    path = tmp_path / "id_ed25519"
    path.write_text(PRIVATE_KEY)
    path.chmod(0o600)  # ssh uses a private key only when its owner alone reads it
    with pytest.raises(UsageError) as caught:
        sshkeys.load_key_file(path)
    assert str(path) in str(caught.value)
    assert caught.value.hint is not None and f"{path}.pub" in caught.value.hint


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "does not exist"), (b"\xff\xfe\x00binary", "not a text file"), (b"x" * 70_000, "larger than")],
)
def test_unusable_key_files_are_refused(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "key.pub"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UsageError, match=message):
        sshkeys.load_key_file(path)


# --- default_keys and resolve_keys ---------------------------------------------------------------------


def test_default_keys_are_the_users_own_in_openssh_order(home: Path, tmp_path: Path) -> None:
    ssh = home / ".ssh"
    ssh.mkdir()
    rsa, ed25519 = make_key("ssh-rsa", "rsa"), make_key("ssh-ed25519", "ed")
    (ssh / "id_rsa.pub").write_text(rsa)
    (ssh / "id_ed25519.pub").write_text(ed25519)
    (ssh / "id_ed25519").write_text(PRIVATE_KEY)
    (ssh / "id_ed25519").chmod(0o600)  # ssh uses a private key only when its owner alone reads it
    config_dir = tmp_path / "config"
    keys = sshkeys.default_keys(config_dir)
    assert keys == [SshKey(ed25519, ssh / "id_ed25519"), SshKey(rsa, None)]
    assert not config_dir.exists(), "no key pair of qinst's own when the user has keys"


@needs_openssh
def test_without_any_key_qinst_makes_its_own_pair_and_reuses_it(home: Path, tmp_path: Path) -> None:
    config_dir = tmp_path / "config" / "qinst"
    [key] = sshkeys.default_keys(config_dir)
    private = config_dir / "id_ed25519"
    assert key.private_path == private
    assert key.public.startswith("ssh-ed25519 ") and key.public.endswith(" qinst")
    assert key.public == (config_dir / "id_ed25519.pub").read_text().strip()
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(config_dir.stat().st_mode) == 0o700
    before = private.stat()

    assert sshkeys.default_keys(config_dir) == [key]
    after = private.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), "reused, not regenerated"


@needs_openssh
def test_concurrent_first_launches_share_one_own_pair(home: Path, tmp_path: Path) -> None:
    config_dir = tmp_path / "config"
    results: list[SshKey] = []
    threads = [threading.Thread(target=lambda: results.append(sshkeys.own_keypair(config_dir))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4
    assert len({key.public for key in results}) == 1


@pytest.fixture
def agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A real ssh-agent on a socket in tmp_path, stopped after the test."""
    sock = tmp_path / "agent.sock"
    process = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert process.poll() is None and time.monotonic() < deadline, "ssh-agent did not make its socket"
            time.sleep(0.02)
        monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
        yield sock
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=10)


@needs_openssh
def test_default_keys_come_from_the_agent_when_home_has_none(home: Path, tmp_path: Path, agent: Path) -> None:
    public = keygen(tmp_path / "agent_key")
    subprocess.run(["ssh-add", "-q", str(tmp_path / "agent_key")], check=True, env=os.environ.copy())
    config_dir = tmp_path / "config"
    keys = sshkeys.default_keys(config_dir)
    assert [key.public for key in keys] == [public]
    assert keys[0].private_path is None
    assert not config_dir.exists()


@needs_openssh
def test_an_empty_agent_falls_back_to_qinsts_own_pair(home: Path, tmp_path: Path, agent: Path) -> None:
    [key] = sshkeys.default_keys(tmp_path / "config")
    assert key.private_path == tmp_path / "config" / "id_ed25519"


@needs_openssh
def test_an_unreachable_agent_falls_back_to_qinsts_own_pair(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSH_AUTH_SOCK", str(tmp_path / "no-such.sock"))
    [key] = sshkeys.default_keys(tmp_path / "config")
    assert key.private_path == tmp_path / "config" / "id_ed25519"


def test_resolve_keys_uses_the_given_files_and_drops_duplicates(home: Path, tmp_path: Path) -> None:
    (tmp_path / "a").write_text(PRIVATE_KEY)
    (tmp_path / "a").chmod(0o600)  # ssh uses a private key only when its owner alone reads it
    (tmp_path / "a.pub").write_text(make_key(comment="a"))
    (tmp_path / "b.pub").write_text(make_key("ssh-rsa", "b"))
    keys = sshkeys.resolve_keys([tmp_path / "a", tmp_path / "a.pub", tmp_path / "b.pub"], tmp_path / "config")
    assert keys == [SshKey(make_key(comment="a"), tmp_path / "a"), SshKey(make_key("ssh-rsa", "b"), None)]


def test_resolve_keys_without_files_uses_the_defaults(home: Path, tmp_path: Path) -> None:
    (home / ".ssh").mkdir()
    (home / ".ssh" / "id_ecdsa.pub").write_text(make_key("ecdsa-sha2-nistp256"))
    assert sshkeys.resolve_keys([], tmp_path / "config") == [SshKey(make_key("ecdsa-sha2-nistp256"), None)]


# --- generate_keypair ----------------------------------------------------------------------------------


@needs_openssh
def test_generate_keypair_makes_a_fresh_ed25519_pair(tmp_path: Path) -> None:
    path = tmp_path / "smoke" / "key"
    key = sshkeys.generate_keypair(path)
    assert key.private_path == path
    assert key.public == sshkeys.parse_public_key((tmp_path / "smoke" / "key.pub").read_text(), "key.pub")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "PRIVATE KEY" in path.read_text()
    assert sshkeys.generate_keypair(tmp_path / "other").public != key.public


def test_generate_keypair_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_text(PRIVATE_KEY)
    path.chmod(0o600)  # ssh uses a private key only when its owner alone reads it
    with pytest.raises(QinstError, match=f"{path} already exists; refusing to overwrite a key"):
        sshkeys.generate_keypair(path)
    assert path.read_text() == PRIVATE_KEY


# -- key files, generated keys and key bodies at their edges -----------------------------------------------------------


@pytest.mark.promise
def test_a_key_file_of_exactly_the_size_limit_is_read(tmp_path: Path) -> None:
    key = make_key()
    path = tmp_path / "padded.pub"
    path.write_text(key + "\n" * (64 * 1024 - len(key)))
    assert path.stat().st_size == 64 * 1024
    assert sshkeys.load_key_file(path).public == key
    path.write_text(key + "\n" * (64 * 1024 - len(key) + 1))
    with pytest.raises(UsageError, match="is larger than 65536 bytes"):
        sshkeys.load_key_file(path)


@pytest.mark.promise
def test_an_unreadable_key_path_names_the_path_and_the_reason(tmp_path: Path) -> None:
    directory = tmp_path / "keys.pub"
    directory.mkdir()
    with pytest.raises(UsageError, match=f"SSH key file: {directory} is not a regular file \\(a folder\\)"):
        sshkeys.load_key_file(directory)


@pytest.mark.promise
def test_generate_refuses_when_only_the_public_half_exists(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.with_name("key.pub").write_text(make_key())
    with pytest.raises(QinstError, match="already exists; refusing to overwrite a key") as err:
        sshkeys.generate_keypair(path)
    assert err.value.hint == "remove it or choose another path"
    assert not path.exists()


@pytest.mark.promise
def test_generated_private_key_is_ed25519_without_a_passphrase(tmp_path: Path) -> None:
    key = sshkeys.generate_keypair(tmp_path / "own" / "id")
    assert key.public.startswith("ssh-ed25519 ") and key.public.endswith(" qinst")
    assert key.private_path is not None and (key.private_path.stat().st_mode & 0o777) == 0o600
    derived = subprocess.run(
        ["ssh-keygen", "-y", "-P", "", "-f", str(key.private_path)], capture_output=True, text=True, check=True
    ).stdout.split()[:2]
    assert derived == key.public.split()[:2]
    assert ((tmp_path / "own").stat().st_mode & 0o777) == 0o700


@pytest.mark.promise
def test_generating_a_key_never_asks_for_a_passphrase(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a desktop ssh-keygen asks through SSH_ASKPASS when no passphrase is given: qinst gives the empty one, so
    nothing pops up and the key is not encrypted with whatever a prompt got."""
    asked = tmp_path / "asked"
    askpass = tmp_path / "askpass"
    askpass.write_text(f"#!/bin/sh\necho asked >> {asked}\necho typed-passphrase\n")
    askpass.chmod(0o755)
    monkeypatch.setenv("SSH_ASKPASS", str(askpass))
    monkeypatch.setenv("SSH_ASKPASS_REQUIRE", "force")
    monkeypatch.setenv("DISPLAY", ":0")
    key = sshkeys.generate_keypair(tmp_path / "id")
    assert not asked.exists(), "ssh-keygen asked for a passphrase"
    assert key.private_path is not None
    subprocess.run(["ssh-keygen", "-y", "-P", "", "-f", str(key.private_path)], capture_output=True, check=True)


@pytest.mark.promise
def test_without_ssh_keygen_the_error_says_which_package_has_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(QinstError, match="ssh-keygen not found") as err:
        sshkeys.generate_keypair(tmp_path / "id")
    assert err.value.hint == "ssh-keygen is in the openssh-client package"


@pytest.mark.promise
def test_a_named_pipe_is_refused_without_being_read(tmp_path: Path) -> None:
    """A wrong path (a pipe, a device) is refused by what it is, without opening it for a read that would block."""
    fifo = tmp_path / "key.pub"
    os.mkfifo(fifo)
    started = time.monotonic()
    with pytest.raises(UsageError, match=r"is not a regular file \(a FIFO\)"):
        sshkeys.load_key_file(fifo)
    assert time.monotonic() - started < 5


@pytest.mark.promise
def test_a_private_key_others_can_read_is_refused_with_the_fix(tmp_path: Path) -> None:
    """ssh silently ignores such a key and the login fails with "Permission denied": qinst says why at once."""
    (tmp_path / "id.pub").write_text(make_key())
    private = tmp_path / "id"
    private.write_text("private")
    private.chmod(0o644)
    with pytest.raises(UsageError, match=r"readable by others \(mode 0644\)") as err:
        sshkeys.load_key_file(private)
    assert err.value.hint == f"chmod 600 {private}"
    private.chmod(0o600)
    assert sshkeys.load_key_file(private).private_path == private


@pytest.mark.promise
def test_resolve_keys_falls_back_to_qinsts_own_pair_in_the_config_dir(home: Path, tmp_path: Path) -> None:
    config = tmp_path / "config"
    keys = sshkeys.resolve_keys([], config)
    assert [k.private_path for k in keys] == [config / "id_ed25519"]


def _body(*fields: bytes) -> str:
    return base64.b64encode(b"".join(struct.pack(">I", len(f)) + f for f in fields)).decode()


@pytest.mark.promise
def test_a_key_body_ending_in_an_empty_field_is_accepted() -> None:
    line = f"ssh-ed25519 {_body(b'ssh-ed25519', bytes(32), b'')}"
    assert sshkeys.parse_public_key(line, "k.pub") == line


@pytest.mark.promise
def test_a_field_length_beyond_the_blob_is_malformed_not_negative() -> None:
    body = base64.b64encode(b"\xff\xff\xff\xff" + b"ssh-ed25519" + bytes(8)).decode()
    with pytest.raises(UsageError, match=r"^k\.pub: the ssh-ed25519 key's body is truncated or malformed$"):
        sshkeys.parse_public_key(f"ssh-ed25519 {body}", "k.pub")


@pytest.mark.promise
def test_a_key_body_with_characters_outside_base64_is_refused_as_such() -> None:
    body = _body(b"ssh-ed25519", bytes(32))
    with pytest.raises(UsageError, match=r"^k\.pub: the ssh-ed25519 key's body is not valid base64$"):
        sshkeys.parse_public_key(f"ssh-ed25519 {body[:8]}*{body[8:]}", "k.pub")


@pytest.mark.promise
def test_generating_the_key_pair_from_a_terminal_asks_no_passphrase(tmp_path: Path) -> None:
    """Run in a terminal (a pty as controlling terminal), ssh-keygen would prompt for a passphrase unless told -N ''."""
    key = tmp_path / "keys" / "id_ed25519"
    pid, fd = pty.fork()
    if pid == 0:  # the child: its controlling terminal is the pty
        try:
            generate_keypair(key)
        finally:
            os._exit(0)
    output = b""
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline and b"passphrase" not in output.lower():
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(fd, 1024)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                output += chunk
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(fd)
    assert b"passphrase" not in output.lower(), output
    assert key.exists() and key.with_name("id_ed25519.pub").read_text().startswith("ssh-ed25519 ")
