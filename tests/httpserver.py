"""A real HTTP/1.1 server on 127.0.0.1 for integration tests, with fault injection per path.

It serves documents registered by their request target (path, plus "?query" when there is one), honours a single
`Range: bytes=N-[M]`, and logs every request so tests can assert what a client really asked for.
"""

from __future__ import annotations

import json
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")
_BLOCK = 64 << 10


@dataclass
class Fault:
    """Misbehaviour of one path; the counters count down as requests come."""

    cut_after: int | None = None  # close the connection after this many body bytes...
    cut_times: int = 1  # ...in this many responses
    ignore_range: bool = False  # answer 200 with the whole body even to a Range request
    wrong_range: bool = False  # answer a Range request with 206 and the body from byte 0
    fail_times: int = 0  # answer fail_status this many times, then serve normally
    fail_status: int = 503
    delay: float = 0.0  # seconds to sleep per 64 KiB block (a slow link)


@dataclass(frozen=True)
class Hit:
    """One request as the server saw it."""

    method: str
    target: str
    headers: dict[str, str]
    status: int
    sent: int  # body bytes the server set out to write

    @property
    def range(self) -> str | None:
        return self.headers.get("Range")


@dataclass(frozen=True)
class _Doc:
    body: bytes
    headers: dict[str, str]
    status: int = 200


class HTTPServer:
    """Serve registered documents; start() binds an ephemeral port on 127.0.0.1."""

    def __init__(self, tls: Path | None = None) -> None:
        self.tls = tls  # a PEM file with a certificate and its key: serve https
        self._docs: dict[str, _Doc] = {}
        self._faults: dict[str, Fault] = {}
        self._hits: list[Hit] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"{'https' if self.tls else 'http'}://{host!s}:{port}"

    def add(self, target: str, body: bytes, content_type: str = "application/octet-stream", **headers: str) -> str:
        """Serve body at target (with extra headers: Content_Encoding="gzip"); returns its full URL."""
        extra = {key.replace("_", "-"): value for key, value in headers.items()}
        self._docs[target] = _Doc(body, {"Content-Type": content_type, **extra})
        return self.url + target

    def endless(self, target: str) -> None:
        """Answer target with a chunked body (no Content-Length) that never ends."""
        self._docs[target] = _Doc(b"", {"Transfer-Encoding": "chunked"}, -1)

    def redirect(self, target: str, location: str, status: int = 302) -> None:
        """Answer target with a redirect to location."""
        self._docs[target] = _Doc(b"", {"Location": location}, status)

    def add_json(self, target: str, data: Any) -> str:
        return self.add(target, json.dumps(data).encode(), "application/json")

    def remove(self, target: str) -> None:
        self._docs.pop(target, None)

    def fault(self, target: str, **kwargs: Any) -> Fault:
        fault = Fault(**kwargs)
        self._faults[target] = fault
        return fault

    def hits(self, target: str | None = None, method: str = "GET") -> list[Hit]:
        with self._lock:
            return [h for h in self._hits if h.method == method and (target is None or h.target == target)]

    def _record(self, hit: Hit) -> None:
        with self._lock:
            self._hits.append(hit)

    def start(self) -> None:
        outer = self

        class Handler(_Handler):
            server_state = outer

        self._server = _Server(("127.0.0.1", 0), Handler)
        if self.tls is not None:
            import ssl

            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self.tls)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="test-http", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that drops a connection (as clients under test do) is not a server failure worth a traceback.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_state: HTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _log(self, status: int, sent: int) -> None:
        hit = Hit(self.command, self.path, dict(self.headers.items()), status, sent)
        self.server_state._record(hit)

    def _reply(self, status: int, body: bytes, headers: dict[str, str], *, send_body: bool) -> None:
        # Log before writing: the client may act on the answer before this thread gets to run again.
        self._log(status, len(body) if send_body else 0)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def _endless(self, body: bool) -> None:
        self._log(200, 0)
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        chunk = b"%x\r\n%s\r\n" % (_BLOCK, b"\0" * _BLOCK)
        try:
            while body:
                self.wfile.write(chunk)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _serve(self, *, body: bool) -> None:
        state = self.server_state
        doc = state._docs.get(self.path)
        fault = state._faults.get(self.path)
        if fault and fault.fail_times > 0:
            fault.fail_times -= 1
            self._reply(fault.fail_status, b"try again later\n", {}, send_body=body)
            return
        if doc is None:
            self._reply(404, b"not found\n", {"Content-Type": "text/plain"}, send_body=body)
            return
        if doc.status == -1:
            self._endless(body)
            return
        if doc.status != 200:
            self._reply(doc.status, doc.body, doc.headers, send_body=body)
            return

        data, status = doc.body, 200
        headers = {"Accept-Ranges": "bytes", **doc.headers}
        match = _RANGE.match(self.headers.get("Range") or "")
        if match and not (fault and fault.ignore_range):
            start = 0 if fault and fault.wrong_range else int(match[1])
            end = min(int(match[2]) if match[2] else len(data) - 1, len(data) - 1)
            if start >= len(data):
                self._reply(416, b"", {"Content-Range": f"bytes */{len(data)}"}, send_body=body)
                return
            data, status = data[start : end + 1], 206
            headers["Content-Range"] = f"bytes {start}-{end}/{len(doc.body)}"

        limit = len(data)
        if body and fault and fault.cut_after is not None and fault.cut_times > 0:
            limit = min(fault.cut_after, len(data))
            fault.cut_times -= 1
        self._log(status, limit if body else 0)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not body:
            return
        try:
            for offset in range(0, limit, _BLOCK):
                self.wfile.write(data[offset : min(offset + _BLOCK, limit)])
                if fault and fault.delay:
                    time.sleep(fault.delay)
            self.wfile.flush()
            if limit < len(data):
                # The promised Content-Length is not met: the client must notice and resume.
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


@contextmanager
def serving(tls: Path | None = None) -> Iterator[HTTPServer]:
    server = HTTPServer(tls)
    server.start()
    try:
        yield server
    finally:
        server.stop()
