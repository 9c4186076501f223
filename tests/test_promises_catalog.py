"""Catalog validation: what the mutation run (scripts/mutation.sh) showed no test pinned down. Each refusal says why
in words a user can act on (the error is the whole interface of a bad catalog), and the edges of each valid value
are accepted."""

from __future__ import annotations

import pytest

from qemu_instances.catalog import parse_catalog
from qemu_instances.errors import CatalogError

BASE = 'url = "https://e.example/x"\ndigest = "sha256:' + "cd" * 32 + '"\n'
CIDV1 = "bafybeidbbs6ocod3v27jtr4uhvc6n55y3gbrtur3bvjsnraudtbxkozi2y"  # js-ipfs's CID of one chunk + 1 byte


@pytest.mark.parametrize(
    ("line", "key", "reason"),
    [
        (
            'aliases = ["Bad Alias"]',
            "aliases",
            "must be a list of image names (lower-case letters, digits, '.', '_', '-')",
        ),
        ("size = 0", "size", "must be a positive number of bytes"),
        ('format = "vmdk"', "format", "must be 'qcow2' or 'raw' (qinst boots only those)"),
        ('os = " "', "os", "must be a non-empty string"),
        ('title = "\\u001b\\u200f"', "title", "must hold printable text"),
        ('latest_url = "ftp://e.example/x"', "latest_url", "must be an http(s) URL with a host"),
        (
            'latest_url = "https://e.example/a\\u001bb"',
            "latest_url",
            "must not contain spaces or control characters",
        ),
        (
            'aleph_item_hash = "Qm-not-a-cid"',
            "aleph_item_hash",
            "must be 64 lower-case hex digits or a CID (Qm..., bafy...)",
        ),
        (
            'default_user = "Admin"',
            "default_user",
            "must be a user name (lower-case letters, digits, '_', '-', starting with a letter)",
        ),
        (
            'default_user = "root"',
            "default_user",
            "must not be root (cloud images lock root; qinst logs in as an unprivileged user)",
        ),
    ],
)
def test_a_refused_value_is_named_with_its_reason(line: str, key: str, reason: str) -> None:
    with pytest.raises(CatalogError) as err:
        parse_catalog(f"[images.x]\n{BASE}{line}\n", "my.toml")
    assert err.value.message == f"my.toml: [images.x]: key {key!r}: {reason}"


@pytest.mark.parametrize("value", ["3", "[1, 2]", "true"])
def test_an_aleph_hash_that_is_not_a_string_is_refused_not_a_crash(value: str) -> None:
    with pytest.raises(CatalogError) as err:
        parse_catalog(f"[images.x]\naleph_item_hash = {value}\n", "my.toml")
    assert err.value.message == (
        "my.toml: [images.x]: key 'aleph_item_hash': must be 64 lower-case hex digits or a CID (Qm..., bafy...)"
    )


def test_a_digest_that_is_not_a_string_is_said_so() -> None:
    with pytest.raises(CatalogError) as err:
        parse_catalog('[images.x]\nurl = "https://e.example/x"\ndigest = 3\n', "my.toml")
    assert err.value.message == "my.toml: [images.x]: key 'digest': must be a string like 'sha512:<hex>'"


def test_an_unknown_key_lists_the_known_ones() -> None:
    with pytest.raises(CatalogError) as err:
        parse_catalog(f"[images.x]\n{BASE}colour = 1\n", "my.toml")
    assert err.value.message == "my.toml: [images.x]: unknown key 'colour'"
    assert (err.value.hint or "").startswith("known keys: title, aliases, os, release, arch, format, url, digest,")


def test_the_edges_of_valid_values_are_accepted() -> None:
    (entry,) = parse_catalog(f'[images.x]\n{BASE}format = "raw"\nsize = 1\naleph_item_hash = "{CIDV1}"\n', "t")
    assert (entry.format, entry.size, entry.aleph_item_hash) == ("raw", 1, CIDV1)


def test_a_catalog_without_images_is_empty_not_an_error() -> None:
    assert parse_catalog("", "empty.toml") == []
    assert parse_catalog("# nothing here yet\n", "empty.toml") == []
