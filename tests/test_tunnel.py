"""tunnel.py: `qinst forward`'s ssh -N -L run by run_tunnel, with a scripted ssh (a Python program on 127.0.0.1)
that opens its forwarded ports one at a time, or gives up on one of them as ssh does with ExitOnForwardFailure: the
tunnel is ready only once every port listens, and a tunnel that ends by itself is an error with ssh's own words."""

from __future__ import annotations

import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from qemu_instances import tunnel
from qemu_instances.errors import QinstError
from qemu_instances.forwarding import Forward

pytestmark = pytest.mark.promise

# The scripted ssh: listen on each port in turn, each once its go-file exists; exit (as ssh does when a forward
# fails) when the fail-file exists, saying why on stderr; else run until stopped.
FAKE_SSH = r"""
import socket, sys, time
from pathlib import Path
control, ports = Path(sys.argv[1]), [int(p) for p in sys.argv[2:]]
held = []
while True:
    if (control / "fail").exists():
        sys.stderr.write(f"Error: local port forwarding failed for listen port {ports[-1]}\n")
        sys.exit(255)
    if len(held) < len(ports) and (control / f"go{len(held)}").exists():
        s = socket.socket()
        s.bind(("127.0.0.1", ports[len(held)]))
        s.listen()
        held.append(s)
        (control / f"up{len(held) - 1}").touch()
    time.sleep(0.02)
"""


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _until(condition: object, what: str, deadline: float = 30.0) -> None:
    end = time.monotonic() + deadline
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < end, f"still not {what}"
        time.sleep(0.01)


class _Run:
    """run_tunnel on a thread, with the scripted ssh; what it called and raised."""

    def __init__(self, tmp_path: Path, count: int, monkeypatch: pytest.MonkeyPatch) -> None:
        self.control = tmp_path
        self.forwards = [Forward("127.0.0.1", port, 80 + i) for i, port in enumerate(_free_ports(count))]
        script = tmp_path / "ssh.py"
        script.write_text(FAKE_SSH)
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.looks = 0  # how many times run_tunnel asked whether the ports listen
        real = tunnel.port_in_use

        def counted(fwd: Forward) -> bool:
            self.looks += 1
            return real(fwd)

        monkeypatch.setattr(tunnel, "port_in_use", counted)
        argv = [sys.executable, str(script), str(tmp_path), *(str(f.host_port) for f in self.forwards)]
        self.thread = threading.Thread(target=self._run, args=(argv,), daemon=True)
        self.thread.start()

    def _run(self, argv: list[str]) -> None:
        try:
            tunnel.run_tunnel(argv, self.forwards, self.ready.set)
        except BaseException as exc:
            self.error = exc

    def open(self, index: int) -> None:
        (self.control / f"go{index}").touch()
        _until(lambda: (self.control / f"up{index}").exists(), f"listening on forward {index}")

    def looked(self, times: int) -> None:
        """Wait until run_tunnel has looked at every port `times` more times."""
        start = self.looks
        _until(lambda: self.looks >= start + times * len(self.forwards), "looked at the ports")

    def end(self) -> QinstError:
        (self.control / "fail").touch()
        self.thread.join(30)
        assert not self.thread.is_alive()
        assert isinstance(self.error, QinstError), self.error
        return self.error


def test_ready_only_once_every_forward_listens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _Run(tmp_path, 3, monkeypatch)
    run.open(0)
    run.open(1)
    run.looked(3)  # with two of three up: not ready
    assert not run.ready.is_set()
    run.open(2)
    _until(run.ready.is_set, "ready")
    run.end()


def test_a_tunnel_whose_last_forward_fails_is_an_error_never_ready(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = _Run(tmp_path, 2, monkeypatch)
    run.open(0)  # the first forward is up, the second fails: ssh exits (ExitOnForwardFailure)
    run.looked(2)
    error = run.end()
    assert not run.ready.is_set()
    assert f"forwarding failed for listen port {run.forwards[1].host_port}" in error.message
    assert "the tunnel ended" in error.message
