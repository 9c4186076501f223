"""The CID of a file as Kubo (`ipfs add`) imports it by default, computed from a stream in constant memory.

Kubo's defaults: fixed 256 KiB chunks, the balanced layout with at most 174 links per node. CIDv0 files have dag-pb
UnixFS leaves (Data{Type=File, Data=chunk, filesize}); CIDv1 files have raw leaves and dag-pb inner nodes. A file of
one chunk is its leaf (a raw-codec CIDv1, "bafk...", for raw leaves). The tree is built level by level as chunks
complete, keeping only the pending links of each level: a few KiB whatever the file's size.

dag-pb and UnixFS are protobufs; the few fields needed are written by hand, in the canonical order (PBNode: Links
then Data; PBLink: Hash, Name, Tsize; UnixFS Data: Type, Data, filesize, blocksizes).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from qemu_instances.cid import DAG_PB, RAW, SHA2_256, Cid, varint

CHUNK_SIZE = 262144
MAX_LINKS = 174
_FILE = 2  # UnixFS Data.Type File


def _field_bytes(number: int, payload_length: int) -> bytes:
    """The key and length of a length-delimited protobuf field; the payload follows."""
    return varint(number << 3 | 2) + varint(payload_length)


def _field_varint(number: int, value: int) -> bytes:
    return varint(number << 3) + varint(value)


@dataclass(frozen=True)
class _Link:
    cid: bytes  # binary CID of the child
    tsize: int  # the child's block plus all blocks under it
    filesize: int  # file bytes under the child


class UnixfsHasher:
    """Feed the file's bytes with update(); cid() is the CID Kubo gives the file with the expected CID's defaults.

    hexdigest() returns the CID's text, so this plugs in wherever a hashlib object is used to verify a download.
    For a raw-codec CID (one block) the file's whole sha256 is the digest, whatever its size.
    """

    def __init__(self, expected: Cid) -> None:
        expected.require_recomputable()
        self.expected = expected
        self._raw_root = expected.codec == RAW
        self._raw_leaves = expected.version == 1
        self._whole = hashlib.sha256() if self._raw_root else None
        self._leaf: list[memoryview] = []  # the current chunk's pieces (views of the caller's buffers, no copy)
        self._leaf_size = 0
        self._levels: list[list[_Link]] = [[]]
        self._result: Cid | None = None
        self.size = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self.size += len(data)
        if self._whole is not None:
            self._whole.update(data)
            return
        view = memoryview(data)
        while view:
            take = min(CHUNK_SIZE - self._leaf_size, len(view))
            self._leaf.append(view[:take])
            self._leaf_size += take
            view = view[take:]
            if self._leaf_size == CHUNK_SIZE:
                self._add_leaf()

    def _add_leaf(self) -> None:
        size, pieces = self._leaf_size, self._leaf
        self._leaf, self._leaf_size = [], 0
        h = hashlib.sha256()
        if self._raw_leaves:
            for piece in pieces:
                h.update(piece)
            self._push(0, _Link(_cid_bytes(1, RAW, h.digest()), size, size))
            return
        data_field = _field_bytes(2, size) if size else b""  # an empty leaf has no Data field at all
        unixfs_length = 2 + len(data_field) + size + len(_field_varint(3, size))
        head = _field_bytes(1, unixfs_length) + _field_varint(1, _FILE) + data_field
        h.update(head)
        for piece in pieces:
            h.update(piece)
        h.update(_field_varint(3, size))
        block_size = len(head) + size + len(_field_varint(3, size))
        self._push(0, _Link(_cid_bytes(0, DAG_PB, h.digest()), block_size, size))

    def _push(self, level: int, link: _Link) -> None:
        if level == len(self._levels):
            self._levels.append([])
        links = self._levels[level]
        links.append(link)
        if len(links) == MAX_LINKS:  # a full node never takes another child: close it now
            self._levels[level] = []
            self._push(level + 1, self._node(links))

    def _node(self, links: list[_Link]) -> _Link:
        filesize = sum(link.filesize for link in links)
        unixfs = _field_varint(1, _FILE) + _field_varint(3, filesize)
        unixfs += b"".join(_field_varint(4, link.filesize) for link in links)
        block = bytearray()
        for link in links:
            body = _field_bytes(1, len(link.cid)) + link.cid + _field_bytes(2, 0) + _field_varint(3, link.tsize)
            block += _field_bytes(2, len(body)) + body
        block += _field_bytes(1, len(unixfs)) + unixfs
        digest = hashlib.sha256(block).digest()
        version = 1 if self._raw_leaves else 0
        return _Link(_cid_bytes(version, DAG_PB, digest), len(block) + sum(link.tsize for link in links), filesize)

    def cid(self) -> Cid:
        """The file's CID; this closes the tree: update() must not be called after it."""
        if self._result is None:
            self._result = self._close()
        return self._result

    def _close(self) -> Cid:
        if self._whole is not None:
            return Cid(1, RAW, SHA2_256, self._whole.digest())
        if self._leaf_size or self.size == 0:
            self._add_leaf()  # the last, short chunk; or the single empty leaf of an empty file
        # Close the rightmost path: each level's pending links become a node one level up, as Kubo's balanced
        # layout leaves single-child nodes on the right edge.
        top = len(self._levels) - 1
        while top > 0 and not self._levels[top]:
            top -= 1
        for level in range(top):
            if self._levels[level]:
                self._levels[level + 1].append(self._node(self._levels[level]))
                self._levels[level] = []
        root = self._levels[top]
        link = root[0] if len(root) == 1 else self._node(root)
        return _parse_binary(link.cid)

    def hexdigest(self) -> str:
        return str(self.cid())


def _cid_bytes(version: int, codec: int, digest: bytes) -> bytes:
    return Cid(version, codec, SHA2_256, digest).to_bytes()


def _parse_binary(data: bytes) -> Cid:
    if data[0] == 0x12:  # CIDv0: a bare sha2-256 multihash
        return Cid(0, DAG_PB, SHA2_256, data[2:])
    return Cid(1, data[1], SHA2_256, data[4:])  # 0x01 codec(one byte: 0x55 or 0x70) 0x12 0x20 digest


def cid_of(data: bytes, like: Cid) -> Cid:
    """The CID of in-memory bytes, imported with the defaults `like` implies."""
    hasher = UnixfsHasher(like)
    hasher.update(data)
    return hasher.cid()
