"""A benchmark's qinst: its own work dir, catalog, mirror, cache and keys; on the way out, what it made is removed."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import _root  # noqa: F401  (testsupport/ on sys.path)
from output import log
from timing import Ran, check, run_timed

from testsupport.fileserver import file_server
from testsupport.qinst import qinst_command, qinst_env
from testsupport.virsh import pools, remove_leftovers, remove_pool, virsh, volume_in_use, volumes

BENCH = Path(__file__).resolve().parent

ROOT = BENCH.parent


def write_random_file(path: Path, mib: int) -> None:
    block = os.urandom(1 << 20)
    with path.open("wb") as f:
        for i in range(mib):
            # Vary every block so no layer can deduplicate or compress the stream.
            f.write(i.to_bytes(8, "little") + block[8:])


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


class Qinst:
    """qinst as the benchmarks run it: the test catalog, a local mirror, a cache and a config dir of their own."""

    def __init__(self, work: Path, catalog: Path, mirror: str) -> None:
        self.exe = qinst_command()
        self.catalog = catalog
        self.mirror = mirror
        self.cache = work / "cache"
        self.config = work / "config"
        self.env = qinst_env(self.config)
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

    def shared_base(self) -> Path:
        """The cached image's file, opened to QEMU (its own user) as the backing file of the peers' overlays.

        qinst keeps its cache private (0700): this opens the benchmark's own temporary cache only."""
        base = self.cache / "images" / self.base_volume()
        if not base.exists():
            base = next((self.cache / "images").glob(self.base_volume() + "*"))
        for path in (self.cache, self.cache / "images"):
            path.chmod(0o755)
        base.chmod(0o644)
        return base


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
            had_base = q.base_volume() in volumes(prefix=q.base_volume())
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
                if not had_base and not volume_in_use(q.base_volume()):
                    virsh("vol-delete", q.base_volume(), "--pool", "qinst")
    finally:
        shutil.rmtree(work, ignore_errors=True)
