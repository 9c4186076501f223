"""A fast static file server on 127.0.0.1 (sendfile, Range-aware) in a process of its own."""

from __future__ import annotations

import multiprocessing
import os
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
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
