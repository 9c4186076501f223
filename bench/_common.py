"""Helpers for the benchmarks: a fast local file server, timed child processes, summary statistics."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

_RANGE = re.compile(r"bytes=(\d+)-$")


class _FileHandler(BaseHTTPRequestHandler):
    """GET of a file under the server's root with the kernel's sendfile (no copy through Python), Range-aware."""

    protocol_version = "HTTP/1.1"
    root: Path

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        path = (self.root / self.path.lstrip("/")).resolve()
        if not path.is_file() or self.root not in path.parents:
            self.send_error(404)
            return
        size = path.stat().st_size
        start = 0
        match = _RANGE.match(self.headers.get("Range") or "")
        if match and int(match[1]) < size:
            start = int(match[1])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        else:
            self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size - start))
        self.end_headers()
        self.wfile.flush()
        with path.open("rb") as f:
            offset = start
            while offset < size:
                sent = os.sendfile(self.connection.fileno(), f.fileno(), offset, size - offset)
                if sent == 0:
                    break
                offset += sent


def _serve(sock: socket.socket, root: Path) -> None:
    handler = type("Handler", (_FileHandler,), {"root": root})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    server.daemon_threads = True
    server.serve_forever()


@contextmanager
def file_server(root: Path) -> Iterator[str]:
    """Serve root on 127.0.0.1 from a separate process (so it never competes for the client's GIL); yield its URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    port = sock.getsockname()[1]
    process = multiprocessing.get_context("fork").Process(target=_serve, args=(sock, root.resolve()), daemon=True)
    process.start()
    sock.close()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.join(5)


@dataclass(frozen=True)
class Timed:
    seconds: float
    cpu_seconds: float  # user + system time of the child
    max_rss_kib: int  # peak resident set of the child, from wait4()
    stdout: str


def timed(argv: Sequence[str | os.PathLike[str]], env: dict[str, str] | None = None) -> Timed:
    """Run argv, wall-clock it and take its own peak RSS (not that of other children); raise on failure."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [os.fspath(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env
    )
    out, err = b"", b""
    assert proc.stdout is not None and proc.stderr is not None
    # Small outputs only: read them to EOF, then reap the child with its rusage.
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed ({proc.returncode}): {err.decode(errors='replace')}")
    return Timed(seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss, out.decode())


@dataclass(frozen=True)
class Summary:
    median: float
    minimum: float
    maximum: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        return cls(statistics.median(values), min(values), max(values))


def write_random_file(path: Path, mib: int) -> None:
    block = os.urandom(1 << 20)
    with path.open("wb") as f:
        for i in range(mib):
            # Vary every block so no layer can deduplicate or compress the stream.
            f.write(i.to_bytes(8, "little") + block[8:])


# ---- shared by the launch, smoke, start-up and scaling benchmarks (and bench/run) ----

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
URI = "qemu:///system"
# Every domain a benchmark creates is named bench-... (qinst smoke names its own smoke-<image>-..., and the
# smoke benchmark's images are called bench-...): how wait_idle() tells our QEMU processes from other people's.
MINE = re.compile(r"guest=(?:smoke-)?bench-")
BUSY_CPU = 0.05  # a foreign QEMU using more than 5 % of a core disturbs a measurement


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """median/min/max of values (and the values), for the JSON results; an empty dict when there are none."""
    if not values:
        return {}
    s = Summary.of(values)
    return {"median": s.median, "min": s.minimum, "max": s.maximum, "n": len(values), "values": list(values)}


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def qinst_command() -> str:
    """The qinst of the Python running the benchmark (the project's virtualenv), else the one on PATH."""
    beside = Path(sys.executable).with_name("qinst")
    found = str(beside) if beside.exists() else shutil.which("qinst")
    if not found:
        sys.exit("qinst not found: run with the project's virtualenv python (.venv/bin/python bench/...)")
    return found


def child_env(config_home: Path | None = None) -> dict[str, str]:
    """The environment for the tools: no QINST_* settings leaking in, loopback never proxied."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QINST_")}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env["LANG"] = env.get("LANG") or "C.UTF-8"
    if config_home is not None:
        env["XDG_CONFIG_HOME"] = str(config_home)  # qinst's own key pair and known_hosts stay in the work dir
    return env


@dataclass(frozen=True)
class Ran:
    seconds: float
    max_rss_kib: int  # peak resident set of the child itself, from wait4()
    returncode: int
    stdout: str
    stderr: str


def run_timed(
    argv: Sequence[str | os.PathLike[str]], env: dict[str, str] | None = None, cwd: Path | None = None
) -> Ran:
    """Like timed(), but both pipes are drained by threads (chatty tools) and a failure is returned, not raised."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [os.fspath(a) for a in argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=cwd,
    )
    chunks: dict[str, bytes] = {}

    def drain(key: str, pipe: Any) -> None:
        chunks[key] = pipe.read()

    readers = [
        threading.Thread(target=drain, args=("out", proc.stdout), daemon=True),
        threading.Thread(target=drain, args=("err", proc.stderr), daemon=True),
    ]
    for reader in readers:
        reader.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:
        _stop(proc)
        raise
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    for reader in readers:
        reader.join(5)  # a grandchild that keeps the pipe open must not hang the benchmark
    out, err = chunks.get("out", b""), chunks.get("err", b"")
    return Ran(seconds, usage.ru_maxrss, proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a child on Ctrl-C or SIGTERM, letting it clean up: qinst removes what it created on SIGINT."""
    for sig, grace in ((None, 5.0), (signal.SIGINT, 30.0), (signal.SIGKILL, 10.0)):
        if sig is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
        try:
            proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


def check(ran: Ran, what: str) -> Ran:
    if ran.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {ran.returncode}): {ran.stderr.strip()[-2000:]}")
    return ran


def quiet(
    argv: Sequence[str | os.PathLike[str]], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a helper command (cleanup, setup) without timing it; never raises."""
    return subprocess.run(
        [os.fspath(a) for a in argv], capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, check=False
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ssh_banner(port: int, timeout: float = 1.0) -> bool:
    """True when an SSH server answers on 127.0.0.1:port (a SLIRP forward accepts first, so read the banner)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.settimeout(timeout)
            return s.recv(8).startswith(b"SSH-")
    except OSError:
        return False


def _qemu_processes() -> list[tuple[int, str, int]]:
    """(pid, command line, CPU ticks so far) of every qemu-system process."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            if not cmdline or b"qemu-system" not in Path(cmdline[0].decode(errors="replace")).name.encode():
                continue
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks = int(stat[11]) + int(stat[12])  # utime + stime
        found.append((int(entry), b" ".join(cmdline).decode(errors="replace"), ticks))
    return found


def foreign_qemu(sample: float = 1.0) -> list[dict[str, Any]]:
    """QEMU processes that are not the benchmark's, with the share of a core each used over `sample` seconds."""
    first = {pid: (cmd, ticks) for pid, cmd, ticks in _qemu_processes() if not MINE.search(cmd)}
    if not first:
        return []
    time.sleep(sample)
    hz = os.sysconf("SC_CLK_TCK")
    now = {pid: ticks for pid, _, ticks in _qemu_processes()}
    out = []
    for pid, (cmd, ticks) in first.items():
        if pid in now:
            name = re.search(r"guest=([^, ]+)", cmd)
            out.append(
                {
                    "pid": pid,
                    "name": name[1] if name else cmd.split()[0],
                    "cpu": round((now[pid] - ticks) / hz / sample, 3),
                }
            )
    return out


def wait_idle(max_wait: float = 1800.0) -> dict[str, Any]:
    """Wait until no QEMU but the benchmark's uses the CPU (someone else's tests); say what was seen.

    A foreign QEMU that sits idle (a paused or halted guest left over) does not count: it would block forever and
    takes no CPU from the measurement. After max_wait the measurement goes ahead and is marked contended.
    """
    start = time.monotonic()
    told = False
    while True:
        others = foreign_qemu()
        busy = [o for o in others if o["cpu"] > BUSY_CPU]
        if not busy:
            return {"waited_s": round(time.monotonic() - start, 1), "contended": False, "idle_foreign_qemu": others}
        if time.monotonic() - start > max_wait:
            log(f"still busy after {max_wait:.0f} s, measuring anyway: {busy}")
            return {"waited_s": round(time.monotonic() - start, 1), "contended": True, "busy_foreign_qemu": busy}
        if not told:
            log(f"waiting for other QEMU processes to finish: {', '.join(o['name'] for o in busy)}")
            told = True
        time.sleep(5)


class Disturbance(threading.Thread):
    """Watches, while a measurement runs, for foreign QEMU processes that use the CPU."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.busy: set[str] = set()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.busy.update(o["name"] for o in foreign_qemu(1.0) if o["cpu"] > BUSY_CPU)
            self._stop_event.wait(1.0)

    def __enter__(self) -> Disturbance:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop_event.set()
        self.join(5)


T = TypeVar("T")


def undisturbed(measure: Callable[[], T], records: list[dict[str, Any]], tries: int = 3) -> T:
    """measure() on an idle machine: wait for it, and measure again when someone's QEMU got busy meanwhile.

    The wait (and, after `tries`, a measurement kept although disturbed) goes into records for merge_idle().
    """
    for attempt in range(1, tries + 1):
        record = wait_idle()
        with Disturbance() as disturbance:
            result = measure()
        record["disturbed_by"] = sorted(disturbance.busy)
        records.append(record)
        if not disturbance.busy:
            return result
        if attempt < tries:
            log(f"disturbed by {', '.join(sorted(disturbance.busy))}: measuring again")
    record["contended"] = True
    log("kept a disturbed measurement (marked contended)")
    return result


def merge_idle(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One summary of the wait_idle() records of a benchmark."""
    return {
        "measurements": len(records),
        "waited_s": round(sum(r["waited_s"] for r in records), 1),
        "repeated": sum(1 for r in records if r.get("disturbed_by") and not r["contended"]),
        "contended": sum(1 for r in records if r["contended"]),
    }


def test_image(image_dir: Path | None) -> Path:
    """The project's test guest image (built and cached by tests/images/build.sh), as its result directory."""
    if image_dir is not None:
        return image_dir.resolve()
    log("building (or finding the cached) test image: tests/images/build.sh")
    proc = subprocess.run(
        ["bash", os.fspath(ROOT / "tests/images/build.sh")], stdout=subprocess.PIPE, text=True, check=False
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        sys.exit("tests/images/build.sh failed: see its messages above")
    return Path(lines[-1])


def domains(prefix: str) -> list[str]:
    """Names of the libvirt domains (any state) whose name starts with prefix."""
    out = quiet(["virsh", "--connect", URI, "list", "--all", "--name"]).stdout
    return [n for n in out.split() if n.startswith(prefix)]


def volumes(prefix: str, pool: str = "qinst") -> list[str]:
    out = quiet(["virsh", "--connect", URI, "vol-list", pool]).stdout.splitlines()[2:]
    return [line.split()[0] for line in out if line.split() and line.split()[0].startswith(prefix)]


def destroy(name: str) -> None:
    """Power a domain off (keep it defined); quietly nothing when it is not running."""
    quiet(["virsh", "--connect", URI, "destroy", name])


def remove_domain(name: str, files: Sequence[Path] = ()) -> None:
    """Power off and undefine a domain, then delete the files given and libvirt's logs of it."""
    destroy(name)
    quiet(["virsh", "--connect", URI, "undefine", name, "--nvram"])
    for path in [*files, *Path("/var/log/libvirt/qemu").glob(f"{name}.log*")]:
        with contextlib.suppress(OSError):
            path.unlink()
    with contextlib.suppress(OSError):
        Path(f"/var/log/libvirt/qemu/{name}-console.log").unlink()


def remove_leftovers(prefix: str) -> list[str]:
    """Remove every domain and qinst-pool volume whose name starts with prefix (only the benchmark's own)."""
    left = domains(prefix)
    for name in left:
        remove_domain(name)
    for vol in volumes(prefix):
        quiet(["virsh", "--connect", URI, "vol-delete", vol, "--pool", "qinst"])
        left.append(f"volume {vol}")
    return left


@contextmanager
def interrupt_on_sigterm() -> Iterator[None]:
    """SIGTERM (bench/run stopping a child, a CI timeout) unwinds like Ctrl-C, so the finally blocks clean up."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def work_dir(name: str) -> Path:
    """A fresh directory libvirt's QEMU (user libvirt-qemu) can reach: overlays and console logs go there."""
    path = Path(tempfile.mkdtemp(prefix=f"qinst-bench-{name}-"))
    path.chmod(0o755)
    return path


def keypair(directory: Path) -> Path:
    """A fresh ed25519 key pair in directory; returns the public key's path."""
    key = directory / "id_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "qinst-bench", "-f", os.fspath(key)],
        check=True,
        stdin=subprocess.DEVNULL,
    )
    return key.with_suffix(".pub")


def token() -> str:
    return secrets.token_hex(2)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(seconds: float | None, digits: int = 2) -> str:
    return "-" if seconds is None else f"{seconds:.{digits}f} s"


def fmt_summary(s: dict[str, Any], digits: int = 2, unit: str = "s") -> tuple[str, str, str]:
    """(median, min, max) cells of a summarize() result."""
    if not s:
        return ("-", "-", "-")
    return tuple(f"{s[k]:.{digits}f} {unit}" for k in ("median", "min", "max"))  # type: ignore[return-value]


def write_json(path: Path | None, data: dict[str, Any]) -> None:
    if path is not None:
        path.write_text(json.dumps(data, indent=2) + "\n")


class Qinst:
    """qinst as the benchmarks run it: the test catalog, a local mirror, a cache and a config dir of their own."""

    def __init__(self, work: Path, catalog: Path, mirror: str) -> None:
        self.exe = qinst_command()
        self.catalog = catalog
        self.mirror = mirror
        self.cache = work / "cache"
        self.config = work / "config"
        self.env = child_env(self.config)
        self.key = keypair(work)
        self.digest = ""

    def argv(self, *args: str | os.PathLike[str]) -> list[str]:
        return [
            self.exe,
            "--catalog",
            os.fspath(self.catalog),
            "--mirror",
            self.mirror,
            "--cache-dir",
            os.fspath(self.cache),
            *(os.fspath(a) for a in args),
        ]

    def run(self, *args: str | os.PathLike[str]) -> Ran:
        return run_timed(self.argv(*args), self.env)

    def base_volume(self) -> str:
        """The pool volume qinst makes of the cached image (named by its digest)."""
        return self.digest.replace(":", "-")


@contextmanager
def qinst_session(
    name: str, image: str, image_dir: Path, catalog_text: str | None = None, prefix: str = "bench-"
) -> Iterator[tuple[Qinst, Path]]:
    """A work dir, the test image's mirror served on 127.0.0.1 and pulled into a fresh cache, and on the way out
    (also on failure or Ctrl-C) every domain and volume named prefix... removed, with the image's base volume when this
    session created it. catalog_text replaces the test image's catalog; prefix names the session's domains."""
    work = work_dir(name)
    try:
        with file_server(image_dir / "mirror") as mirror, interrupt_on_sigterm():
            catalog = image_dir / "catalog.toml"
            if catalog_text is not None:
                catalog = work / "catalog.toml"
                catalog.write_text(catalog_text)
            q = Qinst(work, catalog, mirror)
            pulled = json.loads(check(q.run("pull", image, "--json"), f"qinst pull {image}").stdout)
            q.digest = pulled["digest"]
            had_base = q.base_volume() in volumes(q.base_volume())
            had_pools = set(pools())
            try:
                yield q, work
            finally:
                left = remove_leftovers(prefix)
                # virt-install defines a storage pool for each directory it finds a disk or its seed in.
                for pool, path in pools().items():
                    if pool not in had_pools and (path.startswith(str(work)) or path == "/var/lib/libvirt/boot"):
                        remove_pool(pool)
                        left.append(f"pool {pool}")
                if left:
                    log(f"removed leftovers: {', '.join(left)}")
                if not had_base and not _volume_in_use(q.base_volume()):
                    quiet(["virsh", "--connect", URI, "vol-delete", q.base_volume(), "--pool", "qinst"])
    finally:
        shutil.rmtree(work, ignore_errors=True)


def pools() -> dict[str, str]:
    """Every storage pool (active or not) and its target path."""
    found = {}
    for name in quiet(["virsh", "--connect", URI, "pool-list", "--all", "--name"]).stdout.split():
        xml = quiet(["virsh", "--connect", URI, "pool-dumpxml", name]).stdout
        path = re.search(r"<path>([^<]*)</path>", xml)
        found[name] = path[1] if path else ""
    return found


def remove_pool(name: str) -> None:
    quiet(["virsh", "--connect", URI, "pool-destroy", name])
    quiet(["virsh", "--connect", URI, "pool-undefine", name])


def _volume_in_use(volume: str) -> bool:
    for name in quiet(["virsh", "--connect", URI, "list", "--all", "--name"]).stdout.split():
        if volume in quiet(["virsh", "--connect", URI, "dumpxml", "--inactive", name]).stdout:
            return True
    return False
