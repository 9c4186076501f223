"""Digests: the cases the mutation run (scripts/mutation.sh) showed no other test pinned down."""

from __future__ import annotations

import random

import pytest

from qemu_instances.digests import Algorithm, Digest, algorithm_for_checksums
from qemu_instances.errors import ImageError, UsageError

HEX512 = "ab" * 64


def test_the_algorithm_comes_from_the_file_name_not_its_directory() -> None:
    assert algorithm_for_checksums("https://mirror.example/sha512-images/SHA256SUMS") is Algorithm.SHA256
    assert algorithm_for_checksums("https://mirror.example/sha256-images/SHA512SUMS") is Algorithm.SHA512
    assert algorithm_for_checksums("SHA512SUMS") is Algorithm.SHA512  # a bare name, no directory
    with pytest.raises(ImageError, match=r"cannot tell the digest algorithm of checksum file .*/SUMS"):
        algorithm_for_checksums("https://mirror.example/SHA512/SUMS")


def test_a_digest_with_two_colons_is_an_invalid_value_of_its_algorithm() -> None:
    with pytest.raises(ImageError, match=r"invalid sha512 digest 'ab:"):
        Digest.parse(f"sha512:ab:{HEX512}")


def test_the_caller_chooses_the_error_class_for_bad_hex_too() -> None:
    """--sha512 on the command line is a usage error (exit 2), not an image error."""
    with pytest.raises(UsageError, match="invalid sha512 digest"):
        Digest.parse("sha512:xyz", error=UsageError)
    with pytest.raises(UsageError, match="unsupported digest"):
        Digest.parse("md5:xyz", error=UsageError)


def test_a_cid_pin_is_parsed_and_hashes_the_content_it_names() -> None:
    """An IPFS CID is a pin like a sha256: parsed (blanks trimmed), and the file it names hashes to it, another not."""
    pin = Digest.of(Algorithm.CID, "  QmcHFYKzbGeJYtDtcHEjgpKas4wZm8M25hjRusVLjou6Kx\n")
    assert pin == Digest(Algorithm.CID, "QmcHFYKzbGeJYtDtcHEjgpKas4wZm8M25hjRusVLjou6Kx")
    for data, named in [(random.Random(1).randbytes(1), True), (b"\0", False)]:  # test_cid's vector of size 1
        hasher = pin.hasher()
        hasher.update(data)
        assert (hasher.hexdigest() == pin.hex) is named


def test_a_bad_cid_pin_is_refused_with_the_parsers_reason() -> None:
    with pytest.raises(UsageError, match=r"\S") as err:
        Digest.of(Algorithm.CID, "Qm-not-a-cid", error=UsageError)
    assert str(err.value) != "None" and "cid" in str(err.value).lower()
