"""qinst's pytest plugin (entry point `pytest11`, name `qinst`): boot instances from tests, check them, remove them.

    def test_web(qinst):
        guest = qinst.up("debian-12", user_data={"packages": ["nginx"]})
        rc, out, err = guest.run("systemctl is-active nginx")
        assert rc == 0, err
        assert guest.testinfra.package("nginx").is_installed

Fixtures: `qinst` (its guests are removed when the test ends) and `qinst_module` (when the module's last test ends:
one boot for several tests). Options: --qinst-image (the image when up() names none), --qinst-connect, --qinst-host,
--qinst-keep-failed (keep the guests of a failed test). The other settings come from the QINST_* environment
variables, as for the command line. A failed test's report carries its guests' console and cloud-init output.

Nothing of qinst's is imported until a fixture is used: the plugin costs a test run that does not use it nothing.
"""

from __future__ import annotations

import os
import secrets
import shlex
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import pytest

if TYPE_CHECKING:
    from qemu_instances.instances import Instance
    from qemu_instances.settings import Settings

REPORT_LINES = 200  # lines of each guest's console and cloud-init output in a failed test's report
CLOUD_INIT_OUTPUT = (
    "sudo -n tail -n {n} /var/log/cloud-init-output.log 2>/dev/null || tail -n {n} /var/log/cloud-init-output.log"
)
_KEPT = pytest.StashKey[list[str]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("qinst", "qinst: QEMU instances for tests")
    group.addoption("--qinst-image", metavar="IMAGE", help="Image for qinst.up() calls that name none.")
    group.addoption("--qinst-connect", metavar="URI", help="libvirt URI (default: QINST_CONNECT, else qinst's).")
    group.addoption("--qinst-host", metavar="NAME", help="A host of qinst's config file (default: QINST_HOST).")
    group.addoption(
        "--qinst-keep-failed", action="store_true", help="Keep the guests of failed tests (qinst rm NAME later)."
    )


class RunResult(NamedTuple):
    """A command's outcome in the guest: `rc, out, err = guest.run(...)`."""

    rc: int
    stdout: str
    stderr: str


@dataclass
class Guest:
    """A running instance a test booted: commands, copies, its ssh_config, a testinfra host."""

    name: str
    instance: Instance
    factory: QinstFactory = field(repr=False)
    failed: bool = False  # a test that used it failed: kept with --qinst-keep-failed

    def run(self, command: str | Sequence[str], *, timeout: float = 120.0) -> RunResult:
        """Run a shell command line (str) or an argv (each word quoted for the guest's shell); never raises for
        its exit status (255: ssh itself failed)."""
        from qemu_instances import api

        line = command if isinstance(command, str) else shlex.join(command)
        result = api.run(self.factory.settings, self.name, [line], timeout=timeout)
        return RunResult(result.returncode, result.stdout, result.stderr)

    def cp(self, src: str | os.PathLike[str], dst: str | os.PathLike[str], *, recursive: bool = False) -> None:
        """Copy into or out of the guest (scp, host key checked): a path in the guest is written `:PATH`."""
        from qemu_instances import api

        def operand(path: str | os.PathLike[str]) -> str:
            text = os.fspath(path)
            return f"{self.name}{text}" if text.startswith(":") else text

        api.cp(self.factory.settings, [operand(src)], operand(dst), recursive=recursive)

    def ssh_config(self) -> Path:
        """A file with this guest's `Host NAME` block: `ssh -F PATH NAME`, `rsync -e "ssh -F PATH"`, testinfra."""
        from qemu_instances import api

        path = self.factory.workdir / f"{self.name}.ssh_config"
        path.write_text(api.ssh_config(self.factory.settings, [self.name]))
        return path

    def console(self) -> str:
        """The guest's serial console as recorded."""
        from qemu_instances import api

        return api.logs(self.factory.settings, self.name)

    @property
    def testinfra(self) -> Any:
        """A testinfra host for the guest (pytest-testinfra's ssh backend, through ssh_config())."""
        try:
            import testinfra
        except ImportError:
            raise RuntimeError("Guest.testinfra needs pytest-testinfra: pip install pytest-testinfra") from None
        # controlpersist=0: no ssh master left behind for a guest that is about to be removed
        return testinfra.get_host(f"ssh://{self.name}", ssh_config=str(self.ssh_config()), controlpersist=0)


# The names this process gave out: a 24-bit random suffix repeats (200 names: about 1 run in 800), and a repeated
# name would make the second up() of a session fail as "already exists", or rm() take another test's guest.
_ISSUED: set[str] = set()


def guest_name() -> str:
    """A unique instance name: the xdist worker (gw0, gw1...) when there is one, and a random suffix never given out
    before by this process (each xdist worker has its own prefix)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    worker = "".join(c for c in worker.lower() if c.isalnum())[:12]
    while True:
        name = f"pytest-{worker + '-' if worker else ''}{secrets.token_hex(3)}"
        if name not in _ISSUED:
            _ISSUED.add(name)
            return name


class QinstFactory:
    """What the `qinst` and `qinst_module` fixtures give: `.up(image, **UpRequest fields)` -> Guest."""

    def __init__(self, config: pytest.Config, workdir: Path) -> None:
        self.config = config
        self.workdir = workdir
        self.guests: list[Guest] = []
        self.names: list[str] = []  # every name up() was asked for, booted or not: each is removed at the end
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        """qinst's settings from the --qinst-* options and the QINST_* environment variables."""
        if self._settings is None:
            from qemu_instances import api
            from qemu_instances.settings import DEFAULT_ALEPH_API, DEFAULT_IPFS_GATEWAY

            env = os.environ.get
            cache = env("QINST_CACHE_DIR")
            self._settings = api.settings(
                connect=self.config.getoption("qinst_connect") or env("QINST_CONNECT") or None,
                cache_dir=Path(cache) if cache else None,
                catalogs=tuple(Path(p) for p in env("QINST_CATALOG", "").split(os.pathsep) if p),
                mirror=env("QINST_MIRROR") or None,
                aleph_api=env("QINST_ALEPH_API") or DEFAULT_ALEPH_API,
                ipfs_gateway=env("QINST_IPFS_GATEWAY") or DEFAULT_IPFS_GATEWAY,
                host=self.config.getoption("qinst_host") or env("QINST_HOST") or None,
            )
        return self._settings

    def up(self, image: str | None = None, **fields: Any) -> Guest:
        """Boot an instance and wait until it is ready (cloud-init done, SSH with the console's host key).

        `fields` are qinst's UpRequest fields (cpus, memory_mib, network, user_data, arch, accel, firmware, timeout,
        ...); user_data may also be a dict (cloud-config) or a str (its text), arch/accel/firmware plain strings.
        """
        from qemu_instances import api
        from qemu_instances.errors import UsageError

        image = image or self.config.getoption("qinst_image")
        if not image:
            raise UsageError("qinst.up() names no image and --qinst-image is not given")
        name = fields.pop("name", None) or guest_name()
        request = api.UpRequest(image=image, name=name, **self._typed(name, fields))
        self.names.append(name)  # before up(): a guest that failed to become ready is still removed
        result = api.up(self.settings, request)
        guest = Guest(name, result.instance, self)
        self.guests.append(guest)
        return guest

    def _typed(self, name: str, fields: dict[str, Any]) -> dict[str, Any]:
        from qemu_instances.arch import Arch
        from qemu_instances.domain import Accel, Firmware

        typed = dict(fields)
        user_data = typed.get("user_data")
        if isinstance(user_data, dict):
            import yaml

            user_data = "#cloud-config\n" + yaml.safe_dump(user_data, sort_keys=False)
        if isinstance(user_data, str):
            path = self.workdir / f"{name}.user-data"
            path.write_text(user_data)
            typed["user_data"] = path
        if isinstance(typed.get("arch"), str):
            typed["arch"] = Arch.parse(typed["arch"], "arch")
        for key, enum in (("accel", Accel), ("firmware", Firmware)):
            if isinstance(typed.get(key), str):
                typed[key] = enum(typed[key])
        for key in ("ssh_keys", "forwards", "mounts"):
            if key in typed and not isinstance(typed[key], tuple):
                typed[key] = tuple(typed[key])
        return typed

    def report_sections(self) -> list[tuple[str, str]]:
        """Each guest's console tail and cloud-init output, for a failed test's report (what can be had of them)."""
        from qemu_instances import api
        from qemu_instances.errors import QinstError
        from qemu_instances.smokereport import clean_text
        from qemu_instances.text import printable_lines, tail_lines

        sections = []
        for name in self.names:
            try:
                console = tail_lines(api.logs(self.settings, name), REPORT_LINES)
            except QinstError as exc:
                console = f"(no console: {exc.message})"
            sections.append((f"qinst console: {name}", printable_lines(clean_text(console))))
            if any(g.name == name for g in self.guests):
                try:
                    result = api.run(self.settings, name, [CLOUD_INIT_OUTPUT.format(n=REPORT_LINES)], timeout=60)
                    output = result.stdout if result.ok else f"(not read: {result.stderr.strip()[-500:]})"
                except QinstError as exc:
                    output = f"(not read: {exc.message})"
                sections.append((f"qinst cloud-init-output.log: {name}", printable_lines(clean_text(output))))
        return sections

    def close(self, keep_failed: bool) -> list[str]:
        """Remove every guest (a failed one is kept with keep_failed); the names of those kept."""
        from qemu_instances import api
        from qemu_instances.errors import QinstError

        kept, error = [], None
        failed = {g.name for g in self.guests if g.failed}
        for name in self.names:
            if keep_failed and name in failed:
                kept.append(name)
                continue
            try:
                api.rm(self.settings, name, force=True)
            except QinstError as exc:
                if "no qinst instance named" not in exc.message:  # up() failed before anything was made
                    error = error or exc  # the other guests are still removed
        self.names.clear()
        self.guests.clear()
        if error is not None:
            raise error
        return kept


def _factory(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[QinstFactory]:
    factory = QinstFactory(request.config, tmp_path_factory.mktemp("qinst", numbered=True))
    try:
        yield factory
    finally:
        request.config.stash.setdefault(_KEPT, []).extend(factory.close(request.config.getoption("qinst_keep_failed")))


@pytest.fixture(name="qinst")
def qinst_fixture(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[QinstFactory]:
    """Boot guests for one test: `guest = qinst.up(IMAGE, **fields)`; they are removed when the test ends."""
    yield from _factory(request, tmp_path_factory)


@pytest.fixture(scope="module")
def qinst_module(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[QinstFactory]:
    """Boot guests shared by a module's tests; they are removed after its last test."""
    yield from _factory(request, tmp_path_factory)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test (or its setup) marks the guests of its qinst fixtures as failed and gets their logs."""
    report = yield
    if report.failed:
        for value in getattr(item, "funcargs", {}).values():
            if isinstance(value, QinstFactory) and value.names:
                for guest in value.guests:
                    guest.failed = True
                report.sections += value.report_sections()
    return report


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    kept = config.stash.get(_KEPT, [])
    if kept:
        terminalreporter.section("qinst")
        for name in kept:
            terminalreporter.write_line(f"kept {name} (a test using it failed); remove it with: qinst rm -f {name}")
