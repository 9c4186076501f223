"""A local mirror of the upstream image sites (same paths) and the aleph.im API double (testsupport/aleph.py),
served by tests/httpserver.py.

The images are real qcow2 files of a few MiB made by `qemu-img convert` from random bytes; a user catalog written
next to them pins their digests under the built-in names, so `qinst --mirror URL --catalog FILE pull debian-12`
exercises exactly the code path of a real pull.
"""

from __future__ import annotations

import hashlib
import random
import subprocess
from dataclasses import dataclass
from pathlib import Path

from httpserver import HTTPServer

from testsupport.aleph import AlephDouble

DEBIAN_PINNED = "/images/cloud/bookworm/20260923-2610/debian-12-genericcloud-amd64-20260923-2610.qcow2"
DEBIAN_LATEST = "/images/cloud/bookworm/latest/debian-12-genericcloud-amd64.qcow2"
DEBIAN_SUMS = "/images/cloud/bookworm/latest/SHA512SUMS"
UBUNTU_PINNED = "/releases/jammy/release-20250429/ubuntu-22.04-server-cloudimg-amd64.img"
UBUNTU_LATEST = "/releases/jammy/release/ubuntu-22.04-server-cloudimg-amd64.img"
UBUNTU_SUMS = "/releases/jammy/release/SHA256SUMS"
DEBIAN_HOST = "https://cloud.debian.org"
UBUNTU_HOST = "https://cloud-images.ubuntu.com"


@dataclass(frozen=True)
class Image:
    """A test image: its bytes on disk and their digests."""

    file: Path
    sha256: str  # "sha256:<hex>"
    sha512: str  # "sha512:<hex>"

    @property
    def data(self) -> bytes:
        return self.file.read_bytes()

    @property
    def size(self) -> int:
        return self.file.stat().st_size

    @property
    def sha256_hex(self) -> str:
        return self.sha256.partition(":")[2]

    @property
    def sha512_hex(self) -> str:
        return self.sha512.partition(":")[2]


def make_qcow2(path: Path, mib: int, seed: int) -> Image:
    """A qcow2 image holding `mib` MiB of seeded random data (so it is as large as its data)."""
    raw = path.with_suffix(".raw")
    raw.write_bytes(random.Random(seed).randbytes(mib << 20))
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, path], check=True, capture_output=True)
    raw.unlink()
    return describe(path)


def describe(path: Path) -> Image:
    data = path.read_bytes()
    return Image(path, f"sha256:{hashlib.sha256(data).hexdigest()}", f"sha512:{hashlib.sha512(data).hexdigest()}")


@dataclass(frozen=True)
class Images:
    """The three distinct images the mirror serves, made once per test session."""

    pinned: Image  # the Debian pinned build (also the aleph storage item)
    latest: Image  # the Debian latest build
    ubuntu: Image  # the Ubuntu latest build (SHA256SUMS with the `*` marker)


def make_images(workdir: Path) -> Images:
    return Images(
        pinned=make_qcow2(workdir / "pinned.qcow2", 3, seed=1),
        latest=make_qcow2(workdir / "latest.qcow2", 2, seed=2),
        ubuntu=make_qcow2(workdir / "ubuntu.img", 2, seed=3),
    )


@dataclass(frozen=True)
class Mirror:
    server: HTTPServer
    images: Images
    catalog: Path  # a user catalog pinning the images under the built-in names
    aleph: AlephDouble
    aleph_item: str  # a STORE message (storage item) of the pinned Debian image: debian-12's aleph_item_hash
    aleph_ipfs_item: str  # a STORE message (ipfs item, CIDv0) of the Ubuntu image: ubuntu-22.04's aleph_item_hash
    aleph_cid: str  # the Ubuntu image's CID

    @property
    def url(self) -> str:
        return self.server.url

    def args(self, cache_dir: Path) -> list[str]:
        """Global options pointing qinst at this mirror, this aleph API, this catalog and cache_dir."""
        return [
            "--mirror",
            self.url,
            "--aleph-api",
            self.url,
            "--ipfs-gateway",
            self.url,
            "--catalog",
            str(self.catalog),
            "--cache-dir",
            str(cache_dir),
        ]


def build_mirror(server: HTTPServer, images: Images, workdir: Path) -> Mirror:
    """Fill server with the upstream tree and the aleph API, and write the matching user catalog."""
    server.add(DEBIAN_PINNED, images.pinned.data)
    server.add(DEBIAN_LATEST, images.latest.data)
    server.add(
        DEBIAN_SUMS,
        (
            "this line is not a checksum\n"
            f"{'0' * 128}  debian-12-genericcloud-amd64.raw\n"
            f"{images.latest.sha512_hex}  debian-12-genericcloud-amd64.qcow2\n"
            f"{'1' * 64}  debian-12-genericcloud-amd64.json\n"
        ).encode(),
        "text/plain",
    )
    server.add(UBUNTU_LATEST, images.ubuntu.data)
    server.add(
        UBUNTU_SUMS,
        (
            f"{'2' * 64} *ubuntu-22.04-server-cloudimg-amd64.manifest\n"
            f"{images.ubuntu.sha256_hex} *ubuntu-22.04-server-cloudimg-amd64.img\n"
        ).encode(),
        "text/plain",
    )
    aleph = AlephDouble(server)
    aleph_item, _ = aleph.store(images.pinned.data)
    aleph_ipfs_item, aleph_cid = aleph.store(images.ubuntu.data, item_type="ipfs")

    catalog = workdir / "catalog.toml"
    catalog.write_text(
        f"""
[images.debian-12]
title = "Debian 12 test build"
aliases = ["bookworm"]
os = "debian"
format = "qcow2"
url = "{DEBIAN_HOST}{DEBIAN_PINNED}"
digest = "{images.pinned.sha512}"
latest_url = "{DEBIAN_HOST}{DEBIAN_LATEST}"
checksums_url = "{DEBIAN_HOST}{DEBIAN_SUMS}"
aleph_item_hash = "{aleph_item}"

[images."ubuntu-22.04"]
title = "Ubuntu 22.04 test build"
aliases = ["jammy"]
os = "ubuntu"
url = "{UBUNTU_HOST}{UBUNTU_PINNED}"
digest = "sha256:{"3" * 64}"
latest_url = "{UBUNTU_HOST}{UBUNTU_LATEST}"
checksums_url = "{UBUNTU_HOST}{UBUNTU_SUMS}"
aleph_item_hash = "{aleph_ipfs_item}"
"""
    )
    return Mirror(server, images, catalog, aleph, aleph_item, aleph_ipfs_item, aleph_cid)
