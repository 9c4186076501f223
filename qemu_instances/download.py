"""Verified HTTP downloads: streamed, hashed in the same pass, resumed with Range, retried with backoff."""

from __future__ import annotations

import errno
import os
import queue
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

import requests
import urllib3

from qemu_instances import __version__
from qemu_instances.digests import Digest
from qemu_instances.errors import DigestMismatch, DownloadError
from qemu_instances.files import replace_durably
from qemu_instances.logs import log

Progress = Callable[[int, int | None], None]
"""Called with (bytes done, total bytes or None) as a download advances."""

CHUNK = 1 << 20
_TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}
_TRANSIENT_ERRORS = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5  # consecutive failures without progress before giving up
    backoff: float = 0.5  # seconds, doubled after each failure
    max_backoff: float = 8.0
    timeout: tuple[float, float] = (10.0, 60.0)  # connect, read


def new_session() -> requests.Session:
    session = requests.Session()
    session.headers["User-Agent"] = f"qinst/{__version__}"
    return session


class _Transient(Exception):
    """A failure worth retrying (connection cut, 5xx, timeout)."""


class _TooLong(Exception):
    """The body is longer than the file can be: not retried, and the partial file is dropped."""


def _check_status(response: requests.Response, url: str) -> None:
    if response.status_code in _TRANSIENT_STATUS:
        raise _Transient(f"HTTP {response.status_code}")
    if response.status_code >= 400:
        raise DownloadError(
            f"cannot download {url}: HTTP {response.status_code} {response.reason}", status=response.status_code
        )


_NETWORK_HINT = "use --mirror URL, --source aleph, or a local image file"


def _network_error(url: str, exc: Exception) -> str:
    """One human line for a connection failure, instead of urllib3's repr of a pool and its retries."""
    host = urlsplit(url).hostname or url
    causes = _causes(exc)
    if any(isinstance(e, urllib3.exceptions.NameResolutionError) for e in causes):
        return f"cannot resolve {host} (no network or DNS?)"
    if isinstance(exc, requests.Timeout):
        return f"{host} did not answer in time"
    if any(isinstance(e, ConnectionRefusedError) for e in causes):
        return f"cannot connect to {host}: connection refused"
    if isinstance(exc, requests.exceptions.SSLError):
        return f"TLS failure talking to {host} (certificate not trusted?)"
    if isinstance(exc, requests.ConnectionError):
        return f"cannot connect to {host} (no network?)"
    return f"connection to {host} broken: {type(exc).__name__}"


def _unresolvable(exc: BaseException) -> bool:
    return any(isinstance(e, urllib3.exceptions.NameResolutionError) for e in _causes(exc))


def _causes(exc: BaseException) -> list[BaseException]:
    """exc and what it wraps, outermost first: urllib3's reason for giving up, an exception's cause, or the
    exception requests wraps (its first argument)."""
    chain: list[BaseException] = []
    current: object = exc
    while isinstance(current, BaseException) and current not in chain:
        chain.append(current)
        current = getattr(current, "reason", None) or current.__cause__ or next(iter(current.args), None)
    return chain


def _with_retries(
    url: str, policy: RetryPolicy, attempt: Callable[[], Any], done: Callable[[], int] = lambda: 0
) -> Any:
    """Call attempt() until it succeeds; retry transient failures, counting afresh whenever done() advanced."""
    failures = 0
    seen = done()
    while True:
        try:
            return attempt()
        except (_Transient, *_TRANSIENT_ERRORS) as exc:
            if _unresolvable(exc):  # no DNS answer: trying again in a few seconds changes nothing
                raise DownloadError(f"cannot download {url}: {_network_error(url, exc)}", hint=_NETWORK_HINT) from exc
            failures = 1 if done() > seen else failures + 1
            seen = done()
            if failures >= policy.attempts:
                if isinstance(exc, _Transient):
                    raise DownloadError(f"cannot download {url}: {exc} (gave up after {failures} attempts)") from exc
                raise DownloadError(
                    f"cannot download {url}: {_network_error(url, exc)} (gave up after {failures} attempts)",
                    hint=_NETWORK_HINT,
                ) from exc
            delay = min(policy.backoff * 2 ** (failures - 1), policy.max_backoff)
            log.debug("download of %s failed (%s); retrying in %.1f s", url, exc, delay)
            time.sleep(delay)
        except requests.RequestException as exc:
            raise DownloadError(f"cannot download {url}: {exc}") from exc


class Redirects(StrEnum):
    """Where a small document may be redirected to. Its bytes are trusted as they arrive (a checksum file, a
    signature), so the hops matter: they are followed one by one and each is checked before it is asked."""

    ANY = "any"  # an API answer verified by hash afterwards
    HTTPS = "https"  # never from https:// down to http:// (a signed checksum file and its signature)
    SAME_HOST = "same-host"  # and never to another host (an unsigned checksum file: HTTPS to its host is its trust)


MAX_REDIRECTS = 5


