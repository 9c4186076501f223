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
└── Interrupted            exit 130  Ctrl-C (Terminated: exit 143, SIGTERM; HungUp: exit 129, SIGHUP)

The one signal path: `handle_signals()` makes SIGTERM and SIGHUP raise `Signalled` where Ctrl-C raises
KeyboardInterrupt (Signalled is one), so what a command made is undone the same way whatever stopped it; `as_error`
maps any exception, signals included, to the QinstError that carries its message and exit code.
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


class HungUp(Interrupted):
    """SIGHUP (the terminal went away): handled like Ctrl-C, with the shell's exit status for it."""

    exit_code = 129


class Signalled(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where Ctrl-C's KeyboardInterrupt would be (CI cancels a job with SIGTERM)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_signalled(signum: int, _frame: object) -> None:
    raise Signalled(signum)


def handle_signals() -> None:
    """SIGTERM and SIGHUP raise Signalled in the main thread from now on (SIGINT keeps Python's KeyboardInterrupt)."""
    import signal

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_signalled)


def as_error(exc: BaseException) -> QinstError:
    """Any exception as the QinstError that carries its message and exit code (the one path to an exit code)."""
    if isinstance(exc, QinstError):
        return exc
    interrupt = exc if isinstance(exc, KeyboardInterrupt) else exc.__cause__ or exc.__context__
    if isinstance(interrupt, Signalled):
        import signal

        if interrupt.signum == signal.SIGHUP:
            return HungUp("hung up (SIGHUP)")
        return Terminated("terminated (SIGTERM)")
    if isinstance(interrupt, KeyboardInterrupt):
        return Interrupted("interrupted")  # also Ctrl-C inside a C call (libvirt), surfacing as a SystemError
    return QinstError(f"unexpected failure: {type(exc).__name__}: {exc}", hint="run again with --debug for a traceback")
