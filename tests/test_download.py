"""download.py: verified downloads against real servers on 127.0.0.1: small documents and the size limit, resumes,
encodings, bodies longer than the pin or endless, stalled and broken servers, and network failures said in one line.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import random
import re
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
import urllib3
from conftest import FAST, FAST_TWO_TRIES, wait_for
from httpserver import HTTPServer
from mirror import Mirror

from qemu_instances.digests import Algorithm, Digest
from qemu_instances.download import RetryPolicy, _network_error, download_verified, fetch_bytes, new_session
from qemu_instances.errors import DigestMismatch, DownloadError, ImageError

pytestmark = pytest.mark.http


QUICK = RetryPolicy(attempts=2, backoff=0.01, max_backoff=0.02, timeout=(1.0, 1.0))


@pytest.mark.promise
def test_a_document_of_many_chunks_comes_whole(http_server: HTTPServer) -> None:
    body = random.Random(41).randbytes(300_000)
    url = http_server.add("/doc", body)
    assert fetch_bytes(url, session=new_session(), policy=QUICK) == body


@pytest.mark.promise
def test_the_size_limit_is_inclusive(http_server: HTTPServer) -> None:
    url = http_server.add("/doc", b"x" * 1000)
    assert len(fetch_bytes(url, session=new_session(), policy=QUICK, limit=1000)) == 1000
    with pytest.raises(DownloadError, match=f"^{url} is larger than 999 bytes; refusing it$"):
        fetch_bytes(url, session=new_session(), policy=QUICK, limit=999)


@pytest.mark.promise
def test_http_400_is_an_error_not_a_body(http_server: HTTPServer) -> None:
    url = http_server.add("/doc", b"not what you asked for")
    http_server.fault("/doc", fail_times=1, fail_status=400)
    with pytest.raises(DownloadError, match=f"cannot download {url}: HTTP 400") as err:
        fetch_bytes(url, session=new_session(), policy=QUICK)
    assert err.value.status == 400


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A server that accepts connections and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield f"http://127.0.0.1:{s.getsockname()[1]}/x"


@pytest.mark.promise
def test_a_server_that_never_answers_is_given_up_on(silent_server: str, tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(DownloadError, match="gave up after 2 attempts"):
        fetch_bytes(silent_server, session=new_session(), policy=QUICK)
    digest = Digest(Algorithm.SHA256, hashlib.sha256(b"").hexdigest())
    with pytest.raises(DownloadError, match="gave up after 2 attempts"):
        download_verified(silent_server, tmp_path / "x", digest, session=new_session(), policy=QUICK)
    assert time.monotonic() - started < 30


@pytest.mark.promise
def test_a_body_announced_longer_than_the_pinned_size_is_refused_before_any_byte(
    http_server: HTTPServer, tmp_path: Path
) -> None:
    body = b"y" * 2000
    url = http_server.add("/img", body)
    digest = Digest(Algorithm.SHA256, hashlib.sha256(body).hexdigest())
    dest = tmp_path / "img"
    with pytest.raises(DownloadError, match=f"^{url} announces 2000 bytes, more than the expected 1000$") as err:
        download_verified(url, dest, digest, session=new_session(), policy=QUICK, size=1000)
    assert err.value.hint == "nothing was cached; the server does not serve the pinned file"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.promise
def test_a_refused_connection_is_said_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as s:  # bound, never listening: connections are refused
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/doc"
        with pytest.raises(DownloadError, match=r"cannot connect to 127\.0\.0\.1: connection refused \(gave up"):
            fetch_bytes(url, session=new_session(), policy=QUICK)


@pytest.fixture
def endless_server() -> Iterator[str]:
    """A server that announces a gigabyte, sends 300 kB of it and then holds the connection open."""
    stop = threading.Event()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        s.settimeout(0.2)

        def serve() -> None:
            held = []
            while not stop.is_set():
                try:
                    conn, _ = s.accept()
                except OSError:
                    continue
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n" + b"z" * 300_000)
                held.append(conn)
            for conn in held:
                conn.close()

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        yield f"http://127.0.0.1:{s.getsockname()[1]}/doc"
        stop.set()
        thread.join(5)


@pytest.mark.promise
def test_a_document_over_the_limit_is_refused_as_it_streams_in(endless_server: str) -> None:
    """The limit bounds what is read, not just what is kept: a body that never ends is refused at the limit."""
    started = time.monotonic()
    with pytest.raises(DownloadError, match=f"^{endless_server} is larger than 100000 bytes; refusing it$"):
        fetch_bytes(endless_server, session=new_session(), policy=QUICK, limit=100_000)
    assert time.monotonic() - started < 10


@pytest.mark.promise
def test_a_digest_mismatch_names_the_url_the_pin_and_what_came(http_server: HTTPServer, tmp_path: Path) -> None:
    body = b"not the pinned file"
    url = http_server.add("/img", body)
    pinned = Digest(Algorithm.SHA256, "0" * 64)
    came = Digest(Algorithm.SHA256, hashlib.sha256(body).hexdigest())
    with pytest.raises(DigestMismatch, match=f"^digest mismatch for {url}: expected {pinned}, got {came}$") as err:
        download_verified(url, tmp_path / "img", pinned, session=new_session(), policy=QUICK)
    assert (err.value.url, err.value.expected, err.value.actual) == (url, str(pinned), str(came))
    assert list(tmp_path.iterdir()) == []  # nothing cached, no partial left


@pytest.mark.promise
def test_an_http_error_names_the_url(http_server: HTTPServer, tmp_path: Path) -> None:
    url = http_server.add("/img", b"x")
    http_server.fault("/img", fail_times=1, fail_status=404)
    digest = Digest(Algorithm.SHA256, hashlib.sha256(b"x").hexdigest())
    with pytest.raises(DownloadError, match=f"cannot download {url}: HTTP 404"):
        download_verified(url, tmp_path / "img", digest, session=new_session(), policy=QUICK)


@pytest.mark.promise
def test_a_body_of_exactly_the_pinned_size_is_taken_with_its_progress(http_server: HTTPServer, tmp_path: Path) -> None:
    body = random.Random(5).randbytes(700_000)
    url = http_server.add("/img", body)
    digest = Digest(Algorithm.SHA256, hashlib.sha256(body).hexdigest())
    seen: list[tuple[int, int | None]] = []
    size = download_verified(
        url, tmp_path / "img", digest, session=new_session(), policy=QUICK, size=len(body),
        progress=lambda done, total: seen.append((done, total)),
    )  # fmt: skip
    assert size == len(body) and (tmp_path / "img").read_bytes() == body
    assert seen[-1] == (len(body), len(body)) and [d for d, _ in seen] == sorted({d for d, _ in seen})


@pytest.fixture
def unannounced_server() -> Iterator[str]:
    """A server that sends 300 kB without a Content-Length, then closes the connection."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        s.settimeout(0.2)
        stop = threading.Event()

        def serve() -> None:
            while not stop.is_set():
                try:
                    conn, _ = s.accept()
                except OSError:
                    continue
                with conn:
                    conn.recv(65536)
                    conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"u" * 300_000)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        yield f"http://127.0.0.1:{s.getsockname()[1]}/img"
        stop.set()
        thread.join(5)


