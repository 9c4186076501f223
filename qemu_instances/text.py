"""Text that reaches a terminal or a report: one filter for everything qinst did not write itself."""

from __future__ import annotations

import codecs
import unicodedata


def printable(text: str) -> str:
    """text without control characters and terminal escapes (C0, C1, DEL, bidi overrides and other format
    characters): a domain name, a cached image's record or a catalog title cannot move the cursor, recolour the
    terminal or reverse what follows it."""
    return "".join(ch for ch in text if unicodedata.category(ch) not in ("Cc", "Cf"))


def printable_lines(text: str) -> str:
    """printable() of each line, the line breaks kept (an error that quotes a console's last lines)."""
    return "\n".join(printable(line) for line in text.split("\n"))


def utf8_decoder() -> codecs.IncrementalDecoder:
    """A decoder for a byte stream from a guest or a tool: never fails (not UTF-8 becomes U+FFFD), and keeps a
    character split between two reads whole."""
    return codecs.getincrementaldecoder("utf-8")("replace")


def tail_lines(text: str, n: int = 20) -> str:
    """The last n non-blank lines of console text, without carriage returns."""
    lines = [line.rstrip("\r") for line in text.splitlines() if line.strip()]
    return "\n".join(lines[-n:])
