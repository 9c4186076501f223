"""Speed promises that a unit test can hold: which modules a command imports, which processes it spawns, how many
libvirt calls `ls` makes (on libvirt's test driver, no guest), and the CLI building only the command it runs."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from qemu_instances import launch
from qemu_instances.digests import Digest
from qemu_instances.domain import METADATA_KEY, METADATA_NS
from qemu_instances.host import Host
from qemu_instances.images import Cache, CachedImage
from qemu_instances.instances import list_instances
from testsupport.qinst import qinst_env
from testsupport.testdriver import TEST_URI

# Run a command in-process and write, at exit, the modules it imported and the programs it spawned.
_PROBE = """
import atexit, json, subprocess, sys
spawned = []
_init = subprocess.Popen.__init__
def _record(self, args, *a, **k):
    spawned.append(str(args[0] if isinstance(args, (list, tuple)) else args))
    _init(self, args, *a, **k)
subprocess.Popen.__init__ = _record
import typer.main
built = []  # the commands typer built
_build = typer.main.get_command_from_info
def _built(command_info, **kwargs):
    built.append(command_info.name or command_info.callback.__name__)
    return _build(command_info=command_info, **kwargs)
typer.main.get_command_from_info = _built
report = {"modules": sys.modules, "spawned": spawned, "built": built}
atexit.register(lambda: open(sys.argv[1], "w").write(json.dumps({**report, "modules": sorted(sys.modules)})))
from qemu_instances.cli import main
main(sys.argv[2:])
"""
# Heavy modules no command below needs: typer's pydantic coercion (typer >= 0.29), rich (progress bars only),
# the HTTP stack (downloads only), MIME (multipart user-data only), the download code; platformdirs (settings.py
# resolves the XDG directories), `secrets` (hmac and OpenSSL: os.urandom and random.SystemRandom do), package data
# through importlib.resources (its readers import zipfile: the data sits next to the modules).
NEVER = (
    *("pydantic", "rich", "requests", "urllib3", "http.client", "email.mime", "qemu_instances.download"),
    *("platformdirs", "secrets", "hmac", "importlib.resources", "importlib.readers", "zipfile"),
)
# What a command that neither logs, hashes, binds, makes temporary files nor runs a thread pool never imports:
# logging (~0.005 s with traceback's helpers; qemu_instances.logs imports it on the first message), concurrent.futures
# (it imports logging), hashlib (OpenSSL's start), socket, tempfile and random.
QUIET = ("logging", "concurrent.futures", "hashlib", "_hashlib", "socket", "tempfile", "random")


def _probe(tmp_path: Path, *args: str) -> tuple[int, set[str], list[str], str]:
    rc, modules, spawned, err, _ = _probe_all(tmp_path, *args)
    return rc, modules, spawned, err


def _probe_all(tmp_path: Path, *args: str) -> tuple[int, set[str], list[str], str, list[str]]:
    """Run qinst `args` in a child: exit code, modules imported, programs spawned, stderr, commands typer built."""
    out = tmp_path / "probe.json"
    env = qinst_env(XDG_CONFIG_HOME=str(tmp_path / "config"))
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, str(out), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        timeout=120,
        check=False,
    )
    data = json.loads(out.read_text())
    return proc.returncode, set(data["modules"]), data["spawned"], proc.stderr, data["built"]


def _heavy(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == n or m.startswith(n + ".") for n in names))


def test_ls_imports_no_image_store_seed_builder_http_logging_or_config_parser(tmp_path: Path) -> None:
    rc, modules, spawned, err, built = _probe_all(tmp_path, "--connect", TEST_URI, "--cache-dir", str(tmp_path), "ls")
    assert rc == 0, err
    assert built == ["ls"]  # typer built no other command's options
    assert "qemu_instances.instances" in modules and "libvirt" in modules  # it did list
    assert _heavy(modules, (*NEVER, "yaml", "pycdlib", "qemu_instances.images", "qemu_instances.launch")) == []
    assert _heavy(modules, ("qemu_instances.catalog", "qemu_instances.wait", "qemu_instances.fleet")) == []
    assert _heavy(modules, (*QUIET, "tomllib")) == []  # no config file here (json: the probe's own)
    assert spawned == []  # `ls` spawns nothing


def test_help_and_images_import_no_libvirt(tmp_path: Path) -> None:
    rc, modules, _, err, built = _probe_all(tmp_path, "--help")
    assert rc == 0, err
    assert len(built) >= 16 and "ls" in built  # the listing of every command
    assert _heavy(modules, (*NEVER, *QUIET, "libvirt", "yaml", "pycdlib", "qemu_instances.images")) == []
    assert _heavy(modules, ("tomllib", "qemu_instances.catalog")) == []
    rc, modules, spawned, err, built = _probe_all(tmp_path, "--cache-dir", str(tmp_path), "images")
    assert rc == 0, err
    assert built == ["images"]
    assert "qemu_instances.catalog" in modules
    assert _heavy(modules, (*NEVER, *QUIET, "libvirt", "yaml", "pycdlib", "qemu_instances.host")) == []
    assert spawned == []


def _tiny_cached_image(tmp_path: Path) -> tuple[Path, Path]:
    """A cached qcow2 pinned by an extra catalog entry `tiny`; returns (catalog file, cache dir)."""
    image = tmp_path / "tiny.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", image, "64M"], check=True)
    cache = tmp_path / "cache"
    env = qinst_env(XDG_CONFIG_HOME=str(tmp_path / "config"))
    pull = [sys.executable, "-m", "qemu_instances", "--cache-dir", str(cache), "pull", str(image)]
    subprocess.run(pull, check=True, capture_output=True, env=env, stdin=subprocess.DEVNULL)
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(f'[images.tiny]\nurl = "http://127.0.0.1:9/tiny.qcow2"\ndigest = "sha256:{digest}"\n')
    return catalog, cache


def test_up_of_a_cached_image_imports_no_http_stack_and_runs_no_qemu_img(tmp_path: Path) -> None:
    catalog, cache = _tiny_cached_image(tmp_path)
    record = json.loads(next((cache / "images").glob("*.json")).read_text())
    assert record["virtual_size"] == 64 << 20  # recorded when the image was cached
    args = ["--catalog", str(catalog), "--cache-dir", str(cache), "--connect", TEST_URI]
    rc, modules, spawned, err, built = _probe_all(tmp_path, *args, "up", "tiny", "--no-wait", "--network", "user")
    assert built == ["up"]
    # The test driver cannot take a volume upload: `up` gets past pull, plan and seed, and stops at provision.
    assert rc == 4 and "virStorageVolUpload" in err, err
    assert "\nqinst: KVM is not usable here" in "\n" + err  # a notice, set up after logging's late import
    assert "pycdlib" in modules and "qemu_instances.launch" in modules  # the seed was built
    assert _heavy(modules, (*NEVER, "qemu_instances.fleet", "qemu_instances.smoke", "qemu_instances.doctor")) == []
    assert _heavy(modules, ("tempfile",)) == []  # hashlib and random: pycdlib's, on the seed's thread
    assert not [p for p in spawned if "qemu-img" in p], spawned


def test_the_log_imports_logging_on_its_first_message_with_the_cli_set_up() -> None:
    code = """
