"""console.py: the console log as read during a boot, with bytes that are not UTF-8."""

from __future__ import annotations

from pathlib import Path

from qemu_instances.wait import ConsoleLog


def test_console_log_keeps_a_character_split_between_reads(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"caf\xc3")
    console = ConsoleLog(log)
    console.read()
    with log.open("ab") as f:
        f.write(b"\xa9 \xff done\n")
    assert console.read() == "café \ufffd done\n"
