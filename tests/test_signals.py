"""SIGTERM reaches the same interruption path as Ctrl-C, through the real `qinst`: a message, exit 143 (130 for
SIGINT), no traceback, nothing half-written left in the cache. (`up` under a signal: tests/test_cli_up.py.)"""

from __future__ import annotations

import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from testsupport.qinst import qinst_argv, qinst_env


@pytest.fixture
def silent_server() -> Iterator[socket.socket]:
    """A listening TCP socket on 127.0.0.1 that never answers: a download that hangs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        s.settimeout(120)
        yield s


@pytest.mark.parametrize(
    ("sig", "code", "said"), [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")]
)
def test_signal_during_a_pull_exits_cleanly(
    silent_server: socket.socket, tmp_path: Path, sig: int, code: int, said: str
) -> None:
    cache = tmp_path / "cache"
    url = f"http://127.0.0.1:{silent_server.getsockname()[1]}/image.qcow2"
    proc = subprocess.Popen(
        [*qinst_argv(), "--cache-dir", str(cache), "pull", url, "--sha256", "a" * 64],
        env=qinst_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        conn, _ = silent_server.accept()  # the download has connected: qinst is inside it (a slow machine waits)
        with conn:
            assert proc.poll() is None, proc.communicate()
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert err.startswith(f"qinst: error: {said}") and "Traceback" not in err
    assert not [p for p in cache.rglob("*") if p.is_file() and p.suffix == ".qcow2"]
