"""Digests ("sha512:<hex>") and the checksum files that publish them (SHA512SUMS, SHA256SUMS)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qemu_instances.errors import ImageError, UsageError

if TYPE_CHECKING:  # imported where a hash is computed: `ls` reads digests, never hashes (OpenSSL's load)
    import hashlib


class Algorithm(StrEnum):
    SHA256 = "sha256"
    SHA512 = "sha512"
    CID = "cid"  # an IPFS CID (aleph ipfs items): the `hex` of such a Digest is the CID's canonical text

    @property
    def hex_length(self) -> int:
        return {Algorithm.SHA256: 64, Algorithm.SHA512: 128}[self]

    def new(self) -> hashlib._Hash:
        import hashlib

        return hashlib.new(self.value)


@dataclass(frozen=True)
class Digest:
    algorithm: Algorithm
    hex: str

    @classmethod
    def parse(cls, text: str, *, error: type[ImageError] | type[UsageError] = ImageError) -> Digest:
        """Parse "sha512:<hex>" (the algorithm prefix is required)."""
        algo, sep, value = text.strip().partition(":")
        if not sep or algo.lower() not in (Algorithm.SHA256, Algorithm.SHA512):
            raise error(f"unsupported digest {text!r}: expected sha256:<hex> or sha512:<hex>")
        return cls.of(Algorithm(algo.lower()), value, error=error)

    @classmethod
    def of(cls, algorithm: Algorithm, value: str, *, error: type[ImageError] | type[UsageError] = ImageError) -> Digest:
        if algorithm is Algorithm.CID:
            from qemu_instances.cid import parse

            try:
                return cls(algorithm, str(parse(value.strip())))
            except ImageError as exc:
                raise error(str(exc)) from exc
        value = value.strip().lower()
        if not re.fullmatch(rf"[0-9a-f]{{{algorithm.hex_length}}}", value):
            raise error(f"invalid {algorithm} digest {value!r}: expected {algorithm.hex_length} hex digits")
        return cls(algorithm, value)

    @property
    def filename(self) -> str:
        """The name of this content in the cache: "sha512-<hex>"."""
        return f"{self.algorithm}-{self.hex}"

    @classmethod
    def from_filename(cls, name: str) -> Digest | None:
        algo, _, value = name.partition("-")
        try:
            return cls.of(Algorithm(algo), value)
        except (ValueError, ImageError):
            return None

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    def hasher(self) -> Any:
        """A fresh hashlib-like object (update, hexdigest) whose hexdigest() is comparable with self.hex."""
        if self.algorithm is Algorithm.CID:
            from qemu_instances.cid import parse
            from qemu_instances.unixfs import UnixfsHasher

            return UnixfsHasher(parse(self.hex))
        return self.algorithm.new()


def hash_file(path: Path, algorithm: Algorithm, chunk_size: int = 1 << 20) -> Digest:
    """Digest of a file, read in constant memory."""
    h = algorithm.new()
    with path.open("rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return Digest(algorithm, h.hexdigest())


_SUMS_LINE = re.compile(r"^(?P<hex>[0-9a-fA-F]+)\s+\*?(?P<name>\S.*?)\s*$")


def parse_checksums(text: str, algorithm: Algorithm) -> dict[str, Digest]:
    """Parse a coreutils-style checksum file: "<hex>  <name>" or "<hex> *<name>" (binary marker)."""
    sums: dict[str, Digest] = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _SUMS_LINE.match(line.strip())
        if not m or len(m["hex"]) != algorithm.hex_length:
            continue
        name = m["name"].removeprefix("./")
        sums[name] = Digest(algorithm, m["hex"].lower())
    return sums


def algorithm_for_checksums(url: str) -> Algorithm:
    """SHA512SUMS -> sha512, SHA256SUMS -> sha256 (by the file's name)."""
    name = url.rsplit("/", 1)[-1].upper()
    if "SHA512" in name:
        return Algorithm.SHA512
    if "SHA256" in name:
        return Algorithm.SHA256
    raise ImageError(f"cannot tell the digest algorithm of checksum file {url}: expected SHA256SUMS or SHA512SUMS")
