"""qinst's log (`logging.getLogger("qinst")`), with the logging package imported on its first use.

Most runs log nothing (`ls`, `images`, a cached `up --no-wait` that goes well), and `import logging` (with
traceback, linecache, tokenize, string) is ~0.005 s of every start. Modules write `from qemu_instances.logs import
log` and call `log.info(...)` as on a Logger; the CLI's `configure` (its handler and level) is applied when the
logger is first used, or at once when logging is already imported.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import logging

NAME = "qinst"
_debug: bool | None = None  # what the CLI asked for; None: the logger stays as the embedding program set it
_applied = True


def configure(debug: bool) -> None:
    """The CLI's set-up: one line per message on stderr (`qinst: ...`, `qinst: warning: ...`), INFO or DEBUG."""
    global _debug, _applied
    _debug, _applied = debug, False
    if "logging" in sys.modules:
        logger()


def debugging() -> bool:
    """Did the CLI ask for debug output (--debug)?"""
    return bool(_debug)


def logger() -> logging.Logger:
    """The logger itself, with the CLI's set-up applied on first use."""
    global _applied
    import logging

    found = logging.getLogger(NAME)
    if not _applied:
        _applied = True

        class OneLine(logging.Formatter):
            def format(self, record: logging.LogRecord) -> str:
                prefix = "qinst: warning: " if record.levelno >= logging.WARNING else "qinst: "
                return prefix + record.getMessage()

        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(OneLine())
        found.handlers[:] = [handler]
        found.setLevel(logging.DEBUG if _debug else logging.INFO)
        found.propagate = False
    return found


class _Log:
    """Stands for the Logger: each attribute is the real logger's."""

    def __getattr__(self, name: str) -> Any:
        return getattr(logger(), name)


log = cast("logging.Logger", _Log())