@pytest.mark.promise
def test_a_body_longer_than_the_pinned_size_is_stopped_even_unannounced(
    unannounced_server: str, tmp_path: Path
) -> None:
    digest = Digest(Algorithm.SHA256, hashlib.sha256(b"u" * 1000).hexdigest())
    with pytest.raises(DownloadError, match=f"^{unannounced_server} sent more than the expected 1000 bytes; stopped$"):
        download_verified(unannounced_server, tmp_path / "img", digest, session=new_session(), policy=QUICK, size=1000)
    assert list(tmp_path.iterdir()) == []


def _answering(head: bytes) -> Iterator[str]:
    """A server that answers every request with `head` and ten bytes of body."""

    def answer(conn: socket.socket) -> None:
        conn.recv(65536)
        conn.sendall(head + b"Content-Length: 10\r\nConnection: close\r\n\r\n" + b"r" * 10)

    for address in _raw_server(answer):
        yield f"http://{address}/img"


@pytest.mark.promise
@pytest.mark.parametrize(
    ("content_range", "said"),
    [(b"Content-Range: bytes 5-14/100\r\n", "'bytes 5-14/100'"), (b"", "None")],
    ids=["another-offset", "missing"],
)
def test_a_resume_answered_at_another_offset_starts_over(tmp_path: Path, content_range: bytes, said: str) -> None:
    """A partial download of 3 bytes asks for the rest; an answer whose Content-Range does not start at byte 3 (or
    has none) is not appended: the partial is dropped, and the attempt fails saying what came, never a traceback."""
    url = next(gen := _answering(b"HTTP/1.1 206 Partial Content\r\n" + content_range))
    try:
        (tmp_path / ".img.part").write_bytes(b"abc")
        digest = Digest(Algorithm.SHA256, hashlib.sha256(b"abc" + b"r" * 10).hexdigest())
        with pytest.raises(DownloadError, match=rf"unusable answer to a Range request \(Content-Range {said}\)"):
            download_verified(url, tmp_path / "img", digest, session=new_session(), policy=QUICK)
        assert not (tmp_path / "img").exists()
    finally:
        gen.close()


