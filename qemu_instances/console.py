"""The guest's serial console as text: the protocol the readiness wait reads, and its file-backed form."""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


class Console(Protocol):
    """The serial console's text so far; read() returns all of it, including what arrived since the last call."""

    text: str

    def read(self) -> str: ...

    def tail(self, n: int = 20) -> str: ...

    def close(self) -> None: ...


CONSOLE_LIMIT = 8 << 20  # bytes of a boot's console that readiness reads (README, "Reliability: limits"); a
# normal boot prints a few hundred KiB: a guest that floods its console before it is ready times out


def utf8_decoder() -> codecs.IncrementalDecoder:
    """A decoder for a console's byte stream: never fails, and keeps a character split between two reads whole."""
    return codecs.getincrementaldecoder("utf-8")("replace")


def tail_lines(text: str, n: int = 20) -> str:
    """The last n non-blank lines of console text, without carriage returns."""
    lines = [line.rstrip("\r") for line in text.splitlines() if line.strip()]
    return "\n".join(lines[-n:])


@dataclass
class ConsoleLog:
    """The serial console as recorded to a file by virtlogd (local daemons), read incrementally."""

    path: Path
    text: str = ""
    _offset: int = 0
    # Bytes that are not UTF-8 become U+FFFD; a character split between two reads is kept whole.
    _decoder: codecs.IncrementalDecoder = field(default_factory=lambda: utf8_decoder())

    def read(self) -> str:
        room = CONSOLE_LIMIT - self._offset
        if room <= 0:
            return self.text
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                chunk = f.read(room)
        except FileNotFoundError:
            return self.text
        self._offset += len(chunk)
        self.text += self._decoder.decode(chunk)
        return self.text

    def tail(self, n: int = 20) -> str:
        return tail_lines(self.text, n)

    def close(self) -> None:
        pass
