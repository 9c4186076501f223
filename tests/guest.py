"""Fixtures for tests that boot the project's test guest image under the real libvirtd and QEMU.

The image comes from tests/images/build.sh (QINST_TEST_IMAGE names its result directory; otherwise the fixture
runs the script, which caches its result). Its mirror tree is served over HTTP on 127.0.0.1 and qinst reaches it
through the real pull path (--catalog + --mirror). Guests use user-mode networking with `restrict=on` and a port
forward on 127.0.0.1: no test traffic leaves loopback.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from testsupport.fileserver import file_server
from testsupport.virsh import URI, domains, remove_domain, unique_name, virsh, volumes

__all__ = ["domains", "force_remove", "unique_name", "virsh", "volumes"]  # the test modules import them from here

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class TestImage:
    dir: Path
    catalog: Path
    mirror_url: str


def _image_dir() -> Path:
    given = os.environ.get("QINST_TEST_IMAGE")
    if given:
        return Path(given)
    proc = subprocess.run(
        ["bash", str(ROOT / "tests/images/build.sh")], capture_output=True, text=True, check=False, timeout=1200
    )
    if proc.returncode != 0:
        pytest.fail(f"tests/images/build.sh failed:\n{proc.stderr[-3000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


def force_remove(name: str) -> None:
    """Remove a test domain and its volumes whatever state it is in (test teardown only)."""
    remove_domain(name)


@pytest.fixture(scope="session")
def test_image() -> Iterator[TestImage]:
    """The test image's mirror served on 127.0.0.1, and its catalog."""
    directory = _image_dir()
    with file_server(directory / "mirror") as url:
        yield TestImage(directory, directory / "catalog.toml", url)


@pytest.fixture(scope="session")
def vm_env(test_image: TestImage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Environment for `qinst` in VM tests: the test catalog, the mirror, a session cache, a private HOME.

    At the end of the session, the base-image volumes the tests' cache put into the pool are removed.
    """
    home = tmp_path_factory.mktemp("home")
    cache = tmp_path_factory.mktemp("cache")
    env = {
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "QINST_CONNECT": URI,
        "QINST_CATALOG": str(test_image.catalog),
        "QINST_MIRROR": test_image.mirror_url,
        "QINST_CACHE_DIR": str(cache),
        "SSH_AUTH_SOCK": "",
    }
    yield env
    # Another test session on this libvirtd (a developer's run beside CI's) may have instances on the same image:
    # a base volume named in any domain's qinst metadata is kept.
    in_use = "".join(virsh("dumpxml", name).stdout for name in domains())
    for path in (cache / "images").glob("sha512-*"):
        if not path.name.endswith(".json") and path.name.removeprefix("sha512-") not in in_use:
            virsh("vol-delete", "--pool", "qinst", path.name)
            virsh("vol-delete", "--pool", "qinst", path.name + ".verified")  # left by remote launches


@pytest.fixture
def ssh_key(tmp_path: Path) -> Path:
    """A fresh ed25519 key pair for one test; returns the public key's path."""
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key.with_suffix(".pub")
