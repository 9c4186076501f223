"""One exception tree for qinst. Each class carries the exit code the CLI returns for it.

QinstError                 exit 1  unexpected failure
├── UsageError             exit 2  bad input: options, names, files the user gave
├── ImageError             exit 3  image not found, download failed, digest mismatch
│   ├── CatalogError               malformed catalog, unknown image name
│   ├── DownloadError              HTTP/network failure after retries
│   └── DigestMismatch             the bytes are not the ones pinned
├── ConfigError            exit 3  malformed config file (like a malformed catalog)
├── HypervisorError        exit 4  libvirt unreachable, define/start failed
├── GuestTimeout           exit 5  the guest did not become ready in time
├── GuestFailed            exit 5  the guest failed while booting (panic, paused, cloud-init errors)
├── SmokeFailed            exit 6  smoke checks failed
└── Interrupted            exit 130  Ctrl-C (Terminated: exit 143, SIGTERM)
"""

from __future__ import annotations


class QinstError(Exception):
    """Base class: a message for the user, an optional hint with the fix, and an exit code."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(QinstError):
    exit_code = 2


class ImageError(QinstError):
    exit_code = 3


class CatalogError(ImageError):
    pass


class DownloadError(ImageError):
    def __init__(self, message: str, *, hint: str | None = None, status: int | None = None) -> None:
        super().__init__(message, hint=hint)
        self.status = status  # the HTTP status, when the server answered with an error


class DigestMismatch(ImageError):
    def __init__(self, url: str, expected: str, actual: str) -> None:
        super().__init__(
            f"digest mismatch for {url}: expected {expected}, got {actual}",
            hint="nothing was cached; the file on the server is not the pinned one",
        )
        self.url = url
        self.expected = expected
        self.actual = actual


class ConfigError(QinstError):
    exit_code = 3


class HypervisorError(QinstError):
    exit_code = 4


class GuestTimeout(QinstError):
    exit_code = 5


class GuestFailed(QinstError):
    exit_code = 5


class SmokeFailed(QinstError):
    exit_code = 6


class Interrupted(QinstError):
    """Ctrl-C (SIGINT), or a run being stopped."""

    exit_code = 130


class Terminated(Interrupted):
    """SIGTERM: handled like Ctrl-C, with the shell's exit status for it."""

    exit_code = 143