# -- a network failure reads as one line that says which kind it is ----------------------------------------------


def _raw_server(answer: Any) -> Iterator[str]:
    """A server on 127.0.0.1 that hands each accepted connection to answer(conn)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        s.settimeout(0.2)
        stop = threading.Event()

        def serve() -> None:
            while not stop.is_set():
                try:
                    conn, _ = s.accept()
                except OSError:
                    continue
                with conn:
                    answer(conn)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        yield f"127.0.0.1:{s.getsockname()[1]}"
        stop.set()
        thread.join(5)


def _reset(conn: socket.socket) -> None:
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with RST


def _bad_chunk(conn: socket.socket) -> None:
    conn.recv(65536)
    conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabc")


def _tls_hello_then_untrusted(conn: socket.socket, context: ssl.SSLContext) -> None:
    with contextlib.suppress(OSError), context.wrap_socket(conn, server_side=True) as tls:
        tls.recv(1)


@pytest.fixture
def tls_context(tmp_path: Path) -> ssl.SSLContext:
    """A server context with a self-signed certificate (trusted by nobody)."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


def _one_line_failure(url: str) -> str:
    with pytest.raises(DownloadError) as err:
        fetch_bytes(url, session=new_session(), policy=QUICK)
    return str(err.value)


@pytest.mark.promise
def test_a_silent_server_is_said_to_not_answer_in_time(silent_server: str) -> None:
    assert "127.0.0.1 did not answer in time (gave up after 2 attempts)" in _one_line_failure(silent_server)


@pytest.mark.promise
def test_a_connection_reset_is_said_as_no_connection() -> None:
    gen = _raw_server(_reset)
    try:
        assert _one_line_failure(f"http://{next(gen)}/x").endswith(
            ": cannot connect to 127.0.0.1 (no network?) (gave up after 2 attempts)"
        )
    finally:
        gen.close()


@pytest.mark.promise
def test_a_broken_body_is_said_as_a_broken_connection() -> None:
    gen = _raw_server(_bad_chunk)
    try:
        assert ": connection to 127.0.0.1 broken: ChunkedEncodingError (gave up" in _one_line_failure(
            f"http://{next(gen)}/x"
        )
    finally:
        gen.close()


@pytest.mark.promise
def test_an_untrusted_certificate_is_said_as_a_tls_failure(tls_context: ssl.SSLContext) -> None:
    gen = _raw_server(lambda conn: _tls_hello_then_untrusted(conn, tls_context))
    try:
        message = _one_line_failure(f"https://{next(gen)}/x")
    finally:
        gen.close()
    assert ": TLS failure talking to 127.0.0.1 (certificate not trusted?)" in message


class _BareFailure(requests.adapters.HTTPAdapter):
    """A transport that fails with an exception carrying nothing: no message, no cause (as some adapters raise)."""

    def send(self, *args: Any, **kwargs: Any) -> requests.Response:
        raise requests.ConnectionError()


@pytest.mark.promise
def test_a_failure_that_says_nothing_is_still_one_line_naming_the_host(tmp_path: Path) -> None:
    session = new_session()
    session.mount("http://", _BareFailure())
    url = "http://127.0.0.1:9/image"
    with pytest.raises(DownloadError, match=r"^cannot download .*: cannot connect to 127\.0\.0\.1 \(no network\?\)"):
        download_verified(url, tmp_path / "image", Digest(Algorithm.SHA256, "0" * 64), session=session, policy=QUICK)


@pytest.mark.promise
def test_a_download_is_written_private_whatever_the_umask(http_server: HTTPServer, tmp_path: Path) -> None:
    """The partial file (and so the image it becomes) is created 0600: not readable by other users meanwhile."""
    body = random.Random(5).randbytes(5000)
    url = http_server.add("/private", body)
    old = os.umask(0)
    try:
        digest = Digest(Algorithm.SHA256, hashlib.sha256(body).hexdigest())
        download_verified(url, tmp_path / "image", digest, session=new_session(), policy=QUICK)
    finally:
        os.umask(old)
    assert (tmp_path / "image").stat().st_mode & 0o777 == 0o600


