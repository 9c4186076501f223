"""The guest's serial console as text: the protocol the readiness wait reads, and its file-backed form."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


class Console(Protocol):
    """The serial console's text so far; read() returns all of it, including what arrived since the last call."""

    text: str

    def read(self) -> str: ...

    def tail(self, n: int = 20) -> str: ...

    def close(self) -> None: ...


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

    def read(self) -> str:
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return self.text
        self._offset += len(chunk)
        self.text += chunk.decode("utf-8", "replace")
        return self.text

    def tail(self, n: int = 20) -> str:
        return tail_lines(self.text, n)

    def close(self) -> None:
        pass
