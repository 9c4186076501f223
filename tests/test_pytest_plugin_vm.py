"""The pytest plugin booting a real guest (issue 27): a pytest run (pytester, in a subprocess) of a test file that
boots the test image through `qinst_module`, checks it with run(), cp() and testinfra in one test, fails another on
purpose (its report carries the console and cloud-init's output), and leaves no domain, volume or log behind.
One TCG boot; the plugin reads qinst's settings from the QINST_* environment, as tests/guest.py's vm_env gives them.
"""

from __future__ import annotations

import pytest
from guest import domains, force_remove, volumes

from testsupport.virsh import LOG_DIR

pytestmark = [pytest.mark.vm, pytest.mark.libvirt]
pytest_plugins = ["pytester"]

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