@pytest.mark.promise
def test_a_partial_that_is_not_a_regular_file_is_refused_and_left(http_server: HTTPServer, tmp_path: Path) -> None:
    """A directory planted where the partial download goes: refused by name, never read, written or removed."""
    body = b"image bytes"
    url = http_server.add("/planted", body)
    planted = tmp_path / ".image.part"
    planted.mkdir()
    digest = Digest(Algorithm.SHA256, hashlib.sha256(body).hexdigest())
    with pytest.raises(DownloadError, match=r"^refusing to write .*\.image\.part: not a regular file$"):
        download_verified(url, tmp_path / "image", digest, session=new_session(), policy=QUICK)
    assert planted.is_dir() and not (tmp_path / "image").exists()


# -- resumes and encodings ---------------------------------------------------------------------------------------------


def test_range_answered_from_another_offset_is_not_appended(http_server: HTTPServer, tmp_path: Path) -> None:
    data = random.Random(7).randbytes(300_000)
    url = http_server.add("/blob", data)
    dest, part = tmp_path / "blob", tmp_path / ".blob.part"
    part.write_bytes(data[:1000])
    http_server.fault("/blob", wrong_range=True)
    digest = Digest.parse(f"sha256:{hashlib.sha256(data).hexdigest()}")
    assert download_verified(url, dest, digest, session=new_session(), policy=FAST) == len(data)
    assert dest.read_bytes() == data
    assert not part.exists()
    assert [(h.range, h.status) for h in http_server.hits("/blob")] == [("bytes=1000-", 206), (None, 200)]


def test_downloads_ask_for_identity_encoding(http_server: HTTPServer, tmp_path: Path) -> None:
    data = b"x" * 5000
    url = http_server.add("/blob", data)
    digest = Digest.parse(f"sha256:{hashlib.sha256(data).hexdigest()}")
    download_verified(url, tmp_path / "blob", digest, session=new_session(), policy=FAST)
    (hit,) = http_server.hits("/blob")
    assert hit.headers["Accept-Encoding"] == "identity"


@pytest.mark.parametrize("cut", [None, 100_000])
def test_content_encoding_is_decoded_before_hashing(http_server: HTTPServer, tmp_path: Path, cut: int | None) -> None:
    # A server that compresses anyway: the digest is the file's, so the bytes kept are the decoded ones. Random
    # data compresses to more bytes than it has, and a resume cannot use offsets into the compressed stream.
    data = random.Random(8).randbytes(300_000)
    url = http_server.add("/blob", gzip.compress(data), Content_Encoding="gzip")
    if cut:
        http_server.fault("/blob", cut_after=cut)
    digest = Digest.parse(f"sha256:{hashlib.sha256(data).hexdigest()}")
    assert download_verified(url, tmp_path / "blob", digest, session=new_session(), policy=FAST) == len(data)
    assert (tmp_path / "blob").read_bytes() == data
    statuses = [h.status for h in http_server.hits("/blob")]
    assert statuses == ([200] if cut is None else [200, 206, 200])


def test_a_body_not_in_the_encoding_it_claims_is_an_error_saying_so(http_server: HTTPServer, tmp_path: Path) -> None:
    """Content-Encoding: gzip over bytes that are not gzip: a one-line error with urllib3's reason (not retried)."""
    data = random.Random(9).randbytes(10_000)
    url = http_server.add("/blob", data, Content_Encoding="gzip")
    digest = Digest.parse(f"sha256:{hashlib.sha256(data).hexdigest()}")
    with pytest.raises(DownloadError, match=f"^cannot download {re.escape(url)}: .*failed to decode it"):
        download_verified(url, tmp_path / "blob", digest, session=new_session(), policy=FAST)
    assert not (tmp_path / "blob").exists()


# -- bodies longer than expected ---------------------------------------------------------------------------------------


class _Endless(BaseHTTPRequestHandler):
    """Answers with a body that never ends, counting what it managed to write before the client hung up."""

    protocol_version = "HTTP/1.1"
    announce: int | None = None  # a Content-Length to announce (and then exceed), or none (close-delimited)
    written: list[int]

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        if self.announce is not None:
            self.send_header("Content-Length", str(self.announce))
        self.send_header("Connection", "close")
        self.end_headers()
        sent = 0
        try:
            while sent < 1 << 30:
                self.wfile.write(b"\0" * 65536)
                sent += 65536
        except OSError:
            pass
        finally:
            self.written.append(sent)
            self.close_connection = True


