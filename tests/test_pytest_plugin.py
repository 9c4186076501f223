"""qinst's pytest plugin (issue 27). Fast: inner pytest runs (pytester, in-process) whose qinst calls are fakes
standing in for api.up/run/cp/logs/rm. Real (vm): a pytest run in a subprocess of a test file that boots the test
image through `qinst_module` (one TCG boot), checks it with run(), cp() and testinfra in one test, fails another on
purpose (its report carries the console and cloud-init's output), and leaves no domain, volume or log behind; the
plugin reads qinst's settings from the QINST_* environment, as tests/guest.py's vm_env gives them.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import pytest
from guest import domains, force_remove, volumes

from qemu_instances import api
from qemu_instances.domain import Metadata
from qemu_instances.errors import GuestTimeout, UsageError
from qemu_instances.instances import Instance
from qemu_instances.ssh import SshResult
from testsupport.virsh import LOG_DIR

pytest_plugins = ["pytester"]


class FakeQinst:
    """api.up/run/cp/logs/rm/ssh_config as the plugin calls them, recording each call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.up_error: Exception | None = None

    def up(self, settings: Any, request: Any, progress: Any = None) -> SimpleNamespace:
        self.calls.append(("up", (settings, request)))
        if self.up_error is not None:
            raise self.up_error
        meta = Metadata(image=request.image, digest="", user="debian", network="user")  # type: ignore[arg-type]
        return SimpleNamespace(instance=Instance(request.name, "running", meta))

    def run(self, settings: Any, name: str, command: list[str], *, timeout: float = 60.0) -> SshResult:
        self.calls.append(("run", (name, command)))
        return SshResult(3, "out\n", "err\n", 0.1)

    def cp(self, settings: Any, sources: list[str], dest: str, *, recursive: bool = False) -> None:
        self.calls.append(("cp", (sources, dest, recursive)))

    def logs(self, settings: Any, name: str) -> str:
        self.calls.append(("logs", name))
        return f"[    0.000000] Linux version 6.1\n\x1b[31mred\x1b[0m console of {name}\n"

    def rm(self, settings: Any, name: str, *, force: bool = False) -> list[str]:
        self.calls.append(("rm", (name, force)))
        if self.up_error is not None and not isinstance(self.up_error, GuestTimeout):
            raise UsageError(f"no qinst instance named {name!r}")
        return [f"domain {name}"]

    def ssh_config(self, settings: Any, names: list[str]) -> str:
        return "".join(f"Host {n}\n    HostName 127.0.0.1\n" for n in names)

    def named(self, call: str) -> list[Any]:
        return [args for name, args in self.calls if name == call]


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeQinst:
    qinst = FakeQinst()
    for name in ("up", "run", "cp", "logs", "rm", "ssh_config"):
        monkeypatch.setattr(api, name, getattr(qinst, name))
    for variable in ("QINST_CONNECT", "QINST_HOST", "QINST_CATALOG", "QINST_MIRROR", "PYTEST_XDIST_WORKER"):
        monkeypatch.delenv(variable, raising=False)
    return qinst


def test_the_plugin_is_a_pytest11_entry_point() -> None:
    found = [e for e in importlib.metadata.entry_points(group="pytest11") if e.name == "qinst"]
    assert [e.value for e in found] == ["qemu_instances.pytest_plugin"]


def test_the_projects_own_qinst_fixture_wins_inside_tests(qinst: Any) -> None:
    """tests/conftest.py's `qinst` (it runs the CLI) shadows the plugin's fixture of the same name here."""
    from qemu_instances.pytest_plugin import QinstFactory

    assert not isinstance(qinst, QinstFactory) and callable(qinst)
    assert qinst("--help").returncode == 0