def _next_hop(url: str, location: str | None, rule: Redirects, first: str) -> str:
    from urllib.parse import urljoin

    if not location:
        raise DownloadError(f"cannot download {first}: a redirect without a Location")
    target = urljoin(url, location)
    here, there, origin = urlsplit(url), urlsplit(target), urlsplit(first)
    if there.scheme not in ("http", "https"):
        raise DownloadError(f"refusing a redirect of {first} to {target[:200]}: not http(s)")
    if rule is not Redirects.ANY and here.scheme == "https" and there.scheme != "https":
        raise DownloadError(
            f"refusing a redirect of {first} to {target[:200]}: it leaves HTTPS",
            hint="a checksum file or signature is only read over the scheme it was asked with",
        )
    if rule is Redirects.SAME_HOST and (there.hostname, there.port) != (origin.hostname, origin.port):
        raise DownloadError(
            f"refusing a redirect of {first} to {target[:200]}: an unsigned checksum file is read from "
            f"{origin.hostname} only",
            hint="its only trust is HTTPS to the entry's own upstream host",
        )
    return target


def fetch_bytes(
    url: str,
    *,
    session: requests.Session,
    policy: RetryPolicy = RetryPolicy(),
    limit: int = 16 << 20,
    redirects: Redirects = Redirects.ANY,
) -> bytes:
    """A small document (checksum file, API answer, signature) of at most `limit` bytes, retried like a download;
    each redirect is checked against `redirects` before it is followed."""

    def attempt() -> bytes:
        target = url
        for _ in range(MAX_REDIRECTS + 1):
            with session.get(target, timeout=policy.timeout, stream=True, allow_redirects=False) as response:
                if response.is_redirect:
                    target = _next_hop(target, response.headers.get("Location"), redirects, url)
                    continue
                _check_status(response, url)
                body = bytearray()
                for chunk in response.iter_content(65536):
                    body += chunk
                    if len(body) > limit:
                        raise DownloadError(f"{url} is larger than {limit} bytes; refusing it")
                return bytes(body)
        raise DownloadError(f"cannot download {url}: more than {MAX_REDIRECTS} redirects")

    result: bytes = _with_retries(url, policy, attempt)
    return result


MAX_UNSIZED = 4 << 30  # bytes: the most an image without a known size may take (README, "Trust")


def _unsized(limit: int) -> str:
    return f"{limit >> 20} MiB, qinst's limit for an image whose size is not known (give its size in a catalog entry)"


_HASH_QUEUE = 8  # chunks in flight to the hashing thread: bounds the memory this takes to 8 * CHUNK
_CONTENT_RANGE = re.compile(r"bytes (\d+)-\d+/(?:\d+|\*)$")


