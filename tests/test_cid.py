"""CIDs: the parser, and the UnixFS CIDs qinst recomputes, checked against fixed vectors and js-ipfs's importer."""

from __future__ import annotations

import base64
import hashlib
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qemu_instances.cid import DAG_PB, RAW, SHA2_256, Cid, parse, varint
from qemu_instances.errors import ImageError, QinstError
from qemu_instances.unixfs import CHUNK_SIZE, MAX_LINKS, UnixfsHasher, cid_of

V0 = parse("QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQH")
V1 = parse("bafybeidbbs6ocod3v27jtr4uhvc6n55y3gbrtur3bvjsnraudtbxkozi2y")
TWO_LEVELS = MAX_LINKS * CHUNK_SIZE + 1  # 45.6 MiB: one chunk more than a one-level tree holds

# Computed once with js-ipfs's ipfs-unixfs-importer 17.1.1 (the same CIDs as `ipfs add` with Kubo's defaults, and
# `ipfs add --cid-version=1`), over random.Random(size).randbytes(size).
VECTORS = {
    0: (
        "QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQH",
        "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku",
    ),
    1: (
        "QmcHFYKzbGeJYtDtcHEjgpKas4wZm8M25hjRusVLjou6Kx",
        "bafkreiekgmp53zydf4z2ohq3fysx3aawny2i4ah4wf4rj5el3nl2drrqa4",
    ),
    CHUNK_SIZE: (
        "Qmbd9VNLTfpBW2arj1AkAJnVRYBq1WEY6Uu6wLEiemGipi",
        "bafkreih2bk74eu5axngebs6vftmmkcaqboysjjy726xzy5hksnqmfgw5fy",
    ),
    CHUNK_SIZE + 1: (
        "QmdkAszdeWKht9nXSzPKGUYvUqpMfm325GuCn1pZnTa9ja",
        "bafybeidbbs6ocod3v27jtr4uhvc6n55y3gbrtur3bvjsnraudtbxkozi2y",
    ),
    3 << 20: (
        "QmcmJfpgu7gq3XmxyMxBUkvqzUjZqknf7uh9jiy4gFAU8o",
        "bafybeidaotwfgfeszucqxananj7i6tk7etlhld6j3e6vpxclxfzhdoni7m",
    ),
    MAX_LINKS * CHUNK_SIZE: (
        "QmNWRuH9CkAYPi3Gf99g1nB74Cw3y5NuPKohRs7KX2KsJz",
        "bafybeih3ebhydpblov22wbakszm4spvku7hbo3oa5gdhgoh7gnub26mtx4",
    ),
    TWO_LEVELS: (
        "QmWvAUzQsaCFMPzTTFKwGmTmijHZ5aVRwJqGwrSHF89cuy",
        "bafybeidsyc3rx6lmbjml2fg4ucagkjh3kse6tbphoyyhms46fqhmu6ujbi",
    ),
}


def data_of(size: int) -> bytes:
    return random.Random(size).randbytes(size)


def fed_in_pieces(data: bytes, like: Cid, piece: int) -> str:
    hasher = UnixfsHasher(like)
    for offset in range(0, len(data), piece):
        hasher.update(data[offset : offset + piece])
    return hasher.hexdigest()


@pytest.mark.parametrize("size", sorted(VECTORS))
def test_fixed_vectors(size: int) -> None:
    data = data_of(size)
    v0, v1 = VECTORS[size]
    assert str(cid_of(data, V0)) == v0
    assert str(cid_of(data, V1)) == v1
    # Network reads never fall on chunk boundaries: any split of the stream gives the same CID.
    assert fed_in_pieces(data, V0, 100_003) == v0
    assert fed_in_pieces(data, V1, 1 << 20) == v1


def test_single_chunk_v1_is_a_raw_block() -> None:
    # With raw leaves, a file of one chunk is its leaf: a raw-codec CID ("bafk..."), the sha256 of the bytes.
    cid = parse(VECTORS[CHUNK_SIZE][1])
    assert (cid.version, cid.codec, cid.hash_code) == (1, RAW, SHA2_256)
    assert cid.digest == hashlib.sha256(data_of(CHUNK_SIZE)).digest()
    # A raw CID pins the whole file as one block whatever its size: its sha256.
    big = data_of(3 << 20)
    raw = Cid(1, RAW, SHA2_256, hashlib.sha256(big).digest())
    assert cid_of(big, raw) == raw


def test_a_v1_dag_pb_cid_of_a_one_chunk_file_does_not_match() -> None:
    # Kubo gives a one-chunk file a raw CID: a dag-pb CIDv1 expectation recomputes to that, not to itself.
    assert str(cid_of(data_of(1), V1)) == VECTORS[1][1]


