"""The image catalog: built-in entries, user catalogs that add or override by name, errors that name file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from qemu_instances.catalog import BUILTIN, Catalog, CatalogEntry, parse_catalog
from qemu_instances.digests import Algorithm, Digest
from qemu_instances.errors import CatalogError

SHA512 = "sha512:" + "ab" * 64
SHA256 = "sha256:" + "cd" * 32
ALEPH = "ef" * 32

# From ../shared/reference/images-and-sources.md.
DEBIAN_12_PIN = (
    "sha512:3d94c9dd66d8a283fde060b8810373b7ae04038b956ee00d553d1ae564f6fbdeaa2fd6e7404e87e53348b5a9509170f3"
    "ea7c0731ba737590c5c4cb8d559a47f8"
)
# The jammy pin is the digest that Canonical's signed SHA256SUMS of release-20260722 carries (tests/data/ubuntu).
UBUNTU_2204_PIN = "sha256:757908b2fd6d5b1431bb45070fc1f56cbf017d4025568d292ece37d9cc75e812"


def write(tmp_path: Path, text: str, name: str = "user.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_builtin_catalog() -> None:
    catalog = Catalog.load()
    assert [e.name for e in catalog] == ["debian-11", "debian-12", "debian-13", "ubuntu-22.04", "ubuntu-24.04"]
    debian = catalog.lookup("debian-12")
    assert debian.digest == Digest.parse(DEBIAN_12_PIN)
    assert debian.url is not None and debian.url.endswith("/debian-12-genericcloud-amd64-20260923-2610.qcow2")
    assert debian.checksums_url == "https://cloud.debian.org/images/cloud/bookworm/latest/SHA512SUMS"
    assert debian.aleph_item_hash == "b6ff5c3a8205d1ca4c7c3369300eeafff498b558f71b851aa2114afd0a532717"
    assert debian.default_user == "debian"
    assert debian.origin == BUILTIN
    ubuntu = catalog.lookup("ubuntu-22.04")
    assert ubuntu.digest == Digest.parse(UBUNTU_2204_PIN)
    assert ubuntu.checksums_url is not None and ubuntu.checksums_url.endswith("/SHA256SUMS")
    assert ubuntu.default_user == "ubuntu"
    assert catalog.lookup("debian-11").aleph_item_hash == (
        "f7e68c568906b4ebcd3cd3c4bfdff96c489cd2a9ef73ba2d7503f244dfd578de"
    )


@pytest.mark.parametrize(
    ("alias", "name"), [("bookworm", "debian-12"), ("bullseye", "debian-11"), ("jammy", "ubuntu-22.04")]
)
def test_aliases_resolve(alias: str, name: str) -> None:
    catalog = Catalog.load()
    assert catalog.lookup(alias).name == name
    assert catalog.lookup(alias.upper()).name == name


def test_user_catalog_overrides_by_name_and_adds(tmp_path: Path) -> None:
    user = write(
        tmp_path,
        f"""
[images.debian-12]
url = "https://mirror.example/debian-12.qcow2"
digest = "{SHA512}"

[images.alpine-3]
title = "Alpine 3"
aliases = ["alpine"]
url = "https://mirror.example/alpine.qcow2"
digest = "{SHA256}"
""",
    )
    catalog = Catalog.load([user])
    assert {e.name for e in catalog} == {
        "debian-11",
        "debian-12",
        "debian-13",
        "ubuntu-22.04",
        "ubuntu-24.04",
        "alpine-3",
    }
    debian = catalog.lookup("debian-12")
    # The override replaces the whole entry: nothing of the built-in one leaks through.
    assert debian.url == "https://mirror.example/debian-12.qcow2"
    assert debian.digest == Digest(Algorithm.SHA512, "ab" * 64)
    assert debian.origin == str(user)
    assert debian.aliases == ()
    assert debian.aleph_item_hash is None
    assert catalog.get("bookworm") is None
    assert catalog.lookup("alpine").name == "alpine-3"
    assert catalog.lookup("ubuntu-22.04").origin == BUILTIN


def test_later_user_catalog_wins(tmp_path: Path) -> None:
    first = write(tmp_path, f'[images.x]\nurl = "https://a.example/x.img"\ndigest = "{SHA256}"\n', "a.toml")
    second = write(tmp_path, f'[images.x]\nurl = "https://b.example/x.img"\ndigest = "{SHA512}"\n', "b.toml")
    entry = Catalog.load([first, second]).lookup("x")
    assert entry.url == "https://b.example/x.img"
    assert entry.origin == str(second)


def test_defaults() -> None:
    (entry,) = parse_catalog(f'[images.min]\nurl = "https://e.example/min.qcow2"\ndigest = "{SHA256}"\n', "t")
    assert entry == CatalogEntry(
        name="min", title="min", url="https://e.example/min.qcow2", digest=Digest.parse(SHA256), origin="t"
    )
    assert entry.arch == "x86_64"
    assert entry.format is None  # decided by qemu-img after download
    assert entry.default_user == "cloud"
    (ubuntu,) = parse_catalog(f'[images.u]\nos = "ubuntu"\naleph_item_hash = "{ALEPH}"\n', "t")
    assert ubuntu.default_user == "ubuntu"
    assert ubuntu.url is None and ubuntu.digest is None  # aleph-only entries are valid


def test_alias_does_not_shadow_a_name() -> None:
    catalog = Catalog(
        parse_catalog(
            f"""
