"""Verified HTTP downloads: streamed, hashed in the same pass, resumed with Range, retried with backoff."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from qemu_instances import __version__
from qemu_instances.digests import Digest
from qemu_instances.errors import DigestMismatch, DownloadError

log = logging.getLogger("qinst")

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


def _check_status(response: requests.Response, url: str) -> None:
    if response.status_code in _TRANSIENT_STATUS:
        raise _Transient(f"HTTP {response.status_code}")
    if response.status_code >= 400:
        raise DownloadError(
            f"cannot download {url}: HTTP {response.status_code} {response.reason}", status=response.status_code
        )


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
            failures = 1 if done() > seen else failures + 1
            seen = done()
            if failures >= policy.attempts:
                raise DownloadError(f"cannot download {url}: {exc} (gave up after {failures} attempts)") from exc
            delay = min(policy.backoff * 2 ** (failures - 1), policy.max_backoff)
            log.debug("download of %s failed (%s); retrying in %.1f s", url, exc, delay)
            time.sleep(delay)
        except requests.RequestException as exc:
            raise DownloadError(f"cannot download {url}: {exc}") from exc


def fetch_bytes(
    url: str, *, session: requests.Session, policy: RetryPolicy = RetryPolicy(), limit: int = 16 << 20
) -> bytes:
    """A small document (checksum file, API answer), retried like a download."""

    def attempt() -> bytes:
        with session.get(url, timeout=policy.timeout, stream=True) as response:
            _check_status(response, url)
            body = bytearray()
            for chunk in response.iter_content(65536):
                body += chunk
                if len(body) > limit:
                    raise DownloadError(f"{url} is larger than {limit} bytes; refusing it")
            return bytes(body)

    result: bytes = _with_retries(url, policy, attempt)
    return result


class _Partial:
    """The temporary file of a download in progress, with the digest of the bytes written so far."""

    def __init__(self, path: Path, digest: Digest) -> None:
        self.path = path
        self.algorithm = digest.algorithm
        self.hasher = digest.algorithm.new()
        self.size = 0
        if path.exists():
            # A download interrupted earlier: hash what is there so we can resume after it.
            with path.open("rb") as f:
                while chunk := f.read(CHUNK):
                    self.hasher.update(chunk)
                    self.size += len(chunk)

    def restart(self) -> None:
        self.path.unlink(missing_ok=True)
        self.hasher = self.algorithm.new()
        self.size = 0


def download_verified(
    url: str,
    dest: Path,
    digest: Digest,
    *,
    session: requests.Session,
    progress: Progress | None = None,
    policy: RetryPolicy = RetryPolicy(),
) -> int:
    """Download url to dest, verifying digest; dest appears only when complete and verified. Returns the size.

    The bytes go to a hidden sibling ".<name>.part" that a later call resumes; the caller holds the lock.
    """
    part = _Partial(dest.with_name(f".{dest.name}.part"), digest)
    total: int | None = None

    def attempt() -> None:
        nonlocal total
        headers = {"Range": f"bytes={part.size}-"} if part.size else {}
        with session.get(url, headers=headers, stream=True, timeout=policy.timeout) as response:
            if response.status_code == 416 and part.size:
                # Our partial file is already as long as the server's: verify it below.
                return
            _check_status(response, url)
            if part.size and response.status_code != 206:
                log.debug("%s ignored the Range request; starting over", url)
                part.restart()
            length = response.headers.get("Content-Length")
            total = part.size + int(length) if length and length.isdigit() else None
            with part.path.open("ab") as f:
                for chunk in response.iter_content(CHUNK):
                    f.write(chunk)
                    part.hasher.update(chunk)
                    part.size += len(chunk)
                    if progress:
                        progress(part.size, total)
            if total is not None and part.size < total:
                raise _Transient(f"connection closed after {part.size} of {total} bytes")

    # On DownloadError the partial file stays, and the next pull resumes it.
    _with_retries(url, policy, attempt, done=lambda: part.size)
    actual = Digest(digest.algorithm, part.hasher.hexdigest())
    if actual != digest:
        part.path.unlink(missing_ok=True)
        raise DigestMismatch(url, str(digest), str(actual))
    with part.path.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(part.path, dest)
    return part.size
