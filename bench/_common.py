"""Helpers for the benchmarks: a fast local file server, timed child processes, summary statistics."""

from __future__ import annotations

import multiprocessing
import os
import re
import socket
import statistics
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

_RANGE = re.compile(r"bytes=(\d+)-$")


class _FileHandler(BaseHTTPRequestHandler):
    """GET of a file under the server's root with the kernel's sendfile (no copy through Python), Range-aware."""

    protocol_version = "HTTP/1.1"
    root: Path

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        path = (self.root / self.path.lstrip("/")).resolve()
        if not path.is_file() or self.root not in path.parents:
            self.send_error(404)
            return
        size = path.stat().st_size
        start = 0
        match = _RANGE.match(self.headers.get("Range") or "")
        if match and int(match[1]) < size:
            start = int(match[1])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        else:
            self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size - start))
        self.end_headers()
        self.wfile.flush()
        with path.open("rb") as f:
            offset = start
            while offset < size:
                sent = os.sendfile(self.connection.fileno(), f.fileno(), offset, size - offset)
                if sent == 0:
                    break
                offset += sent


def _serve(sock: socket.socket, root: Path) -> None:
    handler = type("Handler", (_FileHandler,), {"root": root})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    server.daemon_threads = True
    server.serve_forever()


@contextmanager
def file_server(root: Path) -> Iterator[str]:
    """Serve root on 127.0.0.1 from a separate process (so it never competes for the client's GIL); yield its URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    port = sock.getsockname()[1]
    process = multiprocessing.get_context("fork").Process(target=_serve, args=(sock, root.resolve()), daemon=True)
    process.start()
    sock.close()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.join(5)


@dataclass(frozen=True)
class Timed:
    seconds: float
    max_rss_kib: int  # peak resident set of the child, from wait4()
    stdout: str


def timed(argv: Sequence[str | os.PathLike[str]], env: dict[str, str] | None = None) -> Timed:
    """Run argv, wall-clock it and take its own peak RSS (not that of other children); raise on failure."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [os.fspath(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env
    )
    out, err = b"", b""
    assert proc.stdout is not None and proc.stderr is not None
    # Small outputs only: read them to EOF, then reap the child with its rusage.
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed ({proc.returncode}): {err.decode(errors='replace')}")
    return Timed(seconds, usage.ru_maxrss, out.decode())


@dataclass(frozen=True)
class Summary:
    median: float
    minimum: float
    maximum: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        return cls(statistics.median(values), min(values), max(values))


def write_random_file(path: Path, mib: int) -> None:
    block = os.urandom(1 << 20)
    with path.open("wb") as f:
        for i in range(mib):
            # Vary every block so no layer can deduplicate or compress the stream.
            f.write(i.to_bytes(8, "little") + block[8:])
