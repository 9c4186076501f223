"""Text that reaches a terminal or a report: one filter for everything qinst did not write itself."""

from __future__ import annotations

import unicodedata


def printable(text: str) -> str:
    """text without control characters and terminal escapes (C0, C1, DEL, bidi overrides and other format
    characters): a domain name, a cached image's record or a catalog title cannot move the cursor, recolour the
    terminal or reverse what follows it."""
    return "".join(ch for ch in text if unicodedata.category(ch) not in ("Cc", "Cf"))


def printable_lines(text: str) -> str:
    """printable() of each line, the line breaks kept (an error that quotes a console's last lines)."""
    return "\n".join(printable(line) for line in text.split("\n"))