@pytest.fixture
def endless() -> Iterator[tuple[str, type[_Endless]]]:
    handler = type("Handler", (_Endless,), {"written": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/image.qcow2", handler
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("announce", [None, 1 << 20])
def test_a_body_longer_than_expected_stops_at_once(
    endless: tuple[str, type[_Endless]], tmp_path: Path, announce: int | None
) -> None:
    url, handler = endless
    handler.announce = announce
    dest = tmp_path / "images" / f"sha256-{'5' * 64}"
    dest.parent.mkdir()
    digest = Digest.parse(f"sha256:{'5' * 64}")
    size = 2 << 20  # the catalog's `size`; with a Content-Length of 1 MiB that is the tighter bound
    with pytest.raises((DownloadError, ImageError)) as info:
        download_verified(url, dest, digest, session=new_session(), policy=FAST_TWO_TRIES, size=size)
    if announce is None:
        assert "more than the expected 2097152 bytes" in str(info.value)
    else:
        # Exactly Content-Length bytes are read, never the rest: then the digest decides.
        assert "digest mismatch" in str(info.value)
    wait_for(lambda: handler.written, "the server to notice the client went away")
    assert handler.written[0] < 64 << 20  # the client stopped long before the endless body's gigabyte
    assert list(dest.parent.iterdir()) == []  # nothing kept, not even a partial file


def test_a_content_length_above_the_catalog_size_is_refused(
    endless: tuple[str, type[_Endless]], tmp_path: Path
) -> None:
    url, handler = endless
    handler.announce = 10 << 20
    dest = tmp_path / f"sha256-{'6' * 64}"
    with pytest.raises(DownloadError, match="announces 10485760 bytes, more than the expected 1048576"):
        download_verified(url, dest, Digest.parse(f"sha256:{'6' * 64}"), session=new_session(), size=1 << 20)
    assert list(tmp_path.iterdir()) == []


# -- network failures and endless bodies -------------------------------------------------------------------------------


# Network failures read as one human line.


def test_connection_refused_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        url = f"http://127.0.0.1:{port}/SHA512SUMS"
        with pytest.raises(DownloadError) as info:
            fetch_bytes(url, session=new_session(), policy=RetryPolicy(attempts=2, backoff=0.01))
    message = str(info.value)
    assert (
        message == f"cannot download {url}: cannot connect to 127.0.0.1: connection refused (gave up after 2 attempts)"
    )
    assert info.value.hint and "--mirror" in info.value.hint and "--source aleph" in info.value.hint


def test_name_resolution_failure_is_one_line() -> None:
    # urllib3's own exception chain for an unresolvable host, as requests raises it (built offline: no DNS query).
    pool = urllib3.HTTPSConnectionPool("cloud.debian.org", 443)
    conn = urllib3.connection.HTTPSConnection("cloud.debian.org", 443)
    reason = urllib3.exceptions.NameResolutionError("cloud.debian.org", conn, socket.gaierror(-2, "Name unknown"))
    exc = requests.ConnectionError(urllib3.exceptions.MaxRetryError(pool, "/x", reason))
    url = "https://cloud.debian.org/images/cloud/bookworm/latest/SHA512SUMS"
    assert _network_error(url, exc) == "cannot resolve cloud.debian.org (no network or DNS?)"
    assert "HTTPSConnectionPool" in str(exc)  # what the user used to see


def test_an_endless_body_of_an_image_without_a_size_stops_at_the_cap(mirror: Mirror, tmp_path: Path) -> None:
    from qemu_instances.digests import Digest
    from qemu_instances.download import download_verified

    mirror.server.endless("/endless.img")
    (tmp_path / "dl").mkdir()
    dest = tmp_path / "dl" / "sha256-x"
    with pytest.raises(
        DownloadError, match=r"sent more than 8 MiB, qinst's limit for an image whose size is not known"
    ):
        download_verified(
            f"{mirror.url}/endless.img", dest, Digest.parse("sha256:" + "1" * 64),
            session=new_session(), policy=FAST, limit=8 << 20,
        )  # fmt: skip
    assert list((tmp_path / "dl").iterdir()) == []


@pytest.mark.promise
def test_an_image_without_a_size_announcing_more_than_the_cap_is_refused_before_its_bytes(
    mirror: Mirror, tmp_path: Path
) -> None:
    from qemu_instances.digests import Digest
    from qemu_instances.download import download_verified

    body = os.urandom(3 << 20)
    mirror.server.add("/big.img", body)
    (tmp_path / "dl").mkdir()
    progress: list[int] = []
    with pytest.raises(DownloadError, match=r"announces 3145728 bytes, more than 1 MiB, qinst's limit") as err:
        download_verified(
            f"{mirror.url}/big.img", tmp_path / "dl" / "sha256-x", Digest.parse("sha256:" + "1" * 64),
            session=new_session(), policy=FAST, limit=1 << 20, progress=lambda done, total: progress.append(done),
        )  # fmt: skip
    assert "nothing was cached" in (err.value.hint or "")
    assert progress == [] and list((tmp_path / "dl").iterdir()) == []  # not a byte of it was written
