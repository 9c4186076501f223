"""files.py: the one bounded reader, atomic writer and lock opener, and the parser guard, against hostile files.

Every record qinst reads back (cache records, KVM verdicts, volume seals, accepted checksum files) and every file a
user names (--checks, --baseline, --catalog, --ssh-key, config.toml) goes through them: a FIFO never blocks, a
symlink is never written through, deep nesting and huge numbers are errors with the file named, never a crash.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qemu_instances import freshness, kvmverdict
from qemu_instances.digests import Algorithm, Digest
from qemu_instances.errors import ConfigError, ImageError, QinstError, UsageError
from qemu_instances.files import locked, parse_json, parse_toml, read_bounded, write_atomically
from qemu_instances.images import Cache, ImageStore
from qemu_instances.seals import SealStore
from qemu_instances.settings import Settings
from testsupport.qinst import qinst_argv, qinst_env

DEEP_JSON = "[" * 100_000 + "]" * 100_000
DEEP_TOML = "x = " + "[" * 100_000 + "]" * 100_000 + "\n"
DIGEST = Digest(Algorithm.SHA256, "5" * 64)


# -- the reader ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fifo", "folder", "device"])
def test_what_is_not_a_regular_file_is_refused_by_its_path_without_blocking(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "thing"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    else:
        path = Path("/dev/zero")
    started = time.monotonic()
    with pytest.raises(UsageError, match=rf"--x: {path} is not a regular file \(a") as err:
        read_bounded(path, "--x", 100)
    assert time.monotonic() - started < 2
    assert err.value.exit_code == 2


def test_a_socket_is_refused_by_its_path(tmp_path: Path) -> None:
    import socket

    path = tmp_path / "sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        with pytest.raises(UsageError, match=f"--x: cannot read {path}"):
            read_bounded(path, "--x", 100)


def test_a_file_over_its_cap_is_refused_and_one_at_its_cap_is_read(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    assert read_bounded(path, "what", 100) == b"x" * 100
    path.write_bytes(b"x" * 101)
    with pytest.raises(ImageError, match=f"what: {path} is larger than 100 bytes"):
        read_bounded(path, "what", 100, error=ImageError)


def test_a_record_is_never_read_through_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("{}")
    link = tmp_path / "record.json"
    link.symlink_to(target)
    with pytest.raises(UsageError, match="is a symbolic link; refusing to follow it"):
        read_bounded(link, "record", 100, follow=False)
    assert read_bounded(link, "--user-data", 100) == b"{}"  # a file the user names may be a link


# -- the parsers -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "why"),
    [
        (DEEP_JSON, "maximum recursion depth"),
        ("[1e999999]", None),  # parses as inf: allowed by json, refused by callers that want finite numbers
        ("1" * 5000, "Exceeds the limit"),
        ("NaN", "not a number JSON allows"),
        ("\ud800", None),
    ],
)
def test_json_that_python_cannot_hold_is_an_error_naming_the_source(text: str, why: str | None) -> None:
    try:
        parse_json(text.encode("utf-8", "surrogatepass"), "the thing", ImageError)
    except ImageError as exc:
        assert exc.message.startswith("the thing: not JSON (")
        assert why is None or why in exc.message


def test_deep_toml_is_an_error_naming_the_file() -> None:
    with pytest.raises(ConfigError, match=r"config\.toml: invalid TOML: maximum recursion depth"):
        parse_toml(DEEP_TOML, "config.toml", ConfigError)


# -- every record qinst reads back, planted or corrupt ---------------------------------------------------------------

HOSTILE_RECORDS: list[bytes] = [
    DEEP_JSON.encode(),
    b'{"kvm": "failed", "uri": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    b"\xff\xfe not text",
    json.dumps({"signed": 10**400, "url": "u"}).encode(),
    json.dumps({"size": 1e400}).replace("Infinity", "1e400").encode(),
    b"[]",
    b"",
]


@pytest.mark.parametrize("data", HOSTILE_RECORDS)
def test_hostile_records_are_ignored_never_a_crash(tmp_path: Path, data: bytes) -> None:
    key = kvmverdict.HostKey("qemu:///system", "7002000", "6.1")
    verdicts = kvmverdict.directory(tmp_path)
    verdicts.mkdir(parents=True)
    (verdicts / key.filename).write_bytes(data)
    assert kvmverdict.recall(tmp_path, key) is None

    cache = Cache(tmp_path)
    cache.ensure()
    cache.path(DIGEST).write_bytes(b"an image")
    cache.path(DIGEST).with_name(DIGEST.filename + ".json").write_bytes(data)
    found = cache.get(DIGEST)
    assert found is not None and found.source == "unknown"  # the image is trusted by its name, the record ignored

    seals = SealStore(tmp_path, "qemu+ssh://h/system")
    seals.dir.mkdir(parents=True)
    seals._path("/pool/x").write_bytes(data)
    assert seals.get("/pool/x") is None

    (tmp_path / freshness.DIRECTORY).mkdir(exist_ok=True)
    freshness._path(tmp_path, "https://x/SHA256SUMS").write_bytes(data)
    assert freshness.newest(tmp_path, "https://x/SHA256SUMS") is None


@pytest.mark.parametrize("kind", ["fifo", "symlink"])
def test_a_planted_cache_record_never_blocks_nor_is_followed(tmp_path: Path, kind: str) -> None:
    cache = Cache(tmp_path)
    cache.ensure()
    cache.path(DIGEST).write_bytes(b"an image")
    record = cache.path(DIGEST).with_name(DIGEST.filename + ".json")
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"name": "from-a-link"}))
    if kind == "fifo":
        os.mkfifo(record)
    else:
        record.symlink_to(secret)
    result: list[object] = []
    reader = threading.Thread(target=lambda: result.append(cache.get(DIGEST)), daemon=True)
    reader.start()
    reader.join(5)
    assert result, "reading a planted cache record blocked"
    found = result[0]
    assert found is not None and getattr(found, "name", "") != "from-a-link"


# -- the writer and the lock -----------------------------------------------------------------------------------------


def test_the_writer_never_writes_through_a_file_or_link_planted_under_its_temporary_names(tmp_path: Path) -> None:
    """Temporary names are random and opened O_EXCL|O_NOFOLLOW; the target is replaced (a link there is replaced
    by the file, its target untouched)."""
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    target = tmp_path / "known_hosts"
    target.symlink_to(victim)
    for i in range(50):  # names a guesser might plant
        (tmp_path / f".known_hosts.{i}.tmp").symlink_to(victim)
    write_atomically(target, b"new")
    assert not target.is_symlink() and target.read_bytes() == b"new"
    assert victim.read_text() == "untouched"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".known_hosts.")) == [
        "known_hosts",
        "victim",
    ]


def test_a_failed_write_leaves_nothing_behind(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        write_atomically(tmp_path / "missing-folder" / "f", b"x")
    assert list(tmp_path.iterdir()) == []
    folder = tmp_path / "f"
    folder.mkdir()  # rename over a folder fails
    with pytest.raises(OSError):
        write_atomically(folder, b"x")
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


@pytest.mark.promise
@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit, RuntimeError])
def test_a_write_interrupted_before_its_rename_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop: type[BaseException]
) -> None:
    """Ctrl-C (KeyboardInterrupt), a signal's exit or any error between the write and the rename: the target keeps
    its old bytes and no temporary file is left in the folder, whatever was raised."""
    target = tmp_path / "record.json"
    target.write_bytes(b"old")

    def interrupted(fd: int) -> None:
        raise stop()

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(stop):
        write_atomically(target, b"new", durable=True)
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]
    assert target.read_bytes() == b"old"


def test_a_lock_file_that_is_a_symlink_is_refused_and_its_target_never_made(tmp_path: Path) -> None:
    target = tmp_path / "etc-like" / "created-by-qinst"
    target.parent.mkdir()
    lock = tmp_path / ".lock"
    lock.symlink_to(target)
    with (
        pytest.raises(ImageError, match=r"refusing the lock file .* it is a symbolic link"),
        locked(lock, error=ImageError),
    ):
        pass
    assert not target.exists()


def test_pull_refuses_a_symlink_planted_at_the_images_lock(tmp_path: Path) -> None:
    """The attack through the real entry point: `qinst pull` as root would have created the link's target."""
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M"], check=True)
    sha256 = subprocess.run(["sha256sum", str(image)], capture_output=True, text=True, check=True).stdout.split()[0]
    cache = tmp_path / "cache"
    (cache / "images").mkdir(parents=True)
    target = tmp_path / "made-by-the-link"
    (cache / "images" / f".sha256-{sha256}.lock").symlink_to(target)
    proc = subprocess.run(
        [*qinst_argv(), "--cache-dir", str(cache), "pull", str(image)],
        capture_output=True, text=True, timeout=60, env=qinst_env(), check=False,
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    assert "refusing the lock file" in proc.stderr and "symbolic link" in proc.stderr
    assert not target.exists()


# -- user files through the real entry point: a FIFO never blocks a command ------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["smoke", "x", "--checks", "{fifo}"],
        ["smoke", "x", "--baseline", "{fifo}"],
        ["--catalog", "{fifo}", "images"],
        ["seed", "--out", "{dir}/s.iso", "--ssh-key", "{fifo}"],
        ["seed", "--out", "{dir}/s.iso", "--user-data", "{fifo}"],
    ],
)
def test_a_fifo_given_to_an_option_is_refused_at_once(tmp_path: Path, args: list[str]) -> None:
    fifo = tmp_path / "input.pub"
    os.mkfifo(fifo)
    argv = [a.format(fifo=fifo, dir=tmp_path) for a in args]
    env = qinst_env(QINST_CONNECT="test:///default", XDG_CONFIG_HOME=str(tmp_path / "config"))
    proc = subprocess.run([*qinst_argv(), *argv], capture_output=True, text=True, timeout=30, env=env, check=False)
    assert proc.returncode in (2, 3), proc.stderr
    assert f"{fifo} is not a regular file (a FIFO)" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["smoke", "x", "--checks", "{deep_toml}"], 2),
        (["smoke", "x", "--baseline", "{deep_json}"], 2),
        (["smoke", "x", "--baseline", "{huge}"], 2),
        (["--catalog", "{deep_toml}", "images"], 3),
    ],
)
def test_deep_nesting_and_huge_numbers_in_user_files_are_errors_naming_the_file(
    tmp_path: Path, args: list[str], code: int
) -> None:
    (tmp_path / "deep.toml").write_text(DEEP_TOML)
    (tmp_path / "deep.json").write_text(DEEP_JSON)
    huge = {"schema": "qinst-smoke/1", "results": [{"suite": "x[bios]", "timings": {"boot": 10**400}}]}
    (tmp_path / "huge.json").write_text(json.dumps(huge))
    names = {"deep_toml": tmp_path / "deep.toml", "deep_json": tmp_path / "deep.json", "huge": tmp_path / "huge.json"}
    argv = [a.format(**names) for a in args]
    env = qinst_env(QINST_CONNECT="test:///nonexistent-qinst-must-not-connect", XDG_CONFIG_HOME=str(tmp_path / "c"))
    proc = subprocess.run([*qinst_argv(), *argv], capture_output=True, text=True, timeout=60, env=env, check=False)
    if "huge" in args[-1]:
        # A baseline whose figure is not a number qinst can hold is read without it: the run goes on to connect.
        assert "Traceback" not in proc.stderr and "OverflowError" not in proc.stderr
        return
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) <= 2
    assert str(next(v for k, v in names.items() if f"{{{k}}}" in " ".join(args))) in proc.stderr