[images.a]
aliases = ["b"]
aleph_item_hash = "{ALEPH}"
[images.b]
aleph_item_hash = "{"0" * 64}"
""",
            "t",
        )
    )
    assert catalog.lookup("b").name == "b"


@pytest.mark.parametrize(
    ("body", "needles"),
    [
        (f'url = "https://e.example/x"\ndigest = "{SHA256}"\nsizes = 3\n', ["[images.bad]", "unknown key 'sizes'"]),
        (f'url = "https://e.example/x"\ndigest = "{SHA256}"\nsize = 0\n', ["'size'", "positive number of bytes"]),
        (f'url = "https://e.example/x"\ndigest = "{SHA256}"\nsize = true\n', ["'size'", "positive number"]),
        (f'url = ""\ndigest = "{SHA256}"\n', ["'url'", "non-empty string"]),
        (f'url = "https://"\ndigest = "{SHA256}"\n', ["'url'", "with a host"]),
        (f'url = "http://[::1"\ndigest = "{SHA256}"\n', ["'url'", "not a valid URL"]),
        (f'url = "https://e.example/a b"\ndigest = "{SHA256}"\n', ["'url'", "spaces"]),
        (f'url = "https://e.example/x"\ndigest = "{SHA256}"\naliases = ["Bad Alias"]\n', ["'aliases'"]),
        (f'url = "https://e.example/x"\ndigest = "{SHA256}"\naliases = [""]\n', ["'aliases'"]),
        # a valid name followed by more: the whole alias must be a name, not just its start
        (f'url = "https://e.example/x"\ndigest = "{SHA256}"\naliases = ["ok name"]\n', ["'aliases'"]),
        (f'url = "https://e.example/x"\ndigest = "{SHA256}"\naliases = ["ok\\u001b[31m"]\n', ["'aliases'"]),
        (f'url = "https://e.example/x"\ndigest = "{SHA256}"\ndefault_user = "root"\n', ["'default_user'", "root"]),
        (f'url = "https://e.example/x"\ndigest = "{SHA256}"\ndefault_user = "a b"\n', ["'default_user'"]),
        (f'url = "https://e.example/x"\ndigest = "{SHA256}"\ntitle = "\\u001b"\n', ["'title'", "printable"]),
        (
            f'url = "https://e.example/x"\ndigest = "{SHA256}"\nlatest_url = "ftp://e.example/l"\n'
            'checksums_url = "https://e.example/SHA256SUMS"\n',
            ["'latest_url'", "http(s) URL"],
        ),
        (
            f'url = "https://e.example/x"\ndigest = "{SHA256}"\nlatest_url = "https://e.example/l"\n'
            'checksums_url = "file:///etc/SHA256SUMS"\n',
            ["'checksums_url'", "http(s) URL"],
        ),
        (
            f'url = "https://e.example/x"\ndigest = "{SHA256}"\nlatest_url = "https://e.example/l"\n'
            'checksums_url = ""\n',
            ["'checksums_url'", "non-empty"],
        ),
        (
            f'url = "https://e.example/x"\ndigest = "{SHA256}"\nchecksums_signature_url = "https://e.example/s"\n',
            ["'checksums_signature_url' and 'signing_keys' go together"],
        ),
        (
            f'url = "https://e.example/x"\ndigest = "{SHA256}"\nchecksums_signature_url = "https://e.example/s"\n'
            'signing_keys = "ubuntu-cloud-images"\n',
            ["'checksums_signature_url' signs 'checksums_url'"],
        ),
        (
            f'url = "https://e.example/x"\ndigest = "{SHA256}"\nlatest_url = "https://e.example/l"\n'
            'checksums_url = "https://e.example/SHA256SUMS"\n'
            'checksums_signature_url = "https://e.example/SHA256SUMS.gpg"\nsigning_keys = "no-such-keyring"\n',
            ["'signing_keys'", "no keyring named 'no-such-keyring'", "ubuntu-cloud-images"],
        ),
        (
            f'url = "https://e.example/x"\ndigest = "{SHA256}"\nlatest_url = "https://e.example/l"\n'
            'checksums_url = "https://e.example/SHA256SUMS"\n'
            'checksums_signature_url = "https://e.example/SHA256SUMS.gpg"\nsigning_keys = "./missing.gpg"\n',
            ["'signing_keys'", "missing.gpg is not a file"],
        ),
        ('url = "https://e.example/x"\ndigest = "sha512:1234"\n', ["[images.bad]", "'digest'", "128 hex digits"]),
        ('url = "https://e.example/x"\ndigest = "md5:00"\n', ["'digest'", "sha256:<hex> or sha512:<hex>"]),
        ('url = "https://e.example/x"\ndigest = 12\n', ["'digest'", "must be a string"]),
        (f'digest = "{SHA256}"\n', ["[images.bad]", "missing key 'url'"]),
        ('url = "https://e.example/x"\n', ["[images.bad]", "missing key 'digest'"]),
        ("title = 'only a title'\n", ["missing key 'url'"]),
        (f'url = "ftp://e.example/x"\ndigest = "{SHA256}"\n', ["'url'", "http(s) URL"]),
        (f'url = "https://e.example/x"\ndigest = "{SHA256}"\ntitle = 3\n', ["'title'", "non-empty string"]),
        (f'url = "https://e.example/x"\ndigest = "{SHA256}"\naliases = "x"\n', ["'aliases'"]),
        (f'aleph_item_hash = "{ALEPH[:10]}"\n', ["'aleph_item_hash'", "64 lower-case hex digits or a CID"]),
        ('aleph_item_hash = "QmNotACid"\n', ["'aleph_item_hash'", "or a CID"]),
        (f'url = "https://e.example/x"\ndigest = "{SHA256}"\nformat = "vmdk"\n', ["'format'", "'qcow2' or 'raw'"]),
        (
            f'url = "https://e.example/x"\ndigest = "{SHA256}"\nlatest_url = "https://e.example/l"\n',
            ["'latest_url' and 'checksums_url' go together"],
        ),
    ],
)
def test_malformed_entry_names_file_and_key(tmp_path: Path, body: str, needles: list[str]) -> None:
    path = write(tmp_path, "[images.bad]\n" + body)
    with pytest.raises(CatalogError) as info:
        Catalog.load([path])
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    for needle in needles:
        assert needle in message
    assert info.value.exit_code == 3


def test_unknown_key_hint_lists_the_known_keys(tmp_path: Path) -> None:
    path = write(tmp_path, f'[images.bad]\nurl = "https://e.example/x"\ndigets = "{SHA256}"\n')
    with pytest.raises(CatalogError, match="unknown key 'digets'") as info:
        Catalog.load([path])
    assert info.value.hint is not None and "digest" in info.value.hint


def test_invalid_toml_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[images.x]\nurl = "https://e.example/x\n')
    with pytest.raises(CatalogError, match="invalid TOML") as info:
        Catalog.load([path])
    assert str(path) in str(info.value)
    assert "line 2" in str(info.value)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[image.x]\nurl = "https://e.example/x"\n', "unknown top-level key 'image'"),
        ('images = "x"\n', "'images' must be a table"),
        (f'[images.Bad_Name]\ndigest = "{SHA256}"\n', "[images.Bad_Name]: invalid image name"),
        ("[images]\nx = 3\n", "[images.x]: expected a table"),
    ],
)
def test_malformed_catalog_structure(tmp_path: Path, text: str, needle: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(CatalogError) as info:
        Catalog.load([path])
    assert str(path) in str(info.value)
    assert needle in str(info.value)


def test_unreadable_catalog_is_a_catalog_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(CatalogError, match="cannot read catalog") as info:
        Catalog.load([missing])
    assert str(missing) in str(info.value)


def test_catalog_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[images.x]\ntitle = "caf\xe9"\n')
    with pytest.raises(CatalogError) as info:
        Catalog.load([path])
    assert str(path) in str(info.value)
    assert "UTF-8" in str(info.value)


@pytest.mark.parametrize(
    ("name", "suggested"),
    [("debian-14", ["debian-13", "debian-12"]), ("jamy", ["jammy"]), ("ubuntu-22.4", ["ubuntu-22.04"])],
)
def test_unknown_name_suggests_the_closest(name: str, suggested: list[str]) -> None:
    with pytest.raises(CatalogError, match=f"unknown image '{name}'") as info:
        Catalog.load().lookup(name)
    assert info.value.exit_code == 3
    hint = info.value.hint or ""
    assert hint.startswith("did you mean")
    for candidate in suggested:
        assert candidate in hint


def test_unknown_name_without_close_match_lists_all() -> None:
    with pytest.raises(CatalogError) as info:
        Catalog.load().lookup("fedora-40")
    assert info.value.hint is not None
    known = "bookworm, bullseye, debian-11, debian-12, debian-13, jammy, noble, trixie, ubuntu-22.04, ubuntu-24.04"
    assert f"known images: {known}" in info.value.hint


def test_current_releases_and_signed_latest_channels() -> None:
    catalog = Catalog.load()
    trixie = catalog.lookup("trixie")
    assert trixie.name == "debian-13"
    assert trixie.url == (
        "https://cloud.debian.org/images/cloud/trixie/20260712-2537/debian-13-genericcloud-amd64-20260712-2537.qcow2"
    )
    assert str(trixie.digest).startswith("sha512:7ae53e9dbee282bfc16f289dec483dde3a8598769c38a267948310f7a2a52c66")
    assert trixie.checksums_url == "https://cloud.debian.org/images/cloud/trixie/latest/SHA512SUMS"
    assert (trixie.signed, trixie.latest_trust, trixie.default_user) == (False, "unsigned", "debian")
    noble = catalog.lookup("noble")
    assert noble.name == "ubuntu-24.04"
    assert noble.digest == Digest.parse("sha256:ffe6203da54deeb6db5d2a98a83f9ec8e55f149d3f7ba622e1abe5fa966ee3d6")
    assert noble.url is not None and "/releases/noble/release-20260705/" in noble.url
    for entry in (noble, catalog.lookup("jammy")):
        assert entry.signed and entry.latest_trust == "signed"
        assert entry.signing_keys == "ubuntu-cloud-images"
        assert entry.checksums_signature_url == f"{entry.checksums_url}.gpg"
    assert catalog.lookup("jammy").url == (
        "https://cloud-images.ubuntu.com/releases/jammy/release-20260722/ubuntu-22.04-server-cloudimg-amd64.img"
    )
    # The seed's aleph item hashes are unchanged.
    assert catalog.lookup("jammy").aleph_item_hash == "4a0f62da42f4478544616519e6f5d58adb1096e069b392b151d47c3609492d0c"


def test_titles_lose_control_characters_and_escapes(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f'[images.x]\nurl = "https://e.example/x"\ndigest = "{SHA256}"\n'
        'title = "Evil\\u001b[2J\\u001b]0;owned\\u0007 title\\u009b\\u202e"\nos = "li\\u0000nux"\n',
    )
    entry = Catalog.load([path]).lookup("x")
    assert entry.title == "Evil[2J]0;owned title"
    assert entry.os == "linux"


def test_size_and_a_keyring_path_relative_to_the_catalog(tmp_path: Path) -> None:
    keyring = Path(__file__).parent / "data" / "ubuntu" / "ubuntu-cloudimage-keyring.gpg"
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "k.gpg").write_bytes(keyring.read_bytes())
    path = write(
        tmp_path,
        f'[images.x]\nurl = "https://e.example/x"\ndigest = "{SHA256}"\nsize = 1234\n'
        'latest_url = "https://e.example/l"\nchecksums_url = "https://e.example/SHA256SUMS"\n'
        'checksums_signature_url = "https://e.example/SHA256SUMS.gpg"\nsigning_keys = "keys/k.gpg"\n',
    )
    entry = Catalog.load([path]).lookup("x")
    assert entry.size == 1234
    assert entry.signing_keys == str(tmp_path / "keys" / "k.gpg")


def test_an_aleph_item_hash_may_be_a_cid(tmp_path: Path) -> None:
    """aleph message hashes are sha256 hex or CIDs (`qinst pull aleph:<CID>` accepts both; so does a catalog)."""
    v0 = "QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQH"  # the CIDv0 of an empty file (Kubo's default import)
    path = write(tmp_path, f'[images.a]\naleph_item_hash = "{v0}"\n')
    assert Catalog.load([path]).get("a").aleph_item_hash == v0


# -- each refusal's exact reason, and the edges of valid values --------------------------------------------------------


BASE = 'url = "https://e.example/x"\ndigest = "sha256:' + "cd" * 32 + '"\n'
CIDV1 = "bafybeidbbs6ocod3v27jtr4uhvc6n55y3gbrtur3bvjsnraudtbxkozi2y"  # js-ipfs's CID of one chunk + 1 byte


@pytest.mark.promise
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
        (  # an ssh option, were it placed before the destination
            'default_user = "-oproxycommand"',
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


@pytest.mark.promise
@pytest.mark.parametrize("value", ["3", "[1, 2]", "true"])
def test_an_aleph_hash_that_is_not_a_string_is_refused_not_a_crash(value: str) -> None:
    with pytest.raises(CatalogError) as err:
        parse_catalog(f"[images.x]\naleph_item_hash = {value}\n", "my.toml")
    assert err.value.message == (
        "my.toml: [images.x]: key 'aleph_item_hash': must be 64 lower-case hex digits or a CID (Qm..., bafy...)"
    )


@pytest.mark.promise
def test_a_digest_that_is_not_a_string_is_said_so() -> None:
    with pytest.raises(CatalogError) as err:
        parse_catalog('[images.x]\nurl = "https://e.example/x"\ndigest = 3\n', "my.toml")
    assert err.value.message == "my.toml: [images.x]: key 'digest': must be a string like 'sha512:<hex>'"


@pytest.mark.promise
@pytest.mark.promise
@pytest.mark.parametrize("name", ["-x", "-oproxycommand", ".hidden", "_x"])
def test_an_image_name_starting_with_a_dash_or_a_dot_is_refused(name: str) -> None:
    with pytest.raises(CatalogError) as err:
        parse_catalog(f'[images."{name}"]\n{BASE}', "my.toml")
    assert err.value.message.startswith(f"my.toml: [images.{name}]: invalid image name")


def test_an_unknown_key_lists_the_known_ones() -> None:
    with pytest.raises(CatalogError) as err:
        parse_catalog(f"[images.x]\n{BASE}colour = 1\n", "my.toml")
    assert err.value.message == "my.toml: [images.x]: unknown key 'colour'"
    assert (err.value.hint or "").startswith("known keys: title, aliases, os, release, arch, format, url, digest,")


@pytest.mark.promise
def test_the_edges_of_valid_values_are_accepted() -> None:
    (entry,) = parse_catalog(f'[images.x]\n{BASE}format = "raw"\nsize = 1\naleph_item_hash = "{CIDV1}"\n', "t")
    assert (entry.format, entry.size, entry.aleph_item_hash) == ("raw", 1, CIDV1)


@pytest.mark.promise
def test_a_catalog_without_images_is_empty_not_an_error() -> None:
    assert parse_catalog("", "empty.toml") == []
    assert parse_catalog("# nothing here yet\n", "empty.toml") == []


@pytest.mark.promise
def test_an_architectures_table_takes_the_channel_files_never_the_entrys_pin() -> None:
    """[images.NAME.aarch64] names its own file: the entry's url, digest, size and aleph item are the x86_64 image's,
    and an arm64 guest must never be given them (only the format and the checksum files are shared)."""
    text = (
        f'[images.x]\nurl = "https://e.invalid/amd64.qcow2"\ndigest = "{SHA512}"\nsize = 4096\nformat = "qcow2"\n'
        f'aleph_item_hash = "{ALEPH}"\n'
        f'[images.x.aarch64]\nurl = "https://e.invalid/arm64.qcow2"\ndigest = "{SHA256}"\n'
    )
    (entry,) = parse_catalog(text, "t")
    assert entry.arches == ("x86_64", "aarch64")
    arm = entry.for_arch("aarch64")
    assert arm is not None and arm.arch == "aarch64"
    assert (arm.url, arm.digest) == ("https://e.invalid/arm64.qcow2", Digest.parse(SHA256))
    assert (arm.size, arm.aleph_item_hash) == (None, None)  # not the amd64 file's size, nor its aleph item
    assert arm.format == "qcow2"  # the channel's (shared)
    assert entry.for_arch("x86_64") is entry


@pytest.mark.promise
def test_a_firmware_cannot_take_an_images_alias(tmp_path: Path) -> None:
    """One namespace: `qinst pull bookworm` must not mean debian-12 to one reader and a firmware to another."""
    path = write(tmp_path, '[firmware.bookworm]\nurl = "https://e.invalid/OVMF.fd"\ndigest = "' + SHA256 + '"\n')
    with pytest.raises(CatalogError, match=r"\[firmware.bookworm\]: an image of the catalog has that name"):
        Catalog.load([path])