def test_loading_the_plugin_imports_nothing_of_qinst_nor_libvirt() -> None:
    code = (
        "import sys, qemu_instances.pytest_plugin as p\n"
        "print(sorted(m for m in sys.modules if m.startswith(('qemu_instances', 'libvirt', 'yaml', 'requests'))))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "['qemu_instances', 'qemu_instances.pytest_plugin']"


def test_the_options_are_in_pytest_help(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--help")
    for option in ("--qinst-image=IMAGE", "--qinst-connect=URI", "--qinst-host=NAME", "--qinst-keep-failed"):
        result.stdout.fnmatch_lines([f"*{option}*"])


def test_up_run_cp_and_removal_at_the_tests_end(
    pytester: pytest.Pytester, fake: FakeQinst, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw3")
    monkeypatch.setenv("QINST_CONNECT", "test:///from-env")
    monkeypatch.setenv("QINST_CATALOG", "/a.toml:/b.toml")
    pytester.makepyfile(
        """
        def test_one(qinst):
            guest = qinst.up(user_data={"packages": ["nginx"]}, arch="arm64", accel="tcg", memory_mib=512,
                             ssh_keys=["/k.pub"])
            assert guest.name.startswith("pytest-gw3-") and guest.instance.name == guest.name
            assert guest.run(["echo", "two words", "$HOME"]) == (3, "out\\n", "err\\n")
            rc, out, err = guest.run("echo $HOME | wc -c")
            assert rc == 3
            guest.cp("local.txt", ":/tmp/")
            guest.cp(":/etc/hostname", "back", recursive=True)
            assert guest.ssh_config().read_text() == f"Host {guest.name}\\n    HostName 127.0.0.1\\n"

        def test_two(qinst):
            qinst.up("other-image", name="chosen-name")
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider", "--qinst-image", "qinst-test", "--qinst-connect", "test:///x")
    result.assert_outcomes(passed=2)
    (settings, first), (_, second) = fake.named("up")
    assert settings.connect == "test:///x"  # the option beats QINST_CONNECT
    assert [str(c) for c in settings.catalogs] == ["/a.toml", "/b.toml"]
    assert first.image == "qinst-test" and second.image == "other-image" and second.name == "chosen-name"
    assert str(first.arch) == "aarch64" and str(first.accel) == "tcg" and first.memory_mib == 512
    assert first.ssh_keys == ("/k.pub",)
    assert first.user_data.read_text() == "#cloud-config\npackages:\n- nginx\n"
    name = first.name
    assert fake.named("run") == [(name, ["echo 'two words' '$HOME'"]), (name, ["echo $HOME | wc -c"])]
    assert fake.named("cp") == [(["local.txt"], f"{name}:/tmp/", False), ([f"{name}:/etc/hostname"], "back", True)]
    assert fake.named("rm") == [(name, True), ("chosen-name", True)]  # each at its own test's end
    assert not fake.named("logs")  # nothing failed: no logs fetched


def test_a_failed_test_gets_the_console_and_cloud_init_output_and_its_guest_is_removed(
    pytester: pytest.Pytester, fake: FakeQinst
) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.fixture(scope="module")
        def guest(qinst_module):
            return qinst_module.up("qinst-test")

        def test_fails(guest):
            assert guest.run("false").rc == 0, "deliberately"

        def test_passes(guest):
            pass
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    name = fake.named("up")[0][1].name
    result.stdout.fnmatch_lines([f"*qinst console: {name}*", "*Linux version 6.1*", f"*red console of {name}*"])
    result.stdout.fnmatch_lines([f"*qinst cloud-init-output.log: {name}*"])
    assert "\x1b[31m" not in result.stdout.str()  # the console's terminal escapes are not replayed
    assert fake.named("rm") == [(name, True)]  # once, after the module's last test
    assert "kept" not in result.stdout.str()


def test_keep_failed_keeps_a_failed_tests_guests_and_says_so(pytester: pytest.Pytester, fake: FakeQinst) -> None:
    pytester.makepyfile(
        """
        def test_fails(qinst):
            qinst.up("qinst-test")
            assert False

        def test_passes(qinst):
            qinst.up("qinst-test")
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider", "--qinst-keep-failed")
    result.assert_outcomes(passed=1, failed=1)
    failed, passed = (request.name for _, request in fake.named("up"))
    assert fake.named("rm") == [(passed, True)]
    result.stdout.fnmatch_lines([f"*kept {failed} (a test using it failed); remove it with: qinst rm -f {failed}*"])


def test_a_guest_that_never_became_ready_is_still_removed_and_reported(
    pytester: pytest.Pytester, fake: FakeQinst
) -> None:
    fake.up_error = GuestTimeout("the guest did not become ready within 300 s")
    pytester.makepyfile(
        """
        def test_boot(qinst):
            qinst.up("qinst-test")
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    name = fake.named("up")[0][1].name
    result.stdout.fnmatch_lines(["*GuestTimeout*", f"*qinst console: {name}*"])
    assert fake.named("rm") == [(name, True)]


def test_a_launch_that_made_nothing_is_not_an_error_at_teardown(pytester: pytest.Pytester, fake: FakeQinst) -> None:
    fake.up_error = UsageError("no such image")
    pytester.makepyfile(
        """
        import pytest
        from qemu_instances.errors import UsageError

        def test_boot(qinst):
            with pytest.raises(UsageError):
                qinst.up("nosuch")
        """
    )
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)


@pytest.mark.promise
def test_a_guest_that_cannot_be_removed_does_not_keep_the_others(
    pytester: pytest.Pytester, fake: FakeQinst, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every guest of the fixture is removed when the test ends: the first removal failing (libvirt refusing it)
    is reported as the teardown's error, after the later guests are removed too."""
    from qemu_instances.errors import HypervisorError

    removed = []

    def rm(settings: Any, name: str, *, force: bool = False) -> list[str]:
        removed.append(name)
        if len(removed) == 1:
            raise HypervisorError(f"cannot remove {name}: the volume is busy")
        return [f"domain {name}"]

    monkeypatch.setattr(api, "rm", rm)
    pytester.makepyfile(
        """
        def test_boot(qinst):
            qinst.up("qinst-test")
            qinst.up("qinst-test")
            qinst.up("qinst-test")
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    assert removed == [request.name for _, request in fake.named("up")]  # all three, in order
    result.stdout.fnmatch_lines([f"*cannot remove {removed[0]}: the volume is busy*"])


def test_up_without_an_image_says_which_option_gives_one(pytester: pytest.Pytester, fake: FakeQinst) -> None:
    pytester.makepyfile(
        """
        def test_boot(qinst):
            qinst.up()
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*names no image and --qinst-image is not given*"])
    assert not fake.named("up")


def test_testinfra_without_pytest_testinfra_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from qemu_instances.pytest_plugin import Guest

    monkeypatch.setitem(sys.modules, "testinfra", None)  # as if it were not installed
    meta = Metadata(image="qinst-test", digest="", user="debian", network="user")  # type: ignore[arg-type]
    guest = Guest("web1", Instance("web1", "running", meta), factory=None)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="needs pytest-testinfra: pip install pytest-testinfra"):
        guest.testinfra  # noqa: B018


def test_names_carry_the_xdist_worker_and_never_repeat(monkeypatch: pytest.MonkeyPatch) -> None:
    from qemu_instances.domain import validate_name
    from qemu_instances.pytest_plugin import guest_name

    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    plain = {guest_name() for _ in range(200)}
    assert len(plain) == 200 and all(n.startswith("pytest-") and n.count("-") == 1 for n in plain)
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw12")
    assert guest_name().startswith("pytest-gw12-")
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "GW_../x")
    for name in (guest_name(), *plain):
        validate_name(name)


@pytest.mark.promise
def test_a_random_suffix_that_repeats_never_gives_the_same_name_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    """The suffix is 24 random bits: two draws can be equal (it happened in a run of the test above). The name is
    drawn again then, so two guests of one session never share a name."""
    import secrets

    from qemu_instances.pytest_plugin import guest_name

    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    suffix = f"{secrets.randbelow(1 << 24):06x}"
    draws = iter([suffix, suffix, suffix, "ffffff" if suffix != "ffffff" else "000000"])
    monkeypatch.setattr(secrets, "token_hex", lambda n: next(draws))
    first, second = guest_name(), guest_name()
    assert first == f"pytest-{suffix}" and second != first and second.startswith("pytest-")


# -- a real boot through the plugin ------------------------------------------------------------------------------------

TESTS = """
import pathlib

import pytest


@pytest.fixture(scope="module")
def guest(qinst_module):
    guest = qinst_module.up(network="user:restrict", accel="tcg", memory_mib=512, timeout=1800,
                            user_data={"write_files": [{"path": "/etc/qinst-plugin", "content": "from-user-data"}]})
    pathlib.Path("guest-name.txt").write_text(guest.name)
    return guest


def test_checks_with_run_cp_and_testinfra(guest, tmp_path):
    rc, out, err = guest.run(["cat", "/etc/hostname"])
    assert rc == 0 and out.strip() == guest.name, err
    assert guest.run("cat /etc/qinst-plugin").stdout == "from-user-data"
    (tmp_path / "local file").write_text("copied in")
    guest.cp(tmp_path / "local file", ":/tmp/copied")
    guest.cp(":/tmp/copied", tmp_path / "back")
    assert (tmp_path / "back").read_text() == "copied in"
    host = guest.testinfra
    assert host.file("/etc/os-release").contains("bookworm")
    assert host.user("debian").exists and host.service("ssh").is_running
    assert host.check_output("id -un") == "debian"


def test_fails_on_purpose(guest):
    assert guest.run("false").rc == 0, "this test fails on purpose"
"""


@pytest.mark.vm
@pytest.mark.libvirt
def test_a_test_file_boots_checks_fails_and_cleans_up_through_the_plugin(
    pytester: pytest.Pytester, vm_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in vm_env.items():  # QINST_CATALOG, QINST_MIRROR, QINST_CACHE_DIR, QINST_CONNECT, HOME...
        monkeypatch.setenv(key, value)
    pytester.makepyfile(test_guest=TESTS)
    name_file = pytester.path / "guest-name.txt"
    try:
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--qinst-image", "qinst-test", timeout=2400)
        name = name_file.read_text()
        result.assert_outcomes(passed=1, failed=1)
        out = result.stdout.str()
        assert "this test fails on purpose" in out
        console = out.split(f"qinst console: {name}", 1)[1]
        assert "Cloud-init v." in console.split("qinst cloud-init-output.log", 1)[0]  # the console's last lines
        assert "Cloud-init v." in out.split(f"qinst cloud-init-output.log: {name}", 1)[1]
        assert out.count(f"qinst console: {name}") == 1  # the passing test's report has none
        # Nothing left behind: no domain, no volume, no console log.
        assert name not in domains() and not volumes(prefix=name)
        assert not list(LOG_DIR.glob(f"{name}*"))
    finally:
        if name_file.exists():
            force_remove(name_file.read_text())


def test_pytester_runs_see_no_qinst_fixture_of_this_project(pytester: pytest.Pytester) -> None:
    """The inner run is outside tests/: `qinst` there is the plugin's factory, not conftest's CLI runner."""
    pytester.makepyfile(
        """
        from qemu_instances.pytest_plugin import QinstFactory

        def test_factory(qinst, qinst_module):
            assert isinstance(qinst, QinstFactory) and isinstance(qinst_module, QinstFactory)
        """
    )
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)