def test_a_deeply_nested_config_file_is_exit_3_for_every_command(tmp_path: Path) -> None:
    config = tmp_path / "config" / "qinst"
    config.mkdir(parents=True)
    (config / "config.toml").write_text(DEEP_TOML)
    env = qinst_env(XDG_CONFIG_HOME=str(tmp_path / "config"), QINST_CONNECT="test:///default")
    proc = subprocess.run([*qinst_argv(), "ls"], capture_output=True, text=True, timeout=30, env=env, check=False)
    assert proc.returncode == 3, proc.stderr
    assert f"{config / 'config.toml'}: invalid TOML" in proc.stderr


# -- generated input (Hypothesis) ------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=30,
)
PROPERTY = settings(max_examples=150, database=None, deadline=2000, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_every_record_reader_takes_any_bytes(data: bytes) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        test_hostile_records_are_ignored_never_a_crash(Path(tmp), data)


@PROPERTY
@given(st.binary(max_size=300))
def test_the_parsers_raise_only_qinst_errors(data: bytes) -> None:
    for parse in (parse_json, lambda d, w, e: parse_toml(d.decode("utf-8", "replace"), w, e)):
        try:
            parse(data, "x", UsageError)
        except QinstError as exc:
            assert exc.exit_code == 2


@PROPERTY
@given(json_values)
def test_baselines_of_any_shape_load_or_are_refused(value: object) -> None:
    import tempfile

    from qemu_instances.smokereport import load_baseline

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "b.json"
        for data in (value, {"schema": "qinst-smoke/1", "results": [{"suite": "s", "timings": value}]}):
            path.write_text(json.dumps(data))
            try:
                baseline = load_baseline(path)
            except UsageError:
                continue
            assert all(isinstance(v, float) and v >= 0 for t in baseline.timings.values() for v in t.values())


def test_an_image_store_on_a_cache_full_of_planted_things_still_lists(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    cache.ensure()
    os.mkfifo(cache.dir / f"{DIGEST.filename}")
    (cache.dir / f".{DIGEST.filename}.lock").symlink_to(tmp_path / "nowhere")
    store = ImageStore(Settings(cache_dir=tmp_path))
    assert store.cache.entries() == []  # a FIFO under an image's name is not an image
