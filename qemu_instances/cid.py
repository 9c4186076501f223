"""IPFS content identifiers (CIDs): parse their text, and write the binary and text forms back.

Only what qinst can recompute from a file's bytes is `recomputable`: a sha2-256 multihash with the dag-pb codec (a
UnixFS tree, qemu_instances/unixfs.py) or the raw codec (one block: the sha256 of the whole file).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

from qemu_instances.errors import ImageError

DAG_PB = 0x70
RAW = 0x55
SHA2_256 = 0x12
_CODECS = {DAG_PB: "dag-pb", RAW: "raw", 0x71: "dag-cbor", 0x0129: "dag-json"}
_HASHES = {SHA2_256: "sha2-256", 0x13: "sha2-512", 0x00: "identity", 0x1E: "blake3", 0xB220: "blake2b-256"}
_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58)}
_MAX_TEXT = 512  # far above any real CID: a bound on the work a hostile string can ask for


def varint(value: int) -> bytes:
    """Unsigned LEB128, as multiformats and protobuf write integers."""
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(data: bytes, pos: int, what: str) -> tuple[int, int]:
    value = shift = 0
    for i in range(pos, min(pos + 9, len(data))):
        byte = data[i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if byte == 0 and i > pos:
                raise ImageError(f"invalid CID: the {what} is not minimally encoded")
            return value, i + 1
        shift += 7
    raise ImageError(f"invalid CID: truncated {what}")


def b58encode(data: bytes) -> str:
    number = int.from_bytes(data, "big")
    out = ""
    while number:
        number, rest = divmod(number, 58)
        out = _B58[rest] + out
    return "1" * (len(data) - len(data.lstrip(b"\0"))) + out


def b58decode(text: str) -> bytes:
    number = 0
    for c in text:
        if c not in _B58_INDEX:
            raise ImageError(f"invalid CID: {c!r} is not a base58 digit")
        number = number * 58 + _B58_INDEX[c]
    body = number.to_bytes((number.bit_length() + 7) // 8, "big")
    return b"\0" * (len(text) - len(text.lstrip("1"))) + body


@dataclass(frozen=True)
class Cid:
    version: int  # 0 (Qm..., base58btc, always dag-pb + sha2-256) or 1 (multibase text, b... by default)
    codec: int
    hash_code: int
    digest: bytes

    @property
    def multihash(self) -> bytes:
        return varint(self.hash_code) + varint(len(self.digest)) + self.digest

    def to_bytes(self) -> bytes:
        if self.version == 0:
            return self.multihash
        return varint(1) + varint(self.codec) + self.multihash

    def __str__(self) -> str:
        """The canonical text: base58btc for CIDv0, base32 lower-case with the multibase prefix 'b' for CIDv1."""
        if self.version == 0:
            return b58encode(self.to_bytes())
        return "b" + base64.b32encode(self.to_bytes()).decode().lower().rstrip("=")

    @property
    def kind(self) -> str:
        codec = _CODECS.get(self.codec, f"codec 0x{self.codec:x}")
        hash_name = _HASHES.get(self.hash_code, f"hash 0x{self.hash_code:x}")
        return f"CIDv{self.version} {codec} {hash_name}"

    @property
    def recomputable(self) -> bool:
        return self.hash_code == SHA2_256 and len(self.digest) == 32 and self.codec in (DAG_PB, RAW)

    def require_recomputable(self) -> None:
        if not self.recomputable:
            raise ImageError(
                f"cannot verify IPFS content {self}: it is a {self.kind}; qinst recomputes only sha2-256 CIDs "
                "of dag-pb (UnixFS) or raw blocks",
                hint="nothing was downloaded; use another source of this image",
            )


def _multihash(data: bytes, pos: int) -> tuple[int, bytes]:
    code, pos = _read_varint(data, pos, "hash code")
    length, pos = _read_varint(data, pos, "hash length")
    digest = data[pos:]
    if len(digest) != length:
        raise ImageError(f"invalid CID: the multihash says {length} bytes of digest, there are {len(digest)}")
    if code == SHA2_256 and length != 32:
        raise ImageError("invalid CID: a sha2-256 digest has 32 bytes")
    return code, digest


def parse(text: str) -> Cid:
    """A CID from its text: CIDv0 ("Qm...") or CIDv1 in base32 ("b..."), base58btc ("z...") or base16 ("f...")."""
    if not isinstance(text, str) or not text or len(text) > _MAX_TEXT or not text.isascii():
        raise ImageError(f"invalid CID {text[:80]!r}" if isinstance(text, str) else "invalid CID")
    if len(text) == 46 and text.startswith("Qm"):
        data = b58decode(text)
        if len(data) != 34 or data[:2] != b"\x12\x20":
            raise ImageError(f"invalid CIDv0 {text!r}: not a sha2-256 multihash")
        return Cid(0, DAG_PB, SHA2_256, data[2:])
    prefix, body = text[0], text[1:]
    try:
        if prefix in "bB":
            data = base64.b32decode(body.upper() + "=" * (-len(body) % 8))
        elif prefix == "z":
            data = b58decode(body)
        elif prefix in "fF":
            data = bytes.fromhex(body)
        else:
            raise ImageError(f"invalid CID {text[:80]!r}: expected Qm... (CIDv0) or b... (CIDv1, base32)")
    except ValueError as exc:  # binascii.Error is a ValueError
        raise ImageError(f"invalid CID {text[:80]!r}: bad multibase encoding") from exc
    version, pos = _read_varint(data, 0, "version")
    if version != 1:
        raise ImageError(f"invalid CID {text[:80]!r}: version {version} (expected 1 after a multibase prefix)")
    codec, pos = _read_varint(data, pos, "codec")
    code, digest = _multihash(data, pos)
    return Cid(1, codec, code, digest)
