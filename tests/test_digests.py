"""Digests ("sha512:<hex>") and checksum files (Debian SHA512SUMS, Ubuntu SHA256SUMS)."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest

from qemu_instances.digests import Algorithm, Digest, algorithm_for_checksums, hash_file, parse_checksums
from qemu_instances.errors import CatalogError, ImageError, UsageError

SHA256_EMPTY = hashlib.sha256(b"").hexdigest()
SHA512_EMPTY = hashlib.sha512(b"").hexdigest()


@pytest.mark.parametrize(
    ("text", "algorithm", "hex_"),
    [
        (f"sha256:{SHA256_EMPTY}", Algorithm.SHA256, SHA256_EMPTY),
        (f"sha512:{SHA512_EMPTY}", Algorithm.SHA512, SHA512_EMPTY),
        (f"  SHA512:{SHA512_EMPTY.upper()}\n", Algorithm.SHA512, SHA512_EMPTY),
    ],
)
def test_parse_normalises(text: str, algorithm: Algorithm, hex_: str) -> None:
    digest = Digest.parse(text)
    assert digest == Digest(algorithm, hex_)
    assert str(digest) == f"{algorithm}:{hex_}"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (SHA512_EMPTY, "expected sha256:<hex> or sha512:<hex>"),  # no algorithm prefix
        (f"md5:{hashlib.md5(b'').hexdigest()}", "unsupported digest"),
        (f"sha512:{SHA256_EMPTY}", "expected 128 hex digits"),  # a sha256 labelled sha512
        (f"sha256:{'g' * 64}", "expected 64 hex digits"),
        ("sha256:", "expected 64 hex digits"),
    ],
)
def test_parse_rejects(text: str, needle: str) -> None:
    with pytest.raises(ImageError, match=needle) as info:
        Digest.parse(text)
    assert info.value.exit_code == 3


def test_parse_raises_the_requested_error_class() -> None:
    with pytest.raises(UsageError):
        Digest.parse("sha1:abc", error=UsageError)
    with pytest.raises(CatalogError):
        Digest.of(Algorithm.SHA256, "abc", error=CatalogError)


def test_filename_round_trip() -> None:
    digest = Digest(Algorithm.SHA512, SHA512_EMPTY)
    assert digest.filename == f"sha512-{SHA512_EMPTY}"
    assert Digest.from_filename(digest.filename) == digest


@pytest.mark.parametrize(
    "name",
    [
        f"sha512-{SHA512_EMPTY}.json",  # the record beside an image
        f".sha512-{SHA512_EMPTY}.part",
        f"md5-{SHA256_EMPTY[:32]}",
        f"sha256-{SHA512_EMPTY}",
        "sha256",
        "",
    ],
)
def test_from_filename_ignores_other_files(name: str) -> None:
    assert Digest.from_filename(name) is None


def test_hash_file_matches_hashlib(tmp_path: Path) -> None:
    data = bytes(range(256)) * 9000  # spans several read chunks
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert hash_file(path, Algorithm.SHA512, chunk_size=4096) == Digest(
        Algorithm.SHA512, hashlib.sha512(data).hexdigest()
    )
    assert hash_file(path, Algorithm.SHA256).hex == hashlib.sha256(data).hexdigest()


def test_parse_debian_sha512sums() -> None:
    a, b = "a" * 128, "B" * 128
    text = f"{a}  debian-12-genericcloud-amd64.qcow2\n{b}  debian-12-genericcloud-amd64.raw\n"
    sums = parse_checksums(text, Algorithm.SHA512)
    assert sums == {
        "debian-12-genericcloud-amd64.qcow2": Digest(Algorithm.SHA512, a),
        "debian-12-genericcloud-amd64.raw": Digest(Algorithm.SHA512, b.lower()),
    }


def test_parse_ubuntu_sha256sums_with_binary_marker() -> None:
    a, b = "c" * 64, "d" * 64
    text = f"{a} *ubuntu-22.04-server-cloudimg-amd64.img\r\n{b} *ubuntu-22.04-server-cloudimg-amd64.manifest\r\n"
    sums = parse_checksums(text, Algorithm.SHA256)
    assert sums["ubuntu-22.04-server-cloudimg-amd64.img"] == Digest(Algorithm.SHA256, a)
    assert sums["ubuntu-22.04-server-cloudimg-amd64.manifest"] == Digest(Algorithm.SHA256, b)


def test_parse_checksums_skips_junk() -> None:
    good = "e" * 128
    text = "\n".join(
        [
            "# a comment",
            "",
            "-----BEGIN PGP SIGNED MESSAGE-----",
            f"SHA512 (other.qcow2) = {'f' * 128}",  # BSD style: not ours
            f"{'0' * 64}  short-hash.qcow2",  # a sha256 in a SHA512SUMS file
            f"{'z' * 128}  not-hex.qcow2",
            f"{good}",  # no file name
            f"{good}  ./image.qcow2   ",
            "   ",
        ]
    )
    assert parse_checksums(text, Algorithm.SHA512) == {"image.qcow2": Digest(Algorithm.SHA512, good)}


def test_parse_checksums_keeps_spaces_inside_names() -> None:
    sums = parse_checksums(f"{'1' * 64}  my image.img\n", Algorithm.SHA256)
    assert list(sums) == ["my image.img"]


@pytest.mark.parametrize(
    ("url", "algorithm"),
    [
        ("https://cloud.debian.org/images/cloud/bookworm/latest/SHA512SUMS", Algorithm.SHA512),
        ("http://127.0.0.1:8080/releases/jammy/release/SHA256SUMS", Algorithm.SHA256),
        ("https://example.org/sha256sums.txt", Algorithm.SHA256),
    ],
)
def test_algorithm_for_checksums(url: str, algorithm: Algorithm) -> None:
    assert algorithm_for_checksums(url) is algorithm


def test_algorithm_for_unknown_checksum_file() -> None:
    with pytest.raises(ImageError, match="MD5SUMS"):
        algorithm_for_checksums("https://example.org/images/MD5SUMS")


# -- the algorithm's name, the error class, CID pins -------------------------------------------------------------------


HEX512 = "ab" * 64


@pytest.mark.promise
def test_the_algorithm_comes_from_the_file_name_not_its_directory() -> None:
    assert algorithm_for_checksums("https://mirror.example/sha512-images/SHA256SUMS") is Algorithm.SHA256
    assert algorithm_for_checksums("https://mirror.example/sha256-images/SHA512SUMS") is Algorithm.SHA512
    assert algorithm_for_checksums("SHA512SUMS") is Algorithm.SHA512  # a bare name, no directory
    with pytest.raises(ImageError, match=r"cannot tell the digest algorithm of checksum file .*/SUMS"):
        algorithm_for_checksums("https://mirror.example/SHA512/SUMS")


@pytest.mark.promise
def test_a_digest_with_two_colons_is_an_invalid_value_of_its_algorithm() -> None:
    with pytest.raises(ImageError, match=r"invalid sha512 digest 'ab:"):
        Digest.parse(f"sha512:ab:{HEX512}")


@pytest.mark.promise
def test_the_caller_chooses_the_error_class_for_bad_hex_too() -> None:
    """--sha512 on the command line is a usage error (exit 2), not an image error."""
    with pytest.raises(UsageError, match="invalid sha512 digest"):
        Digest.parse("sha512:xyz", error=UsageError)
    with pytest.raises(UsageError, match="unsupported digest"):
        Digest.parse("md5:xyz", error=UsageError)


@pytest.mark.promise
def test_a_cid_pin_is_parsed_and_hashes_the_content_it_names() -> None:
    """An IPFS CID is a pin like a sha256: parsed (blanks trimmed), and the file it names hashes to it, another not."""
    pin = Digest.of(Algorithm.CID, "  QmcHFYKzbGeJYtDtcHEjgpKas4wZm8M25hjRusVLjou6Kx\n")
    assert pin == Digest(Algorithm.CID, "QmcHFYKzbGeJYtDtcHEjgpKas4wZm8M25hjRusVLjou6Kx")
    for data, named in [(random.Random(1).randbytes(1), True), (b"\0", False)]:  # test_cid's vector of size 1
        hasher = pin.hasher()
        hasher.update(data)
        assert (hasher.hexdigest() == pin.hex) is named


@pytest.mark.promise
def test_a_bad_cid_pin_is_refused_with_the_parsers_reason() -> None:
    with pytest.raises(UsageError, match=r"\S") as err:
        Digest.of(Algorithm.CID, "Qm-not-a-cid", error=UsageError)
    assert str(err.value) != "None" and "cid" in str(err.value).lower()