@pytest.mark.parametrize(
    ("cid", "kind"),
    [
        (Cid(1, DAG_PB, 0x13, bytes(64)), "CIDv1 dag-pb sha2-512"),
        (Cid(1, RAW, 0x00, b"hello"), "CIDv1 raw identity"),
        (Cid(1, 0x71, SHA2_256, bytes(32)), "CIDv1 dag-cbor sha2-256"),
        # 32-byte digests of other hashes: the length alone must not make them look like sha2-256
        (Cid(1, RAW, 0x16, bytes(32)), "CIDv1 raw hash 0x16"),
        (Cid(1, DAG_PB, 0xB220, bytes(32)), "CIDv1 dag-pb blake2b-256"),
        (Cid(1, RAW, 0x1E, bytes(32)), "CIDv1 raw blake3"),
    ],
)
def test_cids_qinst_cannot_recompute_fail_closed(cid: Cid, kind: str) -> None:
    parsed = parse(str(cid))
    assert parsed == cid
    with pytest.raises(ImageError, match=f"it is a {kind}; qinst recomputes only") as info:
        UnixfsHasher(parsed)
    assert info.value.exit_code == 3


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "invalid CID"),
        ("Qm" + "1" * 44, "not a sha2-256 multihash"),
        ("QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQ0", "not a base58 digit"),
        ("x" * 50, "expected Qm..."),
        ("b" + "a" * 9, "bad multibase encoding"),
        ("bafybeidbbs6ocod3v27jtr4uhvc6n55y3gbrtur3bvjsnraudtbxkozi2", "bad multibase encoding"),
        ("bafybeidbbs6ocod3v27jtr4uhvc6n55y3gbrtur3bvjsnraudtbxkoz", "the multihash says 32 bytes"),
        ("f017012ff", "truncated hash length"),
        ("f02701220" + "00" * 32, "version 2"),
        ("f01" + "f0ff" * 5, "truncated codec"),
        ("bafyé", "invalid CID"),
    ],
)
def test_bad_cids(text: str, needle: str) -> None:
    with pytest.raises(ImageError, match=needle) as info:
        parse(text)
    assert info.value.exit_code == 3


def test_canonical_text() -> None:
    v1 = parse(VECTORS[3 << 20][1])
    assert str(parse(VECTORS[3 << 20][1].upper())) == str(v1)  # base32 upper-case ("B..."): the same CID
    assert str(parse("f" + v1.to_bytes().hex())) == str(v1)
    assert parse(VECTORS[3 << 20][0]).version == 0


@given(st.text(max_size=120))
def test_parse_text_never_crashes(text: str) -> None:
    try:
        parse(text)
    except QinstError as exc:
        assert exc.exit_code == 3


@given(st.binary(max_size=80), st.sampled_from(["b", "B", "z", "f"]))
def test_parse_any_bytes_never_crashes(data: bytes, prefix: str) -> None:
    if prefix in "bB":
        text = prefix + base64.b32encode(data).decode().rstrip("=")
    elif prefix == "z":
        from qemu_instances.cid import b58encode

        text = "z" + b58encode(data)
    else:
        text = "f" + data.hex()
    try:
        cid = parse(text)
    except QinstError as exc:
        assert exc.exit_code == 3
    else:
        assert cid.to_bytes() == data  # what parses, round-trips exactly


@given(st.binary(min_size=32, max_size=32), st.sampled_from([(0, DAG_PB), (1, DAG_PB), (1, RAW)]))
def test_round_trip(digest: bytes, kind: tuple[int, int]) -> None:
    cid = Cid(kind[0], kind[1], SHA2_256, digest)
    assert parse(str(cid)) == cid
    assert str(parse(str(cid))) == str(cid)


def test_varint() -> None:
    assert [varint(n) for n in (0, 1, 127, 128, 300, 262144)] == [
        b"\x00",
        b"\x01",
        b"\x7f",
        b"\x80\x01",
        b"\xac\x02",
        b"\x80\x80\x10",
    ]


# -- the independent implementation: js-ipfs's UnixFS importer, installed by scripts/setup.sh --test --

NPM_DIR = Path(__file__).resolve().parent.parent / ".venv" / "npm"
JS_HASH = """
import { importer } from 'ipfs-unixfs-importer'
import { MemoryBlockstore } from 'blockstore-core/memory'
import { readFileSync } from 'node:fs'
const [file, version] = process.argv.slice(2)
const options = version === '1' ? { cidVersion: 1, rawLeaves: true } : { cidVersion: 0, rawLeaves: false }
let last
for await (const entry of importer([{ content: readFileSync(file) }], new MemoryBlockstore(), options)) last = entry
console.log(last.cid.toString())
"""


@pytest.fixture(scope="module")
def js_cid(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    node = shutil.which("node")
    modules = NPM_DIR / "node_modules" / "ipfs-unixfs-importer"
    if node is None or not modules.is_dir():
        pytest.skip(f"node or ipfs-unixfs-importer not installed in {NPM_DIR} (run scripts/setup.sh --test)")
    work = tmp_path_factory.mktemp("js")
    (work / "node_modules").symlink_to(NPM_DIR / "node_modules")
    (work / "hash.mjs").write_text(JS_HASH)

    def run(data: bytes, version: int) -> str:
        (work / "data").write_bytes(data)
        proc = subprocess.run(
            [node, str(work / "hash.mjs"), str(work / "data"), str(version)],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
            env={**os.environ, "NODE_OPTIONS": ""},
        )
        return proc.stdout.strip()

    return run


@pytest.mark.parametrize("size", [0, 1, 1000, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 5 * CHUNK_SIZE + 7])
def test_against_js_ipfs(js_cid, size: int) -> None:  # type: ignore[no-untyped-def]
    data = random.Random(size + 17).randbytes(size)  # other bytes than the fixed vectors'
    assert str(cid_of(data, V0)) == js_cid(data, 0)
    assert str(cid_of(data, V1)) == js_cid(data, 1)


def test_against_js_ipfs_two_levels(js_cid) -> None:  # type: ignore[no-untyped-def]
    data = data_of(TWO_LEVELS)
    for version, like in ((0, V0), (1, V1)):
        expected = js_cid(data, version)
        assert expected == VECTORS[TWO_LEVELS][version]  # the vectors above are what js-ipfs says
        assert str(cid_of(data, like)) == expected
