"""Fixtures shared by the test modules: a real local HTTP server, the image mirror on it, the `qinst` command."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from httpserver import HTTPServer, serving
from mirror import Images, Mirror, build_mirror, make_images
from signing import SigningKey, make_key, upstream_catalog

from testsupport.qinst import qinst_argv, qinst_env

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
