"""Fixtures shared by the test modules: a real local HTTP server, the image mirror on it, the `qinst` command, SSH
servers on 127.0.0.1; and the small helpers several test modules use (a clean CLI error, the cache's files, fast
retry policies). Test modules never import each other: what two of them share lives here or in testsupport/."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from httpserver import HTTPServer, serving
from mirror import Image, Images, Mirror, build_mirror, make_images, make_qcow2
from signing import SigningKey, make_key, upstream_catalog

from qemu_instances.download import RetryPolicy
from qemu_instances.images import ImageStore
from qemu_instances.settings import Settings
from testsupport.hostkeys import HostKeySshd, keygen, start_sshd
from testsupport.qinst import qinst_argv, qinst_env
from testsupport.sshd import Sshd, serving_sshd

RunQinst = Callable[..., subprocess.CompletedProcess[str]]

# Fixtures for tests that boot the test guest image (tests/guest.py).
pytest_plugins = ["guest"]

# A shell runs a background job (`cmd &`, nohup) with SIGINT ignored, and an ignored signal stays ignored in every
# child: the `qinst` processes the tests interrupt with SIGINT (Ctrl-C) would never see it. A handled signal is
# reset to the default at exec, so the children start as they would from a terminal.
signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def qinst(tmp_path: Path) -> RunQinst:
    """Run the real `qinst` in a subprocess: qinst("pull", "x", env={...}) -> CompletedProcess (text)."""

    def run(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*qinst_argv(), *args],
            capture_output=True,
            text=True,
            env=qinst_env(**(env or {})),
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
            check=False,
        )

    return run


@pytest.fixture
def http_server() -> Iterator[HTTPServer]:
    """A threaded HTTP server on 127.0.0.1 (ephemeral port), with per-path fault injection and a request log."""
    with serving() as server:
        yield server


@pytest.fixture(scope="session")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A self-signed certificate (and its key, one PEM file) for 127.0.0.1: a client trusts it only when told to
    (REQUESTS_CA_BUNDLE)."""
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem"), "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    pem = d / "server.pem"
    pem.write_bytes((d / "cert.pem").read_bytes() + (d / "key.pem").read_bytes())
    return pem


@pytest.fixture(scope="session")
def test_images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    """Small real qcow2 images, made once per session."""
    return make_images(tmp_path_factory.mktemp("images"))


@pytest.fixture
def mirror(http_server: HTTPServer, test_images: Images, tmp_path: Path) -> Mirror:
    """The upstream tree and a fake aleph API on http_server, with a user catalog pinning the test images."""
    return build_mirror(http_server, test_images, tmp_path)


@pytest.fixture(scope="session")
def test_key(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SigningKey]:
    """A throw-away OpenPGP signing key (ed25519) and its binary public keyring."""
    key = make_key(tmp_path_factory.mktemp("gpg"), "qinst test signing key <test@qinst.invalid>")
    yield key
    key.stop()


@pytest.fixture(scope="session")
def other_key(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SigningKey]:
    """A second key: its signatures must not pass for test_key's keyring or Ubuntu's."""
    key = make_key(tmp_path_factory.mktemp("gpg"), "someone else <other@qinst.invalid>")
    yield key
    key.stop()


@pytest.fixture
def upstream(mirror: Mirror, test_key: SigningKey, tmp_path: Path) -> Path:
    """A catalog whose upstream hosts are the mirror's server itself (no --mirror needed), Ubuntu signed by test_key."""
    return upstream_catalog(mirror, tmp_path, test_key)


# -- clean errors from the command line --------------------------------------------------------------------------------


def one_clear_error(proc: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and "unexpected failure" not in proc.stderr
    for word in words:
        assert word in proc.stderr, proc.stderr


def no_traceback(stderr: str) -> None:
    assert "Traceback" not in stderr
    assert 'File "' not in stderr


@pytest.fixture
def offline_env(tmp_path: Path) -> dict[str, str]:
    """A private HOME and config dir, an SSH key, and a libvirt URI that must never be reached."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(home / ".ssh/id_ed25519")], check=True)
    return {
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "QINST_CACHE_DIR": str(tmp_path / "cache"),
        "QINST_CONNECT": "test:///nonexistent-qinst-must-not-connect",
        "SSH_AUTH_SOCK": "",
    }


# -- the image cache and downloads -------------------------------------------------------------------------------------


# Retry policies that do not wait for the real backoff.
FAST = RetryPolicy(backoff=0.01, max_backoff=0.02, timeout=(5.0, 5.0))
FAST_TWO_TRIES = RetryPolicy(attempts=2, backoff=0.01, max_backoff=0.02, timeout=(5.0, 5.0))


def cache_files(cache: Path) -> list[str]:
    """What the cache directory holds, lock files aside (they stay, empty, by design)."""
    images = cache / "images"
    return sorted(p.name for p in images.iterdir() if not p.name.endswith(".lock")) if images.is_dir() else []


def store_for(mirror: Mirror, cache: Path, policy: RetryPolicy = FAST) -> ImageStore:
    settings = Settings(cache_dir=cache, catalogs=(mirror.catalog,), mirror=mirror.url, aleph_api=mirror.url)
    return ImageStore(settings, policy=policy)


def wait_for(condition: Any, what: str, deadline: float = 30.0) -> None:
    """Poll condition() until it holds; fail after deadline seconds."""
    end = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture(scope="module")
def local_qcow2(tmp_path_factory: pytest.TempPathFactory) -> Image:
    return make_qcow2(tmp_path_factory.mktemp("local") / "disk.qcow2", 1, seed=10)


# -- SSH servers on 127.0.0.1 ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    """Debian's sshd on 127.0.0.1 only, key-only root login; a client ssh command that checks its host key."""
    with serving_sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server


@pytest.fixture(scope="module")
def hostkey_sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostKeySshd]:
    """An sshd on 127.0.0.1 that offers one host key (and a valid key it does NOT offer); nobody may log in."""
    d = tmp_path_factory.mktemp("hostkeys")
    key = keygen(d / "host.key")
    other = keygen(d / "other.key")
    keygen(d / "client.key")
    (d / "authorized_keys").write_text("")  # nobody may log in: these tests stop at the host key
    proc, port = start_sshd(d)
    try:
        yield HostKeySshd(port, key, other, d / "client.key")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# bad_sshd's banner, and the host key the consoles print in the tests that use it.
BANNER = b"\xff\xfe not UTF-8\r\nSSH-2.0-Open\xff\xfeSSH_9.2\r\n"
PRINTED_KEY = "AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"


@pytest.fixture
def bad_sshd() -> Iterator[int]:
    """A TCP server on 127.0.0.1 that sends a banner with \\xff\\xfe to every client, then hangs up."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.sendall(BANNER)
                conn.settimeout(2)
                with contextlib.suppress(OSError):
                    conn.recv(4096)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        server.close()