class _Partial:
    """The temporary file of a download in progress, with the digest of the bytes written to it so far.

    Hashing runs on a worker thread, overlapping the receiving and writing of the next chunks: hashlib releases the
    GIL, and sha512 costs about as much CPU as everything else in a download together.
    """

    def __init__(self, path: Path, expected: Digest) -> None:
        self.path = path
        self.algorithm = expected.algorithm
        self.size = 0
        self._new_hash = expected.hasher  # a hashlib object, or a UnixfsHasher for a CID
        self._hash = self._new_hash()
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=_HASH_QUEUE)
        self._thread = threading.Thread(target=self._hash_chunks, name="qinst-hash", daemon=True)

    def __enter__(self) -> _Partial:
        self._thread.start()
        try:
            try:
                f = self.open(os.O_RDONLY)
            except FileNotFoundError:
                return self
            # A download interrupted earlier: hash what is there so we can resume after it.
            with f:
                while chunk := f.read(CHUNK):
                    self._queue.put(chunk)
                    self.size += len(chunk)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._queue.put(None)
        self._thread.join()

    def _hash_chunks(self) -> None:
        while True:
            chunk = self._queue.get()
            try:
                if chunk is None:
                    return
                self._hash.update(chunk)
            finally:
                self._queue.task_done()

    def open(self, flags: int) -> BinaryIO:
        """The partial file, never through a symlink (O_NOFOLLOW): a planted link must not be appended to."""
        try:
            fd = os.open(self.path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            raise
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise DownloadError(
                    f"refusing to write {self.path}: it is a symbolic link, not qinst's partial download",
                    hint="remove it (qinst prune does)",
                ) from exc
            raise DownloadError(f"cannot open {self.path}: {exc.strerror}") from exc
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise DownloadError(f"refusing to write {self.path}: not a regular file", hint="remove it")
        return os.fdopen(fd, "rb" if flags == os.O_RDONLY else "ab")

    def append(self, f: BinaryIO, chunk: bytes) -> None:
        try:
            f.write(chunk)
        except OSError as exc:
            raise DownloadError(f"cannot write {self.path}: {exc.strerror}") from exc
        self._queue.put(chunk)
        self.size += len(chunk)

    def restart(self) -> None:
        self._queue.join()
        self.path.unlink(missing_ok=True)
        self._hash = self._new_hash()
        self.size = 0

    def digest(self) -> Digest:
        self._queue.join()
        return Digest(self.algorithm, self._hash.hexdigest())


def _chunks(response: requests.Response, *, decode: bool) -> Iterator[bytes]:
    """The body as it arrives. read1() hands over every byte received before a connection drops (urllib3's read(n)
    discards up to n bytes then), so a resumed download starts exactly where the bytes stopped."""
    read1 = getattr(response.raw, "read1", None)
    if read1 is None:  # urllib3 < 2: requests translates its errors
        yield from response.iter_content(CHUNK)
        return
    # Reading response.raw bypasses requests, so translate urllib3's errors here as iter_content() would. Decode
    # only what the server encoded: urllib3's decoding path copies every chunk once more.
    try:
        while chunk := read1(CHUNK, decode_content=decode):
            yield chunk
    except (urllib3.exceptions.ProtocolError, urllib3.exceptions.ReadTimeoutError) as exc:
        raise _Transient(f"connection broken: {exc}") from exc
    except urllib3.exceptions.HTTPError as exc:
        raise requests.RequestException(str(exc)) from exc


def download_verified(
    url: str,
    dest: Path,
    digest: Digest,
    *,
    session: requests.Session,
    progress: Progress | None = None,
    policy: RetryPolicy = RetryPolicy(),
    check: Callable[[Path], None] | None = None,
    size: int | None = None,
    limit: int = MAX_UNSIZED,
) -> int:
    """Download url to dest, verifying digest; dest appears only when complete and verified. Returns the size.

    The bytes go to a hidden sibling ".<name>.part" that a later call resumes; the caller holds the lock.
    check(path), if given, inspects the verified file before it takes its name; if it raises, nothing is kept.
    size, if given, is the file's expected size: a body that goes past it (or past its Content-Length) stops at
    once, and nothing is kept. Without one, `limit` bounds the download the same way (a server sending an endless
    body fills no disk).
    """
    with _Partial(dest.with_name(f".{dest.name}.part"), digest) as part:
        total: int | None = None

        def attempt() -> None:
            nonlocal total
            # identity: Range offsets and the digest are about the file's bytes, not a compressed rendering of them.
            headers = {"Accept-Encoding": "identity"}
            if part.size:
                headers["Range"] = f"bytes={part.size}-"
            with session.get(url, headers=headers, stream=True, timeout=policy.timeout) as response:
                if response.status_code == 416 and part.size:
                    # Nothing left to send: either the partial file is complete, or it is not this file's start.
                    if part.digest() == digest:
                        return
                    part.restart()
                    raise _Transient("the partial download does not fit the file on the server (HTTP 416)")
                _check_status(response, url)
                # A server may compress despite "identity": then lengths and ranges count compressed bytes.
                encoded = response.headers.get("Content-Encoding", "identity").lower() != "identity"
                if part.size and response.status_code != 206:
                    log.warning(
                        "%s cannot resume a download (it ignores Range); downloading it again from the start", url
                    )
                    part.restart()
                elif response.status_code == 206:
                    match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
                    if encoded or not match or int(match[1]) != part.size:
                        got = response.headers.get("Content-Range")
                        part.restart()
                        raise _Transient(f"unusable answer to a Range request (Content-Range {got!r}); starting over")
                length = response.headers.get("Content-Length")
                total = part.size + int(length) if length and length.isdigit() and not encoded else None
                if size is not None and total is not None and total > size:
                    raise _TooLong(f"{url} announces {total} bytes, more than the expected {size}")
                if size is None and total is not None and total > limit:
                    raise _TooLong(f"{url} announces {total} bytes, more than {_unsized(limit)}")
                # The first bound a body can pass: the pinned size, else the announced length, else qinst's limit.
                bound, what = (size, f"the expected {size} bytes") if size is not None else (limit, _unsized(limit))
                if total is not None and total < bound:
                    bound, what = total, f"its announced {total} bytes"
                with part.open(os.O_WRONLY | os.O_APPEND | os.O_CREAT) as f:
                    for chunk in _chunks(response, decode=encoded):
                        if part.size + len(chunk) > bound:
                            raise _TooLong(f"{url} sent more than {what}; stopped")
                        part.append(f, chunk)
                        if progress:
                            progress(part.size, total)
                if total is not None and part.size < total:
                    raise _Transient(f"connection closed after {part.size} of {total} bytes")

        # On DownloadError the partial file stays, and the next pull resumes it.
        try:
            _with_retries(url, policy, attempt, done=lambda: part.size)
        except _TooLong as exc:
            part.restart()
            raise DownloadError(str(exc), hint="nothing was cached; the server does not serve the pinned file") from exc
        actual = part.digest()
        size = part.size
    if actual != digest:
        part.path.unlink(missing_ok=True)
        raise DigestMismatch(url, str(digest), str(actual))
    if check is not None:
        try:
            check(part.path)
        except Exception:
            part.path.unlink(missing_ok=True)
            raise
    replace_durably(part.path, dest)
    return size