import sys
from qemu_instances import logs
logs.configure(debug=True)
assert "logging" not in sys.modules
logs.log.debug("first %s", "message")
assert "logging" in sys.modules
logs.log.warning("second")
logs.configure(debug=False)  # a second set-up replaces the first: one handler, INFO
logs.log.debug("hidden")
logs.log.info("third")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=qinst_env(), check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "qinst: first message\nqinst: warning: second\nqinst: third\n"


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"XDG_CACHE_HOME": "/x/cache", "XDG_CONFIG_HOME": "/x/config/"},
        {"XDG_CACHE_HOME": "relative/cache", "XDG_CONFIG_HOME": ""},  # not absolute: ignored, as XDG says
        {"HOME": "/home/someone/"},
        {"HOME": "/"},
        {"HOME": "relative"},  # a relative HOME counts as unset: the account's home
        {"HOME": ""},
        {"HOME": None},
    ],
)
def test_the_cache_and_config_dirs_are_the_ones_platformdirs_gives(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str | None]
) -> None:
    import platformdirs

    from qemu_instances.settings import default_cache_dir, default_config_dir

    for name in ("XDG_CACHE_HOME", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert default_cache_dir() == Path(platformdirs.user_cache_dir("qinst"))
    assert default_config_dir() == Path(platformdirs.user_config_dir("qinst"))


# -- the image record's virtual size: untrusted input ----------------------------------------------------------


@pytest.mark.parametrize("value", ["123", -1, 0, True, 1 << 60, None, 1.5, [1]])
def test_a_bad_recorded_virtual_size_is_ignored(tmp_path: Path, value: object) -> None:
    cache = Cache(tmp_path)
    cache.ensure()
    digest = Digest.parse("sha256:" + "ab" * 32)
    cache.path(digest).write_bytes(b"x")
    cache.path(digest).with_name(cache.path(digest).name + ".json").write_text(json.dumps({"virtual_size": value}))
    found = cache.get(digest)
    assert found is not None and found.virtual_size is None


def test_a_recorded_virtual_size_round_trips(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    cache.ensure()
    digest = Digest.parse("sha256:" + "cd" * 32)
    cache.path(digest).write_bytes(b"x")
    cache.record(CachedImage("n", digest, cache.path(digest), 1, "local", "qcow2", virtual_size=10 << 30))
    found = cache.get(digest)
    assert found is not None and found.virtual_size == 10 << 30


# -- `ls`: one listing call, one metadata call per domain ------------------------------------------------------


@contextlib.contextmanager
def _counting(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter[str]]:
    calls: Counter[str] = Counter()
    for cls, names in (
        (libvirt.virConnect, ("listAllDomains", "getAllDomainStats", "lookupByName", "listDomainsID")),
        (libvirt.virDomain, ("XMLDesc", "state", "info", "isActive", "metadata", "UUIDString")),
    ):
        for name in names:
            original = getattr(cls, name)

            def wrapper(self: object, *a: object, _o: object = original, _n: str = name, **k: object) -> object:
                calls[_n] += 1
                return _o(self, *a, **k)  # type: ignore[operator]

            monkeypatch.setattr(cls, name, wrapper)
    yield calls


@pytest.mark.parametrize("count", [1, 16])
def test_ls_makes_one_listing_call_and_one_metadata_call_per_domain(
    monkeypatch: pytest.MonkeyPatch, count: int
) -> None:
    with Host(TEST_URI) as host:
        names = [f"speed-ls-{os.getpid()}-{i}" for i in range(count)]
        meta = "<instance><image>debian-12</image><digest></digest><user>cloud</user><network>user</network>"
        meta += "<ssh-host>127.0.0.1</ssh-host><ssh-port>2222</ssh-port></instance>"
        try:
            for name in names:
                dom = host.conn.defineXML(
                    f"<domain type='test'><name>{name}</name><memory>65536</memory><os><type>hvm</type></os></domain>"
                )
                dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, meta, METADATA_KEY, METADATA_NS, 0)
            others = len(host.conn.listAllDomains(0)) - count  # the test driver's own domain "test"
            with _counting(monkeypatch) as calls:
                found = [i for i in list_instances(host) if i.name in names]
            assert [i.name for i in found] == sorted(names)
            assert [(i.state, i.invalid, i.metadata.ssh_port) for i in found] == [("shutoff", "", 2222)] * count
            assert calls == Counter({"getAllDomainStats": 1, "metadata": count + others})
        finally:
            for name in names:
                with contextlib.suppress(libvirt.libvirtError):
                    host.conn.lookupByName(name).undefine()


# -- the CLI builds only the command it runs ---------------------------------------------------------------------


def test_the_global_options_that_take_a_value_are_the_ones_skipped_to_find_the_command() -> None:
    from typer.main import get_command

    from qemu_instances import cli, cli_app

    group = get_command(cli.app)
    taking_a_value = {o for p in group.params if not getattr(p, "is_flag", False) for o in p.opts if o.startswith("--")}
    assert taking_a_value == cli_app.GLOBAL_VALUE_OPTIONS


@pytest.mark.parametrize(
    ("args", "name"),
    [
        (["ls"], "ls"),
        (["--connect", "ls", "up", "x"], "up"),  # a global option's value is not the command
        (["--connect=test:///default", "--debug", "--catalog", "f", "ls", "--json"], "ls"),
        (["snapshot", "list", "x"], "snapshot"),
        (["--help", "ls"], None),
        (["-h"], None),
        ([], None),
        (["--debug"], None),
        (["--cache-dir"], None),
        (["bogus"], None),
    ],
)
def test_only_the_command_run_is_built(args: list[str], name: str | None) -> None:
    from typer.main import get_command

    from qemu_instances import cli, cli_app

    built = get_command(cli_app.app_for(cli.app, cli._new_app, args)).commands  # type: ignore[attr-defined]
    every = get_command(cli.app).commands  # type: ignore[attr-defined]
    assert list(built) == ([name] if name else list(every))


def test_each_command_alone_has_the_same_help_and_options_as_in_the_whole_app() -> None:
    from typer.main import get_command
    from typer.testing import CliRunner

    from qemu_instances import cli, cli_app

    every = get_command(cli.app).commands  # type: ignore[attr-defined]
    assert len(every) >= 16
    runner = CliRunner()
    for name in every:
        alone = runner.invoke(cli_app.app_for(cli.app, cli._new_app, [name]), [name, "--help"], prog_name="qinst")
        whole = runner.invoke(cli.app, [name, "--help"], prog_name="qinst")
        assert alone.exit_code == whole.exit_code == 0, name
        assert alone.output == whole.output and f"Usage: qinst {name}" in alone.output
        built = get_command(cli_app.app_for(cli.app, cli._new_app, [name])).commands[name]  # type: ignore[attr-defined]
        assert [(p.name, p.opts, p.required) for p in built.params] == [
            (p.name, p.opts, p.required) for p in every[name].params
        ]
    bad = runner.invoke(cli_app.app_for(cli.app, cli._new_app, ["ls"]), ["ls", "--no-such-option"], prog_name="qinst")
    assert bad.exit_code == 2 and "No such option: --no-such-option" in bad.output


def test_qinst_help_still_lists_every_command() -> None:
    from typer.main import get_command

    from qemu_instances import cli

    proc = subprocess.run(
        [sys.executable, "-m", "qemu_instances", "--help"], capture_output=True, text=True, env=qinst_env(), check=True
    )
    listed = proc.stdout.split("Commands:")[1]
    assert all(f"  {name} " in listed for name in get_command(cli.app).commands)  # type: ignore[attr-defined]


def test_the_seed_iso_built_on_a_thread_is_the_same_and_its_failure_reaches_up() -> None:
    from qemu_instances import seed as seeds
    from qemu_instances.errors import QinstError

    files = {"user-data": b"#cloud-config\n", "meta-data": b"instance-id: i-1\n"}
    assert launch._in_background(lambda: seeds.iso_from_files(files)).result(timeout=60) == seeds.iso_from_files(files)
    failing = launch._in_background(lambda: seeds.iso_from_files({"bogus": b""}))
    with pytest.raises(QinstError, match="no file named 'bogus'"):
        failing.result(timeout=60)
