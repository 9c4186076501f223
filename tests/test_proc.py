"""proc.py: the one process runner. Output is capped (a flooding child is stopped, what it printed is kept), a
child is always ended (terminate, then kill), and a timeout or a cancellation stops it."""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qemu_instances import proc
from qemu_instances.errors import ImageError, QinstError
from qemu_instances.proc import run


def test_run_returns_text_and_raises_with_the_command_and_its_last_line() -> None:
    assert proc.run(["sh", "-c", "echo out; echo err >&2"]).stdout == "out\n"
    with pytest.raises(ImageError, match=r"sh -c echo one >&2; echo two >&2; exit 3 failed: two"):
        proc.run(["sh", "-c", "echo one >&2; echo two >&2; exit 3"], error=ImageError)
    assert proc.run(["sh", "-c", "exit 4"], check=False).returncode == 4


def test_a_missing_program_is_said_with_its_package() -> None:
    with pytest.raises(QinstError, match="qinst-no-such-tool not found") as err:
        proc.run(["qinst-no-such-tool"], hint="install it")
    assert err.value.hint == "install it"


def test_children_read_messages_in_a_language_qinst_understands() -> None:
    assert proc.run(["sh", "-c", 'echo "$LANG $LC_ALL"']).stdout == "C.UTF-8 C.UTF-8\n"


def test_a_flood_is_stopped_at_the_cap_and_memory_stays_bounded() -> None:
    """A child printing without end (a hostile guest behind ssh): stopped once its output passes the cap."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    with proc.spawn(["yes", "x" * 1000]) as child:
        out = proc.collect(child, timeout=60, limit=8 << 20)
    assert out.overflow and out.returncode is None
    assert len(out.stdout) == 8 << 20
    assert time.monotonic() - started < 30
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before  # KiB
    assert grown < 64 << 10, f"memory grew by {grown} KiB reading a capped flood"
    with pytest.raises(QinstError, match="printed more than 1024 bytes; stopped"):
        proc.run(["yes"], limit=1024)
    assert proc.try_run(["yes"], timeout=10, limit=1024) is None


@pytest.mark.promise
@pytest.mark.parametrize("argv", [["yes"], ["sh", "-c", "head -c 5000 /dev/zero; exit 3"]])
def test_output_past_its_cap_raises_even_with_check_false(argv: list[str]) -> None:
    """check=False returns a non-zero exit status, never output cut at the cap as if it were the whole answer."""
    with pytest.raises(QinstError, match="printed more than 1024 bytes; stopped"):
        proc.run(argv, limit=1024, check=False)


def test_stderr_has_its_own_cap() -> None:
    with proc.spawn(["sh", "-c", "yes >&2"]) as child:
        out = proc.collect(child, timeout=30, limit=1 << 20, stderr_limit=4096)
    assert out.overflow and len(out.stderr) == 4096 and out.stdout == b""


def test_a_timeout_stops_the_child_and_says_so() -> None:
    started = time.monotonic()
    with pytest.raises(QinstError, match=r"did not finish within 0\.5 s"):
        proc.run(["sleep", "30"], timeout=0.5)
    assert time.monotonic() - started < 10
    assert proc.try_run(["sleep", "30"], timeout=0.5) is None


def test_a_cancelled_collection_kills_the_child() -> None:
    with proc.spawn(["sleep", "30"]) as child:
        started = time.monotonic()
        out = proc.collect(child, timeout=None, cancelled=lambda: time.monotonic() - started > 0.3)
        assert out.cancelled and child.poll() is not None


def test_spawn_ends_a_child_that_ignores_sigterm(tmp_path: Path) -> None:
    script = tmp_path / "stubborn.py"
    script.write_text("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('up', flush=True)\n"
                      "time.sleep(60)\n")  # fmt: skip
    with proc.spawn([sys.executable, str(script)]) as child:
        assert child.stdout is not None and child.stdout.readline() == b"up\n"
        started = time.monotonic()
    assert child.returncode == -9  # killed after the grace period
    assert time.monotonic() - started < proc.GRACE + 5


def test_spawn_ends_its_child_when_the_body_fails() -> None:
    with pytest.raises(RuntimeError), proc.spawn(["sleep", "30"]) as child:
        raise RuntimeError("the body failed")
    assert child.poll() is not None


def test_input_reaches_the_child() -> None:
    assert proc.run(["cat"], input=b"hello").stdout == "hello"


def test_nothing_else_in_the_package_starts_processes() -> None:
    """One lifecycle: no module but proc.py imports subprocess to start a child (the structure test checks imports)."""
    root = Path(proc.__file__).parent
    users = sorted(
        p.name
        for p in root.glob("*.py")
        if p.name != "proc.py" and ("subprocess.Popen(" in p.read_text() or "subprocess.run(" in p.read_text())
    )
    assert users == []
    assert subprocess.DEVNULL  # proc.py's callers may name its constants


def test_run_decodes_undecodable_output_with_replacement() -> None:
    proc = run([sys.executable, "-c", "import sys; sys.stdout.buffer.write(b'a\\xff\\xfeb'); sys.exit(0)"])
    assert proc.stdout == "a\ufffd\ufffdb"
