"""SSH key files and the image cache's temporaries: cases the mutation run (scripts/mutation.sh) showed untested."""

from __future__ import annotations

import base64
import fcntl
import os
import struct
import subprocess
import time
from pathlib import Path

import pytest
from test_sshkeys import home, make_key  # noqa: F401  (home is a fixture)

from qemu_instances import sshkeys
from qemu_instances.digests import Digest
from qemu_instances.errors import QinstError, UsageError
from qemu_instances.images import ImageStore
from qemu_instances.settings import Settings

# -- key files -------------------------------------------------------------------------------------------------------


def test_a_key_file_of_exactly_the_size_limit_is_read(tmp_path: Path) -> None:
    key = make_key()
    path = tmp_path / "padded.pub"
    path.write_text(key + "\n" * (64 * 1024 - len(key)))
    assert path.stat().st_size == 64 * 1024
    assert sshkeys.load_key_file(path).public == key
    path.write_text(key + "\n" * (64 * 1024 - len(key) + 1))
    with pytest.raises(UsageError, match="is larger than 65536 bytes"):
        sshkeys.load_key_file(path)


def test_an_unreadable_key_path_names_the_path_and_the_reason(tmp_path: Path) -> None:
    directory = tmp_path / "keys.pub"
    directory.mkdir()
    with pytest.raises(UsageError, match=f"SSH key file: {directory} is not a regular file \\(a folder\\)"):
        sshkeys.load_key_file(directory)


def test_generate_refuses_when_only_the_public_half_exists(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.with_name("key.pub").write_text(make_key())
    with pytest.raises(QinstError, match="already exists; refusing to overwrite a key") as err:
        sshkeys.generate_keypair(path)
    assert err.value.hint == "remove it or choose another path"
    assert not path.exists()


def test_generated_private_key_is_ed25519_without_a_passphrase(tmp_path: Path) -> None:
    key = sshkeys.generate_keypair(tmp_path / "own" / "id")
    assert key.public.startswith("ssh-ed25519 ") and key.public.endswith(" qinst")
    assert key.private_path is not None and (key.private_path.stat().st_mode & 0o777) == 0o600
    derived = subprocess.run(
        ["ssh-keygen", "-y", "-P", "", "-f", str(key.private_path)], capture_output=True, text=True, check=True
    ).stdout.split()[:2]
    assert derived == key.public.split()[:2]
    assert ((tmp_path / "own").stat().st_mode & 0o777) == 0o700


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


def test_without_ssh_keygen_the_error_says_which_package_has_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(QinstError, match="ssh-keygen not found") as err:
        sshkeys.generate_keypair(tmp_path / "id")
    assert err.value.hint == "ssh-keygen is in the openssh-client package"


def test_a_named_pipe_is_refused_without_being_read(tmp_path: Path) -> None:
    """A wrong path (a pipe, a device) is refused by what it is, without opening it for a read that would block."""
    fifo = tmp_path / "key.pub"
    os.mkfifo(fifo)
    started = time.monotonic()
    with pytest.raises(UsageError, match=r"is not a regular file \(a FIFO\)"):
        sshkeys.load_key_file(fifo)
    assert time.monotonic() - started < 5


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


def test_resolve_keys_falls_back_to_qinsts_own_pair_in_the_config_dir(home: Path, tmp_path: Path) -> None:  # noqa: F811
    config = tmp_path / "config"
    keys = sshkeys.resolve_keys([], config)
    assert [k.private_path for k in keys] == [config / "id_ed25519"]


# -- the cache's temporaries ------------------------------------------------------------------------------------------

DIGEST = Digest.parse(f"sha256:{'5' * 64}")


def test_a_record_being_written_under_the_image_lock_is_spared(tmp_path: Path) -> None:
    store = ImageStore(Settings(cache_dir=tmp_path))
    store.cache.dir.mkdir(parents=True)
    record_tmp = store.cache.dir / f".{DIGEST.filename}.json.tmp"  # as Cache.record writes it
    record_tmp.write_text("{}")
    with store.cache.lock(DIGEST):
        assert store.prune(set()) == []
    assert store.prune(set()) == [(record_tmp, 2)]


def test_hidden_json_files_and_directories_are_temporaries(tmp_path: Path) -> None:
    store = ImageStore(Settings(cache_dir=tmp_path))
    store.cache.dir.mkdir(parents=True)
    hidden = store.cache.dir / f".{DIGEST.filename}.json"
    hidden.write_text("{}")
    left = store.cache.dir / ".import-abc.tmp"
    left.mkdir()
    (left / "part").write_bytes(b"x")
    removed = {p for p, _ in store.prune(set())}
    assert removed == {hidden, left}
    assert not hidden.exists() and not left.exists()


def test_an_import_holding_its_own_temporary_is_spared(tmp_path: Path) -> None:
    store = ImageStore(Settings(cache_dir=tmp_path))
    store.cache.dir.mkdir(parents=True)
    tmp = store.cache.dir / ".import-xyz.tmp"
    with tmp.open("wb") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        assert store.prune(set()) == []
    assert [p for p, _ in store.prune(set())] == [tmp]


# -- the key body --------------------------------------------------------------------------------------------------


def _body(*fields: bytes) -> str:
    return base64.b64encode(b"".join(struct.pack(">I", len(f)) + f for f in fields)).decode()


def test_a_key_body_ending_in_an_empty_field_is_accepted() -> None:
    line = f"ssh-ed25519 {_body(b'ssh-ed25519', bytes(32), b'')}"
    assert sshkeys.parse_public_key(line, "k.pub") == line


def test_a_field_length_beyond_the_blob_is_malformed_not_negative() -> None:
    body = base64.b64encode(b"\xff\xff\xff\xff" + b"ssh-ed25519" + bytes(8)).decode()
    with pytest.raises(UsageError, match=r"^k\.pub: the ssh-ed25519 key's body is truncated or malformed$"):
        sshkeys.parse_public_key(f"ssh-ed25519 {body}", "k.pub")


def test_a_key_body_with_characters_outside_base64_is_refused_as_such() -> None:
    body = _body(b"ssh-ed25519", bytes(32))
    with pytest.raises(UsageError, match=r"^k\.pub: the ssh-ed25519 key's body is not valid base64$"):
        sshkeys.parse_public_key(f"ssh-ed25519 {body[:8]}*{body[8:]}", "k.pub")
